//! Helpers for the trunk allocator end-to-end tests (`e2e_trunk.rs`,
//! `e2e_cdr_durability.rs`), on top of the shared harness in `common`.
//!
//! * metrics: [`metric`], [`wait_metric_eq`] (channels in use and friends);
//! * calls with the harness's UDP UA: [`place_call`], [`hang_up`],
//!   [`answer_bye`], [`until_not_401`];
//! * a destination that answers and hangs up on command ([`ByeUas`]) and one
//!   that never answers ([`SilentUas`]);
//! * SIPp `-trace_msg` logs ([`sipp_log`]) and CDR files ([`read_cdrs`]),
//!   `tollgate usage` tables ([`usage_table`]).
#![allow(dead_code)]

use crate::common::*;
use std::collections::HashMap;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

pub const CHANNELS: &str = "tollgate_trunk_channels_in_use";

pub fn metric(edge: &Edge, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_sum(&scrape(edge.metrics_addr()), name, labels)
}

/// Polls `/metrics` every 50 ms until `name{labels}` == `want` (the sample must
/// exist) or `timeout` passes; Err names the last value seen.
pub fn wait_metric_eq(
    edge: &Edge,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let end = t0 + timeout;
    loop {
        let last = metric(edge, name, labels);
        if last == Some(want) {
            return Ok(t0.elapsed());
        }
        if Instant::now() >= end {
            return Err(format!(
                "{name}{labels:?} did not become {want} within {timeout:?}; last value {last:?}"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn assert_channels(edge: &Edge, want: f64, timeout: Duration, when: &str) {
    if let Err(e) = wait_metric_eq(edge, CHANNELS, &[], want, timeout) {
        let text = scrape(edge.metrics_addr());
        let trunk: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("trunk") || l.contains("calls_active"))
            .collect();
        panic!("{when}: {e}\nmetrics:\n{}", trunk.join("\n"));
    }
}

// ---------------------------------------------------------------------------
// Calls with the harness UA
// ---------------------------------------------------------------------------

/// INVITE sip:TO@edge (From user FROM, bearer TOKEN); returns the request and
/// its final response (non-2xx are ACKed by the harness). Panics if no final
/// response comes within `timeout`.
pub fn place_call(
    ua: &mut UdpUa,
    to: &str,
    from: &str,
    token: &str,
    timeout: Duration,
) -> (Req, SipMsg) {
    let req = Req::invite(ua.remote, to, from).bearer(token);
    match ua.transact(&req, timeout) {
        Some(o) => (req, o.fin),
        None => panic!(
            "no final response within {timeout:?} to:\n{}",
            String::from_utf8_lossy(&req.render(ua.local))
        ),
    }
}

pub fn ack(ua: &UdpUa, invite: &Req, ok: &SipMsg) {
    ua.send(&invite.in_dialog(ok, "ACK", invite.cseq));
}

/// A call on `edge` with `token` left up (200, ACKed), or `None` for a 486;
/// any other answer fails the test.
pub fn call_up(edge: &Edge, token: &str) -> Option<(UdpUa, Req, SipMsg)> {
    let mut ua = UdpUa::new(edge.sip_udp);
    let (inv, r) = place_call(&mut ua, SERVICE, "sipp", token, Duration::from_secs(10));
    match r.code() {
        Some(200) => {
            ack(&ua, &inv, &r);
            Some((ua, inv, r))
        }
        Some(486) => None,
        _ => panic!("call on {}: unexpected answer\n{}", edge.sip_udp, r.text()),
    }
}

/// Hangs up a call from [`call_up`]; the BYE must get 200.
pub fn hang_up_call((mut ua, inv, r): (UdpUa, Req, SipMsg)) {
    assert_eq!(
        hang_up(&mut ua, &inv, &r),
        Some(200),
        "BYE of {}",
        inv.call_id
    );
}

/// BYE an established call from leg A; returns the BYE's final status.
pub fn hang_up(ua: &mut UdpUa, invite: &Req, ok: &SipMsg) -> Option<u16> {
    let bye = invite.in_dialog(ok, "BYE", invite.cseq + 1);
    ua.transact(&bye, Duration::from_secs(15))
        .and_then(|o| o.fin.code())
}

/// Offers `n` INVITEs to each of `edges` at once (a thread per edge, one
/// every `every`, each with a fresh bearer from `token`), to a busy
/// destination: per edge (486: admitted, 503 with Retry-After, other).
pub fn offer_invites(
    edges: &[SocketAddr],
    n: u32,
    every: Duration,
    token: &(dyn Fn() -> String + Sync),
) -> Vec<(u32, u32, u32)> {
    let start = Instant::now() + Duration::from_millis(100);
    thread::scope(|s| {
        let hs: Vec<_> = edges
            .iter()
            .map(|&a| {
                s.spawn(move || {
                    let (mut ok, mut limited, mut other) = (0, 0, 0);
                    let mut ua = UdpUa::new(a);
                    for i in 0..n {
                        let at = start + every * i;
                        if let Some(d) = at.checked_duration_since(Instant::now()) {
                            thread::sleep(d);
                        }
                        let r = ua.call(&Req::invite(a, SERVICE, "sipp").bearer(&token()));
                        match r.code() {
                            Some(486) => ok += 1,
                            Some(503) if r.header("Retry-After").is_some() => limited += 1,
                            _ => other += 1,
                        }
                    }
                    (ok, limited, other)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Waits for a BYE on the dialog of `call_id` and answers it 200.
pub fn answer_bye(ua: &mut UdpUa, call_id: &str, timeout: Duration) -> Option<(SipMsg, Instant)> {
    let m = ua.recv_where(timeout, |m| {
        m.method() == Some("BYE") && m.call_id() == Some(call_id)
    })?;
    let at = Instant::now();
    ua.send_raw(&make_response(&m, 200, "OK", "unused", "", ""));
    Some((m, at))
}

/// Places calls with fresh tokens from `mk_token` until the answer is not 401
/// (a key created while the edge runs is honoured within a second); at most
/// `timeout`. Returns the last (request, final response).
pub fn until_not_401(
    ua: &mut UdpUa,
    to: &str,
    from: &str,
    mut mk_token: impl FnMut() -> String,
    timeout: Duration,
) -> (Req, SipMsg) {
    let end = Instant::now() + timeout;
    loop {
        let (req, fin) = place_call(ua, to, from, &mk_token(), Duration::from_secs(20));
        if fin.code() != Some(401) || Instant::now() >= end {
            return (req, fin);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A token signed by the harness (independently of the product), valid for
/// 10 minutes, fresh `jti`.
pub fn token(key: &str, to: &str, from: &str) -> String {
    let now = now_unix();
    jwt_for(key, &claims(now - 5, now + 600, to, from))
}

pub fn code(m: &SipMsg) -> u16 {
    m.code().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Destinations
// ---------------------------------------------------------------------------

/// A UDP socket on 127.0.0.1 that never answers (leg-B timeout).
pub struct SilentUas {
    pub sock: UdpSocket,
    pub addr: SocketAddr,
}

impl SilentUas {
    pub fn start() -> SilentUas {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        SilentUas { sock, addr }
    }
    pub fn route(&self) -> String {
        format!("sip:service@{}", self.addr)
    }
    /// Requests received so far (drains the socket).
    pub fn drain(&self) -> Vec<SipMsg> {
        let mut out = vec![];
        let mut buf = vec![0u8; 70000];
        self.sock.set_nonblocking(true).unwrap();
        while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
            if let Some(m) = SipMsg::parse(&buf[..n]) {
                out.push(m);
            }
        }
        self.sock.set_nonblocking(false).unwrap();
        out
    }
}

struct Dialog {
    invite: SipMsg,
    src: SocketAddr,
    tag: String,
}

/// Leg B that answers every INVITE (180, 200 with SDP), answers 200 to any
/// other request, and sends BYE on a dialog when told to ([`ByeUas::bye`]).
pub struct ByeUas {
    pub addr: SocketAddr,
    sock: Arc<UdpSocket>,
    dialogs: Arc<Mutex<Vec<Dialog>>>,
    responses: Arc<Mutex<Vec<SipMsg>>>,
    requests: Arc<Mutex<Vec<SipMsg>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ByeUas {
    pub fn start() -> ByeUas {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let dialogs = Arc::new(Mutex::new(Vec::<Dialog>::new()));
        let responses = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, d2, r2, q2, st) = (
            sock.clone(),
            dialogs.clone(),
            responses.clone(),
            requests.clone(),
            stop.clone(),
        );
        let handle = thread::spawn(move || {
            let mut buf = vec![0u8; 70000];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, src)) = s2.recv_from(&mut buf) else {
                    continue;
                };
                let Some(m) = SipMsg::parse(&buf[..n]) else {
                    continue;
                };
                if m.is_response() {
                    r2.lock().unwrap().push(m);
                    continue;
                }
                q2.lock().unwrap().push(m.clone());
                let contact = format!("Contact: <sip:uas@{addr}>\r\n");
                match m.method().unwrap_or("") {
                    "INVITE" => {
                        let cid = m.call_id().unwrap_or("").to_string();
                        let mut ds = d2.lock().unwrap();
                        let tag = match ds.iter().find(|d| d.invite.call_id() == Some(&cid)) {
                            Some(d) => d.tag.clone(),
                            None => {
                                let t = unique("byeuas");
                                ds.push(Dialog {
                                    invite: m.clone(),
                                    src,
                                    tag: t.clone(),
                                });
                                t
                            }
                        };
                        drop(ds);
                        let sdp = format!("v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n", addr.port() + 2);
                        let _ =
                            s2.send_to(&make_response(&m, 180, "Ringing", &tag, &contact, ""), src);
                        let _ =
                            s2.send_to(&make_response(&m, 200, "OK", &tag, &contact, &sdp), src);
                    }
                    "ACK" => {}
                    _ => {
                        let _ = s2.send_to(&make_response(&m, 200, "OK", "x", "", ""), src);
                    }
                }
            }
        });
        ByeUas {
            addr,
            sock,
            dialogs,
            responses,
            requests,
            stop,
            handle: Some(handle),
        }
    }
    pub fn route(&self) -> String {
        format!("sip:service@{}", self.addr)
    }
    pub fn count(&self, method: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.method() == Some(method))
            .count()
    }
    /// Waits for the first dialog to be confirmed (ACK received).
    pub fn wait_ack(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.count("ACK") >= 1 {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }
    /// Sends BYE on the first dialog (to the edge's Contact), retransmitting
    /// until a final response; returns its status.
    pub fn bye(&self, timeout: Duration) -> Option<u16> {
        let (inv, src, tag) = {
            let ds = self.dialogs.lock().unwrap();
            let d = ds.first().expect("no dialog to hang up");
            (d.invite.clone(), d.src, d.tag.clone())
        };
        let ruri = inv
            .contact_uri()
            .expect("INVITE from the edge has a Contact");
        let from = format!("{};tag={tag}", inv.header("to").unwrap());
        let to = inv.header("from").unwrap().to_string();
        let cid = inv.call_id().unwrap().to_string();
        let branch = unique("z9hG4bK-bye");
        let msg = format!(
            "BYE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {cid}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            self.addr
        );
        let end = Instant::now() + timeout;
        let mut rto = Duration::from_millis(500);
        loop {
            let _ = self.sock.send_to(msg.as_bytes(), src);
            let next = Instant::now() + rto;
            while Instant::now() < next.min(end) {
                if let Some(c) = self.responses.lock().unwrap().iter().find_map(|r| {
                    (r.via_branch().as_deref() == Some(branch.as_str())
                        && r.code().is_some_and(|c| c >= 200))
                    .then(|| r.code().unwrap())
                }) {
                    return Some(c);
                }
                thread::sleep(Duration::from_millis(10));
            }
            if Instant::now() >= end {
                return None;
            }
            rto = (rto * 2).min(Duration::from_secs(4));
        }
    }
}

impl Drop for ByeUas {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// SIPp -trace_msg logs
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct LoggedMsg {
    /// Seconds since the Unix epoch, *as if* the log's local time were UTC
    /// (see [`tz_offset`]).
    pub ts: f64,
    pub sent: bool,
    pub msg: SipMsg,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// "YYYY-MM-DD HH:MM:SS.ffffff" -> seconds (treating it as UTC).
fn parse_stamp(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let date = it.next()?;
    let time = it.next()?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    let (h, mi): (i64, i64) = (t[0].parse().ok()?, t[1].parse().ok()?);
    let sec: f64 = t[2].parse().ok()?;
    Some((days_from_civil(d[0], d[1], d[2]) * 86400 + h * 3600 + mi * 60) as f64 + sec)
}

/// Every message in a SIPp `-trace_msg` file, in order.
pub fn sipp_log(path: &Path) -> Vec<LoggedMsg> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let sep = "----------------------------------------------- ";
    let mut out = vec![];
    for block in text.split(sep).skip(1) {
        let Some((stamp, rest)) = block.split_once('\n') else {
            continue;
        };
        let Some(ts) = parse_stamp(stamp) else {
            continue;
        };
        let Some((kind, body)) = rest.split_once('\n') else {
            continue;
        };
        let sent = kind.contains("message sent");
        if !sent && !kind.contains("message received") {
            continue;
        }
        let body = body.trim_start_matches(['\r', '\n']);
        if let Some(msg) = SipMsg::parse(body.as_bytes()) {
            out.push(LoggedMsg { ts, sent, msg });
        }
    }
    out
}

/// The offset (seconds, a multiple of 15 min) to subtract from
/// [`LoggedMsg::ts`] to get Unix time, given that the log's first message was
/// written at about Unix time `approx_unix` (within a few minutes).
pub fn tz_offset(log: &[LoggedMsg], approx_unix: f64) -> f64 {
    let first = log.first().map_or(approx_unix, |m| m.ts);
    ((first - approx_unix) / 900.0).round() * 900.0
}

/// Final response code per Call-ID for the INVITEs a UAC received responses to.
pub fn invite_finals(log: &[LoggedMsg]) -> HashMap<String, (u16, SipMsg)> {
    let mut m = HashMap::new();
    for e in log {
        if e.sent || !e.msg.is_response() {
            continue;
        }
        let Some((_, meth)) = e.msg.cseq() else {
            continue;
        };
        let c = e.msg.code().unwrap_or(0);
        if meth == "INVITE" && c >= 200 {
            m.entry(e.msg.call_id().unwrap_or("").to_string())
                .or_insert((c, e.msg.clone()));
        }
    }
    m
}

// ---------------------------------------------------------------------------
// CDRs and usage
// ---------------------------------------------------------------------------

/// Complete lines of `<data>/cdrs.jsonl`, parsed. A last line without its
/// `\n` (torn by a crash) is returned separately, unparsed.
pub fn read_cdrs(data_dir: &Path) -> (Vec<Json>, Option<String>) {
    let raw = fs::read_to_string(data_dir.join("cdrs.jsonl")).unwrap_or_default();
    let mut out = vec![];
    let mut torn = None;
    let complete = raw.ends_with('\n');
    let lines: Vec<&str> = raw.split('\n').collect();
    for (i, l) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        if last {
            if !complete && !l.is_empty() {
                torn = Some(l.to_string());
            }
            break;
        }
        if l.trim().is_empty() {
            continue;
        }
        let j = Json::parse(l).unwrap_or_else(|| panic!("CDR line {i} is not JSON: {l:?}"));
        out.push(j);
    }
    (out, torn)
}

pub fn cdr_answered(c: &Json) -> bool {
    !matches!(c.get("answer"), None | Some(Json::Null))
}

/// Totals computed by the test from CDRs: calls, answered, failed, billable.
pub fn totals_of(cdrs: &[Json]) -> [u64; 4] {
    let mut t = [0u64; 4];
    for c in cdrs {
        t[0] += 1;
        if cdr_answered(c) {
            t[1] += 1;
        } else {
            t[2] += 1;
        }
        t[3] += c.int("billable_secs").unwrap_or(0) as u64;
    }
    t
}

/// `tollgate usage --data-dir D [extra]` parsed: row name -> [calls, answered,
/// failed, billable_secs]. Asserts the header and the `total` row.
pub fn usage_table(data_dir: &Path, extra: &[&str]) -> HashMap<String, [u64; 4]> {
    let mut args = vec!["usage"];
    args.extend_from_slice(extra);
    let out = tollgate_in(data_dir, &args);
    let mut lines = out.lines();
    let hdr: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        hdr,
        ["key", "calls", "answered", "failed", "billable_secs"],
        "usage header; output:\n{out}"
    );
    let mut m = HashMap::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f.len(), 5, "usage row {l:?}; output:\n{out}");
        let n: Vec<u64> = f[1..]
            .iter()
            .map(|x| x.parse().unwrap_or_else(|_| panic!("usage row {l:?}")))
            .collect();
        m.insert(f[0].to_string(), [n[0], n[1], n[2], n[3]]);
    }
    assert!(m.contains_key("total"), "no total row in:\n{out}");
    m
}

/// SIGKILL our own child process, by pid.
pub fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -9 {pid} failed");
}

/// `kill -9` the edge and wait (up to 10 s) until it is gone.
pub fn kill9_and_wait(edge: &mut Edge) {
    kill9(edge.pid());
    let t = Instant::now();
    while edge.is_running() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "edge survived kill -9"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Edge configuration
// ---------------------------------------------------------------------------

/// A `[media]` section with a media port range of its own (400 ports in
/// 10000-19999, away from the product default 20000-29999 that other tests'
/// edges share, and from the harness's SIPp blocks in 7000-9959) and a media
/// timeout long enough for calls that are held without RTP.
///
/// Why: parallel edges on the same default range collide (the relay skips
/// only a few taken pairs, then answers 500), and the default media timeout
/// (60 s) would race the 60 s budget cut.
pub fn media_toml(timeout_s: u64) -> String {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    const LO: u32 = 10_000;
    const SPAN: u32 = 400;
    const BLOCKS: u32 = 25;
    let start = std::process::id()
        .wrapping_mul(31)
        .wrapping_add(N.fetch_add(1, Ordering::SeqCst));
    for k in 0..BLOCKS {
        let b = (start + k) % BLOCKS;
        let lo = LO + b * SPAN;
        let hi = lo + SPAN - 1;
        let free = [lo, lo + 1, lo + SPAN / 2, hi]
            .iter()
            .all(|p| UdpSocket::bind(("127.0.0.1", *p as u16)).is_ok());
        if free {
            return format!("\n[media]\nports = \"{lo}-{hi}\"\ntimeout_s = {timeout_s}\n");
        }
    }
    panic!("no free media port block in 10000-19999");
}

/// `base` with [`media_toml`] appended (media timeout 600 s).
pub fn cfg(base: EdgeConfig) -> EdgeConfig {
    let mut c = base;
    c.extra_toml.push_str(&media_toml(600));
    c
}
