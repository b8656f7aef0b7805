//! Key changes on a running edge (SPEC 2, 6): a new, rolled or revoked key
//! is honoured within one second; calls already up are not cut.
//!
//! Timing: the clock starts when the `tollgate keys ...` command has exited;
//! the bound is the SPEC's 1 s plus 300 ms for scheduling on a loaded 2-core
//! box (each probe INVITE takes a few ms). Probes are sent every 50 ms, each
//! with a fresh token (unique jti), and the result must then stay stable.
//!
//! cargo test -p tollgate --test e2e_revoke
mod common;
use common::*;
use std::time::{Duration, Instant};

const BOUND: Duration = Duration::from_millis(1300);

fn probe(edge: &Edge, key: &str) -> SipMsg {
    let t = jwt_for(key, &{
        let n = now_unix();
        claims(n - 5, n + 300, SERVICE, "sipp")
    });
    let mut ua = UdpUa::new(edge.sip_udp);
    ua.call(&Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&t))
}

/// Probe until `want` holds; returns the time it took (panics after 5 s).
fn until(edge: &Edge, key: &str, what: &str, want: impl Fn(&SipMsg) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = probe(edge, key);
        if want(&r) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "[{what}] not reached after 5 s; last response:\n{}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn passes(r: &SipMsg) -> bool {
    r.code() == Some(486)
}

fn busy_edge() -> (MiniUas, Edge) {
    let uas = MiniUas::start(UasMode::Busy);
    let edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        ..Default::default()
    });
    (uas, edge)
}

#[test]
fn new_key_usable_within_1s() {
    let (_uas, edge) = busy_edge();
    let k = edge.create_key("late", &[]);
    let took = until(&edge, &k, "new key accepted", passes);
    assert!(
        took <= BOUND,
        "a key created while the edge runs was accepted only after {took:?}"
    );
}

#[test]
fn revoke_takes_effect_within_1s() {
    let (_uas, edge) = busy_edge();
    let k = edge.create_key("victim", &[]);
    until(&edge, &k, "key works before revoke", passes);
    let first = edge.first_key();
    edge.cli(&["keys", "revoke", &key_id(&k)]);
    let took = until(&edge, &k, "revoked key refused", is_invalid_token);
    assert!(
        took <= BOUND,
        "revocation took {took:?} to reach the running edge"
    );
    for i in 0..3 {
        assert_invalid_token(
            &probe(&edge, &k),
            &format!("revoked key, probe {i} after refusal"),
        );
    }
    // other keys are unaffected
    assert!(
        passes(&probe(&edge, &first)),
        "revoking one key must not affect another"
    );
    let list = edge.cli(&["keys", "list"]);
    assert!(
        list.lines().any(|l| l.split('\t').collect::<Vec<_>>()
            == vec![key_id(&k).as_str(), "sk", "revoked", "victim"]),
        "keys list must show the key revoked:\n{list}"
    );
}

#[test]
fn roll_takes_effect_within_1s() {
    let (_uas, edge) = busy_edge();
    let old = edge.create_key("roller", &[]);
    until(&edge, &old, "key works before roll", passes);
    let new = edge.cli(&["keys", "roll", &key_id(&old)]);
    assert_key_format(&new);
    assert_eq!(key_id(&new), key_id(&old));
    let t_old = until(&edge, &old, "old secret refused", is_invalid_token);
    assert!(
        t_old <= BOUND,
        "old secret still accepted {t_old:?} after roll"
    );
    let t_new = until(&edge, &new, "new secret accepted", passes);
    assert!(
        t_old + t_new <= BOUND + Duration::from_millis(300),
        "new secret accepted only after {:?}",
        t_old + t_new
    );
}

#[test]
fn roll_with_grace_keeps_old_secret_for_a_while() {
    let (_uas, edge) = busy_edge();
    let old = edge.create_key("graceful", &[]);
    until(&edge, &old, "key works before roll", passes);
    let new = edge.cli(&["keys", "roll", &key_id(&old), "--grace", "10m"]);
    let _ = until(&edge, &new, "new secret accepted", passes);
    // within the grace period both secrets work
    assert!(
        passes(&probe(&edge, &old)),
        "old secret must keep working during a 10 min grace period"
    );
    assert!(passes(&probe(&edge, &new)));
}

#[test]
fn revoke_does_not_cut_an_established_call() {
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        ..Default::default()
    });
    let k = edge.create_key("caller", &[]);
    let ok = |r: &SipMsg| r.code() == Some(200);
    // establish a call with k (retry until the new key is loaded)
    let t0 = Instant::now();
    let (mut ua, inv, resp) = loop {
        let n = now_unix();
        let t = jwt_for(&k, &claims(n - 5, n + 300, SERVICE, "sipp"));
        let mut ua = UdpUa::new(edge.sip_udp);
        let inv = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&t);
        let r = ua.call(&inv);
        if ok(&r) {
            break (ua, inv, r);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "call with a new key never answered:\n{}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ua.send(&inv.in_dialog(&resp, "ACK", inv.cseq));
    edge.cli(&["keys", "revoke", &key_id(&k)]);
    until(&edge, &k, "revoked", is_invalid_token);
    assert_eq!(
        uas.count("BYE"),
        0,
        "revocation must not hang up calls already up"
    );
    let bye = inv.in_dialog(&resp, "BYE", inv.cseq + 1);
    let fin = ua
        .transact(&bye, Duration::from_secs(10))
        .expect("no answer to BYE")
        .fin;
    assert_eq!(
        fin.code(),
        Some(200),
        "BYE of the established call after revocation:\n{}",
        fin.text()
    );
    assert!(
        uas.wait_for("BYE", 1, Duration::from_secs(5)),
        "the BYE must reach leg B"
    );
}
