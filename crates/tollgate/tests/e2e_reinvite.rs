//! A re-INVITE with a new SDP offer from leg A is re-anchored by the media
//! relay (new ports and a rewritten offer toward leg B, the new answer
//! rewritten back), and RTP flows on the new path; the old path stops.
//! Drives a raw-UDP python UA (tests/media_support/reinvite_ua.py) against the
//! real binary and its built-in echo destination.

mod common;

use common::*;
use std::process::Command;

#[test]
fn reinvite_from_leg_a_re_anchors_media() {
    let edge = Edge::start(EdgeConfig::default());
    let key = edge.first_key();
    let token = mint(&key, "14155550100", "200", &[]);
    let script = manifest_dir().join("tests/media_support/reinvite_ua.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&token)
        .arg(edge.sip_udp.port().to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {script:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "UA failed: {stdout}\n{}\nedge: {}",
        String::from_utf8_lossy(&out.stderr),
        edge.stderr_tail(20)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {stdout}"));
    let num = |k: &str| -> i64 {
        let pat = format!("\"{k}\": ");
        let rest = &line[line.find(&pat).unwrap_or_else(|| panic!("{k} in {line}")) + pat.len()..];
        rest.split([',', '}'])
            .next()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    assert_eq!(num("first"), 10, "media before the re-INVITE: {line}");
    assert_eq!(num("second"), 10, "media after the re-INVITE: {line}");
    assert_eq!(
        num("old_path_after"),
        0,
        "the old path must be closed: {line}"
    );
    assert_eq!(num("bye"), 200, "{line}");
    assert!(
        line.contains("\"127.0.0.1\""),
        "answers name the edge: {line}"
    );
}
