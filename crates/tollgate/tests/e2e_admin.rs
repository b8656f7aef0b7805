//! The admin HTTP API (SPEC §2, §7) against the real binary over HTTPS with a
//! test CA and certificate made by rcgen; reqwest (rustls) is the client,
//! trusting only that CA.
//!
//! * every endpoint's success and each refusal (401 missing / malformed /
//!   unknown / wrong secret / revoked / expired / rolled key, 403 public key
//!   and missing scope, 400, 404, 405, 409, 413, 415), JSON error bodies;
//! * a key rolled (and one revoked) through the API is refused with 401 on
//!   the next INVITE, and the new secret works;
//! * a call listed by `GET /v1/calls` and hung up by `DELETE /v1/calls/{id}`:
//!   the caller gets a BYE and the CDR says `admin_hangup`.
//!
//! `EdgeConfig::admin_extra` adds `tls_cert` / `tls_key` to the `[admin]`
//! table.
//!
//! cargo test --workspace --test e2e_admin
mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Test PKI and client
// ---------------------------------------------------------------------------

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it;
/// returns the CA's PEM and writes the server's cert and key into `dir`.
fn make_pki(dir: &Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate e2e test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("leaf params");
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate admin");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("leaf cert");
    let cert_path = dir.join("admin-cert.pem");
    let key_path = dir.join("admin-key.pem");
    std::fs::write(&cert_path, leaf_cert.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    (
        ca_cert.pem(),
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

struct Resp {
    status: u16,
    body: Value,
    text: String,
    www_authenticate: Option<String>,
}

impl std::fmt::Display for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

struct Api {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: std::net::SocketAddr, ca_pem: &str) -> Api {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA pem");
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(20))
            .build()
            .expect("reqwest client");
        Api {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client,
            base: format!("https://{addr}"),
        }
    }

    /// A request with raw control over headers and body.
    fn raw(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Resp {
        self.rt.block_on(async {
            let mut req = self
                .client
                .request(method.clone(), format!("{}{path}", self.base));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            if let Some(b) = body {
                req = req.body(b);
            }
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = resp.status().as_u16();
            let www_authenticate = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let text = resp.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::Null);
            Resp {
                status,
                body,
                text,
                www_authenticate,
            }
        })
    }

    fn call(&self, method: Method, path: &str, key: Option<&str>, body: Option<Value>) -> Resp {
        let auth = key.map(|k| format!("Bearer {k}"));
        let (ct, body) = match body {
            Some(b) => (Some("application/json"), Some(b.to_string().into_bytes())),
            None => (None, None),
        };
        self.raw(method, path, auth.as_deref(), ct, body)
    }
    fn get(&self, path: &str, key: &str) -> Resp {
        self.call(Method::GET, path, Some(key), None)
    }
    fn post(&self, path: &str, key: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(key), Some(body))
    }
    fn delete(&self, path: &str, key: &str) -> Resp {
        self.call(Method::DELETE, path, Some(key), None)
    }
}

/// Asserts status and the JSON error shape with `code`.
#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str, case: &str) {
    assert_eq!(r.status, status, "[{case}] {r}");
    assert_eq!(
        r.body["error"]["code"].as_str(),
        Some(code),
        "[{case}] error code: {r}"
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "[{case}] error message: {r}"
    );
}

struct Setup {
    edge: Edge,
    api: Api,
    ca: String,
    admin: std::net::SocketAddr,
}

fn start_https_edge() -> Setup {
    let dir = TestDir::new("admin");
    let (ca, cert, key) = make_pki(&dir.path);
    let cfg = EdgeConfig {
        route_target: None,
        admin_extra: format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
        ..Default::default()
    };
    let edge = Edge::start_in(dir, cfg);
    let admin = edge.listening("admin").unwrap_or_else(|| {
        panic!(
            "no `tollgate: listening admin ADDR` line before ready: {:?}",
            edge.stdout_lines.lock().unwrap()
        )
    });
    let api = Api::new(admin, &ca);
    Setup {
        edge,
        api,
        ca,
        admin,
    }
}

// ---------------------------------------------------------------------------
// SIP helpers
// ---------------------------------------------------------------------------

fn invite_with(edge: &Edge, key: &str) -> (UdpUa, Req, SipMsg) {
    let n = now_unix();
    let t = jwt_for(key, &claims(n - 5, n + 300, SERVICE, "15550001111"));
    let mut ua = UdpUa::new(edge.sip_udp);
    let inv = Req::invite(edge.sip_udp, SERVICE, "15550001111").bearer(&t);
    let r = ua.call(&inv);
    (ua, inv, r)
}

/// A complete call with `key` through the echo destination (200, ACK, BYE).
/// A key just made with the CLI reaches the running edge within 1 s: 401s
/// are retried for 5 s.
fn complete_call(edge: &Edge, key: &str) {
    let t0 = Instant::now();
    loop {
        let (mut ua, inv, r) = invite_with(edge, key);
        if r.code() == Some(401) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert_eq!(r.code(), Some(200), "call with a good key:\n{}", r.text());
        assert_eq!(ua.ack_and_bye(&inv, &r), Some(200), "BYE of the call");
        return;
    }
}

/// Waits until the edge knows a key made with the CLI (it reloads the key
/// file within 1 s): `GET /v1/keys` stops answering 401.
fn wait_loaded(api: &Api, key: &str) {
    let t0 = Instant::now();
    loop {
        let r = api.get("/v1/keys", key);
        if r.status != 401 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a key made with the CLI is unknown to the admin API after 5 s: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_cdrs(data_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(data_dir.join("cdrs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn https_only_with_the_trusted_certificate() {
    let s = start_https_edge();
    let root = s.edge.first_key();
    let r = s.api.get("/v1/keys", &root);
    assert_eq!(r.status, 200, "{r}");

    // A client that does not trust the test CA refuses the server.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("https://{}/v1/keys", s.admin);
    let e = rt.block_on(async { untrusting.get(url).send().await });
    assert!(e.is_err(), "a client without the CA must not connect");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = rt.block_on(async {
        plain
            .get(format!("http://{}/v1/keys", s.admin))
            .header("authorization", format!("Bearer {root}"))
            .send()
            .await
    });
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| !r.status().is_success()),
        "plain HTTP on the HTTPS port must fail: {r:?}"
    );
    // The trusted client still works afterwards.
    let trusting = Api::new(s.admin, &s.ca);
    assert_eq!(trusting.get("/v1/keys", &root).status, 200);
}

#[test]
fn authentication_refusals() {
    let s = start_https_edge();
    let api = &s.api;
    let root = s.edge.first_key();

    // Missing, wrong scheme, malformed, unknown id, wrong secret.
    let r = api.call(Method::GET, "/v1/keys", None, None);
    assert_error(&r, 401, "unauthorized", "no Authorization");
    assert!(
        r.www_authenticate
            .as_deref()
            .is_some_and(|w| w.starts_with("Bearer realm=")),
        "401 must challenge: {:?}",
        r.www_authenticate
    );
    let r = api.raw(
        Method::GET,
        "/v1/keys",
        Some(&format!("Basic {root}")),
        None,
        None,
    );
    assert_error(&r, 401, "unauthorized", "Basic scheme");
    for (case, bad) in [
        ("malformed", "tg_sk_nope".to_string()),
        (
            "unknown id",
            format!("tg_sk_zzzzzzzzzzzz_{}", "A".repeat(40)),
        ),
        (
            "wrong secret",
            format!("tg_sk_{}_{}", key_id(&root), "B".repeat(40)),
        ),
        ("secret as public", root.replacen("tg_sk_", "tg_pk_", 1)),
    ] {
        let r = api.get("/v1/keys", &bad);
        assert_error(&r, 401, "invalid_key", case);
        assert!(
            r.www_authenticate
                .as_deref()
                .is_some_and(|w| w.contains("error=\"invalid_token\"")),
            "[{case}] {:?}",
            r.www_authenticate
        );
        assert!(!r.text.contains(&bad), "[{case}] the key is echoed back");
    }

    // A public key: 403, never the admin API.
    let r = api.post(
        "/v1/keys",
        &root,
        json!({"name": "app", "kind": "public", "allow_prefixes": ["+1"]}),
    );
    assert_eq!(r.status, 201, "{r}");
    let public = r.body["key"].as_str().unwrap().to_string();
    assert!(public.starts_with("tg_pk_"), "{public}");
    let r = api.get("/v1/keys", &public);
    assert_error(&r, 403, "public_key", "public key");
    let r = api.get("/v1/calls", &public);
    assert_error(&r, 403, "public_key", "public key on calls");

    // A child key without the keys / usage / trunks scope.
    let r = api.post(
        "/v1/keys",
        &root,
        json!({"name": "caller-only", "scopes": ["calls"]}),
    );
    assert_eq!(r.status, 201, "{r}");
    let calls_only = r.body["key"].as_str().unwrap().to_string();
    for (m, p) in [
        (Method::GET, "/v1/keys"),
        (Method::GET, "/v1/usage"),
        (Method::GET, "/v1/calls"),
    ] {
        let r = api.call(m.clone(), p, Some(&calls_only), None);
        assert_error(
            &r,
            403,
            "insufficient_scope",
            &format!("{m} {p} without scope"),
        );
    }
    let r = api.post("/v1/keys", &calls_only, json!({"name": "x"}));
    assert_error(&r, 403, "insufficient_scope", "create without keys scope");

    // Revoked and expired keys: 401.
    let r = api.post("/v1/keys", &root, json!({"name": "short", "expires_in": 1}));
    assert_eq!(r.status, 201, "{r}");
    let short = r.body["key"].as_str().unwrap().to_string();
    let r = api.post("/v1/keys", &root, json!({"name": "victim"}));
    let victim = r.body["key"].as_str().unwrap().to_string();
    assert_eq!(api.get("/v1/keys", &victim).status, 200);
    let r = api.delete(&format!("/v1/keys/{}", key_id(&victim)), &root);
    assert_eq!(r.status, 200, "{r}");
    assert_error(&api.get("/v1/keys", &victim), 401, "invalid_key", "revoked");
    let t0 = Instant::now();
    loop {
        let r = api.get("/v1/keys", &short);
        if r.status == 401 {
            assert_error(&r, 401, "invalid_key", "expired");
            break;
        }
        assert_eq!(r.status, 200, "before expiry: {r}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a key with expires_in 1 s still works after 10 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Unknown paths and methods: JSON 404 / 405.
    assert_error(
        &api.get("/v1/nope", &root),
        404,
        "not_found",
        "unknown path",
    );
    let r = api.call(Method::PUT, "/v1/keys", Some(&root), None);
    assert_error(&r, 405, "method_not_allowed", "PUT /v1/keys");
}

#[test]
fn keys_create_list_roll_revoke_and_the_sip_side() {
    let s = start_https_edge();
    let api = &s.api;
    let root = s.edge.first_key();

    // Create: a restricted secret key (scopes subset, tighter limits).
    let r = api.post(
        "/v1/keys",
        &root,
        json!({
            "name": "team",
            "scopes": ["calls", "keys", "usage", "trunks"],
            "cps": 20, "max_calls": 10, "daily_minutes": 600,
            "allow_prefixes": ["+1", "1555"], "deny_prefixes": ["+1900"],
            "expires_in": "30d"
        }),
    );
    assert_eq!(r.status, 201, "{r}");
    let team = r.body["key"].as_str().unwrap().to_string();
    assert_key_format(&team);
    assert!(team.starts_with("tg_sk_"));
    let team_id = key_id(&team);
    assert_eq!(r.body["id"], team_id.as_str());
    assert_eq!(r.body["parent"], key_id(&root).as_str());
    assert_eq!(r.body["status"], "active");
    assert_eq!(r.body["limits"]["cps"], 20);
    assert_eq!(r.body["limits"]["source_cidrs"], json!([]));
    let exp = r.body["limits"]["expires_at"].as_i64().unwrap();
    assert!(
        (exp - now_unix() - 30 * 86_400).abs() < 60,
        "expires_at {exp}"
    );

    // The child makes a public key: inherits limits, keeps the denials.
    let r = api.post(
        "/v1/keys",
        &team,
        json!({"name": "app", "kind": "public", "allow_prefixes": ["1555"], "cps": 5}),
    );
    assert_eq!(r.status, 201, "{r}");
    let app = r.body["key"].as_str().unwrap().to_string();
    assert!(app.starts_with("tg_pk_"), "{app}");
    assert_eq!(r.body["scopes"], json!(["calls"]));
    assert_eq!(r.body["limits"]["max_calls"], 10, "inherited: {r}");
    assert_eq!(r.body["limits"]["deny_prefixes"], json!(["+1900"]));
    assert_eq!(r.body["limits"]["expires_at"].as_i64(), Some(exp));

    // Refusals of create: looser limits, scopes not held, bad fields, bodies.
    for (case, body, code) in [
        ("cps above parent", json!({"name": "x", "cps": 21}), 400),
        (
            "allow outside",
            json!({"name": "x", "allow_prefixes": ["+44"]}),
            400,
        ),
        (
            "trusted outside source",
            json!({"name": "x", "source_cidrs": ["10.0.0.0/8"], "trusted_cidrs": ["11.0.0.0/8"]}),
            400,
        ),
        (
            "later expiry",
            json!({"name": "x", "expires_in": "60d"}),
            400,
        ),
        (
            "public with keys scope",
            json!({"name": "x", "kind": "public", "scopes": ["keys"]}),
            400,
        ),
        (
            "unknown scope",
            json!({"name": "x", "scopes": ["admin"]}),
            400,
        ),
        ("unknown field", json!({"name": "x", "colour": "red"}), 400),
        (
            "bad cidr",
            json!({"name": "x", "source_cidrs": ["nope"]}),
            400,
        ),
        ("empty name", json!({"name": " "}), 400),
        ("no name", json!({}), 400),
        ("bad kind", json!({"name": "x", "kind": "root"}), 400),
    ] {
        let r = api.post("/v1/keys", &team, body);
        assert_error(&r, code, "invalid_request", case);
    }
    let r = api.post(
        "/v1/keys",
        &root,
        json!({"name": "x", "scopes": ["calls"], "expires_at": 1}),
    );
    assert_error(&r, 400, "invalid_request", "expiry in the past");
    let r = api.raw(
        Method::POST,
        "/v1/keys",
        Some(&format!("Bearer {team}")),
        Some("application/json"),
        Some(b"{\"name\":".to_vec()),
    );
    assert_error(&r, 400, "invalid_request", "truncated JSON");
    let r = api.raw(
        Method::POST,
        "/v1/keys",
        Some(&format!("Bearer {team}")),
        Some("text/plain"),
        Some(b"{\"name\":\"x\"}".to_vec()),
    );
    assert_error(&r, 415, "unsupported_media_type", "text/plain body");
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(100_000));
    let r = api.raw(
        Method::POST,
        "/v1/keys",
        Some(&format!("Bearer {team}")),
        Some("application/json"),
        Some(big.into_bytes()),
    );
    assert_error(&r, 413, "payload_too_large", "100 kB body");

    // List: the root sees every key, the child itself and its descendants;
    // no secret material ever.
    let r = api.get("/v1/keys", &root);
    assert_eq!(r.status, 200, "{r}");
    let ids: Vec<&str> = r.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    for k in [&root, &team, &app] {
        assert!(ids.contains(&key_id(k).as_str()), "{ids:?}");
        let secret = &k[19..];
        assert!(!r.text.contains(secret), "a secret is listed");
        assert!(
            !r.text.contains(&hex(&sha256(k.as_bytes()))),
            "a key hash is listed"
        );
        assert!(
            !r.text.contains(&token_signing_key_hex(k)),
            "a signing key is listed"
        );
    }
    let r = api.get("/v1/keys", &team);
    let mut names: Vec<&str> = r.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["app", "team"], "{r}");

    // The child cannot touch its parent (404, as if absent).
    let root_path = format!("/v1/keys/{}", key_id(&root));
    assert_error(
        &api.delete(&root_path, &team),
        404,
        "not_found",
        "revoke parent",
    );
    let r = api.call(
        Method::POST,
        &format!("{root_path}/roll"),
        Some(&team),
        None,
    );
    assert_error(&r, 404, "not_found", "roll parent");
    assert_error(
        &api.delete("/v1/keys/zzzzzzzzzzzz", &root),
        404,
        "not_found",
        "revoke unknown",
    );
    assert_error(
        &api.delete("/v1/keys/Not-An-Id", &root),
        400,
        "invalid_request",
        "revoke bad id",
    );

    // Roll through the API: the next INVITE with the old secret gets 401.
    // (A child of the root: a key reaches only its own subtree.)
    let caller = s.edge.create_key("caller", &["--parent", &key_id(&root)]);
    complete_call(&s.edge, &caller);
    let r = api.call(
        Method::POST,
        &format!("/v1/keys/{}/roll", key_id(&caller)),
        Some(&root),
        None,
    );
    assert_eq!(r.status, 200, "{r}");
    let rolled = r.body["key"].as_str().unwrap().to_string();
    assert_key_format(&rolled);
    assert_eq!(key_id(&rolled), key_id(&caller));
    assert_ne!(rolled, caller);
    assert_eq!(r.body["old_secret_valid_until"], Value::Null);
    let (_, _, resp) = invite_with(&s.edge, &caller);
    assert_invalid_token(&resp, "INVITE with the secret rolled through the API");
    complete_call(&s.edge, &rolled);
    // ... and the admin API refuses the old secret too.
    let r = api.post(
        &format!("/v1/keys/{}/roll", key_id(&team)),
        &team,
        json!({"grace": "10m"}),
    );
    assert_eq!(r.status, 200, "{r}");
    let team2 = r.body["key"].as_str().unwrap().to_string();
    let until = r.body["old_secret_valid_until"].as_i64().unwrap();
    assert!((until - now_unix() - 600).abs() < 60, "{r}");
    // with grace, both secrets work for now
    assert_eq!(api.get("/v1/keys", &team).status, 200);
    assert_eq!(api.get("/v1/keys", &team2).status, 200);
    let r = api.post(
        &format!("/v1/keys/{}/roll", key_id(&team)),
        &team2,
        json!({"grace": "90d"}),
    );
    assert_error(&r, 400, "invalid_request", "grace too long");
    let r = api.call(
        Method::POST,
        &format!("/v1/keys/{}/roll", key_id(&team)),
        Some(&team2),
        None,
    );
    assert_eq!(r.status, 200, "{r}");
    assert_error(
        &api.get("/v1/keys", &team2),
        401,
        "invalid_key",
        "rolled without grace",
    );

    // Revoke through the API: the key and its children, at once, on the SIP side too.
    let victim = s.edge.create_key("victim", &["--parent", &key_id(&root)]);
    wait_loaded(api, &victim);
    let r = api.post(
        "/v1/keys",
        &victim,
        json!({"name": "victim-child", "scopes": ["calls"]}),
    );
    assert_eq!(r.status, 201, "{r}");
    let grandchild = r.body["key"].as_str().unwrap().to_string();
    complete_call(&s.edge, &grandchild);
    let r = api.delete(&format!("/v1/keys/{}", key_id(&victim)), &root);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body["status"], "revoked");
    let (_, _, resp) = invite_with(&s.edge, &victim);
    assert_invalid_token(&resp, "INVITE with a key revoked through the API");
    let (_, _, resp) = invite_with(&s.edge, &grandchild);
    assert_invalid_token(&resp, "INVITE with a child of a revoked key");
    // idempotent; a revoked key cannot be rolled
    assert_eq!(
        api.delete(&format!("/v1/keys/{}", key_id(&victim)), &root)
            .status,
        200
    );
    let r = api.call(
        Method::POST,
        &format!("/v1/keys/{}/roll", key_id(&victim)),
        Some(&root),
        None,
    );
    assert_error(&r, 409, "key_revoked", "roll a revoked key");
    let list = s.edge.cli(&["keys", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with(&key_id(&victim)) && l.contains("revoked")),
        "the CLI sees the revocation:\n{list}"
    );
}

#[test]
fn usage_and_active_calls_and_admin_hang_up() {
    let s = start_https_edge();
    let api = &s.api;
    let root = s.edge.first_key();
    let r = api.post(
        "/v1/keys",
        &root,
        json!({"name": "ops", "scopes": ["calls", "usage", "trunks"]}),
    );
    assert_eq!(r.status, 201, "{r}");
    let ops = r.body["key"].as_str().unwrap().to_string();
    let other = s.edge.create_key("other", &[]);
    wait_loaded(api, &other);

    // No calls yet.
    let r = api.get("/v1/calls", &root);
    assert_eq!((r.status, &r.body), (200, &json!({"calls": []})), "{r}");

    // A call up with `ops`.
    let (mut ua, inv, ok) = invite_with(&s.edge, &ops);
    assert_eq!(ok.code(), Some(200), "{}", ok.text());
    ua.send(&inv.in_dialog(&ok, "ACK", inv.cseq));
    let r = api.get("/v1/calls", &ops);
    assert_eq!(r.status, 200, "{r}");
    let calls = r.body["calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 1, "{r}");
    let c = &calls[0];
    assert_eq!(c["key"], key_id(&ops).as_str());
    // Canonical E.164 (SPEC §4a).
    assert_eq!(c["to"], format!("+{SERVICE}"));
    assert_eq!(c["from"], "+15550001111");
    assert_eq!(c["sip_call_id"], inv.call_id.as_str());
    assert_eq!(c["state"], "answered", "{r}");
    assert!(c["answered_at"].as_i64().is_some());
    assert!((c["start"].as_i64().unwrap() - now_unix()).abs() < 60);
    let id = c["id"].as_str().unwrap().to_string();
    // Another key of the account cannot see or end it (a key reaches its own subtree only).
    let r = api.post(
        "/v1/keys",
        &other,
        json!({"name": "other-ops", "scopes": ["trunks"]}),
    );
    let other_ops = r.body["key"].as_str().unwrap().to_string();
    assert_eq!(api.get("/v1/calls", &other_ops).body, json!({"calls": []}));
    let path = format!("/v1/calls/{}", urlencode(&id));
    assert_error(
        &api.delete(&path, &other_ops),
        404,
        "not_found",
        "someone else's call",
    );
    assert_error(
        &api.delete("/v1/calls/no-such-call", &ops),
        404,
        "not_found",
        "unknown call",
    );
    let r = api.get("/v1/calls", &root);
    assert_eq!(r.body["calls"].as_array().map(Vec::len), Some(1), "{r}");

    // Hang it up: BYE to the caller, CDR cause admin_hangup.
    let r = api.delete(&path, &ops);
    assert_eq!(r.status, 202, "{r}");
    assert_eq!(r.body["id"], id.as_str());
    let bye = ua
        .recv_where(Duration::from_secs(10), |m| m.method() == Some("BYE"))
        .expect("the caller gets a BYE after DELETE /v1/calls/{id}");
    ua.send_raw(&make_response(&bye, 200, "OK", "x", "", ""));
    let t0 = Instant::now();
    let cdr = loop {
        if let Some(c) = read_cdrs(&s.edge.data_dir)
            .into_iter()
            .find(|c| c["call_id"] == id.as_str())
        {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no CDR for call {id} 10 s after the hang-up"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(cdr["cause"], "admin_hangup", "{cdr}");
    assert_eq!(cdr["key_id"], key_id(&ops).as_str());
    let r = api.get("/v1/calls", &ops);
    assert_eq!(r.body, json!({"calls": []}), "{r}");
    assert_error(
        &api.delete(&path, &ops),
        404,
        "not_found",
        "call already ended",
    );

    // Usage from the durable CDRs: per key, since, visibility.
    complete_call(&s.edge, &other);
    let r = api.get(&format!("/v1/usage?key={}", key_id(&ops)), &ops);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body["keys"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r.body["keys"][0]["key"], key_id(&ops).as_str());
    assert_eq!(r.body["keys"][0]["calls"], 1, "{r}");
    assert_eq!(r.body["keys"][0]["answered"], 1, "{r}");
    assert_eq!(r.body["total"]["calls"], 1, "{r}");
    // ops sees only its own usage even without ?key
    let r = api.get("/v1/usage", &ops);
    assert_eq!(r.body["total"]["calls"], 1, "{r}");
    // Each root sees its own subtree only (SPEC §2): wait for the other
    // call's CDR, written at BYE, then the first root still counts one call.
    let t0 = Instant::now();
    loop {
        let r = api.get("/v1/usage", &other);
        assert_eq!(r.status, 200, "{r}");
        if r.body["total"]["calls"] == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "other usage: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = api.get("/v1/usage", &root);
    assert_eq!(r.body["total"]["calls"], 1, "{r}");
    let r = api.get(&format!("/v1/usage?since={}", now_unix() + 3600), &root);
    assert_eq!(r.body["total"]["calls"], 0, "{r}");
    let r = api.get("/v1/usage?since=1d", &root);
    assert_eq!(r.body["total"]["calls"], 1, "{r}");
    let r = api.get(&format!("/v1/usage?key={}", key_id(&other)), &root);
    assert_error(&r, 404, "not_found", "usage of another root key");
    let r = api.get(&format!("/v1/usage?key={}", key_id(&other)), &ops);
    assert_error(&r, 404, "not_found", "usage of another key");
    assert_error(
        &api.get("/v1/usage?since=soon", &root),
        400,
        "invalid_request",
        "bad since",
    );
    assert_error(
        &api.get("/v1/usage?key=Bad", &root),
        400,
        "invalid_request",
        "bad key",
    );
    assert_error(
        &api.get("/v1/usage?colour=red", &root),
        400,
        "invalid_request",
        "bad param",
    );
    let r = api.get("/v1/usage", &other_ops);
    assert_error(
        &r,
        403,
        "insufficient_scope",
        "usage without the usage scope",
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn token_signing_key_hex(key: &str) -> String {
    hex(&token_signing_key(key))
}

#[test]
fn admin_tls_config_errors_exit_2_naming_the_field() {
    let dir = TestDir::new("admin-config");
    let (_, cert, key) = make_pki(&dir.path);
    let (_, other_cert, _) = make_pki(&dir.join("other-pki").tap_mkdir());
    let missing = dir.join("missing.pem").display().to_string();
    let data = dir.join("data").display().to_string();
    for (case, admin, field) in [
        (
            "cert without key",
            format!("tls_cert = \"{cert}\"\n"),
            "admin.tls_key",
        ),
        (
            "key without cert",
            format!("tls_key = \"{key}\"\n"),
            "admin.tls_cert",
        ),
        (
            "missing cert file",
            format!("tls_cert = \"{missing}\"\ntls_key = \"{key}\"\n"),
            "admin.tls_cert",
        ),
        (
            "missing key file",
            format!("tls_cert = \"{cert}\"\ntls_key = \"{missing}\"\n"),
            "admin.tls_key",
        ),
        (
            "key of another certificate",
            format!("tls_cert = \"{other_cert}\"\ntls_key = \"{key}\"\n"),
            "admin.tls_key",
        ),
        (
            "unknown field",
            "tls_certificate = \"x\"\n".to_string(),
            "tls_certificate",
        ),
    ] {
        let cfg = dir.join(&format!("{}.toml", unique("cfg")));
        std::fs::write(
            &cfg,
            format!(
                "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin}"
            ),
        )
        .unwrap();
        let cfg = cfg.display().to_string();
        let out = tollgate(&["serve", "--data-dir", &data, "--config", &cfg]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "[{case}] {stderr}");
        assert!(
            stderr.contains(field),
            "[{case}] must name {field}: {stderr}"
        );
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn sighup_reloads_the_admin_certificate() {
    let s = start_https_edge();
    let root = s.edge.first_key();
    assert_eq!(s.api.get("/v1/keys", &root).status, 200);
    // A new CA and certificate written over the configured files.
    let fresh = s.edge.dir.join("fresh-pki").tap_mkdir();
    let (new_ca, new_cert, new_key) = make_pki(&fresh);
    std::fs::copy(&new_cert, s.edge.dir.join("admin-cert.pem")).unwrap();
    std::fs::copy(&new_key, s.edge.dir.join("admin-key.pem")).unwrap();
    let st = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(s.edge.pid().to_string())
        .status()
        .expect("kill -HUP");
    assert!(st.success());
    let t0 = Instant::now();
    while !s
        .edge
        .stdout_lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("tollgate: reload"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no `tollgate: reloaded` line 10 s after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let renewed = Api::new(s.admin, &new_ca);
    assert_eq!(
        renewed.get("/v1/keys", &root).status,
        200,
        "a client trusting only the new CA after SIGHUP"
    );
    // A fresh client trusting only the old CA is refused now.
    let old_only = Api::new(s.admin, &s.ca);
    let url = format!("{}/v1/keys", old_only.base);
    let r = old_only
        .rt
        .block_on(async { old_only.client.get(url).send().await });
    assert!(r.is_err(), "the old certificate is still served: {r:?}");
}
