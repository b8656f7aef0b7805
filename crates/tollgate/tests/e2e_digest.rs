//! Digest calls (SPEC 3b): username = key id, password = hex HMAC-SHA256(key,
//! "tollgate-sip-digest-v1"), qop=auth, nonces single use.
//!
//! cargo test -p tollgate --test e2e_digest
mod common;
use common::*;
use std::collections::HashMap;
use std::time::Duration;

type Challenges = Vec<(String, HashMap<String, String>)>;

const CALLS: u32 = 200;

#[test]
fn digest_200_calls_via_sipp_md5_first() {
    require_sipp();
    let dir = TestDir::new("digest200");
    let uas = Sipp::new(&dir.path, "uas", "uas.xml")
        .calls(CALLS)
        .args(&["-default_behaviors", "all,-abortunexp"])
        .timeout(Duration::from_secs(150))
        .spawn();
    let edge = Edge::start(EdgeConfig::routed_to(uas.ports.sip));
    let key = edge.first_key();
    let (user, pass) = (key_id(&key), digest_password(&key));
    // SIPp's default digest uri is sip:host:port; make it the real
    // Request-URI (SIPp prepends the "sip:" itself)
    let auth_uri = format!("{SERVICE}@{}", edge.sip_udp);
    let uac = Sipp::new(&dir.path, "uac", "uac_digest.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .digest(&user, &pass)
        .args(&["-auth_uri", &auth_uri])
        .calls(CALLS)
        .rate(40)
        .pause_ms(200)
        .args(&[
            "-recv_timeout",
            "15s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .timeout(Duration::from_secs(120))
        .run();
    let uas = uas.wait_at_most(Duration::from_secs(20));
    uac.assert_calls_ok(CALLS as u64);
    assert_eq!(
        uas.incoming(),
        CALLS as u64,
        "UAS must see {CALLS} calls: {}",
        uas.summary()
    );
    uas.assert_calls_ok(CALLS as u64);
}

/// First INVITE without credentials -> 401; returns (invite, challenges).
fn challenge(ua: &mut UdpUa, edge: &Edge) -> (Req, Challenges) {
    let r = Req::invite(edge.sip_udp, SERVICE, "pbx");
    let fin = ua.call(&r);
    assert_digest_challenges(&fin);
    (r, www_auth(&fin))
}

/// Re-INVITE (new branch, CSeq+1, same Call-ID) answering the challenge of `alg`.
fn answer(
    ua: &mut UdpUa,
    first: &Req,
    ch: &Challenges,
    alg: &str,
    user: &str,
    pass: &str,
    nc: &str,
) -> (Req, SipMsg) {
    let p = ch
        .iter()
        .find(|(s, p)| {
            s.eq_ignore_ascii_case("Digest")
                && p.get("algorithm")
                    .map_or("MD5", |a| a.as_str())
                    .eq_ignore_ascii_case(alg)
        })
        .unwrap_or_else(|| panic!("no Digest {alg} challenge in {ch:?}"))
        .1
        .clone();
    let mut r = first.clone();
    r.branch = unique("z9hG4bK-tg");
    r.cseq += 1;
    r.cseq_method = "INVITE".into();
    let auth = digest_authorization(&p, user, pass, "INVITE", &r.ruri, nc, &unique("cn"));
    let r = r.header("Authorization", &auth);
    let fin = ua.call(&r);
    (r, fin)
}

fn busy_edge(algs: Option<Vec<&str>>) -> (MiniUas, Edge) {
    let uas = MiniUas::start(UasMode::Busy);
    let edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        digest_algorithms: algs.map(|v| v.into_iter().map(String::from).collect()),
        ..Default::default()
    });
    (uas, edge)
}

#[test]
fn digest_md5_and_sha256_pass_auth() {
    let (uas, edge) = busy_edge(Some(vec!["MD5", "SHA-256"]));
    let key = edge.first_key();
    for alg in ["MD5", "SHA-256"] {
        let mut ua = UdpUa::new(edge.sip_udp);
        let (r, ch) = challenge(&mut ua, &edge);
        let (_, fin) = answer(
            &mut ua,
            &r,
            &ch,
            alg,
            &key_id(&key),
            &digest_password(&key),
            "00000001",
        );
        assert_eq!(
            fin.code(),
            Some(486),
            "digest {alg} with the right password must pass auth (destination answers 486):\n{}",
            fin.text()
        );
    }
    assert!(uas.wait_for("INVITE", 2, Duration::from_secs(5)));
}

#[test]
fn digest_wrong_password_or_unknown_user_401() {
    let (uas, edge) = busy_edge(None);
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let (r, ch) = challenge(&mut ua, &edge);
    let alg = ch
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
        .unwrap()
        .1
        .get("algorithm")
        .cloned()
        .unwrap_or("MD5".into());
    let (_, fin) = answer(
        &mut ua,
        &r,
        &ch,
        &alg,
        &key_id(&key),
        &digest_password("tg_sk_xxxxxxxxxxxx_notthekeynotthekeynotthekeynotthekey"),
        "00000001",
    );
    assert_eq!(
        fin.code(),
        Some(401),
        "wrong digest password:\n{}",
        fin.text()
    );
    let (r, ch) = challenge(&mut ua, &edge);
    let (_, fin) = answer(
        &mut ua,
        &r,
        &ch,
        &alg,
        "zzzzzzzzzzzz",
        &digest_password(&key),
        "00000001",
    );
    assert_eq!(
        fin.code(),
        Some(401),
        "unknown digest username:\n{}",
        fin.text()
    );
    // the raw API key as password (instead of the derived one) must not work either
    let (r, ch) = challenge(&mut ua, &edge);
    let (_, fin) = answer(&mut ua, &r, &ch, &alg, &key_id(&key), &key, "00000001");
    assert_eq!(
        fin.code(),
        Some(401),
        "the full key is not the digest password:\n{}",
        fin.text()
    );
    assert_eq!(
        uas.count("INVITE"),
        0,
        "no INVITE may reach the destination"
    );
}

#[test]
fn digest_nonce_is_single_use() {
    let (uas, edge) = busy_edge(None);
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let (r, ch) = challenge(&mut ua, &edge);
    let alg = ch
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
        .unwrap()
        .1
        .get("algorithm")
        .cloned()
        .unwrap_or("MD5".into());
    let (r2, fin) = answer(
        &mut ua,
        &r,
        &ch,
        &alg,
        &key_id(&key),
        &digest_password(&key),
        "00000001",
    );
    assert_eq!(
        fin.code(),
        Some(486),
        "first use of the nonce passes auth:\n{}",
        fin.text()
    );
    // the very same Authorization on a new INVITE transaction (new Call-ID, new branch)
    let mut replay = r2.clone();
    replay.call_id = unique("call-") + "@tgtest";
    replay.branch = unique("z9hG4bK-tg");
    let fin = ua.call(&replay);
    assert_eq!(
        fin.code(),
        Some(401),
        "a replayed digest nonce must be refused:\n{}",
        fin.text()
    );
    assert_eq!(
        uas.count("INVITE"),
        1,
        "only the first INVITE may reach the destination"
    );
}

#[test]
fn default_digest_order_is_sha256_then_md5() {
    let (_uas, edge) = busy_edge(None);
    let mut ua = UdpUa::new(edge.sip_udp);
    let (_, ch) = challenge(&mut ua, &edge);
    let algs: Vec<String> = ch
        .iter()
        .filter(|(s, _)| s.eq_ignore_ascii_case("Digest"))
        .map(|(_, p)| {
            p.get("algorithm")
                .cloned()
                .unwrap_or("MD5".into())
                .to_ascii_uppercase()
        })
        .collect();
    assert_eq!(
        algs,
        vec!["SHA-256", "MD5"],
        "SPEC 3b default order (RFC 8760)"
    );
}
