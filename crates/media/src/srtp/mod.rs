//! SRTP and SRTCP (RFC 3711, RFC 7714) behind a provider trait.
//!
//! The relay holds one [`SrtpTransform`] per direction of a leg. Two
//! implementations sit side by side, as rustls does with its crypto providers:
//!
//! - [`native`]: in place over RustCrypto AES-CTR / HMAC-SHA1 and ring's
//!   AES-128-GCM; key schedules cached per context, no allocation per packet
//!   once a stream runs. This is what the relay uses.
//! - [`reference`]: a wrapper over `webrtc-srtp` 0.17, kept as the reference
//!   implementation for differential tests and the benchmark baseline.

pub mod kdf;
pub mod native;
pub mod reference;
pub(crate) mod window;

use bytes::BytesMut;

/// An SRTP protection profile (crypto suite).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// `AES_CM_128_HMAC_SHA1_80` (RFC 3711, RFC 4568): 80-bit RTP tag.
    AesCm128HmacSha1_80,
    /// `AES_CM_128_HMAC_SHA1_32`: 32-bit RTP tag, 80-bit RTCP tag.
    AesCm128HmacSha1_32,
    /// `AEAD_AES_128_GCM` (RFC 7714): 128-bit AEAD tag.
    AeadAes128Gcm,
}

impl Suite {
    /// All suites, in our order of preference.
    pub const ALL: [Suite; 3] = [
        Suite::AesCm128HmacSha1_80,
        Suite::AeadAes128Gcm,
        Suite::AesCm128HmacSha1_32,
    ];

    /// Master key length in bytes.
    pub const fn key_len(self) -> usize {
        16
    }

    /// Master salt length in bytes.
    pub const fn salt_len(self) -> usize {
        match self {
            Suite::AesCm128HmacSha1_80 | Suite::AesCm128HmacSha1_32 => 14,
            Suite::AeadAes128Gcm => 12,
        }
    }

    /// Bytes appended to an RTP packet by `protect_rtp`.
    pub const fn rtp_overhead(self) -> usize {
        match self {
            Suite::AesCm128HmacSha1_80 => 10,
            Suite::AesCm128HmacSha1_32 => 4,
            Suite::AeadAes128Gcm => 16,
        }
    }

    /// Bytes appended to an RTCP packet by `protect_rtcp` (tag + SRTCP index).
    pub const fn rtcp_overhead(self) -> usize {
        match self {
            Suite::AesCm128HmacSha1_80 | Suite::AesCm128HmacSha1_32 => 10 + 4,
            Suite::AeadAes128Gcm => 16 + 4,
        }
    }

    /// The RFC 4568 SDES name (`a=crypto` suite token).
    pub const fn sdes_name(self) -> &'static str {
        match self {
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
            Suite::AeadAes128Gcm => "AEAD_AES_128_GCM",
        }
    }

    /// Parses an RFC 4568 suite token (case-sensitive, as the RFC registers them).
    pub fn from_sdes_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.sdes_name() == name)
    }
}

/// Master key and salt for one direction of one leg.
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    /// 16 bytes.
    pub master_key: Vec<u8>,
    /// 14 bytes for AES-CM, 12 for GCM.
    pub master_salt: Vec<u8>,
}

impl std::fmt::Debug for SrtpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SrtpKeys")
            .field(
                "master_key",
                &format_args!("<{} bytes>", self.master_key.len()),
            )
            .field(
                "master_salt",
                &format_args!("<{} bytes>", self.master_salt.len()),
            )
            .finish()
    }
}

impl SrtpKeys {
    /// Fresh random keys for `suite` from the system CSPRNG (`ring::rand`).
    pub fn generate(suite: Suite) -> Result<SrtpKeys, SrtpError> {
        use ring::rand::SecureRandom;
        let rng = ring::rand::SystemRandom::new();
        let mut master_key = vec![0u8; suite.key_len()];
        let mut master_salt = vec![0u8; suite.salt_len()];
        rng.fill(&mut master_key).map_err(|_| SrtpError::Rng)?;
        rng.fill(&mut master_salt).map_err(|_| SrtpError::Rng)?;
        Ok(SrtpKeys {
            master_key,
            master_salt,
        })
    }

    /// `key || salt`, the RFC 4568 inline key material.
    pub fn concat(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.master_key.len() + self.master_salt.len());
        v.extend_from_slice(&self.master_key);
        v.extend_from_slice(&self.master_salt);
        v
    }

    /// Splits RFC 4568 inline key material for `suite`.
    pub fn split(suite: Suite, key_salt: &[u8]) -> Result<SrtpKeys, SrtpError> {
        if key_salt.len() != suite.key_len() + suite.salt_len() {
            return Err(SrtpError::KeyLength);
        }
        let (k, s) = key_salt.split_at(suite.key_len());
        Ok(SrtpKeys {
            master_key: k.to_vec(),
            master_salt: s.to_vec(),
        })
    }

    fn check(&self, suite: Suite) -> Result<(), SrtpError> {
        if self.master_key.len() != suite.key_len() || self.master_salt.len() != suite.salt_len() {
            return Err(SrtpError::KeyLength);
        }
        Ok(())
    }
}

/// Which way a context works: SRTP contexts are one-way (RFC 3711 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We protect (encrypt and tag) what we send.
    Outbound,
    /// We unprotect (check and decrypt) what we receive.
    Inbound,
}

/// What went wrong with a packet or a context. Every variant is a reason to
/// drop the packet; none is a reason to tear the call down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SrtpError {
    #[error("master key or salt has the wrong length for the suite")]
    KeyLength,
    #[error("packet too short")]
    TooShort,
    #[error("not an RTP/RTCP version 2 packet")]
    BadVersion,
    #[error("authentication tag does not match")]
    AuthFailed,
    #[error("packet replayed or older than the replay window")]
    Replayed,
    #[error("packet index exhausted: the keys must be changed")]
    IndexExhausted,
    #[error("unencrypted SRTCP is not supported with this suite")]
    UnencryptedSrtcp,
    #[error("context used in the wrong direction")]
    WrongDirection,
    #[error("random number generator failed")]
    Rng,
    #[error("reference implementation: {0}")]
    Reference(String),
}

/// The SRTP transform of one direction of one leg.
///
/// Every method works on `buf` in place: protect appends the tag (and the SRTCP
/// index) to what `buf` holds, unprotect checks and strips them. When `buf`
/// has the spare capacity ([`Suite::rtp_overhead`], [`Suite::rtcp_overhead`])
/// nothing is allocated. On error `buf` may hold garbage and must be dropped.
pub trait SrtpTransform: Send {
    /// RTP -> SRTP.
    fn protect_rtp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError>;
    /// SRTP -> RTP: checks the tag (constant time) and the replay window
    /// (per SSRC), estimates the ROC (RFC 3711 §3.3.1), strips the tag.
    fn unprotect_rtp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError>;
    /// RTCP -> SRTCP (a compound packet; keyed on the first packet's SSRC).
    fn protect_rtcp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError>;
    /// SRTCP -> RTCP.
    fn unprotect_rtcp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError>;
}

/// A source of SRTP contexts (the analogue of rustls' `CryptoProvider`).
pub trait SrtpProvider: Send + Sync {
    /// A new context for one direction.
    fn new_context(
        &self,
        suite: Suite,
        keys: &SrtpKeys,
        direction: Direction,
    ) -> Result<Box<dyn SrtpTransform>, SrtpError>;
}

/// The in-place provider the relay uses.
#[derive(Debug, Default, Clone, Copy)]
pub struct NativeProvider;

impl SrtpProvider for NativeProvider {
    fn new_context(
        &self,
        suite: Suite,
        keys: &SrtpKeys,
        direction: Direction,
    ) -> Result<Box<dyn SrtpTransform>, SrtpError> {
        Ok(Box::new(native::Context::new(suite, keys, direction)?))
    }
}

/// The `webrtc-srtp` provider (reference, baseline).
#[derive(Debug, Default, Clone, Copy)]
pub struct ReferenceProvider;

impl SrtpProvider for ReferenceProvider {
    fn new_context(
        &self,
        suite: Suite,
        keys: &SrtpKeys,
        direction: Direction,
    ) -> Result<Box<dyn SrtpTransform>, SrtpError> {
        Ok(Box::new(reference::Context::new(suite, keys, direction)?))
    }
}

/// A context from the native (in-place) provider.
pub fn new_context(
    suite: Suite,
    keys: &SrtpKeys,
    direction: Direction,
) -> Result<Box<dyn SrtpTransform>, SrtpError> {
    NativeProvider.new_context(suite, keys, direction)
}

/// Length of the RTP header (fixed part, CSRCs, extension) of `pkt`.
pub(crate) fn rtp_header_len(pkt: &[u8]) -> Result<usize, SrtpError> {
    if pkt.len() < 12 {
        return Err(SrtpError::TooShort);
    }
    if pkt[0] >> 6 != 2 {
        return Err(SrtpError::BadVersion);
    }
    let mut len = 12 + 4 * usize::from(pkt[0] & 0x0f);
    if pkt[0] & 0x10 != 0 {
        if pkt.len() < len + 4 {
            return Err(SrtpError::TooShort);
        }
        len += 4 + 4 * usize::from(u16::from_be_bytes([pkt[len + 2], pkt[len + 3]]));
    }
    if len > pkt.len() {
        return Err(SrtpError::TooShort);
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_len() {
        let mut p = vec![0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(rtp_header_len(&p), Ok(12));
        p[0] = 0x82; // two CSRCs
        assert_eq!(rtp_header_len(&p), Err(SrtpError::TooShort));
        p.extend_from_slice(&[0; 8]);
        assert_eq!(rtp_header_len(&p), Ok(20));
        p[0] = 0x92; // and an extension of one word
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]);
        assert_eq!(rtp_header_len(&p), Ok(28));
        p[0] = 0x12;
        assert_eq!(rtp_header_len(&p), Err(SrtpError::BadVersion));
    }

    #[test]
    fn keys_debug_hides_material() {
        let k = SrtpKeys::generate(Suite::AesCm128HmacSha1_80).unwrap();
        let s = format!("{k:?}");
        assert!(s.contains("<16 bytes>") && s.contains("<14 bytes>"));
        assert_eq!(
            SrtpKeys::split(Suite::AesCm128HmacSha1_80, &k.concat()).unwrap(),
            k
        );
        assert_eq!(
            SrtpKeys::split(Suite::AeadAes128Gcm, &k.concat()),
            Err(SrtpError::KeyLength)
        );
    }
}
