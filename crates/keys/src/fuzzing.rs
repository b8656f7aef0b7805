//! Fuzz oracles for the credential parsers, shared by the cargo-fuzz targets
//! in `fuzz/` (`digest`, `jwt`) and by this module's tests, which feed the
//! same seeds plus fixed-seed mutations through them so that CI exercises
//! them without nightly.
//!
//! Each function takes arbitrary bytes and panics only when an oracle fails.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::digest::{self, Algorithm, DigestResponse, NonceIssuer};
use crate::jwt::{self, Claims, TokenError};

/// The `now` of every fuzz check (Unix seconds).
pub const NOW: i64 = 1_700_000_000;
/// The signing key of every JWT fuzz check.
pub const SIGNING_KEY: [u8; 32] = [0x42; 32];
const PASSWORD: &str = "fuzz-password";

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Digest: `parse_authorization` on arbitrary text (an `Authorization` or a
/// `WWW-Authenticate` value), then the response check and the nonce check.
///
/// Oracles: no panic; a parsed response re-quoted into a header parses back
/// to the same fields; with the correct `response` (any case) it verifies,
/// with one digit changed it does not; the nonce check of any text, and a
/// challenge for any realm and nonce text, are answers, not panics.
pub fn digest(data: &[u8]) {
    let value = text(data);
    let issuer = NonceIssuer::new([7; 32], 300);
    let _ = issuer.check(&value, NOW);
    let _ = digest::challenge_with(&value, Algorithm::Sha256, &value, true);
    let Ok(resp) = digest::parse_authorization(&value) else {
        return;
    };
    let _ = format!("{resp:?}");
    let _ = issuer.check(&resp.nonce, NOW);
    let _ = digest::verify(&resp, "INVITE", PASSWORD);

    let header = authorization(&resp);
    let back = digest::parse_authorization(&header)
        .unwrap_or_else(|e| panic!("re-quoted credentials refused ({e:?}): {header:?}"));
    assert!(back == resp, "re-quoted credentials changed: {header:?}");

    if let Some(good) = digest::expected_response(&resp, "INVITE", PASSWORD) {
        let mut ok = resp.clone();
        ok.response = good.to_ascii_uppercase();
        assert!(
            digest::verify(&ok, "INVITE", PASSWORD),
            "correct response refused"
        );
        let mut bad = ok.clone();
        let last = if good.ends_with('0') { "1" } else { "0" };
        bad.response = format!("{}{last}", &good[..good.len() - 1]);
        assert!(
            !digest::verify(&bad, "INVITE", PASSWORD),
            "wrong response accepted"
        );
        assert!(
            !digest::verify(&ok, "REGISTER", PASSWORD),
            "response for another method accepted"
        );
    }
}

/// `resp` as an `Authorization` value, every parameter quoted.
fn authorization(resp: &DigestResponse) -> String {
    let mut s = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response={}, algorithm={}",
        digest::quote(&resp.username),
        digest::quote(&resp.realm),
        digest::quote(&resp.nonce),
        digest::quote(&resp.uri),
        digest::quote(&resp.response),
        resp.algorithm.name()
    );
    for (name, v) in [
        ("cnonce", &resp.cnonce),
        ("nc", &resp.nc),
        ("qop", &resp.qop),
        ("opaque", &resp.opaque),
    ] {
        if let Some(v) = v {
            s.push_str(&format!(", {name}={}", digest::quote(v)));
        }
    }
    s
}

/// JWT: `jwt::verify` on arbitrary text as a token, and on the input split
/// at its first `.` into a header and a claims JSON, signed with
/// [`SIGNING_KEY`] (so the claims parser is reached, not just the
/// signature check).
///
/// Oracles: no panic; what verifies obeys the claim rules (lifetime, `now`,
/// `jti`, non-empty `to`/`from`); re-minting the claims gives a token that
/// verifies to the same claims; a token whose signature part changes is
/// refused.
pub fn jwt(data: &[u8]) {
    let keys = |_: &str| Some(vec![SIGNING_KEY]);
    let token = text(data);
    if let Ok((kid, claims)) = jwt::verify(&token, NOW, keys) {
        check_claims(&kid, &claims);
    }
    let (header, claims) = match data.iter().position(|&b| b == b'.') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&br#"{"alg":"HS256","kid":"k1"}"#[..], data),
    };
    let token = sign(header, claims);
    if let Ok((kid, claims)) = jwt::verify(&token, NOW, keys) {
        check_claims(&kid, &claims);
        let mut forged = token.clone();
        let last = forged.pop().expect("a token is not empty");
        forged.push(if last == 'A' { 'Q' } else { 'A' });
        assert!(
            matches!(
                jwt::verify(&forged, NOW, keys),
                Err(TokenError::BadSignature | TokenError::Malformed)
            ),
            "a changed signature was accepted: {forged}"
        );
    }
}

fn check_claims(kid: &str, c: &Claims) {
    assert!(!kid.is_empty() && kid.len() <= 64, "kid {kid:?}");
    assert!(c.iat < c.exp && c.exp - c.iat <= 3600, "lifetime");
    assert!(
        c.exp > NOW && c.iat <= NOW + jwt::IAT_LEEWAY_SECS,
        "validity"
    );
    assert!(
        !c.jti.is_empty() && c.jti.chars().count() <= jwt::MAX_JTI_LEN,
        "jti"
    );
    assert!(!c.to.is_empty() && !c.from.is_empty(), "to/from");
    let again = jwt::mint_with(kid, &SIGNING_KEY, c);
    let (k2, c2) = jwt::verify(&again, NOW, |_| Some(vec![SIGNING_KEY]))
        .unwrap_or_else(|e| panic!("re-minted token refused: {e:?}"));
    assert!(k2 == kid && &c2 == c, "re-minted token changed");
}

/// `b64(header).b64(claims).b64(HS256 tag)` with [`SIGNING_KEY`].
pub fn sign(header: &[u8], claims: &[u8]) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &SIGNING_KEY);
    let tag = ring::hmac::sign(&key, token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
    token
}

/// Digest seeds: a SIP client's `Authorization` with qop (MD5 and
/// SHA-256), the RFC 2069 form, a lenient unquoted one, and a challenge.
pub fn digest_seeds() -> Vec<(String, Vec<u8>)> {
    let issuer = NonceIssuer::new([7; 32], 300);
    let nonce = issuer.issue(NOW);
    let mut qop = DigestResponse {
        username: "tg_pk_live_0123456789abcdef".into(),
        realm: "tollgate".into(),
        nonce: nonce.clone(),
        uri: "sip:+14155550100@127.0.0.1:5060;transport=udp".into(),
        response: String::new(),
        algorithm: Algorithm::Md5,
        cnonce: Some("0a4f113b".into()),
        nc: Some("00000001".into()),
        qop: Some("auth".into()),
        opaque: None,
    };
    qop.response = digest::expected_response(&qop, "INVITE", PASSWORD).expect("qop=auth");
    let mut sha = qop.clone();
    sha.algorithm = Algorithm::Sha256;
    sha.realm = "edge \"one\" \\ two".into();
    sha.response = digest::expected_response(&sha, "INVITE", PASSWORD).expect("qop=auth");
    let mut old = qop.clone();
    (old.cnonce, old.nc, old.qop, old.opaque) = (None, None, None, Some("xyz".into()));
    old.response = digest::expected_response(&old, "INVITE", PASSWORD).expect("no qop");
    let lenient = format!(
        "digest username=alice,realm=tollgate, nonce = {nonce} ,uri=sip:bob@127.0.0.1,\
         response=0123456789abcdef0123456789abcdef,algorithm=MD5,qop=auth,nc=00000001,cnonce=abc"
    );
    vec![
        (
            "authorization-md5-qop".into(),
            authorization(&qop).into_bytes(),
        ),
        (
            "authorization-sha256".into(),
            authorization(&sha).into_bytes(),
        ),
        (
            "authorization-rfc2069".into(),
            authorization(&old).into_bytes(),
        ),
        ("authorization-lenient".into(), lenient.into_bytes()),
        (
            "www-authenticate".into(),
            digest::challenge_with("tollgate", Algorithm::Sha256, &nonce, true).into_bytes(),
        ),
    ]
}

/// JWT seeds: a valid call token (all claims), a minimal one, and the
/// `header.claims` JSON pair form of [`jwt`].
pub fn jwt_seeds() -> Vec<(String, Vec<u8>)> {
    let full = Claims {
        iat: NOW - 10,
        exp: NOW + 300,
        jti: "call-0001".into(),
        to: "+14155550100".into(),
        from: "+14155550199".into(),
        model: Some("support-agent".into()),
        webhook: Some("https://hooks.example.com/tollgate".into()),
        record: Some(true),
        max_duration: Some(600),
    };
    let minimal = Claims {
        model: None,
        webhook: None,
        record: None,
        max_duration: None,
        ..full.clone()
    };
    let pair = format!(
        "{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}}.{}",
        serde_json::to_string(&full).expect("claims serialise")
    );
    vec![
        (
            "token-full".into(),
            jwt::mint_with("k1", &SIGNING_KEY, &full).into_bytes(),
        ),
        (
            "token-minimal".into(),
            jwt::mint_with("tg_pk_live_0123", &SIGNING_KEY, &minimal).into_bytes(),
        ),
        ("json-pair".into(), pair.into_bytes()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    // The seed-file check and the mutator, shared with the other crates'
    // fuzz tests.
    include!("../../../fuzz/mutate.rs");

    #[test]
    fn digest_seeds_and_mutations() {
        let seeds = digest_seeds();
        for s in seeds_on_disk("digest", &seeds) {
            digest(&s);
        }
        let issuer = NonceIssuer::new([7; 32], 300);
        for (i, (name, s)) in seeds.iter().enumerate() {
            // Every Authorization seed parses; the signed ones verify.
            let text = std::str::from_utf8(s).unwrap();
            if name.starts_with("authorization") {
                let r = digest::parse_authorization(text).unwrap();
                assert!(issuer.check(&r.nonce, NOW).is_ok() || name.ends_with("lenient"));
                assert_eq!(
                    digest::verify(&r, "INVITE", PASSWORD),
                    !name.ends_with("lenient"),
                    "{name}"
                );
            }
            digest(s);
            for m in mutations(s, b" ,=\"\\\r\n\t:@;aA0fF", 4000, 0x9e37_79b9 + i as u64) {
                digest(&m);
            }
        }
    }

    #[test]
    fn jwt_seeds_and_mutations() {
        let seeds = jwt_seeds();
        for s in seeds_on_disk("jwt", &seeds) {
            jwt(&s);
        }
        for (i, (name, s)) in seeds.iter().enumerate() {
            let text = std::str::from_utf8(s).unwrap();
            if name.starts_with("token") {
                assert!(
                    jwt::verify(text, NOW, |_| Some(vec![SIGNING_KEY])).is_ok(),
                    "{name}"
                );
            } else {
                // The pair form reaches the claims checks.
                let (h, c) = text.split_once('.').unwrap();
                let t = sign(h.as_bytes(), c.as_bytes());
                assert!(
                    jwt::verify(&t, NOW, |_| Some(vec![SIGNING_KEY])).is_ok(),
                    "{name}"
                );
            }
            jwt(s);
            for m in mutations(s, b".-_{}\":,0123456789AQaz", 3000, 0x2545_f491 + i as u64) {
                jwt(&m);
            }
        }
    }
}
