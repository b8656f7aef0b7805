//! End-to-end media streams to an AI backend (issue 16, SPEC §10) against the
//! real `tollgate serve` binary on 127.0.0.1.
//!
//! The caller is this test (SIP over UDP, RTP from its own socket); the
//! backend is `tests/stream_support/backend.py`, a `websockets` server that
//! decodes every message with Pipecat's own Twilio code
//! (`parse_telephony_websocket`, `TwilioFrameSerializer`) and produces the
//! audio and `clear` it sends with it, so the edge is checked against an
//! independent implementation of the protocol.
//!
//! Needs the venv of `scripts/install-streams-deps.sh` (pipecat-ai,
//! websockets); fails, never skips, when it is missing.

mod common;

use base64::Engine;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tollgate_media::srtp::{
    Direction, ReferenceProvider, SrtpKeys, SrtpProvider, SrtpTransform, Suite,
};

/// The load test and the pacing measurement do not run at once (a machine
/// busy with 200 streams and their Python backend is no place to measure
/// 20 ms pacing).
static HEAVY: Mutex<()> = Mutex::new(());

/// Media port ranges, one per test (other test files use 10000-14299).
const RANGE_PROTOCOL: &str = "15000-15099";
const RANGE_ALAW: &str = "15100-15199";
const RANGE_CLEAR: &str = "15200-15299";
const RANGE_FAILURES: &str = "15300-15499";
/// 4 ports a call (both legs, RTP and RTCP): room for 250 calls.
const RANGE_LOAD: &str = "17000-17999";
const RANGE_SRTP: &str = "15900-15949";
const RANGE_WSS: &str = "15950-15999";

fn venv_python() -> std::path::PathBuf {
    let venv = std::env::var("TOLLGATE_STREAMS_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| manifest_dir().join("../../.venv/streams"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/install-streams-deps.sh (pipecat-ai and websockets in a venv)",
        py.display()
    );
    py
}

// ---------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------

struct Backend {
    child: Child,
    events: Receiver<(Instant, Value)>,
    log: Arc<Mutex<Vec<String>>>,
    port: u16,
    /// With a certificate: the HTTPS webhook receiver's port.
    hook_port: u16,
    stderr_path: std::path::PathBuf,
}

impl Backend {
    fn start(dir: &TestDir, secret: &str) -> Backend {
        Backend::start_with(dir, secret, &[])
    }

    fn start_with(dir: &TestDir, secret: &str, args: &[&str]) -> Backend {
        let stderr_path = dir.join("backend.stderr");
        let mut child = Command::new(venv_python())
            .arg(manifest_dir().join("tests/stream_support/backend.py"))
            .args(["--secret", secret])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .expect("run the stream backend");
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            thread::spawn(move || {
                for l in BufReader::new(stdout).lines() {
                    let Ok(l) = l else { break };
                    let at = Instant::now();
                    log.lock().unwrap().push(l.clone());
                    if let Ok(j) = serde_json::from_str::<Value>(&l) {
                        let _ = tx.send((at, j));
                    }
                }
            });
        }
        let mut b = Backend {
            child,
            events: rx,
            log,
            port: 0,
            hook_port: 0,
            stderr_path,
        };
        let (_, ready) = b.next("ready", Duration::from_secs(60));
        b.port = ready["port"].as_u64().unwrap() as u16;
        b.hook_port = ready["hook_port"].as_u64().unwrap_or(0) as u16;
        b
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    fn dump(&self) -> String {
        let out = self.log.lock().unwrap();
        let tail: Vec<String> = out
            .iter()
            .rev()
            .take(40)
            .rev()
            .map(|l| l.chars().take(300).collect())
            .collect();
        format!(
            "--- backend stdout (last 40) ---\n{}\n--- backend stderr ---\n{}",
            tail.join("\n"),
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// The next event named `ev` (others are skipped; `error` fails).
    fn next(&self, ev: &str, timeout: Duration) -> (Instant, Value) {
        self.next_where(timeout, |j| j["ev"] == ev)
            .unwrap_or_else(|| panic!("backend sent no {ev:?} within {timeout:?}\n{}", self.dump()))
    }

    fn next_where(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<(Instant, Value)> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((_, j)) if j["ev"] == "error" => {
                    panic!("backend reported an error: {j}\n{}", self.dump())
                }
                Ok((at, j)) if pred(&j) => return Some((at, j)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// The first line logged so far (or within `timeout`) that `pred` takes,
    /// whether or not an earlier wait has consumed it.
    fn logged(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        poll(timeout, || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|j| pred(j))
        })
    }

    /// Every event that comes within `d`.
    fn drain(&self, d: Duration) -> Vec<(Instant, Value)> {
        let end = Instant::now() + d;
        let mut v = Vec::new();
        while let Ok(e) = self
            .events
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            v.push(e);
        }
        v
    }

    /// Every event until `until` matches (included), in order.
    fn until(&self, timeout: Duration, until: impl Fn(&Value) -> bool) -> Vec<(Instant, Value)> {
        let end = Instant::now() + timeout;
        let mut v = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((_, j)) if j["ev"] == "error" => {
                    panic!("backend reported an error: {j}\n{}", self.dump())
                }
                Ok((at, j)) => {
                    let done = until(&j);
                    v.push((at, j));
                    if done {
                        return v;
                    }
                }
                Err(_) => panic!("backend: no end event within {timeout:?}\n{}", self.dump()),
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.dump());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The caller
// ---------------------------------------------------------------------------

fn rtp_packet(pt: u8, marker: bool, seq: u16, ts: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, pt | if marker { 0x80 } else { 0 }];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&0x5EED_0001u32.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Caller frame `i`: distinct, deterministic bytes.
fn frame(i: usize) -> Vec<u8> {
    let h = sha256(format!("caller-{i}").as_bytes());
    (0..160).map(|j| h[j % 32] ^ (j as u8)).collect()
}

/// The backend's frame `i` (backend.py `pattern`).
fn backend_frame(i: usize) -> Vec<u8> {
    (0..160)
        .map(|j| {
            let v = ((i * 7 + j) % 254) as u8;
            if v >= 0x7F {
                v + 1
            } else {
                v
            }
        })
        .collect()
}

/// One RTP packet received by the caller.
#[derive(Clone)]
struct Got {
    at: Instant,
    pt: u8,
    marker: bool,
    seq: u16,
    ts: u32,
    payload: Vec<u8>,
}

struct Caller {
    /// Leg A over SRTP: the caller's outbound context.
    srtp_out: Option<Box<dyn SrtpTransform>>,
    ua: UdpUa,
    rtp: Arc<UdpSocket>,
    invite: Req,
    ok: SipMsg,
    edge_media: SocketAddr,
    seq: u16,
    ts: u32,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Caller {
    /// INVITE with a token for `model`, offering `pt` (0 PCMU, 8 PCMA) and
    /// telephone-event 101; ACKs the 200.
    fn call(edge: &Edge, key: &str, model: &str, pt: u8) -> Caller {
        Caller::call_with(edge, key, model, pt, false, None)
    }

    /// `srtp`: offer RTP/SAVP (SDES, AES_CM_128_HMAC_SHA1_80) and protect
    /// and unprotect with webrtc-srtp (the media crate's reference provider,
    /// not the relay's own code).
    fn call_with(
        edge: &Edge,
        key: &str,
        model: &str,
        pt: u8,
        srtp: bool,
        webhook: Option<&str>,
    ) -> Caller {
        let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = rtp.local_addr().unwrap().port();
        let name = if pt == 0 { "PCMU" } else { "PCMA" };
        let suite = Suite::AesCm128HmacSha1_80;
        let ours = SrtpKeys::generate(suite).unwrap();
        let (proto, crypto) = if srtp {
            (
                "RTP/SAVP",
                format!(
                    "a=crypto:1 {} inline:{}\r\n",
                    suite.sdes_name(),
                    base64::engine::general_purpose::STANDARD.encode(ours.concat())
                ),
            )
        } else {
            ("RTP/AVP", String::new())
        };
        let sdp = format!(
            "v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {port} {proto} {pt} 101\r\na=rtpmap:{pt} {name}/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n{crypto}a=sendrecv\r\n"
        );
        let now = now_unix();
        let hook = webhook.map_or(String::new(), |w| format!(",\"webhook\":\"{w}\""));
        let claims = format!(
            "{{\"iat\":{now},\"exp\":{},\"jti\":\"{}\",\"to\":\"{SERVICE}\",\"from\":\"alice\",\"model\":\"{model}\",\"record\":false,\"max_duration\":600{hook}}}",
            now + 600,
            unique("jti-")
        );
        let mut invite = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&jwt_for(key, &claims));
        invite.body = sdp.into_bytes();
        let mut ua = UdpUa::new(edge.sip_udp);
        let ok = ua.call(&invite);
        assert_eq!(
            ok.code(),
            Some(200),
            "INVITE to a stream route:\n{}",
            ok.text()
        );
        let body = String::from_utf8_lossy(&ok.body).to_string();
        let ip = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("c=IN IP4 "))
            .expect("c= in the answer");
        let mport = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("m=audio "))
            .and_then(|m| m.split_whitespace().next())
            .expect("m=audio in the answer");
        let edge_media: SocketAddr = format!("{}:{mport}", ip.trim()).parse().unwrap();
        let mut srtp_in = None;
        let mut srtp_out = None;
        if srtp {
            let theirs = body
                .lines()
                .find_map(|l| l.trim().strip_prefix("a=crypto:"))
                .and_then(|c| c.split("inline:").nth(1))
                .and_then(|k| {
                    base64::engine::general_purpose::STANDARD
                        .decode(k.split('|').next()?)
                        .ok()
                })
                .unwrap_or_else(|| {
                    panic!("the edge's answer to RTP/SAVP has no a=crypto:\n{body}")
                });
            let theirs = SrtpKeys::split(suite, &theirs).unwrap();
            srtp_in = Some(
                ReferenceProvider
                    .new_context(suite, &theirs, Direction::Inbound)
                    .unwrap(),
            );
            srtp_out = Some(
                ReferenceProvider
                    .new_context(suite, &ours, Direction::Outbound)
                    .unwrap(),
            );
        }
        ua.send(&invite.in_dialog(&ok, "ACK", invite.cseq));
        let rtp = Arc::new(rtp);
        let got = Arc::new(Mutex::new(Vec::new()));
        {
            let (rtp, got) = (rtp.clone(), got.clone());
            rtp.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                // Ends when the test drops the caller (the Arc's last user).
                while Arc::strong_count(&got) > 1 {
                    if let Ok((n, _)) = rtp.recv_from(&mut buf) {
                        let mut pkt = bytes::BytesMut::from(&buf[..n]);
                        if let Some(ctx) = srtp_in.as_mut() {
                            if ctx.unprotect_rtp(&mut pkt).is_err() {
                                continue;
                            }
                        }
                        let p = &pkt[..];
                        let n = p.len();
                        if n >= 12 {
                            got.lock().unwrap().push(Got {
                                at: Instant::now(),
                                pt: p[1] & 0x7f,
                                marker: p[1] & 0x80 != 0,
                                seq: u16::from_be_bytes([p[2], p[3]]),
                                ts: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                                payload: p[12..].to_vec(),
                            });
                        }
                    }
                }
            });
        }
        Caller {
            srtp_out,
            ua,
            rtp,
            invite,
            ok,
            edge_media,
            seq: 1000,
            ts: 50_000,
            got,
        }
    }

    fn send(&mut self, pt: u8, marker: bool, payload: &[u8]) {
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(160);
        let p = rtp_packet(pt, marker, self.seq, self.ts, payload);
        let mut pkt = bytes::BytesMut::from(&p[..]);
        if let Some(ctx) = self.srtp_out.as_mut() {
            ctx.protect_rtp(&mut pkt).unwrap();
        }
        self.rtp.send_to(&pkt, self.edge_media).unwrap();
    }

    /// RFC 4733 digit: three packets of one event (same timestamp), the
    /// last three with the end bit, as a phone sends it.
    fn dtmf(&mut self, event: u8) {
        self.ts = self.ts.wrapping_add(160);
        for (k, end) in [(1u16, false), (2, false), (3, true), (3, true), (3, true)] {
            self.seq = self.seq.wrapping_add(1);
            let dur = (k * 160).to_be_bytes();
            let pl = [event, if end { 0x80 | 10 } else { 10 }, dur[0], dur[1]];
            let p = rtp_packet(101, k == 1 && !end, self.seq, self.ts, &pl);
            self.rtp.send_to(&p, self.edge_media).unwrap();
        }
    }

    /// Sends `frames` at 20 ms, frame(i) for i in `from..from+frames`.
    fn talk(&mut self, from: usize, frames: usize, pt: u8) {
        let start = Instant::now();
        for i in 0..frames {
            let due = start + Duration::from_millis(20 * i as u64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
            let f = frame(from + i);
            self.send(pt, i == 0, &f);
        }
    }

    /// Talks `frames` (frame(0..)), hangs up, and returns what the backend
    /// saw up to the stream's `stop`.
    fn talk_and_hang_up(
        &mut self,
        backend: &Backend,
        frames: usize,
        pt: u8,
    ) -> Vec<(Instant, Value)> {
        self.talk(0, frames, pt);
        thread::sleep(Duration::from_millis(300));
        self.hang_up();
        backend.until(Duration::from_secs(15), |j| j["ev"] == "stop")
    }

    fn received(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn hang_up(&mut self) {
        let bye = self.invite.in_dialog(&self.ok, "BYE", self.invite.cseq + 1);
        let code = self
            .ua
            .transact(&bye, Duration::from_secs(10))
            .map(|o| o.fin.code());
        assert_eq!(code, Some(Some(200)), "BYE through the edge");
    }

    /// Waits for the edge's BYE and answers it.
    fn expect_bye(&mut self, timeout: Duration) -> bool {
        match self.ua.recv_where(timeout, |m| m.method() == Some("BYE")) {
            Some(bye) => {
                self.ua
                    .send_raw(&make_response(&bye, 200, "OK", "", "", ""));
                true
            }
            None => false,
        }
    }
}

/// The edge's directory with a key made in its data directory (a key made
/// while the edge runs is seen only at its next key refresh).
fn edge_dir(tag: &str) -> (TestDir, String) {
    let dir = TestDir::new(tag);
    let key = create_key(
        &dir.join("data"),
        "streams",
        &["--cps", "500", "--max-calls", "1000"],
    );
    (dir, key)
}

/// An edge whose routes (model, target) are stream URLs; `extra` goes into
/// `[streams]`.
fn stream_edge_in(dir: TestDir, routes: &[(&str, String)], range: &str, extra: &str) -> Edge {
    let mut toml = format!(
        "[media]\nports = \"{range}\"\n\n[streams]\nallow_cidrs = [\"127.0.0.1/32\"]\n{extra}\n"
    );
    for (model, target) in routes {
        toml.push_str("\n[[routes]]\n");
        if !model.is_empty() {
            toml.push_str(&format!("model = \"{model}\"\n"));
        }
        toml.push_str(&format!("target = \"{target}\"\n"));
        // Lets leg A offer SDES keys over UDP (the test's loopback caller).
        toml.push_str("sdes_over_cleartext = true\n");
    }
    Edge::start_in(
        dir,
        EdgeConfig {
            extra_toml: toml,
            ..Default::default()
        },
    )
}

/// SPEC §7: the webhook secret of a key, computed by the harness.
fn webhook_secret(key: &str) -> String {
    hex(&hmac_sha256(key.as_bytes(), b"tollgate-webhook-v1"))
}

fn cdrs(edge: &Edge) -> Vec<Value> {
    std::fs::read_to_string(edge.data_dir.join("cdrs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The CDR cause of the call whose leg-A Call-ID is `a_call_id`.
fn cdr_cause(edge: &Edge, a_call_id: &str) -> String {
    poll(Duration::from_secs(10), || {
        cdrs(edge)
            .into_iter()
            .find(|c| c["sip_call_id"] == a_call_id)
            .and_then(|c| c["cause"].as_str().map(str::to_owned))
    })
    .unwrap_or_else(|| panic!("no CDR for {a_call_id}: {:?}", cdrs(edge)))
}

fn metric(edge: &Edge, name: &str) -> f64 {
    let (_, body) = http_request(edge.metrics_addr(), "GET", "/metrics", "");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// caller -> edge -> Pipecat: connected, start with the token's runtime
/// parameters, media byte-identical to what the caller sent, dtmf, stop at
/// BYE; the backend's audio reaches the caller paced at 20 ms with RTP
/// numbering, and its mark comes back after that audio played.
#[test]
fn stream_call_speaks_the_twilio_protocol_to_pipecat() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // The key exists before the backend starts: the backend checks the
    // upgrade's signature with its webhook secret.
    let (dir, key) = edge_dir("streams-protocol");
    let backend_dir = TestDir::new("streams-protocol-backend");
    let backend = Backend::start(&backend_dir, &webhook_secret(&key));
    const TALK: usize = 50;
    let url = backend.url(&format!("/talk?frames={TALK}&mark=done"));
    let edge = stream_edge_in(dir, &[("", url)], RANGE_PROTOCOL, "");
    let mut caller = Caller::call(&edge, &key, "gpt-test", 0);

    let (_, up) = backend.next("upgrade", Duration::from_secs(10));
    assert_eq!(
        up["signature_ok"], true,
        "X-Tollgate-Signature over the URL: {up}"
    );
    let (_, start) = backend.next("start", Duration::from_secs(10));
    assert_eq!(
        start["transport"], "twilio",
        "Pipecat recognises the handshake: {start}"
    );
    assert_eq!(start["first"]["event"], "connected");
    assert_eq!(
        start["body"]["model"], "gpt-test",
        "customParameters: {start}"
    );
    assert_eq!(start["body"]["max_duration"], "600");
    assert_eq!(start["body"]["record"], "false");
    let stream_sid = start["stream_id"].as_str().unwrap().to_owned();
    assert!(
        stream_sid.starts_with("MZ") && stream_sid.len() == 34,
        "{stream_sid}"
    );
    let fmt = &start["raw"]["start"]["mediaFormat"];
    assert_eq!(
        (
            fmt["encoding"].as_str(),
            fmt["sampleRate"].as_u64(),
            fmt["channels"].as_u64()
        ),
        (Some("audio/x-mulaw"), Some(8000), Some(1))
    );
    let call_sid = start["call_id"].as_str().unwrap().to_owned();

    // Caller -> backend: 60 frames, a digit, 10 frames more.
    caller.talk(0, 60, 0);
    caller.dtmf(5);
    caller.talk(60, 10, 0);
    thread::sleep(Duration::from_millis(300));
    caller.hang_up();
    let seen = backend.until(Duration::from_secs(15), |j| j["ev"] == "stop");
    let media = events(&seen, "media");
    assert_eq!(
        media.len(),
        70,
        "every frame the caller sent reached the backend"
    );
    for (i, m) in media.iter().enumerate() {
        assert_eq!(
            m["payload"].as_str().unwrap(),
            hex(&frame(i)),
            "media {i}: the payload is the caller's µ-law, byte for byte"
        );
        assert_eq!(m["pipecat_ok"], true, "Pipecat decodes media {i}");
        assert_eq!(m["chunk"], (i + 1).to_string());
        assert_eq!(m["track"], "inbound");
    }
    let dtmf = events(&seen, "dtmf");
    assert_eq!(
        dtmf.len(),
        1,
        "one dtmf for one RFC 4733 event (5 packets): {dtmf:?}"
    );
    assert_eq!(
        (dtmf[0]["digit"].as_str(), dtmf[0]["pipecat_digit"].as_str()),
        (Some("5"), Some("5"))
    );
    let (_, stop) = seen.last().unwrap();
    assert_eq!(stop["raw"]["streamSid"], stream_sid.as_str());
    assert_eq!(stop["raw"]["stop"]["callSid"], call_sid.as_str());
    // Sequence numbers go up by one over every message after `connected`.
    let mut seqs: Vec<u64> = media
        .iter()
        .map(|m| m["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    seqs.dedup();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "sequenceNumber increases"
    );

    // Backend -> caller: the 50 frames, paced, numbered, then the mark.
    let got: Vec<Got> = caller
        .received()
        .into_iter()
        .filter(|g| g.pt == 0)
        .collect();
    assert_eq!(got.len(), TALK, "the backend's frames reached the caller");
    for (i, g) in got.iter().enumerate() {
        assert_eq!(
            g.payload,
            backend_frame(i),
            "frame {i} as the backend sent it"
        );
        assert_eq!(g.seq, got[0].seq.wrapping_add(i as u16), "RTP sequence");
        assert_eq!(
            g.ts,
            got[0].ts.wrapping_add(160 * i as u32),
            "RTP timestamp"
        );
        assert_eq!(
            g.marker,
            i == 0,
            "marker on the talkspurt's first packet only"
        );
    }
    let gaps: Vec<f64> = got
        .windows(2)
        .map(|w| ((w[1].at - w[0].at).as_secs_f64() * 1000.0 - 20.0).abs())
        .collect();
    let raw: Vec<String> = got
        .windows(2)
        .map(|w| format!("{:.1}", (w[1].at - w[0].at).as_secs_f64() * 1000.0))
        .collect();
    eprintln!("gaps: {}", raw.join(" "));
    let p95 = percentile(gaps.clone(), 0.95);
    eprintln!(
        "playout jitter: p95 {p95:.2} ms, max {:.2} ms",
        percentile(gaps, 1.0)
    );
    assert!(p95 <= 5.0, "paced at 20 ms +-5 ms (p95): {p95:.2} ms");
    let marks: Vec<&(Instant, Value)> = seen.iter().filter(|(_, j)| j["ev"] == "mark").collect();
    assert_eq!(marks.len(), 1, "the mark came back once: {marks:?}");
    assert_eq!(marks[0].1["raw"]["mark"]["name"], "done");
    let last = got.last().unwrap().at;
    assert!(
        marks[0].0 > last,
        "the mark came back after its audio played (mark {:?} after the last frame)",
        marks[0].0.checked_duration_since(last)
    );

    assert_eq!(cdr_cause(&edge, caller.invite.call_id.as_str()), "normal");
    assert!(
        metric(
            &edge,
            "tollgate_stream_frames_total{direction=\"to_backend\"}"
        ) >= 71.0
    );
    assert!(
        metric(
            &edge,
            "tollgate_stream_frames_total{direction=\"from_backend\"}"
        ) >= TALK as f64
    );
    assert_eq!(metric(&edge, "tollgate_streams_active"), 0.0);
    assert_eq!(metric(&edge, "tollgate_stream_queue_frames"), 0.0);
}

/// Independent G.711 decoders (ITU-T G.711 formulas) for the A-law test.
fn ulaw_linear(u: u8) -> i32 {
    let u = !u;
    let t = ((((u & 0x0f) as i32) << 3) + 0x84) << ((u >> 4) & 7);
    if u & 0x80 != 0 {
        0x84 - t
    } else {
        t - 0x84
    }
}

fn alaw_linear(a: u8) -> i32 {
    let a = a ^ 0x55;
    let seg = ((a >> 4) & 7) as i32;
    let mut t = ((a & 0x0f) as i32) << 4;
    t = if seg == 0 {
        t + 8
    } else {
        (t + 0x108) << (seg - 1)
    };
    if a & 0x80 != 0 {
        t
    } else {
        -t
    }
}

/// Two laws' samples agree within the coarser quantization step there.
fn close(a: i32, b: i32) -> bool {
    (a - b).abs() <= (a.abs() / 16).max(16)
}

/// An A-law (PCMA) caller: the backend gets µ-law carrying the same audio,
/// and the backend's µ-law reaches the caller as A-law.
#[test]
fn alaw_caller_is_transcoded_both_ways() {
    let (dir, key) = edge_dir("streams-alaw");
    let backend = Backend::start(&TestDir::new("streams-alaw-backend"), "");
    let edge = stream_edge_in(dir, &[("", backend.url("/talk?frames=10"))], RANGE_ALAW, "");
    let mut caller = Caller::call(&edge, &key, "m", 8);
    backend.next("start", Duration::from_secs(10));
    let seen = caller.talk_and_hang_up(&backend, 20, 8);
    let media: Vec<Vec<u8>> = events(&seen, "media")
        .into_iter()
        .map(|j| {
            let h = j["payload"].as_str().unwrap();
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect();
    assert_eq!(media.len(), 20, "every A-law frame reached the backend");
    for (i, m) in media.iter().enumerate() {
        let sent = frame(i);
        assert_ne!(m, &sent, "frame {i} was converted, not passed through");
        for (k, (u, a)) in m.iter().zip(&sent).enumerate() {
            assert!(
                close(ulaw_linear(*u), alaw_linear(*a)),
                "frame {i} sample {k}: µ-law {u:#x} ({}) for A-law {a:#x} ({})",
                ulaw_linear(*u),
                alaw_linear(*a)
            );
        }
    }
    let got: Vec<Got> = caller
        .received()
        .into_iter()
        .filter(|g| g.pt == 8)
        .collect();
    assert_eq!(
        got.len(),
        10,
        "the backend's frames reached the caller as PCMA"
    );
    for (i, g) in got.iter().enumerate() {
        for (a, u) in g.payload.iter().zip(backend_frame(i)) {
            assert!(
                close(alaw_linear(*a), ulaw_linear(u)),
                "frame {i}: {a:#x} for µ {u:#x}"
            );
        }
    }
}

/// `clear` empties the playout queue at once: nothing more than the frame
/// in flight reaches the caller after it.
#[test]
fn clear_stops_playout_within_one_frame() {
    let (dir, key) = edge_dir("streams-clear");
    let backend = Backend::start(&TestDir::new("streams-clear-backend"), "");
    let edge = stream_edge_in(
        dir,
        &[("", backend.url("/talk?frames=150&mark=tail&clear_ms=400"))],
        RANGE_CLEAR,
        "",
    );
    let mut caller = Caller::call(&edge, &key, "m", 0);
    backend.next("start", Duration::from_secs(10));
    let (cleared_at, _) = backend.next("cleared", Duration::from_secs(10));
    // The mark waiting behind the cleared audio comes back at the clear.
    let (mark_at, mark) = backend.next("mark", Duration::from_secs(5));
    assert_eq!(mark["raw"]["mark"]["name"], "tail");
    thread::sleep(Duration::from_millis(500));
    let got: Vec<Got> = caller
        .received()
        .into_iter()
        .filter(|g| g.pt == 0)
        .collect();
    let after: Vec<&Got> = got
        .iter()
        .filter(|g| g.at > cleared_at + Duration::from_millis(25))
        .collect();
    eprintln!(
        "clear: {} frames played of 150, {} after the clear (+25 ms); mark {:?} after the clear",
        got.len(),
        after.len(),
        mark_at.checked_duration_since(cleared_at)
    );
    assert!(after.len() <= 1, "{} frames after the clear", after.len());
    assert!(
        (10..100).contains(&got.len()),
        "about 400 ms of the 3 s burst played before the clear: {}",
        got.len()
    );
    caller.hang_up();
    assert!(
        metric(
            &edge,
            "tollgate_stream_frames_dropped_total{reason=\"cleared\"}"
        ) >= 50.0
    );
}

/// Backends that refuse, close mid-call, send garbage, never answer the
/// upgrade, do not listen, or do not speak TLS: each call gets a BYE from
/// the edge and a CDR naming the cause; a call to a backend that never
/// reads (slow) and one to a healthy backend, up meanwhile, are unaffected.
#[test]
fn failing_backends_end_the_call_with_bye_and_the_cause() {
    let (dir, key) = edge_dir("streams-failures");
    let backend = Backend::start(&TestDir::new("streams-failures-backend"), "");
    // Accepts TCP, never answers: the upgrade times out.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    // A port nothing listens on.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let routes = [
        ("healthy", backend.url("/listen")),
        ("slow", backend.url("/stall")),
        ("refuse", backend.url("/refuse")),
        ("close", backend.url("/close?ms=300")),
        ("garbage", backend.url("/garbage?ms=300")),
        ("mute", format!("ws://127.0.0.1:{mute_port}/")),
        ("nobody", format!("ws://127.0.0.1:{closed_port}/")),
        ("notls", format!("wss://127.0.0.1:{}/", backend.port)),
        ("private", "ws://127.0.0.2:9/".to_string()),
        ("", backend.url("/listen")),
    ];
    let edge = stream_edge_in(dir, &routes, RANGE_FAILURES, "connect_timeout_ms = 1000");
    let mut healthy = Caller::call(&edge, &key, "healthy", 0);
    let mut slow = Caller::call(&edge, &key, "slow", 0);
    let cases = [
        ("refuse", "stream_rejected"),
        ("close", "stream_closed"),
        ("garbage", "stream_protocol_error"),
        ("mute", "stream_connect_timeout"),
        ("nobody", "stream_connect_failed"),
        ("notls", "stream_tls_failed"),
        ("private", "stream_not_permitted"),
    ];
    let mut failing: Vec<(&str, &str, Caller)> = cases
        .iter()
        .map(|(m, cause)| (*m, *cause, Caller::call(&edge, &key, m, 0)))
        .collect();
    // Everyone talks for 2 s; the failures happen meanwhile.
    let talkers: Vec<thread::JoinHandle<Caller>> = failing
        .drain(..)
        .map(|(_, _, mut c)| {
            thread::spawn(move || {
                c.talk(0, 100, 0);
                c
            })
        })
        .collect();
    let slow_talk = thread::spawn(move || {
        slow.talk(0, 100, 0);
        slow
    });
    healthy.talk(0, 100, 0);
    let mut slow = slow_talk.join().unwrap();
    let mut callers: Vec<Caller> = talkers.into_iter().map(|t| t.join().unwrap()).collect();
    for ((model, cause), c) in cases.iter().zip(callers.iter_mut()) {
        assert!(
            c.expect_bye(Duration::from_secs(10)),
            "{model}: the edge sent the caller a BYE"
        );
        assert_eq!(
            &cdr_cause(&edge, &c.invite.call_id),
            cause,
            "{model}: CDR cause"
        );
    }
    // The healthy call got every frame while the others failed.
    thread::sleep(Duration::from_millis(300));
    healthy.hang_up();
    slow.hang_up();
    let mut healthy_conn = None;
    let seen = backend.drain(Duration::from_secs(2));
    for (_, j) in &seen {
        if j["ev"] == "start" && j["mode"] == "listen" {
            healthy_conn = j["conn"].as_u64();
        }
    }
    let healthy_conn = healthy_conn.expect("the healthy call's start");
    let frames = seen
        .iter()
        .filter(|(_, j)| j["ev"] == "media" && j["conn"].as_u64() == Some(healthy_conn))
        .count();
    assert_eq!(
        frames, 100,
        "the healthy call lost no frame while the others failed"
    );
    assert_eq!(cdr_cause(&edge, &healthy.invite.call_id), "normal");
    assert_eq!(cdr_cause(&edge, &slow.invite.call_id), "normal");
    let _keep = mute;
}

/// The events named `ev` among `seen`.
fn events<'a>(seen: &'a [(Instant, Value)], ev: &str) -> Vec<&'a Value> {
    seen.iter()
        .map(|(_, j)| j)
        .filter(|j| j["ev"] == ev)
        .collect()
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 200 concurrent stream calls (`TOLLGATE_STREAM_LOAD_CALLS` to change it),
/// 1 s of audio each way: every frame arrives in both directions; the
/// edge's RSS per stream is printed.
#[test]
fn concurrent_stream_calls_lose_no_frame() {
    let calls: usize = std::env::var("TOLLGATE_STREAM_LOAD_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    const FRAMES: usize = 50;
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, key) = edge_dir("streams-load");
    let backend = Backend::start(&TestDir::new("streams-load-backend"), "");
    let edge = stream_edge_in(
        dir,
        &[("", backend.url(&format!("/talk?frames={FRAMES}&quiet=1")))],
        RANGE_LOAD,
        "",
    );
    let idle = rss_kb(edge.pid());
    let mut callers: Vec<Caller> = (0..calls)
        .map(|_| Caller::call(&edge, &key, "load", 0))
        .collect();
    let started = backend.until(Duration::from_secs(60), {
        let n = std::sync::atomic::AtomicUsize::new(0);
        move |j| {
            j["ev"] == "start" && n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == calls
        }
    });
    assert!(started.iter().filter(|(_, j)| j["ev"] == "start").count() == calls);
    let busy = rss_kb(edge.pid());
    let talkers: Vec<thread::JoinHandle<Caller>> = callers
        .drain(..)
        .map(|mut c| {
            thread::spawn(move || {
                c.talk(0, FRAMES, 0);
                c
            })
        })
        .collect();
    let mut callers: Vec<Caller> = talkers.into_iter().map(|t| t.join().unwrap()).collect();
    thread::sleep(Duration::from_millis(500));
    let peak = rss_kb(edge.pid());
    for c in &mut callers {
        c.hang_up();
    }
    let seen = backend.drain(Duration::from_secs(3));
    let summaries: Vec<u64> = seen
        .iter()
        .filter(|(_, j)| j["ev"] == "summary")
        .map(|(_, j)| j["media"].as_u64().unwrap())
        .collect();
    assert_eq!(summaries.len(), calls, "every stream ended with a summary");
    assert!(
        summaries.iter().all(|n| *n == FRAMES as u64),
        "caller -> backend: frames per stream {summaries:?}"
    );
    for (i, c) in callers.iter().enumerate() {
        let n = c.received().iter().filter(|g| g.pt == 0).count();
        assert_eq!(n, FRAMES, "backend -> caller {i}: frames");
    }
    eprintln!(
        "{calls} streams: RSS idle {idle} KiB, streams up {busy} KiB, talking {peak} KiB: {:.1} KiB per stream",
        (peak.saturating_sub(idle)) as f64 / calls as f64
    );
}

/// An SRTP caller: the relay decrypts leg A for the stream and encrypts the
/// backend's audio for it; the backend sees the caller's audio byte for byte.
#[test]
fn srtp_caller_is_decrypted_for_the_stream_and_encrypted_back() {
    let (dir, key) = edge_dir("streams-srtp");
    let backend = Backend::start(&TestDir::new("streams-srtp-backend"), "");
    let edge = stream_edge_in(dir, &[("", backend.url("/talk?frames=10"))], RANGE_SRTP, "");
    let mut caller = Caller::call_with(&edge, &key, "m", 0, true, None);
    backend.next("start", Duration::from_secs(10));
    let seen = caller.talk_and_hang_up(&backend, 20, 0);
    let media = events(&seen, "media");
    assert_eq!(
        media.len(),
        20,
        "every SRTP frame reached the backend, decrypted"
    );
    for (i, m) in media.iter().enumerate() {
        assert_eq!(m["payload"].as_str().unwrap(), hex(&frame(i)), "frame {i}");
    }
    let got: Vec<Got> = caller
        .received()
        .into_iter()
        .filter(|g| g.pt == 0)
        .collect();
    assert_eq!(
        got.len(),
        10,
        "the backend's frames reached the caller as SRTP that verifies"
    );
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.payload, backend_frame(i), "frame {i}");
    }
}

/// wss://: rustls verifies the backend's certificate against `[tls]
/// ca_file` (and the web PKI roots); the stream then works as over ws://,
/// signature included, and the call's webhooks go out as for any call (a
/// stream that closes: `call.completed` with its cause). Without the CA the
/// same backend is a TLS failure.
#[test]
fn wss_backend_is_verified_with_the_tls_ca_file() {
    let pki = TestDir::new("streams-wss-pki");
    let (ca, cert, key_pem) = make_pki(pki.join("").as_path(), "wss");
    let (dir, key) = edge_dir("streams-wss");
    let backend = Backend::start_with(
        &TestDir::new("streams-wss-backend"),
        &webhook_secret(&key),
        &["--cert", &cert, "--key", &key_pem],
    );
    let url = format!("wss://127.0.0.1:{}/listen", backend.port);
    let hook = format!("https://127.0.0.1:{}/hook", backend.hook_port);
    let edge = stream_edge_in(
        dir,
        &[
            ("closes", format!("wss://127.0.0.1:{}/close?ms=200", backend.port)),
            ("", url.clone()),
        ],
        RANGE_WSS,
        &format!(
            "\n[tls]\nca_file = \"{ca}\"\n\n[webhooks]\nallow_cidrs = [\"127.0.0.1/32\"]\nca_file = \"{ca}\"\n"
        ),
    );
    let mut caller = Caller::call_with(&edge, &key, "tls", 0, false, Some(&hook));
    let (_, up) = backend.next("upgrade", Duration::from_secs(10));
    assert_eq!(up["signature_ok"], true, "signed over the wss:// URL: {up}");
    backend.next("start", Duration::from_secs(10));
    let seen = caller.talk_and_hang_up(&backend, 10, 0);
    assert_eq!(events(&seen, "media").len(), 10);
    assert_eq!(cdr_cause(&edge, &caller.invite.call_id), "normal");
    let webhook = |call: &Caller, kind: &str| {
        let a_call_id = call.invite.call_id.as_str();
        backend
            .logged(Duration::from_secs(15), |j| {
                j["ev"] == "webhook" && j["event"] == kind && j["body"]["sip_call_id"] == a_call_id
            })
            .unwrap_or_else(|| panic!("no {kind} webhook for {a_call_id}\n{}", backend.dump()))
    };
    webhook(&caller, "call.answered");
    assert_eq!(
        webhook(&caller, "call.completed")["body"]["cause"],
        "normal"
    );
    let mut closes = Caller::call_with(&edge, &key, "closes", 0, false, Some(&hook));
    assert!(
        closes.expect_bye(Duration::from_secs(10)),
        "BYE when the stream closed"
    );
    assert_eq!(
        webhook(&closes, "call.completed")["body"]["cause"],
        "stream_closed",
        "the webhook names the stream's end"
    );

    // The same backend, an edge that does not trust its CA.
    drop(edge);
    let (dir, key) = edge_dir("streams-wss-untrusted");
    let edge = stream_edge_in(dir, &[("", url)], RANGE_WSS, "");
    let mut caller = Caller::call(&edge, &key, "tls", 0);
    assert!(
        caller.expect_bye(Duration::from_secs(10)),
        "BYE after the TLS failure"
    );
    assert_eq!(
        cdr_cause(&edge, &caller.invite.call_id),
        "stream_tls_failed"
    );
}

/// A bad stream route stops `serve` before it listens: exit code 2 and a
/// message naming the field.
#[test]
fn bad_stream_routes_are_refused_naming_the_field() {
    let dir = TestDir::new("streams-config");
    let data = dir.join("data");
    for (route, field, why) in [
        (
            "target = \"wss://u:p@ai.example.com/\"",
            "routes[0]",
            "credentials",
        ),
        ("target = \"ws://\"", "routes[0]", "URL"),
        (
            "target = \"wss://ai.example.com/\"\nmedia = \"srtp\"",
            "routes[0].media",
            "plain RTP",
        ),
    ] {
        let cfg = dir.join("bad.toml");
        std::fs::write(
            &cfg,
            format!("[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\n[[routes]]\n{route}\n"),
        )
        .unwrap();
        let args = [
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        let o = tollgate(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}", describe_output(&args, &o));
        assert!(err.contains(field) && err.contains(why), "{route}: {err}");
    }
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\n[streams]\nallow_cidrs = [\"nope\"]\n",
    )
    .unwrap();
    let o = tollgate(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("streams.allow_cidrs"));
}
