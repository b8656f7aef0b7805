//! Prometheus end to end (SPEC §7, issue 5): the real binary's scrape under
//! SIPp load passes `promtool check metrics`, the deploy kit's alert rules and
//! scrape config pass `promtool check`, and a real Prometheus server scrapes
//! the edge and answers a query for `tollgate_calls_active`.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`) and SIPp;
//! fails, never skips, when one is missing (scripts/test.sh installs them).
//!
//! cargo test --workspace --test e2e_prometheus
mod common;
mod prom_support;

use common::*;
use prom_support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The families SPEC §7 asks for, with their Prometheus types.
const SPEC_FAMILIES: &[(&str, &str)] = &[
    ("tollgate_sip_requests_total", "counter"),
    ("tollgate_sip_responses_total", "counter"),
    ("tollgate_auth_failures_total", "counter"),
    ("tollgate_calls_active", "gauge"),
    ("tollgate_calls_total", "counter"),
    ("tollgate_key_calls_total", "counter"),
    ("tollgate_key_billable_seconds_total", "counter"),
    ("tollgate_trunk_refusals_total", "counter"),
    ("tollgate_media_packets_total", "counter"),
    ("tollgate_media_bytes_total", "counter"),
    ("tollgate_srtp_auth_failures_total", "counter"),
    ("tollgate_media_ports_in_use", "gauge"),
    ("tollgate_media_ports_capacity", "gauge"),
    ("tollgate_call_setup_seconds", "histogram"),
];

const CALLS: u32 = 40;

#[test]
fn scrape_under_sipp_load_passes_promtool_check_metrics() {
    require_sipp();
    let promtool = require_tool("promtool", "prometheus");
    let dir = TestDir::new("prom-load");
    // No route: calls go to the built-in echo destination.
    let edge = Edge::start(EdgeConfig::default());
    let key = edge.first_key();
    let tokens = mint_many(&key, SERVICE, "sipp", CALLS as usize);
    write_inf(&dir.join("tokens.csv"), &tokens);
    // Auth failures, a bad datagram, and a call with RTP through the relay
    // (first, so that the load below is not timed against them).
    drive_metric_traffic(&edge);
    // 10 calls/s, each held 4 s: up to ~40 calls up at once.
    let uac = Sipp::new(&dir.path, "uac", "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&dir.join("tokens.csv"))
        .calls(CALLS)
        .rate(10)
        .pause_ms(4000)
        .args(&[
            "-recv_timeout",
            "15s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(120))
        .spawn();

    let busy = poll(Duration::from_secs(60), || {
        let s = scrape(edge.metrics_addr());
        metric_sum(&s, "tollgate_calls_active", &[])
            .filter(|v| *v >= 10.0)
            .map(|_| s)
    })
    .unwrap_or_else(|| {
        panic!(
            "tollgate_calls_active never reached 10 during the SIPp run:\n{}",
            scrape(edge.metrics_addr())
        )
    });
    // kept with the test dir on failure (or with TOLLGATE_KEEP_TEST_DIRS)
    let _ = fs::write(dir.join("scrape-under-load.txt"), &busy);
    promtool_check_metrics(&promtool, &busy, "under-load");

    let uac = uac.wait();
    uac.assert_calls_ok(u64::from(CALLS));
    let done = poll(Duration::from_secs(30), || {
        let s = scrape(edge.metrics_addr());
        metric_sum(&s, "tollgate_calls_active", &[])
            .filter(|v| *v == 0.0)
            .map(|_| s)
    })
    .expect("tollgate_calls_active back to 0 after the run");
    let _ = fs::write(dir.join("scrape-after-load.txt"), &done);
    promtool_check_metrics(&promtool, &done, "after-load");

    // Every SPEC §7 family is there, typed, with HELP text.
    let types = families(&done);
    let help = helps(&done);
    for (name, ty) in SPEC_FAMILIES {
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(*ty),
            "family {name} ({ty}) missing or mistyped in /metrics:\n{done}"
        );
    }
    for name in types.keys() {
        assert!(
            help.get(name).is_some_and(|h| !h.trim().is_empty()),
            "family {name} has no HELP text (describe it in serve.rs describe_metrics)"
        );
        assert!(
            name.starts_with("tollgate_"),
            "family {name} lacks the tollgate_ prefix"
        );
    }
    // The load moved the numbers.
    let m = |n: &str, l: &[(&str, &str)]| metric_sum(&done, n, l).unwrap_or(0.0);
    assert!(
        m("tollgate_calls_total", &[("result", "answered")]) >= f64::from(CALLS),
        "calls by result:\n{done}"
    );
    assert!(
        m("tollgate_key_calls_total", &[("key", &key_id(&key))]) >= f64::from(CALLS),
        "per-key calls:\n{done}"
    );
    assert!(
        m(
            "tollgate_key_billable_seconds_total",
            &[("key", &key_id(&key))]
        ) >= 1.0,
        "per-key billable seconds (40 calls of 4 s):\n{done}"
    );
    assert!(
        m("tollgate_media_packets_total", &[("direction", "a_to_b")]) > 0.0
            && m("tollgate_media_bytes_total", &[]) > 0.0,
        "RTP relayed:\n{done}"
    );
    assert!(
        m(
            "tollgate_auth_failures_total",
            &[("reason", "no_credential")]
        ) >= 1.0
            && m("tollgate_auth_failures_total", &[("reason", "expired")]) >= 1.0,
        "auth failures by reason:\n{done}"
    );
    assert!(
        m("tollgate_call_setup_seconds_count", &[]) >= f64::from(CALLS),
        "setup histogram:\n{done}"
    );
    assert_eq!(m("tollgate_media_ports_in_use", &[]), 0.0, "{done}");
    assert_bounded_labels(&done, &uac);
}

/// Label sets stay bounded: after 40+ calls no family has a series per call,
/// and no label carries a call's identity (Call-ID, addresses, tokens).
fn assert_bounded_labels(scrape: &str, uac: &SippResult) {
    let mut series: BTreeMap<String, BTreeSet<Vec<(String, String)>>> = BTreeMap::new();
    for line in scrape.lines() {
        let Some((name, labels, _)) = parse_sample(line) else {
            continue;
        };
        for (k, v) in &labels {
            assert!(
                !v.contains("127.0.0.1") && !v.contains('@') && v.len() <= 64,
                "label {k}={v:?} of {name} looks per-call (unbounded): {line}"
            );
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        let set: Vec<(String, String)> = labels.into_iter().filter(|(k, _)| k != "le").collect();
        series.entry(family).or_default().insert(set);
    }
    for (family, sets) in &series {
        assert!(
            sets.len() < 30,
            "{family} has {} series after {} calls: labels must be bounded\n{sets:?}",
            sets.len(),
            uac.created()
        );
    }
}

#[test]
fn promtool_accepts_alert_rules_scrape_config_and_rule_tests() {
    let promtool = require_tool("promtool", "prometheus");
    let dir = deploy("prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let (ok, out, err) = run(Command::new(&promtool).args(&args).current_dir(&dir));
        assert!(
            ok,
            "`promtool {}` failed in {}:\n{out}{err}",
            args.join(" "),
            dir.display()
        );
    }
    // the scrape config names the job the alerts and the dashboard use
    let cfg = yaml_docs(&dir.join("prometheus.yml"));
    let jobs: Vec<&str> = cfg[0]["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    assert!(jobs.contains(&"tollgate"), "job_name tollgate: {jobs:?}");
}

/// A `prometheus` server run by a test: killed (SIGTERM, then SIGKILL) on drop.
struct PromServer {
    child: Option<Child>,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl PromServer {
    /// Starts on a free loopback port with storage and config in `dir`;
    /// retries with a new port if the one picked was taken meanwhile.
    fn start(bin: &Path, dir: &Path, config: &Path) -> PromServer {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
                l.local_addr().expect("probe port").port()
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let out = File::create(&log).expect("prometheus log file");
            let err = out.try_clone().expect("prometheus log file");
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("tsdb-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
            let mut server = PromServer {
                child: Some(child),
                addr,
                log,
            };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                if let Some(Ok(Some(st))) = server.child.as_mut().map(|c| c.try_wait()) {
                    last = format!("exited {st}:\n{}", server.log_text());
                    server.child = None;
                    break;
                }
                if try_http_get(addr, "/-/ready").is_some_and(|(c, _)| c == 200) {
                    return server;
                }
                thread::sleep(Duration::from_millis(100));
            }
            if server.child.is_some() {
                panic!("prometheus not ready within 60 s:\n{}", server.log_text());
            }
        }
        panic!("prometheus did not start in 3 attempts; last: {last}");
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET an API path; the parsed JSON when it answers 200.
    fn api(&self, path: &str) -> Option<serde_json::Value> {
        let (code, body) = try_http_get(self.addr, path)?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

impl Drop for PromServer {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // our own child, by its pid
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn real_prometheus_scrapes_the_edge_and_evaluates_the_alerts() {
    let bin = require_tool("prometheus", "prometheus");
    let dir = TestDir::new("prom-server");
    let edge = Edge::start(EdgeConfig::default());
    let metrics = edge.metrics_addr();
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {:?}\n\
             scrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: [\"{metrics}\"]\n",
            deploy("prometheus/alerts.yml").display().to_string()
        ),
    )
    .expect("write prometheus.yml");
    let prom = PromServer::start(&bin, &dir.path, &config);

    // Generous deadline: the first scrape happens within a second or two.
    let mut last = None;
    let found = poll(Duration::from_secs(90), || {
        let v = prom.api("/api/v1/query?query=tollgate_calls_active")?;
        last = Some(v.clone());
        let r = v["data"]["result"].as_array()?.first()?.clone();
        (r["metric"]["__name__"] == "tollgate_calls_active").then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never answered tollgate_calls_active; last answer {last:?}\nlog:\n{}",
            prom.log_text()
        )
    });
    assert_eq!(
        found["metric"]["instance"].as_str(),
        Some(metrics.to_string().as_str()),
        "{found}"
    );
    assert_eq!(found["metric"]["job"].as_str(), Some("tollgate"), "{found}");
    assert_eq!(found["value"][1].as_str(), Some("0"), "{found}");

    // The target is healthy and every alert rule evaluates without error.
    let up = poll(Duration::from_secs(30), || {
        let v = prom.api("/api/v1/query?query=up")?;
        let r = v["data"]["result"].as_array()?.first()?.clone();
        (r["value"][1] == "1").then_some(r)
    });
    assert!(up.is_some(), "up != 1 for the edge:\n{}", prom.log_text());
    let mut last_rules = None;
    let rules = poll(Duration::from_secs(60), || {
        let v = prom.api("/api/v1/rules")?;
        last_rules = Some(v.clone());
        let groups = v["data"]["groups"].as_array()?;
        let rules: Vec<serde_json::Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")).then_some(rules)
    })
    .unwrap_or_else(|| panic!("alert rules not all healthy: {last_rules:?}"));
    let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    for want in [
        "TollgateDown",
        "TollgateAuthFailureSpike",
        "TollgateBudgetRefusals",
        "TollgateMediaPortsNearExhaustion",
        "TollgateSrtpAuthFailures",
    ] {
        assert!(names.contains(&want), "alert {want} not loaded: {names:?}");
    }
    // Every query of the Grafana dashboard is valid PromQL for this server
    // and, on a scraped edge, returns data (Grafana's $instance = all).
    let dash: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(deploy("grafana/tollgate-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut checked = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().cloned().unwrap_or_default() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let q = expr.replace("$instance", ".*");
            let path = format!("/api/v1/query?query={}", url_encode(&q));
            let (code, body) = try_http_get(prom.addr, &path)
                .unwrap_or_else(|| panic!("no answer from prometheus for {q}"));
            assert_eq!(
                code, 200,
                "panel {}: Prometheus refused the query {q}:\n{body}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} dashboard queries found");
    // An idle, healthy edge fires nothing.
    let firing: Vec<&serde_json::Value> = rules.iter().filter(|r| r["state"] == "firing").collect();
    assert!(
        firing.is_empty(),
        "alerts firing on an idle edge: {firing:?}"
    );
    drop(prom);
}

/// Percent-encoding of a query-string value (RFC 3986 unreserved kept).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
