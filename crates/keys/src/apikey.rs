//! The API key format (SPEC §2) and the values derived from a key (SPEC §3, §7).
//!
//! A key is `tg_sk_<id>_<secret>` (secret key) or `tg_pk_<id>_<secret>` (public
//! key): `<id>` is exactly 12 characters `[a-z0-9]`, `<secret>` at least 32
//! characters `[A-Za-z0-9]`. The edge never stores a key; it stores only the
//! derivations below.

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
/// Length of the secret of keys made by [`ApiKey::generate`].
pub const GENERATED_SECRET_LEN: usize = 40;

const SIGNING_KEY_LABEL: &[u8] = b"tollgate-sip-token-v1";
const DIGEST_PASSWORD_LABEL: &[u8] = b"tollgate-sip-digest-v1";
const WEBHOOK_LABEL: &[u8] = b"tollgate-webhook-v1";

const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

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
        let secret = random_string(&rng, SECRET_ALPHABET, GENERATED_SECRET_LEN)?;
        Ok(ApiKey {
            full: format!("{}{}_{}", kind.prefix(), id, secret),
            kind,
        })
    }

    /// A new secret for an existing id (used by roll). `id` must be valid.
    pub(crate) fn try_generate_with_id(kind: KeyKind, id: &str) -> Result<ApiKey> {
        if !is_valid_id(id) {
            return Err(KeyError::Malformed);
        }
        let rng = SystemRandom::new();
        let secret = random_string(&rng, SECRET_ALPHABET, GENERATED_SECRET_LEN)?;
        Ok(ApiKey {
            full: format!("{}{}_{}", kind.prefix(), id, secret),
            kind,
        })
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
        }
        assert_ne!(
            ApiKey::generate(KeyKind::Secret).id(),
            ApiKey::generate(KeyKind::Secret).id()
        );
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
