//! Bearer-token calls end to end: SIPp UAC -> edge -> SIPp UAS.
//!
//! cargo test -p tollgate --test e2e_bearer
mod common;
use common::*;
use std::collections::HashSet;
use std::time::Duration;

const CALLS: u32 = 200;

#[test]
fn bearer_200_calls_via_sipp() {
    require_sipp();
    let dir = TestDir::new("bearer200");
    let uas = Sipp::new(&dir.path, "uas", "uas.xml")
        .calls(CALLS)
        .args(&["-default_behaviors", "all,-abortunexp"])
        .timeout(Duration::from_secs(150))
        .spawn();
    let edge = Edge::start(EdgeConfig::routed_to(uas.ports.sip));
    let key = edge.first_key();
    assert_key_format(&key);
    assert!(
        key.starts_with("tg_sk_"),
        "first key must be a secret key: {key}"
    );

    let tokens = mint_many(&key, SERVICE, "sipp", CALLS as usize);
    let jtis: HashSet<String> = tokens
        .iter()
        .map(|t| jwt_parts(t).1.str("jti").expect("jti claim").to_string())
        .collect();
    assert_eq!(
        jtis.len(),
        CALLS as usize,
        "token mint must give every token a unique jti"
    );
    write_inf(&dir.join("tokens.csv"), &tokens);

    let uac = Sipp::new(&dir.path, "uac", "uac_bearer.xml")
        .remote(edge.sip_udp)
        .service(SERVICE)
        .inf(&dir.join("tokens.csv"))
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
        "UAS must see {CALLS} incoming calls: {}",
        uas.summary()
    );
    uas.assert_calls_ok(CALLS as u64);
}

#[test]
fn token_mint_produces_spec_jwt() {
    let edge = Edge::start(EdgeConfig::default());
    let key = edge.first_key();
    let t0 = now_unix();
    let t = mint(
        &key,
        "+15551230000",
        "sipp",
        &["--ttl", "60s", "--model", "support-agent"],
    );
    let (h, c, sig) = jwt_parts(&t);
    assert_eq!(h.str("alg"), Some("HS256"), "header {h:?}");
    assert_eq!(h.str("typ"), Some("JWT"), "header {h:?}");
    assert_eq!(h.str("kid"), Some(key_id(&key).as_str()), "header {h:?}");
    assert_eq!(c.str("to"), Some("+15551230000"), "claims {c:?}");
    assert_eq!(c.str("from"), Some("sipp"), "claims {c:?}");
    assert_eq!(c.str("model"), Some("support-agent"), "claims {c:?}");
    let (iat, exp) = (
        c.int("iat").expect("iat integer"),
        c.int("exp").expect("exp integer"),
    );
    assert!((iat - t0).abs() <= 5, "iat {iat} vs now {t0}");
    assert_eq!(exp - iat, 60, "--ttl 60s");
    let jti = c.str("jti").expect("jti");
    assert!(!jti.is_empty() && jti.len() <= 64, "jti {jti:?}");
    // signature: HS256 with HMAC-SHA256(full key, "tollgate-sip-token-v1")
    let p: Vec<&str> = t.split('.').collect();
    let want = hmac_sha256(
        &token_signing_key(&key),
        format!("{}.{}", p[0], p[1]).as_bytes(),
    );
    assert_eq!(
        sig,
        want.to_vec(),
        "token signature is not HS256 with the SPEC signing key"
    );
    // default ttl stays within 3600 s
    let (_, c2, _) = jwt_parts(&mint(&key, "+15551230000", "sipp", &[]));
    let life = c2.int("exp").unwrap() - c2.int("iat").unwrap();
    assert!(life > 0 && life <= 3600, "default token lifetime {life}");
}

#[test]
fn options_to_edge_gets_200_udp_and_tcp() {
    let edge = Edge::start(EdgeConfig::default());
    let mut ua = UdpUa::new(edge.sip_udp);
    let r = Req::options(edge.sip_udp);
    let fin = ua.call(&r);
    assert_eq!(fin.code(), Some(200), "OPTIONS over UDP:\n{}", fin.text());
    assert_eq!(fin.call_id(), Some(r.call_id.as_str()));
    let mut tcp = TcpUa::connect(edge.tcp());
    let r = Req::options(edge.tcp()).tcp();
    let fin = tcp
        .transact(&r, Duration::from_secs(10))
        .expect("no response to OPTIONS over TCP")
        .fin;
    assert_eq!(fin.code(), Some(200), "OPTIONS over TCP:\n{}", fin.text());
}

#[test]
fn invite_without_credential_gets_401_with_bearer_and_digest() {
    // The Bearer challenge is opt-in (SPEC §4); e2e_challenge_policy.rs
    // checks the Digest-only default.
    let edge = Edge::start(EdgeConfig {
        sip_extra: "bearer_challenge = true".into(),
        ..EdgeConfig::default()
    });
    let mut ua = UdpUa::new(edge.sip_udp);
    let r = Req::invite(edge.sip_udp, SERVICE, "sipp");
    let out = ua
        .transact(&r, Duration::from_secs(10))
        .expect("no final response to INVITE");
    let fin = out.fin;
    assert_both_challenges(&fin);
    assert!(
        fin.to_tag().is_some(),
        "401 must carry a To tag:\n{}",
        fin.text()
    );
    assert_eq!(
        fin.from_tag(),
        r.from.split("tag=").nth(1).map(String::from),
        "From tag must be echoed"
    );
    let digests: Vec<String> = www_auth(&fin)
        .into_iter()
        .filter(|(s, _)| s.eq_ignore_ascii_case("Digest"))
        .map(|(_, p)| {
            p.get("algorithm")
                .cloned()
                .unwrap_or_else(|| "MD5".into())
                .to_ascii_uppercase()
        })
        .collect();
    assert_eq!(
        digests,
        vec!["MD5".to_string(), "SHA-256".to_string()],
        "configured digest_algorithms order MD5, SHA-256:\n{}",
        fin.text()
    );
    for (s, p) in www_auth(&fin) {
        if s.eq_ignore_ascii_case("Digest") {
            let qop = p.get("qop").cloned().unwrap_or_default();
            assert!(
                qop.split(',').any(|q| q.trim() == "auth"),
                "Digest challenge must offer qop=auth:\n{}",
                fin.text()
            );
        }
    }
    // and over TCP
    let mut tcp = TcpUa::connect(edge.tcp());
    let r = Req::invite(edge.tcp(), SERVICE, "sipp").tcp();
    let fin = tcp
        .transact(&r, Duration::from_secs(10))
        .expect("no response to INVITE over TCP")
        .fin;
    assert_both_challenges(&fin);
}

#[test]
fn valid_token_call_reaches_destination_with_new_call_id() {
    // B2BUA: leg B is a fresh call (new Call-ID), leg A gets its own To-tag
    let uas = MiniUas::start(UasMode::Answer);
    let edge = Edge::start(EdgeConfig {
        route_target: Some(uas.route()),
        ..Default::default()
    });
    let key = edge.first_key();
    let token = mint(&key, SERVICE, "sipp", &["--model", "support-agent"]);
    let mut ua = UdpUa::new(edge.sip_udp);
    let r = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&token);
    let out = ua
        .transact(&r, Duration::from_secs(10))
        .expect("no final response");
    assert_eq!(
        out.fin.code(),
        Some(200),
        "valid token call must be answered:\n{}",
        out.fin.text()
    );
    assert!(
        out.provisional.iter().any(|p| p.code() == Some(100)),
        "edge must send 100 Trying on leg A"
    );
    assert!(
        out.fin.contact_uri().is_some(),
        "200 OK to INVITE must carry a Contact:\n{}",
        out.fin.text()
    );
    let invs = uas.requests("INVITE");
    assert_eq!(invs.len(), 1, "destination must get exactly one INVITE");
    let b = &invs[0];
    assert_ne!(
        b.call_id(),
        Some(r.call_id.as_str()),
        "leg B must have a new Call-ID"
    );
    assert!(
        b.header("authorization").is_none(),
        "the credential must not be forwarded to leg B:\n{}",
        b.text()
    );
    assert!(
        b.headers
            .iter()
            .any(|(n, v)| n.starts_with("x-tollgate-") && v.contains("support-agent")),
        "the token's model must travel as an X-Tollgate-* header (SPEC 3a):\n{}",
        b.text()
    );
    assert_eq!(
        ua.ack_and_bye(&r, &out.fin),
        Some(200),
        "BYE on leg A must be answered 200"
    );
    assert!(
        uas.wait_for("BYE", 1, Duration::from_secs(5)),
        "BYE must reach leg B"
    );
    assert!(
        uas.wait_for("ACK", 1, Duration::from_secs(5)),
        "leg B 200 must be ACKed"
    );
}
