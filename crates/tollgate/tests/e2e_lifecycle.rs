//! Lifecycle of the real binary (issue 5, item 6):
//! - SIGTERM drains: new INVITEs get 503 + Retry-After and /healthz says 503,
//!   calls in progress go on up to `sip.drain_timeout_s`, then both legs get
//!   a BYE; the process ends only after that, with every CDR written.
//! - SIGHUP reloads the routes and trunk limits without dropping a call; a
//!   broken config on reload is refused and the running one kept.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

fn signal(edge: &Edge, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(edge.pid().to_string())
        .status()
        .expect("kill");
    assert!(st.success(), "kill -{sig} {}", edge.pid());
}

/// Waits (generously) until the edge printed a line starting with `prefix`.
fn wait_line(edge: &Edge, prefix: &str, timeout: Duration) -> Option<String> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(l) = edge
            .stdout_lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with(prefix))
        {
            return Some(l.clone());
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

fn count_lines(edge: &Edge, prefix: &str) -> usize {
    edge.stdout_lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(prefix))
        .count()
}

fn wait_exit(edge: &mut Edge, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(st) = edge.exit_status() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

/// 200 OK to an in-dialog request the edge sent us.
fn reply_200(ua: &UdpUa, req: &SipMsg) {
    let mut r = String::from("SIP/2.0 200 OK\r\n");
    for h in ["via", "from", "to", "call-id", "cseq"] {
        for v in req.headers_all(h) {
            r.push_str(&format!("{h}: {v}\r\n"));
        }
    }
    r.push_str("Content-Length: 0\r\n\r\n");
    ua.send_raw(r.as_bytes());
}

fn cdr_lines(data_dir: &Path) -> Vec<String> {
    fs::read_to_string(data_dir.join("cdrs.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An answered call from `ua` through the edge; returns the INVITE and 200.
fn answered_call(edge: &Edge, ua: &mut UdpUa, key: &str) -> (Req, SipMsg) {
    let token = mint(key, SERVICE, "drainer", &[]);
    let inv = Req::invite(edge.sip_udp, SERVICE, "drainer").bearer(&token);
    let ok = ua.call(&inv);
    assert_eq!(
        ok.code(),
        Some(200),
        "call must be answered:\n{}",
        ok.text()
    );
    ua.send(&inv.in_dialog(&ok, "ACK", inv.cseq));
    (inv, ok)
}

#[test]
fn sigterm_drains_then_byes_both_legs_and_writes_every_cdr() {
    let uas = MiniUas::start(UasMode::Answer);
    let mut edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        sip_extra: "drain_timeout_s = 4".into(),
        ..Default::default()
    });
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let (inv, _ok) = answered_call(&edge, &mut ua, &key);
    let metrics = edge.metrics_addr();
    assert_eq!(http_get(metrics, "/healthz").0, 200);

    let t_term = Instant::now();
    signal(&edge, "TERM");
    assert!(
        wait_line(&edge, "tollgate: draining", Duration::from_secs(10)).is_some(),
        "no `tollgate: draining` line after SIGTERM; stderr:\n{}",
        edge.stderr_tail(30)
    );

    // New calls are refused while draining, with a Retry-After.
    let token = mint(&key, SERVICE, "late", &[]);
    let mut ua2 = UdpUa::new(edge.sip_udp);
    let late = Req::invite(edge.sip_udp, SERVICE, "late").bearer(&token);
    let refused = ua2.call(&late);
    assert_eq!(
        refused.code(),
        Some(503),
        "a new INVITE during the drain must get 503:\n{}",
        refused.text()
    );
    assert!(
        refused.header("retry-after").is_some(),
        "503 during the drain must carry Retry-After:\n{}",
        refused.text()
    );
    assert_eq!(
        http_get(metrics, "/healthz").0,
        503,
        "/healthz must say 503 while draining"
    );
    // The call in progress is still up: the edge has not exited.
    assert!(
        edge.is_running(),
        "the edge exited before the drain timeout"
    );

    // At the drain timeout the edge BYEs leg A (and leg B).
    let bye = ua
        .recv_where(Duration::from_secs(30), |m| {
            m.method() == Some("BYE") && m.call_id() == Some(inv.call_id.as_str())
        })
        .expect("no BYE on leg A after the drain timeout");
    let waited = t_term.elapsed();
    reply_200(&ua, &bye);
    assert!(
        waited >= Duration::from_secs(3),
        "BYE came {waited:?} after SIGTERM, before the 4 s drain timeout"
    );
    assert!(
        uas.wait_for("BYE", 1, Duration::from_secs(10)),
        "leg B must get a BYE at the end of the drain"
    );
    let st =
        wait_exit(&mut edge, Duration::from_secs(30)).expect("edge did not exit after the drain");
    assert!(st.success(), "exit status after a drain: {st:?}");
    let cdrs = cdr_lines(&edge.data_dir);
    assert_eq!(
        cdrs.len(),
        1,
        "exactly the one admitted call has a CDR: {cdrs:?}"
    );
    assert!(
        cdrs[0].contains("\"cause\":\"shutdown\""),
        "the drained call's CDR must say shutdown: {}",
        cdrs[0]
    );
}

#[test]
fn sigterm_exits_as_soon_as_the_last_call_ends() {
    let uas = MiniUas::start(UasMode::Answer);
    let mut edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        sip_extra: "drain_timeout_s = 600".into(),
        ..Default::default()
    });
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let (inv, ok) = answered_call(&edge, &mut ua, &key);
    signal(&edge, "TERM");
    assert!(wait_line(&edge, "tollgate: draining", Duration::from_secs(10)).is_some());
    thread::sleep(Duration::from_millis(500));
    assert!(
        edge.is_running(),
        "the edge must wait for the call in progress"
    );
    // The caller hangs up: the drain is over.
    let bye = inv.in_dialog(&ok, "BYE", inv.cseq + 1);
    let code = ua
        .transact(&bye, Duration::from_secs(10))
        .and_then(|o| o.fin.code());
    assert_eq!(code, Some(200), "BYE during the drain must be answered");
    let st = wait_exit(&mut edge, Duration::from_secs(30))
        .expect("edge still running 30 s after its last call ended (drain timeout is 600 s)");
    assert!(st.success(), "exit status: {st:?}");
    let cdrs = cdr_lines(&edge.data_dir);
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert!(cdrs[0].contains("\"cause\":\"normal\""), "{}", cdrs[0]);
}

#[test]
fn sighup_mid_sipp_run_loses_no_call_and_switches_routes() {
    require_sipp();
    const CALLS: u32 = 60;
    let dir = TestDir::new("sighup");
    let uas1 = Sipp::new(&dir.path, "uas1", "uas.xml")
        .args(&["-default_behaviors", "all,-abortunexp"])
        .timeout(Duration::from_secs(120))
        .spawn();
    let uas2 = Sipp::new(&dir.path, "uas2", "uas.xml")
        .args(&["-default_behaviors", "all,-abortunexp"])
        .timeout(Duration::from_secs(120))
        .spawn();
    let cfg1 = EdgeConfig::routed_to(uas1.ports.sip);
    let edge = Edge::start(cfg1.clone());
    let key = edge.first_key();
    let tokens = mint_many(&key, SERVICE, "sipp", CALLS as usize);
    write_inf(&dir.join("tokens.csv"), &tokens);
    let uac = Sipp::new(&dir.path, "uac", "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&dir.join("tokens.csv"))
        .calls(CALLS)
        .rate(10)
        .pause_ms(1000)
        .args(&[
            "-recv_timeout",
            "15s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(120))
        .spawn();

    // Mid-run: a broken config is refused (and the edge keeps serving), then
    // a good one moves the default route to the second UAS.
    thread::sleep(Duration::from_secs(2));
    fs::write(&edge.config_path, "[sip\nbroken").unwrap();
    signal(&edge, "HUP");
    assert!(
        wait_line(&edge, "tollgate: reload refused", Duration::from_secs(10)).is_some(),
        "a broken config on SIGHUP must be refused; stdout: {:?}",
        edge.stdout_lines.lock().unwrap()
    );
    let cfg2 = EdgeConfig::routed_to(uas2.ports.sip);
    fs::write(&edge.config_path, cfg2.to_toml()).unwrap();
    signal(&edge, "HUP");
    assert!(
        wait_line(&edge, "tollgate: reloaded", Duration::from_secs(10)).is_some(),
        "no `tollgate: reloaded` after SIGHUP; stderr:\n{}",
        edge.stderr_tail(30)
    );
    assert_eq!(count_lines(&edge, "tollgate: reloaded"), 1);

    let uac = uac.wait_at_most(Duration::from_secs(150));
    uac.assert_calls_ok(CALLS as u64);
    let uas1 = uas1.wait_at_most(Duration::from_secs(3));
    let uas2 = uas2.wait_at_most(Duration::from_secs(3));
    assert_eq!(
        uas1.incoming() + uas2.incoming(),
        CALLS as u64,
        "every call reaches a destination: {} / {}",
        uas1.summary(),
        uas2.summary()
    );
    assert!(
        uas1.incoming() > 0 && uas2.incoming() > 0,
        "calls before the reload go to the old route, after it to the new one: {} / {}",
        uas1.summary(),
        uas2.summary()
    );
}
