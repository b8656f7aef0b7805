//! A fleet of edges on one real Redis (SPEC §8, issue 12 first increment):
//! single use of tokens and digest nonces fleet-wide, key changes on one
//! node honoured on the others within 1 s, and a Redis outage that refuses
//! new INVITEs with 503 + Retry-After (or admits them on local state) and
//! ends without an edge restart.
//!
//! Each test starts its own `redis-server` (Debian's package) on a free
//! loopback port with AOF in a temp dir, never a system service, and kills
//! it at the end.
//!
//! cargo test -p tollgate --test e2e_fleet
mod common;
mod trunk_support;
use common::*;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// SPEC's 1 s plus scheduling slack on a loaded 2-core box (as e2e_revoke).
const BOUND: Duration = Duration::from_millis(1300);

/// A `redis-server` of our own on 127.0.0.1:`port`.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: TestDir,
    /// TLS only (`rediss://`): (CA PEM path, server cert path, key path).
    tls: Option<(String, String, String)>,
    /// `--requirepass` (AUTH).
    password: Option<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(None)
    }

    fn start_with(tls: Option<(String, String, String)>) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut r = Redis {
            child: None,
            port,
            dir: TestDir::new("redis"),
            tls,
            password: None,
        };
        r.restart();
        r
    }

    fn start_with_password(password: &str) -> Redis {
        let mut r = Redis {
            child: None,
            port: TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            dir: TestDir::new("redis"),
            tls: None,
            password: Some(password.into()),
        };
        r.restart();
        r
    }

    /// redis-cli's connection arguments.
    fn cli_args(&self) -> Vec<String> {
        let mut a = vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
        ];
        if let Some((ca, _, _)) = &self.tls {
            a.extend(["--tls".into(), "--cacert".into(), ca.clone()]);
        }
        if let Some(p) = &self.password {
            a.extend(["--no-auth-warning".into(), "-a".into(), p.clone()]);
        }
        a
    }

    /// (Re)starts on the same port and data dir; AOF keeps the keys.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()]),
            Some((ca, cert, key)) => cmd
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--tls-port",
                    &self.port.to_string(),
                ])
                .args([
                    "--tls-cert-file",
                    cert,
                    "--tls-key-file",
                    key,
                    "--tls-ca-cert-file",
                    ca,
                ])
                .args(["--tls-auth-clients", "no"]),
        };
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.join(""))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (apt-get install redis-server): {e}")
            });
        self.child = Some(child);
        let up = poll(Duration::from_secs(10), || {
            let out = Command::new("redis-cli")
                .args(self.cli_args())
                .arg("PING")
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "PONG").then_some(())
        });
        assert!(
            up.is_some(),
            "redis-server on port {} did not answer PING",
            self.port
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(self.cli_args())
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string()
    }

    /// SIGSTOP / SIGCONT: a Redis that hangs without closing connections.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn state_toml(redis: &Redis, node: &str, on_unavailable: &str) -> String {
    format!(
        "[state]\nurl = \"{}\"\nnode = \"{node}\"\non_unavailable = \"{on_unavailable}\"\n",
        redis.url()
    )
}

/// `n` edges on `redis`, each routed to its own busy UAS (486: auth passed).
fn fleet(redis: &Redis, n: usize, on_unavailable: &str) -> Vec<(MiniUas, Edge)> {
    (0..n)
        .map(|i| {
            let uas = MiniUas::start(UasMode::Busy);
            let edge = Edge::start(EdgeConfig {
                route_target: Some(uas.route()),
                // A media range of its own: edges on the shared default
                // range collide (500) when many run at once.
                extra_toml: format!(
                    "{}{}",
                    state_toml(redis, &format!("edge-{}", i + 1), on_unavailable),
                    trunk_support::media_toml(120)
                ),
                ..Default::default()
            });
            (uas, edge)
        })
        .collect()
}

fn token(key: &str) -> String {
    let n = now_unix();
    jwt_for(key, &claims(n - 5, n + 300, SERVICE, "sipp"))
}

fn invite(edge: &Edge, bearer: &str) -> SipMsg {
    UdpUa::new(edge.sip_udp).call(&Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(bearer))
}

fn passes(r: &SipMsg) -> bool {
    r.code() == Some(486)
}

/// Probes `edge` with fresh tokens of `key` every 50 ms until `want`;
/// returns how long it took (panics after `limit`).
fn until(
    edge: &Edge,
    key: &str,
    what: &str,
    limit: Duration,
    want: impl Fn(&SipMsg) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = invite(edge, &token(key));
        if want(&r) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "[{what}] not reached after {limit:?}; last response:\n{}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tollgate keys --config CFG ARGS`, asserting success; stdout.
fn keys_cli(config: &Path, args: &[&str]) -> String {
    let cfg = config.to_str().unwrap();
    let mut all = vec!["keys", "--config", cfg];
    all.extend_from_slice(args);
    tollgate_ok(&all)
}

/// A plain-HTTP admin request (the harness's admin API is on loopback);
/// (status, JSON body).
fn admin(
    edge: &Edge,
    method: &str,
    path: &str,
    bearer: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let addr = edge.listening("admin").expect("admin listener");
    let headers = format!("Authorization: Bearer {bearer}\r\nContent-Type: application/json\r\n");
    let (code, body) = http_request_with_body(addr, method, path, &headers, body);
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn state_up(edge: &Edge) -> Option<f64> {
    metric_sum(&scrape(edge.metrics_addr()), "tollgate_state_up", &[])
}

#[test]
fn first_edge_makes_the_root_key_and_a_token_used_on_one_edge_is_refused_on_the_other() {
    let redis = Redis::start();
    let f = fleet(&redis, 2, "refuse");
    let (e1, e2) = (&f[0].1, &f[1].1);
    let root = e1.first_key();
    assert!(
        e2.first_key.is_none(),
        "only the first edge on an empty store creates a root key; the second printed one"
    );
    let t = token(&root);
    let r = invite(e1, &t);
    assert!(passes(&r), "fresh token on edge 1:\n{}", r.text());
    assert_invalid_token(&invite(e2, &t), "the same token (jti) on edge 2");
    assert_invalid_token(&invite(e1, &t), "the same token again on edge 1");
    // Edge 2 knows the key: a fresh token of it passes there.
    let r = invite(e2, &token(&root));
    assert!(passes(&r), "fresh token on edge 2:\n{}", r.text());
    assert_eq!(f[0].0.count("INVITE") + f[1].0.count("INVITE"), 2);
    assert_eq!(state_up(e1), Some(1.0), "tollgate_state_up on edge 1");
}

#[test]
fn digest_nonce_used_on_one_edge_is_refused_on_the_other() {
    let redis = Redis::start();
    let f = fleet(&redis, 2, "refuse");
    let (e1, e2) = (&f[0].1, &f[1].1);
    let key = e1.first_key();
    let (user, pass) = (key_id(&key), digest_password(&key));
    // A challenge from `challenger`, answered with a Request-URI naming
    // `named`, sent to `to`.
    let answer = |challenger: &Edge, named: &Edge, to: &Edge| -> (Req, SipMsg) {
        let mut ua = UdpUa::new(challenger.sip_udp);
        let first = Req::invite(challenger.sip_udp, SERVICE, "pbx");
        let ch = www_auth(&ua.call(&first));
        let p = ch
            .iter()
            .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
            .expect("a Digest challenge")
            .1
            .clone();
        let mut r = Req::invite(named.sip_udp, SERVICE, "pbx");
        r.call_id = first.call_id.clone();
        r.cseq = first.cseq + 1;
        let auth = digest_authorization(
            &p,
            &user,
            &pass,
            "INVITE",
            &r.ruri,
            "00000001",
            &unique("cn"),
        );
        let r = r.header("Authorization", &auth);
        let fin = UdpUa::new(to.sip_udp).call(&r);
        (r, fin)
    };
    // The fleet shares the nonce key: edge 1's nonce is answered on edge 2,
    // whichever edge the Request-URI names.
    let (_, fin) = answer(e1, e2, e2);
    assert!(
        passes(&fin),
        "edge 1's nonce answered on edge 2:\n{}",
        fin.text()
    );
    let (_, fin) = answer(e1, e1, e2);
    assert!(
        passes(&fin),
        "edge 1's nonce, URI naming edge 1, sent to edge 2:\n{}",
        fin.text()
    );
    // A nonce used on edge 1 is refused on edge 2.
    let (used, fin) = answer(e1, e1, e1);
    assert!(passes(&fin), "first use on edge 1:\n{}", fin.text());
    let mut replay = used.clone();
    replay.call_id = unique("call-") + "@tgtest";
    replay.branch = unique("z9hG4bK-tg");
    let fin = UdpUa::new(e2.sip_udp).call(&replay);
    assert_eq!(
        fin.code(),
        Some(401),
        "nonce used on edge 1, replayed on edge 2:\n{}",
        fin.text()
    );
    assert_eq!(f[0].0.count("INVITE") + f[1].0.count("INVITE"), 3);
}

#[test]
fn key_created_revoked_or_rolled_on_one_edge_is_honoured_on_the_other_within_1s() {
    let redis = Redis::start();
    let f = fleet(&redis, 2, "refuse");
    let (e1, e2) = (&f[0].1, &f[1].1);
    // Created through edge 1's config: usable on edge 2 within 1 s.
    let k = keys_cli(&e1.config_path, &["create", "--name", "fleet-victim"])
        .trim()
        .to_string();
    assert_key_format(&k);
    let took = until(
        e2,
        &k,
        "new key accepted on edge 2",
        Duration::from_secs(5),
        passes,
    );
    assert!(
        took <= BOUND,
        "a key created on edge 1 reached edge 2 after {took:?}"
    );
    eprintln!("fleet: key created on edge 1 accepted on edge 2 after {took:?}");
    // Revoked through edge 1's config: refused on edge 2 within 1 s.
    keys_cli(&e1.config_path, &["revoke", &key_id(&k)]);
    let took = until(
        e2,
        &k,
        "revoked key refused on edge 2",
        Duration::from_secs(5),
        is_invalid_token,
    );
    assert!(
        took <= BOUND,
        "revocation on edge 1 reached edge 2 after {took:?}"
    );
    eprintln!("fleet: CLI revoke on edge 1 refused on edge 2 after {took:?}");
    for i in 0..3 {
        assert_invalid_token(
            &invite(e2, &token(&k)),
            &format!("revoked key on edge 2, probe {i}"),
        );
        assert_invalid_token(
            &invite(e1, &token(&k)),
            &format!("revoked key on edge 1, probe {i}"),
        );
    }
    // Rolled: the old secret stops on edge 2, the new one works there.
    let r = keys_cli(&e2.config_path, &["create", "--name", "roller"])
        .trim()
        .to_string();
    until(
        e1,
        &r,
        "roller usable on edge 1",
        Duration::from_secs(5),
        passes,
    );
    let new = keys_cli(&e1.config_path, &["roll", &key_id(&r)])
        .trim()
        .to_string();
    let took = until(
        e2,
        &r,
        "old secret refused on edge 2",
        Duration::from_secs(5),
        is_invalid_token,
    );
    assert!(
        took <= BOUND,
        "roll on edge 1 reached edge 2 after {took:?}"
    );
    eprintln!("fleet: CLI roll on edge 1 refused on edge 2 after {took:?}");
    let r2 = invite(e2, &token(&new));
    assert!(
        passes(&r2),
        "rolled key's new secret on edge 2:\n{}",
        r2.text()
    );
    // The list is the fleet's, from either config.
    let list = keys_cli(&e2.config_path, &["list"]);
    assert!(
        list.lines().any(|l| l.split('\t').collect::<Vec<_>>()
            == vec![key_id(&k).as_str(), "sk", "revoked", "fleet-victim"]),
        "keys list on edge 2's config shows the revocation made on edge 1:\n{list}"
    );
}

#[test]
fn roll_through_the_admin_api_of_one_edge_is_honoured_on_the_other_within_1s() {
    let redis = Redis::start();
    let f = fleet(&redis, 2, "refuse");
    let (e1, e2) = (&f[0].1, &f[1].1);
    let root = e1.first_key();
    let (code, created) = admin(e2, "POST", "/v1/keys", &root, r#"{"name":"api-roller"}"#);
    assert_eq!(code, 201, "POST /v1/keys on edge 2: {created}");
    let old = created["key"]
        .as_str()
        .expect("key in the answer")
        .to_string();
    until(
        e1,
        &old,
        "key made on edge 2 usable on edge 1",
        Duration::from_secs(5),
        passes,
    );
    let (code, rolled) = admin(
        e2,
        "POST",
        &format!("/v1/keys/{}/roll", key_id(&old)),
        &root,
        "{}",
    );
    assert_eq!(code, 200, "POST /v1/keys/ID/roll on edge 2: {rolled}");
    let new = rolled["key"]
        .as_str()
        .expect("new key in the answer")
        .to_string();
    let took = until(
        e1,
        &old,
        "old secret refused on edge 1",
        Duration::from_secs(5),
        is_invalid_token,
    );
    assert!(
        took <= BOUND,
        "a roll on edge 2's admin API reached edge 1 after {took:?}"
    );
    eprintln!("fleet: admin-API roll on edge 2 refused on edge 1 after {took:?}");
    let r = invite(e1, &token(&new));
    assert!(passes(&r), "the new secret on edge 1:\n{}", r.text());
}

/// `tollgate serve` with the harness's config plus `state`: must exit with
/// `code` before listening, naming `[state] url` or `[state] ...`; (stdout, stderr).
fn serve_refused(tag: &str, state: &str, code: i32) -> (String, String) {
    let dir = TestDir::new(tag);
    let cfg = dir.join("tollgate.toml");
    std::fs::write(&cfg, EdgeConfig::default().to_toml() + state).unwrap();
    let data = dir.join("data");
    let args = [
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let o = tollgate(&args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "{}",
        describe_output(&args, &o)
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        err.contains("[state] url"),
        "the error names [state] url: {err}"
    );
    (out, err)
}

#[test]
fn an_edge_whose_redis_is_unreachable_at_start_exits_naming_state_url() {
    // A port nothing listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    serve_refused(
        "fleet-nostart",
        &format!("[state]\nurl = \"redis://127.0.0.1:{port}/0\"\nnode = \"x\"\n"),
        1,
    );
    // A bad URL is a config error: exit 2, naming the field.
    serve_refused("fleet-badurl", "[state]\nurl = \"http://127.0.0.1:1\"\n", 2);
}

#[test]
fn redis_outage_refuses_with_503_and_ends_without_an_edge_restart() {
    let mut redis = Redis::start();
    let mut f = fleet(&redis, 2, "refuse");
    let root = f[0].1.first_key();
    // A carrier admitted without a credential from 127.0.0.3 (SPEC §3c).
    keys_cli(
        &f[0].1.config_path,
        &[
            "create",
            "--name",
            "carrier",
            "--source-cidr",
            "127.0.0.3/32",
            "--trust-cidr",
            "127.0.0.3/32",
        ],
    );
    let carrier = |e: &Edge| {
        UdpUa::from_ip(e.sip_udp, "127.0.0.3").call(&Req::invite(e.sip_udp, SERVICE, "carrier"))
    };
    for (_, e) in &f {
        let r = invite(e, &token(&root));
        assert!(passes(&r), "before the outage:\n{}", r.text());
        let r = poll(Duration::from_secs(5), || Some(carrier(e)).filter(passes));
        assert!(r.is_some(), "trusted carrier admitted before the outage");
    }
    redis.stop();
    for (i, (_, e)) in f.iter().enumerate() {
        let r = poll(Duration::from_secs(10), || {
            let r = invite(e, &token(&root));
            (r.code() == Some(503)).then_some(r)
        })
        .unwrap_or_else(|| panic!("edge {} never answered 503 with Redis down", i + 1));
        let ra = r
            .header("Retry-After")
            .unwrap_or_else(|| panic!("503 without Retry-After:\n{}", r.text()));
        assert!(
            ra.trim().parse::<u32>().is_ok_and(|s| s > 0),
            "Retry-After {ra:?}"
        );
        let up = poll(Duration::from_secs(5), || {
            (state_up(e) == Some(0.0)).then_some(())
        });
        assert!(
            up.is_some(),
            "edge {}: tollgate_state_up must be 0 during the outage",
            i + 1
        );
    }
    // Without a credential too: nothing is admitted past the fleet's limits.
    for (i, (_, e)) in f.iter().enumerate() {
        let r = carrier(e);
        assert_eq!(
            r.code(),
            Some(503),
            "edge {}: trusted carrier during the outage:\n{}",
            i + 1,
            r.text()
        );
        assert!(r.header("Retry-After").is_some(), "{}", r.text());
    }
    // Refused quickly, not after a hang: well inside the UA's timeout.
    let t0 = Instant::now();
    let r = invite(&f[1].1, &token(&root));
    assert_eq!(r.code(), Some(503), "{}", r.text());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "503 took {:?}",
        t0.elapsed()
    );
    for (i, (_, e)) in f.iter_mut().enumerate() {
        assert!(
            e.is_running(),
            "edge {} exited during the Redis outage",
            i + 1
        );
    }
    redis.restart();
    for (i, (_, e)) in f.iter().enumerate() {
        until(
            e,
            &root,
            &format!("edge {} admits again", i + 1),
            Duration::from_secs(10),
            passes,
        );
        assert_eq!(
            state_up(e),
            Some(1.0),
            "edge {}: tollgate_state_up after Redis is back",
            i + 1
        );
        let r = carrier(e);
        assert!(
            passes(&r),
            "edge {}: trusted carrier after the outage:\n{}",
            i + 1,
            r.text()
        );
    }
    // Fleet-wide again: a token used on edge 1 is refused on edge 2.
    let t = token(&root);
    assert!(passes(&invite(&f[0].1, &t)));
    assert_invalid_token(&invite(&f[1].1, &t), "replay across edges after the outage");
}

#[test]
fn a_redis_that_lost_its_data_does_not_wipe_the_edges_keys() {
    let redis = Redis::start();
    let f = fleet(&redis, 1, "refuse");
    let e = &f[0].1;
    let root = e.first_key();
    assert!(passes(&invite(e, &token(&root))));
    let out = Command::new("redis-cli")
        .args(redis.cli_args())
        .arg("FLUSHALL")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    // Past several refresh ticks (200 ms) and a notice-less reload.
    std::thread::sleep(Duration::from_millis(1000));
    let r = invite(e, &token(&root));
    assert!(
        passes(&r),
        "keys kept after Redis lost its data:\n{}",
        r.text()
    );
}

#[test]
fn rediss_with_the_test_ca_works_and_a_wrong_ca_is_refused_naming_state_url() {
    let pki = TestDir::new("fleet-pki");
    let good = make_pki(pki.join("").as_path(), "good");
    let (wrong_ca, _, _) = make_pki(pki.join("").as_path(), "wrong");
    let redis = Redis::start_with(Some(good.clone()));
    let tls_toml = |node: &str, ca: &str| {
        format!("{}ca_file = \"{ca}\"\n", state_toml(&redis, node, "refuse"))
    };
    let edges: Vec<(MiniUas, Edge)> = (1..=2)
        .map(|i| {
            let uas = MiniUas::start(UasMode::Busy);
            let edge = Edge::start(EdgeConfig {
                route_target: Some(uas.route()),
                extra_toml: tls_toml(&format!("edge-{i}"), &good.0),
                ..Default::default()
            });
            (uas, edge)
        })
        .collect();
    let (e1, e2) = (&edges[0].1, &edges[1].1);
    let root = e1.first_key();
    let t = token(&root);
    let r = invite(e1, &t);
    assert!(passes(&r), "call admitted over rediss://:\n{}", r.text());
    assert_invalid_token(&invite(e2, &t), "replay across edges over rediss://");
    assert_eq!(state_up(e2), Some(1.0));
    // The wrong CA: the edge does not start, and says where to look.
    let (_, err) = serve_refused("fleet-wrongca", &tls_toml("edge-x", &wrong_ca), 1);
    assert!(
        err.to_lowercase().contains("certificate"),
        "the error says it is the certificate: {err}"
    );
}

#[test]
fn auth_password_in_the_url_works_and_a_wrong_one_is_refused_without_echoing_it() {
    let redis = Redis::start_with_password("fleet-pass-0123456789");
    let f = fleet(&redis, 1, "refuse");
    let e = &f[0].1;
    let r = invite(e, &token(&e.first_key()));
    assert!(passes(&r), "call admitted with AUTH:\n{}", r.text());
    let wrong = state_toml(&redis, "edge-x", "refuse")
        .replace("fleet-pass-0123456789", "wrong-pass-secret");
    let (out, err) = serve_refused("fleet-badauth", &wrong, 1);
    assert!(
        !err.contains("wrong-pass-secret") && !out.contains("wrong-pass-secret"),
        "the password is never printed: {out}\n{err}"
    );
}

/// A change that reaches Redis without its pub/sub notice (a lost message)
/// is still honoured within 1 s: the periodic version check resyncs.
#[test]
fn a_missed_notice_cannot_leave_a_revoked_key_working() {
    let redis = Redis::start();
    let f = fleet(&redis, 1, "refuse");
    let e = &f[0].1;
    let k = keys_cli(&e.config_path, &["create", "--name", "quiet"])
        .trim()
        .to_string();
    until(e, &k, "key usable", Duration::from_secs(5), passes);
    // Revoke by hand, as another writer would, but publish nothing.
    let rkey = format!("tg:key:{{{}}}", key_id(&k));
    let mut rec: serde_json::Value =
        serde_json::from_str(&redis.cli(&["GET", &rkey])).expect("record JSON");
    rec["revoked_at"] = serde_json::json!(now_unix());
    assert_eq!(redis.cli(&["SET", &rkey, &rec.to_string()]), "OK");
    redis.cli(&["INCR", "tg:keys:version"]);
    let took = until(
        e,
        &k,
        "revoked without a notice",
        Duration::from_secs(5),
        is_invalid_token,
    );
    assert!(took <= BOUND, "resync without a notice took {took:?}");
    eprintln!("fleet: revocation without a pub/sub notice honoured after {took:?}");
}

/// Redis hangs (SIGSTOP: connections stay open, nothing answers): requests
/// time out, the edge answers 503 instead of hanging, and recovers after
/// SIGCONT by itself.
#[test]
fn a_hung_redis_gives_503_not_a_hang_and_recovery_is_automatic() {
    let redis = Redis::start();
    let f = fleet(&redis, 1, "refuse");
    let e = &f[0].1;
    let root = e.first_key();
    assert!(passes(&invite(e, &token(&root))));
    redis.signal("-STOP");
    let t0 = Instant::now();
    let r = poll(Duration::from_secs(10), || {
        let r = invite(e, &token(&root));
        (r.code() == Some(503)).then_some(r)
    });
    let r = r.expect("503 while Redis hangs");
    assert!(r.header("Retry-After").is_some(), "{}", r.text());
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "first 503 after {:?}",
        t0.elapsed()
    );
    eprintln!("fleet: hung Redis -> first 503 after {:?}", t0.elapsed());
    // Once known down, answers come at once.
    let t1 = Instant::now();
    assert_eq!(invite(e, &token(&root)).code(), Some(503));
    assert!(
        t1.elapsed() < Duration::from_millis(500),
        "503 took {:?}",
        t1.elapsed()
    );
    redis.signal("-CONT");
    until(
        e,
        &root,
        "admitted after SIGCONT",
        Duration::from_secs(10),
        passes,
    );
}

/// A call with a fresh token of `key` on `edge`: `Some` (answered and
/// ACKed, to hang up later) or `None` (486); anything else panics.
fn call_up(edge: &Edge, key: &str) -> Option<(UdpUa, Req, SipMsg)> {
    trunk_support::call_up(edge, &token(key))
}

fn hang_up(c: (UdpUa, Req, SipMsg)) {
    trunk_support::hang_up_call(c)
}

/// `--max-calls 3` with long calls spread over 3 edges: exactly 3 up at
/// once, the rest 486; a hang-up frees a channel for any edge; a `kill -9`
/// of an edge frees its channels for the others within `lease_s`.
#[test]
fn max_calls_hold_fleet_wide_and_a_dead_edges_channels_return_within_lease_s() {
    const LEASE_S: u64 = 2;
    let redis = Redis::start();
    let uas = MiniUas::start(UasMode::Answer);
    let mut edges: Vec<Edge> = (1..=3)
        .map(|i| {
            Edge::start(EdgeConfig {
                route_target: Some(uas.route()),
                extra_toml: format!(
                    "{}lease_s = {LEASE_S}\n",
                    state_toml(&redis, &format!("edge-{i}"), "refuse")
                ),
                ..Default::default()
            })
        })
        .collect();
    let k = keys_cli(
        &edges[0].config_path,
        &["create", "--name", "three", "--max-calls", "3"],
    )
    .trim()
    .to_string();
    // Known on every edge (a probe call, hung up at once).
    for e in &edges {
        let up = poll(Duration::from_secs(5), || {
            let mut ua = UdpUa::new(e.sip_udp);
            let inv = Req::invite(e.sip_udp, SERVICE, "sipp").bearer(&token(&k));
            let r = ua.call(&inv);
            (r.code() == Some(200)).then(|| {
                ua.send(&inv.in_dialog(&r, "ACK", inv.cseq));
                (ua, inv, r)
            })
        })
        .expect("key usable on every edge");
        hang_up(up);
    }
    // Two attempts per edge, round robin: 3 up, 3 busy.
    let mut up = Vec::new();
    let mut busy = 0;
    for _ in 0..2 {
        for (i, e) in edges.iter().enumerate() {
            match call_up(e, &k) {
                Some(c) => up.push((i, c)),
                None => busy += 1,
            }
        }
    }
    assert_eq!(
        (up.len(), busy),
        (3, 3),
        "6 attempts over 3 edges with --max-calls 3"
    );
    // A hang-up frees one channel, usable on another edge.
    let (i, c) = up.remove(0);
    hang_up(c);
    let other = (i + 1) % 3;
    let again = poll(Duration::from_secs(5), || call_up(&edges[other], &k));
    up.push((
        other,
        again.expect("a freed channel is usable on another edge"),
    ));
    assert!(
        call_up(&edges[i], &k).is_none(),
        "still 3 up: the 4th is busy"
    );
    // kill -9 of an edge holding calls: its channels come back within lease_s.
    let victim = up[0].0;
    let held = up.iter().filter(|(j, _)| *j == victim).count();
    let st = Command::new("kill")
        .args(["-9", &edges[victim].pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let killed_at = Instant::now();
    let survivor = (victim + 1) % 3;
    let mut regained = Vec::new();
    while regained.len() < held {
        assert!(
            killed_at.elapsed() < Duration::from_secs(LEASE_S * 3 + 3),
            "the dead edge's {held} channels were not freed (got {})",
            regained.len()
        );
        match call_up(&edges[survivor], &k) {
            Some(c) => regained.push(c),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let took = killed_at.elapsed();
    eprintln!("fleet: {held} channels of a kill -9'd edge free after {took:?} (lease_s {LEASE_S})");
    assert!(
        took <= Duration::from_secs(LEASE_S) + Duration::from_millis(1500),
        "freed after {took:?}, lease_s = {LEASE_S}"
    );
    assert!(
        call_up(&edges[survivor], &k).is_none(),
        "and never more than 3"
    );
    assert!(!edges[victim].is_running(), "the victim is dead");
}

/// A `--cps 10` key offered 20 calls/s on each of 3 edges for 10 s:
/// 100 +- 10 admitted in total (each edge alone would admit about 100).
#[test]
fn cps_holds_fleet_wide_over_three_edges() {
    let redis = Redis::start();
    let f = fleet(&redis, 3, "refuse");
    let k = keys_cli(
        &f[0].1.config_path,
        &["create", "--name", "ten", "--cps", "10"],
    )
    .trim()
    .to_string();
    for (_, e) in &f {
        until(e, &k, "key usable", Duration::from_secs(5), passes);
    }
    // Let the probes' tokens come back (the bucket holds one second).
    std::thread::sleep(Duration::from_millis(1200));
    let addrs: Vec<std::net::SocketAddr> = f.iter().map(|(_, e)| e.sip_udp).collect();
    let results =
        trunk_support::offer_invites(&addrs, 200, Duration::from_millis(50), &|| token(&k));
    let admitted: u32 = results.iter().map(|r| r.0).sum();
    let other: u32 = results.iter().map(|r| r.2).sum();
    eprintln!("fleet: --cps 10, 3 edges x 20/s x 10 s: {results:?} (admitted, 503, other) = {admitted} admitted");
    assert_eq!(
        other, 0,
        "only 486 (admitted) or 503 + Retry-After: {results:?}"
    );
    assert!(
        (90..=110).contains(&admitted),
        "100 +- 10 admitted fleet-wide, got {admitted}: {results:?}"
    );
}

#[test]
fn redis_outage_with_local_admits_on_the_edges_own_state() {
    let mut redis = Redis::start();
    let f = fleet(&redis, 1, "local");
    let e = &f[0].1;
    let root = e.first_key();
    redis.stop();
    let up = poll(Duration::from_secs(5), || {
        (state_up(e) == Some(0.0)).then_some(())
    });
    assert!(up.is_some(), "tollgate_state_up must drop to 0");
    let t = token(&root);
    let r = invite(e, &t);
    assert!(
        passes(&r),
        "local: admitted during the outage:\n{}",
        r.text()
    );
    // Still single use on this edge.
    assert_invalid_token(
        &invite(e, &t),
        "local: replay on the same edge during the outage",
    );
}

/// The commands clients send to `redis` while `f` runs (`MONITOR`; those
/// a script runs are left out, as are the edges' background ones: health
/// `PING`, key version `GET` and reload, connection set-up, CDR
/// publication), as command -> count.
fn round_trips(redis: &Redis, f: impl FnOnce()) -> std::collections::BTreeMap<String, u64> {
    let dir = TestDir::new("monitor");
    let out = dir.join("monitor.txt");
    let mut mon = Command::new("redis-cli")
        .args(redis.cli_args())
        .arg("MONITOR")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli MONITOR");
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        poll(Duration::from_secs(5), || read()
            .starts_with("OK")
            .then_some(()))
        .is_some(),
        "MONITOR did not start"
    );
    f();
    let marker = format!("end-of-run-{}", std::process::id());
    redis.cli(&["ECHO", &marker]);
    let seen = poll(Duration::from_secs(5), || {
        read().contains(&marker).then_some(())
    });
    let _ = mon.kill();
    let _ = mon.wait();
    assert!(seen.is_some(), "MONITOR did not see the marker");
    let mut calls = std::collections::BTreeMap::new();
    for line in read().lines() {
        // 1700000000.123456 [0 127.0.0.1:54321] "EVALSHA" "..."
        let Some((client, cmd)) = line.split_once("] \"") else {
            continue;
        };
        // A script's own commands; the CDR publisher (after the call, off
        // the INVITE path: its script names the stream).
        if client.ends_with(" lua") || cmd.contains("\"tg:cdrs\"") {
            continue;
        }
        let cmd = cmd.split('"').next().unwrap_or("").to_ascii_lowercase();
        // Background (health, key version and reload) and connection
        // set-up, not per INVITE.
        if matches!(
            cmd.as_str(),
            "ping" | "get" | "echo" | "smembers" | "client" | "hello" | "select" | "auth"
        ) {
            continue;
        }
        *calls.entry(cmd).or_insert(0) += 1;
    }
    calls
}

/// Issue 12, admission in one round trip: each INVITE with a token (its
/// `jti`'s single use, the key's and its parent's calls per second) costs
/// exactly one Redis command, the admission script; a replay is still 401
/// on the other edge, in that same one command. An INVITE this edge
/// refuses on its own limits costs one `SET NX` (so a replay there is
/// still 401, not the limit's status).
#[test]
fn one_invite_is_one_redis_round_trip() {
    let redis = Redis::start();
    let f = fleet(&redis, 2, "refuse");
    let root = f[0].1.first_key();
    let k = keys_cli(
        &f[0].1.config_path,
        &[
            "create",
            "--name",
            "rt",
            "--cps",
            "50",
            "--parent",
            &key_id(&root),
        ],
    )
    .trim()
    .to_string();
    for (_, e) in &f {
        until(e, &k, "key usable", Duration::from_secs(5), passes);
    }
    std::thread::sleep(Duration::from_millis(1100));
    const N: u64 = 20;
    let used = round_trips(&redis, || {
        let mut last = String::new();
        for i in 0..N as usize {
            last = token(&k);
            let r = invite(&f[i % 2].1, &last);
            assert!(passes(&r), "INVITE {i}:\n{}", r.text());
        }
        assert_invalid_token(&invite(&f[0].1, &last), "the last token again, other edge");
    });
    eprintln!("fleet: Redis round trips for {} INVITEs: {used:?}", N + 1);
    assert_eq!(
        used.values().sum::<u64>(),
        N + 1,
        "one command per INVITE (the admission script): {used:?}"
    );
    assert_eq!(used.get("evalsha"), Some(&(N + 1)), "{used:?}");
    // cps 0: refused by this edge's own bucket, one SET NX for the jti.
    let zero = keys_cli(
        &f[0].1.config_path,
        &["create", "--name", "zero", "--cps", "0"],
    )
    .trim()
    .to_string();
    let t = token(&zero);
    let e1 = &f[1].1;
    let r = poll(Duration::from_secs(5), || {
        let r = invite(e1, &t);
        (r.code() == Some(503)).then_some(r)
    })
    .expect("cps 0: 503");
    assert!(r.header("Retry-After").is_some(), "{}", r.text());
    let used = round_trips(&redis, || {
        assert_invalid_token(&invite(e1, &t), "a replay beats the rate limit");
    });
    assert_eq!(used.values().sum::<u64>(), 1, "{used:?}");
    assert_eq!(used.get("set"), Some(&1), "{used:?}");
}

/// `n` edges on `redis` (lease `lease_s`), each routed to an answering UAS.
fn answering_fleet(redis: &Redis, n: usize, lease_s: u64) -> (MiniUas, Vec<Edge>) {
    let uas = MiniUas::start(UasMode::Answer);
    let edges = (1..=n)
        .map(|i| {
            Edge::start(EdgeConfig {
                route_target: Some(uas.route()),
                extra_toml: format!(
                    "{}lease_s = {lease_s}\n{}",
                    state_toml(redis, &format!("edge-{i}"), "refuse"),
                    trunk_support::media_toml(120)
                ),
                ..Default::default()
            })
        })
        .collect();
    (uas, edges)
}

/// Waits until `edge` knows `key` without spending anything of its budget:
/// a token for a premium-rate number gets 403 (known key) instead of 401.
fn wait_known(edge: &Edge, key: &str) {
    const PREMIUM: &str = "+19005550100";
    let known = poll(Duration::from_secs(5), || {
        let n = now_unix();
        let t = jwt_for(key, &claims(n - 5, n + 300, PREMIUM, "sipp"));
        let r =
            UdpUa::new(edge.sip_udp).call(&Req::invite(edge.sip_udp, PREMIUM, "sipp").bearer(&t));
        (r.code() == Some(403)).then_some(())
    });
    assert!(
        known.is_some(),
        "key not known on {} within 5 s",
        edge.sip_udp
    );
}

/// Answered calls placed together, one per (edge, key), each waited on
/// until the edge cuts it (BYE to leg A, answered 200): the seconds each
/// was up, in the order given.
fn calls_until_cut(calls: &[(&Edge, &str)], limit: Duration) -> Vec<f64> {
    let mut up = Vec::new();
    for (edge, key) in calls {
        let mut ua = UdpUa::new(edge.sip_udp);
        let inv = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&token(key));
        let r = ua.call(&inv);
        assert_eq!(
            r.code(),
            Some(200),
            "call on {}:\n{}",
            edge.sip_udp,
            r.text()
        );
        ua.send(&inv.in_dialog(&r, "ACK", inv.cseq));
        up.push((ua, inv.call_id.clone(), Instant::now()));
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = up
            .into_iter()
            .map(|(mut ua, cid, at)| {
                s.spawn(move || {
                    let (_, cut) = trunk_support::answer_bye(&mut ua, &cid, limit)
                        .unwrap_or_else(|| panic!("call {cid} not cut within {limit:?}"));
                    cut.duration_since(at).as_secs_f64()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Billable seconds of the answered CDRs of `keys` in the edges' own CDR
/// files, once `want` CDRs are there.
fn billable_in_files(edges: &[Edge], keys: &[&str], want: usize) -> (u64, usize) {
    let ids: Vec<String> = keys.iter().map(|k| key_id(k)).collect();
    poll(Duration::from_secs(10), || {
        let cdrs: Vec<_> = edges
            .iter()
            .flat_map(|e| trunk_support::read_cdrs(&e.data_dir).0)
            .filter(|c| c.str("key_id").is_some_and(|k| ids.iter().any(|i| i == k)))
            .filter(trunk_support::cdr_answered)
            .collect();
        (cdrs.len() >= want).then(|| {
            let secs = cdrs
                .iter()
                .map(|c| c.int("billable_secs").unwrap_or(0) as u64)
                .sum();
            (secs, cdrs.len())
        })
    })
    .unwrap_or_else(|| panic!("{want} answered CDRs of {ids:?} not written"))
}

/// Issue 12, budget fleet-wide: a 1-minute key, three calls answered
/// together on two edges (each edge alone would grant its calls a whole
/// minute): all are cut, with at most 66 billable seconds in total (the
/// minute plus each call's rounding), and the next call is 402 on either
/// edge.
#[test]
fn a_daily_budget_holds_fleet_wide_for_calls_answered_together_on_two_edges() {
    let redis = Redis::start();
    let (_uas, edges) = answering_fleet(&redis, 2, 2);
    let k = keys_cli(
        &edges[0].config_path,
        &["create", "--name", "minute", "--daily-minutes", "1"],
    )
    .trim()
    .to_string();
    for e in &edges {
        wait_known(e, &k);
    }
    let held = calls_until_cut(
        &[(&edges[0], &k), (&edges[1], &k), (&edges[1], &k)],
        Duration::from_secs(90),
    );
    let (billable, n) = billable_in_files(&edges, &[&k], 3);
    eprintln!("fleet: 1-minute key, 3 calls on 2 edges cut after {held:?} s; {billable} s billable in {n} CDRs");
    assert!(
        billable <= 66,
        "{billable} s billed on a 1-minute budget: {held:?}"
    );
    assert!(
        billable >= 50,
        "the minute is used, not refused early: {billable} s"
    );
    for e in &edges {
        let r =
            UdpUa::new(e.sip_udp).call(&Req::invite(e.sip_udp, SERVICE, "sipp").bearer(&token(&k)));
        assert_eq!(
            r.code(),
            Some(402),
            "spent budget on {}:\n{}",
            e.sip_udp,
            r.text()
        );
    }
}

/// A parent's daily minute is shared by its children on other edges: two
/// children (a minute each of their own) calling on two edges at once are
/// cut within the parent's one minute, and the parent's own next call is
/// 402.
#[test]
fn a_parents_budget_is_shared_by_its_children_on_other_edges() {
    let redis = Redis::start();
    let (_uas, edges) = answering_fleet(&redis, 2, 2);
    let cfg = &edges[0].config_path;
    let parent = keys_cli(cfg, &["create", "--name", "parent", "--daily-minutes", "1"])
        .trim()
        .to_string();
    let pid = key_id(&parent);
    let child = |name: &str| {
        keys_cli(
            cfg,
            &[
                "create",
                "--name",
                name,
                "--parent",
                &pid,
                "--daily-minutes",
                "1",
            ],
        )
        .trim()
        .to_string()
    };
    let (c1, c2) = (child("c1"), child("c2"));
    for e in &edges {
        wait_known(e, &c1);
        wait_known(e, &c2);
    }
    let held = calls_until_cut(
        &[(&edges[0], &c1), (&edges[1], &c2)],
        Duration::from_secs(90),
    );
    let (billable, n) = billable_in_files(&edges, &[&c1, &c2], 2);
    eprintln!("fleet: children of a 1-minute parent on 2 edges cut after {held:?} s; {billable} s billable in {n} CDRs");
    assert!(
        billable <= 64,
        "{billable} s billed on the parent's minute: {held:?}"
    );
    assert!(billable >= 50, "{billable} s");
    let r = UdpUa::new(edges[1].sip_udp)
        .call(&Req::invite(edges[1].sip_udp, SERVICE, "sipp").bearer(&token(&parent)));
    assert_eq!(
        r.code(),
        Some(402),
        "the parent's spent minute:\n{}",
        r.text()
    );
}

/// Records in the fleet's stream whose text holds `needle`.
fn in_stream(redis: &Redis, needle: &str) -> usize {
    redis
        .cli(&["XRANGE", "tg:cdrs", "-", "+"])
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Issue 12, usage fleet-wide: calls on two edges, and `tollgate usage
/// --config` of either edge and `GET /v1/usage` on either give them all
/// (each edge's own file has only its own).
#[test]
fn usage_on_either_edge_counts_the_calls_of_both() {
    let redis = Redis::start();
    let f = fleet(&redis, 2, "refuse");
    let root = f[0].1.first_key();
    let k = keys_cli(
        &f[0].1.config_path,
        &["create", "--name", "counted", "--parent", &key_id(&root)],
    )
    .trim()
    .to_string();
    let id = key_id(&k);
    for (_, e) in &f {
        until(e, &k, "key usable", Duration::from_secs(5), passes);
    }
    for i in 0..5 {
        let r = invite(&f[i % 2].1, &token(&k));
        assert!(passes(&r), "call {i}:\n{}", r.text());
    }
    // 7 calls: 2 probes and 5, over the two edges (3 + 4).
    for (_, e) in &f {
        let cfg = e.config_path.to_str().unwrap();
        let row = poll(Duration::from_secs(10), || {
            let u = trunk_support::usage_table(&e.data_dir, &["--config", cfg, "--key", &id]);
            u.get(&id).filter(|r| r[0] == 7).copied()
        });
        assert_eq!(
            row,
            Some([7, 0, 7, 0]),
            "tollgate usage --config on {}: both edges' calls",
            e.sip_udp
        );
        let own = trunk_support::usage_table(&e.data_dir, &["--key", &id]);
        assert!(
            own.get(&id).is_some_and(|r| r[0] < 7),
            "the edge's own file: {own:?}"
        );
        let (code, body) = admin(e, "GET", &format!("/v1/usage?key={id}"), &root, "");
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body["total"]["calls"], 7,
            "GET /v1/usage on {}: {body}",
            e.sip_udp
        );
    }
}

/// Issue 12, CDRs during an outage: a call that ends while Redis is down
/// has its CDR in the edge's file at once and in the fleet's stream once
/// Redis is back, exactly once, also when the edge restarts having lost
/// its publication cursor (every record of its file is sent again).
#[test]
fn a_cdr_written_while_redis_is_down_reaches_the_stream_once_after_it_returns() {
    let mut redis = Redis::start();
    let (uas, mut edges) = answering_fleet(&redis, 1, 2);
    let edge = edges.remove(0);
    let root = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let inv = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&token(&root));
    let ok = ua.call(&inv);
    assert_eq!(ok.code(), Some(200), "{}", ok.text());
    ua.send(&inv.in_dialog(&ok, "ACK", inv.cseq));
    let cid = inv.call_id.clone();
    redis.stop();
    let down = poll(Duration::from_secs(5), || {
        (state_up(&edge) == Some(0.0)).then_some(())
    });
    assert!(down.is_some(), "tollgate_state_up must drop to 0");
    hang_up((ua, inv, ok));
    let in_file = poll(Duration::from_secs(10), || {
        let (cdrs, _) = trunk_support::read_cdrs(&edge.data_dir);
        cdrs.into_iter()
            .find(|c| c.str("sip_call_id") == Some(cid.as_str()))
    });
    assert!(
        in_file.is_some(),
        "the CDR is in the edge's own file during the outage"
    );
    std::thread::sleep(Duration::from_millis(600));
    redis.restart();
    let published = poll(Duration::from_secs(10), || {
        (in_stream(&redis, &cid) > 0).then_some(())
    });
    assert!(
        published.is_some(),
        "the CDR reached the stream after Redis returned"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(in_stream(&redis, &cid), 1, "once");
    // A restart that lost the cursor sends the whole file again: still once.
    let mut edge = edge;
    trunk_support::kill9_and_wait(&mut edge);
    std::fs::remove_file(edge.data_dir.join("cdrs.published")).expect("cursor file");
    let again = Edge::start_in(
        TestDir {
            path: edge.dir.path.clone(),
        },
        EdgeConfig {
            route_target: Some(uas.route()),
            extra_toml: format!("{}lease_s = 2\n", state_toml(&redis, "edge-1", "refuse")),
            ..Default::default()
        },
    );
    let resent = poll(Duration::from_secs(10), || {
        edge.data_dir.join("cdrs.published").exists().then_some(())
    });
    assert!(
        resent.is_some(),
        "the restarted edge published its file again"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(in_stream(&redis, &cid), 1, "still once after the re-send");
    let usage = tollgate_ok(&["usage", "--config", again.config_path.to_str().unwrap()]);
    assert!(usage.contains("total"), "{usage}");
    drop(again);
}

/// Issue 12, a dead edge's calls on the fleet's budget: a call up on a
/// 1-minute key when its edge is killed (`kill -9`) never ends on the
/// fleet, so its reservation expires with its lease; at the restart the
/// edge writes its `edge_lost` CDR (billable up to the last checkpoint),
/// and publishing that CDR settles its seconds on the key's day, once.
#[test]
fn a_killed_edges_call_is_settled_on_the_fleet_budget_when_its_cdr_is_published() {
    let redis = Redis::start();
    let uas = MiniUas::start(UasMode::Answer);
    let toml = format!(
        "{}lease_s = 2\n{}[trunk]\ncheckpoint_s = 1\n",
        state_toml(&redis, "edge-1", "refuse"),
        trunk_support::media_toml(120)
    );
    let cfg = || EdgeConfig {
        route_target: Some(uas.route()),
        extra_toml: toml.clone(),
        ..Default::default()
    };
    let mut edge = Edge::start(cfg());
    let root = key_id(&edge.first_key());
    let k = keys_cli(
        &edge.config_path,
        &[
            "create",
            "--name",
            "lost",
            "--daily-minutes",
            "1",
            "--parent",
            &root,
        ],
    )
    .trim()
    .to_string();
    let kid = key_id(&k);
    wait_known(&edge, &k);
    let mut ua = UdpUa::new(edge.sip_udp);
    let inv = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&token(&k));
    let ok = ua.call(&inv);
    assert_eq!(ok.code(), Some(200), "{}", ok.text());
    ua.send(&inv.in_dialog(&ok, "ACK", inv.cseq));
    std::thread::sleep(Duration::from_millis(3500));
    trunk_support::kill9_and_wait(&mut edge);
    let day = now_unix().div_euclid(86_400);
    let spent_key = format!("tg:spent:{{{root}}}:{kid}:{day}");
    assert_eq!(
        redis.cli(&["GET", &spent_key]),
        "",
        "nothing settled before the restart"
    );
    let again = Edge::start_in(
        TestDir {
            path: edge.dir.path.clone(),
        },
        cfg(),
    );
    let lost = poll(Duration::from_secs(10), || {
        trunk_support::read_cdrs(&again.data_dir)
            .0
            .into_iter()
            .find(|c| c.str("cause") == Some("edge_lost"))
    })
    .expect("the restart writes the edge_lost CDR");
    let billable = lost.int("billable_secs").unwrap_or(0);
    assert!(billable >= 2, "checkpointed seconds billed: {lost:?}");
    let settled = poll(Duration::from_secs(10), || {
        let v = redis.cli(&["GET", &spent_key]);
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(
        settled.as_deref(),
        Some(billable.to_string().as_str()),
        "the edge_lost CDR's seconds on the fleet's budget"
    );
    // Sent again (the cursor lost): the seconds are not settled twice.
    let mut again = again;
    trunk_support::kill9_and_wait(&mut again);
    std::fs::remove_file(edge.data_dir.join("cdrs.published")).expect("cursor file");
    let third = Edge::start_in(
        TestDir {
            path: edge.dir.path.clone(),
        },
        cfg(),
    );
    let resent = poll(Duration::from_secs(10), || {
        edge.data_dir.join("cdrs.published").exists().then_some(())
    });
    assert!(resent.is_some(), "the file was published again");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        redis.cli(&["GET", &spent_key]),
        billable.to_string(),
        "once"
    );
    drop(third);
    drop(again);
}
