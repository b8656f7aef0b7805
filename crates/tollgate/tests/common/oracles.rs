//! Oracles independent of the product: hashing, HMAC, base64url, JWT and
//! digest answers, JSON, Prometheus scraping and metric sums, [`poll`].

use super::*;

// ---------------------------------------------------------------------------
// Crypto (independent of the product)
// ---------------------------------------------------------------------------

pub fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub fn md5(data: &[u8]) -> [u8; 16] {
    use md5::Digest as _;
    md5::Md5::digest(data).into()
}

pub fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Lenient base64url: padding optional, the standard alphabet's `+` and `/`
/// accepted too, non-zero trailing bits ignored (as the product's peers may
/// send them).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let s: String = s
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    LENIENT.decode(s).ok()
}

/// HMAC-SHA256(key = full API key, msg = "tollgate-sip-token-v1").
pub fn token_signing_key(api_key: &str) -> [u8; 32] {
    hmac_sha256(api_key.as_bytes(), b"tollgate-sip-token-v1")
}

/// Lowercase hex HMAC-SHA256(key = full API key, msg = "tollgate-sip-digest-v1").
pub fn digest_password(api_key: &str) -> String {
    hex(&hmac_sha256(api_key.as_bytes(), b"tollgate-sip-digest-v1"))
}

/// Compact JWS with the given raw header and payload JSON, HS256 over `key`.
pub fn jwt_sign_raw(header_json: &str, payload_json: &str, key: &[u8]) -> String {
    let si = format!(
        "{}.{}",
        b64url(header_json.as_bytes()),
        b64url(payload_json.as_bytes())
    );
    let sig = hmac_sha256(key, si.as_bytes());
    format!("{si}.{}", b64url(&sig))
}

/// A spec token signed with `api_key`'s signing key, `kid` = its id.
pub fn jwt_for(api_key: &str, payload_json: &str) -> String {
    let header = format!(
        "{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"{}\"}}",
        key_id(api_key)
    );
    jwt_sign_raw(&header, payload_json, &token_signing_key(api_key))
}

/// Standard claims: iat/exp as given, fresh jti, to/from.
pub fn claims(iat: i64, exp: i64, to: &str, from: &str) -> String {
    format!(
        "{{\"iat\":{iat},\"exp\":{exp},\"jti\":\"{}\",\"to\":\"{to}\",\"from\":\"{from}\"}}",
        unique("jti-")
    )
}

/// Decode the (header, payload) JSON of a compact JWT.
pub fn jwt_parts(token: &str) -> (Json, Json, Vec<u8>) {
    let p: Vec<&str> = token.split('.').collect();
    assert_eq!(p.len(), 3, "not a compact JWS: {token}");
    let h = String::from_utf8(b64url_decode(p[0]).expect("header b64url")).expect("header utf8");
    let c = String::from_utf8(b64url_decode(p[1]).expect("payload b64url")).expect("payload utf8");
    (
        Json::parse(&h).expect("header JSON"),
        Json::parse(&c).expect("payload JSON"),
        b64url_decode(p[2]).expect("sig b64url"),
    )
}

/// RFC 2617/8760 digest response with qop=auth.
pub fn digest_response(
    alg: &str,
    user: &str,
    realm: &str,
    pass: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    nc: &str,
    cnonce: &str,
) -> String {
    let h = |s: String| -> String {
        if alg.eq_ignore_ascii_case("SHA-256") {
            hex(&sha256(s.as_bytes()))
        } else {
            hex(&md5(s.as_bytes()))
        }
    };
    let ha1 = h(format!("{user}:{realm}:{pass}"));
    let ha2 = h(format!("{method}:{uri}"));
    h(format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
}

/// `Authorization: Digest ...` value answering `challenge` params.
pub fn digest_authorization(
    ch: &HashMap<String, String>,
    user: &str,
    pass: &str,
    method: &str,
    uri: &str,
    nc: &str,
    cnonce: &str,
) -> String {
    let alg = ch.get("algorithm").cloned().unwrap_or_else(|| "MD5".into());
    let realm = ch.get("realm").cloned().unwrap_or_default();
    let nonce = ch.get("nonce").cloned().unwrap_or_default();
    let resp = digest_response(&alg, user, &realm, pass, method, uri, &nonce, nc, cnonce);
    let mut v = format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", algorithm={alg}, qop=auth, nc={nc}, cnonce=\"{cnonce}\""
    );
    if let Some(o) = ch.get("opaque") {
        v.push_str(&format!(", opaque=\"{o}\""));
    }
    v
}

// ---------------------------------------------------------------------------
// JSON: serde_json's Value, with the accessors the tests use
// ---------------------------------------------------------------------------

/// A JSON value (`serde_json::Value`: match on `Json::Bool`, `Json::String`,
/// ...; `get(k)` is Value's own). [`JsonExt`] adds `Json::parse`, `str` and
/// `int`.
pub type Json = serde_json::Value;

/// What the tests ask of a [`Json`] beyond `serde_json::Value`'s own API.
pub trait JsonExt: Sized {
    /// Parses one JSON text (surrounding whitespace allowed); `None` if it
    /// is not valid JSON.
    fn parse(s: &str) -> Option<Self>;
    /// The string member `k` of an object.
    fn str(&self, k: &str) -> Option<&str>;
    /// The integral member `k` of an object (`5` or `5.0`).
    fn int(&self, k: &str) -> Option<i64>;
}

impl JsonExt for Json {
    fn parse(s: &str) -> Option<Json> {
        serde_json::from_str(s).ok()
    }
    fn str(&self, k: &str) -> Option<&str> {
        self.get(k)?.as_str()
    }
    fn int(&self, k: &str) -> Option<i64> {
        let v = self.get(k)?;
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "")
}

/// Plain HTTP/1.0 request with no body; `headers` are extra header lines,
/// each ending in CRLF. Returns (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    http_request_with_body(addr, method, path, headers, "")
}

/// [`http_request`] with a request body (`Content-Length` set from it).
pub fn http_request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = vec![];
    s.read_to_end(&mut buf).expect("read http response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

pub fn scrape(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "GET /metrics -> {code}: {body}");
    body
}

/// Parse one Prometheus sample line into (name, labels, value).
pub fn parse_sample(line: &str) -> Option<(String, Vec<(String, String)>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name_labels, value) = if let Some(close) = line.rfind('}') {
        (&line[..=close], line[close + 1..].trim())
    } else {
        let (a, b) = line.split_once(char::is_whitespace)?;
        (a, b.trim())
    };
    let value: f64 = value.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match name_labels.find('{') {
        Some(p) => (
            &name_labels[..p],
            &name_labels[p + 1..name_labels.len() - 1],
        ),
        None => (name_labels, ""),
    };
    let mut l = vec![];
    for part in split_labels(labels) {
        if let Some((k, v)) = part.split_once('=') {
            l.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
        }
    }
    Some((name.to_string(), l, value))
}

fn split_labels(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut inq = false;
    for c in s.chars() {
        match c {
            '"' => {
                inq = !inq;
                cur.push(c)
            }
            ',' if !inq => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Sum of all samples of `name` whose labels include every pair in `want`.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for l in text.lines() {
        if let Some((n, labels, v)) = parse_sample(l) {
            if n == name
                && want
                    .iter()
                    .all(|(k, wv)| labels.iter().any(|(lk, lv)| lk == k && lv == wv))
            {
                found = true;
                sum += v;
            }
        }
    }
    found.then_some(sum)
}

/// Poll `f` every 20 ms until it returns Some or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
