//! GET /metrics (SPEC 7): counters move with SIP traffic.
//!
//! Names: tollgate_sip_requests_total{method}, tollgate_sip_responses_total{code},
//! tollgate_auth_failures_total{reason}, tollgate_calls_active.
//!
//! cargo test -p tollgate --test e2e_metrics
mod common;
use common::*;
use std::time::Duration;

fn wait_metric(edge: &Edge, name: &str, labels: &[(&str, &str)], at_least: f64) -> (f64, String) {
    let mut last = String::new();
    let v = poll(Duration::from_secs(5), || {
        last = scrape(edge.metrics_addr());
        metric_sum(&last, name, labels).filter(|v| *v >= at_least)
    });
    match v {
        Some(v) => (v, last),
        None => {
            panic!("metric {name}{labels:?} did not reach {at_least} within 5 s; /metrics:\n{last}")
        }
    }
}

#[test]
fn metrics_count_requests_responses_and_auth_failures() {
    let edge = Edge::start(EdgeConfig::default());
    let (code, body) = http_get(edge.metrics_addr(), "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");

    let mut ua = UdpUa::new(edge.sip_udp);
    for _ in 0..3 {
        assert_eq!(ua.options_code(Duration::from_secs(5)), Some(200));
    }
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "sipp"));
    assert_eq!(fin.code(), Some(401));
    let n = now_unix();
    let bad = jwt_for(
        &edge.first_key(),
        &claims(n - 900, n - 600, SERVICE, "sipp"),
    );
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&bad));
    assert_invalid_token(&fin, "expired");

    // (>= rather than ==: a UDP retransmission by the test UA may count too)
    wait_metric(
        &edge,
        "tollgate_sip_requests_total",
        &[("method", "OPTIONS")],
        3.0,
    );
    wait_metric(
        &edge,
        "tollgate_sip_requests_total",
        &[("method", "INVITE")],
        2.0,
    );
    wait_metric(
        &edge,
        "tollgate_sip_requests_total",
        &[("method", "ACK")],
        2.0,
    );
    wait_metric(
        &edge,
        "tollgate_sip_responses_total",
        &[("code", "200")],
        3.0,
    );
    wait_metric(
        &edge,
        "tollgate_sip_responses_total",
        &[("code", "401")],
        2.0,
    );
    let (af, text) = wait_metric(&edge, "tollgate_auth_failures_total", &[], 1.0);
    assert!(af >= 1.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("tollgate_auth_failures_total{") && l.contains("reason=")),
        "auth failures must be labelled by reason:\n{text}"
    );
    assert!(
        text.contains("# TYPE tollgate_sip_requests_total counter"),
        "Prometheus TYPE line missing:\n{text}"
    );
}

#[test]
fn calls_active_follows_a_call() {
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        ..Default::default()
    });
    let t = mint(&edge.first_key(), SERVICE, "sipp", &[]);
    let mut ua = UdpUa::new(edge.sip_udp);
    let inv = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&t);
    let ok = ua.call(&inv);
    assert_eq!(ok.code(), Some(200), "{}", ok.text());
    ua.send(&inv.in_dialog(&ok, "ACK", 1));
    wait_metric(&edge, "tollgate_calls_active", &[], 1.0);
    let bye = inv.in_dialog(&ok, "BYE", 2);
    assert_eq!(
        ua.transact(&bye, Duration::from_secs(10))
            .map(|o| o.fin.code()),
        Some(Some(200))
    );
    let back = poll(Duration::from_secs(5), || {
        metric_sum(&scrape(edge.metrics_addr()), "tollgate_calls_active", &[]).filter(|v| *v == 0.0)
    });
    assert!(
        back.is_some(),
        "tollgate_calls_active must return to 0 after BYE:\n{}",
        scrape(edge.metrics_addr())
    );
}
