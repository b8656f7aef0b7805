//! Malformed and odd-but-valid messages from `tests/corpus/*.sip` (RFC 4475
//! categories), over UDP and TCP. After every message the edge must still
//! answer OPTIONS with 200, and must never exit.
//!
//! Corpus file format: leading `;; key: value` lines (stripped before
//! sending), then the message. Keys: `expect` (UDP, and TCP unless
//! `expect-tcp` is given), `expect-tcp`, `transport` (udp|tcp|both, default
//! both), `crlf` (`keep` = send bytes as they are; default: bare LF -> CRLF),
//! `desc`. Expectations are `|`-separated: a status code, `none` (no
//! response), `close` (TCP: connection closed without a response).
//! Placeholders: {EDGE} {LOCAL} {TRANSPORT} {BRANCH} {CALLID} {TAG} {CL}
//! ({CL} = byte length of the body after the first blank line).
//!
//! "none" is decided with a barrier: an OPTIONS on another socket must be
//! answered first, then 300 ms more of silence on the case's socket.
//!
//! cargo test -p tollgate --test e2e_malformed
mod common;
use common::*;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Code(u16),
    None,
    Close,
}

#[derive(Debug)]
struct Case {
    name: String,
    desc: String,
    udp: Vec<Expect>,
    tcp: Vec<Expect>,
    over_udp: bool,
    over_tcp: bool,
    keep: bool,
    template: Vec<u8>,
}

fn parse_expect(s: &str) -> Vec<Expect> {
    s.split('|')
        .map(|t| match t.trim() {
            "none" => Expect::None,
            "close" => Expect::Close,
            c => Expect::Code(
                c.parse()
                    .unwrap_or_else(|_| panic!("bad expectation {c:?}")),
            ),
        })
        .collect()
}

fn load_corpus() -> Vec<Case> {
    let mut v = vec![];
    let mut paths: Vec<_> = fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sip"))
        .collect();
    paths.sort();
    for p in paths {
        let data = fs::read(&p).unwrap();
        let mut rest = &data[..];
        let mut kv = std::collections::HashMap::new();
        while rest.starts_with(b";;") {
            let end = rest
                .iter()
                .position(|b| *b == b'\n')
                .expect("header line ends");
            let line = String::from_utf8_lossy(&rest[2..end]).to_string();
            if let Some((k, val)) = line.split_once(':') {
                kv.insert(k.trim().to_string(), val.trim().to_string());
            }
            rest = &rest[end + 1..];
        }
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        let exp = kv
            .get("expect")
            .unwrap_or_else(|| panic!("{name}: no `;; expect:` line"));
        let udp = parse_expect(exp);
        let tcp = kv
            .get("expect-tcp")
            .map(|s| parse_expect(s))
            .unwrap_or_else(|| udp.clone());
        let tr = kv.get("transport").map(String::as_str).unwrap_or("both");
        v.push(Case {
            name,
            desc: kv.get("desc").cloned().unwrap_or_default(),
            udp,
            tcp,
            over_udp: tr != "tcp",
            over_tcp: tr != "udp",
            keep: kv.get("crlf").is_some_and(|c| c == "keep"),
            template: rest.to_vec(),
        });
    }
    v
}

fn replace_all(h: &[u8], from: &str, to: &str) -> Vec<u8> {
    let f = from.as_bytes();
    let mut out = Vec::with_capacity(h.len());
    let mut i = 0;
    while i < h.len() {
        if h[i..].starts_with(f) {
            out.extend_from_slice(to.as_bytes());
            i += f.len();
        } else {
            out.push(h[i]);
            i += 1;
        }
    }
    out
}

impl Case {
    fn render(&self, edge: SocketAddr, local: SocketAddr, transport: &str) -> (Vec<u8>, String) {
        let call_id = unique("corpus-") + "@tgtest";
        let mut b = self.template.clone();
        if !self.keep {
            let mut o = Vec::with_capacity(b.len() + 64);
            for (i, c) in b.iter().enumerate() {
                if *c == b'\n' && (i == 0 || b[i - 1] != b'\r') {
                    o.push(b'\r');
                }
                o.push(*c);
            }
            b = o;
        }
        for (k, v) in [
            ("{EDGE}", edge.to_string()),
            ("{LOCAL}", local.to_string()),
            ("{TRANSPORT}", transport.to_string()),
            ("{BRANCH}", unique("z9hG4bK-c")),
            ("{CALLID}", call_id.clone()),
            ("{TAG}", unique("t")),
        ] {
            b = replace_all(&b, k, &v);
        }
        if find(&b, b"{CL}").is_some() {
            // the blank line ending the head comes after any leading CRLFs
            let lead = b
                .iter()
                .take_while(|c| **c == b'\r' || **c == b'\n')
                .count();
            let rest = &b[lead..];
            let body = find(rest, b"\r\n\r\n")
                .map(|p| rest.len() - p - 4)
                .or_else(|| find(rest, b"\n\n").map(|p| rest.len() - p - 2))
                .unwrap_or(0);
            b = replace_all(&b, "{CL}", &body.to_string());
        }
        (b, call_id)
    }
}

fn describe(got: &Option<u16>, closed: bool) -> String {
    match (got, closed) {
        (Some(c), _) => c.to_string(),
        (None, true) => "close".into(),
        (None, false) => "none".into(),
    }
}

fn allowed(exp: &[Expect], got: Option<u16>, closed: bool) -> bool {
    match got {
        Some(c) => exp.contains(&Expect::Code(c)),
        None if closed => exp.contains(&Expect::Close),
        None => exp.contains(&Expect::None),
    }
}

fn ack_for(sent: &[u8], resp: &SipMsg) -> Option<Vec<u8>> {
    // ACK a non-2xx final response to an INVITE (RFC 3261 17.1.1.3)
    let (n, m) = resp.cseq()?;
    if m != "INVITE" || resp.code()? < 300 {
        return None;
    }
    let sent = SipMsg::parse(sent)?;
    let ruri = sent.ruri()?.to_string();
    Some(
        format!(
            "ACK {ruri} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {n} ACK\r\nContent-Length: 0\r\n\r\n",
            resp.top_via()?,
            resp.header("from")?,
            resp.header("to")?,
            resp.call_id()?
        )
        .into_bytes(),
    )
}

/// OPTIONS over UDP from a fresh socket; Some(code).
fn probe_udp(edge: SocketAddr) -> Option<u16> {
    let mut ua = UdpUa::new(edge);
    ua.options_code(Duration::from_secs(5))
}

fn probe_tcp(edge: SocketAddr) -> Option<u16> {
    let mut ua = TcpUa::connect(edge);
    let r = Req::options(edge).tcp();
    ua.transact(&r, Duration::from_secs(5))
        .and_then(|o| o.fin.code())
}

fn first_final_udp(sock: &UdpSocket, timeout: Duration) -> Option<SipMsg> {
    let end = Instant::now() + timeout;
    let mut buf = vec![0u8; 70000];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            return None;
        };
        let Some(m) = SipMsg::parse(&buf[..n]) else {
            continue;
        };
        if m.code().is_some_and(|c| c >= 200) {
            return Some(m);
        }
    }
}

fn run_udp(edge: &mut Edge, cases: &[Case]) -> Vec<String> {
    let mut failures = vec![];
    for c in cases.iter().filter(|c| c.over_udp) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (bytes, _) = c.render(edge.sip_udp, sock.local_addr().unwrap(), "UDP");
        assert!(bytes.len() <= 65507, "{} too big for UDP", c.name);
        sock.send_to(&bytes, edge.sip_udp).unwrap();
        let wants_response_only = !c.udp.contains(&Expect::None);
        let got = if wants_response_only {
            first_final_udp(&sock, Duration::from_secs(5))
        } else {
            let p = probe_udp(edge.sip_udp);
            if p != Some(200) {
                failures.push(format!("[udp {}] barrier OPTIONS got {p:?}", c.name));
            }
            first_final_udp(&sock, Duration::from_millis(300))
        };
        let code = got.as_ref().and_then(|m| m.code());
        if let Some(m) = &got {
            if let Some(ack) = ack_for(&bytes, m) {
                let _ = sock.send_to(&ack, edge.sip_udp);
            }
        }
        if !allowed(&c.udp, code, false) {
            failures.push(format!(
                "[udp {}] ({}) expected {:?}, got {}{}",
                c.name,
                c.desc,
                c.udp,
                describe(&code, false),
                got.map(|m| format!(": {}", m.start)).unwrap_or_default()
            ));
        }
        let p = probe_udp(edge.sip_udp);
        if p != Some(200) {
            failures.push(format!(
                "[udp {}] edge no longer answers OPTIONS (got {p:?}), running={}",
                c.name,
                edge.is_running()
            ));
            if !edge.is_running() {
                failures.push(format!(
                    "edge EXITED after udp {}: {:?}",
                    c.name,
                    edge.exit_status()
                ));
                break;
            }
        }
    }
    failures
}

fn run_tcp(edge: &mut Edge, cases: &[Case]) -> Vec<String> {
    let mut failures = vec![];
    let addr = edge.tcp();
    for c in cases.iter().filter(|c| c.over_tcp) {
        let mut ua = TcpUa::connect(addr);
        let (bytes, _) = c.render(addr, ua.local, "TCP");
        let _ = ua.send_raw(&bytes);
        let wants_response_only = !c.tcp.contains(&Expect::None);
        let read = |ua: &mut TcpUa, t: Duration| -> (Option<SipMsg>, bool) {
            let end = Instant::now() + t;
            loop {
                match ua.read_msg(end.saturating_duration_since(Instant::now())) {
                    TcpRead::Msg(m) if m.code().is_some_and(|c| c >= 200) => {
                        return (Some(m), false)
                    }
                    TcpRead::Msg(_) => continue,
                    TcpRead::Closed => return (None, true),
                    TcpRead::Timeout => return (None, false),
                }
            }
        };
        let (got, closed) = if wants_response_only {
            read(&mut ua, Duration::from_secs(5))
        } else {
            let p = probe_tcp(addr);
            if p != Some(200) {
                failures.push(format!("[tcp {}] barrier OPTIONS got {p:?}", c.name));
            }
            read(&mut ua, Duration::from_millis(300))
        };
        let code = got.as_ref().and_then(|m| m.code());
        if let Some(m) = &got {
            if let Some(ack) = ack_for(&bytes, m) {
                let _ = ua.send_raw(&ack);
            }
        }
        // for `none` cases a closed connection is also silence
        let ok = allowed(&c.tcp, code, closed)
            || (code.is_none() && closed && c.tcp.contains(&Expect::None));
        if !ok {
            failures.push(format!(
                "[tcp {}] ({}) expected {:?}, got {}{}",
                c.name,
                c.desc,
                c.tcp,
                describe(&code, closed),
                got.map(|m| format!(": {}", m.start)).unwrap_or_default()
            ));
        }
        ua.close();
        let p = probe_tcp(addr);
        if p != Some(200) {
            failures.push(format!(
                "[tcp {}] edge no longer answers OPTIONS over TCP (got {p:?}), running={}",
                c.name,
                edge.is_running()
            ));
            if !edge.is_running() {
                failures.push(format!(
                    "edge EXITED after tcp {}: {:?}",
                    c.name,
                    edge.exit_status()
                ));
                break;
            }
        }
    }
    failures
}

#[test]
fn corpus_is_big_enough_and_well_formed() {
    let cases = load_corpus();
    assert!(
        cases.len() >= 30,
        "need >= 30 corpus messages, have {}",
        cases.len()
    );
    for c in &cases {
        assert!(!c.udp.is_empty() && !c.tcp.is_empty(), "{}", c.name);
    }
    // the compact-form, folded and LF-only cases must expect service
    for n in [
        "003_compact_forms",
        "004_folded_headers",
        "005_lf_only_line_ends",
        "006_colon_spacing",
    ] {
        let c = cases
            .iter()
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("missing {n}"));
        assert!(!c.udp.contains(&Expect::Code(400)), "{n} is valid SIP");
    }
}

#[test]
fn corpus_over_udp() {
    let cases = load_corpus();
    let mut edge = Edge::start(EdgeConfig::default());
    let failures = run_udp(&mut edge, &cases);
    assert!(edge.is_running(), "edge exited: {:?}", edge.exit_status());
    assert!(
        failures.is_empty(),
        "{} UDP corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_over_tcp() {
    let cases = load_corpus();
    let mut edge = Edge::start(EdgeConfig::default());
    let failures = run_tcp(&mut edge, &cases);
    assert!(edge.is_running(), "edge exited: {:?}", edge.exit_status());
    assert!(
        failures.is_empty(),
        "{} TCP corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn many_messages_in_one_tcp_segment_and_split_across_writes() {
    // stream framing: 3 OPTIONS in one write, then one OPTIONS byte by byte
    let edge = Edge::start(EdgeConfig::default());
    let mut ua = TcpUa::connect(edge.tcp());
    let reqs: Vec<Req> = (0..3).map(|_| Req::options(edge.tcp()).tcp()).collect();
    let mut all = vec![];
    for r in &reqs {
        all.extend(r.render(ua.local));
    }
    assert!(ua.send_raw(&all));
    let mut seen = std::collections::HashSet::new();
    let end = Instant::now() + Duration::from_secs(5);
    while seen.len() < 3 && Instant::now() < end {
        if let TcpRead::Msg(m) = ua.read_msg(Duration::from_millis(500)) {
            assert_eq!(m.code(), Some(200), "{}", m.text());
            seen.insert(m.call_id().unwrap().to_string());
        }
    }
    assert_eq!(seen.len(), 3, "3 pipelined OPTIONS must get 3 answers");
    let r = Req::options(edge.tcp()).tcp();
    for b in r.render(ua.local) {
        assert!(ua.send_raw(&[b]));
        std::thread::sleep(Duration::from_micros(200));
    }
    match ua.read_msg(Duration::from_secs(5)) {
        TcpRead::Msg(m) => assert!(r.matches(&m) && m.code() == Some(200), "{}", m.text()),
        _ => panic!("no answer to an OPTIONS written one byte at a time"),
    }
}
