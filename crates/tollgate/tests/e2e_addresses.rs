//! The edge's own addresses and the transaction rules around them (issue 13,
//! item 6): a wildcard listener never names `0.0.0.0`, `[sip] advertise` and
//! `[media] advertise_ip` for 1:1 NAT, server transactions keyed by
//! branch + sent-by + method (RFC 3261 §17.2.3), CANCEL only from the
//! INVITE's source, and a size cap on messages (513).
//!
//! cargo test -p tollgate --test e2e_addresses
mod common;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// An edge routed to `uas`, listening on the wildcard address (UDP and TCP)
/// with media bound to the wildcard too (the Docker and Kubernetes kits).
fn wildcard_edge(uas: &MiniUas, sip_extra: &str, extra_toml: &str) -> Edge {
    Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        sip_extra: sip_extra.into(),
        extra_toml: extra_toml.into(),
        extra_args: [
            "--sip-listen",
            "udp:0.0.0.0:0",
            "--sip-listen",
            "tcp:0.0.0.0:0",
            "--media-ip",
            "0.0.0.0",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
}

/// Where a test UA reaches an edge listening on `a` (a wildcard is reached
/// on loopback).
fn reach(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], a.port()))
    } else {
        a
    }
}

fn bearer_invite(edge: &Edge, target: SocketAddr, from: &str) -> Req {
    let now = now_unix();
    let token = jwt_for(&edge.first_key(), &claims(now, now + 600, SERVICE, from));
    Req::invite(target, SERVICE, from).bearer(&token)
}

/// The host:port of a SIP URI (`sip:user@host:port;params`).
fn uri_addr(uri: &str) -> SocketAddr {
    let rest = uri.split_once('@').map_or(uri, |(_, r)| r);
    let hostport = rest.split([';', '>']).next().unwrap();
    hostport
        .parse()
        .unwrap_or_else(|_| panic!("no IP:port in URI {uri:?}"))
}

/// The `c=` address of an SDP body.
fn sdp_c(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let c = text
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))
        .unwrap_or_else(|| panic!("no c= line in\n{text}"));
    c.trim().to_string()
}

fn sdp_o(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let o = text
        .lines()
        .find_map(|l| l.strip_prefix("o="))
        .unwrap_or_else(|| panic!("no o= line in\n{text}"));
    o.split_whitespace().last().unwrap().to_string()
}

/// A whole call whose ACK and BYE go where the 200's Contact says; returns
/// every message the edge sent (to leg A and to leg B) for the caller to
/// check.
fn call_through_contact(edge: &Edge, uas: &MiniUas) -> (SipMsg, Vec<SipMsg>) {
    let target = reach(edge.sip_udp);
    let invite = bearer_invite(edge, target, "alice");
    let mut ua = UdpUa::new(target);
    let out = ua
        .transact(&invite, WAIT)
        .expect("a final response to the INVITE");
    let ok = out.fin.clone();
    assert_eq!(ok.code(), Some(200), "INVITE: want 200, got\n{}", ok.text());
    let contact = ok.contact_uri().expect("a Contact in the 200");
    let to = uri_addr(&contact);
    assert!(
        !to.ip().is_unspecified(),
        "the 200 names a wildcard Contact: {contact}"
    );
    // The UA follows the Contact, as a PBX does (RFC 3261 §12.1.2).
    ua.remote = to;
    ua.send(&invite.in_dialog(&ok, "ACK", invite.cseq));
    let bye = invite.in_dialog(&ok, "BYE", invite.cseq + 1);
    let bye_out = ua.transact(&bye, WAIT).expect("an answer to the BYE");
    assert_eq!(
        bye_out.fin.code(),
        Some(200),
        "BYE to the Contact {to}: {}",
        bye_out.fin.text()
    );
    assert!(uas.wait_for("ACK", 1, WAIT), "leg B got no ACK");
    assert!(uas.wait_for("BYE", 1, WAIT), "leg B got no BYE");
    let mut sent: Vec<SipMsg> = out.provisional;
    sent.push(ok.clone());
    sent.extend(bye_out.provisional);
    sent.push(bye_out.fin);
    sent.extend(uas.received.lock().unwrap().iter().cloned());
    (ok, sent)
}

fn assert_never_names(sent: &[SipMsg], what: &str) {
    for m in sent {
        let text = m.text();
        assert!(!text.contains(what), "the edge sent {what}:\n{text}");
    }
}

#[test]
fn a_wildcard_listener_call_completes_through_its_contact_and_never_names_0_0_0_0() {
    let uas = MiniUas::start(UasMode::Answer);
    let edge = wildcard_edge(&uas, "", "");
    assert!(edge.sip_udp.ip().is_unspecified(), "{}", edge.sip_udp);
    let (ok, sent) = call_through_contact(&edge, &uas);
    assert_never_names(&sent, "0.0.0.0");
    // On loopback the address the packets arrived on is 127.0.0.1.
    let contact = ok.contact_uri().unwrap();
    assert_eq!(uri_addr(&contact), reach(edge.sip_udp), "{contact}");
    assert_eq!(sdp_c(&ok.body), "127.0.0.1", "{}", ok.text());
    assert_eq!(sdp_o(&ok.body), "127.0.0.1", "{}", ok.text());
    let b_invite = &uas.requests("INVITE")[0];
    let via = b_invite.top_via().unwrap();
    assert!(via.contains(&reach(edge.sip_udp).to_string()), "{via}");
    assert_eq!(sdp_c(&b_invite.body), "127.0.0.1", "{}", b_invite.text());
    assert_eq!(sdp_o(&b_invite.body), "127.0.0.1", "{}", b_invite.text());
}

#[test]
fn advertise_addresses_are_named_while_the_sockets_bind_locally() {
    // 1:1 NAT stand-ins: the edge binds 0.0.0.0 (SIP) and 127.0.0.1 (media)
    // and names 127.0.0.5 (SIP) and 127.0.0.6 (SDP); loopback aliases, so
    // the ACK and BYE sent to 127.0.0.5 still reach the wildcard socket.
    let uas = MiniUas::start(UasMode::Answer);
    let mut edge_cfg = EdgeConfig {
        route_target: Some(uas.route()),
        sip_extra: "advertise = \"127.0.0.5\"".into(),
        extra_toml: "[media]\nadvertise_ip = \"127.0.0.6\"\n".into(),
        ..Default::default()
    };
    edge_cfg.extra_args = [
        "--sip-listen",
        "udp:0.0.0.0:0",
        "--sip-listen",
        "tcp:0.0.0.0:0",
        "--media-ip",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    let edge = Edge::start(edge_cfg);
    let (ok, sent) = call_through_contact(&edge, &uas);
    assert_never_names(&sent, "0.0.0.0");
    let port = edge.sip_udp.port();
    assert_eq!(
        uri_addr(&ok.contact_uri().unwrap()),
        SocketAddr::from(([127, 0, 0, 5], port))
    );
    assert_eq!(sdp_c(&ok.body), "127.0.0.6", "{}", ok.text());
    assert_eq!(sdp_o(&ok.body), "127.0.0.6", "{}", ok.text());
    let b_invite = &uas.requests("INVITE")[0];
    let via = b_invite.top_via().unwrap();
    assert!(via.contains(&format!("127.0.0.5:{port}")), "{via}");
    assert!(
        b_invite.header("contact").unwrap().contains("127.0.0.5"),
        "{}",
        b_invite.text()
    );
    assert!(
        b_invite.header("from").unwrap().contains("@127.0.0.5"),
        "{}",
        b_invite.text()
    );
    assert_eq!(sdp_c(&b_invite.body), "127.0.0.6", "{}", b_invite.text());
}

#[test]
fn advertise_values_that_no_peer_can_reach_are_refused_naming_the_field() {
    for (section, line, field) in [
        ("[sip]", "advertise = \"0.0.0.0\"", "sip.advertise"),
        ("[sip]", "advertise = \"not-an-ip\"", "sip.advertise"),
        (
            "[media]",
            "advertise_ip = \"224.0.0.1\"",
            "media.advertise_ip",
        ),
        ("[sip]", "max_message_bytes = 100", "sip.max_message_bytes"),
        (
            "[sip]",
            "max_message_bytes = 70000",
            "sip.max_message_bytes",
        ),
    ] {
        let dir = TestDir::new("bad-advertise");
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, format!("{section}\n{line}\n")).unwrap();
        let data = dir.join("data");
        let args = [
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            path.to_str().unwrap(),
        ];
        let o = tollgate(&args);
        assert_eq!(o.status.code(), Some(2), "{}", describe_output(&args, &o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(field), "{line}: error names {field}: {err}");
    }
}

#[test]
fn a_reused_branch_from_another_sent_by_is_a_new_transaction_not_a_retransmission() {
    let uas = MiniUas::start(UasMode::Ring);
    // One shard: both INVITEs meet the same transaction table whatever
    // their Call-IDs hash to.
    let edge = Edge::start(EdgeConfig {
        sip_extra: "workers = 1".into(),
        ..EdgeConfig::routed_to(uas.addr.port())
    });
    let mut first_ua = UdpUa::new(edge.sip_udp);
    let first = bearer_invite(&edge, edge.sip_udp, "alice");
    first_ua.send(&first);
    let ringing = first_ua
        .recv_where(WAIT, |m| first.matches(m) && m.code() == Some(180))
        .expect("180 for the first INVITE");
    assert_eq!(ringing.call_id(), Some(first.call_id.as_str()));
    // Another UA reuses the branch (a broken or hostile stack): its own
    // sent-by, its own call. §17.2.3 makes it another transaction: it is
    // admitted as a call of its own, not answered with the first call's
    // responses.
    let mut second_ua = UdpUa::new(edge.sip_udp);
    let mut second = bearer_invite(&edge, edge.sip_udp, "bob");
    second.branch = first.branch.clone();
    second_ua.send(&second);
    let got = second_ua
        .recv_where(WAIT, |m| m.code().is_some_and(|c| c >= 180))
        .expect("the second INVITE is answered");
    assert_eq!(
        got.call_id(),
        Some(second.call_id.as_str()),
        "answered with another call's response:\n{}",
        got.text()
    );
    assert_eq!(got.code(), Some(180), "{}", got.text());
    assert!(uas.wait_for("INVITE", 2, WAIT), "two calls reach leg B");
}

#[test]
fn a_cancel_from_another_source_gets_481_and_the_call_goes_on() {
    let uas = MiniUas::start(UasMode::Ring);
    let edge = Edge::start(EdgeConfig::routed_to(uas.addr.port()));
    let mut caller = UdpUa::new(edge.sip_udp);
    let invite = bearer_invite(&edge, edge.sip_udp, "alice");
    caller.send(&invite);
    caller
        .recv_where(WAIT, |m| invite.matches(m) && m.code() == Some(180))
        .expect("180");
    // A third party that learnt the branch (it can read the caller's Via)
    // sends the CANCEL from 127.0.0.2, spoofing the caller's sent-by.
    let mut cancel = invite.clone();
    cancel.method = "CANCEL".into();
    cancel.cseq_method = "CANCEL".into();
    cancel.contact = false;
    cancel.headers.clear();
    cancel.body.clear();
    cancel.content_type = None;
    let mut intruder = UdpUa::from_ip(edge.sip_udp, "127.0.0.2");
    intruder.send_raw(&cancel.render(caller.local));
    let answer = intruder
        .recv_where(WAIT, |m| m.is_response())
        .expect("the intruder's CANCEL is answered");
    assert_eq!(answer.code(), Some(481), "{}", answer.text());
    // The call goes on: the caller's own CANCEL is the first leg B sees.
    let out = caller
        .transact(&cancel, WAIT)
        .expect("the caller's CANCEL is answered");
    assert_eq!(out.fin.code(), Some(200), "{}", out.fin.text());
    let terminated = caller
        .recv_where(WAIT, |m| {
            invite.matches(m) && m.code().is_some_and(|c| c >= 200)
        })
        .expect("a final for the INVITE");
    assert_eq!(terminated.code(), Some(487), "{}", terminated.text());
    assert!(uas.wait_for("CANCEL", 1, WAIT));
    assert_eq!(
        uas.count("CANCEL"),
        1,
        "the intruder's CANCEL reached leg B"
    );
}

/// An OPTIONS of exactly `len` bytes (padded with a text body).
fn options_of(edge: SocketAddr, local: SocketAddr, transport: &str, len: usize) -> Vec<u8> {
    let mut r = Req::options(edge);
    r.transport = if transport == "TCP" { "TCP" } else { "UDP" };
    r.content_type = Some("text/plain".into());
    r.body = vec![b'x'; 0];
    let head = r.render(local).len() + 4; // Content-Length: 0 grows to 5 digits
    r.body = vec![b'x'; len.saturating_sub(head)];
    let bytes = r.render(local);
    assert_eq!(bytes.len(), len, "padding arithmetic");
    bytes
}

/// The status answering an OPTIONS of `len` bytes, over UDP or TCP.
fn options_status(edge: &Edge, tcp: bool, len: usize) -> u16 {
    let what = if tcp { "TCP" } else { "UDP" };
    let answer = if tcp {
        let mut ua = TcpUa::connect(edge.tcp());
        let local = ua.local;
        assert!(ua.send_raw(&options_of(edge.tcp(), local, "TCP", len)));
        match ua.read_msg(WAIT) {
            TcpRead::Msg(m) => Some(m),
            TcpRead::Closed | TcpRead::Timeout => None,
        }
    } else {
        let mut ua = UdpUa::new(edge.sip_udp);
        ua.send_raw(&options_of(edge.sip_udp, ua.local, "UDP", len));
        ua.recv_where(WAIT, |m| m.is_response())
    };
    let m = answer.unwrap_or_else(|| panic!("no answer to a {len}-byte OPTIONS over {what}"));
    m.code()
        .unwrap_or_else(|| panic!("not a response over {what}: {}", m.text()))
}

#[test]
fn an_oversized_message_gets_513_over_udp_and_tcp_and_the_cap_is_a_knob() {
    let edge = Edge::start(EdgeConfig::default());
    for (tcp, len, want) in [
        (false, 16 * 1024 + 1, 513),
        (false, 64 * 1024 - 100, 513),
        (false, 16 * 1024, 200),
        (true, 20_000, 513),
        (true, 16 * 1024, 200),
    ] {
        assert_eq!(
            options_status(&edge, tcp, len),
            want,
            "{len} bytes, tcp={tcp}"
        );
    }
    let roomy = Edge::start(EdgeConfig {
        sip_extra: "max_message_bytes = 32768".into(),
        ..Default::default()
    });
    for tcp in [false, true] {
        assert_eq!(
            options_status(&roomy, tcp, 20_000),
            200,
            "raised cap, tcp={tcp}"
        );
    }
}

/// UDP sockets bound to `port` on 127.0.0.1 (`/proc/net/udp`, Linux).
fn udp_sockets_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp (Linux)");
    let me = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(1) == Some(me.as_str()))
        .count()
}

#[test]
fn every_shard_reads_its_own_udp_socket_and_calls_complete_across_them() {
    // Issue 13 item 1: one SO_REUSEPORT socket (and receive thread) per
    // shard. Leg B answers from one address, so its responses land on one
    // socket while the callers' sources hash over all three: the calls
    // complete only if every socket's messages reach the shard owning the
    // call.
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        sip_extra: "workers = 3".into(),
        ..Default::default()
    });
    // The driver adds the sockets once it runs, which may be just after
    // `ready`.
    let port = edge.sip_udp.port();
    let sockets = poll(WAIT, || (udp_sockets_on(port) >= 3).then_some(()));
    assert!(
        sockets.is_some(),
        "one UDP socket per shard on {}: {} sockets",
        edge.sip_udp,
        udp_sockets_on(port)
    );
    assert_eq!(udp_sockets_on(port), 3, "no more than one per shard");
    const CALLERS: usize = 12;
    for i in 0..CALLERS {
        let mut ua = UdpUa::new(edge.sip_udp);
        let invite = bearer_invite(&edge, edge.sip_udp, &format!("caller{i}"));
        let ok = ua.call(&invite);
        assert_eq!(ok.code(), Some(200), "caller {i}: {}", ok.text());
        assert_eq!(ua.ack_and_bye(&invite, &ok), Some(200), "caller {i}'s BYE");
    }
    assert!(
        uas.wait_for("BYE", CALLERS, WAIT),
        "every BYE reached leg B"
    );
    assert!(
        uas.wait_for("ACK", CALLERS, WAIT),
        "every ACK reached leg B"
    );
}
