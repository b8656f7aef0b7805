//! Trunk allocator acceptance (issue 4), against the real `tollgate` binary:
//! calls per second (503 + Retry-After), concurrent calls (486), destination
//! policy (403), daily minutes and the token's `max_duration` (BYE, then
//! 402), and channels given back on every way a call ends.
//!
//! cargo test -p tollgate --test e2e_trunk
mod common;
mod trunk_support;

use common::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use trunk_support::*;

const CALLER: &str = "sipp";

/// A data dir with keys created before the edge starts (so the edge knows
/// them from its first INVITE on): returns the dir (to give to
/// `Edge::start_in`) and the keys.
fn dir_with_keys(tag: &str, keys: &[(&str, &[&str])]) -> (TestDir, Vec<String>) {
    let dir = TestDir::new(tag);
    let data = dir.join("data");
    let ks = keys
        .iter()
        .map(|(name, extra)| create_key(&data, name, extra))
        .collect();
    (dir, ks)
}

// ---------------------------------------------------------------------------
// 1. calls per second
// ---------------------------------------------------------------------------

#[test]
fn cps_10_offered_50_per_second_for_10_seconds_admits_100_and_503s_the_rest() {
    require_sipp();
    const CALLS: usize = 500;
    let (dir, keys) = dir_with_keys("cps", &[("cps10", &["--cps", "10"])]);
    let key = keys[0].clone();
    let id = key_id(&key);
    let edge = Edge::start_in(dir, cfg(EdgeConfig::default()));
    let tokens: Vec<String> = (0..CALLS).map(|_| token(&key, SERVICE, CALLER)).collect();
    let inf = edge.dir.join("tokens.csv");
    write_inf(&inf, &tokens);

    let uac = Sipp::new(&edge.dir.path, "uac_cps", "trunk_uac_cps.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&inf)
        .rate(50)
        .calls(CALLS as u32)
        .pause_ms(100)
        .args(&[
            "-recv_timeout",
            "20s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(90))
        .run();

    let log = sipp_log(&uac.messages);
    // When the INVITEs were first sent: the offered load's real span.
    let mut first_sent: Vec<f64> = vec![];
    let mut seen = HashSet::new();
    for e in &log {
        if e.sent
            && e.msg.method() == Some("INVITE")
            && seen.insert(e.msg.call_id().unwrap_or("").to_string())
        {
            first_sent.push(e.ts);
        }
    }
    let span =
        first_sent.last().copied().unwrap_or(0.0) - first_sent.first().copied().unwrap_or(0.0);
    let finals = invite_finals(&log);
    let admitted = finals.values().filter(|(c, _)| *c == 200).count();
    let refused: Vec<&SipMsg> = finals
        .values()
        .filter(|(c, _)| *c == 503)
        .map(|(_, m)| m)
        .collect();
    let other: Vec<u16> = finals
        .values()
        .map(|(c, _)| *c)
        .filter(|c| *c != 200 && *c != 503)
        .collect();
    let report = format!(
        "offered {} INVITEs over {span:.2} s (token bucket: expect about 10 + 10 x span = {:.0}); \
         admitted (200) {admitted}, refused (503) {}, other finals {other:?}, no final {}",
        first_sent.len(),
        10.0 + 10.0 * span,
        refused.len(),
        CALLS - finals.len(),
    );
    eprintln!("[cps] {report}");
    let report = format!("{report}\n{}", uac.summary());
    assert_eq!(
        first_sent.len(),
        CALLS,
        "SIPp did not offer every call: {report}"
    );
    assert!(other.is_empty(), "only 200 or 503 expected: {report}");
    assert_eq!(
        finals.len(),
        CALLS,
        "every INVITE needs a final response: {report}"
    );
    assert!(
        (90..=110).contains(&admitted),
        "cps 10 offered 50/s for 10 s must admit 100 +- 10: {report}"
    );
    assert_eq!(admitted + refused.len(), CALLS, "{report}");
    for m in &refused {
        let ra = m
            .header("retry-after")
            .unwrap_or_else(|| panic!("503 without Retry-After:\n{}", m.text()));
        let secs: u64 = ra
            .split(|c: char| c == ';' || c == '(' || c.is_whitespace())
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {ra:?} is not delta-seconds:\n{}", m.text()));
        // cps 10: the next token is at most 100 ms away, so the whole
        // seconds to wait, computed from the bucket, are exactly 1.
        assert_eq!(secs, 1, "Retry-After for a 10 cps key:\n{}", m.text());
    }
    assert!(
        uac.status == Some(0) && uac.successful() == CALLS as u64 && uac.failed() == 0,
        "every call (admitted and completed, or refused with a numeric Retry-After) must succeed in SIPp: {report}"
    );

    // The edge's own account agrees with what the UAC saw.
    let rate_refusals = metric(
        &edge,
        "tollgate_trunk_refusals_total",
        &[("reason", "rate")],
    );
    assert_eq!(rate_refusals, Some(refused.len() as f64), "{report}");
    let key_calls = metric(&edge, "tollgate_key_calls_total", &[("key", &id)]);
    assert_eq!(key_calls, Some(admitted as f64), "{report}");
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after the cps run");
    // Every admitted call is in the CDR store, answered; refusals are not calls.
    let ok = poll(Duration::from_secs(5), || {
        let (cdrs, _) = read_cdrs(&edge.data_dir);
        (cdrs.iter().filter(|c| cdr_answered(c)).count() == admitted).then_some(())
    });
    let (cdrs, _) = read_cdrs(&edge.data_dir);
    assert!(
        ok.is_some(),
        "expected {admitted} answered CDRs, file has {} lines ({} answered)",
        cdrs.len(),
        cdrs.iter().filter(|c| cdr_answered(c)).count()
    );
}

// ---------------------------------------------------------------------------
// 2. concurrent calls
// ---------------------------------------------------------------------------

#[test]
fn max_calls_5_sixth_concurrent_invite_gets_486_and_one_more_after_a_call_ends() {
    require_sipp();
    let (dir, keys) = dir_with_keys("maxcalls", &[("max5", &["--max-calls", "5"])]);
    let key = keys[0].clone();
    let edge = Edge::start_in(dir, cfg(EdgeConfig::default()));

    // Four long calls from SIPp (held 20 s), the fifth from our own UA.
    let tokens: Vec<String> = (0..4).map(|_| token(&key, SERVICE, CALLER)).collect();
    let inf = edge.dir.join("tokens.csv");
    write_inf(&inf, &tokens);
    let sipp = Sipp::new(&edge.dir.path, "uac_long", "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&inf)
        .rate(10)
        .calls(4)
        .pause_ms(20_000)
        .args(&[
            "-recv_timeout",
            "60s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(90))
        .spawn();

    let mut ua = UdpUa::new(edge.sip_udp);
    let t = Duration::from_secs(20);
    let (inv5, ok5) = place_call(&mut ua, SERVICE, "alice", &token(&key, SERVICE, "alice"), t);
    assert_eq!(code(&ok5), 200, "5th call:\n{}", ok5.text());
    ack(&ua, &inv5, &ok5);
    assert_channels(
        &edge,
        5.0,
        Duration::from_secs(15),
        "5 calls up (4 SIPp + 1 UA)",
    );

    let (_, sixth) = place_call(&mut ua, SERVICE, "alice", &token(&key, SERVICE, "alice"), t);
    assert_eq!(
        code(&sixth),
        486,
        "6th concurrent INVITE:\n{}",
        sixth.text()
    );
    assert_eq!(
        metric(
            &edge,
            "tollgate_trunk_refusals_total",
            &[("reason", "busy")]
        ),
        Some(1.0)
    );

    assert_eq!(
        hang_up(&mut ua, &inv5, &ok5),
        Some(200),
        "BYE of the 5th call"
    );
    assert_channels(&edge, 4.0, Duration::from_secs(10), "after one call ended");

    let (inv7, ok7) = place_call(&mut ua, SERVICE, "alice", &token(&key, SERVICE, "alice"), t);
    assert_eq!(
        code(&ok7),
        200,
        "INVITE after one call ended:\n{}",
        ok7.text()
    );
    ack(&ua, &inv7, &ok7);
    assert_channels(&edge, 5.0, Duration::from_secs(10), "trunk full again");
    let (_, again) = place_call(&mut ua, SERVICE, "alice", &token(&key, SERVICE, "alice"), t);
    assert_eq!(code(&again), 486, "trunk full again:\n{}", again.text());
    assert_eq!(hang_up(&mut ua, &inv7, &ok7), Some(200));

    let r = sipp.wait();
    r.assert_calls_ok(4);
    assert_channels(
        &edge,
        0.0,
        Duration::from_secs(10),
        "after every call ended",
    );
}

// ---------------------------------------------------------------------------
// 3. destination policy
// ---------------------------------------------------------------------------

/// Calls `to` with a fresh token of `key` (retrying while the edge does not
/// know the key yet); returns the final status.
fn status_of_call(ua: &mut UdpUa, key: &str, to: &str) -> (u16, String) {
    let from = "+14155550123";
    let (req, fin) = until_not_401(
        ua,
        to,
        from,
        || token(key, to, from),
        Duration::from_secs(10),
    );
    if code(&fin) == 200 {
        ack(ua, &req, &fin);
        assert_eq!(
            hang_up(ua, &req, &fin),
            Some(200),
            "BYE of the call to {to}"
        );
    }
    (code(&fin), fin.text())
}

#[test]
fn deny_prefix_premium_rate_and_public_allow_list_get_403() {
    let edge = Edge::start(cfg(EdgeConfig::default()));
    let sk = edge.first_key();
    let sk_id = key_id(&sk);
    let deny = edge.create_key("deny1555", &["--parent", &sk_id, "--deny-prefix", "+1555"]);
    let public = edge.create_key("pk44", &["--public", "--allow-prefix", "+44"]);
    assert!(public.starts_with("tg_pk_"), "--public key {public}");
    let mut ua = UdpUa::new(edge.sip_udp);

    // key's own deny prefix
    // (a full-length number: a short one is no number, 484, SPEC §4a)
    let (c, t) = status_of_call(&mut ua, &deny, "+15551234567");
    assert_eq!(
        c, 403,
        "restricted key with --deny-prefix +1555 calling +15551234567:\n{t}"
    );
    let (c, t) = status_of_call(&mut ua, &deny, "+14155550100");
    assert_eq!(c, 200, "same key, a destination it may call:\n{t}");

    // the edge-wide premium-rate list, even for the unrestricted secret key
    let (c, t) = status_of_call(&mut ua, &sk, "+19005551234");
    assert_eq!(c, 403, "secret key calling premium-rate +19005551234:\n{t}");
    let (c, t) = status_of_call(&mut ua, &sk, "+14155550100");
    assert_eq!(c, 200, "secret key calling an ordinary number:\n{t}");
    let dest_refusals = metric(
        &edge,
        "tollgate_trunk_refusals_total",
        &[("reason", "destination")],
    );
    assert_eq!(
        dest_refusals,
        Some(1.0),
        "premium-rate refusal counted once"
    );

    // a public key off its allow-list, then on it
    let (c, t) = status_of_call(&mut ua, &public, "+15550000000");
    assert_eq!(c, 403, "public key (allow +44) calling +15550000000:\n{t}");
    let (c, t) = status_of_call(&mut ua, &public, "+442079460000");
    assert_eq!(c, 200, "public key (allow +44) calling +442079460000:\n{t}");

    assert_channels(
        &edge,
        0.0,
        Duration::from_secs(10),
        "after the policy calls",
    );
}

// ---------------------------------------------------------------------------
// 4. budgets: daily minutes and the token's max_duration
// ---------------------------------------------------------------------------

#[test]
fn daily_minutes_1_cuts_the_call_at_60_s_then_402() {
    let (dir, keys) = dir_with_keys("daily", &[("daily1", &["--daily-minutes", "1"])]);
    let key = keys[0].clone();
    let id = key_id(&key);
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start_in(dir, cfg(EdgeConfig::routed_to(uas.addr.port())));
    let mut ua = UdpUa::new(edge.sip_udp);

    let (inv, ok) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    let answered = Instant::now();
    assert_eq!(code(&ok), 200, "first call:\n{}", ok.text());
    ack(&ua, &inv, &ok);
    let cid = inv.call_id.clone();
    let Some((_, at)) = answer_bye(&mut ua, &cid, Duration::from_secs(100)) else {
        panic!("no BYE from the edge within 100 s of answer on a 1-minute budget");
    };
    let held = at.duration_since(answered).as_secs_f64();
    eprintln!("[daily] call cut after {held:.2} s");
    assert!(
        (55.0..=75.0).contains(&held),
        "call cut after {held:.2} s, want about 60 s (55..75)"
    );
    assert!(
        uas.wait_for("BYE", 1, Duration::from_secs(10)),
        "leg B got no BYE when the budget ran out"
    );
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after the budget cut");

    let (_, next) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(
        code(&next),
        402,
        "INVITE with the day's budget spent:\n{}",
        next.text()
    );
    assert_eq!(
        metric(
            &edge,
            "tollgate_trunk_refusals_total",
            &[("reason", "budget")]
        ),
        Some(1.0)
    );

    // the CDR says why and how long
    let cdr = poll(Duration::from_secs(5), || {
        let (cdrs, _) = read_cdrs(&edge.data_dir);
        cdrs.into_iter().find(cdr_answered)
    })
    .expect("no answered CDR for the cut call");
    let billable = cdr.int("billable_secs").unwrap_or(-1);
    assert!(
        (55..=75).contains(&billable),
        "billable_secs {billable} in {cdr:?}"
    );
    assert_eq!(cdr.str("cause"), Some("limit_reached"), "{cdr:?}");
    assert_eq!(cdr.str("key_id"), Some(id.as_str()), "{cdr:?}");
    let u = usage_table(&edge.data_dir, &["--key", &id]);
    assert_eq!(
        u.get(&id).map(|r| r[3]),
        Some(billable as u64),
        "usage: {u:?}"
    );

    // The spent budget survives a crash: restarted on the same data dir, the
    // edge still answers 402 (it seeds today's spend from the CDR store).
    let mut edge = edge;
    kill9_and_wait(&mut edge);
    let edge2 = Edge::start_in(
        TestDir {
            path: edge.dir.path.clone(),
        },
        cfg(EdgeConfig::routed_to(uas.addr.port())),
    );
    let mut ua2 = UdpUa::new(edge2.sip_udp);
    let (_, after) = place_call(
        &mut ua2,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(
        code(&after),
        402,
        "after a restart the day's spent budget must still refuse:\n{}",
        after.text()
    );
    drop(edge2);
    drop(edge);
}

#[test]
fn token_max_duration_3_cuts_the_call_with_bye() {
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start(cfg(EdgeConfig::routed_to(uas.addr.port())));
    let key = edge.first_key();
    let jwt = mint(&key, SERVICE, "alice", &["--max-duration", "3"]);
    let (_, claims, _) = jwt_parts(&jwt);
    assert_eq!(
        claims.int("max_duration"),
        Some(3),
        "minted claims {claims:?}"
    );
    let mut ua = UdpUa::new(edge.sip_udp);
    let (inv, ok) = place_call(&mut ua, SERVICE, "alice", &jwt, Duration::from_secs(20));
    let answered = Instant::now();
    assert_eq!(code(&ok), 200, "{}", ok.text());
    ack(&ua, &inv, &ok);
    let Some((_, at)) = answer_bye(&mut ua, &inv.call_id, Duration::from_secs(20)) else {
        panic!("no BYE within 20 s of answer for a token with max_duration 3");
    };
    let held = at.duration_since(answered).as_secs_f64();
    eprintln!("[max_duration] call cut after {held:.2} s");
    assert!(
        (2.0..=8.0).contains(&held),
        "cut after {held:.2} s, want 2..8"
    );
    assert!(
        uas.wait_for("BYE", 1, Duration::from_secs(10)),
        "leg B got no BYE at max_duration"
    );
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after max_duration");
    // max_duration is per call, not a budget: the next call goes through
    let (inv2, ok2) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(code(&ok2), 200, "{}", ok2.text());
    ack(&ua, &inv2, &ok2);
    assert_eq!(hang_up(&mut ua, &inv2, &ok2), Some(200));
}

// ---------------------------------------------------------------------------
// 5. channels go back on every way a call ends
// ---------------------------------------------------------------------------

#[test]
fn channels_back_to_0_after_cancel() {
    let uas = MiniUas::start(UasMode::Ring);
    let edge = Edge::start(cfg(EdgeConfig::routed_to(uas.addr.port())));
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let inv = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token(&key, SERVICE, "alice"));
    ua.send(&inv);
    let ringing = ua
        .recv_where(Duration::from_secs(10), |m| {
            inv.matches(m) && m.code() == Some(180)
        })
        .expect("no 180 relayed from a ringing leg B");
    drop(ringing);
    assert_channels(&edge, 1.0, Duration::from_secs(5), "while ringing");

    let mut cancel = inv.clone();
    cancel.method = "CANCEL".into();
    cancel.cseq_method = "CANCEL".into();
    cancel.headers.clear();
    cancel.body.clear();
    cancel.content_type = None;
    cancel.contact = false;
    let c = ua
        .transact(&cancel, Duration::from_secs(10))
        .expect("no answer to CANCEL");
    assert_eq!(code(&c.fin), 200, "CANCEL:\n{}", c.fin.text());
    let fin = ua
        .recv_where(Duration::from_secs(10), |m| {
            inv.matches(m) && m.code().is_some_and(|c| c >= 200)
        })
        .expect("no final response to the cancelled INVITE");
    assert_eq!(code(&fin), 487, "{}", fin.text());
    ua.send(&inv.ack_non2xx(&fin));
    assert!(
        uas.wait_for("CANCEL", 1, Duration::from_secs(5)),
        "leg B got no CANCEL"
    );
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after CANCEL");
}

#[test]
fn channels_back_to_0_after_leg_b_busy() {
    let uas = MiniUas::start(UasMode::Busy);
    let edge = Edge::start(cfg(EdgeConfig::routed_to(uas.addr.port())));
    let key = edge.first_key();
    let id = key_id(&key);
    let mut ua = UdpUa::new(edge.sip_udp);
    let (_, fin) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(code(&fin), 486, "leg B's 486 relayed:\n{}", fin.text());
    assert_eq!(uas.count("INVITE"), 1, "leg B was tried once");
    assert_eq!(
        metric(&edge, "tollgate_key_calls_total", &[("key", &id)]),
        Some(1.0),
        "the call was admitted onto the trunk"
    );
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after leg B's 486");
}

#[test]
fn channels_back_to_0_after_leg_b_timeout() {
    let silent = SilentUas::start();
    let edge = Edge::start(cfg(EdgeConfig {
        t1_ms: Some(50),
        ..EdgeConfig::routed_to(silent.addr.port())
    }));
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let inv = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token(&key, SERVICE, "alice"));
    let t0 = Instant::now();
    ua.send(&inv);
    // Timer B = 64 x 50 ms = 3.2 s: the channel is held meanwhile
    assert_channels(&edge, 1.0, Duration::from_secs(3), "while leg B is silent");
    let fin = ua
        .recv_where(Duration::from_secs(30), |m| {
            inv.matches(m) && m.code().is_some_and(|c| c >= 200)
        })
        .expect("no final response after leg B timed out");
    ua.send(&inv.ack_non2xx(&fin));
    eprintln!("[timeout] final {} after {:?}", code(&fin), t0.elapsed());
    assert!(
        matches!(code(&fin), 408 | 504),
        "leg B timeout must give 408 or 504:\n{}",
        fin.text()
    );
    assert!(
        silent.drain().iter().any(|m| m.method() == Some("INVITE")),
        "leg B was never tried"
    );
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after leg B timed out");
}

#[test]
fn channels_back_to_0_after_bye_from_leg_a() {
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start(cfg(EdgeConfig::routed_to(uas.addr.port())));
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let (inv, ok) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(code(&ok), 200, "{}", ok.text());
    ack(&ua, &inv, &ok);
    assert_channels(&edge, 1.0, Duration::from_secs(5), "call up");
    assert_eq!(hang_up(&mut ua, &inv, &ok), Some(200), "BYE from leg A");
    assert!(
        uas.wait_for("BYE", 1, Duration::from_secs(5)),
        "leg B got no BYE"
    );
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after BYE from leg A");
}

#[test]
fn channels_back_to_0_after_bye_from_leg_b() {
    let uas = ByeUas::start();
    let edge = Edge::start(cfg(EdgeConfig::routed_to(uas.addr.port())));
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let (inv, ok) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(code(&ok), 200, "{}", ok.text());
    ack(&ua, &inv, &ok);
    assert!(uas.wait_ack(Duration::from_secs(5)), "leg B got no ACK");
    assert_channels(&edge, 1.0, Duration::from_secs(5), "call up");
    // leg B hangs up; the edge must BYE leg A (we answer it) and answer B 200
    let handle = std::thread::spawn(move || {
        let r = answer_bye(&mut ua, &inv.call_id, Duration::from_secs(15)).map(|_| ());
        (ua, r)
    });
    assert_eq!(
        uas.bye(Duration::from_secs(15)),
        Some(200),
        "BYE from leg B"
    );
    let (_ua, got) = handle.join().unwrap();
    assert!(got.is_some(), "leg A got no BYE after leg B hung up");
    assert_channels(&edge, 0.0, Duration::from_secs(10), "after BYE from leg B");
}
