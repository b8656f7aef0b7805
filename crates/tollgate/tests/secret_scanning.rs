//! The leak-resistant key format (SPEC §2) against the real tools:
//!
//! * a key minted by the binary ends in a valid checksum, a look-alike with
//!   a wrong one does not: `tollgate keys check` (offline) says so with its
//!   exit code, and never prints the secret part;
//! * detect-secrets with `docs/secret-scanning/tollgate_plugin.py` reports
//!   the real key and not the look-alike;
//! * the gitleaks rule's regex (`docs/secret-scanning/gitleaks.toml`) matches
//!   the format, checked with Python's `re`: gitleaks is not packaged in
//!   Debian, and the regex keeps to the syntax RE2 and Python share.
//!
//! Needs detect-secrets in the venv made by
//! `scripts/install-secret-scan-deps.sh` (run by `scripts/test.sh`), or
//! `TOLLGATE_DETECT_SECRETS` naming the executable. Fails, never skips,
//! without it.
//!
//! cargo test -p tollgate --test secret_scanning
mod common;
use common::*;
use serde_json::Value;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn repo() -> PathBuf {
    manifest_dir().join("../..")
}

/// The detect-secrets executable and the Python of its venv.
fn detect_secrets() -> (PathBuf, PathBuf) {
    let exe = std::env::var_os("TOLLGATE_DETECT_SECRETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/secret-scanning/bin/detect-secrets"));
    let python = exe.with_file_name("python3");
    assert!(
        exe.is_file() && python.is_file(),
        "detect-secrets is required by this test but {} (and python3 beside it) is missing; \
         run scripts/install-secret-scan-deps.sh. Tests never skip.",
        exe.display()
    );
    (exe, python)
}

/// `key` with its last character changed: same format, wrong checksum.
fn look_alike(key: &str) -> String {
    let mut s = key.to_string();
    let last = s.pop().unwrap();
    s.push(if last == 'x' { 'y' } else { 'x' });
    s
}

fn check(arg: &str, stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.args([
        "--data-dir",
        "/nonexistent/tollgate-keys-check",
        "keys",
        "check",
        arg,
    ])
    .stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("run tollgate");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn keys_check_tells_real_keys_from_look_alikes_offline() {
    let dir = TestDir::new("keycheck");
    let real = create_key(&dir.join("data"), "scan", &[]);
    let public = create_key(&dir.join("data"), "pub", &["--public"]);
    let secret_part = &real[19..];

    let (code, out, err) = check(&real, None);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("well formed: yes"), "{out}");
    assert!(out.contains("kind: secret"), "{out}");
    assert!(out.contains(&format!("id: {}", key_id(&real))), "{out}");
    assert!(out.contains("checksum: valid"), "{out}");
    assert!(
        !out.contains(secret_part) && !err.contains(secret_part),
        "secret printed"
    );

    let (code, out, _) = check(&public, None);
    assert_eq!(code, Some(0));
    assert!(out.contains("kind: public"), "{out}");

    let fake = look_alike(&real);
    let (code, out, err) = check(&fake, None);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("well formed: yes"), "{out}");
    assert!(
        err.contains("no valid checksum: a key from before checksums, or mistyped"),
        "{err}"
    );
    assert!(!out.contains(&fake[19..]) && !err.contains(&fake[19..]));

    // A key from before checksums: well formed, no checksum, exit 1.
    let old = "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123";
    assert_eq!(check(old, None).0, Some(1));
    // Malformed.
    let (code, out, _) = check("tg_sk_short_abc", None);
    assert_eq!(code, Some(1));
    assert!(out.contains("well formed: no"), "{out}");
    // From standard input.
    let (code, out, _) = check("-", Some(&format!("{real}\n")));
    assert_eq!(code, Some(0), "{out}");
    // Usage error: no KEY.
    let o = tollgate(&["keys", "check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        !std::path::Path::new("/nonexistent/tollgate-keys-check").exists(),
        "check touched a data directory"
    );
}

#[test]
fn detect_secrets_plugin_reports_the_real_key_not_the_look_alike() {
    let (exe, _) = detect_secrets();
    let dir = TestDir::new("detectsecrets");
    let real = create_key(&dir.join("data"), "scan", &[]);
    let fake = look_alike(&real);
    let file = dir.join("config.env");
    std::fs::write(
        &file,
        format!("TOLLGATE_KEY_REAL=\"{real}\"\nTOLLGATE_KEY_FAKE=\"{fake}\"\n"),
    )
    .unwrap();
    let plugin = repo().join("docs/secret-scanning/tollgate_plugin.py");
    let o = Command::new(&exe)
        .current_dir(&dir.path)
        .args(["scan", "--plugin"])
        .arg(&plugin)
        .arg("config.env")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(
        o.status.success(),
        "detect-secrets failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("detect-secrets JSON");
    assert!(
        v["plugins_used"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "TollgateKeyDetector"),
        "plugin not loaded: {v}"
    );
    let ours: Vec<&Value> = v["results"]["config.env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["type"] == "Tollgate API key")
                .collect()
        })
        .unwrap_or_default();
    let lines: Vec<u64> = ours
        .iter()
        .map(|r| r["line_number"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![1], "only the real key (line 1): {v}");
}

#[test]
fn gitleaks_regex_matches_the_key_format() {
    let (_, python) = detect_secrets();
    let dir = TestDir::new("gitleaks");
    let real = create_key(&dir.join("data"), "scan", &[]);
    let public = create_key(&dir.join("data"), "pub", &["--public"]);
    let fake = look_alike(&real);
    let not_keys = [
        "tg_sk_ABCDEFGHIJ12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123", // upper-case id
        "tg_sk_abcdefghij1_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef01234", // 11-char id
        "tg_xk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123", // kind
        "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcde",      // 31-char secret
    ];
    let text = format!(
        "a = \"{real}\"\nb: {public}\nc={fake}\n{}\n",
        not_keys.join("\n")
    );
    let input = dir.join("input.txt");
    std::fs::write(&input, &text).unwrap();
    let script = r#"
import json, re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    cfg = tomllib.load(f)
rule = next(r for r in cfg["rules"] if r["id"] == "tollgate-api-key")
rx = re.compile(rule["regex"])
group = rule.get("secretGroup", 0)
text = open(sys.argv[2]).read()
print(json.dumps({
    "matches": [m.group(group) for m in rx.finditer(text)],
    "keywords": rule["keywords"],
}))
"#;
    let o = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(repo().join("docs/secret-scanning/gitleaks.toml"))
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let matches: Vec<&str> = v["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    // The regex finds the format (look-alikes too: a regex cannot verify a
    // CRC; the plugin and `keys check` do), whole, and nothing else.
    assert_eq!(
        matches,
        vec![real.as_str(), public.as_str(), fake.as_str()],
        "{v}"
    );
    assert_eq!(v["keywords"], serde_json::json!(["tg_sk_", "tg_pk_"]));
    // If a gitleaks binary happens to be installed, run the real one too.
    if let Ok(out) = Command::new("gitleaks").arg("version").output() {
        if out.status.success() {
            let o = Command::new("gitleaks")
                .args([
                    "detect",
                    "--no-git",
                    "--report-format",
                    "json",
                    "--report-path",
                ])
                .arg(dir.join("report.json"))
                .arg("--config")
                .arg(repo().join("docs/secret-scanning/gitleaks.toml"))
                .arg("--source")
                .arg(&input)
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(1), "gitleaks finds leaks: {o:?}");
            let report = std::fs::read_to_string(dir.join("report.json")).unwrap();
            for k in [&real, &public, &fake] {
                assert!(
                    report.contains(k.as_str()),
                    "gitleaks missed a key: {report}"
                );
            }
        }
    }
}
