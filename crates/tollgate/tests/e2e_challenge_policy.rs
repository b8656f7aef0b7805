//! SPEC §4 challenge policy: a credential-less INVITE gets Digest challenges
//! only, plus `Bearer realm=...` only with `[sip] bearer_challenge = true`; a
//! bad token is answered `Bearer ..., error="invalid_token"` either way.
//!
//! cargo test -p tollgate --test e2e_challenge_policy
mod common;
use common::*;
use std::time::Duration;

fn schemes(resp: &SipMsg) -> Vec<String> {
    www_auth(resp)
        .into_iter()
        .map(|(s, _)| s.to_ascii_lowercase())
        .collect()
}

#[test]
fn no_credential_gets_digest_only_by_default() {
    let edge = Edge::start(EdgeConfig::default());
    let mut ua = UdpUa::new(edge.sip_udp);
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "pbx"));
    assert_digest_challenges(&fin);
    assert_eq!(
        schemes(&fin),
        vec!["digest", "digest"],
        "one Digest per configured algorithm (MD5, SHA-256), no Bearer:\n{}",
        fin.text()
    );
    // The same over TCP.
    let mut tcp = TcpUa::connect(edge.tcp());
    let fin = tcp
        .transact(
            &Req::invite(edge.tcp(), SERVICE, "pbx").tcp(),
            Duration::from_secs(10),
        )
        .expect("no response to INVITE over TCP")
        .fin;
    assert_digest_challenges(&fin);
    // A token client still gets its Bearer error.
    let bad = Req::invite(edge.sip_udp, SERVICE, "pbx").bearer("abc.def.ghi");
    let fin = ua.call(&bad);
    assert_invalid_token(&fin, "malformed token, default policy");
    assert_eq!(schemes(&fin), vec!["bearer"], "{}", fin.text());
}

#[test]
fn bearer_challenge_true_adds_the_bearer_challenge() {
    let edge = Edge::start(EdgeConfig {
        sip_extra: "bearer_challenge = true".into(),
        ..EdgeConfig::default()
    });
    let mut ua = UdpUa::new(edge.sip_udp);
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "app"));
    assert_both_challenges(&fin);
    assert_eq!(
        schemes(&fin),
        vec!["bearer", "digest", "digest"],
        "Bearer first, then the Digest challenges:\n{}",
        fin.text()
    );
    let bad = Req::invite(edge.sip_udp, SERVICE, "app").bearer("abc.def.ghi");
    assert_invalid_token(&ua.call(&bad), "malformed token, bearer_challenge");
}

#[test]
fn bearer_challenge_must_be_a_boolean() {
    let dir = TestDir::new("chpolicy");
    let cfg = dir.join("tollgate.toml");
    std::fs::write(
        &cfg,
        "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\nbearer_challenge = \"yes\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let data = dir.join("data").display().to_string();
    let cfg = cfg.display().to_string();
    let out = tollgate(&["serve", "--data-dir", &data, "--config", &cfg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bearer_challenge"),
        "must name the field: {stderr}"
    );
}

#[test]
fn digest_by_source_errors_name_the_entry_and_field() {
    let dir = TestDir::new("chpolicy-src");
    let data = dir.join("data").display().to_string();
    for (entry, field) in [
        (
            "cidrs = [\"nope\"]\nalgorithms = [\"MD5\"]\n",
            "sip.digest_by_source[0].cidrs",
        ),
        (
            "cidrs = []\nalgorithms = [\"MD5\"]\n",
            "sip.digest_by_source[0].cidrs",
        ),
        (
            "cidrs = [\"127.0.0.1/32\"]\nalgorithms = [\"SHA1\"]\n",
            "sip.digest_by_source[0].algorithms",
        ),
        (
            "cidrs = [\"127.0.0.1/32\"]\nalgorithms = []\n",
            "sip.digest_by_source[0].algorithms",
        ),
        (
            "cidrs = [\"127.0.0.1/32\"]\nalgorithm = [\"MD5\"]\n",
            "algorithm",
        ),
    ] {
        let cfg = dir.join(&format!("{}.toml", unique("cfg")));
        std::fs::write(
            &cfg,
            format!(
                "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\n[[sip.digest_by_source]]\n{entry}\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n"
            ),
        )
        .unwrap();
        let cfg = cfg.display().to_string();
        let out = tollgate(&["serve", "--data-dir", &data, "--config", &cfg]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "[{entry}] {stderr}");
        assert!(
            stderr.contains(field),
            "[{entry}] must name {field}: {stderr}"
        );
    }
}
