//! Call webhooks end to end (SPEC §7, issue 5 item 3) against the real binary.
//!
//! The receiver is a local HTTPS server (rcgen certificates, tokio-rustls,
//! hyper); the edge trusts its CA through `[webhooks] ca_file` and may reach
//! 127.0.0.1 because the test config allow-lists it. Webhooks are https only
//! (SPEC §3: the claim is an https URL), allow-listed or not.
//!
//! cargo test --workspace --test e2e_webhook
mod common;
use common::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// Test certificates and the HTTPS receiver
// ---------------------------------------------------------------------------

/// A CA and a leaf for `localhost` / 127.0.0.1 signed by it.
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate webhook test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    signature: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// HTTPS server on 127.0.0.1 answering 200 to every request and keeping it.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    /// The accept loop and every connection: aborted by `stop` (keep-alive
    /// connections included, so the edge really finds nobody there).
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Receiver {
    async fn start(port: u16, tls: Arc<rustls::ServerConfig>) -> Receiver {
        // The port may have been held a moment ago: retry the bind briefly.
        let t0 = Instant::now();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("receiver cannot bind 127.0.0.1:{port}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (g, t) = (got.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, g) = (acceptor.clone(), g.clone());
                let conn = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let g = g.clone();
                            async move {
                                let hdr = |n: &str| {
                                    req.headers()
                                        .get(n)
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_string)
                                };
                                let signature = hdr("x-tollgate-signature");
                                let content_type = hdr("content-type");
                                let path = req.uri().path().to_string();
                                let body = axum::body::to_bytes(
                                    axum::body::Body::new(req.into_body()),
                                    1 << 20,
                                )
                                .await
                                .map(|b| b.to_vec())
                                .unwrap_or_default();
                                g.lock().unwrap().push(Got {
                                    path,
                                    signature,
                                    content_type,
                                    body,
                                });
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    axum::body::Body::from("ok"),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
                t.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Receiver { addr, got, tasks }
    }

    /// Closes the listener and every connection, and waits until they are gone.
    async fn stop(&self) {
        let all: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in &all {
            t.abort();
        }
        for t in all {
            let _ = t.await;
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().iter() {
            t.abort();
        }
    }
}

/// A TCP listener that accepts connections and never says a word: a webhook
/// receiver that hangs every request until the edge's timeout.
async fn tarpit() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// A plain TCP listener that only counts connections.
async fn counter() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let task = tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            n2.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, n, task)
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// SPEC §7: lowercase hex of HMAC-SHA256(full key, "tollgate-webhook-v1"),
/// computed with the harness's own HMAC (not the product's).
fn webhook_secret(key: &str) -> String {
    hex(&hmac_sha256(key.as_bytes(), b"tollgate-webhook-v1"))
}

/// Checks `t=<ts>,v1=<hex>` against the body; returns the timestamp.
fn verify_signature(secret: &str, header: &str, body: &[u8]) -> i64 {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let t = t.unwrap_or_else(|| panic!("no t= in signature {header:?}"));
    let v1 = v1.unwrap_or_else(|| panic!("no v1= in signature {header:?}"));
    let mut msg = t.clone().into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(body);
    let want = hex(&hmac_sha256(secret.as_bytes(), &msg));
    assert_eq!(v1, want, "signature does not verify: {header:?}");
    let ts: i64 = t
        .parse()
        .unwrap_or_else(|_| panic!("t= is not an integer: {header:?}"));
    assert!(
        (ts - now_unix()).abs() < 600,
        "signature timestamp {ts} far from now {}",
        now_unix()
    );
    ts
}

fn webhook_toml(ca: &Path, allow: bool, extra: &str) -> String {
    let mut s = format!("[webhooks]\nca_file = \"{}\"\n", ca.display());
    if allow {
        s.push_str("allow_cidrs = [\"127.0.0.1/32\"]\n");
    }
    s.push_str(extra);
    s
}

/// One call through the edge (built-in echo destination): INVITE with a
/// bearer token naming `webhook` (if any), ACK, BYE. Returns leg A's Call-ID
/// and the INVITE -> 200 time.
fn call(edge: &Edge, key: &str, webhook: Option<&str>) -> (String, Duration) {
    let extra: Vec<&str> = match webhook {
        Some(w) => vec!["--webhook", w],
        None => vec![],
    };
    let token = mint(key, SERVICE, "alice", &extra);
    let mut ua = UdpUa::new(edge.sip_udp);
    let r = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token);
    let t0 = Instant::now();
    let fin = ua.call(&r);
    let setup = t0.elapsed();
    assert_eq!(
        fin.code(),
        Some(200),
        "call must be answered:\n{}",
        fin.text()
    );
    assert_eq!(ua.ack_and_bye(&r, &fin), Some(200), "BYE must get 200");
    (r.call_id.clone(), setup)
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| {
        panic!(
            "webhook body is not JSON ({e}): {}",
            String::from_utf8_lossy(b)
        )
    })
}

/// Events grouped by the caller's Call-ID, in arrival order.
fn by_call(got: &[Got]) -> HashMap<String, Vec<serde_json::Value>> {
    let mut m: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for g in got {
        let v = json(&g.body);
        let k = v["sip_call_id"].as_str().unwrap_or_default().to_string();
        m.entry(k).or_default().push(v);
    }
    m
}

fn metric(edge: &Edge, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&scrape(edge.metrics_addr()), name, labels).unwrap_or(0.0)
}

/// The events of one call: three, in order, about this call, signed.
fn check_call_events(events: &[serde_json::Value], a_call_id: &str, key: &str) {
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        types,
        ["call.initiated", "call.answered", "call.completed"],
        "events of call {a_call_id} out of order or missing: {events:#?}"
    );
    let cdr_id = events[0]["call_id"].as_str().unwrap_or_default();
    assert!(
        cdr_id.ends_with("@tollgate") && cdr_id != a_call_id,
        "call_id must be the CDR id (leg B's Call-ID): {cdr_id:?}"
    );
    for e in events {
        assert_eq!(e["call_id"], cdr_id, "one call id for all events: {e}");
        assert_eq!(e["sip_call_id"], a_call_id, "{e}");
        assert_eq!(e["key_id"], key_id(key).as_str(), "{e}");
        assert_eq!(e["to"], format!("+{SERVICE}"), "{e}"); // canonical (SPEC §4a)
        assert_eq!(e["from"], "alice", "{e}");
        assert!(
            e["start"].as_i64().is_some() && e["created"].as_i64().is_some(),
            "{e}"
        );
    }
    assert!(events[1]["answer"].as_i64().is_some(), "{}", events[1]);
    let done = &events[2];
    assert_eq!(done["cause"], "normal", "{done}");
    assert!(done["end"].as_i64().is_some(), "{done}");
    assert!(
        done["duration_secs"].as_i64().is_some_and(|d| d >= 0),
        "{done}"
    );
    assert!(done["billable_secs"].as_u64().is_some(), "{done}");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// A receiver whose CA the edge trusts (`[webhooks] ca_file`) and an edge
/// allowed to post to 127.0.0.1. Bind every field, the runtime first, so that
/// it is dropped last (a `..` would drop the rest, the runtime with it, at
/// once).
struct Setup {
    edge: Edge,
    rx: Receiver,
    pki: Pki,
    _dir: TestDir,
    rt: tokio::runtime::Runtime,
}

fn setup(tag: &str, backoff: &str) -> Setup {
    let rt = rt();
    let pki = pki();
    let dir = TestDir::new(tag);
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let rx = rt.block_on(Receiver::start(0, pki.server.clone()));
    let edge = Edge::start(EdgeConfig {
        extra_toml: webhook_toml(&ca, true, backoff),
        ..Default::default()
    });
    Setup {
        edge,
        rx,
        pki,
        _dir: dir,
        rt,
    }
}

#[test]
fn three_signed_events_per_call_in_order() {
    let Setup {
        rt: _rt,
        _dir,
        pki: _pki,
        rx,
        edge,
    } = setup(
        "webhook-ok",
        "backoff_initial_ms = 100\nbackoff_max_s = 1\n",
    );
    let key = edge.first_key();
    let secret = webhook_secret(&key);
    // By name (the edge resolves it and connects only to the allowed
    // 127.0.0.1) and by address literal.
    let urls = [
        format!("https://localhost:{}/hooks/tollgate?x=1", rx.addr.port()),
        format!("https://127.0.0.1:{}/hooks/tollgate", rx.addr.port()),
        format!("https://localhost:{}/hooks/tollgate", rx.addr.port()),
    ];
    let mut ids = Vec::new();
    for u in &urls {
        ids.push(call(&edge, &key, Some(u)).0);
    }
    let want = 3 * ids.len();
    let got = poll(Duration::from_secs(30), || {
        let g = rx.got();
        (g.len() >= want).then_some(g)
    })
    .unwrap_or_else(|| {
        panic!(
            "receiver got {} of {want} events within 30 s: {:#?}\nedge stderr:\n{}",
            rx.got().len(),
            rx.got(),
            edge.stderr_tail(40)
        )
    });
    // Nothing more arrives (no duplicates after success).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.got().len(), want, "extra deliveries: {:#?}", rx.got());
    for g in &got {
        assert_eq!(g.path, "/hooks/tollgate");
        assert_eq!(g.content_type.as_deref(), Some("application/json"));
        let sig = g.signature.as_deref().expect("X-Tollgate-Signature header");
        verify_signature(&secret, sig, &g.body);
        // A wrong secret must not verify (the check above is not vacuous).
        let other = webhook_secret(&format!("{key}x"));
        let mut m = sig
            .split(',')
            .next()
            .unwrap()
            .trim_start_matches("t=")
            .as_bytes()
            .to_vec();
        m.push(b'.');
        m.extend_from_slice(&g.body);
        assert_ne!(
            hex(&hmac_sha256(other.as_bytes(), &m)),
            sig.split("v1=").nth(1).unwrap()
        );
    }
    let calls = by_call(&got);
    for id in &ids {
        let ev = calls
            .get(id)
            .unwrap_or_else(|| panic!("no events for call {id}: {calls:#?}"));
        check_call_events(ev, id, &key);
    }
    // The call id in the events is the CDR's.
    let cdr_text: String = std::fs::read_dir(&edge.data_dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    let first = calls[&ids[0]][0]["call_id"].as_str().unwrap().to_string();
    assert!(
        poll(Duration::from_secs(10), || {
            let t: String = std::fs::read_dir(&edge.data_dir)
                .ok()?
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .collect();
            t.contains(&first).then_some(())
        })
        .is_some(),
        "CDR store has no record with call_id {first}: {cdr_text}"
    );
    let delivered = poll(Duration::from_secs(10), || {
        let n = metric(
            &edge,
            "tollgate_webhook_deliveries_total",
            &[("outcome", "delivered")],
        );
        (n >= want as f64).then_some(n)
    });
    assert_eq!(delivered, Some(want as f64));
    let stderr = std::fs::read_to_string(&edge.stderr_path).unwrap_or_default();
    assert!(
        !stderr.contains(&secret),
        "webhook secret in the edge's log"
    );
    assert!(
        !stderr.contains(&key[19..]),
        "API key secret in the edge's log"
    );
}

#[test]
fn events_arrive_after_the_receiver_was_down_for_10s() {
    let Setup {
        rt,
        _dir,
        pki,
        rx,
        edge,
    } = setup(
        "webhook-down",
        "backoff_initial_ms = 200\nbackoff_max_s = 2\n",
    );
    let port = rx.addr.port();
    let key = edge.first_key();
    let secret = webhook_secret(&key);
    let url = format!("https://localhost:{port}/down");
    // Up: the first call's events arrive (and leave a pooled connection).
    let first = call(&edge, &key, Some(&url)).0;
    assert!(
        poll(Duration::from_secs(20), || (rx.got().len() >= 3)
            .then_some(()))
        .is_some(),
        "first call's events did not arrive: {:#?}\n{}",
        rx.got(),
        edge.stderr_tail(40)
    );
    // Down for 10 s: listener and connections closed; two calls meanwhile.
    rt.block_on(rx.stop());
    let t_down = Instant::now();
    let ids: Vec<String> = (0..2).map(|_| call(&edge, &key, Some(&url)).0).collect();
    std::thread::sleep(Duration::from_secs(10).saturating_sub(t_down.elapsed()));
    assert!(
        metric(&edge, "tollgate_webhook_retries_total", &[]) >= 2.0,
        "the edge must have retried while the receiver was down:\n{}",
        scrape(edge.metrics_addr())
    );
    assert_eq!(rx.got().len(), 3, "nothing can arrive while it is down");
    // Back on the same port: the held events arrive, in order, signed.
    let rx2 = rt.block_on(Receiver::start(port, pki.server.clone()));
    let got = poll(Duration::from_secs(40), || {
        let g = rx2.got();
        (g.len() >= 6).then_some(g)
    })
    .unwrap_or_else(|| {
        panic!(
            "after the receiver came back it got {} of 6 events within 40 s\nedge stderr:\n{}",
            rx2.got().len(),
            edge.stderr_tail(40)
        )
    });
    for g in rx.got().iter().chain(&got) {
        verify_signature(&secret, g.signature.as_deref().expect("signature"), &g.body);
    }
    check_call_events(&by_call(&rx.got())[&first], &first, &key);
    let calls = by_call(&got);
    for id in &ids {
        check_call_events(&calls[id], id, &key);
    }
    let delivered = poll(Duration::from_secs(10), || {
        let n = metric(
            &edge,
            "tollgate_webhook_deliveries_total",
            &[("outcome", "delivered")],
        );
        (n >= 9.0).then_some(n)
    });
    assert_eq!(delivered, Some(9.0));
}

#[test]
fn a_dead_webhook_slows_no_call() {
    let rt = rt();
    let pki = pki();
    let dir = TestDir::new("webhook-dead");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (pit, _pit_task) = rt.block_on(tarpit());
    // Requests hang for 10 s each; one at a time; few events may wait: the
    // dispatcher is saturated at once and must drop, never push back.
    let edge = Edge::start(EdgeConfig {
        extra_toml: webhook_toml(
            &ca,
            true,
            "timeout_ms = 10000\nconcurrency = 1\nmax_pending = 4\nqueue = 4\n",
        ),
        ..Default::default()
    });
    let key = edge.first_key();
    let url = format!("https://127.0.0.1:{}/dead", pit.port());
    const N: usize = 12;
    // Interleaved, so both sets see the same machine load.
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..N {
        without.push(call(&edge, &key, None).1);
        with.push(call(&edge, &key, Some(&url)).1);
    }
    with.sort();
    without.sort();
    let (mw, mo) = (with[N / 2], without[N / 2]);
    eprintln!(
        "setup median: dead webhook {mw:?}, none {mo:?}; max {:?} vs {:?}",
        with[N - 1],
        without[N - 1]
    );
    assert!(
        mw <= mo * 3 + Duration::from_millis(100),
        "calls with a dead webhook are slower: median {mw:?} vs {mo:?}"
    );
    assert!(
        with[N - 1] < Duration::from_secs(2),
        "a call with a dead webhook took {:?} to set up",
        with[N - 1]
    );
    // The dispatcher was full: events were dropped and counted, not waited for.
    let drops = metric(&edge, "tollgate_webhook_drops_total", &[]);
    assert!(
        drops > 0.0,
        "expected dropped webhook events:\n{}",
        scrape(edge.metrics_addr())
    );
    assert!(
        metric(&edge, "tollgate_webhook_queue_depth", &[]) <= 4.0 + 4.0,
        "queue depth beyond its bounds"
    );
}

#[test]
fn refused_targets_are_never_contacted_and_are_counted() {
    let rt = rt();
    let pki = pki();
    let dir = TestDir::new("webhook-refused");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (addr, accepted, _task) = rt.block_on(counter());
    // No allow-list: loopback is refused.
    let edge = Edge::start(EdgeConfig {
        extra_toml: webhook_toml(&ca, false, ""),
        ..Default::default()
    });
    let key = edge.first_key();
    for u in [
        format!("https://127.0.0.1:{}/zq-private-path", addr.port()),
        format!("https://localhost:{}/zq-private-path", addr.port()),
        format!("https://[::ffff:127.0.0.1]:{}/zq-private-path", addr.port()),
    ] {
        call(&edge, &key, Some(&u));
    }
    // Not https: refused as invalid, never contacted either.
    call(
        &edge,
        &key,
        Some(&format!("http://127.0.0.1:{}/zq-private-path", addr.port())),
    );
    let refused = poll(Duration::from_secs(20), || {
        let n = metric(
            &edge,
            "tollgate_webhook_deliveries_total",
            &[("outcome", "refused")],
        );
        (n >= 9.0).then_some(n)
    });
    assert_eq!(
        refused,
        Some(9.0),
        "3 calls x 3 events must be refused:\n{}",
        scrape(edge.metrics_addr())
    );
    let invalid = poll(Duration::from_secs(10), || {
        let n = metric(
            &edge,
            "tollgate_webhook_deliveries_total",
            &[("outcome", "invalid")],
        );
        (n >= 3.0).then_some(n)
    });
    assert_eq!(invalid, Some(3.0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused target was contacted"
    );
    assert_eq!(
        metric(&edge, "tollgate_webhook_retries_total", &[]),
        0.0,
        "refusals are not retried"
    );
    let stderr = std::fs::read_to_string(&edge.stderr_path).unwrap_or_default();
    assert!(stderr.contains("refused"), "refusals are logged:\n{stderr}");
    assert!(
        !stderr.contains("/zq-private-path"),
        "the log must not carry the webhook URL's path"
    );
}

#[test]
fn a_key_stored_before_webhooks_sends_none_until_rolled() {
    let rt = rt();
    let pki = pki();
    let dir = TestDir::new("webhook-oldkey");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let rx = rt.block_on(Receiver::start(0, pki.server.clone()));
    // A key store as an older edge wrote it: no webhook secret in the record.
    let data = dir.join("data");
    let key = create_key(&data, "old", &[]);
    let path = data.join("keys.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut stripped = 0;
    for k in v["keys"].as_array_mut().expect("keys array") {
        for s in k["secrets"].as_array_mut().expect("secrets array") {
            stripped += usize::from(
                s.as_object_mut()
                    .unwrap()
                    .remove("webhook_secret")
                    .is_some(),
            );
        }
    }
    assert_eq!(stripped, 1, "keys.json must store the webhook secret: {v}");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let edge = Edge::start_in(
        dir,
        EdgeConfig {
            extra_toml: webhook_toml(&ca, true, ""),
            ..Default::default()
        },
    );
    let url = format!("https://127.0.0.1:{}/old", rx.addr.port());
    call(&edge, &key, Some(&url));
    call(&edge, &key, Some(&url));
    assert_eq!(
        metric(
            &edge,
            "tollgate_webhook_deliveries_total",
            &[("outcome", "no_secret")]
        ),
        2.0
    );
    let warned = poll(Duration::from_secs(5), || {
        let s = std::fs::read_to_string(&edge.stderr_path).unwrap_or_default();
        s.contains("no webhook secret").then_some(s)
    })
    .expect("a key without a webhook secret is logged");
    assert_eq!(
        warned.matches("no webhook secret").count(),
        1,
        "logged once:\n{warned}"
    );
    // Rolling the key stores a webhook secret; the edge sees it within 1 s.
    let new_key = edge
        .cli(&["keys", "roll", &key_id(&key)])
        .trim()
        .to_string();
    assert_key_format(&new_key);
    std::thread::sleep(Duration::from_millis(1200));
    let id = call(&edge, &new_key, Some(&url)).0;
    let got = poll(Duration::from_secs(20), || {
        let g = rx.got();
        (g.len() >= 3).then_some(g)
    })
    .unwrap_or_else(|| {
        panic!(
            "events after the roll: {:#?}\n{}",
            rx.got(),
            edge.stderr_tail(30)
        )
    });
    assert_eq!(got.len(), 3, "only the rolled key's call sends events");
    for g in &got {
        verify_signature(
            &webhook_secret(&new_key),
            g.signature.as_deref().unwrap(),
            &g.body,
        );
    }
    check_call_events(&by_call(&got)[&id], &id, &new_key);
}

#[test]
fn a_keys_default_webhook_gets_events_when_the_token_names_none() {
    let Setup {
        rt: _rt,
        _dir,
        pki: _pki,
        rx,
        edge,
    } = setup(
        "webhook-default",
        "backoff_initial_ms = 100\nbackoff_max_s = 1\n",
    );
    // Refused at the CLI: not https.
    let bad = tollgate(&[
        "keys",
        "create",
        "--data-dir",
        edge.data_dir.to_str().unwrap(),
        "--name",
        "plain",
        "--webhook",
        "http://127.0.0.1:1/x",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", describe_output(&[], &bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--webhook"),
        "the error must name --webhook: {}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let url = format!("https://127.0.0.1:{}/default", rx.addr.port());
    let key = edge.create_key("with-default", &["--webhook", &url]);
    // The running edge sees the new key within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let (id, _) = call(&edge, &key, None);
    let got = poll(Duration::from_secs(30), || {
        let g = rx.got();
        (g.len() >= 3).then_some(g)
    })
    .unwrap_or_else(|| {
        panic!(
            "the key's default webhook got {} of 3 events: {:#?}\nedge stderr:\n{}",
            rx.got().len(),
            rx.got(),
            edge.stderr_tail(40)
        )
    });
    let secret = webhook_secret(&key);
    for g in &got {
        assert_eq!(g.path, "/default");
        verify_signature(&secret, g.signature.as_deref().expect("signature"), &g.body);
    }
    check_call_events(&by_call(&got)[&id], &id, &key);
    // A token naming its own webhook wins over the key's default.
    let own = format!("https://127.0.0.1:{}/own", rx.addr.port());
    call(&edge, &key, Some(&own));
    let got = poll(Duration::from_secs(30), || {
        let g = rx.got();
        (g.len() >= 6).then_some(g)
    })
    .expect("events of the second call");
    assert!(
        got[3..].iter().all(|g| g.path == "/own"),
        "{:#?}",
        &got[3..]
    );
}
