//! SIP over TLS end to end (SPEC §1, §6; issue 5 item 2), against the real
//! binary, with an independent TLS client: Python's `ssl` module (OpenSSL)
//! in `tests/tls_support/tls_uac.py`. Certificates come from rcgen: a test CA,
//! a server certificate for IP 127.0.0.1, client certificates (valid, from an
//! untrusted CA, expired).
//!
//! cargo test --workspace --test e2e_tls
mod common;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn python() -> String {
    std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn uac_script() -> PathBuf {
    manifest_dir()
        .join("tests")
        .join("tls_support")
        .join("tls_uac.py")
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> (String, String) {
    let sans = if server {
        vec!["127.0.0.1".to_string()]
    } else {
        vec![]
    };
    let mut p = CertificateParams::new(sans).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Replaces a file the way deployment tooling does (write, then rename).
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(dir: &TestDir) -> Pki {
        let pki = Pki {
            dir: dir.join("pki"),
            ca: ca("tollgate test CA"),
        };
        std::fs::create_dir_all(&pki.dir).unwrap();
        put(&pki.path("ca.pem"), &pki.ca.cert.pem());
        pki.server("server");
        pki
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    /// (Re)writes server.pem / server.key with a fresh certificate.
    fn server(&self, cn: &str) {
        let (c, k) = leaf(&self.ca, cn, true, false);
        put(&self.path("server.pem"), &c);
        put(&self.path("server.key"), &k);
    }
    fn client(&self, name: &str, ca: &Ca, expired: bool) {
        let (c, k) = leaf(ca, name, false, expired);
        put(&self.path(&format!("{name}.pem")), &c);
        put(&self.path(&format!("{name}.key")), &k);
    }
    fn tls_toml(&self, mutual: bool) -> String {
        let mut s = format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.s("server.pem"),
            self.s("server.key")
        );
        if mutual {
            s.push_str(&format!("client_ca_file = \"{}\"\n", self.s("ca.pem")));
        }
        s
    }
}

fn tls_edge(pki: &Pki, mutual: bool) -> (Edge, std::net::SocketAddr) {
    let edge = Edge::start(EdgeConfig {
        tcp: false,
        extra_toml: pki.tls_toml(mutual),
        extra_args: vec![
            "--sip-listen".into(),
            "udp:127.0.0.1:0".into(),
            "--sip-listen".into(),
            "tls:127.0.0.1:0".into(),
        ],
        ..Default::default()
    });
    let tls = edge.listening("sip tls").unwrap_or_else(|| {
        panic!(
            "no `tollgate: listening sip tls ADDR` line: {:?}",
            edge.stdout_lines.lock().unwrap()
        )
    });
    assert!(tls.ip().is_loopback());
    (edge, tls)
}

// ---------------------------------------------------------------------------
// The Python client
// ---------------------------------------------------------------------------

fn uac(mode: &str, port: u16, pki: &Pki, client: Option<&str>, extra: &[String]) -> Command {
    let mut c = Command::new(python());
    c.arg(uac_script())
        .arg(mode)
        .arg("--port")
        .arg(port.to_string())
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--to")
        .arg(SERVICE)
        .arg("--from-user")
        .arg("tlsuac")
        .args(extra);
    if let Some(name) = client {
        c.arg("--cert")
            .arg(pki.path(&format!("{name}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{name}.key")));
    }
    c
}

fn results(stdout: &str) -> Vec<Json> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|j| Json::parse(j).unwrap_or_else(|| panic!("bad RESULT json {j:?}")))
        .collect()
}

/// Runs the client to completion within `limit`; (exit ok, RESULT lines, text).
fn run_uac(mut cmd: Command, limit: Duration) -> (bool, Vec<Json>, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("tls_uac.py did not finish within {limit:?}"))
        .expect("tls_uac.py output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("tls_uac.py: {text}");
    (out.status.success(), results(&stdout), text)
}

fn write_tokens(dir: &TestDir, name: &str, tokens: &[String]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, tokens.join("\n") + "\n").unwrap();
    p.to_string_lossy().into_owned()
}

fn num(j: &Json, k: &str) -> f64 {
    match j.get(k) {
        Some(n) if n.is_number() => n.as_f64().expect("a JSON number is an f64"),
        other => panic!("{k} is not a number in {j:?}: {other:?}"),
    }
}

fn jbool(j: &Json, k: &str) -> bool {
    match j.get(k) {
        Some(Json::Bool(b)) => *b,
        other => panic!("{k} is not a bool in {j:?}: {other:?}"),
    }
}

fn sha256_hex_of_pem(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    sha256(&der).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn tls_100_bearer_calls_from_an_openssl_client() {
    let dir = TestDir::new("tls100");
    let pki = Pki::new(&dir);
    let (edge, tls) = tls_edge(&pki, false);
    let key = edge.first_key();
    let tokens = mint_many(&key, SERVICE, "tlsuac", 100);
    let file = write_tokens(&dir, "tokens.txt", &tokens);
    let cmd = uac(
        "calls",
        tls.port(),
        &pki,
        None,
        &["--tokens".into(), file, "--conns".into(), "4".into()],
    );
    let (ok, res, text) = run_uac(cmd, Duration::from_secs(240));
    assert!(ok, "100 calls over SIP/TLS:\n{text}");
    let r = res.last().expect("a RESULT line");
    assert_eq!(num(r, "completed"), 100.0, "{text}");
    assert_eq!(num(r, "connections"), 4.0, "{text}");
    assert!(
        text.contains(r#""answers": ["RTP/AVP"]"#),
        "RTP/AVP offers are answered RTP/AVP:\n{text}"
    );
    // Our Contact over TLS is a SIPS URI on the TLS listener.
    assert!(
        text.contains(&format!("sips:tollgate@{tls}")),
        "Contact toward a TLS caller must be sips:tollgate@{tls}:\n{text}"
    );
    let m = scrape_text(&edge);
    let ok_total: f64 = m
        .lines()
        .filter(|l| l.starts_with("tollgate_sip_requests_total{") && l.contains("INVITE"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(ok_total >= 100.0, "INVITEs counted: {ok_total}\n{m}");
}

fn scrape_text(edge: &Edge) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(edge.metrics_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn mutual_tls_refuses_untrusted_expired_and_missing_client_certificates() {
    let dir = TestDir::new("tls-mutual");
    let pki = Pki::new(&dir);
    let stranger = ca("stranger CA");
    pki.client("valid", &pki.ca, false);
    pki.client("untrusted", &stranger, false);
    pki.client("expired", &pki.ca, true);
    let (edge, tls) = tls_edge(&pki, true);

    for (who, reason) in [
        (None, "CERTIFICATE_REQUIRED"),
        (Some("untrusted"), "UNKNOWN_CA"),
        (Some("expired"), "CERTIFICATE_EXPIRED"),
    ] {
        let (_, res, text) = run_uac(
            uac("probe", tls.port(), &pki, who, &[]),
            Duration::from_secs(60),
        );
        let r = res.last().unwrap_or_else(|| panic!("no RESULT:\n{text}"));
        assert!(
            jbool(r, "refused"),
            "client certificate {who:?} must be refused at the handshake:\n{text}"
        );
        assert!(
            r.str("error").unwrap_or_default().contains(reason),
            "client certificate {who:?}: OpenSSL must report {reason}:\n{text}"
        );
    }
    // The valid certificate gets answers and completes calls.
    let (_, res, text) = run_uac(
        uac("probe", tls.port(), &pki, Some("valid"), &[]),
        Duration::from_secs(60),
    );
    let r = res.last().unwrap_or_else(|| panic!("no RESULT:\n{text}"));
    assert!(!jbool(r, "refused"), "valid client certificate:\n{text}");
    assert_eq!(num(r, "status"), 200.0, "OPTIONS over mutual TLS:\n{text}");
    let tokens = mint_many(&edge.first_key(), SERVICE, "tlsuac", 2);
    let file = write_tokens(&dir, "tokens.txt", &tokens);
    let (ok, _, text) = run_uac(
        uac(
            "calls",
            tls.port(),
            &pki,
            Some("valid"),
            &["--tokens".into(), file, "--conns".into(), "1".into()],
        ),
        Duration::from_secs(60),
    );
    assert!(ok, "calls with a valid client certificate:\n{text}");
    let m = scrape_text(&edge);
    assert!(
        m.lines().any(|l| l
            .starts_with("tollgate_sip_tls_handshake_failures_total{reason=\"failed\"} ")
            && !l.ends_with(" 0")),
        "refused handshakes are counted:\n{m}"
    );
}

#[test]
fn reload_gives_new_handshakes_the_new_certificate_while_a_call_continues() {
    let dir = TestDir::new("tls-reload");
    let pki = Pki::new(&dir);
    let old_pem = std::fs::read_to_string(pki.path("server.pem")).unwrap();
    let (edge, tls) = tls_edge(&pki, false);
    let tokens = mint_many(&edge.first_key(), SERVICE, "tlsuac", 2);
    let file = write_tokens(&dir, "tokens.txt", &tokens);
    let mut child = uac("reload", tls.port(), &pki, None, &["--tokens".into(), file])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l);
        }
    });
    let next_result = |rx: &mpsc::Receiver<String>| -> Json {
        loop {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("tls_uac.py reload: no RESULT line within 60 s");
            if let Some(j) = l.strip_prefix("RESULT ") {
                return Json::parse(j).expect("RESULT json");
            }
        }
    };
    let up = next_result(&rx);
    assert_eq!(up.str("phase"), Some("up"), "{up:?}");
    assert_eq!(
        up.str("fingerprint"),
        Some(sha256_hex_of_pem(&old_pem).as_str())
    );

    // New certificate files, then SIGHUP (which reloads them).
    pki.server("server after reload");
    let new_pem = std::fs::read_to_string(pki.path("server.pem")).unwrap();
    let st = Command::new("kill")
        .args(["-HUP", &edge.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !edge
        .stdout_lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("tollgate: reloaded"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no `tollgate: reloaded` after SIGHUP: {:?}",
            edge.stdout_lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
    }
    let done = next_result(&rx);
    assert_eq!(done.str("phase"), Some("done"), "{done:?}");
    assert_eq!(
        done.str("fingerprint_new"),
        Some(sha256_hex_of_pem(&new_pem).as_str()),
        "a handshake after the reload presents the new certificate"
    );
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the call set up before the reload ended with BYE/200 on its old connection"
    );
}

#[test]
fn tls_and_sdes_config_errors_name_the_field() {
    let dir = TestDir::new("tls-config");
    let run = |toml: &str, extra: &[&str]| {
        let cfg = dir.join(&format!("c{}.toml", unique("cfg")));
        std::fs::write(&cfg, toml).unwrap();
        let data = dir.join("data");
        let mut args = vec!["serve", "--data-dir"];
        let data_s = data.to_string_lossy().into_owned();
        let cfg_s = cfg.to_string_lossy().into_owned();
        args.push(&data_s);
        args.push("--config");
        args.push(&cfg_s);
        args.extend_from_slice(extra);
        let out = tollgate(&args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let listen = "[sip]\nlisten = [\"tls:127.0.0.1:0\"]\n";
    let (code, err) = run(listen, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls.cert_file"), "{err}");
    let (code, err) = run(
        &format!("{listen}[tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n"),
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls.cert_file"), "{err}");
    // SDES rule: srtp toward a cleartext target needs the route's consent.
    let route = "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n[[routes]]\ntarget = \"sip:agent@127.0.0.1:5080\"\nmedia = \"srtp\"\n";
    let (code, err) = run(route, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("routes[0].sdes_over_cleartext"), "{err}");
}

/// The SDES rule end to end: over TLS an RTP/SAVP offer with a=crypto is
/// answered RTP/SAVP with our key (the echo leg B, over UDP, gets plain RTP:
/// `auto` drops to `rtp` toward a cleartext target); the same offer over UDP
/// gets 488 with a Warning.
#[test]
fn sdes_offer_is_served_over_tls_and_refused_over_udp() {
    let dir = TestDir::new("tls-sdes");
    let pki = Pki::new(&dir);
    let (edge, tls) = tls_edge(&pki, false);
    let tokens = mint_many(&edge.first_key(), SERVICE, "tlsuac", 2);
    let file = write_tokens(&dir, "tokens.txt", &tokens[..1]);
    let (ok, _, text) = run_uac(
        uac(
            "calls",
            tls.port(),
            &pki,
            None,
            &[
                "--tokens".into(),
                file,
                "--conns".into(),
                "1".into(),
                "--savp".into(),
            ],
        ),
        Duration::from_secs(60),
    );
    assert!(ok, "an SDES call over TLS:\n{text}");
    assert!(
        text.contains(r#""answers": ["RTP/SAVP crypto"]"#),
        "an RTP/SAVP offer over TLS is answered RTP/SAVP with a=crypto:\n{text}"
    );

    let savp = "v=0\r\no=u 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 40000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n";
    let mut req = Req::invite(edge.sip_udp, SERVICE, "tlsuac").bearer(&tokens[1]);
    req.body = savp.as_bytes().to_vec();
    let mut ua = UdpUa::new(edge.sip_udp);
    let out = ua
        .transact(&req, Duration::from_secs(20))
        .expect("a final response to the SDES offer over UDP");
    assert_eq!(out.fin.code(), Some(488), "{:?}", out.fin.start);
    assert!(
        out.fin.header("Warning").is_some_and(|w| w.contains("TLS")),
        "488 says why: {:?}",
        out.fin.header("Warning")
    );
}
