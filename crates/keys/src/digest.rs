//! SIP digest authentication: RFC 3261 §22 with RFC 8760 (SHA-256), `qop=auth`.
//!
//! Nonces are stateless: `base64url(ts || random || HMAC(secret, ts || random)[..16])`,
//! so any edge holding the secret can check them; single use is enforced by a
//! [`ReplayCache`](crate::replay::ReplayCache) in [`crate::credential`].

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Longest `Authorization` value [`parse_authorization`] accepts, in bytes.
pub const MAX_AUTHORIZATION_LEN: usize = 4096;

const NONCE_RAW_LEN: usize = 8 + 8 + 16;

/// Digest hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `MD5` (RFC 3261).
    Md5,
    /// `SHA-256` (RFC 8760).
    Sha256,
}

impl Algorithm {
    /// The token used on the wire: `"MD5"` or `"SHA-256"`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Parses the wire token, case-insensitively. `-sess` variants are not supported.
    pub fn from_name(s: &str) -> Option<Algorithm> {
        if s.eq_ignore_ascii_case("MD5") {
            Some(Algorithm::Md5)
        } else if s.eq_ignore_ascii_case("SHA-256") {
            Some(Algorithm::Sha256)
        } else {
            None
        }
    }

    /// Lowercase hex of the hash of `data`.
    pub fn hex_hash(self, data: &[u8]) -> String {
        match self {
            Algorithm::Md5 => {
                use md5::Digest as _;
                hex::encode(md5::Md5::digest(data))
            }
            Algorithm::Sha256 => hex::encode(ring::digest::digest(&ring::digest::SHA256, data)),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        Algorithm::from_name(s).ok_or(DigestError::UnsupportedAlgorithm)
    }
}

/// Why a digest credential or nonce was refused. Never carries credential text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// The `Authorization` value cannot be parsed, or lacks a required parameter.
    #[error("malformed digest credentials")]
    Malformed,
    /// `algorithm` is not one we support or offer.
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
    /// The nonce was not issued by us (bad encoding or MAC).
    #[error("invalid nonce")]
    BadNonce,
    /// The nonce is authentic but expired.
    #[error("stale nonce")]
    StaleNonce,
}

impl DigestError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DigestError::Malformed => "malformed",
            DigestError::UnsupportedAlgorithm => "bad_alg",
            DigestError::BadNonce => "bad_nonce",
            DigestError::StaleNonce => "stale_nonce",
        }
    }
}

/// Issues and checks stateless, expiring nonces.
pub struct NonceIssuer {
    key: hmac::Key,
    lifetime_secs: u64,
    rng: SystemRandom,
}

impl fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
}

impl NonceIssuer {
    /// An issuer keyed with `secret`, whose nonces live `lifetime_secs`.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            lifetime_secs,
            rng: SystemRandom::new(),
        }
    }

    /// The lifetime given to [`NonceIssuer::new`].
    pub fn lifetime_secs(&self) -> u64 {
        self.lifetime_secs
    }

    /// A fresh nonce issued at `now` (Unix seconds; negative counts as 0).
    ///
    /// # Panics
    /// Only if the operating system's random generator fails.
    pub fn issue(&self, now: i64) -> String {
        let mut raw = [0u8; NONCE_RAW_LEN];
        raw[..8].copy_from_slice(&(now.max(0) as u64).to_be_bytes());
        // SystemRandom only fails if the OS generator is broken; the nonce is
        // still unforgeable (MAC) and still unique per second only if random
        // bytes differ, so do not go on with zeros.
        self.rng
            .fill(&mut raw[8..16])
            .expect("system random number generator failed");
        let tag = hmac::sign(&self.key, &raw[..16]);
        raw[16..].copy_from_slice(&tag.as_ref()[..16]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks that `nonce` is ours (constant-time MAC) and unexpired at `now`;
    /// returns its expiry (Unix seconds).
    ///
    /// An authentic but expired nonce gives [`DigestError::StaleNonce`].
    pub fn check(&self, nonce: &str, now: i64) -> Result<u64, DigestError> {
        let expiry = self.authentic(nonce)?;
        if now.max(0) as u64 >= expiry {
            return Err(DigestError::StaleNonce);
        }
        Ok(expiry)
    }

    /// Checks the MAC only; returns the expiry whether or not it has passed.
    pub fn authentic(&self, nonce: &str) -> Result<u64, DigestError> {
        self.issued_at(nonce)
            .map(|t| t.saturating_add(self.lifetime_secs))
    }

    /// Checks the MAC only (constant time); returns the time the nonce was issued.
    pub fn issued_at(&self, nonce: &str) -> Result<u64, DigestError> {
        if nonce.len() != (NONCE_RAW_LEN * 4).div_ceil(3) {
            return Err(DigestError::BadNonce);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(nonce)
            .map_err(|_| DigestError::BadNonce)?;
        if raw.len() != NONCE_RAW_LEN {
            return Err(DigestError::BadNonce);
        }
        let tag = hmac::sign(&self.key, &raw[..16]);
        if !crate::ct::eq(&tag.as_ref()[..16], &raw[16..]) {
            return Err(DigestError::BadNonce);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        Ok(u64::from_be_bytes(ts))
    }
}

/// A `WWW-Authenticate` header value:
/// `Digest realm="…", nonce="…", algorithm=MD5, qop="auth"`.
pub fn challenge(realm: &str, algorithm: Algorithm, nonce: &str) -> String {
    challenge_with(realm, algorithm, nonce, false)
}

/// As [`challenge`], adding `, stale=true` when `stale`.
pub fn challenge_with(realm: &str, algorithm: Algorithm, nonce: &str, stale: bool) -> String {
    let mut s = format!(
        "Digest realm={}, nonce={}, algorithm={}, qop=\"auth\"",
        quote(realm),
        quote(nonce),
        algorithm.name()
    );
    if stale {
        s.push_str(", stale=true");
    }
    s
}

/// Quotes `s` as an RFC 3261 quoted-string (escaping `"` and `\`).
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Parsed `Authorization: Digest …` credentials. Untrusted until [`verify`]d.
///
/// `Debug` omits the `response`.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestResponse {
    /// `username`: the key id.
    pub username: String,
    /// `realm`.
    pub realm: String,
    /// `nonce`, as issued by [`NonceIssuer::issue`].
    pub nonce: String,
    /// `uri`: must equal the Request-URI.
    pub uri: String,
    /// `response`: hex digest (compared case-insensitively).
    pub response: String,
    /// `algorithm`; MD5 when absent (RFC 3261).
    pub algorithm: Algorithm,
    /// `cnonce` (required with `qop`).
    pub cnonce: Option<String>,
    /// `nc` (required with `qop`).
    pub nc: Option<String>,
    /// `qop`; only `auth` can verify.
    pub qop: Option<String>,
    /// `opaque`, echoed back if we had sent one (we do not).
    pub opaque: Option<String>,
}

impl fmt::Debug for DigestResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestResponse")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("uri", &self.uri)
            .field("algorithm", &self.algorithm)
            .field("qop", &self.qop)
            .finish_non_exhaustive()
    }
}

/// Parses an `Authorization` (or `Proxy-Authorization`) value with the
/// `Digest` scheme.
///
/// Parameters may come in any order, quoted or not, with escaped quotes in
/// quoted strings and optional whitespace around `=` and `,`. Unknown
/// parameters are ignored; duplicates are an error. Never panics.
pub fn parse_authorization(value: &str) -> Result<DigestResponse, DigestError> {
    let params = digest_params(value)?;
    let mut username = None;
    let mut realm = None;
    let mut nonce = None;
    let mut uri = None;
    let mut response = None;
    let mut algorithm = None;
    let mut cnonce = None;
    let mut nc = None;
    let mut qop = None;
    let mut opaque = None;
    for (name, val) in params {
        let slot = match name.to_ascii_lowercase().as_str() {
            "username" => &mut username,
            "realm" => &mut realm,
            "nonce" => &mut nonce,
            "uri" => &mut uri,
            "response" => &mut response,
            "algorithm" => &mut algorithm,
            "cnonce" => &mut cnonce,
            "nc" => &mut nc,
            "qop" => &mut qop,
            "opaque" => &mut opaque,
            _ => continue,
        };
        if slot.replace(val).is_some() {
            return Err(DigestError::Malformed);
        }
    }
    let algorithm = algorithm_param(algorithm)?;
    let r = DigestResponse {
        username: username.ok_or(DigestError::Malformed)?,
        realm: realm.ok_or(DigestError::Malformed)?,
        nonce: nonce.ok_or(DigestError::Malformed)?,
        uri: uri.ok_or(DigestError::Malformed)?,
        response: response.ok_or(DigestError::Malformed)?,
        algorithm,
        cnonce,
        nc,
        qop,
        opaque,
    };
    if r.qop.is_some() && (r.cnonce.is_none() || r.nc.is_none()) {
        return Err(DigestError::Malformed);
    }
    Ok(r)
}

/// The parameters of a `Digest ...` header value (bounded in length).
fn digest_params(value: &str) -> Result<Vec<(String, String)>, DigestError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(DigestError::Malformed);
    }
    let v = value.trim_start();
    let (scheme, rest) = v.split_at(v.find([' ', '\t']).ok_or(DigestError::Malformed)?);
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(DigestError::Malformed);
    }
    parse_params(rest).ok_or(DigestError::Malformed)
}

/// `algorithm`, MD5 when absent (RFC 3261).
fn algorithm_param(a: Option<String>) -> Result<Algorithm, DigestError> {
    match a {
        None => Ok(Algorithm::Md5),
        Some(a) => Algorithm::from_name(&a).ok_or(DigestError::UnsupportedAlgorithm),
    }
}

/// Parses `name=value` pairs separated by commas. `None` on any syntax error.
fn parse_params(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it
            .next_if(|&(_, c)| c == ' ' || c == '\t' || c == '\r' || c == '\n')
            .is_some()
        {}
    };
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            break;
        }
        // name
        let mut name = String::new();
        while let Some((_, c)) = chars.next_if(|&(_, c)| is_token_char(c)) {
            name.push(c);
        }
        if name.is_empty() {
            return None;
        }
        skip_ws(&mut chars);
        chars.next_if(|&(_, c)| c == '=')?;
        skip_ws(&mut chars);
        // value
        let mut val = String::new();
        if chars.next_if(|&(_, c)| c == '"').is_some() {
            loop {
                match chars.next()? {
                    (_, '"') => break,
                    (_, '\\') => val.push(chars.next()?.1),
                    (_, c) => val.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|&(_, c)| is_token_char(c) || c == '=') {
                val.push(c);
            }
            if val.is_empty() {
                return None;
            }
        }
        out.push((name, val));
        skip_ws(&mut chars);
        match chars.next() {
            None => break,
            Some((_, ',')) => {}
            Some(_) => return None,
        }
    }
    Some(out)
}

/// RFC 3261 `token` characters (plus `/` `:` `@` `;` `?`, and `=` in values,
/// so that unquoted URIs from lenient clients still parse).
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.'
                | '!'
                | '%'
                | '*'
                | '_'
                | '+'
                | '`'
                | '\''
                | '~'
                | '/'
                | ':'
                | '@'
                | ';'
                | '?'
        )
}

/// Computes the expected `response` of `resp` for `method` and `password`.
///
/// With `qop=auth`: `H(HA1:nonce:nc:cnonce:auth:HA2)`; without `qop` (RFC
/// 2069 form): `H(HA1:nonce:HA2)`; where `HA1 = H(user:realm:password)` and
/// `HA2 = H(method:uri)`. `None` for a `qop` other than `auth`.
pub fn expected_response(resp: &DigestResponse, method: &str, password: &str) -> Option<String> {
    let alg = resp.algorithm;
    let ha1 = alg.hex_hash(format!("{}:{}:{}", resp.username, resp.realm, password).as_bytes());
    let ha2 = alg.hex_hash(format!("{}:{}", method, resp.uri).as_bytes());
    let data = match resp.qop.as_deref() {
        None => format!("{}:{}:{}", ha1, resp.nonce, ha2),
        Some(q) if q.eq_ignore_ascii_case("auth") => format!(
            "{}:{}:{}:{}:{}:{}",
            ha1,
            resp.nonce,
            resp.nc.as_deref()?,
            resp.cnonce.as_deref()?,
            q,
            ha2
        ),
        Some(_) => return None,
    };
    Some(alg.hex_hash(data.as_bytes()))
}

/// True if `resp.response` is correct for `method` and `password`
/// (constant-time comparison). Checks neither the nonce nor the realm.
pub fn verify(resp: &DigestResponse, method: &str, password: &str) -> bool {
    let Some(expected) = expected_response(resp, method, password) else {
        return false;
    };
    let given = resp.response.to_ascii_lowercase();
    crate::ct::eq(expected.as_bytes(), given.as_bytes())
}

/// A `WWW-Authenticate` or `Proxy-Authenticate` challenge with the `Digest`
/// scheme, from a peer the edge calls (a carrier answering leg B's INVITE
/// with 401/407, RFC 3261 §22.2). Untrusted: it only chooses how our answer
/// is computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestChallenge {
    /// `realm`, answered as given.
    pub realm: String,
    /// `nonce`, the peer's.
    pub nonce: String,
    /// `algorithm`; MD5 when absent.
    pub algorithm: Algorithm,
    /// The challenge offered `qop=auth` (we then answer with it).
    pub qop_auth: bool,
    /// `opaque`, echoed back.
    pub opaque: Option<String>,
}

/// Parses a `Digest` challenge. A `qop` list without `auth` or an
/// algorithm other than MD5/SHA-256 cannot be answered. Never panics.
pub fn parse_challenge(value: &str) -> Result<DigestChallenge, DigestError> {
    let (mut realm, mut nonce, mut algorithm, mut qop, mut opaque) = (None, None, None, None, None);
    for (name, val) in digest_params(value)? {
        let slot = match name.to_ascii_lowercase().as_str() {
            "realm" => &mut realm,
            "nonce" => &mut nonce,
            "algorithm" => &mut algorithm,
            "qop" => &mut qop,
            "opaque" => &mut opaque,
            _ => continue,
        };
        if slot.replace(val).is_some() {
            return Err(DigestError::Malformed);
        }
    }
    let algorithm = algorithm_param(algorithm)?;
    let qop_auth = match qop {
        None => false,
        Some(q) if q.split(',').any(|o| o.trim().eq_ignore_ascii_case("auth")) => true,
        Some(_) => return Err(DigestError::UnsupportedAlgorithm),
    };
    Ok(DigestChallenge {
        realm: realm.ok_or(DigestError::Malformed)?,
        nonce: nonce.ok_or(DigestError::Malformed)?,
        algorithm,
        qop_auth,
        opaque,
    })
}

impl DigestChallenge {
    /// The `Authorization` (or `Proxy-Authorization`) value answering this
    /// challenge for `method` on `uri` (RFC 3261 §22.4 with RFC 8760);
    /// `cnonce` is the caller's fresh random, used with `qop=auth`.
    pub fn authorization(
        &self,
        username: &str,
        password: &str,
        method: &str,
        uri: &str,
        cnonce: &str,
    ) -> String {
        let resp = DigestResponse {
            username: username.to_owned(),
            realm: self.realm.clone(),
            nonce: self.nonce.clone(),
            uri: uri.to_owned(),
            response: String::new(),
            algorithm: self.algorithm,
            cnonce: self.qop_auth.then(|| cnonce.to_owned()),
            nc: self.qop_auth.then(|| "00000001".to_owned()),
            qop: self.qop_auth.then(|| "auth".to_owned()),
            opaque: self.opaque.clone(),
        };
        // qop is auth or absent: expected_response always answers.
        let response = expected_response(&resp, method, password).unwrap_or_default();
        let mut s = format!(
            "Digest username={}, realm={}, nonce={}, uri={}, response=\"{response}\", algorithm={}",
            quote(username),
            quote(&self.realm),
            quote(&self.nonce),
            quote(uri),
            self.algorithm.name()
        );
        if self.qop_auth {
            s.push_str(&format!(
                ", qop=auth, nc=00000001, cnonce={}",
                quote(cnonce)
            ));
        }
        if let Some(o) = &self.opaque {
            s.push_str(&format!(", opaque={}", quote(o)));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2617_md5_vector() {
        let v = r#"Digest username="Mufasa",
                 realm="testrealm@host.com",
                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                 uri="/dir/index.html",
                 qop=auth,
                 nc=00000001,
                 cnonce="0a4f113b",
                 response="6629fae49393a05397450978507c4ef1",
                 opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let r = parse_authorization(v).unwrap();
        assert_eq!(r.algorithm, Algorithm::Md5);
        assert_eq!(
            r.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        assert!(verify(&r, "GET", "Circle Of Life"));
        assert!(!verify(&r, "GET", "Circle of Life"));
        assert!(!verify(&r, "POST", "Circle Of Life"));
    }

    #[test]
    fn rfc7616_vectors() {
        let n = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
        let c = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        for (alg, resp) in [
            (
                "SHA-256",
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ] {
            let v = format!(
                "Digest username=\"Mufasa\", realm=\"http-auth@example.org\", uri=\"/dir/index.html\", \
                 algorithm={alg}, nonce=\"{n}\", nc=00000001, cnonce=\"{c}\", qop=auth, \
                 response=\"{resp}\", opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""
            );
            let r = parse_authorization(&v).unwrap();
            assert_eq!(r.algorithm.name(), alg);
            assert!(verify(&r, "GET", "Circle of Life"), "{alg}");
            let mut upper = r.clone();
            upper.response = resp.to_ascii_uppercase();
            assert!(verify(&upper, "GET", "Circle of Life"));
        }
    }

    #[test]
    fn rfc2069_form_without_qop() {
        let mut r = DigestResponse {
            username: "abcdefghij12".into(),
            realm: "tollgate".into(),
            nonce: "n".into(),
            uri: "sip:+1415@edge".into(),
            response: String::new(),
            algorithm: Algorithm::Md5,
            cnonce: None,
            nc: None,
            qop: None,
            opaque: None,
        };
        let ha1 = Algorithm::Md5.hex_hash(b"abcdefghij12:tollgate:pw");
        let ha2 = Algorithm::Md5.hex_hash(b"INVITE:sip:+1415@edge");
        r.response = Algorithm::Md5.hex_hash(format!("{ha1}:n:{ha2}").as_bytes());
        assert!(verify(&r, "INVITE", "pw"));
        r.qop = Some("auth-int".into());
        r.nc = Some("1".into());
        r.cnonce = Some("c".into());
        assert!(!verify(&r, "INVITE", "pw"));
    }

    #[test]
    fn parser_edge_cases() {
        let r = parse_authorization(
            "digest  response = \"AB\" ,username=\"a\\\"b\",realm=r, nonce=\"x,y\",uri=sip:a@b;transport=udp",
        )
        .unwrap();
        assert_eq!(r.username, "a\"b");
        assert_eq!(r.realm, "r");
        assert_eq!(r.nonce, "x,y");
        assert_eq!(r.uri, "sip:a@b;transport=udp");
        assert_eq!(r.response, "AB");
        let bad = [
            "",
            "Digest",
            "Bearer abc",
            "Digest username=\"a\"",
            "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\"",
            "Digest username=\"a\", username=\"b\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"",
            "Digest username=\"a, realm=\"r\"",
            "Digest username=\"a\" realm=\"r\"",
            "Digest =x",
            "Digest username=",
            "Digest username=\"a\\",
            "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\", qop=auth",
            "Digest ,,,",
        ];
        for b in bad {
            assert!(parse_authorization(b).is_err(), "{b:?}");
        }
        assert_eq!(
            parse_authorization(
                "Digest username=a, realm=r, nonce=n, uri=u, response=x, algorithm=SHA-512"
            ),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert!(parse_authorization(&"Digest a=".repeat(1000)).is_err());
        // Garbage never panics.
        let mut seed = 0x1234_5678u32;
        let alphabet: Vec<char> = "Digest =,\"\\ aé\t\r\nusernamerealm".chars().collect();
        for _ in 0..2000 {
            let len = (seed % 60) as usize;
            let s: String = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    alphabet[(seed >> 16) as usize % alphabet.len()]
                })
                .collect();
            let _ = parse_authorization(&s);
        }
    }

    #[test]
    fn challenge_format() {
        assert_eq!(
            challenge("tollgate", Algorithm::Md5, "abc"),
            "Digest realm=\"tollgate\", nonce=\"abc\", algorithm=MD5, qop=\"auth\""
        );
        assert_eq!(
            challenge_with("a\"b", Algorithm::Sha256, "n", true),
            "Digest realm=\"a\\\"b\", nonce=\"n\", algorithm=SHA-256, qop=\"auth\", stale=true"
        );
    }

    #[test]
    fn nonce_lifecycle() {
        let iss = NonceIssuer::new([7; 32], 300);
        let n = iss.issue(1000);
        assert_ne!(n, iss.issue(1000), "random part differs");
        assert_eq!(iss.check(&n, 1000), Ok(1300));
        assert_eq!(iss.check(&n, 1299), Ok(1300));
        assert_eq!(iss.check(&n, 1300), Err(DigestError::StaleNonce));
        assert_eq!(iss.authentic(&n), Ok(1300));
        // Another secret.
        let other = NonceIssuer::new([8; 32], 300);
        assert_eq!(other.check(&n, 1000), Err(DigestError::BadNonce));
        // Tamper: move the timestamp forward.
        let mut raw = URL_SAFE_NO_PAD.decode(&n).unwrap();
        raw[7] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(iss.check(&tampered, 1000), Err(DigestError::BadNonce));
        for g in [
            "",
            "abc",
            &n[..n.len() - 1],
            &format!("{n}A"),
            &"!".repeat(n.len()),
        ] {
            assert_eq!(iss.check(g, 1000), Err(DigestError::BadNonce), "{g:?}");
        }
    }

    #[test]
    fn debug_hides_response() {
        let r = parse_authorization(
            "Digest username=a, realm=r, nonce=n, uri=u, response=deadbeefcafe",
        )
        .unwrap();
        assert!(!format!("{r:?}").contains("deadbeefcafe"));
    }

    #[test]
    fn a_challenge_from_a_peer_is_answered_so_that_it_verifies() {
        for (text, qop) in [
            ("Digest realm=\"carrier\", nonce=\"abc\", algorithm=MD5, qop=\"auth,auth-int\", opaque=\"o1\"", true),
            ("Digest nonce=\"n2\", realm=\"carrier\"", false),
            ("digest realm=\"c\", nonce=\"n3\", algorithm=SHA-256, qop=auth", true),
        ] {
            let ch = parse_challenge(text).unwrap();
            assert_eq!(ch.qop_auth, qop, "{text}");
            let value = ch.authorization("trunk1", "s3cret", "INVITE", "sip:+4420@gw", "cn1");
            let resp = parse_authorization(&value).unwrap();
            assert_eq!(resp.realm, ch.realm);
            assert_eq!(resp.opaque, ch.opaque);
            assert!(verify(&resp, "INVITE", "s3cret"), "{value}");
            assert!(!verify(&resp, "INVITE", "other"), "{value}");
        }
        for bad in [
            "Basic realm=\"x\"",
            "Digest realm=\"x\"",
            "Digest realm=\"x\", nonce=\"n\", qop=\"auth-int\"",
            "Digest realm=\"x\", nonce=\"n\", algorithm=MD5-sess",
            "Digest realm=\"x\", realm=\"y\", nonce=\"n\"",
            "Digest",
        ] {
            assert!(parse_challenge(bad).is_err(), "{bad}");
        }
    }
}
