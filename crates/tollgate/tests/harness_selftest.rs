//! Self-tests of the test harness itself (no edge involved): the crypto the
//! tests use to build credentials independently of the product, the JSON and
//! SIP helpers, and every SIPp scenario pair run directly UAC -> UAS, so a
//! failure in the e2e tests is the edge's, not the scenarios'.
//!
//! cargo test -p tollgate --test harness_selftest
mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn python(code: &str) -> String {
    let o = Command::new("python3")
        .args(["-c", code])
        .output()
        .expect("python3 is needed for the cross-check");
    assert!(
        o.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[test]
fn sha256_hmac_md5_match_known_vectors() {
    assert_eq!(
        hex(&sha256(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // RFC 4231 test case 2
    assert_eq!(
        hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // RFC 4231 test case 6 (key longer than the block)
    assert_eq!(
        hex(&hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    // RFC 1321
    assert_eq!(hex(&md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(
        hex(&md5(b"message digest")),
        "f96b697d7cb7938d525a2f31aaf161d0"
    );
    assert_eq!(
        hex(&md5(
            b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
        )),
        "57edf4a22be3c955ac49da2e2107b67a"
    );
}

#[test]
fn derived_keys_match_python_hmac() {
    let key = "tg_sk_abcdefgh1234_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123";
    let py_digest = python(&format!(
        "import hmac,hashlib;print(hmac.new(b'{key}',b'tollgate-sip-digest-v1',hashlib.sha256).hexdigest())"
    ));
    assert_eq!(digest_password(key), py_digest);
    let py_sign = python(&format!(
        "import hmac,hashlib;print(hmac.new(b'{key}',b'tollgate-sip-token-v1',hashlib.sha256).hexdigest())"
    ));
    assert_eq!(hex(&token_signing_key(key)), py_sign);
    // a whole JWT, signature checked by python
    let t = jwt_for(key, &claims(1000, 2000, "+15551230000", "sipp"));
    let ok = python(&format!(
        "import hmac,hashlib,base64\nt='{t}'\nh,p,s=t.split('.')\nk=hmac.new(b'{key}',b'tollgate-sip-token-v1',hashlib.sha256).digest()\n\
         sig=base64.urlsafe_b64encode(hmac.new(k,(h+'.'+p).encode(),hashlib.sha256).digest()).rstrip(b'=').decode()\nprint(sig==s)"
    ));
    assert_eq!(ok, "True");
    assert_eq!(key_id(key), "abcdefgh1234");
}

#[test]
fn digest_response_matches_rfc2617_example() {
    // RFC 2617 section 3.5 (qop=auth, MD5)
    let r = digest_response(
        "MD5",
        "Mufasa",
        "testrealm@host.com",
        "Circle Of Life",
        "GET",
        "/dir/index.html",
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        "00000001",
        "0a4f113b",
    );
    assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    // RFC 7616 section 3.9.1 (SHA-256, qop=auth)
    let r = digest_response(
        "SHA-256",
        "Mufasa",
        "http-auth@example.org",
        "Circle of Life",
        "GET",
        "/dir/index.html",
        "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "00000001",
        "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    );
    assert_eq!(
        r,
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    );
}

#[test]
fn b64url_and_json_roundtrip() {
    for n in 0..40 {
        let v: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(b64url_decode(&b64url(&v)).unwrap(), v);
    }
    let j = Json::parse(r#"{"a":1,"b":"x\"y","c":[true,null],"d":{"e":-2.5}}"#).unwrap();
    assert_eq!(j.int("a"), Some(1));
    assert_eq!(j.str("b"), Some("x\"y"));
    let (h, c, sig) = jwt_parts(&jwt_for(
        "tg_sk_abcdefgh1234_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
        &claims(5, 6, "a", "b"),
    ));
    assert_eq!(h.str("alg"), Some("HS256"));
    assert_eq!(h.str("kid"), Some("abcdefgh1234"));
    assert_eq!(c.int("exp"), Some(6));
    assert_eq!(sig.len(), 32);
}

#[test]
fn challenge_and_sip_parsing() {
    let (s, p) =
        parse_challenge(r#"Digest realm="tollgate", nonce="a,b", algorithm=SHA-256, qop="auth""#);
    assert_eq!(s, "Digest");
    assert_eq!(p["nonce"], "a,b");
    assert_eq!(p["algorithm"], "SHA-256");
    let (s, p) = parse_challenge(r#"Bearer realm="tollgate", error="invalid_token""#);
    assert_eq!(s, "Bearer");
    assert_eq!(p["error"], "invalid_token");
    let m = SipMsg::parse(b"SIP/2.0 401 Unauthorized\r\nv: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK1\r\ni: abc\r\nCSeq: 7 INVITE\r\nt: <sip:x@y>\r\n ;tag=9\r\nl: 0\r\n\r\n").unwrap();
    assert_eq!(m.code(), Some(401));
    assert_eq!(m.call_id(), Some("abc"));
    assert_eq!(m.cseq(), Some((7, "INVITE".into())));
    assert_eq!(m.to_tag().as_deref(), Some("9"));
    assert_eq!(m.via_branch().as_deref(), Some("z9hG4bK1"));
    let (_, l, v) =
        parse_sample(r#"tollgate_sip_requests_total{method="INVITE",x="a,b"} 3"#).unwrap();
    assert_eq!(l[0], ("method".into(), "INVITE".into()));
    assert_eq!(v, 3.0);
}

#[test]
fn raw_ua_talks_to_mini_uas() {
    // the raw UA and MiniUas are used by most e2e tests: check them together
    let busy = MiniUas::start(UasMode::Busy);
    let mut ua = UdpUa::new(busy.addr);
    let r = Req::invite(busy.addr, "123", "456");
    let fin = ua.call(&r);
    assert_eq!(fin.code(), Some(486));
    assert!(
        busy.wait_for("ACK", 1, Duration::from_secs(5)),
        "ACK for 486 not received by MiniUas"
    );
    let ans = MiniUas::start(UasMode::Answer);
    let mut ua = UdpUa::new(ans.addr);
    let r = Req::invite(ans.addr, "123", "456");
    let ok = ua.call(&r);
    assert_eq!(ok.code(), Some(200));
    assert_eq!(ua.ack_and_bye(&r, &ok), Some(200));
}

fn pair(uas_scen: &str, uac_scen: &str, calls: u32, extra_uac: &[&str]) {
    require_sipp();
    let dir = TestDir::new("selftest-sipp");
    let uas = Sipp::new(&dir.path, "uas", uas_scen)
        .calls(calls)
        .args(&["-default_behaviors", "all,-abortunexp"])
        .timeout(Duration::from_secs(30))
        .spawn();
    let tokens: Vec<String> = (0..calls).map(|i| format!("selftest.token.{i}")).collect();
    write_inf(&dir.join("tokens.csv"), &tokens);
    let uac = Sipp::new(&dir.path, "uac", uac_scen)
        .remote(uas.addr())
        .calls(calls)
        .rate(10)
        .pause_ms(100)
        .service(SERVICE)
        .inf(&dir.join("tokens.csv"))
        .args(&[
            "-recv_timeout",
            "5s",
            "-default_behaviors",
            "all,-abortunexp",
        ])
        .args(extra_uac)
        .timeout(Duration::from_secs(30))
        .run();
    uac.assert_calls_ok(calls as u64);
    let uas = uas.wait_at_most(Duration::from_secs(15));
    uas.assert_calls_ok(calls as u64);
}

#[test]
fn sipp_scenarios_bearer_call() {
    pair("uas.xml", "uac_bearer.xml", 3, &[]);
}
#[test]
fn sipp_scenarios_remote_bye() {
    pair("uas_bye.xml", "uac_bearer_recv_bye.xml", 3, &[]);
}
#[test]
fn sipp_scenarios_busy() {
    pair("uas_busy.xml", "uac_expect_486.xml", 3, &[]);
}
#[test]
fn sipp_scenarios_cancel() {
    pair("uas_ring_cancel.xml", "uac_cancel.xml", 3, &[]);
}
#[test]
fn sipp_scenarios_digest_against_spec_style_401() {
    pair(
        "selftest_uas_digest.xml",
        "uac_digest.xml",
        3,
        &["-au", "selftestuser", "-ap", "selftestpass"],
    );
}
#[test]
fn port_blocks_are_distinct() {
    let a = alloc_ports();
    let b = alloc_ports();
    assert_ne!(a.sip, b.sip);
    assert!(a.sip >= 7000 && a.control < 9960);
}
