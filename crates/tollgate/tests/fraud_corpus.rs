mod common;
mod trunk_support;

// ==== restarts_and_crashes: single use across kill -9, and no call up at a crash unbilled ====
mod restarts_and_crashes {
    use super::common::*;
    use super::trunk_support::*;
    use std::fs;
    use std::thread;
    use std::time::{Duration, Instant};

    const CALL_WAIT: Duration = Duration::from_secs(20);

    /// An edge on `root/edge` (kept when the edge is dropped, so that the next
    /// one starts on the same data dir) with checkpoints every `checkpoint_s`.
    fn edge_on(root: &TestDir, checkpoint_s: u64) -> Edge {
        edge_with(root, checkpoint_s, "")
    }

    /// [`edge_on`] with `extra` appended to the config.
    fn edge_with(root: &TestDir, checkpoint_s: u64, extra: &str) -> Edge {
        let dir = root.join("edge");
        fs::create_dir_all(&dir).unwrap();
        let mut c = cfg(EdgeConfig::default());
        c.extra_toml.push_str(&format!(
            "\n[trunk]\ncheckpoint_s = {checkpoint_s}\n{extra}"
        ));
        Edge::start_in(TestDir { path: dir }, c)
    }

    /// GET `path` on the edge's admin API with the bearer `key`; the body.
    fn admin_get(edge: &Edge, key: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let addr = edge.listening("admin").expect("admin address");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "GET {path}: {out}");
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// A complete call to the built-in echo with a bearer token.
    fn completed_call(edge: &Edge, tok: &str) {
        let mut ua = UdpUa::new(edge.sip_udp);
        let (req, fin) = place_call(&mut ua, SERVICE, "alice", tok, CALL_WAIT);
        assert_eq!(code(&fin), 200, "first use of the token:\n{}", fin.text());
        assert_eq!(ua.ack_and_bye(&req, &fin), Some(200));
    }

    /// Attack: replay a bearer token (same `jti`) after making the edge
    /// forget it by crashing it (`kill -9`) and letting it restart.
    #[test]
    fn bearer_token_replayed_after_kill_9_gets_invalid_token() {
        let root = TestDir::new("fc-jti");
        let mut edge = edge_on(&root, 10);
        let key = edge.first_key();
        let tok = token(&key, SERVICE, "alice");
        completed_call(&edge, &tok);
        // Killed right after the use: no fsync, no graceful shutdown.
        kill9_and_wait(&mut edge);

        let edge2 = edge_on(&root, 10);
        let mut ua = UdpUa::new(edge2.sip_udp);
        let (_, fin) = place_call(&mut ua, SERVICE, "alice", &tok, CALL_WAIT);
        assert_invalid_token(
            &fin,
            "token used before the kill -9, replayed after the restart",
        );
        // The call that ended before the kill has its one CDR, no edge_lost.
        let (cdrs, _) = read_cdrs(&edge2.data_dir);
        let causes: Vec<_> = cdrs.iter().map(|c| c.str("cause").unwrap_or("")).collect();
        assert_eq!(causes, ["normal"], "{cdrs:?}");
        // The edge is otherwise fine: a fresh token of the same key works.
        completed_call(&edge2, &token(&key, SERVICE, "alice"));
        drop(edge);
    }

    /// A digest INVITE answering `challenge` (MD5).
    fn digest_invite(challenge: &SipMsg, first: &Req, key: &str) -> Req {
        let ch = www_auth(challenge);
        let (_, p) = ch
            .iter()
            .find(|(s, p)| {
                s.eq_ignore_ascii_case("Digest")
                    && p.get("algorithm").map_or("MD5", |a| a.as_str()) == "MD5"
            })
            .unwrap_or_else(|| panic!("no Digest MD5 challenge:\n{}", challenge.text()));
        let mut r = first.clone();
        r.branch = unique("z9hG4bK-tg");
        r.cseq += 1;
        let auth = digest_authorization(
            p,
            &key_id(key),
            &digest_password(key),
            "INVITE",
            &r.ruri,
            "00000001",
            &unique("cn"),
        );
        r.header("Authorization", &auth)
    }

    /// A digest round (401 challenge, answered INVITE) to the echo; returns
    /// the answered INVITE after the call completed.
    fn digest_call(edge: &Edge, key: &str) -> Req {
        let mut ua = UdpUa::new(edge.sip_udp);
        let first = Req::invite(edge.sip_udp, SERVICE, "pbx");
        let ch = ua.call(&first);
        assert_eq!(code(&ch), 401, "{}", ch.text());
        let r = digest_invite(&ch, &first, key);
        let fin = ua.call(&r);
        assert_eq!(code(&fin), 200, "digest call:\n{}", fin.text());
        assert_eq!(ua.ack_and_bye(&r, &fin), Some(200));
        r
    }

    /// Attack: replay a digest `Authorization` (same nonce, same response)
    /// that was used before a `kill -9` of the edge, after its restart.
    #[test]
    fn digest_nonce_used_before_kill_9_is_refused_after_restart() {
        let root = TestDir::new("fc-nonce");
        let mut edge = edge_on(&root, 10);
        let key = edge.first_key();
        let used = digest_call(&edge, &key);
        kill9_and_wait(&mut edge);

        let edge2 = edge_on(&root, 10);
        let mut ua = UdpUa::new(edge2.sip_udp);
        let mut replay = used.clone();
        replay.branch = unique("z9hG4bK-tg");
        replay.cseq += 1;
        replay.ruri = format!("sip:{SERVICE}@{}", edge2.sip_udp);
        let fin = ua.call(&replay);
        assert_eq!(
            code(&fin),
            401,
            "nonce used before the crash, replayed after it:\n{}",
            fin.text()
        );
        assert!(
            www_auth(&fin)
                .iter()
                .any(|(s, _)| s.eq_ignore_ascii_case("Digest")),
            "the refusal offers a fresh digest round:\n{}",
            fin.text()
        );
        // A fresh digest round works.
        digest_call(&edge2, &key);
        drop(edge);
    }

    struct UpCall {
        a_call_id: String,
        answered: Instant,
    }

    /// `n` answered calls to the echo, left up.
    fn calls_up(edge: &Edge, key: &str, n: usize) -> (UdpUa, Vec<UpCall>) {
        let mut ua = UdpUa::new(edge.sip_udp);
        let mut up = vec![];
        for _ in 0..n {
            let tok = token(key, SERVICE, "alice");
            let (req, fin) = place_call(&mut ua, SERVICE, "alice", &tok, CALL_WAIT);
            let answered = Instant::now();
            assert_eq!(code(&fin), 200, "{}", fin.text());
            ack(&ua, &req, &fin);
            up.push(UpCall {
                a_call_id: req.call_id.clone(),
                answered,
            });
            thread::sleep(Duration::from_millis(700));
        }
        (ua, up)
    }

    fn cdrs_of<'a>(cdrs: &'a [Json], a_call_id: &str) -> Vec<&'a Json> {
        cdrs.iter()
            .filter(|c| c.str("sip_call_id") == Some(a_call_id))
            .collect()
    }

    /// Attack: place calls and crash the edge (`kill -9`) while they are up,
    /// hoping that calls without an end are never billed or counted against
    /// the budget. Each must get exactly one `edge_lost` CDR billed to within
    /// `checkpoint_s` (+1 s) of its true up time, counted by `tollgate usage`,
    /// and a second restart must add none.
    #[test]
    fn calls_up_at_kill_9_each_get_exactly_one_edge_lost_cdr() {
        const CHECKPOINT_S: u64 = 1;
        let root = TestDir::new("fc-lost");
        // Calls with the token claim model = "silent" ring forever.
        let silent = SilentUas::start();
        let routes = format!(
            "\n[[routes]]\nmodel = \"silent\"\ntarget = \"{}\"\nmedia = \"rtp\"\n",
            silent.route()
        );
        let mut edge = edge_with(&root, CHECKPOINT_S, &routes);
        let key = edge.first_key();
        let id = key_id(&key);
        let (ua, up) = calls_up(&edge, &key, 3);
        // And one admitted call that is still ringing at the crash.
        let now = now_unix();
        let ringing_tok = jwt_for(
            &key,
            &format!(
                "{{\"iat\":{},\"exp\":{},\"jti\":\"{}\",\"to\":\"{SERVICE}\",\"from\":\"alice\",\"model\":\"silent\"}}",
                now - 5,
                now + 600,
                unique("jti-")
            ),
        );
        let ringing = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&ringing_tok);
        ua.send(&ringing);
        poll(Duration::from_secs(10), || {
            silent
                .drain()
                .iter()
                .any(|m| m.method() == Some("INVITE"))
                .then_some(())
        })
        .expect("the ringing call never reached its destination");
        thread::sleep(Duration::from_millis(2500));
        let killed = Instant::now();
        kill9_and_wait(&mut edge);
        let data_dir = edge.data_dir.clone();
        let (before, _) = read_cdrs(&data_dir);
        for c in &up {
            assert!(
                cdrs_of(&before, &c.a_call_id).is_empty(),
                "CDR before the crash?"
            );
        }

        let mut edge2 = edge_on(&root, CHECKPOINT_S);
        let (cdrs, torn) = read_cdrs(&data_dir);
        assert_eq!(torn, None);
        for c in &up {
            let mine = cdrs_of(&cdrs, &c.a_call_id);
            assert_eq!(mine.len(), 1, "CDRs of {}: {mine:?}", c.a_call_id);
            let cdr = mine[0];
            assert_eq!(cdr.str("cause"), Some("edge_lost"), "{cdr:?}");
            assert_eq!(cdr.str("key_id"), Some(id.as_str()), "{cdr:?}");
            assert!(cdr_answered(cdr), "{cdr:?}");
            let billed = cdr.int("billable_secs").unwrap() as f64;
            let true_up = killed.duration_since(c.answered).as_secs_f64();
            assert!(
                billed <= true_up + 1.0 && billed >= true_up - CHECKPOINT_S as f64 - 1.0,
                "billed {billed} s for a call up {true_up:.2} s (checkpoint_s {CHECKPOINT_S}): {cdr:?}"
            );
            eprintln!("[edge_lost] up {true_up:.2} s, billed {billed} s");
        }
        let rung = cdrs_of(&cdrs, &ringing.call_id);
        assert_eq!(rung.len(), 1, "CDRs of the ringing call: {rung:?}");
        assert_eq!(rung[0].str("cause"), Some("edge_lost"), "{:?}", rung[0]);
        assert!(!cdr_answered(rung[0]), "{:?}", rung[0]);
        assert_eq!(rung[0].int("billable_secs"), Some(0), "{:?}", rung[0]);
        let mine = totals_of(&cdrs);
        assert_eq!(mine[0], up.len() as u64 + 1, "only our calls: {cdrs:?}");
        // The admin API counts them too.
        let api = admin_get(&edge2, &key, "/v1/usage");
        assert!(
            api.contains(&format!("\"billable_secs\":{}", mine[3])),
            "GET /v1/usage vs {mine:?}: {api}"
        );
        assert!(api.contains("\"edge_lost\":1"), "GET /v1/usage: {api}");
        let usage = usage_table(&data_dir, &[]);
        assert_eq!(usage.get("total"), Some(&mine), "tollgate usage: {usage:?}");
        assert_eq!(usage.get(&id), Some(&mine), "tollgate usage: {usage:?}");

        // Crash again right away (nothing up): the next start adds nothing.
        kill9_and_wait(&mut edge2);
        let edge3 = edge_on(&root, CHECKPOINT_S);
        let (again, _) = read_cdrs(&data_dir);
        assert_eq!(
            again.len(),
            cdrs.len(),
            "a second restart wrote CDRs: {again:?}"
        );
        assert_eq!(usage_table(&data_dir, &[]), usage);
        drop((edge, edge2, edge3));
    }
}
