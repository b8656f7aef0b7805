//! The edge process: temp dirs, the `tollgate` CLI, [`Edge`] (the real
//! binary with a config file), UDP port blocks, a test PKI.

use super::*;

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
