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

        // The parent's call holds its only channel: its children are busy.
        holding_a_call(
            &edge,
            &mut ua,
            ("parent", &parent),
            &[("child", &child), ("sibling", &sibling)],
        );
        // The child's call holds the parent's channel too: the parent and
        // the sibling are busy until it ends.
        holding_a_call(
            &edge,
            &mut ua,
            ("child", &child),
            &[("parent", &parent), ("sibling", &sibling)],
        );
    }

    /// While `holder`'s call is up, each of `busy` gets 486; then the call
    /// ends and every channel is free again.
    fn holding_a_call(edge: &Edge, ua: &mut UdpUa, holder: (&str, &str), busy: &[(&str, &String)]) {
        let (inv, ok) = call(ua, holder.1);
        assert_eq!(code(&ok), 200, "{}'s call:\n{}", holder.0, ok.text());
        ack(ua, &inv, &ok);
        for (who, key) in busy {
            let (_, refused) = call(ua, key);
            assert_eq!(
                code(&refused),
                486,
                "{who} while {}'s call is up:\n{}",
                holder.0,
                refused.text()
            );
        }
        assert_eq!(hang_up(ua, &inv, &ok), Some(200));
        assert_channels(edge, 0.0, Duration::from_secs(10), "after the call");
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

// ==== sources_and_hierarchy_reach: source_cidrs restrict every credential, trusted_cidrs admit without one, a keys-scoped key reaches only its subtree ====
mod sources_and_hierarchy_reach {
    use super::common::*;
    use serde_json::{json, Value};
    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, Instant};

    const FROM: &str = "15550001111";

    /// An edge whose calls end at a busy UAS: 486 proves a call got past
    /// authentication, 403/401 that it did not.
    fn busy_edge() -> (MiniUas, Edge) {
        let uas = MiniUas::start(UasMode::Busy);
        let edge = Edge::start(EdgeConfig {
            route_target: Some(uas.route()),
            ..Default::default()
        });
        (uas, edge)
    }

    /// A UDP user agent sending from `ip` (127.0.0.2/127.0.0.3 are other
    /// loopback sources on Linux).
    fn ua_from(edge: &Edge, ip: &str) -> UdpUa {
        UdpUa::from_ip(edge.sip_udp, ip)
    }

    /// Final response code to a bearer INVITE made with `key`, sent from `ip`.
    fn bearer_from(edge: &Edge, key: &str, ip: &str) -> SipMsg {
        let n = now_unix();
        let t = jwt_for(key, &claims(n - 5, n + 300, SERVICE, FROM));
        let mut ua = ua_from(edge, ip);
        ua.call(&Req::invite(edge.sip_udp, SERVICE, FROM).bearer(&t))
    }

    /// A digest call from `ip`: a credential-less INVITE for the challenge,
    /// then the answer; returns the final response to the answer.
    fn digest_from(edge: &Edge, key: &str, ip: &str) -> SipMsg {
        let mut ua = ua_from(edge, ip);
        let first = Req::invite(edge.sip_udp, SERVICE, FROM);
        let ch = ua.call(&first);
        assert_eq!(ch.code(), Some(401), "challenge: {}", ch.text());
        let (_, p) = www_auth(&ch)
            .into_iter()
            .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
            .unwrap_or_else(|| panic!("no Digest challenge: {}", ch.text()));
        let mut r = first.clone();
        r.branch = unique("z9hG4bK-src");
        r.cseq += 1;
        let auth = digest_authorization(
            &p,
            &key_id(key),
            &digest_password(key),
            "INVITE",
            &r.ruri,
            "00000001",
            &unique("cn"),
        );
        ua.call(&r.header("Authorization", &auth))
    }

    /// Waits until the edge has loaded a key made with the CLI: `probe`
    /// stops answering 401 (unknown key) within 5 s.
    fn until_loaded(mut probe: impl FnMut() -> SipMsg) -> SipMsg {
        let t0 = Instant::now();
        loop {
            let r = probe();
            if r.code() != Some(401) || t0.elapsed() > Duration::from_secs(5) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The admin API (plain HTTP on loopback, the default), requests sent
    /// from a chosen local address.
    struct Admin {
        rt: tokio::runtime::Runtime,
        base: String,
    }

    impl Admin {
        fn of(edge: &Edge) -> Admin {
            let addr: SocketAddr = edge
                .listening("admin")
                .expect("`listening admin ADDR` line before ready");
            Admin {
                rt: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap(),
                base: format!("http://{addr}"),
            }
        }

        /// (status, JSON body) of `method path` with `key`, sent from `ip`.
        fn send(
            &self,
            ip: &str,
            method: reqwest::Method,
            path: &str,
            key: &str,
            body: Option<Value>,
        ) -> (u16, Value) {
            let local: IpAddr = ip.parse().unwrap();
            self.rt.block_on(async {
                let client = reqwest::Client::builder()
                    .local_address(local)
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                let mut req = client
                    .request(method.clone(), format!("{}{path}", self.base))
                    .header("authorization", format!("Bearer {key}"));
                if let Some(b) = body {
                    req = req.json(&b);
                }
                let resp = req
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            })
        }

        fn get(&self, path: &str, key: &str) -> (u16, Value) {
            self.send("127.0.0.1", reqwest::Method::GET, path, key, None)
        }
        fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
            self.send("127.0.0.1", reqwest::Method::POST, path, key, Some(body))
        }
        fn delete(&self, path: &str, key: &str) -> (u16, Value) {
            self.send("127.0.0.1", reqwest::Method::DELETE, path, key, None)
        }

        /// Waits until a key made with the CLI is known to the admin API.
        fn until_loaded(&self, ip: &str, key: &str) -> (u16, Value) {
            let t0 = Instant::now();
            loop {
                let r = self.send(ip, reqwest::Method::GET, "/v1/keys", key, None);
                if r.0 != 401 || t0.elapsed() > Duration::from_secs(5) {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `keys create EXTRA...` in the edge's data directory must fail with
    /// exit 2 and an error naming `field`.
    fn refused_create(edge: &Edge, extra: &[&str], field: &str) {
        let dir = edge.data_dir.to_str().unwrap();
        let mut args = vec!["--data-dir", dir, "keys", "create", "--name", "refused"];
        args.extend_from_slice(extra);
        let o = tollgate(&args);
        assert_eq!(o.status.code(), Some(2), "{}", describe_output(&args, &o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(field), "error must name {field}: {err}");
    }

    fn listed_ids(body: &Value) -> Vec<String> {
        let mut ids: Vec<String> = body["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("no keys list: {body}"))
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// A key pinned to 127.0.0.2/32 gets through from there (486 from the
    /// busy UAS) and 403 from 127.0.0.1 and 127.0.0.3, with `call`'s credential.
    fn pinned_key_is_refused_elsewhere(call: fn(&Edge, &str, &str) -> SipMsg) {
        let (_uas, edge) = busy_edge();
        let key = edge.create_key("pinned", &["--source-cidr", "127.0.0.2/32"]);
        let ok = until_loaded(|| call(&edge, &key, "127.0.0.2"));
        assert_eq!(ok.code(), Some(486), "from its source:\n{}", ok.text());
        for elsewhere in ["127.0.0.1", "127.0.0.3"] {
            let r = call(&edge, &key, elsewhere);
            assert_eq!(r.code(), Some(403), "from {elsewhere}:\n{}", r.text());
        }
    }

    /// Attack: use a leaked key's bearer token from somewhere other than the
    /// key's `source_cidrs` (SPEC §2). Expect 403 from 127.0.0.1 for a key
    /// restricted to 127.0.0.2/32, while the same key works from 127.0.0.2.
    #[test]
    fn bearer_invite_from_outside_source_cidrs_gets_403() {
        pinned_key_is_refused_elsewhere(bearer_from);
    }

    /// Attack: the same, with a digest credential (a leaked PBX password).
    #[test]
    fn digest_invite_from_outside_source_cidrs_gets_403() {
        pinned_key_is_refused_elsewhere(digest_from);
    }

    /// Attack: a child key escapes its parent's source restriction by having
    /// none of its own (or being given one the parent did not restrict to).
    #[test]
    fn child_key_is_held_to_its_parents_source_cidrs() {
        let (_uas, edge) = busy_edge();
        let parent = edge.create_key("parent", &["--source-cidr", "127.0.0.0/30"]);
        let parent_id = key_id(&parent);
        refused_create(
            &edge,
            &["--parent", &parent_id, "--source-cidr", "127.0.0.0/8"],
            "source_cidrs",
        );
        let child = edge.create_key(
            "child",
            &[
                "--parent",
                &key_id(&parent),
                "--source-cidr",
                "127.0.0.2/32",
            ],
        );
        let ok = until_loaded(|| bearer_from(&edge, &child, "127.0.0.2"));
        assert_eq!(
            ok.code(),
            Some(486),
            "child from its source:\n{}",
            ok.text()
        );
        let r = bearer_from(&edge, &child, "127.0.0.1");
        assert_eq!(
            r.code(),
            Some(403),
            "child from its parent's other source:\n{}",
            r.text()
        );
        let r = bearer_from(&edge, &parent, "127.0.0.1");
        assert_eq!(r.code(), Some(486), "parent from its source:\n{}", r.text());
    }

    /// Attack: call the admin API with a leaked secret key from outside its
    /// `source_cidrs`: 403, while the same request from its source works.
    #[test]
    fn admin_api_request_from_outside_source_cidrs_gets_403() {
        let (_uas, edge) = busy_edge();
        let api = Admin::of(&edge);
        let key = edge.create_key("ops", &["--source-cidr", "127.0.0.2/32"]);
        let (status, body) = api.until_loaded("127.0.0.2", &key);
        assert_eq!(status, 200, "from its source: {body}");
        let (status, body) = api.get("/v1/keys", &key);
        assert_eq!(status, 403, "from elsewhere: {body}");
        assert_eq!(body["error"]["code"], "source_not_allowed", "{body}");
        let (status, _) = api.post("/v1/keys", &key, json!({"name": "x"}));
        assert_eq!(status, 403);
        // A key the restricted one makes is held to it too.
        let (status, made) = api.send(
            "127.0.0.2",
            reqwest::Method::POST,
            "/v1/keys",
            &key,
            Some(json!({"name": "child"})),
        );
        assert_eq!(status, 201, "{made}");
        assert_eq!(made["limits"]["source_cidrs"], json!(["127.0.0.2/32"]));
        let child = made["key"].as_str().unwrap().to_string();
        assert_eq!(api.get("/v1/keys", &child).0, 403);
    }

    /// Attack surface kept: a `trusted_cidrs` source (carrier interconnect)
    /// calls without a credential; any other source is challenged, and a bad
    /// credential from the trusted source is still refused.
    #[test]
    fn trusted_cidrs_source_calls_without_a_credential() {
        let (_uas, edge) = busy_edge();
        let _carrier = edge.create_key(
            "carrier",
            &[
                "--source-cidr",
                "127.0.0.3/32",
                "--trust-cidr",
                "127.0.0.3/32",
            ],
        );
        let plain = |ip: &str| ua_from(&edge, ip).call(&Req::invite(edge.sip_udp, SERVICE, FROM));
        let ok = until_loaded(|| plain("127.0.0.3"));
        assert_eq!(ok.code(), Some(486), "trusted source:\n{}", ok.text());
        let r = plain("127.0.0.2");
        assert_eq!(r.code(), Some(401), "untrusted source:\n{}", r.text());
        let mut ua = ua_from(&edge, "127.0.0.3");
        let bad = ua.call(&Req::invite(edge.sip_udp, SERVICE, FROM).bearer("not.a.token"));
        assert_eq!(
            bad.code(),
            Some(401),
            "bad credential from trusted source:\n{}",
            bad.text()
        );
        // trusted_cidrs outside source_cidrs is refused, naming the field.
        refused_create(
            &edge,
            &[
                "--source-cidr",
                "127.0.0.3/32",
                "--trust-cidr",
                "127.0.0.0/24",
            ],
            "trusted_cidrs",
        );
    }

    /// Attack: a key holding only the `keys` scope lists, rolls or revokes
    /// its parent, a sibling or the root key (the old hole: it could roll the
    /// root and receive the new root secret). Each is 404, as if absent; it
    /// can manage itself and its own child.
    #[test]
    fn keys_scoped_key_reaches_only_its_own_subtree() {
        let (_uas, edge) = busy_edge();
        let api = Admin::of(&edge);
        let root = edge.first_key();
        let mk = |by: &str, name: &str, extra: Value| {
            let mut body = json!({"name": name, "scopes": ["keys", "usage"]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let (s, b) = api.post("/v1/keys", by, body);
            assert_eq!(s, 201, "create {name}: {b}");
            b["key"].as_str().unwrap().to_string()
        };
        let team = mk(&root, "team", json!({}));
        let me = mk(&team, "me", json!({}));
        let sibling = mk(&team, "sibling", json!({}));
        let mine = mk(&me, "mine", json!({}));
        // A root key made by the CLI holding only `keys`: another root.
        let ops = edge.create_key("ops", &["--scopes", "keys"]);
        api.until_loaded("127.0.0.1", &ops);

        let (s, b) = api.get("/v1/keys", &me);
        assert_eq!(s, 200, "{b}");
        let mut want = vec![key_id(&me), key_id(&mine)];
        want.sort();
        assert_eq!(listed_ids(&b), want, "lists only its subtree");
        for (who, target) in [("parent", &team), ("sibling", &sibling), ("root", &root)] {
            let id = key_id(target);
            let (s, b) = api.post(&format!("/v1/keys/{id}/roll"), &me, json!({}));
            assert_eq!(s, 404, "roll {who}: {b}");
            assert_eq!(b["error"]["code"], "not_found");
            assert!(b.get("key").is_none(), "a secret leaked: {b}");
            let (s, b) = api.delete(&format!("/v1/keys/{id}"), &me);
            assert_eq!(s, 404, "revoke {who}: {b}");
            let (s, b) = api.post("/v1/keys", &me, json!({"name": "x", "parent": id}));
            assert_eq!(s, 404, "create under {who}: {b}");
            let (s, b) = api.get(&format!("/v1/usage?key={id}"), &me);
            assert_eq!(s, 404, "usage of {who}: {b}");
        }
        // The other root holding only `keys` cannot reach the first root.
        let (s, b) = api.post(&format!("/v1/keys/{}/roll", key_id(&root)), &ops, json!({}));
        assert_eq!(s, 404, "another root rolls the root: {b}");
        let (_, b) = api.get("/v1/keys", &ops);
        assert_eq!(listed_ids(&b), vec![key_id(&ops)]);
        // Its own subtree: create under its child, roll and revoke its child, roll itself.
        let (s, b) = api.post(
            "/v1/keys",
            &me,
            json!({"name": "grandchild", "scopes": ["keys"], "parent": key_id(&mine)}),
        );
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["parent"], key_id(&mine).as_str());
        let (s, b) = api.post(&format!("/v1/keys/{}/roll", key_id(&mine)), &me, json!({}));
        assert_eq!(s, 200, "roll own child: {b}");
        let (s, b) = api.delete(&format!("/v1/keys/{}", key_id(&mine)), &me);
        assert_eq!((s, b["status"].as_str()), (200, Some("revoked")), "{b}");
        let (s, b) = api.post(&format!("/v1/keys/{}/roll", key_id(&me)), &me, json!({}));
        assert_eq!(s, 200, "roll itself: {b}");
        let me2 = b["key"].as_str().unwrap().to_string();
        // Nothing outside was touched: the root, parent and sibling still work.
        for k in [&root, &team, &sibling] {
            assert_eq!(api.get("/v1/keys", k).0, 200);
        }
        assert_eq!(api.get("/v1/keys", &me2).0, 200);
    }
}

// ==== lockout (SPEC §4): a source that guesses credentials is ignored ====
mod lockout {
    use super::common::*;
    use super::trunk_support::metric;
    use std::time::{Duration, Instant};

    const FROM: &str = "15550002222";
    /// Long enough that the 20 ignored guesses (1 s each) fit in the ban.
    const BAN_S: u64 = 40;

    /// An edge with `[sip.lockout]` and a key made before it starts (so
    /// the guesses below are wrong passwords of a known key).
    fn edge(key_args: &[&str]) -> (MiniUas, Edge, String) {
        let dir = TestDir::new("fc-lockout");
        let key = create_key(&dir.join("data"), "victim", key_args);
        let uas = MiniUas::start(UasMode::Busy);
        let edge = Edge::start_in(
            dir,
            EdgeConfig {
                route_target: Some(uas.route()),
                extra_toml: format!(
                    "\n[sip.lockout]\nfailures = 20\nwindow_s = 120\nban_s = {BAN_S}\n"
                ),
                ..Default::default()
            },
        );
        (uas, edge, key)
    }

    /// One digest INVITE from `ua` answering a fresh challenge with a wrong
    /// password; the final response, or None if the edge said nothing
    /// within `wait`.
    fn wrong_digest(ua: &mut UdpUa, edge: &Edge, user: &str, wait: Duration) -> Option<SipMsg> {
        let first = Req::invite(edge.sip_udp, SERVICE, FROM);
        let ch = ua.transact(&first, wait)?.fin;
        assert_eq!(ch.code(), Some(401), "challenge: {}", ch.text());
        let (_, p) = www_auth(&ch)
            .into_iter()
            .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
            .unwrap_or_else(|| panic!("no Digest challenge: {}", ch.text()));
        let mut r = first.clone();
        r.branch = unique("z9hG4bK-lock");
        r.cseq += 1;
        let auth = digest_authorization(
            &p,
            user,
            "not-the-password",
            "INVITE",
            &r.ruri,
            "00000001",
            &unique("cn"),
        );
        ua.transact(&r.header("Authorization", &auth), Duration::from_secs(3))
            .map(|o| o.fin)
    }

    /// Attack: an online password guesser, 40 wrong digest responses in a
    /// row from 127.0.0.2, each answered with a fresh 401 and nothing to
    /// slow it down. Want: after the 20th, 127.0.0.2 gets no answer at all
    /// for ban_s; 127.0.0.3 gets normal answers throughout (an honest caller
    /// on another address is never affected); the ban lifts after ban_s.
    #[test]
    fn forty_wrong_digest_responses_lock_the_source_out_and_no_other() {
        let (_uas, edge, key) = edge(&[]);
        let user = key_id(&key);
        let mut guesser = UdpUa::from_ip(edge.sip_udp, "127.0.0.2");
        let mut honest = UdpUa::from_ip(edge.sip_udp, "127.0.0.3");
        let mut answered = 0;
        let mut ignored = 0;
        let started = Instant::now();
        let mut ban_seen: Option<Instant> = None;
        for i in 0..40 {
            // Once ignored, waiting 1 s is enough to see it stays so.
            let wait = Duration::from_secs(if ignored > 0 { 1 } else { 5 });
            match wrong_digest(&mut guesser, &edge, &user, wait) {
                Some(fin) => {
                    assert_eq!(fin.code(), Some(401), "guess {i}: {}", fin.text());
                    answered += 1;
                }
                None => {
                    ignored += 1;
                    ban_seen.get_or_insert_with(Instant::now);
                }
            }
            // The honest neighbour: a challenge every time.
            let r = honest
                .transact(
                    &Req::invite(edge.sip_udp, SERVICE, FROM),
                    Duration::from_secs(5),
                )
                .unwrap_or_else(|| panic!("127.0.0.3 got no answer while .2 guessed ({i})"));
            assert_eq!(r.fin.code(), Some(401), "{}", r.fin.text());
        }
        assert!(
            started.elapsed() < Duration::from_secs(BAN_S),
            "the guesses took {:?}, longer than the ban: the test proves nothing",
            started.elapsed()
        );
        assert_eq!(
            answered, 20,
            "answers before the ban: {answered}, ignored {ignored}"
        );
        let failures: f64 = ["bad_response", "unknown_key"]
            .iter()
            .filter_map(|r| metric(&edge, "tollgate_auth_failures_total", &[("reason", r)]))
            .sum();
        assert_eq!(failures, 21.0, "bad credentials counted");
        assert_eq!(
            metric(&edge, "tollgate_lockout_bans_total", &[]),
            Some(1.0),
            "one ban"
        );
        // Locked out: even an OPTIONS or a credential-less INVITE goes
        // unanswered, and so does the right password.
        assert_eq!(guesser.options_code(Duration::from_secs(2)), None);
        let banned_at = ban_seen.expect("never ignored");
        // The ban lifts after ban_s: the same source gets its challenge back.
        let back = poll(Duration::from_secs(BAN_S + 20), || {
            guesser
                .transact(
                    &Req::invite(edge.sip_udp, SERVICE, FROM),
                    Duration::from_secs(1),
                )
                .map(|o| o.fin)
        })
        .expect("the ban never lifted");
        assert_eq!(back.code(), Some(401), "{}", back.text());
        assert!(
            banned_at.elapsed() >= Duration::from_secs(BAN_S - 6),
            "the ban lifted after only {:?}",
            banned_at.elapsed()
        );
    }

    /// Attack on the lockout itself: an operator's carrier interconnect
    /// (trusted CIDR) sends bad credentials, e.g. a misconfigured PBX
    /// behind it. Want: trusted sources are never locked out (their calls
    /// would all drop).
    #[test]
    fn a_trusted_carrier_source_is_never_locked_out() {
        let (_uas, edge, key) = edge(&[
            "--source-cidr",
            "127.0.0.4/32",
            "--trust-cidr",
            "127.0.0.4/32",
        ]);
        let user = key_id(&key);
        let mut carrier = UdpUa::from_ip(edge.sip_udp, "127.0.0.4");
        // The edge sees the new key within a second.
        poll(Duration::from_secs(10), || {
            let r = carrier.transact(
                &Req::invite(edge.sip_udp, SERVICE, FROM),
                Duration::from_secs(3),
            )?;
            (r.fin.code() == Some(486)).then_some(())
        })
        .expect("the trusted source is not admitted");
        for i in 0..30 {
            let r = carrier.transact(
                &Req::invite(edge.sip_udp, SERVICE, FROM)
                    .header("Authorization", &format!("Digest username=\"{user}\", realm=\"tollgate\", nonce=\"x\", uri=\"sip:x\", response=\"00\"")),
                Duration::from_secs(5),
            );
            let r = r.unwrap_or_else(|| panic!("trusted source ignored after {i} bad credentials"));
            assert_eq!(r.fin.code(), Some(401), "{}", r.fin.text());
        }
        assert_eq!(
            metric(&edge, "tollgate_lockout_bans_total", &[]).unwrap_or(0.0),
            0.0
        );
    }
}

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
        let addr = edge.listening("admin").expect("admin address");
        let auth = format!("Authorization: Bearer {key}\r\n");
        let (code, body) = http_request(addr, "GET", path, &auth);
        assert_eq!(code, 200, "GET {path}: {body}");
        body
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
        // The call's CDR is written by the store's group-commit thread: wait
        // for it, or a kill in between rightly makes it an edge_lost one.
        poll(Duration::from_secs(10), || {
            (read_cdrs(&edge.data_dir).0.len() == 1).then_some(())
        })
        .expect("the completed call's CDR");
        // Killed right after: no graceful shutdown.
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

// ==== media_hijack: RTP bleed and media hijack on RTP and SRTP legs, NAT latching (SPEC §5) ====
mod media_hijack {
    //! Against the real binary with media anchored: strangers (another port
    //! of the caller's host, 127.0.0.1, and another host, 127.0.0.3) send
    //! RTP and RTCP to the edge's leg-A and leg-B ports before the call's
    //! streams start, during them and after the caller stopped. They must
    //! receive nothing, and nothing of theirs may reach either leg: every
    //! packet carries its sender's SSRC, and each leg's socket must see only
    //! the other leg's. Leg B is a destination run by the test (its SDP
    //! names a socket the test reads and writes).

    use super::common::*;
    use bytes::BytesMut;
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Duration;
    use tollgate_media::sdp::{Crypto, SessionDescription};
    use tollgate_media::srtp::{new_context, Direction, SrtpKeys, SrtpTransform, Suite};

    const SSRC_A: u32 = 0x0A0A_0A0A;
    const SSRC_B: u32 = 0x0B0B_0B0B;
    const SSRC_STRANGER: u32 = 0x0E0E_0E0E;
    const SUITE: Suite = Suite::AesCm128HmacSha1_80;
    /// Long enough for a relayed datagram on loopback, even on a loaded
    /// machine, once the edge counted what it dropped.
    const QUIET: Duration = Duration::from_millis(400);

    /// Leg B: answers the edge's INVITE with an SDP naming `rtp` and
    /// `rtcp` on 127.0.0.1, and hands the test the offer it got.
    struct Dest {
        addr: SocketAddr,
        offers: mpsc::Receiver<String>,
        stop: Arc<AtomicBool>,
        handle: Option<thread::JoinHandle<()>>,
    }

    impl Dest {
        fn start(rtp: u16, rtcp: u16) -> Dest {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = sock.local_addr().unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, offers) = mpsc::channel();
            let st = stop.clone();
            let handle = thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::Relaxed) {
                    let Ok((n, src)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(m) = SipMsg::parse(&buf[..n]) else {
                        continue;
                    };
                    let resp = match m.method() {
                        Some("INVITE") => {
                            let _ = tx.send(String::from_utf8_lossy(&m.body).to_string());
                            let sdp = format!(
                                "v=0\r\no=b 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
                                 t=0 0\r\nm=audio {rtp} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
                                 a=rtcp:{rtcp}\r\n"
                            );
                            let contact = format!("Contact: <sip:b@{addr}>\r\n");
                            make_response(&m, 200, "OK", "dest", &contact, &sdp)
                        }
                        Some("ACK") | None => continue,
                        Some(_) => make_response(&m, 200, "OK", "dest", "", ""),
                    };
                    let _ = sock.send_to(&resp, src);
                }
            });
            Dest {
                addr,
                offers,
                stop,
                handle: Some(handle),
            }
        }
    }

    impl Drop for Dest {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    /// A media endpoint: an RTP and an RTCP socket.
    struct Endpoint {
        rtp: UdpSocket,
        rtcp: UdpSocket,
    }

    impl Endpoint {
        fn on(ip: &str) -> Endpoint {
            let bind = || {
                let s = UdpSocket::bind((ip, 0)).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            };
            Endpoint {
                rtp: bind(),
                rtcp: bind(),
            }
        }
        fn ports(&self) -> (u16, u16) {
            let p = |s: &UdpSocket| s.local_addr().unwrap().port();
            (p(&self.rtp), p(&self.rtcp))
        }
        /// Every datagram that arrives on either socket within [`QUIET`].
        fn received(&self) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            let end = std::time::Instant::now() + QUIET;
            let mut buf = [0u8; 2048];
            while std::time::Instant::now() < end {
                let mut idle = true;
                for s in [&self.rtp, &self.rtcp] {
                    if let Ok((n, _)) = s.recv_from(&mut buf) {
                        got.push(buf[..n].to_vec());
                        idle = false;
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            got
        }
    }

    /// The sender's SSRC of an RTP or RTCP packet.
    fn ssrc(p: &[u8]) -> u32 {
        let at = if p.len() >= 2 && (192..=223).contains(&p[1]) {
            4
        } else {
            8
        };
        p.get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn rtp(seq: u16, ssrc: u32) -> BytesMut {
        let mut b = BytesMut::from(&[0x80u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        b[2..4].copy_from_slice(&seq.to_be_bytes());
        b[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        b[8..12].copy_from_slice(&ssrc.to_be_bytes());
        b.extend_from_slice(&[ssrc as u8; 160]);
        b
    }

    fn rtcp_rr(ssrc: u32) -> BytesMut {
        let mut b = BytesMut::from(&[0x80u8, 201, 0, 1][..]);
        b.extend_from_slice(&ssrc.to_be_bytes());
        b
    }

    /// The edge's address for a stream of `sdp`: (RTP, RTCP).
    fn edge_ports(sdp: &[u8]) -> (SocketAddr, SocketAddr) {
        let s = SessionDescription::parse(sdp)
            .unwrap_or_else(|e| panic!("edge SDP: {e}\n{}", String::from_utf8_lossy(sdp)));
        let ip = s.connection(0).expect("c= line");
        let m = &s.media[0];
        let rtcp = m.rtcp().map_or(m.port + 1, |(p, _)| p);
        (SocketAddr::new(ip, m.port), SocketAddr::new(ip, rtcp))
    }

    fn metric(edge: &Edge, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&scrape(edge.metrics_addr()), name, labels).unwrap_or(0.0)
    }

    fn dropped(edge: &Edge, reason: &str) -> f64 {
        metric(edge, "tollgate_media_dropped_total", &[("reason", reason)])
    }

    /// Waits until the edge counted `n` more drops for `reason` than `from`.
    fn await_dropped(edge: &Edge, reason: &str, from: f64, n: f64, what: &str) {
        let ok = poll(Duration::from_secs(10), || {
            (dropped(edge, reason) - from >= n).then_some(())
        });
        assert!(
            ok.is_some(),
            "{what}: tollgate_media_dropped_total{{reason=\"{reason}\"}} went {from} -> {} \
             (want +{n}): the edge took or sent on a packet it must drop",
            dropped(edge, reason)
        );
    }

    /// An answered call through the edge, with leg A's media where its SDP
    /// says (`sdp_ip`, and the ports of `sdp_at`), and leg B at `dest`.
    struct Call {
        ua: UdpUa,
        invite: Req,
        ok: SipMsg,
        /// The edge's ports toward leg A and toward leg B: (RTP, RTCP).
        edge_a: (SocketAddr, SocketAddr),
        edge_b: (SocketAddr, SocketAddr),
        /// The edge's key toward leg A (SRTP calls).
        edge_key: Option<Crypto>,
    }

    impl Call {
        fn place(
            edge: &Edge,
            dest: &Dest,
            sdp_ip: &str,
            sdp_at: (u16, u16),
            key: Option<&Crypto>,
        ) -> Call {
            // RTCP on the RTP port means rtcp-mux (RFC 5761).
            let mux = if sdp_at.0 == sdp_at.1 {
                "a=rtcp-mux\r\n"
            } else {
                ""
            };
            let (proto, crypto) = match key {
                Some(c) => ("RTP/SAVP", format!("a={}\r\n", c.to_attribute())),
                None => ("RTP/AVP", String::new()),
            };
            let sdp = format!(
                "v=0\r\no=alice 1 1 IN IP4 {sdp_ip}\r\ns=-\r\nc=IN IP4 {sdp_ip}\r\nt=0 0\r\n\
                 m=audio {} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\na=rtcp:{}\r\n{mux}{crypto}a=sendrecv\r\n",
                sdp_at.0, sdp_at.1
            );
            let now = now_unix();
            let token = jwt_for(&edge.first_key(), &claims(now, now + 600, SERVICE, "alice"));
            let mut invite = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token);
            invite.body = sdp.into_bytes();
            let mut ua = UdpUa::new(edge.sip_udp);
            let ok = ua.call(&invite);
            assert_eq!(
                ok.code(),
                Some(200),
                "call through the edge:\n{}",
                ok.text()
            );
            ua.send(&invite.in_dialog(&ok, "ACK", invite.cseq));
            let offer = dest
                .offers
                .recv_timeout(Duration::from_secs(5))
                .expect("leg B got the INVITE");
            let edge_key = key.map(|_| {
                let s = SessionDescription::parse(&ok.body).unwrap();
                s.media[0]
                    .cryptos()
                    .pop()
                    .expect("the edge's key for leg A")
            });
            Call {
                edge_a: edge_ports(&ok.body),
                edge_b: edge_ports(offer.as_bytes()),
                ua,
                invite,
                ok,
                edge_key,
            }
        }

        fn hang_up(mut self) {
            let bye = self.invite.in_dialog(&self.ok, "BYE", self.invite.cseq + 1);
            let code = self
                .ua
                .transact(&bye, Duration::from_secs(10))
                .map(|o| o.fin.code());
            assert_eq!(code, Some(Some(200)), "BYE through the edge");
        }
    }

    fn edge_to(dest: &Dest, media_ports: &str) -> Edge {
        Edge::start(EdgeConfig {
            tcp: false,
            extra_args: vec!["--media-ports".into(), media_ports.into()],
            // Leg A may use SDES over this loopback UDP signaling.
            extra_toml: format!(
                "[[routes]]\ntarget = \"sip:service@{}\"\nmedia = \"rtp\"\nsdes_over_cleartext = true\n",
                dest.addr
            ),
            ..Default::default()
        })
    }

    /// The strangers: another port of the caller's (and the destination's)
    /// host, and another host.
    fn strangers() -> [Endpoint; 2] {
        [Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.3")]
    }

    /// Every stranger sends `rtp` to the edge's RTP port and an RTCP RR to
    /// its RTCP port, on both legs: 4 packets each.
    fn strangers_send(strangers: &[Endpoint; 2], call: &Call, rtp: &[u8]) {
        for s in strangers {
            for (to_rtp, to_rtcp) in [call.edge_a, call.edge_b] {
                s.rtp.send_to(rtp, to_rtp).unwrap();
                s.rtcp.send_to(&rtcp_rr(SSRC_STRANGER), to_rtcp).unwrap();
            }
        }
    }

    fn assert_strangers_got_nothing(strangers: &[Endpoint; 2], when: &str) {
        for s in strangers {
            let got = s.received();
            assert!(
                got.is_empty(),
                "{when}: a stranger at {} received {} packets from the edge (SSRCs {:x?})",
                s.rtp.local_addr().unwrap(),
                got.len(),
                got.iter().map(|p| ssrc(p)).collect::<Vec<_>>()
            );
        }
    }

    /// What `leg` received within [`QUIET`] is `n` packets, all from `ssrc`.
    fn assert_only_from(leg: &Endpoint, ssrc_want: u32, n: usize, what: &str) -> Vec<Vec<u8>> {
        let got = leg.received();
        let ssrcs: Vec<u32> = got.iter().map(|p| ssrc(p)).collect();
        assert!(
            ssrcs.iter().all(|&s| s == ssrc_want) && got.len() == n,
            "{what}: want {n} packets from SSRC {ssrc_want:x}, got SSRCs {ssrcs:x?} \
             ({:x} is a stranger's)",
            SSRC_STRANGER
        );
        got
    }

    /// RTP bleed on a plain RTP call (CVE-2017-14114 class): strangers on
    /// the caller's host (another port) and on another host send RTP and
    /// RTCP to both of the edge's legs before the call's streams start,
    /// during them and after the caller stopped; they get no packet, and
    /// none of theirs reaches either leg.
    #[test]
    fn rtp_bleed_strangers_before_during_after_get_nothing_and_relay_nothing() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15000-15099");
        let call = Call::place(&edge, &dest, "127.0.0.1", a.ports(), None);
        let strangers = strangers();

        // Before either stream: 16 packets from strangers, all dropped.
        let d0 = dropped(&edge, "source");
        for seq in 0..2 {
            strangers_send(&strangers, &call, &rtp(100 + seq, SSRC_STRANGER));
        }
        await_dropped(&edge, "source", d0, 16.0, "strangers before the streams");
        // B's stream starts first: it reaches A's SDP address, nobody else.
        for seq in 0..3 {
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        b.rtcp.send_to(&rtcp_rr(SSRC_B), call.edge_b.1).unwrap();
        assert_only_from(&a, SSRC_B, 4, "leg A, B's stream first");
        assert_strangers_got_nothing(&strangers, "before A's stream");
        // A's stream: reaches B only.
        for seq in 0..3 {
            a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
        }
        assert_only_from(&b, SSRC_A, 3, "leg B, A's stream");

        // During both streams.
        let d1 = dropped(&edge, "source");
        for seq in 3..6 {
            a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
            strangers_send(&strangers, &call, &rtp(200 + seq, SSRC_STRANGER));
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        a.rtcp.send_to(&rtcp_rr(SSRC_A), call.edge_a.1).unwrap();
        await_dropped(&edge, "source", d1, 24.0, "strangers during the streams");
        assert_only_from(&b, SSRC_A, 4, "leg B during");
        assert_only_from(&a, SSRC_B, 3, "leg A during");
        assert_strangers_got_nothing(&strangers, "during the streams");

        // The caller stopped; B goes on.
        let d2 = dropped(&edge, "source");
        for seq in 6..9 {
            strangers_send(&strangers, &call, &rtp(300 + seq, SSRC_STRANGER));
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        await_dropped(
            &edge,
            "source",
            d2,
            24.0,
            "strangers after the caller stopped",
        );
        assert_only_from(&a, SSRC_B, 3, "leg A after it stopped");
        assert_only_from(&b, SSRC_A, 0, "leg B after A stopped");
        assert_strangers_got_nothing(&strangers, "after the caller stopped");
        call.hang_up();
    }

    /// An answered call from an SRTP caller (its SDP naming `sdp_ip` and
    /// `ports`), and the caller's contexts: what it sends, with its own key,
    /// and what it receives, with the edge's.
    fn srtp_call(
        edge: &Edge,
        dest: &Dest,
        sdp_ip: &str,
        ports: (u16, u16),
    ) -> (Call, Box<dyn SrtpTransform>, Box<dyn SrtpTransform>) {
        let a_key = Crypto {
            tag: 1,
            suite: SUITE,
            keys: SrtpKeys::generate(SUITE).unwrap(),
        };
        let call = Call::place(edge, dest, sdp_ip, ports, Some(&a_key));
        let edge_key = call.edge_key.clone().unwrap();
        let tx = new_context(SUITE, &a_key.keys, Direction::Outbound).unwrap();
        let rx = new_context(SUITE, &edge_key.keys, Direction::Inbound).unwrap();
        (call, tx, rx)
    }

    fn auth_failures(edge: &Edge) -> f64 {
        metric(edge, "tollgate_srtp_auth_failures_total", &[])
    }

    /// RTP bleed through rtcp-mux (RFC 5761): on a muxed caller leg,
    /// strangers send RTP and RTCP to the edge's muxed port and to the RTCP
    /// port it did not advertise, before and during the call's streams;
    /// they get nothing, and leg B gets only the caller's RTP and RTCP.
    #[test]
    fn rtcp_mux_strangers_on_the_muxed_and_the_hidden_rtcp_port_get_nothing() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15400-15499");
        let muxed = a.ports().0;
        let call = Call::place(&edge, &dest, "127.0.0.1", (muxed, muxed), None);
        assert_eq!(call.edge_a.0, call.edge_a.1, "the edge muxes toward A");
        let hidden = SocketAddr::new(call.edge_a.0.ip(), call.edge_a.0.port() + 1);
        let strangers = strangers();
        for (i, seq) in [(0, 1u16), (1, 2)] {
            let what = ["before the streams", "during the streams"][i];
            let d = dropped(&edge, "source");
            // 8 to the muxed port and leg B (RTP and RTCP), 2 to the
            // hidden RTCP port, per stranger.
            strangers_send(&strangers, &call, &rtp(100 + seq, SSRC_STRANGER));
            for s in &strangers {
                s.rtcp.send_to(&rtcp_rr(SSRC_STRANGER), hidden).unwrap();
                s.rtp
                    .send_to(&rtp(200 + seq, SSRC_STRANGER), hidden)
                    .unwrap();
            }
            await_dropped(&edge, "source", d, 12.0, what);
            // B's RTP and RTCP reach A's one port; A's reach B.
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
            b.rtcp.send_to(&rtcp_rr(SSRC_B), call.edge_b.1).unwrap();
            assert_only_from(&a, SSRC_B, 2, what);
            if i == 1 {
                a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
                a.rtp.send_to(&rtcp_rr(SSRC_A), call.edge_a.0).unwrap();
                assert_only_from(&b, SSRC_A, 2, what);
            }
            assert_strangers_got_nothing(&strangers, what);
        }
        call.hang_up();
    }

    fn protect(tx: &mut dyn SrtpTransform, p: BytesMut) -> BytesMut {
        let mut p = p;
        tx.protect_rtp(&mut p).unwrap();
        p
    }

    fn bad_tag(mut p: BytesMut) -> BytesMut {
        let n = p.len();
        p[n - 1] ^= 0x55;
        p
    }

    /// Media hijack on an SRTP leg (CVE-2025-53399 class): strangers on the
    /// caller's host and on another host send properly protected SRTP (a
    /// captured packet sent on from elsewhere) and SRTP with a forged tag,
    /// before the caller's stream, during and after it; none latches, none
    /// is relayed, they get nothing (and they are dropped before
    /// authentication: the SDP address is the caller's signaling host).
    #[test]
    fn srtp_leg_captured_and_forged_packets_from_strangers_never_latch() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15100-15199");
        let (call, mut a_tx, mut a_rx) = srtp_call(&edge, &dest, "127.0.0.1", a.ports());
        let strangers = strangers();
        let auth0 = auth_failures(&edge);

        let mut seq = 0u16;
        let mut phase = |what: &str, caller_talks: bool| {
            let d = dropped(&edge, "source");
            for _ in 0..2 {
                seq += 1;
                // A packet the caller's key protects, but sent by strangers
                // (captured, or replayed ahead of the caller), and a forged one.
                let captured = protect(a_tx.as_mut(), rtp(seq, SSRC_STRANGER));
                let forged = bad_tag(captured.clone());
                for s in &strangers {
                    s.rtp.send_to(&captured, call.edge_a.0).unwrap();
                    s.rtp.send_to(&forged, call.edge_a.0).unwrap();
                }
            }
            await_dropped(&edge, "source", d, 8.0, what);
            if caller_talks {
                seq += 1;
                let p = protect(a_tx.as_mut(), rtp(seq, SSRC_A));
                a.rtp.send_to(&p, call.edge_a.0).unwrap();
                assert_only_from(&b, SSRC_A, 1, what);
            } else {
                assert_only_from(&b, SSRC_A, 0, what);
            }
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
            let got = assert_only_from(&a, SSRC_B, 1, what);
            let mut p = BytesMut::from(&got[0][..]);
            a_rx.unprotect_rtp(&mut p)
                .expect("the caller's SRTP from the edge");
            assert_eq!(p, rtp(seq, SSRC_B), "{what}: B's packet, decrypted");
            assert_strangers_got_nothing(&strangers, what);
        };
        phase("before the caller's stream", false);
        phase("during the caller's stream", true);
        phase("after the caller stopped", false);
        assert_eq!(
            auth_failures(&edge),
            auth0,
            "strangers are dropped before authentication"
        );
        call.hang_up();
    }

    /// A NATed SRTP caller whose SDP names a private address on this host
    /// (127.0.0.9, not its signaling IP 127.0.0.1): a stranger on the
    /// signaling IP sending SRTP with a forged tag must not latch the leg;
    /// until the caller's own authenticated packet latched it the edge
    /// sends the leg nothing (not even to the SDP's private address); then
    /// the call works both ways, and strangers get nothing.
    #[test]
    fn srtp_leg_behind_nat_forged_tag_from_the_signaling_ip_never_latches() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let private = Endpoint::on("127.0.0.9");
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15200-15299");
        let (call, mut a_tx, mut a_rx) = srtp_call(&edge, &dest, "127.0.0.9", private.ports());
        let strangers = strangers();
        let auth = auth_failures;

        // Forged tags from the signaling IP (another port) are authenticated
        // and fail; from another host they are dropped before that.
        let (auth0, d0) = (auth(&edge), dropped(&edge, "source"));
        for seq in 1..=3 {
            let forged = bad_tag(protect(a_tx.as_mut(), rtp(seq, SSRC_STRANGER)));
            for s in &strangers {
                s.rtp.send_to(&forged, call.edge_a.0).unwrap();
            }
        }
        let ok = poll(Duration::from_secs(10), || {
            (auth(&edge) - auth0 >= 3.0).then_some(())
        });
        assert!(
            ok.is_some(),
            "3 forged tags from 127.0.0.1: auth failures {auth0} -> {}",
            auth(&edge)
        );
        await_dropped(&edge, "source", d0, 3.0, "forged tags from 127.0.0.3");
        // B talks: the unlatched NAT leg is sent nothing.
        let u0 = dropped(&edge, "unlatched");
        for seq in 1..=3 {
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        await_dropped(&edge, "unlatched", u0, 3.0, "B's media before A latched");
        assert_strangers_got_nothing(&strangers, "forged tags");
        assert_only_from(&a, SSRC_B, 0, "leg A before it latched");
        assert_only_from(&private, SSRC_B, 0, "the SDP's private address");

        // The caller's own packet, through its "NAT" (another port than its
        // SDP's, on its signaling IP), latches the leg.
        let p = protect(a_tx.as_mut(), rtp(10, SSRC_A));
        a.rtp.send_to(&p, call.edge_a.0).unwrap();
        assert_only_from(&b, SSRC_A, 1, "leg B, A's first packet");
        b.rtp.send_to(&rtp(10, SSRC_B), call.edge_b.0).unwrap();
        let got = assert_only_from(&a, SSRC_B, 1, "leg A once latched");
        let mut p = BytesMut::from(&got[0][..]);
        a_rx.unprotect_rtp(&mut p).expect("SRTP from the edge");
        assert_eq!(p, rtp(10, SSRC_B));
        // Now even a correctly protected packet from the signaling IP's
        // other port is a stranger's.
        let d1 = dropped(&edge, "source");
        let captured = protect(a_tx.as_mut(), rtp(11, SSRC_STRANGER));
        for s in &strangers {
            s.rtp.send_to(&captured, call.edge_a.0).unwrap();
        }
        await_dropped(&edge, "source", d1, 2.0, "strangers after the latch");
        b.rtp.send_to(&rtp(12, SSRC_B), call.edge_b.0).unwrap();
        assert_only_from(&a, SSRC_B, 1, "leg A after strangers");
        assert_only_from(&b, SSRC_A, 0, "leg B after strangers");
        assert_strangers_got_nothing(&strangers, "after the latch");
        assert_only_from(&private, SSRC_B, 0, "the SDP's private address, at the end");
        call.hang_up();
    }

    /// Set in the inner run of [`nat_caller_with_a_private_sdp_address_talks_both_ways`].
    const INNER: &str = "TOLLGATE_TEST_IN_NETNS";

    /// NAT: a caller whose SDP says `c=IN IP4 10.0.0.7` but whose packets
    /// come from its signaling address (127.0.0.1, another port) gets a
    /// working call both ways, and the edge never sends to 10.0.0.7.
    ///
    /// A bug here would send packets to 10.0.0.7, so the test runs itself
    /// again inside a fresh network namespace (`unshare -n`) where only
    /// loopback exists: nothing sent to 10.0.0.7 can leave the machine
    /// (there is no route; the inner run checks that first).
    #[test]
    fn nat_caller_with_a_private_sdp_address_talks_both_ways() {
        if std::env::var_os(INNER).is_none() {
            let name = "nat_caller_with_a_private_sdp_address_talks_both_ways";
            let path = module_path!()
                .split_once("::")
                .map_or(String::new(), |(_, m)| format!("{m}::{name}"));
            let out = std::process::Command::new("unshare")
                .arg("-n")
                .arg(std::env::current_exe().unwrap())
                .args(["--exact", &path, "--nocapture", "--test-threads=1"])
                .env(INNER, "1")
                .output()
                .expect("run unshare -n (needs root or user namespaces)");
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && text.contains("1 passed"),
                "inner run in a network namespace failed ({}):\n{text}",
                out.status
            );
            return;
        }
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(up.success(), "ip link set lo up");
        // No route off loopback here (connect() on UDP sends nothing).
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        assert!(
            probe.connect("10.0.0.7:4000").is_err(),
            "10.0.0.7 is reachable from this namespace: refusing to run"
        );

        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15300-15399");
        let call = Call::place(&edge, &dest, "10.0.0.7", (4000, 4001), None);
        assert_eq!(call.edge_a.0.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        // B first: nothing goes to the NAT leg yet (not to 10.0.0.7).
        let (u0, s0) = (dropped(&edge, "unlatched"), dropped(&edge, "send"));
        b.rtp.send_to(&rtp(1, SSRC_B), call.edge_b.0).unwrap();
        await_dropped(&edge, "unlatched", u0, 1.0, "B's media before A latched");
        // The caller talks from 127.0.0.1 (its NAT's port): both ways work.
        for seq in 2..6 {
            a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
            assert_only_from(&b, SSRC_A, 1, "leg B hears the NATed caller");
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
            assert_only_from(&a, SSRC_B, 1, "the NATed caller hears B");
        }
        a.rtcp.send_to(&rtcp_rr(SSRC_A), call.edge_a.1).unwrap();
        assert_only_from(&b, SSRC_A, 1, "leg B gets the NATed caller's RTCP");
        b.rtcp.send_to(&rtcp_rr(SSRC_B), call.edge_b.1).unwrap();
        assert_only_from(&a, SSRC_B, 1, "the NATed caller gets B's RTCP");
        // A stranger on another host cannot take the latch.
        let d0 = dropped(&edge, "source");
        let s = Endpoint::on("127.0.0.3");
        s.rtp
            .send_to(&rtp(7, SSRC_STRANGER), call.edge_a.0)
            .unwrap();
        await_dropped(&edge, "source", d0, 1.0, "a stranger after the latch");
        b.rtp.send_to(&rtp(8, SSRC_B), call.edge_b.0).unwrap();
        assert_only_from(&a, SSRC_B, 1, "the NATed caller after the stranger");
        assert!(s.received().is_empty(), "the stranger got nothing");
        assert_eq!(
            dropped(&edge, "send"),
            s0,
            "no send failed (a send to 10.0.0.7 would fail here: no route)"
        );
        call.hang_up();
    }
}

// ==== numbers_and_caller_id: premium numbers in every form, 484, spoofed and asserted caller IDs (SPEC §3d, §4a) ====
mod numbers_and_caller_id {
    use super::common::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// Flags of `keys create` for a key whose CIDR is admitted without a
    /// credential (a carrier interconnect). One place to change when the
    /// flag becomes `--trust-cidr`.
    fn trusted_key_args(cidr: &str) -> Vec<&str> {
        vec!["--source-cidr", cidr, "--trust-cidr", cidr]
    }

    /// An edge routed to a fresh MiniUas in `mode`, with one key made with
    /// `key_args` before the edge starts.
    fn edge(mode: UasMode, key_args: &[&str]) -> (MiniUas, Edge, String) {
        let uas = MiniUas::start(mode);
        let dir = TestDir::new("numbers");
        let key = create_key(&dir.join("data"), "numbers", key_args);
        let edge = Edge::start_in(dir, EdgeConfig::routed_to(uas.addr.port()));
        (uas, edge, key)
    }

    /// An INVITE to `ruri_user` (or a full `tel:`/`sip:` Request-URI) from
    /// `from_user`, with a bearer token whose `to`/`from` are given.
    fn bearer_invite(edge: &Edge, key: &str, ruri: &str, from: &str, to_claim: &str) -> Req {
        let n = now_unix();
        let t = jwt_for(key, &claims(n - 5, n + 300, to_claim, from));
        let mut r = Req::invite(edge.sip_udp, ruri, from);
        if ruri.starts_with("tel:") || ruri.starts_with("sip:") {
            r.ruri = ruri.to_string();
            r.to = format!("<{ruri}>");
        }
        r.bearer(&t)
    }

    fn code(ua: &mut UdpUa, r: &Req) -> u16 {
        ua.call(r).code().unwrap_or(0)
    }

    /// Toll fraud through dialling forms: premium-rate, shared-cost and
    /// revenue-share destinations written as `+` E.164, national, `00`,
    /// `011`, with separators, as a `tel:` Request-URI and as a `tel:` token
    /// `to`, each get 403 from the default install and leg B sees no INVITE.
    #[test]
    fn premium_and_revenue_share_in_every_form_get_403_and_never_reach_leg_b() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let cases: &[(&str, &str)] = &[
            ("+19005550100", "+19005550100"),
            ("19005550100", "19005550100"),
            ("9005550100", "9005550100"),
            ("0019005550100", "0019005550100"),
            ("01119005550100", "011 1 900 555 0100"),
            ("1-900-555-0100", "+1 (900) 555-0100"),
            ("tel:+1-900-555-0100", "tel:+1-900-555-0100"),
            ("19005550100", "tel:+19005550100"),
            ("00449090901234", "00449090901234"),
            ("01144909090123", "01144909090123"),
            ("+44.909.090.1234", "+449090901234"),
            ("+448712345678", "+448712345678"),
            ("0033810123456", "+33810123456"),
            ("00499001234567", "+499001234567"),
            ("+979123456789", "+979123456789"),
            ("011881612345678", "+881612345678"),
            ("+883510000000", "+883510000000"),
        ];
        for (ruri, to) in cases {
            let r = bearer_invite(&edge, &key, ruri, "+14155550199", to);
            assert_eq!(code(&mut ua, &r), 403, "{ruri} (token to {to})");
        }
        // A normal number proves the route works (so silence at leg B means
        // refusal, not a broken route).
        let r = bearer_invite(&edge, &key, "14155550100", "+14155550199", "+14155550100");
        assert_eq!(code(&mut ua, &r), 486);
        assert_eq!(uas.count("INVITE"), 1, "only the normal call reached leg B");
    }

    /// The other side of the deny list: an ordinary number in each form is
    /// one number and is admitted (200 from the destination).
    #[test]
    fn normal_number_in_every_form_is_admitted() {
        let (uas, edge, key) = edge(UasMode::Answer, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let forms = [
            "+14155550100",
            "14155550100",
            "4155550100",
            "0014155550100",
            "01114155550100",
            "+1-415-555-0100",
            "tel:+1.415.555.0100",
        ];
        for f in forms {
            let r = bearer_invite(&edge, &key, f, "+14155550199", "tel:+1 415 555 0100");
            let fin = ua.call(&r);
            assert_eq!(fin.code(), Some(200), "{f}: {}", fin.text());
            assert_eq!(ua.ack_and_bye(&r, &fin), Some(200), "{f}");
        }
        assert_eq!(uas.count("INVITE"), forms.len());
    }

    /// A key's allow-list and deny prefixes, written in one form, hold for
    /// destinations dialled in any other form; a name never matches a
    /// number prefix.
    #[test]
    fn key_allow_and_deny_prefixes_hold_across_forms() {
        let (uas, edge, key) = edge(
            UasMode::Busy,
            &[
                "--allow-prefix",
                "1415",
                "--deny-prefix",
                "011 1 415 555 01",
            ],
        );
        let mut ua = UdpUa::new(edge.sip_udp);
        for (dest, want) in [
            ("+14155550100", 403),
            ("4155550123", 403),
            ("0014155550199", 403),
            ("+14155559999", 486),
            ("0014155559998", 486),
            ("4155559997", 486),
            ("+12125550100", 403),
            ("0012125550100", 403),
            ("agent", 403),
        ] {
            let r = bearer_invite(&edge, &key, dest, "+14155550199", dest);
            assert_eq!(code(&mut ua, &r), want, "{dest}");
        }
        assert_eq!(uas.count("INVITE"), 3);
    }

    /// Slipping past the number checks with a destination that looks like a
    /// number but is none (too short, a bare `+`, an international prefix
    /// alone, a star code): 484 Address Incomplete, nothing at leg B. A SIP
    /// name is not a number attempt and still goes through.
    #[test]
    fn number_attempts_that_are_no_number_get_484() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        for dest in [
            "12345",
            "+",
            "011",
            "5550100",
            "*6719005550100",
            "+9991234567",
        ] {
            let r = bearer_invite(&edge, &key, dest, "+14155550199", dest);
            let fin = ua.call(&r);
            assert_eq!(fin.code(), Some(484), "{dest}: {}", fin.text());
        }
        assert_eq!(uas.count("INVITE"), 0);
        let r = bearer_invite(&edge, &key, "agent", "+14155550199", "agent");
        assert_eq!(code(&mut ua, &r), 486);
    }

    /// Caller-ID spoofing with a token: From is a number the token does not
    /// name, and a P-Asserted-Identity carries the token's `from`. The PAI of
    /// an untrusted source is no identity: 401 invalid_token.
    #[test]
    fn spoofed_from_with_matching_pai_gets_invalid_token() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let n = now_unix();
        let t = jwt_for(
            &key,
            &claims(n - 5, n + 300, "+14155550100", "+14155550199"),
        );
        let r = Req::invite(edge.sip_udp, "+14155550100", "+19998887777")
            .header("P-Asserted-Identity", "<sip:+14155550199@carrier.example>")
            .bearer(&t);
        assert_invalid_token(&ua.call(&r), "spoofed From, PAI = token from");
        assert_eq!(uas.count("INVITE"), 0);
    }

    /// Smuggling a caller ID past the check: an admitted untrusted caller
    /// adds a P-Asserted-Identity; leg B gets the checked identity (the From,
    /// canonical) and no P-Asserted-Identity at all.
    #[test]
    fn untrusted_pai_never_reaches_leg_b() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let r = bearer_invite(&edge, &key, "+14155550100", "14155550199", "+14155550100")
            .header("P-Asserted-Identity", "<sip:+18885550000@evil.example>");
        assert_eq!(code(&mut ua, &r), 486);
        assert!(uas.wait_for("INVITE", 1, Duration::from_secs(10)));
        let inv = &uas.requests("INVITE")[0];
        assert!(
            inv.header("P-Asserted-Identity").is_none(),
            "PAI reached leg B:\n{}",
            inv.text()
        );
        let from = SipMsg::uri_user(inv.header("From").unwrap_or(""));
        assert_eq!(from.as_deref(), Some("+14155550199"), "{}", inv.text());
    }

    /// A trusted carrier (credential-less, from its CIDR) asserts the caller
    /// with P-Asserted-Identity: it is honoured, canonical, and passed on to
    /// leg B as both From and P-Asserted-Identity.
    #[test]
    fn trusted_carrier_pai_is_passed_on() {
        let (uas, edge, _key) = edge(UasMode::Busy, &trusted_key_args("127.0.0.3/32"));
        let sock = UdpSocket::bind("127.0.0.3:0").expect("bind 127.0.0.3");
        let local = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let r = Req::invite(edge.sip_udp, "+14155550100", "anonymous")
            .header("P-Asserted-Identity", "<tel:+1-415-555-0123>");
        let bytes = r.render(local);
        let fin = poll(Duration::from_secs(10), || {
            sock.send_to(&bytes, edge.sip_udp).ok()?;
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, _) = sock.recv_from(&mut buf).ok()?;
                let m = SipMsg::parse(&buf[..n])?;
                if m.code().is_some_and(|c| c >= 200) {
                    return Some(m);
                }
            }
        })
        .expect("a final answer to the carrier");
        assert_eq!(fin.code(), Some(486), "{}", fin.text());
        let inv = &uas.requests("INVITE")[0];
        let pai = inv.header("P-Asserted-Identity").unwrap_or("");
        assert_eq!(
            SipMsg::uri_user(pai).as_deref(),
            Some("+14155550123"),
            "{}",
            inv.text()
        );
        let from = SipMsg::uri_user(inv.header("From").unwrap_or(""));
        assert_eq!(from.as_deref(), Some("+14155550123"));
    }

    /// A key limited to its own caller IDs (`--caller-id`) is used to
    /// present another number: 403, for a bearer token and for digest;
    /// its own numbers in any form go through.
    #[test]
    fn caller_id_refuses_other_callers_bearer_and_digest() {
        let (uas, edge, key) = edge(UasMode::Busy, &["--caller-id", "+1 415 555 01"]);
        let mut ua = UdpUa::new(edge.sip_udp);
        for (from, want) in [
            ("+14155550123", 486),
            ("4155550199", 486),
            ("+12125550100", 403),
            ("+14155550200", 403),
        ] {
            let r = bearer_invite(&edge, &key, "+14155550100", from, "+14155550100");
            assert_eq!(code(&mut ua, &r), want, "bearer, from {from}");
        }
        let id = key_id(&key);
        let pass = digest_password(&key);
        for (from, want) in [("+12125550100", 403), ("0014155550100", 486)] {
            let first = Req::invite(edge.sip_udp, "+14155550100", from);
            let fin = ua.call(&first);
            assert_eq!(fin.code(), Some(401), "{}", fin.text());
            let (_, ch) = www_auth(&fin)
                .into_iter()
                .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
                .expect("a Digest challenge");
            let mut r = first.clone();
            r.branch = unique("z9hG4bK-tg");
            r.cseq += 1;
            let auth = digest_authorization(&ch, &id, &pass, "INVITE", &r.ruri, "00000001", "c1");
            let r = r.header("Authorization", &auth);
            assert_eq!(code(&mut ua, &r), want, "digest, from {from}");
        }
        assert_eq!(uas.count("INVITE"), 3);
    }
}
