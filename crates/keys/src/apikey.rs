//! The API key format (SPEC §2) and the values derived from a key (SPEC §3, §7).
//!
//! A key is `tg_sk_<id>_<secret>` (secret key) or `tg_pk_<id>_<secret>` (public
//! key): `<id>` is exactly 12 characters `[a-z0-9]`, `<secret>` at least 32
//! characters `[A-Za-z0-9]`. The edge never stores a key; it stores only the
//! derivations below.
//!
//! Leak resistance (SPEC §2): the secret of a key made here ends in a
//! 6-character checksum, the base62 CRC32 of everything before it (GitHub's
//! token scheme), so a secret scanner can tell a real key from look-alikes
//! offline ([`ApiKey::has_valid_checksum`], `docs/secret-scanning/`). Parsing
//! and verification never depend on it: keys made before checksums keep working.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::{KeyError, Result};

/// Length of a key id.
pub const ID_LEN: usize = 12;
/// Minimum length of a key secret accepted by [`ApiKey::parse`].
pub const MIN_SECRET_LEN: usize = 32;
/// Maximum length of a key secret accepted by [`ApiKey::parse`].
pub const MAX_SECRET_LEN: usize = 256;
/// Random characters in the secret of keys made by [`ApiKey::generate`].
pub const GENERATED_RANDOM_LEN: usize = 40;
/// Length of the checksum that ends a generated secret ([`checksum`]).
pub const CHECKSUM_LEN: usize = 6;
/// Length of the secret of keys made by [`ApiKey::generate`]: the random
/// part, then the checksum.
pub const GENERATED_SECRET_LEN: usize = GENERATED_RANDOM_LEN + CHECKSUM_LEN;

const SIGNING_KEY_LABEL: &[u8] = b"tollgate-sip-token-v1";
const DIGEST_PASSWORD_LABEL: &[u8] = b"tollgate-sip-digest-v1";
const WEBHOOK_LABEL: &[u8] = b"tollgate-webhook-v1";

const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Digits of the checksum, in value order (GitHub's base62).
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Which kind of key: secret (server side, full power) or public (calls only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// `tg_sk_…`: server-side key, all scopes.
    Secret,
    /// `tg_pk_…`: client-side key, may only place calls to its allow-list.
    Public,
}

impl KeyKind {
    /// The key string prefix, `"tg_sk_"` or `"tg_pk_"`.
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::Secret => "tg_sk_",
            KeyKind::Public => "tg_pk_",
        }
    }

    /// `"secret"` or `"public"` (same as the serde form).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Secret => "secret",
            KeyKind::Public => "public",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed, well-formed API key, holding the full key string.
///
/// `Debug` and `Display` redact the secret: only `expose()` reveals it.
#[derive(Clone)]
pub struct ApiKey {
    full: String,
    kind: KeyKind,
}

impl ApiKey {
    /// Parses `tg_sk_<id>_<secret>` or `tg_pk_<id>_<secret>`.
    ///
    /// Surrounding whitespace is not accepted. The error never contains the input.
    pub fn parse(s: &str) -> Result<ApiKey> {
        let (kind, rest) = if let Some(rest) = s.strip_prefix(KeyKind::Secret.prefix()) {
            (KeyKind::Secret, rest)
        } else if let Some(rest) = s.strip_prefix(KeyKind::Public.prefix()) {
            (KeyKind::Public, rest)
        } else {
            return Err(KeyError::Malformed);
        };
        let b = rest.as_bytes();
        let secret_len = b.len().saturating_sub(ID_LEN + 1);
        if b.len() < ID_LEN + 1 + MIN_SECRET_LEN
            || secret_len > MAX_SECRET_LEN
            || !b[..ID_LEN].iter().all(is_id_byte)
            || b[ID_LEN] != b'_'
            || !b[ID_LEN + 1..].iter().all(u8::is_ascii_alphanumeric)
        {
            return Err(KeyError::Malformed);
        }
        Ok(ApiKey {
            full: s.to_owned(),
            kind,
        })
    }

    /// Generates a new key of `kind` from the system CSPRNG: a 12-character id
    /// and a 40-character secret, each character drawn uniformly (rejection
    /// sampling, no modulo bias).
    ///
    /// # Panics
    /// Only if the operating system's random generator fails; see
    /// [`ApiKey::try_generate`] for the fallible form.
    pub fn generate(kind: KeyKind) -> ApiKey {
        Self::try_generate(kind).expect("system random number generator failed")
    }

    /// Fallible form of [`ApiKey::generate`].
    pub fn try_generate(kind: KeyKind) -> Result<ApiKey> {
        let rng = SystemRandom::new();
        let id = random_string(&rng, ID_ALPHABET, ID_LEN)?;
        Self::generate_with(&rng, kind, &id)
    }

    /// A new secret for an existing id (used by roll). `id` must be valid.
    pub(crate) fn try_generate_with_id(kind: KeyKind, id: &str) -> Result<ApiKey> {
        if !is_valid_id(id) {
            return Err(KeyError::Malformed);
        }
        Self::generate_with(&SystemRandom::new(), kind, id)
    }

    /// `<prefix><id>_<40 random><checksum of all before it>`.
    fn generate_with(rng: &SystemRandom, kind: KeyKind, id: &str) -> Result<ApiKey> {
        let random = random_string(rng, SECRET_ALPHABET, GENERATED_RANDOM_LEN)?;
        let mut full = format!("{}{}_{}", kind.prefix(), id, random);
        let sum = checksum(&full);
        full.push_str(&sum);
        Ok(ApiKey { full, kind })
    }

    /// True if the secret ends in the checksum of the rest of the key
    /// ([`checksum`]). Keys made before checksums have none: they are still
    /// valid keys, and nothing but `tollgate keys check` and scanners look at this.
    pub fn has_valid_checksum(&self) -> bool {
        let (rest, sum) = self.full.split_at(self.full.len() - CHECKSUM_LEN);
        // Not secret-dependent in a way worth hiding (the checksum is public
        // knowledge of the string), but cheap to compare in constant time.
        crate::ct::eq(checksum(rest).as_bytes(), sum.as_bytes())
    }

    /// The key id (12 characters `[a-z0-9]`).
    pub fn id(&self) -> &str {
        &self.full[6..6 + ID_LEN]
    }

    /// Secret or public.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The full key string, secret included. Show it to the user once; never log it.
    pub fn expose(&self) -> &str {
        &self.full
    }

    /// [`signing_key`] of this key.
    pub fn signing_key(&self) -> [u8; 32] {
        signing_key(&self.full)
    }

    /// [`digest_password`] of this key.
    pub fn digest_password(&self) -> String {
        digest_password(&self.full)
    }

    /// [`webhook_secret`] of this key.
    pub fn webhook_secret(&self) -> String {
        webhook_secret(&self.full)
    }

    /// [`key_hash`] of this key.
    pub fn key_hash(&self) -> [u8; 32] {
        key_hash(&self.full)
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        crate::ct::eq(self.full.as_bytes(), other.full.as_bytes())
    }
}

impl Eq for ApiKey {}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("kind", &self.kind)
            .field("id", &self.id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}_<redacted>", self.kind.prefix(), self.id())
    }
}

impl std::str::FromStr for ApiKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self> {
        ApiKey::parse(s)
    }
}

/// True if `id` is a syntactically valid key id (12 characters `[a-z0-9]`).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.as_bytes().iter().all(is_id_byte)
}

fn is_id_byte(c: &u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn random_string(rng: &SystemRandom, alphabet: &[u8], len: usize) -> Result<String> {
    // Accept a byte only below the largest multiple of the alphabet size, so
    // that `b % n` is uniform.
    let n = alphabet.len();
    let limit = 256 - (256 % n);
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf).map_err(|_| KeyError::Rng)?;
        for &b in &buf {
            if (b as usize) < limit {
                out.push(alphabet[b as usize % n] as char);
                if out.len() == len {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// The 6-character checksum of `rest` (SPEC §2, GitHub's token scheme): the
/// CRC-32 (IEEE 802.3, as zlib's `crc32`) of its UTF-8 bytes, in base62 with
/// digits `0-9A-Za-z`, left-padded with `0` to 6 characters.
pub fn checksum(rest: &str) -> String {
    let mut n = crc32(rest.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    // 62^6 > 2^32: every CRC fits, so `n` is 0 here.
    out.iter().map(|&b| b as char).collect()
}

/// CRC-32, reflected polynomial 0xEDB88320 (zlib, PNG, GitHub tokens).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, msg);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// JWT signing key: HMAC-SHA256(key = full key string, msg = `tollgate-sip-token-v1`).
pub fn signing_key(full: &str) -> [u8; 32] {
    hmac_sha256(full.as_bytes(), SIGNING_KEY_LABEL)
}

/// Digest password: lowercase hex of HMAC-SHA256(full key, `tollgate-sip-digest-v1`).
pub fn digest_password(full: &str) -> String {
    hex::encode(hmac_sha256(full.as_bytes(), DIGEST_PASSWORD_LABEL))
}

/// Webhook secret: lowercase hex of HMAC-SHA256(full key, `tollgate-webhook-v1`).
pub fn webhook_secret(full: &str) -> String {
    hex::encode(hmac_sha256(full.as_bytes(), WEBHOOK_LABEL))
}

/// SHA-256 of the full key string, stored to verify admin-API bearer keys.
pub fn key_hash(full: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, full.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123";
    /// `checksum("123456789")` and `checksum(KEY without its last 6)`, from Python's
    /// `zlib.crc32` and a base62 loop (not from this code).
    const CHECKSUM_123456789: &str = "3jZRME";
    const CHECKSUM_KEY_REST: &str = "4OCyWP";

    #[test]
    fn parse_valid() {
        let k = ApiKey::parse(KEY).unwrap();
        assert_eq!(k.id(), "abcdefghij12");
        assert_eq!(k.kind(), KeyKind::Secret);
        assert_eq!(k.expose(), KEY);
        let p = ApiKey::parse(&KEY.replace("tg_sk_", "tg_pk_")).unwrap();
        assert_eq!(p.kind(), KeyKind::Public);
    }

    #[test]
    fn parse_invalid() {
        let bad = [
            "",
            "tg_sk_",
            "tg_xk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
            "tg_sk_abcdefghij1_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef01234", // id 11
            "tg_sk_Abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123", // upper id
            "tg_sk_abcdefghij12-ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123", // separator
            "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcde",      // secret 31
            "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef012_", // bad char
            " tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
            "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123\n",
            "tg_sk_abcdéfghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
            "tg_sk_abcdefghij12_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef012é",
            "tg_sk_ééééééé_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
            "tg_sk_abcdefghijkl\u{e9}ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
            "tg_sk_abcdefghijk\u{e9}ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123",
        ];
        for b in bad {
            assert!(ApiKey::parse(b).is_err(), "{b:?}");
        }
        let long = format!("tg_sk_abcdefghij12_{}", "a".repeat(MAX_SECRET_LEN + 1));
        assert!(ApiKey::parse(&long).is_err());
        let ok = format!("tg_sk_abcdefghij12_{}", "a".repeat(MAX_SECRET_LEN));
        assert!(ApiKey::parse(&ok).is_ok());
    }

    #[test]
    fn generate_roundtrips() {
        for kind in [KeyKind::Secret, KeyKind::Public] {
            let k = ApiKey::generate(kind);
            assert_eq!(k.expose().len(), 6 + 12 + 1 + GENERATED_SECRET_LEN);
            let p = ApiKey::parse(k.expose()).unwrap();
            assert_eq!(p, k);
            assert_eq!(p.kind(), kind);
            assert!(p.has_valid_checksum(), "{p}");
            // One character changed anywhere breaks the checksum.
            let mut bad = k.expose().to_string().into_bytes();
            let i = bad.len() - CHECKSUM_LEN - 3;
            bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
            let bad = ApiKey::parse(std::str::from_utf8(&bad).unwrap()).unwrap();
            assert!(!bad.has_valid_checksum());
        }
        assert_ne!(
            ApiKey::generate(KeyKind::Secret).id(),
            ApiKey::generate(KeyKind::Secret).id()
        );
    }

    /// CRC-32 check value of the standard ("123456789" -> 0xCBF43926), and
    /// base62 checksums computed independently with
    /// `python3 -c 'import zlib; ...'` (docs/secret-scanning/tollgate_plugin.py's
    /// `checksum`).
    #[test]
    fn checksum_known_vectors() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(checksum(""), "000000");
        // Decoding the base62 digits gives the CRC back.
        let n: u64 = 0xCBF4_3926;
        let s = checksum("123456789");
        let back = s.bytes().fold(0u64, |acc, c| {
            acc * 62 + BASE62.iter().position(|&d| d == c).unwrap() as u64
        });
        assert_eq!(back, n, "{s}");
        assert_eq!(checksum("123456789"), CHECKSUM_123456789);
        assert_eq!(checksum(&KEY[..KEY.len() - 6]), CHECKSUM_KEY_REST);
        // A key from before checksums parses and is simply without one.
        let old = ApiKey::parse(KEY).unwrap();
        assert!(!old.has_valid_checksum());
        let with = format!("{}{}", &KEY[..KEY.len() - 6], CHECKSUM_KEY_REST);
        assert!(ApiKey::parse(&with).unwrap().has_valid_checksum());
    }

    #[test]
    fn debug_and_display_redact() {
        let k = ApiKey::parse(KEY).unwrap();
        let d = format!("{k:?} {k}");
        assert!(!d.contains("ABCDEFGHIJ"), "{d}");
        assert!(d.contains("abcdefghij12"));
    }

    /// Vectors computed once with
    /// `python3 -c 'import hmac,hashlib; hmac.new(KEY.encode(), LABEL.encode(), hashlib.sha256).hexdigest()'`
    /// (and `hashlib.sha256(KEY.encode()).hexdigest()` for the hash).
    #[test]
    fn derivations_match_independent_python_computation() {
        assert_eq!(
            digest_password(KEY),
            "398898886a63933e17d965366199c79828c61e4ef2bfdc4217a384b664e03398"
        );
        assert_eq!(
            webhook_secret(KEY),
            "32a7ed7245cccc0dccb3a8c8088dc2bcfc34cfd3212275ee582d55b49cfcc559"
        );
        assert_eq!(
            hex::encode(signing_key(KEY)),
            "6131b0d22e8c920736fe4e32f2c09edfe9c21c80cefbe097a36f4ba3e36b9ff1"
        );
        assert_eq!(
            hex::encode(key_hash(KEY)),
            "e97194e1f091039e377c10279014eabcc57e7e7d6097b1260d402fc4af66a11f"
        );
    }
}
