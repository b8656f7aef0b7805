//! End-to-end media relay tests (issue 3 acceptance, SPEC §5) against the real
//! `tollgate serve` binary on 127.0.0.1.
//!
//! * `srtp_*`: leg A (this test, plain RTP/AVP) -> edge -> leg B, a destination
//!   that speaks RTP/SAVP (`tests/media_support/srtp_uas.py`, libsrtp through
//!   pylibsrtp, independent of our SRTP code). The destination picks the suite
//!   in its answer; payloads and RTP headers are checked byte for byte in both
//!   directions, for each suite.
//! * `srtp_attacks_*`: bad SRTP tags, replays and packets from strangers are
//!   dropped and counted in /metrics while the call's media keeps flowing.
//! * `load_*`: 5,000 sequential and 500 concurrent calls (SIPp, through the
//!   built-in echo): media ports and every table of the per-call state
//!   census return to 0, and the edge's RSS to its idle level within a
//!   stated margin.
//! * `media_timeout_*`: a silent answered call gets a BYE from the edge after
//!   `[media] timeout_s`; a talking one does not.
//!
//! Needs python3 with pylibsrtp (`crates/media/scripts/install-test-deps.sh`)
//! and SIPp; fails, never skips, when either is missing. `TOLLGATE_PYTHON`
//! picks another interpreter.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Media port ranges, one per test, outside the kernel's ephemeral range
/// (32768+) and the harness's SIPp blocks (7000-9959).
const RANGE_SRTP_80: &str = "10000-10099";
const RANGE_SRTP_32: &str = "10100-10199";
const RANGE_SRTP_GCM: &str = "10200-10299";
const RANGE_ATTACKS: &str = "10300-10399";
const RANGE_TIMEOUT: &str = "10400-10499";
const RANGE_LOAD: &str = "10500-12999";
const RANGE_FDS: &str = "13000-13099";
/// Two pairs: the second call gets the first call's pooled sockets.
const RANGE_POOL: &str = "13100-13103";

const OUR_SSRC: u32 = 0x1234_5678;
/// SSRC the python destination uses for what it sends.
const UAS_SSRC: u32 = 0x0B0B_0B0B;

fn python() -> String {
    std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn support(name: &str) -> std::path::PathBuf {
    manifest_dir()
        .join("tests")
        .join("media_support")
        .join(name)
}

/// Panics (never skips) when python3 or pylibsrtp is missing.
fn require_pylibsrtp() {
    let py = python();
    let out = Command::new(&py)
        .args(["-c", "import pylibsrtp; print(pylibsrtp.__version__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {py:?} ({e}): the media tests need python3 with pylibsrtp; run crates/media/scripts/install-test-deps.sh")
        });
    assert!(
        out.status.success(),
        "{py} cannot import pylibsrtp (the independent SRTP implementation these tests check against); run crates/media/scripts/install-test-deps.sh\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metric(edge: &Edge, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&scrape(edge.metrics_addr()), name, labels).unwrap_or(0.0)
}

fn ports_in_use(edge: &Edge) -> f64 {
    let text = scrape(edge.metrics_addr());
    metric_sum(&text, "tollgate_media_ports_in_use", &[])
        .unwrap_or_else(|| panic!("/metrics has no tollgate_media_ports_in_use gauge:\n{text}"))
}

fn wait_ports_free(edge: &Edge, within: Duration, what: &str) {
    let ok = poll(within, || (ports_in_use(edge) == 0.0).then_some(()));
    assert!(
        ok.is_some(),
        "{what}: tollgate_media_ports_in_use is still {} after {within:?}",
        ports_in_use(edge)
    );
}

/// What the edge holds per call, table by table (SIP core and media relay),
/// from /metrics: the leak check that does not depend on the allocator.
fn census(edge: &Edge) -> Vec<(&'static str, f64)> {
    let text = scrape(edge.metrics_addr());
    let mut v: Vec<(&'static str, f64)> = ["calls", "transactions", "index", "deadlines"]
        .into_iter()
        .map(|t| {
            let n = metric_sum(&text, "tollgate_sip_core_entries", &[("table", t)]);
            (
                t,
                n.unwrap_or_else(|| panic!("no tollgate_sip_core_entries{{table={t}}}:\n{text}")),
            )
        })
        .collect();
    let sessions = metric_sum(&text, "tollgate_media_sessions", &[]);
    v.push((
        "media_sessions",
        sessions.unwrap_or_else(|| panic!("no tollgate_media_sessions:\n{text}")),
    ));
    v
}

/// Every table of the census back to 0 (completed transactions linger
/// 64*T1 first; the deadline is generous for a loaded machine).
fn wait_census_empty(edge: &Edge, what: &str) {
    let within = Duration::from_secs(40);
    let ok = poll(within, || {
        census(edge).iter().all(|(_, n)| *n == 0.0).then_some(())
    });
    assert!(
        ok.is_some(),
        "{what}: the edge still holds per-call state after {within:?}: {:?}",
        census(edge)
    );
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn edge_with(media_toml: &str, route: Option<(String, &str)>) -> Edge {
    let mut cfg = EdgeConfig {
        tcp: false,
        extra_toml: format!("[media]\n{media_toml}\n"),
        ..Default::default()
    };
    if let Some((target, media)) = route {
        cfg.route_target = Some(target);
        cfg.route_media = media.into();
    }
    Edge::start(cfg)
}

fn rtp_packet(pt: u8, marker: bool, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, pt | if marker { 0x80 } else { 0 }];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Deterministic, non-repeating payload bytes.
fn payload(n: usize, salt: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u32;
    while out.len() < n {
        out.extend_from_slice(&sha256(format!("{salt}-{i}").as_bytes()));
        i += 1;
    }
    out.truncate(n);
    out
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn jbool(j: &Json, k: &str) -> Option<bool> {
    match j.get(k)? {
        Json::Bool(b) => Some(*b),
        _ => None,
    }
}

/// `c=` address and `m=audio` port/proto of an SDP body, and its a=crypto lines.
struct SdpInfo {
    addr: SocketAddr,
    proto: String,
    cryptos: Vec<String>,
}

fn sdp_info(body: &str) -> SdpInfo {
    let ip = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("c=IN IP4 "))
        .unwrap_or_else(|| panic!("no c=IN IP4 in SDP:\n{body}"))
        .trim()
        .to_string();
    let m: Vec<&str> = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("m=audio "))
        .unwrap_or_else(|| panic!("no m=audio in SDP:\n{body}"))
        .split_whitespace()
        .collect();
    SdpInfo {
        addr: format!("{ip}:{}", m[0]).parse().expect("c=/m= address"),
        proto: m[1].to_string(),
        cryptos: body
            .lines()
            .filter(|l| l.starts_with("a=crypto:"))
            .map(|l| l.trim().to_string())
            .collect(),
    }
}

fn port_in(range: &str, port: u16) -> bool {
    let (lo, hi) = range.split_once('-').unwrap();
    (lo.parse::<u16>().unwrap()..=hi.parse::<u16>().unwrap()).contains(&port)
}

// ---------------------------------------------------------------------------
// The python RTP/SAVP destination
// ---------------------------------------------------------------------------

struct PyUas {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Json>,
    log: Arc<Mutex<Vec<String>>>,
    pub sip: SocketAddr,
    pub rtp: SocketAddr,
    pub stranger: SocketAddr,
    stderr_path: std::path::PathBuf,
}

impl PyUas {
    fn start(suite: &str, dir: &TestDir) -> PyUas {
        require_pylibsrtp();
        let stderr_path = dir.join(&format!("uas-{suite}.stderr"));
        let mut child = Command::new(python())
            .arg(support("srtp_uas.py"))
            .args(["--suite", suite])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} srtp_uas.py: {e}", python()));
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            thread::spawn(move || {
                for l in BufReader::new(stdout).lines() {
                    let Ok(l) = l else { break };
                    log.lock().unwrap().push(l.clone());
                    if let Some(j) = Json::parse(&l) {
                        let _ = tx.send(j);
                    }
                }
            });
        }
        let mut u = PyUas {
            child,
            stdin,
            events: rx,
            log,
            sip: "0.0.0.0:0".parse().unwrap(),
            rtp: "0.0.0.0:0".parse().unwrap(),
            stranger: "0.0.0.0:0".parse().unwrap(),
            stderr_path,
        };
        let ready = u.next("ready", Duration::from_secs(20));
        u.sip = ready.str("sip").unwrap().parse().unwrap();
        u.rtp = ready.str("rtp").unwrap().parse().unwrap();
        u.stranger = ready.str("stranger").unwrap().parse().unwrap();
        u
    }

    fn dump(&self) -> String {
        let out = self.log.lock().unwrap();
        let tail: Vec<String> = out
            .iter()
            .rev()
            .take(30)
            .rev()
            .map(|l| l.chars().take(400).collect())
            .collect();
        format!(
            "--- destination stdout (last 30) ---\n{}\n--- destination stderr ---\n{}",
            tail.join("\n"),
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// The next event of kind `ev` (others in between are skipped; an
    /// `error` event fails the test at once).
    fn next(&self, ev: &str, timeout: Duration) -> Json {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(j) if j.str("ev") == Some(ev) => return j,
                Ok(j) if j.str("ev") == Some("error") => {
                    panic!("destination reported an error: {j:?}\n{}", self.dump())
                }
                Ok(_) => continue,
                Err(_) => panic!(
                    "destination sent no {ev:?} event within {timeout:?}\n{}",
                    self.dump()
                ),
            }
        }
    }

    /// Events that arrive within `d` (none expected means an empty Vec).
    fn drain(&self, d: Duration) -> Vec<Json> {
        let end = Instant::now() + d;
        let mut v = vec![];
        while let Ok(j) = self
            .events
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            v.push(j);
        }
        v
    }

    fn cmd(&mut self, c: &str) {
        let s = self.stdin.as_mut().expect("destination stdin");
        writeln!(s, "{c}").expect("write to destination stdin");
        s.flush().unwrap();
    }

    fn route(&self) -> String {
        format!("sip:service@{}", self.sip)
    }
}

impl Drop for PyUas {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.dump());
        }
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Leg A: a plain RTP/AVP caller
// ---------------------------------------------------------------------------

struct Caller {
    ua: UdpUa,
    rtp: UdpSocket,
    invite: Req,
    ok: SipMsg,
    /// The edge's leg-A media address (from its answer).
    edge_media: SocketAddr,
    seq: u16,
    ts: u32,
}

impl Caller {
    fn call(edge: &Edge, key: &str, range: &str) -> Caller {
        Caller::call_from(edge, key, range, UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    /// A call whose media comes from (and goes to) `rtp`.
    fn call_from(edge: &Edge, key: &str, range: &str, rtp: UdpSocket) -> Caller {
        let port = rtp.local_addr().unwrap().port();
        let sdp = format!(
            "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n"
        );
        let now = now_unix();
        let token = jwt_for(key, &claims(now, now + 600, SERVICE, "alice"));
        let mut invite = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token);
        invite.body = sdp.into_bytes();
        let mut ua = UdpUa::new(edge.sip_udp);
        let ok = ua.call(&invite);
        assert_eq!(
            ok.code(),
            Some(200),
            "INVITE through the edge: want 200, got\n{}",
            ok.text()
        );
        let body = String::from_utf8_lossy(&ok.body).to_string();
        let a = sdp_info(&body);
        assert_eq!(a.proto, "RTP/AVP", "answer to a plain RTP caller:\n{body}");
        assert!(
            a.cryptos.is_empty(),
            "answer to an RTP/AVP offer carries a=crypto:\n{body}"
        );
        assert_eq!(a.addr.ip().to_string(), "127.0.0.1", "media IP:\n{body}");
        assert!(
            port_in(range, a.addr.port()),
            "answer's media port {} is outside [media] ports = {range}:\n{body}",
            a.addr.port()
        );
        ua.send(&invite.in_dialog(&ok, "ACK", invite.cseq));
        rtp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Caller {
            ua,
            rtp,
            invite,
            ok,
            edge_media: a.addr,
            seq: 4000,
            ts: 900_000,
        }
    }

    fn send(&mut self, pt: u8, marker: bool, payload: &[u8]) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(160);
        let p = rtp_packet(pt, marker, self.seq, self.ts, OUR_SSRC, payload);
        self.rtp.send_to(&p, self.edge_media).unwrap();
        p
    }

    fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        self.rtp.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        self.rtp
            .recv_from(&mut buf)
            .ok()
            .map(|(n, a)| (buf[..n].to_vec(), a))
    }

    fn hang_up(mut self) {
        let bye = self.invite.in_dialog(&self.ok, "BYE", self.invite.cseq + 1);
        let code = self
            .ua
            .transact(&bye, Duration::from_secs(10))
            .map(|o| o.fin.code());
        assert_eq!(code, Some(Some(200)), "BYE through the edge");
    }
}

/// One packet A -> edge -> B (checked by the destination after libsrtp
/// decrypted it) and the destination's reply B -> edge -> A (checked here).
fn round_trip(c: &mut Caller, uas: &PyUas, tag_len: usize, pt: u8, marker: bool, body: &[u8]) {
    let sent = c.send(pt, marker, body);
    let ev = uas.next("rtp", Duration::from_secs(5));
    let (seq, ts) = (c.seq, c.ts);
    assert_eq!(
        unhex(ev.str("payload").unwrap()),
        body,
        "A->B payload after libsrtp decrypted the edge's SRTP (seq {seq}): {ev:?}"
    );
    assert_eq!(ev.int("seq"), Some(seq as i64), "A->B seq: {ev:?}");
    assert_eq!(ev.int("ts"), Some(ts as i64), "A->B timestamp: {ev:?}");
    assert_eq!(ev.int("ssrc"), Some(OUR_SSRC as i64), "A->B SSRC: {ev:?}");
    assert_eq!(ev.int("pt"), Some(pt as i64), "A->B payload type: {ev:?}");
    assert_eq!(ev.int("marker"), Some(marker as i64), "A->B marker: {ev:?}");
    assert_eq!(
        ev.int("plain_len"),
        Some(sent.len() as i64),
        "A->B length after decryption: {ev:?}"
    );
    assert_eq!(
        ev.int("wire_len"),
        Some((sent.len() + tag_len) as i64),
        "A->B SRTP length = RTP + {tag_len}-byte tag: {ev:?}"
    );
    if body.len() >= 4 {
        assert_eq!(
            jbool(&ev, "encrypted"),
            Some(true),
            "A->B payload went out in clear on the SRTP leg: {ev:?}"
        );
    }
    let reply_seq = ev.int("reply_seq").unwrap() as u16;
    let (back, from) = c.recv(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "no B->A packet (reply to seq {seq}) reached the caller within 5 s\n{}",
            uas.dump()
        )
    });
    assert_eq!(
        from, c.edge_media,
        "B->A must come from the edge's leg-A port (symmetric RTP)"
    );
    let want: Vec<u8> = body.iter().map(|b| b ^ 0x5A).collect();
    assert_eq!(
        back.len(),
        12 + want.len(),
        "B->A arrives as plain RTP (no tag left): got {} bytes",
        back.len()
    );
    assert_eq!(back[0], 0x80, "B->A RTP version/flags");
    assert_eq!(
        back[1],
        pt | if marker { 0x80 } else { 0 },
        "B->A PT/marker"
    );
    assert_eq!(
        u16::from_be_bytes([back[2], back[3]]),
        reply_seq,
        "B->A sequence number"
    );
    assert_eq!(
        u32::from_be_bytes([back[8], back[9], back[10], back[11]]),
        UAS_SSRC,
        "B->A SSRC"
    );
    assert_eq!(
        &back[12..],
        &want[..],
        "B->A payload (libsrtp-encrypted by the destination, decrypted by the edge)"
    );
}

/// A mixed media exchange: PCMU frames, RFC 4733 telephone-events, odd sizes.
fn exchange(c: &mut Caller, uas: &PyUas, tag_len: usize, rounds: u32, salt: u32) {
    for i in 0..rounds {
        let p = payload(160, salt * 1000 + i);
        round_trip(c, uas, tag_len, 0, i == 0, &p);
    }
    // DTMF '5', 3 packets of one event, the first with the marker bit
    for (i, end) in [(0u16, false), (1, false), (2, true)] {
        let dur = (160 * (i + 1)).to_be_bytes();
        let ev = [5u8, if end { 0x80 | 10 } else { 10 }, dur[0], dur[1]];
        round_trip(c, uas, tag_len, 101, i == 0, &ev);
    }
    for n in [1usize, 20, 333, 1200] {
        round_trip(c, uas, tag_len, 0, false, &payload(n, salt + n as u32));
    }
}

fn srtp_suite(suite: &str, tag_len: usize, range: &str) {
    let dir = TestDir::new("media-srtp");
    let uas = PyUas::start(suite, &dir);
    let edge = edge_with(&format!("ports = \"{range}\""), Some((uas.route(), "srtp")));
    let key = edge.first_key();
    let mut c = Caller::call(&edge, &key, range);

    // The offer the edge made to the SRTP destination.
    let inv = uas.next("invite", Duration::from_secs(5));
    let offer = inv.str("offer").unwrap().to_string();
    let o = sdp_info(&offer);
    assert_eq!(o.proto, "RTP/SAVP", "offer toward the srtp route:\n{offer}");
    assert!(
        port_in(range, o.addr.port()),
        "offer's media port outside {range}:\n{offer}"
    );
    assert_ne!(
        o.addr, c.edge_media,
        "legs A and B must have their own ports"
    );
    for s in [
        "AES_CM_128_HMAC_SHA1_80",
        "AES_CM_128_HMAC_SHA1_32",
        "AEAD_AES_128_GCM",
    ] {
        assert!(
            o.cryptos
                .iter()
                .any(|l| l.contains(&format!(" {s} inline:"))),
            "offer lacks an a=crypto for {s}:\n{offer}"
        );
    }
    let keys: std::collections::HashSet<&str> = o
        .cryptos
        .iter()
        .map(|l| l.split("inline:").nth(1).unwrap())
        .collect();
    assert_eq!(keys.len(), o.cryptos.len(), "every suite needs its own key");
    assert!(
        !offer.contains(&c.rtp.local_addr().unwrap().port().to_string()),
        "leg A's own port leaked into the offer to B:\n{offer}"
    );

    // Leg A plain, leg B SRTP: A->B is encrypted, B->A decrypted.
    let counted = |e: &Edge| {
        (
            metric(
                e,
                "tollgate_media_packets_total",
                &[
                    ("direction", "a_to_b"),
                    ("proto", "rtp"),
                    ("transform", "encrypt"),
                ],
            ),
            metric(
                e,
                "tollgate_media_packets_total",
                &[
                    ("direction", "b_to_a"),
                    ("proto", "rtp"),
                    ("transform", "decrypt"),
                ],
            ),
        )
    };
    let before = counted(&edge);
    exchange(&mut c, &uas, tag_len, 40, 1);
    let n = 40.0 + 3.0 + 4.0;
    let after = counted(&edge);
    assert_eq!(
        after.0 - before.0,
        n,
        "a_to_b rtp packets counted as encrypted"
    );
    assert_eq!(
        after.1 - before.1,
        n,
        "b_to_a rtp packets counted as decrypted"
    );
    assert_eq!(
        metric(&edge, "tollgate_srtp_auth_failures_total", &[]),
        0.0,
        "no auth failures on a clean call"
    );
    assert!(ports_in_use(&edge) >= 4.0, "a running call holds its ports");

    c.hang_up();
    uas.next("bye", Duration::from_secs(10));
    wait_ports_free(&edge, Duration::from_secs(10), "after BYE");
}

// ---------------------------------------------------------------------------
// a. RTP/AVP -> edge -> RTP/SAVP, per suite
// ---------------------------------------------------------------------------

#[test]
fn srtp_aes_cm_128_hmac_sha1_80_both_directions_byte_identical() {
    srtp_suite("AES_CM_128_HMAC_SHA1_80", 10, RANGE_SRTP_80);
}

#[test]
fn srtp_aes_cm_128_hmac_sha1_32_both_directions_byte_identical() {
    srtp_suite("AES_CM_128_HMAC_SHA1_32", 4, RANGE_SRTP_32);
}

#[test]
fn srtp_aead_aes_128_gcm_both_directions_byte_identical() {
    srtp_suite("AEAD_AES_128_GCM", 16, RANGE_SRTP_GCM);
}

// ---------------------------------------------------------------------------
// b. bad tags, replays, strangers
// ---------------------------------------------------------------------------

/// Nothing reaches the caller within `d` (drops must not be relayed).
fn assert_caller_gets_nothing(c: &Caller, d: Duration, what: &str) {
    if let Some((p, from)) = c.recv(d) {
        panic!(
            "{what}: the caller received a {}-byte packet from {from} that should have been dropped: {:02x?}",
            p.len(),
            &p[..p.len().min(40)]
        );
    }
}

#[test]
fn srtp_attacks_bad_tag_replay_stranger_are_dropped_counted_and_media_flows() {
    const TAG: usize = 10;
    let dir = TestDir::new("media-attacks");
    let mut uas = PyUas::start("AES_CM_128_HMAC_SHA1_80", &dir);
    let edge = edge_with(
        &format!("ports = \"{RANGE_ATTACKS}\""),
        Some((uas.route(), "srtp")),
    );
    let key = edge.first_key();
    let mut c = Caller::call(&edge, &key, RANGE_ATTACKS);
    let inv = uas.next("invite", Duration::from_secs(5));
    let leg_b = sdp_info(inv.str("offer").unwrap()).addr;

    let auth = |e: &Edge| metric(e, "tollgate_srtp_auth_failures_total", &[]);
    let dropped = |e: &Edge, r: &str| metric(e, "tollgate_media_dropped_total", &[("reason", r)]);
    let b_to_a = |e: &Edge| {
        metric(
            e,
            "tollgate_media_packets_total",
            &[("direction", "b_to_a"), ("proto", "rtp")],
        )
    };

    // 0. Within the learning window, before B sent anything: a stranger with a
    //    bad tag must be counted and must not steal leg B (A's media still
    //    reaches the destination's SDP address). Leg B's SDP names its
    //    signaling host, so it learns nothing (SPEC §5): the stranger is
    //    dropped before authentication.
    let (a0, s0) = (auth(&edge), dropped(&edge, "source"));
    for _ in 0..3 {
        uas.cmd("stranger_badtag");
        uas.next("sent", Duration::from_secs(5));
    }
    let ok = poll(Duration::from_secs(5), || {
        (dropped(&edge, "source") - s0 >= 3.0).then_some(())
    });
    assert!(
        ok.is_some(),
        "3 bad-tag packets from a stranger in the learning window: dropped{{reason=\"source\"}} went {s0} -> {}",
        dropped(&edge, "source")
    );
    assert_eq!(
        auth(&edge),
        a0,
        "strangers are dropped before authentication"
    );
    assert_caller_gets_nothing(&c, Duration::from_millis(300), "stranger with bad tag");

    // Normal media latches both legs.
    exchange(&mut c, &uas, TAG, 10, 2);

    // 1. Bad tag from the destination's own address.
    let (a1, relayed1) = (auth(&edge), b_to_a(&edge));
    for _ in 0..5 {
        uas.cmd("badtag");
        uas.next("sent", Duration::from_secs(5));
    }
    let ok = poll(Duration::from_secs(5), || {
        (auth(&edge) - a1 >= 5.0).then_some(())
    });
    assert!(
        ok.is_some(),
        "5 bad-tag packets: tollgate_srtp_auth_failures_total went {a1} -> {}",
        auth(&edge)
    );
    assert_eq!(auth(&edge) - a1, 5.0, "exactly the 5 bad tags count");
    assert_caller_gets_nothing(&c, Duration::from_millis(300), "bad SRTP tag");
    assert_eq!(
        b_to_a(&edge),
        relayed1,
        "bad-tag packets must not count as relayed"
    );

    // 2. Replays of a packet the edge already accepted.
    let r2 = dropped(&edge, "replay");
    for _ in 0..4 {
        uas.cmd("replay");
        uas.next("sent", Duration::from_secs(5));
    }
    let ok = poll(Duration::from_secs(5), || {
        (dropped(&edge, "replay") - r2 >= 4.0).then_some(())
    });
    assert!(
        ok.is_some(),
        "4 replayed SRTP packets: tollgate_media_dropped_total{{reason=\"replay\"}} went {r2} -> {}",
        dropped(&edge, "replay")
    );
    assert_caller_gets_nothing(&c, Duration::from_millis(300), "replayed SRTP");
    assert_eq!(b_to_a(&edge), relayed1, "replays must not count as relayed");

    // 3. Properly protected SRTP, but from another address, after B latched.
    let s3 = dropped(&edge, "source");
    let a3 = auth(&edge);
    for _ in 0..3 {
        uas.cmd("stranger");
        uas.next("sent", Duration::from_secs(5));
    }
    let ok = poll(Duration::from_secs(5), || {
        (dropped(&edge, "source") - s3 >= 3.0).then_some(())
    });
    assert!(
        ok.is_some(),
        "3 valid SRTP packets from a stranger on leg B: dropped{{reason=\"source\"}} went {s3} -> {}",
        dropped(&edge, "source")
    );
    assert_caller_gets_nothing(&c, Duration::from_millis(300), "SRTP from a stranger");
    assert_eq!(
        auth(&edge),
        a3,
        "strangers are dropped before authentication"
    );

    // 4. Plain RTP from a stranger to leg A's port, after A latched.
    let s4 = dropped(&edge, "source");
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..3u16 {
        let p = rtp_packet(0, false, 60000 + i, 7, 0xBAD0_BAD0, &payload(160, 777));
        stranger.send_to(&p, c.edge_media).unwrap();
    }
    let ok = poll(Duration::from_secs(5), || {
        (dropped(&edge, "source") - s4 >= 3.0).then_some(())
    });
    assert!(
        ok.is_some(),
        "3 RTP packets from a stranger on leg A: dropped{{reason=\"source\"}} went {s4} -> {}",
        dropped(&edge, "source")
    );
    let leaked: Vec<Json> = uas
        .drain(Duration::from_millis(300))
        .into_iter()
        .filter(|e| e.str("ev") == Some("rtp") || e.str("ev") == Some("srtp_error"))
        .collect();
    assert!(
        leaked.is_empty(),
        "the destination received the stranger's RTP: {leaked:?}"
    );
    // and a stranger writing to leg B's port in clear gets nowhere either
    let s5 = dropped(&edge, "source");
    stranger
        .send_to(&rtp_packet(0, false, 1, 1, 1, &[0xd5; 160]), leg_b)
        .unwrap();
    let ok = poll(Duration::from_secs(5), || {
        (dropped(&edge, "source") > s5).then_some(())
    });
    assert!(
        ok.is_some(),
        "clear RTP from a stranger to leg B must be dropped as source"
    );
    assert_caller_gets_nothing(&c, Duration::from_millis(300), "clear RTP to leg B");

    // 5. The call's media still flows both ways, byte for byte.
    exchange(&mut c, &uas, TAG, 10, 3);

    c.hang_up();
    uas.next("bye", Duration::from_secs(10));
    wait_ports_free(&edge, Duration::from_secs(10), "after BYE");
}

// ---------------------------------------------------------------------------
// d. media timeout
// ---------------------------------------------------------------------------

/// Waits for the edge's BYE on the caller's SIP socket, answers 200, returns
/// when it came.
fn await_bye(c: &mut Caller, within: Duration) -> Option<Instant> {
    let bye = c.ua.recv_where(within, |m| m.method() == Some("BYE"))?;
    let at = Instant::now();
    let resp = make_response(&bye, 200, "OK", "", "", "");
    c.ua.send_raw(&resp);
    Some(at)
}

#[test]
fn media_timeout_hangs_up_a_silent_call_but_not_a_talking_one() {
    let edge = edge_with(&format!("ports = \"{RANGE_TIMEOUT}\"\ntimeout_s = 5"), None);
    let key = edge.first_key();

    // A talking call (RTP every 20 ms through the echo) on its own thread.
    let talker = {
        let mut c = Caller::call(&edge, &key, RANGE_TIMEOUT);
        thread::spawn(move || {
            let t0 = Instant::now();
            let mut echoed = 0;
            while t0.elapsed() < Duration::from_secs(8) {
                c.send(0, false, &[0xd5; 160]);
                if c.recv(Duration::from_millis(200)).is_some() {
                    echoed += 1;
                }
                // no BYE while media flows
                if let Some(m) =
                    c.ua.recv_where(Duration::from_millis(15), |m| m.method() == Some("BYE"))
                {
                    return Err(format!(
                        "the edge hung up a call with live media after {:?}:\n{}",
                        t0.elapsed(),
                        m.text()
                    ));
                }
            }
            let stopped = Instant::now();
            let bye = await_bye(&mut c, Duration::from_secs(15))
                .ok_or("no BYE within 15 s after the talking call went silent")?;
            Ok((echoed, bye - stopped))
        })
    };

    let mut c = Caller::call(&edge, &key, RANGE_TIMEOUT);
    let answered = Instant::now();
    let bye = await_bye(&mut c, Duration::from_secs(15));
    let after = bye.map(|b| b - answered);
    assert!(
        after.is_some_and(|d| d >= Duration::from_millis(4500) && d <= Duration::from_secs(10)),
        "silent call with timeout_s = 5: want a BYE from the edge 5-10 s after answer, got {after:?}"
    );

    let r = talker.join().expect("talker thread");
    let (echoed, silent_for) = r.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        echoed > 100,
        "talking call: only {echoed} packets echoed in 8 s"
    );
    assert!(
        silent_for >= Duration::from_millis(4500) && silent_for <= Duration::from_secs(10),
        "talking call: BYE {silent_for:?} after its media stopped, want 5-10 s"
    );
    wait_ports_free(&edge, Duration::from_secs(10), "after both media timeouts");
}

// ---------------------------------------------------------------------------
// c. load: 5,000 sequential + 500 concurrent calls
// ---------------------------------------------------------------------------

fn sipp_calls(
    edge: &Edge,
    key: &str,
    name: &str,
    n: u32,
    extra: &[&str],
    pause_ms: u32,
) -> SippResult {
    let now = now_unix();
    let tokens: Vec<String> = (0..n)
        .map(|_| jwt_for(key, &claims(now, now + 900, SERVICE, "sipp")))
        .collect();
    let inf = edge.dir.join(&format!("{name}_tokens.csv"));
    write_inf(&inf, &tokens);
    let mut s = Sipp::new(&edge.dir.path, name, "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&inf)
        .calls(n)
        .pause_ms(pause_ms)
        .args(&[
            "-recv_timeout",
            "10s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(120));
    for a in extra {
        s = s.arg(*a);
    }
    s.run()
}

/// 500 calls created within ~1.7 s and held 4 s each, so all overlap;
/// returns SIPp's result and the peaks of ports in use and RSS meanwhile
/// (and checks that the census sees the calls).
fn concurrent_500(edge: &Edge, key: &str, name: &str) -> (SippResult, f64, u64) {
    let now = now_unix();
    let tokens: Vec<String> = (0..500)
        .map(|_| jwt_for(key, &claims(now, now + 900, SERVICE, "sipp")))
        .collect();
    let inf = edge.dir.join(&format!("{name}_tokens.csv"));
    write_inf(&inf, &tokens);
    let p = Sipp::new(&edge.dir.path, name, "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&inf)
        .calls(500)
        .rate(300)
        .pause_ms(4000)
        .args(&[
            "-l",
            "500",
            "-recv_timeout",
            "10s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(90))
        .spawn();
    let t = Instant::now();
    let (mut peak_ports, mut peak_rss, mut peak) = (0.0f64, 0u64, Vec::new());
    while t.elapsed() < Duration::from_millis(4500) {
        peak_ports = peak_ports.max(ports_in_use(edge));
        peak_rss = peak_rss.max(rss_kib(edge.pid()));
        let now = census(edge);
        if now[0].1 > peak.first().map_or(0.0, |(_, n): &(&str, f64)| *n) {
            peak = now;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let r = p.wait_at_most(Duration::from_secs(60));
    eprintln!("[load] {name}: census at the peak {peak:?}");
    let get = |t: &str| peak.iter().find(|(k, _)| *k == t).map_or(0.0, |(_, n)| *n);
    assert!(
        get("calls") >= 490.0 && get("media_sessions") >= 490.0 && get("index") >= 490.0,
        "{name}: the census did not see the 500 calls: {peak:?}"
    );
    (r, peak_ports, peak_rss)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Wait before an idle RSS reading in the load test: 64*T1 (6.4 s) of
/// transaction linger plus room for late timers.
const IDLE_WAIT: Duration = Duration::from_secs(10);

#[test]
fn load_5000_sequential_and_500_concurrent_calls_free_ports_and_memory() {
    require_sipp();
    let t_start = Instant::now();
    // t1_ms = 100: completed SIP transactions linger 64*T1 = 6.4 s, not 32 s,
    // so "after the calls" is reached quickly. Every idle reading waits
    // IDLE_WAIT, well past that linger (timers fire late on a loaded 2-core
    // machine): a reading taken while the last calls' transactions are still
    // held measures the linger, not a leak.
    let mut cfg = EdgeConfig {
        tcp: false,
        t1_ms: Some(100),
        extra_toml: format!("[media]\nports = \"{RANGE_LOAD}\"\n"),
        ..Default::default()
    };
    cfg.route_target = None;
    let edge = Edge::start(cfg);
    let key = edge.first_key();
    let pid = edge.pid();

    // Warm-up: the first calls grow hash tables, the allocator's arenas, the
    // metrics registry and tokio's worker state up to the high-water mark of
    // the load to come (500 concurrent); the baseline is taken after them.
    let r = sipp_calls(&edge, &key, "warm_seq", 300, &["-l", "1", "-r", "5000"], 0);
    r.assert_calls_ok(300);
    let rss_cold = rss_kib(pid);
    let (r, warm_peak_ports, warm_peak_rss) = concurrent_500(&edge, &key, "warm_conc");
    r.assert_calls_ok(500);
    assert_eq!(
        warm_peak_ports, 2000.0,
        "warm-up: 500 concurrent calls hold 4 ports each"
    );
    wait_ports_free(&edge, Duration::from_secs(15), "after warm-up");
    wait_census_empty(&edge, "after warm-up");
    thread::sleep(IDLE_WAIT);
    let rss0 = rss_kib(pid);
    eprintln!(
        "[load] RSS cold {:.1} MiB, peak in warm-up 500 concurrent {:.1} MiB, baseline after warm-up {:.1} MiB ({:?})",
        mib(rss_cold),
        mib(warm_peak_rss),
        mib(rss0),
        t_start.elapsed()
    );

    // 5,000 sequential calls (one at a time: -l 1), in two halves to see a
    // per-call slope separately from one-off growth.
    let mut rss_half = [0u64; 2];
    for (i, half) in ["seq_1", "seq_2"].iter().enumerate() {
        let t = Instant::now();
        let r = sipp_calls(
            &edge,
            &key,
            half,
            2500,
            &["-l", "1", "-r", "5000", "-rp", "1000"],
            0,
        );
        r.assert_calls_ok(2500);
        wait_ports_free(&edge, Duration::from_secs(10), half);
        wait_census_empty(&edge, half);
        // Same state as the baseline: completed transactions (64*T1 = 6.4 s)
        // gone, so the slope compares like with like.
        thread::sleep(IDLE_WAIT);
        rss_half[i] = rss_kib(pid);
        eprintln!(
            "[load] {half}: 2500 sequential calls in {:?}, RSS {:.1} MiB",
            t.elapsed(),
            mib(rss_half[i])
        );
    }

    let (r, peak_ports, peak_rss) = concurrent_500(&edge, &key, "conc");
    r.assert_calls_ok(500);
    eprintln!(
        "[load] 500 concurrent: peak ports in use {peak_ports}, peak RSS {:.1} MiB",
        mib(peak_rss)
    );
    assert_eq!(
        peak_ports, 2000.0,
        "500 concurrent anchored calls hold 4 ports each (RTP+RTCP per leg)"
    );
    wait_ports_free(&edge, Duration::from_secs(15), "after 500 concurrent calls");
    // Completed transactions (64*T1) and dialog leftovers go: every table
    // back to 0 is the exact leak check; RSS below is the coarse one.
    wait_census_empty(&edge, "after all the calls");
    thread::sleep(IDLE_WAIT);
    let rss_end = rss_kib(pid);
    eprintln!(
        "[load] RSS: baseline {:.1}, after 2500 seq {:.1}, after 5000 seq {:.1}, peak in 500 concurrent {:.1}, end {:.1} MiB (total {:?})",
        mib(rss0),
        mib(rss_half[0]),
        mib(rss_half[1]),
        mib(peak_rss),
        mib(rss_end),
        t_start.elapsed()
    );
    assert_eq!(ports_in_use(&edge), 0.0);

    // The exact leak check is the census above: every table of the SIP core
    // and the media relay back to 0 after each phase, and ports to 0. RSS is
    // the coarse one, for what the census cannot see (buffers, caches), and
    // it measures the allocator too: with the same state (census empty, idle
    // for IDLE_WAIT) readings in one run moved 45.1 -> 57.6 -> 53.5 MiB
    // (baseline, after 2,500 and 5,000 sequential calls; CI, 2026-11-27),
    // and 48.0 -> 37.4 -> 41.9 in another. A 4 MiB margin against a single
    // baseline failed on such a dip with no leak (the census was empty, and
    // the second half ended lower than the first). So each check compares
    // with the highest idle reading before it, with RSS_MARGIN of room:
    // * slope: the second 2,500 sequential calls may not add more than RSS_MARGIN
    //   (6.5 KiB per call);
    // * end: after the second half and the 500-call burst (3,000 calls),
    //   not more than RSS_MARGIN above the baseline or the first half (5.5 KiB
    //   per call). Leaking a call's relay (2 KiB receive buffer, the task,
    //   4 sockets) with its dialogs and transactions is more than that, and
    //   would show in the census and the ports first;
    // * peak: the measured burst may not peak more than RSS_MARGIN above the
    //   warm-up's (state of earlier calls is not piling up).
    // What legitimately grows is the bearer replay cache (one jti per call
    // until its exp, ~0.2 KiB each: ~1 MiB for 5,500 calls).
    // 2026-12-04: with libphonenumber's metadata and regexes loaded the idle
    // RSS is ~95 MiB (was ~50), and idle readings over 5 x 2,500 sequential
    // calls went 94.5 (baseline) -> 88.9, 91.1, 97.0, 106.0, 105.8 MiB: a
    // plateau, not a slope, with the census empty after each phase. Two
    // 2-phase runs failed the old 8 MiB margin (+9.6, +11.6 MiB). The margin
    // is 16 MiB (6.5 KiB per call over 2,500 calls): a leaked relay with its
    // dialogs (more than that per call) still fails it, and the census
    // catches any per-call state exactly.
    const RSS_MARGIN: u64 = 16 * 1024;
    let slope = rss_half[1].saturating_sub(rss_half[0].max(rss0));
    assert!(
        slope <= RSS_MARGIN,
        "RSS grew {:.1} MiB over the second 2,500 sequential calls (> {:.0} MiB: a per-call leak)",
        mib(slope),
        mib(RSS_MARGIN)
    );
    let before = rss0.max(rss_half[0]);
    let growth = rss_end.saturating_sub(before);
    assert!(
        growth <= RSS_MARGIN,
        "RSS {:.1} MiB after the calls vs {:.1} MiB idle before them: +{:.1} MiB > {:.0} MiB margin",
        mib(rss_end),
        mib(before),
        mib(growth),
        mib(RSS_MARGIN)
    );
    assert!(
        peak_rss <= warm_peak_rss + RSS_MARGIN,
        "500-call burst peaked at {:.1} MiB RSS vs {:.1} MiB in the warm-up burst (> +{:.0} MiB)",
        mib(peak_rss),
        mib(warm_peak_rss),
        mib(RSS_MARGIN)
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// An edge out of file descriptors (every anchored call holds four UDP
/// sockets) first reuses the sockets that ended calls left bound, then
/// answers a call it cannot anchor with 503 at once, stays up, and admits
/// calls again as soon as sockets are free. Before, each such INVITE retried
/// 64 port pairs (128 failing socket(2) calls, the spiral that collapsed the
/// edge under overload) and got 500.
#[test]
fn out_of_file_descriptors_a_call_gets_503_and_the_edge_recovers() {
    let mut edge = edge_with(&format!("ports = \"{RANGE_FDS}\""), None);
    let key = edge.first_key();
    // A first call opens whatever the edge opens lazily (files, timers) and
    // leaves its two pairs' sockets pooled.
    Caller::call(&edge, &key, RANGE_FDS).hang_up();
    wait_ports_free(&edge, Duration::from_secs(10), "after the warm-up call");
    // Room for one more call's sockets and a few more, not for two.
    let limit = open_fds(edge.pid()) + 5;
    let st = Command::new("prlimit")
        .args([
            "--pid",
            &edge.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success(), "prlimit failed: {st}");

    let first = Caller::call(&edge, &key, RANGE_FDS); // new sockets
    let second = Caller::call(&edge, &key, RANGE_FDS); // the pooled ones
    let mut ua = UdpUa::new(edge.sip_udp);
    let now = now_unix();
    let token = jwt_for(&key, &claims(now, now + 600, SERVICE, "alice"));
    let mut invite = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token);
    invite.body = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n".to_vec();
    let out = ua
        .transact(&invite, Duration::from_secs(10))
        .expect("the edge answers an INVITE it cannot anchor");
    assert_eq!(
        out.fin.code(),
        Some(503),
        "no descriptors for the third call's sockets: want 503, got\n{}",
        out.fin.text()
    );
    assert_eq!(
        ua.options_code(Duration::from_secs(5)),
        Some(200),
        "edge still answers"
    );
    assert!(edge.is_running(), "edge exited when out of descriptors");

    first.hang_up();
    second.hang_up();
    wait_ports_free(&edge, Duration::from_secs(10), "after both calls");
    Caller::call(&edge, &key, RANGE_FDS).hang_up();
}

/// Sockets of an ended call stay bound for a later one (no socket(2) and
/// bind(2) per call): whatever reached them in between, even from the later
/// call's own peer address, is never relayed into it.
#[test]
fn pooled_media_sockets_carry_nothing_of_the_previous_call() {
    let edge = edge_with(&format!("ports = \"{RANGE_POOL}\""), None);
    let key = edge.first_key();
    let mut first = Caller::call(&edge, &key, RANGE_POOL);
    first.send(0, false, &[0x11; 160]);
    assert!(
        first.recv(Duration::from_secs(3)).is_some(),
        "first call's echo"
    );
    let rtp = first.rtp.try_clone().unwrap();
    first.hang_up();
    wait_ports_free(&edge, Duration::from_secs(10), "after the first call");

    // Late packets from the caller's address to both pairs' RTP ports (one
    // of them will be the next call's leg A), while the ports sit idle.
    for (i, port) in [13100u16, 13102].iter().cycle().take(40).enumerate() {
        let p = rtp_packet(
            0,
            false,
            100 + i as u16,
            9_000 + 160 * i as u32,
            OUR_SSRC,
            &[0xEE; 160],
        );
        rtp.send_to(&p, ("127.0.0.1", *port)).unwrap();
    }
    // Past the pool's idle time (with no other free pair it is used anyway).
    thread::sleep(Duration::from_millis(700));

    let mut second = Caller::call_from(&edge, &key, RANGE_POOL, rtp);
    let (mut fresh, mut stale) = (0, 0);
    for _ in 0..25 {
        second.send(0, false, &[0x22; 160]);
        while let Some((pkt, _)) = second.recv(Duration::from_millis(100)) {
            match pkt.get(12) {
                Some(0x22) => fresh += 1,
                Some(0xEE) => stale += 1,
                _ => {}
            }
        }
    }
    assert_eq!(
        stale, 0,
        "packets sent between the calls reached the second call"
    );
    assert!(
        fresh >= 20,
        "second call: only {fresh} of 25 packets echoed"
    );
    second.hang_up();
}
