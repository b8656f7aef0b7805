//! B2BUA call flows with SIPp on both legs (UAC = leg A, UAS = leg B).
//!
//! cargo test -p tollgate --test e2e_call_flows
mod common;
use common::*;
use std::time::Duration;

const CALLS: u32 = 3;

/// UAS scenario on leg B, edge routed to it, UAC scenario with `CALLS`
/// bearer tokens on leg A. Both must end with all calls successful.
fn flow(uas_scen: &str, uac_scen: &str, cfg: impl FnOnce(EdgeConfig) -> EdgeConfig, uac_secs: u64) {
    require_sipp();
    let dir = TestDir::new("flow");
    let uas = Sipp::new(&dir.path, "uas", uas_scen)
        .calls(CALLS)
        .args(&["-default_behaviors", "all,-abortunexp"])
        .timeout(Duration::from_secs(uac_secs + 30))
        .spawn();
    let edge = Edge::start(cfg(EdgeConfig::routed_to(uas.ports.sip)));
    let tokens = mint_many(&edge.first_key(), SERVICE, "sipp", CALLS as usize);
    write_inf(&dir.join("tokens.csv"), &tokens);
    let uac = Sipp::new(&dir.path, "uac", uac_scen)
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&dir.join("tokens.csv"))
        .calls(CALLS)
        .rate(5)
        .pause_ms(100)
        .args(&[
            "-recv_timeout",
            "20s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(uac_secs))
        .run();
    let uas = uas.wait_at_most(Duration::from_secs(20));
    uac.assert_calls_ok(CALLS as u64);
    uas.assert_calls_ok(CALLS as u64);
}

#[test]
fn cancel_before_answer() {
    // UAC: INVITE, 180, CANCEL, 200, 487, ACK; UAS: INVITE, 180, CANCEL, 200, 487, ACK
    flow("uas_ring_cancel.xml", "uac_cancel.xml", |c| c, 40);
}

#[test]
fn leg_b_busy_is_relayed() {
    // UAS answers 486 (and must get an ACK from the edge); UAC must get 486
    flow("uas_busy.xml", "uac_expect_486.xml", |c| c, 40);
}

#[test]
fn leg_b_silent_times_out() {
    // t1 = 50 ms: Timer B = 64*T1 = 3.2 s; UAC must get 408 or 504
    flow(
        "uas_silent.xml",
        "uac_expect_timeout.xml",
        |c| EdgeConfig {
            t1_ms: Some(50),
            ..c
        },
        40,
    );
}

#[test]
fn leg_b_rings_forever_invite_timeout() {
    // invite_timeout_s = 2: edge CANCELs leg B (UAS gets CANCEL, 200, 487, ACK)
    // and answers leg A 408
    flow(
        "uas_ring_cancel.xml",
        "uac_expect_408.xml",
        |c| EdgeConfig {
            invite_timeout_s: Some(2),
            ..c
        },
        40,
    );
}

#[test]
fn bye_from_leg_b() {
    // UAS answers then hangs up; UAC receives BYE and answers 200; UAS gets 200
    flow("uas_bye.xml", "uac_bearer_recv_bye.xml", |c| c, 40);
}

#[test]
fn normal_call_bye_from_leg_a() {
    flow("uas.xml", "uac_bearer.xml", |c| c, 40);
}
