//! The fraud corpus (issue 10): every way around a key's limits that we know
//! of, each tried against the real `tollgate` binary. Each test's doc comment
//! names the attack it tries; the SPEC section it breaks is in the block's
//! heading. A reader sees the whole threat list here, in one file.
//!
//! cargo test -p tollgate --test fraud_corpus
mod common;
mod trunk_support;

// ==== hierarchy limits (SPEC §2): children share their ancestors' limits ====
mod hierarchy_limits {
    use super::common::*;
    use super::trunk_support::*;
    use std::time::{Duration, Instant};

    /// Creates a key under `parent` (a key string) in `data`.
    fn child_of(data: &std::path::Path, parent: &str, name: &str, extra: &[&str]) -> String {
        let pid = key_id(parent);
        let mut args = vec!["--parent", pid.as_str()];
        args.extend_from_slice(extra);
        create_key(data, name, &args)
    }

    fn call(ua: &mut UdpUa, key: &str) -> (Req, SipMsg) {
        place_call(
            ua,
            SERVICE,
            "alice",
            &token(key, SERVICE, "alice"),
            Duration::from_secs(20),
        )
    }

    /// Attack: a child key with `--max-calls 1` places a call while its
    /// parent's only channel is busy (children multiplying their parent's
    /// concurrent calls). Want 486, and a sibling likewise.
    #[test]
    fn child_call_while_the_parents_only_channel_is_busy_gets_486() {
        let dir = TestDir::new("fc-hier-busy");
        let data = dir.join("data");
        let parent = create_key(&data, "parent", &["--max-calls", "1"]);
        let child = child_of(&data, &parent, "child", &["--max-calls", "1"]);
        let sibling = child_of(&data, &parent, "sibling", &["--max-calls", "1"]);
        let uas = MiniUas::start(UasMode::Answer);
        let edge = Edge::start_in(dir, cfg(EdgeConfig::routed_to(uas.addr.port())));
        let mut ua = UdpUa::new(edge.sip_udp);

        let (inv, ok) = call(&mut ua, &parent);
        assert_eq!(code(&ok), 200, "parent's call:\n{}", ok.text());
        ack(&ua, &inv, &ok);
        for (who, key) in [("child", &child), ("sibling", &sibling)] {
            let (_, busy) = call(&mut ua, key);
            assert_eq!(
                code(&busy),
                486,
                "{who} while the parent's channel is busy:\n{}",
                busy.text()
            );
        }
        assert_eq!(hang_up(&mut ua, &inv, &ok), Some(200));
        assert_channels(
            &edge,
            0.0,
            Duration::from_secs(10),
            "after the parent's call",
        );

        // The child's call now holds the parent's channel: the parent and
        // the sibling are busy until it ends.
        let (inv, ok) = call(&mut ua, &child);
        assert_eq!(code(&ok), 200, "child's call:\n{}", ok.text());
        ack(&ua, &inv, &ok);
        for (who, key) in [("parent", &parent), ("sibling", &sibling)] {
            let (_, busy) = call(&mut ua, key);
            assert_eq!(
                code(&busy),
                486,
                "{who} while the child's call is up:\n{}",
                busy.text()
            );
        }
        assert_eq!(hang_up(&mut ua, &inv, &ok), Some(200));
        assert_channels(
            &edge,
            0.0,
            Duration::from_secs(10),
            "after the child's call",
        );
    }

    /// Attack: ten children of a `--cps 1` key each take their own calls per
    /// second. Want: the children and the parent share one call per second
    /// (the rest get 503 + Retry-After).
    #[test]
    fn children_share_their_parents_calls_per_second() {
        let dir = TestDir::new("fc-hier-cps");
        let data = dir.join("data");
        let parent = create_key(&data, "parent", &["--cps", "1"]);
        let kids: Vec<String> = (0..3)
            .map(|i| child_of(&data, &parent, &format!("kid{i}"), &["--cps", "1"]))
            .collect();
        let uas = MiniUas::start(UasMode::Busy);
        let edge = Edge::start_in(dir, cfg(EdgeConfig::routed_to(uas.addr.port())));
        let mut ua = UdpUa::new(edge.sip_udp);
        // Tokens minted up front, so the calls go out back to back.
        let tokens: Vec<String> = (0..6)
            .map(|i| token(&kids[i % kids.len()], SERVICE, "alice"))
            .collect();
        let start = Instant::now();
        let (mut admitted, mut limited) = (0u64, 0u64);
        for t in &tokens {
            let (_, fin) = place_call(&mut ua, SERVICE, "alice", t, Duration::from_secs(20));
            match code(&fin) {
                486 => admitted += 1, // past admission; leg B is busy
                503 => {
                    assert!(fin.header("Retry-After").is_some(), "{}", fin.text());
                    limited += 1
                }
                c => panic!("unexpected {c}:\n{}", fin.text()),
            }
        }
        let elapsed = start.elapsed().as_secs();
        assert!(
            admitted <= 1 + elapsed,
            "{admitted} calls admitted in {elapsed} s on a shared 1 cps"
        );
        assert!(limited >= 1 || elapsed >= 5, "no 503 in {elapsed} s");
    }

    /// Attack: several calls of one 1-minute key answered together, each
    /// hoping to get the whole remaining budget. Want: all are cut once the
    /// key's minute is spent, total billable <= 60 s + 2 s per call.
    #[test]
    fn three_calls_of_a_1_minute_key_answered_together_share_the_minute() {
        let dir = TestDir::new("fc-hier-budget");
        let data = dir.join("data");
        let key = create_key(&data, "minute", &["--daily-minutes", "1"]);
        let uas = MiniUas::start(UasMode::Answer);
        let edge = Edge::start_in(dir, cfg(EdgeConfig::routed_to(uas.addr.port())));
        assert_budget_shared(&edge, &[&key, &key, &key]);
    }

    /// Attack: a child key and its parent each spend "their" daily minute
    /// at once. Want: the parent's minute bounds both (and a third call of
    /// another child); total billable <= 60 s + 2 s per call.
    #[test]
    fn a_parents_daily_minute_bounds_its_childrens_calls() {
        let dir = TestDir::new("fc-hier-budget-tree");
        let data = dir.join("data");
        let parent = create_key(&data, "parent", &["--daily-minutes", "1"]);
        let a = child_of(&data, &parent, "a", &["--daily-minutes", "1"]);
        let b = child_of(&data, &parent, "b", &["--daily-minutes", "1"]);
        let uas = MiniUas::start(UasMode::Answer);
        let edge = Edge::start_in(dir, cfg(EdgeConfig::routed_to(uas.addr.port())));
        assert_budget_shared(&edge, &[&parent, &a, &b]);
        let mut ua = UdpUa::new(edge.sip_udp);
        for k in [&parent, &a, &b] {
            let (_, fin) = call(&mut ua, k);
            assert_eq!(
                code(&fin),
                402,
                "after the parent's minute:\n{}",
                fin.text()
            );
        }
    }

    /// Places one answered call per key at once and waits for the edge to
    /// cut them all; asserts the CDRs' billable total.
    fn assert_budget_shared(edge: &Edge, keys: &[&str]) {
        let mut ua = UdpUa::new(edge.sip_udp);
        let mut calls = Vec::new();
        for k in keys {
            let (inv, ok) = call(&mut ua, k);
            assert_eq!(code(&ok), 200, "call:\n{}", ok.text());
            ack(&ua, &inv, &ok);
            calls.push(inv.call_id.clone());
        }
        for cid in &calls {
            assert!(
                answer_bye(&mut ua, cid, Duration::from_secs(120)).is_some(),
                "call {cid} was not cut within 120 s"
            );
        }
        assert_channels(edge, 0.0, Duration::from_secs(10), "after the budget cut");
        let cdrs = poll(Duration::from_secs(10), || {
            let (cdrs, _) = read_cdrs(&edge.data_dir);
            let answered: Vec<_> = cdrs.into_iter().filter(cdr_answered).collect();
            (answered.len() == keys.len()).then_some(answered)
        })
        .expect("one answered CDR per call");
        let total: i64 = cdrs
            .iter()
            .map(|c| c.int("billable_secs").unwrap_or(0))
            .sum();
        let bound = 60 + 2 * keys.len() as i64;
        eprintln!(
            "[budget] {} calls billed {total} s (bound {bound})",
            keys.len()
        );
        assert!(total <= bound, "billed {total} s > {bound}: {cdrs:?}");
        assert!(
            total >= 50,
            "billed only {total} s of a 60 s budget: {cdrs:?}"
        );
        for c in &cdrs {
            assert_eq!(c.str("cause"), Some("limit_reached"), "{c:?}");
        }
    }
}
