//! The fraud corpus of issue 10: every way around a key's limits, one e2e
//! test per attack, each test's doc comment naming the attack it tries.
//! Each area's cases live in one `mod` block below.
//!
//! cargo test -p tollgate --test fraud_corpus
mod common;

// ==== sources_and_hierarchy_reach: source_cidrs restrict every credential, trusted_cidrs admit without one, a keys-scoped key reaches only its subtree ====
mod sources_and_hierarchy_reach {
    use super::common::*;
    use serde_json::{json, Value};
    use std::net::{IpAddr, SocketAddr, UdpSocket};
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
        let mut ua = UdpUa::new(edge.sip_udp);
        ua.sock = UdpSocket::bind(format!("{ip}:0")).expect("bind a loopback source");
        ua.local = ua.sock.local_addr().unwrap();
        ua
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
