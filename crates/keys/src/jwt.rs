//! Per-call bearer tokens: JWT, HS256 (SPEC §3a).
//!
//! Header `{"alg":"HS256","typ":"JWT","kid":"<key id>"}`, signed with
//! [`signing_key`](crate::apikey::signing_key) of the API key. [`verify`]
//! checks the signature before it parses the claims, and checks the claims'
//! times against the caller's `now`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::apikey::ApiKey;

/// Longest token accepted by [`verify`], in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest accepted lifetime `exp - iat`, in seconds.
pub const MAX_LIFETIME_SECS: i64 = 3600;
/// Clock-skew leeway on `iat`, in seconds.
pub const IAT_LEEWAY_SECS: i64 = 30;
/// Longest accepted `jti`, in characters.
pub const MAX_JTI_LEN: usize = 64;

/// The claims of a Tollgate call token. Unknown claims are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds; `exp - iat` is at most 3600.
    pub exp: i64,
    /// Unique per call, at most 64 characters; single use until `exp`.
    pub jti: String,
    /// Destination (E.164 with `+`, or a SIP user part); must match the Request-URI user.
    pub to: String,
    /// Caller; must match the From (or P-Asserted-Identity) user.
    pub from: String,
    /// Which AI backend serves the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// https URL for call events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Whether to record the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<bool>,
    /// Maximum call duration, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<u64>,
}

/// Why a token was refused. Never carries token text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three base64url parts, bad JSON, missing `kid`/claims, too long.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not `HS256`.
    #[error("unsupported token algorithm")]
    BadAlg,
    /// No usable key (unknown, revoked, expired) for the `kid`.
    #[error("unknown key")]
    UnknownKey,
    /// The signature matches none of the key's live secrets.
    #[error("bad signature")]
    BadSignature,
    /// `exp <= now`.
    #[error("token expired")]
    Expired,
    /// `iat` is more than the leeway in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp <= iat` or `exp - iat` over 3600 s.
    #[error("token lifetime invalid")]
    Lifetime,
    /// `jti` empty or longer than 64 characters.
    #[error("bad jti")]
    BadJti,
}

impl TokenError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::BadAlg => "bad_alg",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Lifetime => "lifetime",
            TokenError::BadJti => "bad_jti",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Mints a token for `claims`, signed with `key`'s signing key.
pub fn mint(key: &ApiKey, claims: &Claims) -> String {
    mint_with(key.id(), &key.signing_key(), claims)
}

/// Mints a token with an explicit `kid` and signing key (the derivation of
/// [`signing_key`](crate::apikey::signing_key) done by the caller).
pub fn mint_with(kid: &str, signing_key: &[u8; 32], claims: &Claims) -> String {
    // Written by hand so that it is exactly `{"alg":"HS256","typ":"JWT","kid":"<id>"}`;
    // `to_string` of a `&str` only quotes and escapes it.
    let kid = serde_json::to_string(kid).expect("string serialises");
    let header = format!("{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":{kid}}}");
    let claims = serde_json::to_vec(claims).expect("claims serialise");
    let mut token = URL_SAFE_NO_PAD.encode(header.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let key = hmac::Key::new(hmac::HMAC_SHA256, signing_key);
    let tag = hmac::sign(&key, token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
    token
}

/// Verifies `token` at `now` (Unix seconds).
///
/// `signing_keys_for_kid` is called at most once, with the header's `kid`, and
/// returns the signing keys of that key's live secrets (`None` or an empty
/// list if the key is unknown, revoked or expired). The signature is checked
/// (constant time) before the claims are parsed. Returns the `kid` and the
/// claims. Replay of `jti` is the caller's job (see [`crate::replay`]).
pub fn verify(
    token: &str,
    now: i64,
    signing_keys_for_kid: impl FnOnce(&str) -> Option<Vec<[u8; 32]>>,
) -> Result<(String, Claims), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(h64)
        .map_err(|_| TokenError::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
    if header.alg != "HS256" {
        return Err(TokenError::BadAlg);
    }
    let kid = match header.kid {
        Some(k) if !k.is_empty() && k.len() <= 64 => k,
        _ => return Err(TokenError::Malformed),
    };
    let sig = URL_SAFE_NO_PAD
        .decode(s64)
        .map_err(|_| TokenError::Malformed)?;
    if sig.len() != 32 {
        return Err(TokenError::Malformed);
    }
    let keys = match signing_keys_for_kid(&kid) {
        Some(k) if !k.is_empty() => k,
        _ => return Err(TokenError::UnknownKey),
    };
    let signing_input = &token.as_bytes()[..h64.len() + 1 + c64.len()];
    // Check every key so that the time taken does not say which one matched.
    let mut ok = false;
    for k in &keys {
        let key = hmac::Key::new(hmac::HMAC_SHA256, k);
        ok |= hmac::verify(&key, signing_input, &sig).is_ok();
    }
    if !ok {
        return Err(TokenError::BadSignature);
    }
    let claims = URL_SAFE_NO_PAD
        .decode(c64)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&claims).map_err(|_| TokenError::Malformed)?;
    if claims.exp <= claims.iat || claims.exp.saturating_sub(claims.iat) > MAX_LIFETIME_SECS {
        return Err(TokenError::Lifetime);
    }
    if claims.iat > now.saturating_add(IAT_LEEWAY_SECS) {
        return Err(TokenError::NotYetValid);
    }
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    if claims.jti.is_empty() || claims.jti.chars().count() > MAX_JTI_LEN {
        return Err(TokenError::BadJti);
    }
    if claims.to.is_empty() || claims.from.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok((kid, claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apikey::KeyKind;

    const NOW: i64 = 1_700_000_000;

    fn claims() -> Claims {
        Claims {
            iat: NOW,
            exp: NOW + 300,
            jti: "call-1".into(),
            to: "+14155550100".into(),
            from: "+14155550199".into(),
            model: Some("support-agent".into()),
            webhook: None,
            record: Some(true),
            max_duration: None,
        }
    }

    fn keys_of(k: &ApiKey) -> impl FnOnce(&str) -> Option<Vec<[u8; 32]>> + '_ {
        move |kid| (kid == k.id()).then(|| vec![k.signing_key()])
    }

    fn raw(header: &str, claims: &str, key: &[u8; 32]) -> String {
        let mut t = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), t.as_bytes());
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(tag));
        t
    }

    #[test]
    fn mint_verify_roundtrip_and_exact_header() {
        let k = ApiKey::generate(KeyKind::Secret);
        let t = mint(&k, &claims());
        let h = URL_SAFE_NO_PAD
            .decode(t.split('.').next().unwrap())
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&h).unwrap(),
            format!(
                "{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"{}\"}}",
                k.id()
            )
        );
        let (kid, c) = verify(&t, NOW, keys_of(&k)).unwrap();
        assert_eq!(kid, k.id());
        assert_eq!(c, claims());
    }

    #[test]
    fn rejects_wrong_key_and_tamper() {
        let k = ApiKey::generate(KeyKind::Secret);
        let other = ApiKey::generate(KeyKind::Secret);
        let t = mint_with(k.id(), &other.signing_key(), &claims());
        assert_eq!(verify(&t, NOW, keys_of(&k)), Err(TokenError::BadSignature));
        // Tampered claims.
        let t = mint(&k, &claims());
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims();
        c.to = "+19005551234".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(
            verify(&forged, NOW, keys_of(&k)),
            Err(TokenError::BadSignature)
        );
        // Any live key may match.
        let t = mint(&k, &claims());
        let r = verify(&t, NOW, |_| {
            Some(vec![other.signing_key(), k.signing_key()])
        });
        assert!(r.is_ok());
    }

    #[test]
    fn rejects_times() {
        let k = ApiKey::generate(KeyKind::Secret);
        let check = |f: &dyn Fn(&mut Claims), now: i64| {
            let mut c = claims();
            f(&mut c);
            verify(&mint(&k, &c), now, keys_of(&k)).map(|_| ())
        };
        assert_eq!(check(&|_| {}, NOW + 300), Err(TokenError::Expired));
        assert_eq!(check(&|_| {}, NOW + 299), Ok(()));
        assert_eq!(check(&|_| {}, NOW - 30), Ok(()));
        assert_eq!(check(&|_| {}, NOW - 31), Err(TokenError::NotYetValid));
        assert_eq!(
            check(&|c| c.exp = c.iat + 3601, NOW),
            Err(TokenError::Lifetime)
        );
        assert_eq!(check(&|c| c.exp = c.iat + 3600, NOW), Ok(()));
        assert_eq!(check(&|c| c.exp = c.iat, NOW), Err(TokenError::Lifetime));
        assert_eq!(
            check(&|c| c.exp = c.iat - 5, NOW),
            Err(TokenError::Lifetime)
        );
        assert_eq!(
            check(
                &|c| {
                    c.iat = i64::MIN;
                    c.exp = i64::MAX
                },
                NOW
            ),
            Err(TokenError::Lifetime)
        );
        assert_eq!(check(&|c| c.jti.clear(), NOW), Err(TokenError::BadJti));
        assert_eq!(
            check(&|c| c.jti = "x".repeat(65), NOW),
            Err(TokenError::BadJti)
        );
        assert_eq!(check(&|c| c.jti = "é".repeat(64), NOW), Ok(()));
        assert_eq!(check(&|c| c.to.clear(), NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn rejects_bad_alg_and_malformed() {
        let k = ApiKey::generate(KeyKind::Secret);
        let sk = k.signing_key();
        let body = serde_json::to_string(&claims()).unwrap();
        let kid = k.id();
        // alg=none with empty signature.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(format!("{{\"alg\":\"none\",\"kid\":\"{kid}\"}}")),
            URL_SAFE_NO_PAD.encode(&body)
        );
        assert_eq!(verify(&none, NOW, keys_of(&k)), Err(TokenError::BadAlg));
        for alg in ["HS512", "hs256", "RS256", "none"] {
            let t = raw(
                &format!("{{\"alg\":\"{alg}\",\"kid\":\"{kid}\"}}"),
                &body,
                &sk,
            );
            assert_eq!(
                verify(&t, NOW, keys_of(&k)),
                Err(TokenError::BadAlg),
                "{alg}"
            );
        }
        let t = raw("{\"alg\":\"HS256\"}", &body, &sk);
        assert_eq!(verify(&t, NOW, keys_of(&k)), Err(TokenError::Malformed));
        let t = raw("{\"alg\":\"HS256\",\"kid\":\"zzzzzzzzzzzz\"}", &body, &sk);
        assert_eq!(verify(&t, NOW, keys_of(&k)), Err(TokenError::UnknownKey));
        assert_eq!(
            verify(&mint(&k, &claims()), NOW, |_| Some(vec![])),
            Err(TokenError::UnknownKey)
        );
        // Claims that are not JSON / lack `to`, but correctly signed.
        let hdr = format!("{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"{kid}\"}}");
        for c in [
            "not json",
            "{\"iat\":1}",
            "{\"iat\":1.5,\"exp\":2,\"jti\":\"a\",\"to\":\"a\",\"from\":\"b\"}",
        ] {
            let t = raw(&hdr, c, &sk);
            assert_eq!(
                verify(&t, NOW, keys_of(&k)),
                Err(TokenError::Malformed),
                "{c}"
            );
        }
        // Unknown claims ignored.
        let mut v = serde_json::to_value(claims()).unwrap();
        v["extra"] = serde_json::json!({"x": 1});
        let t = raw(&hdr, &v.to_string(), &sk);
        assert!(verify(&t, NOW, keys_of(&k)).is_ok());
        let good = mint(&k, &claims());
        let garbage = [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "!!!.!!!.!!!",
            &good[..good.len() - 2],
            &format!("{good}="),
            &format!("{good}.x"),
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ];
        for g in garbage {
            let r = verify(g, NOW, keys_of(&k));
            assert!(
                matches!(r, Err(TokenError::Malformed | TokenError::BadSignature)),
                "{g:?} {r:?}"
            );
        }
    }

    #[test]
    fn reasons_are_labels() {
        assert_eq!(TokenError::BadSignature.reason(), "bad_signature");
        assert_eq!(
            TokenError::BadAlg.to_string(),
            "unsupported token algorithm"
        );
    }
}
