//! SIPp: [`require_sipp`], the [`Sipp`] builder, [`SippResult`].

use super::*;

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
