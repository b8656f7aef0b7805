//! Shared harness for the Tollgate integration tests.
//!
//! * [`Edge`]: spawns the real `tollgate serve` binary with a config file in a
//!   fresh temp dir, learns its ports from the `tollgate: listening ...` lines,
//!   kills it on drop (and prints its stderr if the test failed).
//! * [`tollgate`] / [`tollgate_ok`]: run CLI subcommands.
//! * SIPp: [`require_sipp`] (panics, never skips), [`Sipp`] builder with a
//!   hard wall-clock bound, [`SippResult`] with the final `-trace_stat` row.
//! * Ports: [`alloc_ports`] hands out blocks of free UDP ports outside the
//!   kernel's ephemeral range, unique within the process.
//! * A tiny SIP UA over UDP ([`UdpUa`]) and TCP ([`TcpUa`]), a scriptable
//!   destination UAS ([`MiniUas`]), SIP message parsing ([`SipMsg`]).
//! * Crypto done independently of the product (RustCrypto sha2/hmac/md-5 and
//!   base64, not the product's ring): SHA-256, HMAC-SHA256, MD5, base64url,
//!   JWT signing, the digest password and digest responses; JSON as
//!   `serde_json::Value` ([`Json`], [`JsonExt`]).
//! * Prometheus scraping over a plain `TcpStream`.
#![allow(
    dead_code,
    clippy::too_many_arguments,
    clippy::type_complexity,
    clippy::wrong_self_convention
)]

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
pub const REALM: &str = "tollgate";
/// Request-URI user the SIPp UAC dials (`-s`) and tokens are minted for.
pub const SERVICE: &str = "15551230000";
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
pub fn sipp_scenario(name: &str) -> PathBuf {
    manifest_dir().join("tests").join("sipp").join(name)
}
pub fn corpus_dir() -> PathBuf {
    manifest_dir().join("tests").join("corpus")
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A process-unique random-looking token (hex), for branches, tags, Call-IDs, jti.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let h = sha256(format!("{}-{}-{}", std::process::id(), n, t).as_bytes());
    format!("{prefix}{}", &hex(&h)[..16])
}

// ---------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------

/// A unique directory under `std::env::temp_dir()`; removed on drop unless the
/// thread is panicking (the path is printed then) or `TOLLGATE_KEEP_TEST_DIRS`
/// is set.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "tollgate-it-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("TOLLGATE_KEEP_TEST_DIRS").is_some() {
            eprintln!("[harness] test files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

/// Run `tollgate ARGS...` and return its output (never panics on failure).
pub fn tollgate(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

pub fn describe_output(args: &[&str], o: &Output) -> String {
    format!(
        "`tollgate {}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `tollgate ARGS...`, assert exit 0, return trimmed stdout.
pub fn tollgate_ok(args: &[&str]) -> String {
    let o = tollgate(args);
    assert!(
        o.status.success(),
        "command failed: {}",
        describe_output(args, &o)
    );
    String::from_utf8(o.stdout)
        .expect("stdout is UTF-8")
        .trim()
        .to_string()
}

/// `tollgate <args> --data-dir DIR`, asserting success.
pub fn tollgate_in(data_dir: &Path, args: &[&str]) -> String {
    let d = data_dir.to_str().unwrap();
    let mut v: Vec<&str> = args.to_vec();
    v.push("--data-dir");
    v.push(d);
    tollgate_ok(&v)
}

/// `keys create --name N EXTRA...` in DIR; asserts the output is one full key.
pub fn create_key(data_dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut v = vec!["keys", "create", "--name", name];
    v.extend_from_slice(extra);
    let out = tollgate_in(data_dir, &v);
    assert_eq!(
        out.lines().count(),
        1,
        "keys create must print the key alone on one line, got {out:?}"
    );
    assert_key_format(&out);
    out
}

pub fn assert_key_format(key: &str) {
    let ok_prefix = key.starts_with("tg_sk_") || key.starts_with("tg_pk_");
    assert!(ok_prefix, "key {key:?} must start with tg_sk_ or tg_pk_");
    let rest = &key[6..];
    let (id, secret) = rest
        .split_once('_')
        .unwrap_or_else(|| panic!("key {key:?} has no _<secret>"));
    assert_eq!(id.len(), 12, "key id {id:?} must be 12 chars");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "key id {id:?} must be [a-z0-9]"
    );
    assert!(secret.len() >= 32, "secret of {key:?} must be >= 32 chars");
    assert!(
        secret.bytes().all(|b| b.is_ascii_alphanumeric()),
        "secret of {key:?} must be [A-Za-z0-9]"
    );
}

/// The 12-character id between `tg_sk_`/`tg_pk_` and the next `_`.
pub fn key_id(key: &str) -> String {
    assert!(key.len() > 6, "not a key: {key:?}");
    let rest = &key[6..];
    rest.split('_').next().unwrap().to_string()
}

/// `token mint --key KEY --to TO --from FROM EXTRA...` -> JWT.
pub fn mint(key: &str, to: &str, from: &str, extra: &[&str]) -> String {
    let mut v = vec!["token", "mint", "--key", key, "--to", to, "--from", from];
    v.extend_from_slice(extra);
    let out = tollgate_ok(&v);
    assert_eq!(
        out.lines().count(),
        1,
        "token mint must print the JWT alone, got {out:?}"
    );
    assert_eq!(
        out.split('.').count(),
        3,
        "token mint output is not a JWT: {out:?}"
    );
    out
}

/// Mint `n` tokens with the CLI, 4 in parallel.
pub fn mint_many(key: &str, to: &str, from: &str, n: usize) -> Vec<String> {
    let out = Arc::new(Mutex::new(vec![String::new(); n]));
    let next = Arc::new(AtomicU64::new(0));
    let mut hs = vec![];
    for _ in 0..4 {
        let (out, next, key, to, from) = (
            out.clone(),
            next.clone(),
            key.to_string(),
            to.to_string(),
            from.to_string(),
        );
        hs.push(thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
            if i >= n {
                break;
            }
            let t = mint(&key, &to, &from, &[]);
            out.lock().unwrap()[i] = t;
        }));
    }
    for h in hs {
        h.join().expect("mint thread panicked");
    }
    let v = out.lock().unwrap().clone();
    v
}

/// Write a SIPp `-inf` file: SEQUENTIAL, one `value;` line per call.
pub fn write_inf(path: &Path, fields: &[String]) {
    let mut s = String::from("SEQUENTIAL\n");
    for f in fields {
        assert!(!f.contains(';') && !f.contains('\n'));
        s.push_str(f);
        s.push_str(";\n");
    }
    fs::write(path, s).unwrap();
}

// ---------------------------------------------------------------------------
// The edge
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// `[[routes]] target`; None = no route section (built-in echo destination).
    pub route_target: Option<String>,
    pub route_media: String,
    /// None = leave the key out (product default).
    pub digest_algorithms: Option<Vec<String>>,
    pub t1_ms: Option<u64>,
    pub invite_timeout_s: Option<u64>,
    pub tcp: bool,
    /// Lines added to the `[sip]` table (e.g. `drain_timeout_s = 5`).
    pub sip_extra: String,
    /// Lines added to the `[admin]` table (e.g. `tls_cert = "..."`).
    pub admin_extra: String,
    /// Appended verbatim to the TOML file.
    pub extra_toml: String,
    /// Extra CLI args after `serve`.
    pub extra_args: Vec<String>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            route_target: None,
            route_media: "rtp".into(),
            digest_algorithms: Some(vec!["MD5".into(), "SHA-256".into()]),
            t1_ms: None,
            invite_timeout_s: None,
            tcp: true,
            sip_extra: String::new(),
            admin_extra: String::new(),
            extra_toml: String::new(),
            extra_args: vec![],
        }
    }
}

impl EdgeConfig {
    pub fn routed_to(target_port: u16) -> Self {
        EdgeConfig {
            route_target: Some(format!("sip:service@127.0.0.1:{target_port}")),
            ..Default::default()
        }
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::from("[sip]\n");
        if self.tcp {
            s.push_str("listen = [\"udp:127.0.0.1:0\", \"tcp:127.0.0.1:0\"]\n");
        } else {
            s.push_str("listen = [\"udp:127.0.0.1:0\"]\n");
        }
        s.push_str(&format!("realm = \"{REALM}\"\n"));
        if let Some(algs) = &self.digest_algorithms {
            let q: Vec<String> = algs.iter().map(|a| format!("\"{a}\"")).collect();
            s.push_str(&format!("digest_algorithms = [{}]\n", q.join(", ")));
        }
        if let Some(t1) = self.t1_ms {
            s.push_str(&format!("t1_ms = {t1}\n"));
        }
        if let Some(t) = self.invite_timeout_s {
            s.push_str(&format!("invite_timeout_s = {t}\n"));
        }
        if !self.sip_extra.is_empty() {
            s.push_str(self.sip_extra.trim_end());
            s.push('\n');
        }
        s.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        // the admin API defaults to 127.0.0.1:8080: parallel edges must not share it
        s.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        if !self.admin_extra.is_empty() {
            s.push_str(self.admin_extra.trim_end());
            s.push('\n');
        }
        if let Some(t) = &self.route_target {
            s.push_str(&format!(
                "\n[[routes]]\ntarget = \"{t}\"\nmedia = \"{}\"\n",
                self.route_media
            ));
            // Test destinations are on loopback UDP: allow SDES keys there
            // (the product refuses them over cleartext by default).
            if self.route_media == "srtp" {
                s.push_str("sdes_over_cleartext = true\n");
            }
        }
        s.push('\n');
        s.push_str(&self.extra_toml);
        s
    }
}

pub struct Edge {
    child: Option<Child>,
    pub dir: TestDir,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
    pub sip_udp: SocketAddr,
    pub sip_tcp: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub first_key: Option<String>,
    pub stdout_lines: Arc<Mutex<Vec<String>>>,
}

impl Edge {
    /// Fresh data dir, start, wait for `tollgate: ready`.
    pub fn start(cfg: EdgeConfig) -> Edge {
        Edge::start_in(TestDir::new("edge"), cfg)
    }

    /// Start with `dir/data` as data dir (keys may have been created there
    /// before with [`tollgate_in`]).
    pub fn start_in(dir: TestDir, cfg: EdgeConfig) -> Edge {
        let data_dir = dir.join("data");
        let config_path = dir.join("tollgate.toml");
        let stderr_path = dir.join("edge.stderr");
        fs::write(&config_path, cfg.to_toml()).unwrap();
        let stderr = File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config_path)
            .args(&cfg.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let lines = lines.clone();
            thread::spawn(move || {
                // keeps draining stdout for the edge's whole life
                for l in BufReader::new(stdout).lines() {
                    let Ok(l) = l else { break };
                    lines.lock().unwrap().push(l.clone());
                    let _ = tx.send(l);
                }
            });
        }
        let mut edge = Edge {
            child: Some(child),
            dir,
            data_dir,
            config_path,
            stderr_path,
            sip_udp: "0.0.0.0:0".parse().unwrap(),
            sip_tcp: None,
            metrics: None,
            first_key: None,
            stdout_lines: lines,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        let mut udp = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let t: Vec<&str> = line.split_whitespace().collect();
                    if line.trim() == "tollgate: ready" {
                        break;
                    } else if t.len() >= 5
                        && t[0] == "tollgate:"
                        && t[1] == "listening"
                        && t[2] == "sip"
                    {
                        let a: SocketAddr = t[4]
                            .parse()
                            .unwrap_or_else(|_| panic!("bad address in {line:?}"));
                        match t[3] {
                            "udp" => udp = Some(a),
                            "tcp" => edge.sip_tcp = Some(a),
                            _ => {}
                        }
                    } else if t.len() >= 4
                        && t[0] == "tollgate:"
                        && t[1] == "listening"
                        && t[2] == "metrics"
                    {
                        edge.metrics = Some(
                            t[3].parse()
                                .unwrap_or_else(|_| panic!("bad address in {line:?}")),
                        );
                    } else if let Some(k) =
                        line.strip_prefix("tollgate: first secret key (shown once): ")
                    {
                        edge.first_key = Some(k.trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let so = edge.stdout_lines.lock().unwrap().join("\n");
                    panic!(
                        "edge printed no `tollgate: ready` within {READY_DEADLINE:?}\nstdout so far:\n{so}\nstderr tail:\n{}",
                        edge.stderr_tail(60)
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = edge.child.as_mut().unwrap().wait();
                    let so = edge.stdout_lines.lock().unwrap().join("\n");
                    panic!(
                        "edge exited before `tollgate: ready` ({st:?})\nconfig:\n{}\nstdout:\n{so}\nstderr tail:\n{}",
                        cfg.to_toml(),
                        edge.stderr_tail(60)
                    );
                }
            }
        }
        edge.sip_udp = udp.unwrap_or_else(|| {
            panic!(
                "edge said ready without a `tollgate: listening sip udp ADDR` line; stdout: {:?}",
                edge.stdout_lines.lock().unwrap()
            )
        });
        if cfg.tcp {
            assert!(
                edge.sip_tcp.is_some(),
                "config listens on tcp but no `tollgate: listening sip tcp` line: {:?}",
                edge.stdout_lines.lock().unwrap()
            );
        }
        edge
    }

    /// The address of a `tollgate: listening <what...> ADDR` line printed
    /// before `ready`, e.g. `listening("admin")` or `listening("sip tls")`.
    pub fn listening(&self, what: &str) -> Option<SocketAddr> {
        let prefix = format!("tollgate: listening {what} ");
        self.stdout_lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    pub fn first_key(&self) -> String {
        self.first_key.clone().unwrap_or_else(|| {
            panic!(
                "edge printed no `tollgate: first secret key (shown once): ...` line; stdout: {:?}",
                self.stdout_lines.lock().unwrap()
            )
        })
    }
    pub fn tcp(&self) -> SocketAddr {
        self.sip_tcp.expect("edge has no TCP listener")
    }
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.unwrap_or_else(|| {
            panic!(
                "no `tollgate: listening metrics ADDR` line; stdout: {:?}",
                self.stdout_lines.lock().unwrap()
            )
        })
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
    /// `tollgate ARGS --data-dir D`, asserting success.
    pub fn cli(&self, args: &[&str]) -> String {
        tollgate_in(&self.data_dir, args)
    }
    pub fn create_key(&self, name: &str, extra: &[&str]) -> String {
        create_key(&self.data_dir, name, extra)
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().unwrap().try_wait().ok().flatten()
    }
    pub fn stderr_tail(&self, n: usize) -> String {
        let s = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = c.try_wait().ok().flatten();
            let _ = c.kill();
            let _ = c.wait();
            if thread::panicking() {
                eprintln!(
                    "[harness] edge (exited early: {status:?}) stderr tail ({}):\n{}",
                    self.stderr_path.display(),
                    self.stderr_tail(40)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Ports for one SIPp instance: SIP (`-p`), media (`-mp`, SIPp also binds
/// media+2) and its UDP control socket (`-cp`, default 8888 would collide).
#[derive(Clone, Copy, Debug)]
pub struct PortBlock {
    pub sip: u16,
    pub media: u16,
    pub control: u16,
}

const PORT_LO: u16 = 7000;
const PORT_BLOCKS: u32 = 370; // 7000..9960, below the ephemeral range (32768+)
const BLOCK: u16 = 8;

/// Hand out a block of 8 consecutive UDP ports that are free right now.
/// Blocks come from 7000-9959 (outside the kernel's ephemeral range, so the
/// edge's and the test UA's port-0 sockets never take them), the start
/// offset depends on the pid and a process-wide counter makes blocks unique
/// within one test binary; every port is test-bound on 0.0.0.0 first.
pub fn alloc_ports() -> PortBlock {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % PORT_BLOCKS,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..PORT_BLOCKS {
        let i = NEXT.fetch_add(1, Ordering::SeqCst) % PORT_BLOCKS;
        let base = PORT_LO + (i as u16) * BLOCK;
        let all_free = (base..base + BLOCK).all(|p| {
            UdpSocket::bind(("0.0.0.0", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        });
        if all_free {
            return PortBlock {
                sip: base,
                media: base + 2,
                control: base + 6,
            };
        }
    }
    panic!("no free block of {BLOCK} UDP ports in {PORT_LO}..");
}

/// Something listens on 127.0.0.1:port (or 0.0.0.0:port) over UDP.
pub fn udp_listening(port: u16) -> bool {
    let want_lo = format!("0100007F:{port:04X}");
    let want_any = format!("00000000:{port:04X}");
    fs::read_to_string("/proc/net/udp")
        .map(|s| {
            s.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a == want_lo || a == want_any)
            })
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// SIPp
// ---------------------------------------------------------------------------

/// Panics (tests never skip) when `sipp` is not runnable.
pub fn require_sipp() {
    match Command::new("sipp").arg("-v").stdin(Stdio::null()).output() {
        Ok(o)
            if String::from_utf8_lossy(&o.stdout).contains("SIPp")
                || String::from_utf8_lossy(&o.stderr).contains("SIPp") => {}
        Ok(o) => panic!("`sipp -v` did not identify as SIPp: {o:?}"),
        Err(e) => panic!(
            "SIPp is required by this test but `sipp` is not on PATH ({e}). \
             Install it (Debian: `apt-get install sip-tester`, SIPp 3.6.x). Tests never skip."
        ),
    }
}

pub struct Sipp {
    name: String,
    dir: PathBuf,
    scenario: PathBuf,
    remote: Option<SocketAddr>,
    ports: PortBlock,
    args: Vec<String>,
    timeout: Duration,
}

impl Sipp {
    /// `scenario` is a file name in `tests/sipp/`; files go to `dir/NAME_*`.
    pub fn new(dir: &Path, name: &str, scenario: &str) -> Sipp {
        let scenario = sipp_scenario(scenario);
        assert!(scenario.exists(), "missing scenario {}", scenario.display());
        Sipp {
            name: name.into(),
            dir: dir.to_path_buf(),
            scenario,
            remote: None,
            ports: alloc_ports(),
            args: vec![],
            timeout: Duration::from_secs(60),
        }
    }
    pub fn ports(&self) -> PortBlock {
        self.ports
    }
    pub fn remote(mut self, a: SocketAddr) -> Self {
        self.remote = Some(a);
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args(mut self, a: &[&str]) -> Self {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }
    pub fn calls(self, n: u32) -> Self {
        self.arg("-m").arg(n.to_string())
    }
    pub fn rate(self, cps: u32) -> Self {
        self.arg("-r").arg(cps.to_string())
    }
    pub fn pause_ms(self, ms: u32) -> Self {
        self.arg("-d").arg(ms.to_string())
    }
    pub fn service(self, s: &str) -> Self {
        self.arg("-s").arg(s)
    }
    pub fn inf(self, p: &Path) -> Self {
        self.arg("-inf").arg(p.to_str().unwrap())
    }
    pub fn digest(self, user: &str, pass: &str) -> Self {
        self.arg("-au").arg(user).arg("-ap").arg(pass)
    }
    /// SIPp's own global timeout; the harness kills it 15 s later at the latest.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    pub fn spawn(self) -> SippProc {
        let f = |ext: &str| self.dir.join(format!("{}_{ext}", self.name));
        let (stat, err, msg, stderr_p, stdout_p) = (
            f("stat.csv"),
            f("err.log"),
            f("messages.log"),
            f("stderr.log"),
            f("stdout.log"),
        );
        let mut cmd = Command::new("sipp");
        cmd.arg("-sf").arg(&self.scenario);
        if let Some(r) = self.remote {
            cmd.arg(r.to_string());
        }
        let secs = self.timeout.as_secs().max(1);
        cmd.args([
            "-i",
            "127.0.0.1",
            "-p",
            &self.ports.sip.to_string(),
            "-mp",
            &self.ports.media.to_string(),
        ])
        .args(["-cp", &self.ports.control.to_string(), "-nostdin"])
        .args(["-trace_stat", "-stf", stat.to_str().unwrap(), "-fd", "1"])
        .args(["-trace_err", "-error_file", err.to_str().unwrap()])
        .args(["-trace_msg", "-message_file", msg.to_str().unwrap()])
        .args(["-timeout", &format!("{secs}s"), "-timeout_error"])
        .args(&self.args)
        .current_dir(&self.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(File::create(&stdout_p).unwrap()))
        .stderr(Stdio::from(File::create(&stderr_p).unwrap()));
        let cmdline = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn sipp: {e} (is SIPp installed?)"));
        // wait until it has bound its SIP port (or died)
        let t0 = Instant::now();
        while !udp_listening(self.ports.sip) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "sipp {} exited at start ({st}): {cmdline}\nstderr: {}",
                    self.name,
                    fs::read_to_string(&stderr_p).unwrap_or_default()
                );
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!(
                    "sipp {} did not bind udp 127.0.0.1:{} within 10 s",
                    self.name, self.ports.sip
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        SippProc {
            child: Some(child),
            name: self.name,
            ports: self.ports,
            stat,
            err,
            msg,
            stderr: stderr_p,
            cmdline,
            hard_deadline: Instant::now() + self.timeout + Duration::from_secs(15),
        }
    }

    /// Spawn and wait for it to end (bounded).
    pub fn run(self) -> SippResult {
        self.spawn().wait()
    }
}

pub struct SippProc {
    child: Option<Child>,
    pub name: String,
    pub ports: PortBlock,
    stat: PathBuf,
    err: PathBuf,
    msg: PathBuf,
    stderr: PathBuf,
    cmdline: String,
    hard_deadline: Instant,
}

fn signal(pid: u32, sig: &str) {
    // only ever our own child, by its pid
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl SippProc {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.sip))
    }
    /// Wait until it exits by itself or the hard deadline passes.
    pub fn wait(self) -> SippResult {
        let d = self.hard_deadline.saturating_duration_since(Instant::now());
        self.wait_at_most(d)
    }
    /// Wait up to `d`, then SIGTERM (SIPp writes its final stats), then SIGKILL.
    pub fn wait_at_most(mut self, d: Duration) -> SippResult {
        let mut child = self.child.take().unwrap();
        let end = Instant::now() + d;
        let mut killed = false;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if Instant::now() >= end {
                killed = true;
                signal(child.id(), "TERM");
                let t = Instant::now();
                loop {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(5) {
                        let _ = child.kill();
                        break;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                break child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(50));
        };
        let stats = parse_sipp_stat(&self.stat);
        SippResult {
            name: self.name.clone(),
            status: status.code(),
            killed,
            stats,
            errors: fs::read_to_string(&self.err).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
            messages: self.msg.clone(),
            cmdline: self.cmdline.clone(),
        }
    }
}

impl Drop for SippProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Last complete row of a SIPp `-trace_stat` CSV as name -> value.
pub fn parse_sipp_stat(p: &Path) -> HashMap<String, String> {
    let s = fs::read_to_string(p).unwrap_or_default();
    let mut lines = s.lines().filter(|l| !l.trim().is_empty());
    let Some(hdr) = lines.next() else {
        return HashMap::new();
    };
    let hdr: Vec<&str> = hdr.split(';').collect();
    let mut last = None;
    for l in lines {
        let r: Vec<&str> = l.split(';').collect();
        if r.len() + 1 >= hdr.len() {
            last = Some(r);
        }
    }
    let mut m = HashMap::new();
    if let Some(r) = last {
        for (h, v) in hdr.iter().zip(r.iter()) {
            m.insert(h.to_string(), v.to_string());
        }
    }
    m
}

pub struct SippResult {
    pub name: String,
    pub status: Option<i32>,
    pub killed: bool,
    pub stats: HashMap<String, String>,
    pub errors: String,
    pub stderr: String,
    pub messages: PathBuf,
    pub cmdline: String,
}

impl SippResult {
    pub fn stat(&self, k: &str) -> u64 {
        self.stats
            .get(k)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|f| f as u64)
            .unwrap_or(0)
    }
    pub fn successful(&self) -> u64 {
        self.stat("SuccessfulCall(C)")
    }
    pub fn failed(&self) -> u64 {
        self.stat("FailedCall(C)")
    }
    pub fn created(&self) -> u64 {
        self.stat("TotalCallCreated")
    }
    pub fn incoming(&self) -> u64 {
        self.stat("IncomingCall(C)")
    }
    pub fn summary(&self) -> String {
        let keys = [
            "TotalCallCreated",
            "IncomingCall(C)",
            "OutgoingCall(C)",
            "SuccessfulCall(C)",
            "FailedCall(C)",
            "FailedUnexpectedMessage(C)",
            "FailedMaxUDPRetrans(C)",
            "FailedCallRejected(C)",
            "Retransmissions(C)",
            "OutOfCallMsgs(C)",
            "DeadCallMsgs(C)",
            "FailedRegexpDoesntMatch(C)",
            "FailedRegexpHdrNotFound(C)",
        ];
        let st: Vec<String> = keys
            .iter()
            .filter_map(|k| self.stats.get(*k).map(|v| format!("{k}={v}")))
            .collect();
        let err_tail: Vec<&str> = self.errors.lines().collect();
        let err_tail = err_tail[err_tail.len().saturating_sub(40)..].join("\n");
        format!(
            "sipp `{}` exit={:?}{} stats: {}\ncmd: {}\nstderr: {}\nerror log tail:\n{}\nmessage log: {}",
            self.name,
            self.status,
            if self.killed { " (killed at deadline)" } else { "" },
            st.join(" "),
            self.cmdline,
            self.stderr.trim(),
            err_tail,
            self.messages.display()
        )
    }
    /// Exit 0, exactly `n` successful calls, no failed call.
    pub fn assert_calls_ok(&self, n: u64) {
        assert!(
            self.status == Some(0) && !self.killed && self.successful() == n && self.failed() == 0,
            "expected {n} successful calls and exit 0 from {}",
            self.summary()
        );
    }
}

// ---------------------------------------------------------------------------
// SIP messages
// ---------------------------------------------------------------------------

fn expand_compact(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "i" => "call-id",
        "m" => "contact",
        "e" => "content-encoding",
        "l" => "content-length",
        "c" => "content-type",
        "f" => "from",
        "s" => "subject",
        "k" => "supported",
        "t" => "to",
        "v" => "via",
        "o" => "event",
        "r" => "refer-to",
        "u" => "allow-events",
        "b" => "referred-by",
        "x" => "session-expires",
        _ => return n,
    }
    .to_string()
}

#[derive(Clone, Debug)]
pub struct SipMsg {
    pub raw: Vec<u8>,
    pub start: String,
    /// (lowercased, compact forms expanded, value trimmed); one entry per header line.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SipMsg {
    pub fn parse(raw: &[u8]) -> Option<SipMsg> {
        let (head_end, sep) = find(raw, b"\r\n\r\n")
            .map(|p| (p, 4))
            .or_else(|| find(raw, b"\n\n").map(|p| (p, 2)))?;
        let head = String::from_utf8_lossy(&raw[..head_end]).replace("\r\n", "\n");
        let mut lines: Vec<String> = vec![];
        for l in head.split('\n') {
            if (l.starts_with(' ') || l.starts_with('\t')) && !lines.is_empty() {
                let last = lines.last_mut().unwrap();
                last.push(' ');
                last.push_str(l.trim());
            } else {
                lines.push(l.to_string());
            }
        }
        let start = lines.first()?.trim_end().to_string();
        let mut headers = vec![];
        for l in &lines[1..] {
            if let Some((n, v)) = l.split_once(':') {
                headers.push((expand_compact(n), v.trim().to_string()));
            }
        }
        let body = raw[head_end + sep..].to_vec();
        Some(SipMsg {
            raw: raw.to_vec(),
            start,
            headers,
            body,
        })
    }
    pub fn is_response(&self) -> bool {
        self.start.starts_with("SIP/2.0 ")
    }
    pub fn code(&self) -> Option<u16> {
        if !self.is_response() {
            return None;
        }
        self.start.split_whitespace().nth(1)?.parse().ok()
    }
    pub fn method(&self) -> Option<&str> {
        if self.is_response() {
            None
        } else {
            self.start.split_whitespace().next()
        }
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        let n = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        let n = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn call_id(&self) -> Option<&str> {
        self.header("call-id")
    }
    pub fn cseq(&self) -> Option<(u32, String)> {
        let v = self.header("cseq")?;
        let mut it = v.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.to_string()))
    }
    pub fn top_via(&self) -> Option<&str> {
        self.header("via")
            .map(|v| v.split(',').next().unwrap().trim())
    }
    pub fn via_branch(&self) -> Option<String> {
        param(self.top_via()?, "branch")
    }
    pub fn to_tag(&self) -> Option<String> {
        param(self.header("to")?, "tag")
    }
    pub fn from_tag(&self) -> Option<String> {
        param(self.header("from")?, "tag")
    }
    /// URI inside the Contact header (`<...>` stripped).
    pub fn contact_uri(&self) -> Option<String> {
        let c = self.header("contact")?;
        Some(match (c.find('<'), c.find('>')) {
            (Some(a), Some(b)) if b > a => c[a + 1..b].to_string(),
            _ => c.split(';').next().unwrap().trim().to_string(),
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
    /// Request-URI (requests only).
    pub fn ruri(&self) -> Option<&str> {
        if self.is_response() {
            None
        } else {
            self.start.split_whitespace().nth(1)
        }
    }
    /// User part of the URI in a name-addr / URI header value.
    pub fn uri_user(v: &str) -> Option<String> {
        let u = match (v.find('<'), v.find('>')) {
            (Some(a), Some(b)) if b > a => &v[a + 1..b],
            _ => v,
        };
        let rest = u.split_once(':')?.1;
        let (user, _) = rest.split_once('@')?;
        Some(user.split(';').next().unwrap().to_string())
    }
}

/// `;name=value` parameter of a header value (case-insensitive name).
pub fn param(v: &str, name: &str) -> Option<String> {
    for p in v.split(';').skip(1) {
        let (k, val) = p.split_once('=').unwrap_or((p, ""));
        if k.trim().eq_ignore_ascii_case(name) {
            return Some(val.trim().trim_matches('"').to_string());
        }
    }
    None
}

pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    h.windows(n.len()).position(|w| w == n)
}

/// Parse an auth header value `Scheme k=v, k="v", ...` -> (scheme, params lowercased keys).
pub fn parse_challenge(v: &str) -> (String, HashMap<String, String>) {
    let v = v.trim();
    let (scheme, rest) = v.split_once(|c: char| c.is_whitespace()).unwrap_or((v, ""));
    let mut m = HashMap::new();
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let k = rest[ks..i].trim().to_ascii_lowercase();
        let mut val = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && b[i] == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    val.push(b[i] as char);
                    i += 1;
                }
                i += 1;
            } else {
                let vs = i;
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                val = rest[vs..i].trim().to_string();
            }
        }
        if !k.is_empty() {
            m.insert(k, val);
        }
    }
    (scheme.to_string(), m)
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

pub const SDP_OFFER: &str = "v=0\r\no=tgtest 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub ruri: String,
    pub transport: &'static str,
    pub branch: String,
    pub from: String,
    pub to: String,
    pub call_id: String,
    pub cseq: u32,
    pub cseq_method: String,
    pub contact: bool,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
}

impl Req {
    pub fn new(method: &str, ruri: &str, from_user: &str, to: &str) -> Req {
        Req {
            method: method.into(),
            ruri: ruri.into(),
            transport: "UDP",
            branch: unique("z9hG4bK-tg"),
            from: format!("<sip:{from_user}@127.0.0.1>;tag={}", unique("ft")),
            to: to.into(),
            call_id: unique("call-") + "@tgtest",
            cseq: 1,
            cseq_method: method.into(),
            contact: method == "INVITE",
            headers: vec![],
            body: vec![],
            content_type: None,
        }
    }
    /// INVITE sip:TO_USER@EDGE with an SDP offer, From user FROM_USER.
    pub fn invite(edge: SocketAddr, to_user: &str, from_user: &str) -> Req {
        let mut r = Req::new(
            "INVITE",
            &format!("sip:{to_user}@{edge}"),
            from_user,
            &format!("<sip:{to_user}@{edge}>"),
        );
        r.body = SDP_OFFER.as_bytes().to_vec();
        r.content_type = Some("application/sdp".into());
        r
    }
    pub fn options(edge: SocketAddr) -> Req {
        Req::new(
            "OPTIONS",
            &format!("sip:{edge}"),
            "probe",
            &format!("<sip:{edge}>"),
        )
    }
    pub fn tcp(mut self) -> Self {
        self.transport = "TCP";
        self
    }
    pub fn header(mut self, n: &str, v: &str) -> Self {
        self.headers.push((n.into(), v.into()));
        self
    }
    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }
    pub fn render(&self, local: SocketAddr) -> Vec<u8> {
        let mut s = format!(
            "{} {} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={};rport\r\nMax-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\n",
            self.method, self.ruri, self.transport, local, self.branch, self.from, self.to, self.call_id, self.cseq, self.cseq_method
        );
        if self.contact {
            s.push_str(&format!(
                "Contact: <sip:tgtest@{local};transport={}>\r\n",
                self.transport.to_ascii_lowercase()
            ));
        }
        for (n, v) in &self.headers {
            s.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(ct) = &self.content_type {
            s.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        s.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut b = s.into_bytes();
        b.extend_from_slice(&self.body);
        b
    }
    /// ACK for a non-2xx final response (same branch, RFC 3261 17.1.1.3).
    pub fn ack_non2xx(&self, resp: &SipMsg) -> Req {
        let mut a = self.clone();
        a.method = "ACK".into();
        a.cseq_method = "ACK".into();
        a.to = resp.header("to").unwrap_or(&self.to).to_string();
        a.headers.retain(|(n, _)| n.eq_ignore_ascii_case("Route"));
        a.body.clear();
        a.content_type = None;
        a.contact = false;
        a
    }
    /// A new in-dialog request after a 2xx (new branch, To tag, R-URI = Contact).
    pub fn in_dialog(&self, resp: &SipMsg, method: &str, cseq: u32) -> Req {
        let mut a = self.clone();
        a.method = method.into();
        a.cseq_method = method.into();
        a.cseq = cseq;
        a.branch = unique("z9hG4bK-tg");
        a.ruri = resp.contact_uri().unwrap_or_else(|| self.ruri.clone());
        a.to = resp.header("to").unwrap_or(&self.to).to_string();
        a.headers.clear();
        a.body.clear();
        a.content_type = None;
        a.contact = false;
        a
    }
    pub fn matches(&self, m: &SipMsg) -> bool {
        m.is_response()
            && m.call_id() == Some(self.call_id.as_str())
            && m.cseq()
                .is_some_and(|(n, meth)| n == self.cseq && meth == self.cseq_method)
            && m.via_branch().as_deref() == Some(self.branch.as_str())
    }
}

/// Response to a received request (copies Via/From/To/Call-ID/CSeq).
pub fn make_response(
    req: &SipMsg,
    code: u16,
    reason: &str,
    to_tag: &str,
    extra: &str,
    body: &str,
) -> Vec<u8> {
    let mut s = format!("SIP/2.0 {code} {reason}\r\n");
    for v in req.headers_all("via") {
        s.push_str(&format!("Via: {v}\r\n"));
    }
    s.push_str(&format!("From: {}\r\n", req.header("from").unwrap_or("")));
    let to = req.header("to").unwrap_or("");
    if param(to, "tag").is_none() && code > 100 {
        s.push_str(&format!("To: {to};tag={to_tag}\r\n"));
    } else {
        s.push_str(&format!("To: {to}\r\n"));
    }
    s.push_str(&format!(
        "Call-ID: {}\r\nCSeq: {}\r\n",
        req.call_id().unwrap_or(""),
        req.header("cseq").unwrap_or("")
    ));
    s.push_str(extra);
    if !body.is_empty() {
        s.push_str("Content-Type: application/sdp\r\n");
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.into_bytes()
}

// ---------------------------------------------------------------------------
// UDP user agent
// ---------------------------------------------------------------------------

pub struct Outcome {
    pub provisional: Vec<SipMsg>,
    pub fin: SipMsg,
}

pub struct UdpUa {
    pub sock: UdpSocket,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    stash: VecDeque<SipMsg>,
}

impl UdpUa {
    pub fn new(remote: SocketAddr) -> UdpUa {
        UdpUa::from_ip(remote, "127.0.0.1")
    }
    /// A UA sending from `ip` (on Linux every 127.0.0.0/8 address is a
    /// loopback source without setup: 127.0.0.2 is "another host").
    pub fn from_ip(remote: SocketAddr, ip: &str) -> UdpUa {
        let sock = UdpSocket::bind(format!("{ip}:0")).expect("bind a loopback source");
        let local = sock.local_addr().unwrap();
        UdpUa {
            sock,
            local,
            remote,
            stash: VecDeque::new(),
        }
    }
    pub fn send_raw(&self, b: &[u8]) {
        self.sock.send_to(b, self.remote).expect("udp send");
    }
    pub fn send(&self, r: &Req) {
        self.send_raw(&r.render(self.local));
    }
    fn recv_one(&self, timeout: Duration) -> Option<SipMsg> {
        let mut buf = vec![0u8; 70000];
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        match self.sock.recv_from(&mut buf) {
            Ok((n, _)) => SipMsg::parse(&buf[..n]).or_else(|| {
                Some(SipMsg {
                    raw: buf[..n].to_vec(),
                    start: String::new(),
                    headers: vec![],
                    body: vec![],
                })
            }),
            Err(_) => None,
        }
    }
    /// Next message satisfying `pred` within `timeout`; others are stashed.
    pub fn recv_where(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&SipMsg) -> bool,
    ) -> Option<SipMsg> {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i);
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let m = self.recv_one(left)?;
            if pred(&m) {
                return Some(m);
            }
            self.stash.push_back(m);
        }
    }
    pub fn recv_any(&mut self, timeout: Duration) -> Option<SipMsg> {
        self.recv_where(timeout, |_| true)
    }
    /// Client transaction: send (retransmitting per T1=500 ms doubling up to
    /// 4 s until a provisional/final arrives), return provisionals and the
    /// final. Non-2xx finals to INVITE are ACKed here.
    pub fn transact(&mut self, req: &Req, timeout: Duration) -> Option<Outcome> {
        let bytes = req.render(self.local);
        self.send_raw(&bytes);
        let end = Instant::now() + timeout;
        let mut rto = Duration::from_millis(500);
        let mut next_rt = Instant::now() + rto;
        let mut got_any = false;
        let mut provisional = vec![];
        loop {
            let now = Instant::now();
            if now >= end {
                return None;
            }
            let wait = if got_any {
                end - now
            } else {
                next_rt.saturating_duration_since(now).min(end - now)
            };
            match self.recv_where(wait, |m| req.matches(m)) {
                Some(m) => {
                    got_any = true;
                    if m.code().is_some_and(|c| c < 200) {
                        provisional.push(m);
                        continue;
                    }
                    if req.method == "INVITE" && m.code().is_some_and(|c| c >= 300) {
                        self.send(&req.ack_non2xx(&m));
                    }
                    return Some(Outcome {
                        provisional,
                        fin: m,
                    });
                }
                None => {
                    if !got_any && Instant::now() >= next_rt {
                        self.send_raw(&bytes);
                        rto = (rto * 2).min(Duration::from_secs(4));
                        next_rt = Instant::now() + rto;
                    }
                }
            }
        }
    }
    /// Final response to `req` (panics with a clear message on timeout).
    pub fn call(&mut self, req: &Req) -> SipMsg {
        match self.transact(req, Duration::from_secs(10)) {
            Some(o) => o.fin,
            None => panic!(
                "no final response within 10 s to:\n{}",
                String::from_utf8_lossy(&req.render(self.local))
            ),
        }
    }
    /// OPTIONS to the edge; Some(code) of the final response.
    pub fn options_code(&mut self, timeout: Duration) -> Option<u16> {
        let r = Req::options(self.remote);
        self.transact(&r, timeout).and_then(|o| o.fin.code())
    }
    /// ACK a 2xx and BYE the dialog; returns the BYE's final code.
    pub fn ack_and_bye(&mut self, invite: &Req, ok: &SipMsg) -> Option<u16> {
        self.send(&invite.in_dialog(ok, "ACK", invite.cseq));
        let bye = invite.in_dialog(ok, "BYE", invite.cseq + 1);
        self.transact(&bye, Duration::from_secs(10))
            .and_then(|o| o.fin.code())
    }
}

// ---------------------------------------------------------------------------
// TCP user agent
// ---------------------------------------------------------------------------

pub enum TcpRead {
    Msg(SipMsg),
    Timeout,
    Closed,
}

pub struct TcpUa {
    pub stream: TcpStream,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    buf: Vec<u8>,
    closed: bool,
}

impl TcpUa {
    pub fn connect(remote: SocketAddr) -> TcpUa {
        let stream = TcpStream::connect_timeout(&remote, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("tcp connect {remote}: {e}"));
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap();
        TcpUa {
            stream,
            local,
            remote,
            buf: vec![],
            closed: false,
        }
    }
    /// Write; returns false if the peer has closed.
    pub fn send_raw(&mut self, b: &[u8]) -> bool {
        self.stream.write_all(b).is_ok()
    }
    pub fn send(&mut self, r: &Req) -> bool {
        let b = r.render(self.local);
        self.send_raw(&b)
    }
    fn take_frame(&mut self) -> Option<SipMsg> {
        // RFC 3261 7.5: CRLFs before a start line are ignored (also keep-alive pongs)
        let skip = self
            .buf
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        self.buf.drain(..skip);
        let he = find(&self.buf, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&self.buf[..he]).to_string();
        let mut cl = 0usize;
        for l in head.split("\r\n").skip(1) {
            if let Some((n, v)) = l.split_once(':') {
                if expand_compact(n) == "content-length" {
                    cl = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let total = he + 4 + cl;
        if self.buf.len() < total {
            return None;
        }
        let raw: Vec<u8> = self.buf.drain(..total).collect();
        SipMsg::parse(&raw)
    }
    pub fn read_msg(&mut self, timeout: Duration) -> TcpRead {
        let end = Instant::now() + timeout;
        loop {
            if let Some(m) = self.take_frame() {
                return TcpRead::Msg(m);
            }
            if self.closed {
                return TcpRead::Closed;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return TcpRead::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return TcpRead::Timeout
                }
                Err(_) => self.closed = true,
            }
        }
    }
    /// Send and wait for the final response (no retransmission on TCP); ACKs non-2xx INVITE finals.
    pub fn transact(&mut self, req: &Req, timeout: Duration) -> Option<Outcome> {
        if !self.send(req) {
            return None;
        }
        let end = Instant::now() + timeout;
        let mut provisional = vec![];
        loop {
            match self.read_msg(end.saturating_duration_since(Instant::now())) {
                TcpRead::Msg(m) if req.matches(&m) => {
                    if m.code().is_some_and(|c| c < 200) {
                        provisional.push(m);
                        continue;
                    }
                    if req.method == "INVITE" && m.code().is_some_and(|c| c >= 300) {
                        let ack = req.ack_non2xx(&m);
                        self.send(&ack);
                    }
                    return Some(Outcome {
                        provisional,
                        fin: m,
                    });
                }
                TcpRead::Msg(_) => continue,
                _ => return None,
            }
        }
    }
    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------
// A scriptable destination (leg B) over UDP
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UasMode {
    /// INVITE -> 486 Busy Here (proves a call got past authentication).
    Busy,
    /// INVITE -> 180, 200 (SDP); BYE -> 200.
    Answer,
    /// INVITE -> 180 and nothing more; CANCEL -> 200 + 487.
    Ring,
}

/// A destination UAS on 127.0.0.1:<ephemeral> that records every request.
pub struct MiniUas {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<SipMsg>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl MiniUas {
    pub fn start(mode: UasMode) -> MiniUas {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rx, st) = (received.clone(), stop.clone());
        let handle = thread::spawn(move || {
            let mut invites: HashMap<String, SipMsg> = HashMap::new();
            let mut buf = vec![0u8; 70000];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, src)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some(m) = SipMsg::parse(&buf[..n]) else {
                    continue;
                };
                if m.is_response() {
                    rx.lock().unwrap().push(m);
                    continue;
                }
                rx.lock().unwrap().push(m.clone());
                let tag = format!(
                    "uas{}",
                    m.call_id()
                        .map(|c| hex(&sha256(c.as_bytes()))[..8].to_string())
                        .unwrap_or_default()
                );
                let contact = format!("Contact: <sip:uas@{addr}>\r\n");
                let method = m.method().unwrap_or("").to_string();
                let send = |b: Vec<u8>| {
                    let _ = sock.send_to(&b, src);
                };
                match method.as_str() {
                    "INVITE" => match mode {
                        UasMode::Busy => send(make_response(&m, 486, "Busy Here", &tag, "", "")),
                        UasMode::Answer => {
                            send(make_response(&m, 180, "Ringing", &tag, &contact, ""));
                            let sdp = format!("v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n", addr.port() + 2);
                            send(make_response(&m, 200, "OK", &tag, &contact, &sdp));
                        }
                        UasMode::Ring => {
                            send(make_response(&m, 180, "Ringing", &tag, &contact, ""));
                            invites.insert(m.call_id().unwrap_or("").to_string(), m.clone());
                        }
                    },
                    "ACK" => {}
                    "CANCEL" => {
                        send(make_response(&m, 200, "OK", &tag, "", ""));
                        if let Some(inv) = invites.remove(m.call_id().unwrap_or("")) {
                            send(make_response(&inv, 487, "Request Terminated", &tag, "", ""));
                        }
                    }
                    _ => send(make_response(&m, 200, "OK", &tag, "", "")),
                }
            }
        });
        MiniUas {
            addr,
            received,
            stop,
            handle: Some(handle),
        }
    }
    pub fn route(&self) -> String {
        format!("sip:service@{}", self.addr)
    }
    pub fn requests(&self, method: &str) -> Vec<SipMsg> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.method() == Some(method))
            .cloned()
            .collect()
    }
    pub fn count(&self, method: &str) -> usize {
        self.requests(method).len()
    }
    /// Wait until at least `n` requests of `method` arrived.
    pub fn wait_for(&self, method: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.count(method) >= n {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.count(method) >= n
    }
}

impl Drop for MiniUas {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Response assertions
// ---------------------------------------------------------------------------

pub fn www_auth(resp: &SipMsg) -> Vec<(String, HashMap<String, String>)> {
    resp.headers_all("www-authenticate")
        .iter()
        .map(|v| parse_challenge(v))
        .collect()
}

/// 401 with `WWW-Authenticate: Bearer realm="tollgate", error="invalid_token"`.
pub fn is_invalid_token(resp: &SipMsg) -> bool {
    resp.code() == Some(401)
        && www_auth(resp).iter().any(|(s, p)| {
            s.eq_ignore_ascii_case("Bearer")
                && p.get("realm").map(|r| r.as_str()) == Some(REALM)
                && p.get("error").map(|r| r.as_str()) == Some("invalid_token")
        })
}

pub fn assert_invalid_token(resp: &SipMsg, case: &str) {
    assert!(
        is_invalid_token(resp),
        "[{case}] expected 401 with WWW-Authenticate: Bearer realm=\"{REALM}\", error=\"invalid_token\"; got:\n{}",
        resp.text()
    );
}

/// The default no-credential challenge (SPEC §4): 401 with Digest
/// challenges only (realm and nonce), no Bearer or other scheme.
pub fn assert_digest_challenges(resp: &SipMsg) {
    let ch = www_auth(resp);
    let all_digest = ch.iter().all(|(s, p)| {
        s.eq_ignore_ascii_case("Digest")
            && p.get("realm").map(String::as_str) == Some(REALM)
            && p.get("nonce").is_some_and(|n| !n.is_empty())
    });
    assert!(
        resp.code() == Some(401) && !ch.is_empty() && all_digest,
        "expected 401 with only Digest realm=\"{REALM}\" nonce=... challenges, got:\n{}",
        resp.text()
    );
}

/// The no-credential challenge with `[sip] bearer_challenge = true`: 401
/// with a Bearer challenge (no error) and at least one Digest challenge,
/// same realm.
pub fn assert_both_challenges(resp: &SipMsg) {
    let ch = www_auth(resp);
    let bearer = ch.iter().any(|(s, p)| {
        s.eq_ignore_ascii_case("Bearer")
            && p.get("realm").map(String::as_str) == Some(REALM)
            && !p.contains_key("error")
    });
    let digest = ch.iter().any(|(s, p)| {
        s.eq_ignore_ascii_case("Digest")
            && p.get("realm").map(String::as_str) == Some(REALM)
            && p.get("nonce").is_some_and(|n| !n.is_empty())
    });
    assert!(
        resp.code() == Some(401) && ch.len() >= 2 && bearer && digest,
        "expected 401 with >=2 WWW-Authenticate (Bearer realm=\"{REALM}\" and Digest realm=\"{REALM}\" nonce=...), got:\n{}",
        resp.text()
    );
}

// ---------------------------------------------------------------------------
// Crypto (independent of the product)
// ---------------------------------------------------------------------------

pub fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub fn md5(data: &[u8]) -> [u8; 16] {
    use md5::Digest as _;
    md5::Md5::digest(data).into()
}

pub fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Lenient base64url: padding optional, the standard alphabet's `+` and `/`
/// accepted too, non-zero trailing bits ignored (as the product's peers may
/// send them).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let s: String = s
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    LENIENT.decode(s).ok()
}

/// HMAC-SHA256(key = full API key, msg = "tollgate-sip-token-v1").
pub fn token_signing_key(api_key: &str) -> [u8; 32] {
    hmac_sha256(api_key.as_bytes(), b"tollgate-sip-token-v1")
}

/// Lowercase hex HMAC-SHA256(key = full API key, msg = "tollgate-sip-digest-v1").
pub fn digest_password(api_key: &str) -> String {
    hex(&hmac_sha256(api_key.as_bytes(), b"tollgate-sip-digest-v1"))
}

/// Compact JWS with the given raw header and payload JSON, HS256 over `key`.
pub fn jwt_sign_raw(header_json: &str, payload_json: &str, key: &[u8]) -> String {
    let si = format!(
        "{}.{}",
        b64url(header_json.as_bytes()),
        b64url(payload_json.as_bytes())
    );
    let sig = hmac_sha256(key, si.as_bytes());
    format!("{si}.{}", b64url(&sig))
}

/// A spec token signed with `api_key`'s signing key, `kid` = its id.
pub fn jwt_for(api_key: &str, payload_json: &str) -> String {
    let header = format!(
        "{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"{}\"}}",
        key_id(api_key)
    );
    jwt_sign_raw(&header, payload_json, &token_signing_key(api_key))
}

/// Standard claims: iat/exp as given, fresh jti, to/from.
pub fn claims(iat: i64, exp: i64, to: &str, from: &str) -> String {
    format!(
        "{{\"iat\":{iat},\"exp\":{exp},\"jti\":\"{}\",\"to\":\"{to}\",\"from\":\"{from}\"}}",
        unique("jti-")
    )
}

/// Decode the (header, payload) JSON of a compact JWT.
pub fn jwt_parts(token: &str) -> (Json, Json, Vec<u8>) {
    let p: Vec<&str> = token.split('.').collect();
    assert_eq!(p.len(), 3, "not a compact JWS: {token}");
    let h = String::from_utf8(b64url_decode(p[0]).expect("header b64url")).expect("header utf8");
    let c = String::from_utf8(b64url_decode(p[1]).expect("payload b64url")).expect("payload utf8");
    (
        Json::parse(&h).expect("header JSON"),
        Json::parse(&c).expect("payload JSON"),
        b64url_decode(p[2]).expect("sig b64url"),
    )
}

/// RFC 2617/8760 digest response with qop=auth.
pub fn digest_response(
    alg: &str,
    user: &str,
    realm: &str,
    pass: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    nc: &str,
    cnonce: &str,
) -> String {
    let h = |s: String| -> String {
        if alg.eq_ignore_ascii_case("SHA-256") {
            hex(&sha256(s.as_bytes()))
        } else {
            hex(&md5(s.as_bytes()))
        }
    };
    let ha1 = h(format!("{user}:{realm}:{pass}"));
    let ha2 = h(format!("{method}:{uri}"));
    h(format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
}

/// `Authorization: Digest ...` value answering `challenge` params.
pub fn digest_authorization(
    ch: &HashMap<String, String>,
    user: &str,
    pass: &str,
    method: &str,
    uri: &str,
    nc: &str,
    cnonce: &str,
) -> String {
    let alg = ch.get("algorithm").cloned().unwrap_or_else(|| "MD5".into());
    let realm = ch.get("realm").cloned().unwrap_or_default();
    let nonce = ch.get("nonce").cloned().unwrap_or_default();
    let resp = digest_response(&alg, user, &realm, pass, method, uri, &nonce, nc, cnonce);
    let mut v = format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", algorithm={alg}, qop=auth, nc={nc}, cnonce=\"{cnonce}\""
    );
    if let Some(o) = ch.get("opaque") {
        v.push_str(&format!(", opaque=\"{o}\""));
    }
    v
}

// ---------------------------------------------------------------------------
// JSON: serde_json's Value, with the accessors the tests use
// ---------------------------------------------------------------------------

/// A JSON value (`serde_json::Value`: match on `Json::Bool`, `Json::String`,
/// ...; `get(k)` is Value's own). [`JsonExt`] adds `Json::parse`, `str` and
/// `int`.
pub type Json = serde_json::Value;

/// What the tests ask of a [`Json`] beyond `serde_json::Value`'s own API.
pub trait JsonExt: Sized {
    /// Parses one JSON text (surrounding whitespace allowed); `None` if it
    /// is not valid JSON.
    fn parse(s: &str) -> Option<Self>;
    /// The string member `k` of an object.
    fn str(&self, k: &str) -> Option<&str>;
    /// The integral member `k` of an object (`5` or `5.0`).
    fn int(&self, k: &str) -> Option<i64>;
}

impl JsonExt for Json {
    fn parse(s: &str) -> Option<Json> {
        serde_json::from_str(s).ok()
    }
    fn str(&self, k: &str) -> Option<&str> {
        self.get(k)?.as_str()
    }
    fn int(&self, k: &str) -> Option<i64> {
        let v = self.get(k)?;
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "")
}

/// Plain HTTP/1.0 request with no body; `headers` are extra header lines,
/// each ending in CRLF. Returns (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    http_request_with_body(addr, method, path, headers, "")
}

/// [`http_request`] with a request body (`Content-Length` set from it).
pub fn http_request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = vec![];
    s.read_to_end(&mut buf).expect("read http response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

pub fn scrape(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "GET /metrics -> {code}: {body}");
    body
}

/// Parse one Prometheus sample line into (name, labels, value).
pub fn parse_sample(line: &str) -> Option<(String, Vec<(String, String)>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name_labels, value) = if let Some(close) = line.rfind('}') {
        (&line[..=close], line[close + 1..].trim())
    } else {
        let (a, b) = line.split_once(char::is_whitespace)?;
        (a, b.trim())
    };
    let value: f64 = value.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match name_labels.find('{') {
        Some(p) => (
            &name_labels[..p],
            &name_labels[p + 1..name_labels.len() - 1],
        ),
        None => (name_labels, ""),
    };
    let mut l = vec![];
    for part in split_labels(labels) {
        if let Some((k, v)) = part.split_once('=') {
            l.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
        }
    }
    Some((name.to_string(), l, value))
}

fn split_labels(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut inq = false;
    for c in s.chars() {
        match c {
            '"' => {
                inq = !inq;
                cur.push(c)
            }
            ',' if !inq => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Sum of all samples of `name` whose labels include every pair in `want`.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for l in text.lines() {
        if let Some((n, labels, v)) = parse_sample(l) {
            if n == name
                && want
                    .iter()
                    .all(|(k, wv)| labels.iter().any(|(lk, lv)| lk == k && lv == wv))
            {
                found = true;
                sum += v;
            }
        }
    }
    found.then_some(sum)
}

/// Poll `f` every 20 ms until it returns Some or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`;
/// returns (CA path, cert path, key path).
pub fn make_pki(dir: &Path, tag: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("tollgate test CA {tag}"));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).expect("leaf");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("leaf cert");
    let path = |n: &str| dir.join(format!("{tag}-{n}")).display().to_string();
    let (ca_p, cert_p, key_p) = (path("ca.pem"), path("cert.pem"), path("key.pem"));
    std::fs::write(&ca_p, ca_cert.pem()).unwrap();
    std::fs::write(&cert_p, leaf_cert.pem()).unwrap();
    std::fs::write(&key_p, leaf_key.serialize_pem()).unwrap();
    (ca_p, cert_p, key_p)
}
