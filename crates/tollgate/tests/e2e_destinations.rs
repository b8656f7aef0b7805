//! Destinations (SPEC §9, issue 14): prefix routes toward carriers with the
//! canonical number in the Request-URI and digest answered on leg B; several
//! targets per route with failover and OPTIONS health; targets named by DNS
//! (RFC 3263) served by a dnsmasq the test starts on loopback; TLS toward
//! leg B, checked by an independent TLS SIP peer (Python's `ssl`,
//! `tests/dest_support/tls_uas.py`), with SRTP keys over it.
//!
//! cargo test -p tollgate --test e2e_destinations
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const CALLER: &str = "+14155550123";

/// How a [`Carrier`] treats INVITE and OPTIONS.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(u8)]
enum Mode {
    /// INVITE -> 200 with SDP; OPTIONS -> 200.
    Answer = 0,
    /// INVITE without valid digest -> 401 (qop=auth, MD5), with -> 200.
    Digest = 1,
    /// INVITE and OPTIONS -> 503.
    Unavailable = 2,
    /// Nothing answered at all.
    Silent = 3,
    /// INVITE -> 503, OPTIONS -> 200 (a target whose pings pass).
    InviteUnavailable = 4,
    /// INVITE unanswered, OPTIONS -> 200.
    InviteSilent = 5,
}

/// A scripted carrier gateway on 127.0.0.1:<ephemeral> (UDP) that records
/// every request; its mode can change while the test runs.
struct Carrier {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<SipMsg>>>,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

const CARRIER_REALM: &str = "carrier.test";

impl Carrier {
    fn start(mode: Mode, user: &'static str, pass: &'static str) -> Carrier {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mode_cell = Arc::new(AtomicU8::new(mode as u8));
        let (rx, st, md) = (received.clone(), stop.clone(), mode_cell.clone());
        let handle = thread::spawn(move || {
            let mut buf = vec![0u8; 70000];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, src)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some(m) = SipMsg::parse(&buf[..n]) else {
                    continue;
                };
                rx.lock().unwrap().push(m.clone());
                if m.is_response() {
                    continue;
                }
                let mode = md.load(Ordering::Relaxed);
                let tag = format!(
                    "gw{}",
                    &hex(&sha256(m.call_id().unwrap_or("").as_bytes()))[..8]
                );
                let send = |b: Vec<u8>| {
                    let _ = sock.send_to(&b, src);
                };
                let method = m.method().unwrap_or("").to_string();
                let invite_or_ping = method == "INVITE" || method == "OPTIONS";
                if (mode == Mode::Silent as u8 && invite_or_ping)
                    || (mode == Mode::InviteSilent as u8 && method == "INVITE")
                {
                    continue;
                }
                if (mode == Mode::Unavailable as u8 && invite_or_ping)
                    || (mode == Mode::InviteUnavailable as u8 && method == "INVITE")
                {
                    send(make_response(&m, 503, "Service Unavailable", &tag, "", ""));
                    continue;
                }
                match method.as_str() {
                    "INVITE" => {
                        if mode == Mode::Digest as u8 && !digest_ok(&m, user, pass) {
                            let nonce = format!("n{}", &tag[2..]);
                            let ch = format!(
                                "WWW-Authenticate: Digest realm=\"{CARRIER_REALM}\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\", opaque=\"op1\"\r\n"
                            );
                            send(make_response(&m, 401, "Unauthorized", &tag, &ch, ""));
                            continue;
                        }
                        let contact = format!("Contact: <sip:gw@{addr}>\r\n");
                        let sdp = format!("v=0\r\no=gw 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n", addr.port() + 2);
                        send(make_response(&m, 200, "OK", &tag, &contact, &sdp));
                    }
                    "ACK" => {}
                    _ => send(make_response(&m, 200, "OK", &tag, "", "")),
                }
            }
        });
        Carrier {
            addr,
            received,
            mode: mode_cell,
            stop,
            handle: Some(handle),
        }
    }

    fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::Relaxed);
    }

    fn requests(&self, method: &str) -> Vec<SipMsg> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.method() == Some(method))
            .cloned()
            .collect()
    }
}

impl Carrier {
    /// INVITE transactions received (retransmissions counted once).
    fn invites(&self) -> usize {
        let mut seen: Vec<(String, String)> = self
            .requests("INVITE")
            .iter()
            .map(|m| {
                (
                    m.call_id().unwrap_or("").into(),
                    m.via_branch().unwrap_or_default(),
                )
            })
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The carrier's own check of an INVITE's `Authorization` (independent of
/// the edge's digest code: common's RFC 2617 implementation).
fn digest_ok(m: &SipMsg, user: &str, pass: &str) -> bool {
    let Some(v) = m.header("authorization") else {
        return false;
    };
    let (scheme, p) = parse_challenge(v);
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    if !scheme.eq_ignore_ascii_case("digest")
        || get("username") != user
        || get("realm") != CARRIER_REALM
        || get("opaque") != "op1"
        || get("qop") != "auth"
        || Some(get("uri").as_str()) != m.ruri()
    {
        return false;
    }
    let want = digest_response(
        "MD5",
        user,
        CARRIER_REALM,
        pass,
        "INVITE",
        &get("uri"),
        &get("nonce"),
        &get("nc"),
        &get("cnonce"),
    );
    want == get("response")
}

/// Places a call from leg A to `dialed` with a bearer token for
/// `canonical`; answered calls are hung up. Returns the final status.
fn call(edge: &Edge, dialed: &str, canonical: &str) -> u16 {
    let tok = mint(&edge.first_key(), canonical, CALLER, &[]);
    let mut ua = UdpUa::new(edge.sip_udp);
    let req = Req::invite(edge.sip_udp, dialed, CALLER).bearer(&tok);
    let fin = ua.call(&req);
    let code = fin.code().unwrap_or(0);
    if code == 200 {
        assert_eq!(
            ua.ack_and_bye(&req, &fin),
            Some(200),
            "BYE of the call to {dialed}"
        );
    }
    code
}

/// CDR lines written so far.
fn cdrs(edge: &Edge) -> Vec<Json> {
    std::fs::read_to_string(edge.data_dir.join("cdrs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(Json::parse)
        .collect()
}

fn route_block(prefix: &str, target: &str, extra: &str) -> String {
    format!("[[routes]]\nprefix = \"{prefix}\"\ntarget = \"{target}\"\nmedia = \"rtp\"\n{extra}\n")
}

#[test]
fn prefix_routes_send_the_canonical_number_and_answer_the_carriers_digest() {
    const USER: &str = "trunk44";
    const PASS: &str = "carrier44-Secret-pw";
    let uk = Carrier::start(Mode::Digest, USER, PASS);
    let us = Carrier::start(Mode::Answer, "-", "-");
    let toml = route_block(
        "+44",
        &format!("sip:{}", uk.addr),
        &format!("[routes.auth]\nusername = \"{USER}\"\npassword = \"{PASS}\"\n"),
    ) + &route_block("+1", &format!("sip:{}", us.addr), "");
    let edge = Edge::start(EdgeConfig {
        extra_toml: toml,
        ..Default::default()
    });

    // International prefix 011, then 44: the +44 carrier, canonical R-URI,
    // after one 401 answered with the route's credentials.
    assert_eq!(call(&edge, "011442079460000", "+442079460000"), 200);
    let invites = uk.requests("INVITE");
    assert_eq!(invites.len(), 2, "one challenged INVITE, one answered");
    for inv in &invites {
        assert_eq!(
            inv.ruri(),
            Some(format!("sip:+442079460000@{}", uk.addr).as_str()),
            "{}",
            inv.text()
        );
    }
    assert!(invites[0].header("authorization").is_none());
    assert!(digest_ok(&invites[1], USER, PASS), "{}", invites[1].text());
    assert_eq!(invites[0].call_id(), invites[1].call_id(), "one call");
    let (c0, c1) = (invites[0].cseq().unwrap().0, invites[1].cseq().unwrap().0);
    assert_eq!(c1, c0 + 1, "CSeq goes up (RFC 3261 §22.2)");
    let acks = uk.requests("ACK");
    assert!(
        acks.iter().any(|a| a.cseq().map(|c| c.0) == Some(c1)),
        "the 2xx is ACKed with the answered INVITE's CSeq: {acks:?}",
        acks = acks.iter().map(SipMsg::text).collect::<Vec<_>>()
    );
    assert!(us.requests("INVITE").is_empty());

    // A national US number: the +1 carrier, no challenge there.
    assert_eq!(call(&edge, "4155550100", "+14155550100"), 200);
    let invites = us.requests("INVITE");
    assert_eq!(invites.len(), 1);
    assert_eq!(
        invites[0].ruri(),
        Some(format!("sip:+14155550100@{}", us.addr).as_str())
    );
    assert!(invites[0].header("authorization").is_none());

    // One CDR per call, the challenge retry is not a call of its own.
    let lines = poll(Duration::from_secs(10), || {
        let c = cdrs(&edge);
        (c.len() >= 2).then_some(c)
    })
    .expect("two CDRs");
    thread::sleep(Duration::from_millis(600));
    assert_eq!(cdrs(&edge).len(), 2, "{lines:?}");

    // The carrier's password is nowhere in the edge's output.
    let out = edge.stdout_lines.lock().unwrap().join("\n");
    let err = std::fs::read_to_string(&edge.stderr_path).unwrap_or_default();
    assert!(!out.contains(PASS) && !err.contains(PASS));
}

#[test]
fn wrong_carrier_credentials_end_the_call_without_a_loop() {
    let uk = Carrier::start(Mode::Digest, "trunk44", "the-right-one");
    let toml = route_block(
        "+44",
        &format!("sip:{}", uk.addr),
        "[routes.auth]\nusername = \"trunk44\"\npassword = \"a-wrong-one\"\n",
    );
    let edge = Edge::start(EdgeConfig {
        extra_toml: toml,
        ..Default::default()
    });
    let code = call(&edge, "+442079460000", "+442079460000");
    assert!(code >= 400, "refused, got {code}");
    assert_ne!(code, 401, "leg A must not see the carrier's challenge");
    assert_eq!(uk.requests("INVITE").len(), 2, "one answer, no retry loop");
}

fn target_up(edge: &Edge, target: &str) -> Option<f64> {
    metric_sum(
        &scrape(edge.metrics_addr()),
        "tollgate_route_target_up",
        &[("target", target)],
    )
}

/// Two targets, the first failing its INVITEs as `invites` (its pings
/// still pass): every call completes on the second with one CDR each. Then
/// it fails as `down` and its pings mark it down (calls go straight to the
/// second), and up again once it answers (calls use it again).
fn failover(invites: Mode, down: Mode) {
    let first = Carrier::start(invites, "-", "-");
    let second = Carrier::start(Mode::Answer, "-", "-");
    let (t1, t2) = (
        format!("sip:{}", first.addr),
        format!("sip:{}", second.addr),
    );
    let toml = format!(
        "[[routes]]\ntargets = [\"{t1}\", \"{t2}\"]\nmedia = \"rtp\"\noptions_ping_s = 1\n"
    );
    let edge = Edge::start(EdgeConfig {
        extra_toml: toml,
        // Timer B (64*T1) of a silent first target: 1.28 s.
        t1_ms: Some(20),
        ..Default::default()
    });
    const CALLS: usize = 3;
    // Metrics name targets by their place in the configuration.
    const L1: &str = "routes[0].targets[0]";
    const L2: &str = "routes[0].targets[1]";
    for i in 0..CALLS {
        assert_eq!(call(&edge, "+14155550100", "+14155550100"), 200, "call {i}");
    }
    assert_eq!(second.invites(), CALLS);
    let tried_first = first.invites();
    assert!(tried_first >= CALLS, "the first target is tried first");
    let cdr_lines = poll(Duration::from_secs(10), || {
        let c = cdrs(&edge);
        (c.len() >= CALLS).then_some(c)
    })
    .expect("a CDR per call");
    assert_eq!(cdr_lines.len(), CALLS, "one CDR per call, not per attempt");

    // The pings mark the first target down: calls no longer try it.
    assert_eq!(target_up(&edge, L1), Some(1.0), "pings passed so far");
    first.set_mode(down);
    poll(Duration::from_secs(15), || {
        (target_up(&edge, L1) == Some(0.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("{t1} not marked down: {:?}", target_up(&edge, L1)));
    assert_eq!(target_up(&edge, L2), Some(1.0));
    let before = first.invites();
    assert_eq!(call(&edge, "+14155550100", "+14155550100"), 200);
    assert_eq!(first.invites(), before, "a target down is skipped");
    assert_eq!(second.invites(), CALLS + 1);

    // It answers again: marked up, used again.
    first.set_mode(Mode::Answer);
    poll(Duration::from_secs(15), || {
        (target_up(&edge, L1) == Some(1.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("{t1} not marked up again"));
    assert_eq!(call(&edge, "+14155550100", "+14155550100"), 200);
    assert_eq!(first.invites(), before + 1, "used again");
    assert_eq!(second.invites(), CALLS + 1);
    assert!(!first.requests("OPTIONS").is_empty() && !second.requests("OPTIONS").is_empty());
    let failures = metric_sum(
        &scrape(edge.metrics_addr()),
        "tollgate_route_target_failures_total",
        &[("target", L1)],
    );
    assert!(
        failures.unwrap_or(0.0) >= tried_first as f64,
        "{failures:?}"
    );
}

#[test]
fn a_first_target_answering_503_fails_over_and_is_marked_down_then_up() {
    failover(Mode::InviteUnavailable, Mode::Unavailable);
}

#[test]
fn a_silent_first_target_fails_over_and_is_marked_down_then_up() {
    failover(Mode::InviteSilent, Mode::Silent);
}

// ---------------------------------------------------------------------------
// DNS (RFC 3263): dnsmasq on loopback, authoritative for the test's names,
// forwarding nothing (--no-resolv: never a real resolver).
// ---------------------------------------------------------------------------

fn dnsmasq_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}

/// A dnsmasq on 127.0.0.1:<free port> serving `records` (dnsmasq options
/// such as `--srv-host=...`) with TTL `ttl`; killed on drop. Panics when
/// dnsmasq is missing (scripts/test.sh installs dnsmasq-base): never skips.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    fn start(records: &[String], ttl: u32) -> Dnsmasq {
        Dnsmasq::start_on(records, ttl, ([127, 0, 0, 1], alloc_ports().sip).into())
    }

    /// As [`Dnsmasq::start`], on `addr` (a server replaced in place).
    fn start_on(records: &[String], ttl: u32, addr: SocketAddr) -> Dnsmasq {
        let port = addr.port();
        let child = Command::new(dnsmasq_bin())
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--log-facility=-",
                "--log-queries",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={ttl}"))
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run dnsmasq ({e}): install dnsmasq-base (scripts/test.sh does)")
            });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        poll(Duration::from_secs(10), || {
            udp_listening(port).then_some(())
        })
        .expect("dnsmasq listening");
        Dnsmasq { child, addr }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NAPTR (SIP+D2U) -> SRV -> A records putting `name` at 127.0.0.1:`port`.
fn sip_records(name: &str, port: u16) -> Vec<String> {
    vec![
        format!("--naptr-record={name},10,50,s,SIP+D2U,,_sip._udp.{name}"),
        format!("--srv-host=_sip._udp.{name},gw.{name},{port},10,100"),
        format!("--host-record=gw.{name},127.0.0.1"),
    ]
}

#[test]
fn dns_named_targets_are_located_by_naptr_srv_a_and_unresolvable_ones_get_503() {
    let gw = Carrier::start(Mode::Answer, "-", "-");
    let gw2 = Carrier::start(Mode::Answer, "-", "-");
    let dns = Dnsmasq::start(&sip_records("carrier.test", gw.addr.port()), 1);
    let toml = format!(
        "[dns]\nservers = [\"{}\"]\n\n\
         [[routes]]\nprefix = \"+1\"\ntargets = [\"sip:nowhere.test\", \"sip:carrier.test\"]\nmedia = \"rtp\"\noptions_ping_s = 0\n\n\
         [[routes]]\nprefix = \"+44\"\ntarget = \"sip:nowhere.test\"\nmedia = \"rtp\"\n",
        dns.addr
    );
    let edge = Edge::start(EdgeConfig {
        extra_toml: toml,
        ..Default::default()
    });

    // The name that resolves is used (the unresolvable first one skipped),
    // the Request-URI keeps the name (RFC 3263 §4: only the transport,
    // address and port come from DNS).
    let reached = poll(Duration::from_secs(15), || {
        (call(&edge, "+14155550100", "+14155550100") == 200 && gw.invites() > 0).then_some(())
    });
    assert!(reached.is_some(), "no call reached carrier.test via DNS");
    let inv = gw.requests("INVITE").pop().unwrap();
    assert_eq!(
        inv.ruri(),
        Some("sip:+14155550100@carrier.test"),
        "{}",
        inv.text()
    );

    // A route whose only target does not resolve: 503 at once, no hang.
    let t0 = std::time::Instant::now();
    assert_eq!(call(&edge, "+442079460000", "+442079460000"), 503);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // The records change (TTL 1 s): calls follow the new SRV within a few TTLs.
    drop(dns);
    let _dns = Dnsmasq::start_on(
        &sip_records("carrier.test", gw2.addr.port()),
        1,
        edge_dns(&edge),
    );
    let moved = poll(Duration::from_secs(20), || {
        (call(&edge, "+14155550100", "+14155550100") == 200 && gw2.invites() > 0).then_some(())
    });
    assert!(moved.is_some(), "calls did not follow the new SRV record");
}

/// The `[dns] servers` address of an edge's config file.
fn edge_dns(edge: &Edge) -> SocketAddr {
    let text = std::fs::read_to_string(&edge.config_path).unwrap();
    let line = text.lines().find(|l| l.starts_with("servers = ")).unwrap();
    line.split('"').nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------
// TLS toward leg B: certificates from rcgen, a Python ssl UAS.
// ---------------------------------------------------------------------------

/// A test CA and a server certificate for `names` signed by it, written to
/// `dir`: (ca.pem, server.pem, server.key).
fn test_pki(dir: &TestDir, names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "tollgate dest test CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut leaf = CertificateParams::new(sans).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    (s(paths.0), s(paths.1), s(paths.2))
}

/// `tests/dest_support/tls_uas.py` running; its JSON events collected.
struct TlsUas {
    child: Child,
    addr: SocketAddr,
    events: Arc<Mutex<Vec<Json>>>,
}

impl TlsUas {
    fn start(cert: &str, key: &str) -> TlsUas {
        let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = manifest_dir()
            .join("tests")
            .join("dest_support")
            .join("tls_uas.py");
        let mut child = Command::new(&python)
            .arg(script)
            .args(["--cert", cert, "--key", key])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} tls_uas.py: {e}"));
        let out = child.stdout.take().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(j) = Json::parse(&line) {
                    ev.lock().unwrap().push(j);
                }
            }
        });
        let addr = poll(Duration::from_secs(15), || {
            events.lock().unwrap().iter().find_map(|e| {
                (e.str("ev") == Some("ready")).then(|| e.str("addr").unwrap().parse().unwrap())
            })
        })
        .expect("tls_uas.py ready");
        TlsUas {
            child,
            addr,
            events,
        }
    }

    fn events(&self, kind: &str) -> Vec<Json> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.str("ev") == Some(kind))
            .cloned()
            .collect()
    }
}

impl Drop for TlsUas {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NAPTR (SIPS+D2T) -> SRV -> A for `name` at 127.0.0.1:`port`.
fn sips_records(name: &str, port: u16, naptr: bool) -> Vec<String> {
    let mut v = vec![
        format!("--srv-host=_sips._tcp.{name},host.{name},{port},10,100"),
        format!("--host-record=host.{name},127.0.0.1"),
    ];
    if naptr {
        v.push(format!(
            "--naptr-record={name},10,50,s,SIPS+D2T,,_sips._tcp.{name}"
        ));
    }
    v
}

fn tls_edge(dns: &Dnsmasq, ca: Option<&str>) -> Edge {
    let tls = ca.map_or(String::new(), |c| format!("[tls]\nca_file = \"{c}\"\n\n"));
    let toml = format!(
        "[dns]\nservers = [\"{}\"]\n\n{tls}\
         [[routes]]\ntarget = \"sips:agent@backend.test\"\nmedia = \"srtp\"\n\n\
         [[routes]]\nprefix = \"+44\"\ntarget = \"sips:agent@wrong.test\"\nmedia = \"srtp\"\n",
        dns.addr
    );
    Edge::start(EdgeConfig {
        extra_toml: toml,
        ..Default::default()
    })
}

#[test]
fn bearer_calls_reach_a_dns_named_tls_target_with_srtp_and_bad_certificates_get_503() {
    require_sipp();
    let dir = TestDir::new("tls-dest");
    let (ca, cert, key) = test_pki(&dir, &["backend.test"]);
    let uas = TlsUas::start(&cert, &key);
    // The same certificate (backend.test only) behind another name.
    let wrong = TlsUas::start(&cert, &key);
    let mut records = sips_records("backend.test", uas.addr.port(), true);
    records.extend(sips_records("wrong.test", wrong.addr.port(), false));
    let dns = Dnsmasq::start(&records, 30);
    let edge = tls_edge(&dns, Some(&ca));

    const CALLS: u32 = 20;
    let tokens = mint_many(&edge.first_key(), SERVICE, "sipp", CALLS as usize);
    write_inf(&dir.join("tokens.csv"), &tokens);
    let uac = Sipp::new(&dir.path, "uac", "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&dir.join("tokens.csv"))
        .calls(CALLS)
        .rate(10)
        .pause_ms(200)
        .args(&[
            "-recv_timeout",
            "15s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(120))
        .run();
    uac.assert_calls_ok(CALLS as u64);
    let invites = uas.events("invite");
    assert_eq!(
        invites.len(),
        CALLS as usize,
        "every call reached the TLS peer"
    );
    for inv in &invites {
        assert_eq!(inv.str("ruri"), Some("sips:agent@backend.test"));
        // SRTP toward a TLS target needs no sdes_over_cleartext.
        assert_eq!(inv.get("savp"), Some(&Json::Bool(true)), "{inv:?}");
        assert_eq!(inv.get("crypto"), Some(&Json::Bool(true)), "{inv:?}");
        assert!(
            inv.str("contact").is_some_and(|c| c.contains("sips:")),
            "{inv:?}"
        );
    }
    let byes = poll(Duration::from_secs(10), || {
        let b = uas.events("bye");
        (b.len() == CALLS as usize).then_some(b)
    });
    assert!(byes.is_some(), "a BYE per call over TLS");
    let conns = uas.events("conn");
    assert!(
        !conns.is_empty() && conns.len() <= 2,
        "one connection reused by the calls, got {}",
        conns.len()
    );
    assert!(
        conns.iter().all(|c| c.str("sni") == Some("backend.test")),
        "SNI names the target: {conns:?}"
    );

    // SRTP that libsrtp decrypts at the destination: RTP from leg A,
    // encrypted by the edge toward the TLS peer with the key it offered there.
    let payloads = srtp_reaches_the_tls_peer(&edge, &uas);
    assert!(payloads >= 5, "libsrtp decrypted {payloads} packets");
    assert!(
        uas.events("srtp_error").is_empty(),
        "{:?}",
        uas.events("srtp_error")
    );

    // A certificate that does not name the target (wrong.test): refused,
    // leg A gets 503 quickly, the peer never sees an INVITE.
    let t0 = std::time::Instant::now();
    assert_eq!(call(&edge, "+442079460000", "+442079460000"), 503);
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(wrong.events("invite").is_empty());

    // An edge that does not trust the test CA: refused too.
    let untrusting = tls_edge(&dns, None);
    let before = uas.events("invite").len();
    assert_eq!(call(&untrusting, "+14155550100", "+14155550100"), 503);
    assert_eq!(uas.events("invite").len(), before);
}

/// One call from a leg A that sends 10 RTP packets (payload = 160 bytes of
/// the packet's index); returns how many the TLS peer decrypted with libsrtp
/// to exactly that payload.
fn srtp_reaches_the_tls_peer(edge: &Edge, uas: &TlsUas) -> usize {
    let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = rtp.local_addr().unwrap().port();
    let tok = mint(&edge.first_key(), SERVICE, "sipp", &[]);
    let mut ua = UdpUa::new(edge.sip_udp);
    let mut req = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&tok);
    req.body = format!("v=0\r\no=a 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").into_bytes();
    let fin = ua.call(&req);
    assert_eq!(fin.code(), Some(200), "{}", fin.text());
    ua.send(&req.in_dialog(&fin, "ACK", req.cseq));
    let sdp = String::from_utf8_lossy(&fin.body).into_owned();
    let ip = sdp
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))
        .expect("c= in the answer")
        .trim()
        .to_owned();
    let media_port: u16 = sdp
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .expect("m= in the answer");
    let before = uas.events("rtp").len();
    for i in 0..10u16 {
        let mut pkt = vec![0x80, 0x00];
        pkt.extend_from_slice(&(100 + i).to_be_bytes());
        pkt.extend_from_slice(&(u32::from(i) * 160).to_be_bytes());
        pkt.extend_from_slice(&0x1122_3344u32.to_be_bytes());
        pkt.extend_from_slice(&[i as u8; 160]);
        rtp.send_to(&pkt, (ip.as_str(), media_port)).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    let got = poll(Duration::from_secs(5), || {
        let v = uas.events("rtp");
        (v.len() >= before + 5).then_some(v)
    })
    .unwrap_or_default();
    let bye = req.in_dialog(&fin, "BYE", req.cseq + 1);
    assert_eq!(
        ua.transact(&bye, Duration::from_secs(10))
            .and_then(|o| o.fin.code()),
        Some(200)
    );
    got.iter()
        .skip(before)
        .filter(|e| {
            let p = e.str("payload").unwrap_or("");
            p.len() == 320
                && p == hex(&[p
                    .get(..2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
                    .unwrap_or(255); 160])
        })
        .count()
}
