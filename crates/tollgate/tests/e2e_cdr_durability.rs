//! CDR durability (issue 4): `kill -9` of the edge under a SIPp load of short
//! calls; every call that had ended more than one second before the kill is
//! in `<data-dir>/cdrs.jsonl`, none is there twice, and after a restart on the
//! same data dir `tollgate usage` reports the file's totals plus one
//! `edge_lost` CDR per call that was up at the kill (issue 10).
//!
//! cargo test -p tollgate --test e2e_cdr_durability
mod common;
mod trunk_support;

use common::*;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use trunk_support::*;

fn unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn kill_9_under_load_keeps_every_ended_call_once_and_restart_reports_same_usage() {
    require_sipp();
    const CALLS: usize = 240; // 20 cps: 12 s of offered load; the kill comes at ~6 s
    let root = TestDir::new("cdrdur");
    let edge_dir = root.join("edge");
    fs::create_dir_all(&edge_dir).unwrap();
    // The edge's TestDir would delete the data dir when the first edge is
    // dropped; both edges are given the same path and `root` outlives them.
    let mut edge = Edge::start_in(
        TestDir {
            path: edge_dir.clone(),
        },
        cfg(EdgeConfig::default()),
    );
    let key = edge.first_key();
    let id = key_id(&key);
    let data_dir = edge.data_dir.clone();

    let tokens: Vec<String> = (0..CALLS).map(|_| token(&key, SERVICE, "sipp")).collect();
    let inf = root.join("tokens.csv");
    write_inf(&inf, &tokens);
    let started = unix_f64();
    let sipp = Sipp::new(&root.path, "uac_load", "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&inf)
        .rate(20)
        .calls(CALLS as u32)
        .pause_ms(200)
        .args(&[
            "-recv_timeout",
            "4s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(60))
        .spawn();

    thread::sleep(Duration::from_secs(6));
    let killed_at = unix_f64();
    kill9_and_wait(&mut edge);
    eprintln!("[cdr] edge killed: {:?}", edge.exit_status());
    // Keep the dead edge's log: the restart writes a new one at the same path.
    let _ = fs::copy(&edge.stderr_path, root.join("edge1.stderr"));

    // The rest of the SIPp calls fail (no edge); let it give up.
    let r = sipp.wait_at_most(Duration::from_secs(40));
    let log = sipp_log(&r.messages);
    let off = tz_offset(&log, started);
    // Calls whose BYE got its 200 more than 1 s before the kill.
    let mut ended_before: HashSet<String> = HashSet::new();
    let mut ended_any: HashSet<String> = HashSet::new();
    for e in &log {
        if !e.sent && e.msg.code() == Some(200) && e.msg.cseq().is_some_and(|(_, m)| m == "BYE") {
            let cid = e.msg.call_id().unwrap_or("").to_string();
            ended_any.insert(cid.clone());
            if e.ts - off < killed_at - 1.0 {
                ended_before.insert(cid);
            }
        }
    }
    let first_invite = log
        .iter()
        .find(|e| e.sent && e.msg.method() == Some("INVITE"))
        .map(|e| e.ts - off);
    eprintln!(
        "[cdr] SIPp: first INVITE {:.2} s after spawn, kill at +{:.2} s; {} calls ended (BYE 200) more than 1 s before the kill, {} in all; SIPp created {}, successful {}, failed {}",
        first_invite.unwrap_or(f64::NAN) - started,
        killed_at - started,
        ended_before.len(),
        ended_any.len(),
        r.created(),
        r.successful(),
        r.failed()
    );
    assert!(
        ended_before.len() >= 40,
        "the load did not get going: only {} calls ended more than 1 s before the kill\n{}",
        ended_before.len(),
        r.summary()
    );
    assert!(
        ended_any.len() < CALLS,
        "the kill came after the load had finished ({} calls ended): not a kill under load",
        ended_any.len()
    );

    // 1. every call that ended > 1 s before the kill is in the store, once
    let raw = fs::read_to_string(data_dir.join("cdrs.jsonl")).unwrap_or_default();
    let (cdrs, torn) = read_cdrs(&data_dir);
    eprintln!(
        "[cdr] file: {} bytes, {} complete lines, torn tail: {:?}",
        raw.len(),
        cdrs.len(),
        torn
    );
    let answered = cdrs.iter().filter(|c| cdr_answered(c)).count();
    assert!(
        answered >= ended_before.len(),
        "{} calls had ended more than 1 s before kill -9 but only {answered} answered CDRs are in the store ({} lines)",
        ended_before.len(),
        cdrs.len()
    );
    assert!(
        answered <= ended_any.len() + 5,
        "{answered} answered CDRs but the UAC saw only {} calls end",
        ended_any.len()
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, c) in cdrs.iter().enumerate() {
        for f in ["call_id", "key_id", "trunk", "from", "to", "cause"] {
            assert!(
                c.str(f).is_some(),
                "CDR line {i} lacks string field {f}: {c:?}"
            );
        }
        for f in ["start", "end", "billable_secs"] {
            assert!(
                c.int(f).is_some(),
                "CDR line {i} lacks integer field {f}: {c:?}"
            );
        }
        assert!(
            c.get("answer").is_some(),
            "CDR line {i} lacks answer: {c:?}"
        );
        assert_eq!(c.str("key_id"), Some(id.as_str()), "CDR line {i}: {c:?}");
        // The caller's own Call-ID (SIPp's "<n>-<pid>@<ip>") rides along.
        assert!(
            c.str("sip_call_id")
                .is_some_and(|v| v.contains('@') && !v.ends_with("@tollgate")),
            "CDR line {i} lacks the caller's Call-ID: {c:?}"
        );
        if let Some(prev) = seen.insert(c.str("call_id").unwrap().to_string(), i) {
            panic!("call_id twice in the CDR store: lines {prev} and {i}: {c:?}");
        }
    }

    // 2. usage from the file, by the test and by the CLI, before the restart
    let mine = totals_of(&cdrs);
    let before = usage_table(&data_dir, &[]);
    assert_eq!(
        before.get("total"),
        Some(&mine),
        "`tollgate usage` after the kill vs the test's own sum of cdrs.jsonl [calls, answered, failed, billable]: {before:?}"
    );
    assert_eq!(before.get(&id), Some(&mine), "per-key row: {before:?}");

    // 3. restart on the same data dir: same totals, nothing written twice
    let edge2 = Edge::start_in(
        TestDir {
            path: edge_dir.clone(),
        },
        cfg(EdgeConfig::default()),
    );
    assert_eq!(edge2.data_dir, data_dir);
    assert!(
        edge2.first_key.is_none(),
        "the restarted edge must keep its keys, not make a new first key"
    );
    // The restart adds one `edge_lost` CDR per call that was up at the kill
    // (issue 10) and changes nothing else.
    let (cdrs2, torn2) = read_cdrs(&data_dir);
    assert!(torn2.is_none(), "the restart left a torn tail: {torn2:?}");
    assert_eq!(
        cdrs2[..cdrs.len().min(cdrs2.len())],
        cdrs[..],
        "the restart changed the complete CDR lines"
    );
    let lost = &cdrs2[cdrs.len()..];
    assert!(
        lost.iter().all(|c| c.str("cause") == Some("edge_lost")),
        "the restart wrote CDRs other than edge_lost: {lost:?}"
    );
    assert!(
        lost.len() <= CALLS - ended_any.len(),
        "{} edge_lost CDRs but at most {} calls can have been up",
        lost.len(),
        CALLS - ended_any.len()
    );
    let mut all_ids = HashSet::new();
    assert!(
        cdrs2
            .iter()
            .all(|c| all_ids.insert(c.str("call_id").unwrap().to_string())),
        "a call_id twice after the restart"
    );
    eprintln!("[cdr] restart recorded {} edge_lost calls", lost.len());
    let mine2 = totals_of(&cdrs2);
    let after = usage_table(&data_dir, &[]);
    assert_eq!(
        after.get("total"),
        Some(&mine2),
        "usage after the restart vs the file's CDRs (edge_lost ones included): {after:?}"
    );
    let since_all = usage_table(&data_dir, &["--key", &id, "--since", "0"]);
    assert_eq!(
        since_all.get(&id),
        Some(&mine2),
        "--key --since 0: {since_all:?}"
    );
    let cdrs = cdrs2;

    // The restarted edge works and appends exactly one more CDR for one call.
    let mut ua = UdpUa::new(edge2.sip_udp);
    let (inv, ok) = place_call(
        &mut ua,
        SERVICE,
        "alice",
        &token(&key, SERVICE, "alice"),
        Duration::from_secs(20),
    );
    assert_eq!(code(&ok), 200, "call after restart:\n{}", ok.text());
    ack(&ua, &inv, &ok);
    assert_eq!(hang_up(&mut ua, &inv, &ok), Some(200));
    let grown = poll(Duration::from_secs(5), || {
        let (c, _) = read_cdrs(&data_dir);
        (c.len() == cdrs.len() + 1).then_some(c)
    })
    .unwrap_or_else(|| panic!("expected {} CDR lines after one more call", cdrs.len() + 1));
    let t3 = usage_table(&data_dir, &[]);
    assert_eq!(
        t3.get("total").map(|r| r[0]),
        Some(mine2[0] + 1),
        "usage after one more call: {t3:?}"
    );
    drop(grown);
    drop(edge2);
    drop(edge);
}
