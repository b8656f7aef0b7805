//! Interop matrix (issue 11): the real binary against the SIP stacks PBXs,
//! phones and carriers run, each case a call with media checked (a tone in,
//! the edge's built-in echo back, the received tone's frequency measured).
//! A case whose user agent is not installed fails, naming the Debian
//! package (scripts/test.sh installs them), never skips.
//!
//! cargo test -p tollgate --test interop
mod common;
mod interop_support;
use common::*;
use interop_support::*;
use std::time::Duration;

const TONE_HZ: f64 = 1000.0;
const SETUP: Duration = Duration::from_secs(30);

/// libre (baresip) refuses a 401 carrying any challenge that is not
/// `Digest ... algorithm=MD5` (whatever the order: it walks every
/// WWW-Authenticate and gives up with ENOSYS on SHA-256, EBADMSG on Bearer),
/// so a libre peer needs `digest_algorithms = ["MD5"]`.
fn edge_for_libre() -> Edge {
    Edge::start(EdgeConfig {
        digest_algorithms: Some(vec!["MD5".into()]),
        ..EdgeConfig::default()
    })
}

#[test]
fn baresip_digest_call_tone_echoed_and_bye() {
    let edge = edge_for_libre();
    let key = edge.first_key();
    let dir = TestDir::new("interop-baresip");
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, TONE_HZ, 30.0);
    let mut ua = Baresip::start(
        &dir.path,
        &BaresipAccount {
            user: &key_id(&key),
            password: &digest_password(&key),
            server: edge.sip_udp,
            extra: "",
        },
        &tone,
    );
    ua.command("dial", &format!("sip:{SERVICE}@{}", edge.sip_udp));
    ua.wait_event("CALL_ESTABLISHED", SETUP);
    // Media: 3 s of decoded audio came back through the edge's relay.
    let got = poll(Duration::from_secs(30), || {
        let p = std::fs::read_dir(&ua.dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().ends_with("-dec.wav"))?;
        (p.metadata().ok()?.len() > 44 + 16_000 * 4).then_some(())
    });
    assert!(
        got.is_some(),
        "baresip received under 4 s of audio:\n{}",
        ua.proc.tail(40)
    );
    ua.command("hangup", "");
    ua.wait_event("CALL_CLOSED", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert!(
        cdrs[0].contains("\"cause\":\"normal\"") && cdrs[0].contains("\"sip_code\":200"),
        "baresip's BYE must end the call normally: {cdrs:?}"
    );
    ua.quit();
    let hz = assert_tone(&ua.received_wav(), TONE_HZ, 2.0, "baresip -> edge -> echo");
    eprintln!("baresip: received {hz} Hz (sent {TONE_HZ} Hz)");
}
