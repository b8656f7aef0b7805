//! The in-place SRTP transform: RustCrypto AES-128 in counter mode and
//! HMAC-SHA1 for the AES-CM suites, ring's AES-128-GCM for RFC 7714.
//!
//! Everything keyed is expanded once in [`Context::new`]: the AES key
//! schedules, the HMAC inner/outer pads (cloned per packet: a copy, not an
//! allocation), ring's GCM key. Per-SSRC state lives in a table sized at
//! construction. So once a stream runs, protecting or unprotecting a packet
//! allocates nothing as long as `buf` has room for the tag.

use aes::cipher::{
    generic_array::GenericArray, InnerIvInit, KeyInit, StreamCipher, StreamCipherCoreWrapper,
};
use aes::Aes128Enc;
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use super::kdf::{self, Kdf};
use super::window::{estimate_index, Streams, Window};
use super::{rtp_header_len, Direction, SrtpError, SrtpKeys, SrtpTransform, Suite};

type HmacSha1 = Hmac<Sha1>;

/// Largest SRTP index (48 bits) and SRTCP index (31 bits).
const MAX_SRTP_INDEX: u64 = (1 << 48) - 1;
const MAX_SRTCP_INDEX: u32 = 0x7fff_ffff;
const SRTCP_E_FLAG: u32 = 0x8000_0000;
const AES_CM_RTCP_TAG: usize = 10;
const GCM_TAG: usize = 16;

struct AesCm {
    rtp_tag_len: usize,
    rtp_key: Aes128Enc,
    rtcp_key: Aes128Enc,
    rtp_auth: HmacSha1,
    rtcp_auth: HmacSha1,
    rtp_salt: [u8; 14],
    rtcp_salt: [u8; 14],
}

struct Gcm {
    rtp_key: LessSafeKey,
    rtcp_key: LessSafeKey,
    rtp_salt: [u8; 12],
    rtcp_salt: [u8; 12],
}

enum Keys {
    AesCm(Box<AesCm>),
    Gcm(Box<Gcm>),
}

#[derive(Default)]
struct RtpState {
    window: Window,
}

#[derive(Default)]
struct RtcpState {
    /// Outbound: the last SRTCP index sent (the first packet gets 1, as
    /// libsrtp and webrtc-srtp do).
    last_sent: u32,
    /// Inbound: indices received.
    window: Window,
}

/// One direction's SRTP/SRTCP cryptographic context (RFC 3711 §3.2).
pub struct Context {
    suite: Suite,
    direction: Direction,
    keys: Keys,
    rtp: Streams<RtpState>,
    rtcp: Streams<RtcpState>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("native::Context")
            .field("suite", &self.suite)
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

fn derive<const N: usize>(kdf: &Kdf, label: u8) -> [u8; N] {
    let mut out = [0u8; N];
    kdf.derive(label, &mut out);
    out
}

fn gcm_key(key: &[u8; 16]) -> LessSafeKey {
    // A 16-byte key is always valid for AES-128-GCM.
    LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, key).expect("16-byte AES-128 key"))
}

impl Context {
    /// Derives the session keys (RFC 3711 §4.3) and expands them.
    pub fn new(suite: Suite, keys: &SrtpKeys, direction: Direction) -> Result<Context, SrtpError> {
        keys.check(suite)?;
        let kdf = Kdf::new(&keys.master_key, &keys.master_salt);
        let rtp_key: [u8; 16] = derive(&kdf, kdf::LABEL_SRTP_ENCRYPTION);
        let rtcp_key: [u8; 16] = derive(&kdf, kdf::LABEL_SRTCP_ENCRYPTION);
        let keys = match suite {
            Suite::AesCm128HmacSha1_80 | Suite::AesCm128HmacSha1_32 => {
                let rtp_auth: [u8; 20] = derive(&kdf, kdf::LABEL_SRTP_AUTH);
                let rtcp_auth: [u8; 20] = derive(&kdf, kdf::LABEL_SRTCP_AUTH);
                Keys::AesCm(Box::new(AesCm {
                    rtp_tag_len: suite.rtp_overhead(),
                    rtp_key: Aes128Enc::new(GenericArray::from_slice(&rtp_key)),
                    rtcp_key: Aes128Enc::new(GenericArray::from_slice(&rtcp_key)),
                    rtp_auth: <HmacSha1 as Mac>::new_from_slice(&rtp_auth)
                        .expect("HMAC takes any key"),
                    rtcp_auth: <HmacSha1 as Mac>::new_from_slice(&rtcp_auth)
                        .expect("HMAC takes any key"),
                    rtp_salt: derive(&kdf, kdf::LABEL_SRTP_SALT),
                    rtcp_salt: derive(&kdf, kdf::LABEL_SRTCP_SALT),
                }))
            }
            Suite::AeadAes128Gcm => Keys::Gcm(Box::new(Gcm {
                rtp_key: gcm_key(&rtp_key),
                rtcp_key: gcm_key(&rtcp_key),
                rtp_salt: derive(&kdf, kdf::LABEL_SRTP_SALT),
                rtcp_salt: derive(&kdf, kdf::LABEL_SRTCP_SALT),
            })),
        };
        Ok(Context {
            suite,
            direction,
            keys,
            rtp: Streams::new(),
            rtcp: Streams::new(),
        })
    }

    /// The suite this context was made for.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    fn expect(&self, d: Direction) -> Result<(), SrtpError> {
        if self.direction == d {
            Ok(())
        } else {
            Err(SrtpError::WrongDirection)
        }
    }
}

/// AES-CM IV (RFC 3711 §4.1.1): salt * 2^16 XOR SSRC * 2^64 XOR index * 2^16.
fn aes_cm_iv(salt: &[u8; 14], ssrc: u32, index: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(salt);
    for (b, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
        *b ^= s;
    }
    for (b, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
        *b ^= s;
    }
    iv
}

/// AES-128 in counter mode over `data` with a cached key schedule.
fn ctr_xor(key: &Aes128Enc, iv: &[u8; 16], data: &mut [u8]) {
    let core = ctr::CtrCore::<&Aes128Enc, ctr::flavors::Ctr128BE>::inner_iv_init(
        key,
        GenericArray::from_slice(iv),
    );
    StreamCipherCoreWrapper::from_core(core).apply_keystream(data);
}

fn hmac(auth: &HmacSha1, a: &[u8], b: &[u8]) -> [u8; 20] {
    let mut m = auth.clone();
    m.update(a);
    m.update(b);
    m.finalize().into_bytes().into()
}

/// GCM IV for SRTP (RFC 7714 §8.1): 00 00 || SSRC || ROC || SEQ, XOR salt.
fn gcm_rtp_nonce(salt: &[u8; 12], ssrc: u32, index: u64) -> Nonce {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..12].copy_from_slice(&index.to_be_bytes()[2..]);
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    Nonce::assume_unique_for_key(iv)
}

/// GCM IV for SRTCP (RFC 7714 §9.1): 00 00 || SSRC || 00 00 || 0 || index, XOR salt.
fn gcm_rtcp_nonce(salt: &[u8; 12], ssrc: u32, index: u32) -> Nonce {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&index.to_be_bytes());
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    Nonce::assume_unique_for_key(iv)
}

fn rtp_seq_ssrc(buf: &[u8]) -> (u16, u32) {
    (
        u16::from_be_bytes([buf[2], buf[3]]),
        u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
    )
}

fn rtcp_ssrc(buf: &[u8]) -> Result<u32, SrtpError> {
    if buf.len() < 8 {
        return Err(SrtpError::TooShort);
    }
    if buf[0] >> 6 != 2 {
        return Err(SrtpError::BadVersion);
    }
    Ok(u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]))
}

impl SrtpTransform for Context {
    fn protect_rtp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.expect(Direction::Outbound)?;
        let hlen = rtp_header_len(buf)?;
        let (seq, ssrc) = rtp_seq_ssrc(buf);
        let st = self.rtp.get_or_insert(ssrc);
        let index = estimate_index(st.window.highest(), seq);
        if index > MAX_SRTP_INDEX {
            return Err(SrtpError::IndexExhausted);
        }
        st.window.accept(index);
        match &self.keys {
            Keys::AesCm(k) => {
                let iv = aes_cm_iv(&k.rtp_salt, ssrc, index);
                ctr_xor(&k.rtp_key, &iv, &mut buf[hlen..]);
                let roc = ((index >> 16) as u32).to_be_bytes();
                let tag = hmac(&k.rtp_auth, buf, &roc);
                buf.extend_from_slice(&tag[..k.rtp_tag_len]);
            }
            Keys::Gcm(k) => {
                let nonce = gcm_rtp_nonce(&k.rtp_salt, ssrc, index);
                let (hdr, payload) = buf.split_at_mut(hlen);
                let tag = k
                    .rtp_key
                    .seal_in_place_separate_tag(nonce, Aad::from(&*hdr), payload)
                    .map_err(|_| SrtpError::TooShort)?;
                buf.extend_from_slice(tag.as_ref());
            }
        }
        Ok(())
    }

    fn unprotect_rtp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.expect(Direction::Inbound)?;
        let len = buf.len();
        let tag_len = self.suite.rtp_overhead();
        if len < 12 + tag_len {
            return Err(SrtpError::TooShort);
        }
        let body = len - tag_len;
        let hlen = rtp_header_len(&buf[..body])?;
        let (seq, ssrc) = rtp_seq_ssrc(buf);
        let known = self.rtp.get(ssrc).map(|s| s.window);
        let index = estimate_index(known.and_then(|w| w.highest()), seq);
        if index > MAX_SRTP_INDEX {
            return Err(SrtpError::IndexExhausted);
        }
        if let Some(w) = known {
            if !w.check(index) {
                return Err(SrtpError::Replayed);
            }
        }
        match &self.keys {
            Keys::AesCm(k) => {
                let roc = ((index >> 16) as u32).to_be_bytes();
                let expected = hmac(&k.rtp_auth, &buf[..body], &roc);
                if expected[..tag_len].ct_eq(&buf[body..]).unwrap_u8() != 1 {
                    return Err(SrtpError::AuthFailed);
                }
                buf.truncate(body);
                let iv = aes_cm_iv(&k.rtp_salt, ssrc, index);
                ctr_xor(&k.rtp_key, &iv, &mut buf[hlen..]);
            }
            Keys::Gcm(k) => {
                let nonce = gcm_rtp_nonce(&k.rtp_salt, ssrc, index);
                let (hdr, rest) = buf.split_at_mut(hlen);
                k.rtp_key
                    .open_in_place(nonce, Aad::from(&*hdr), rest)
                    .map_err(|_| SrtpError::AuthFailed)?;
                buf.truncate(body);
            }
        }
        self.rtp.get_or_insert(ssrc).window.accept(index);
        Ok(())
    }

    fn protect_rtcp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.expect(Direction::Outbound)?;
        let ssrc = rtcp_ssrc(buf)?;
        let st = self.rtcp.get_or_insert(ssrc);
        if st.last_sent >= MAX_SRTCP_INDEX {
            return Err(SrtpError::IndexExhausted);
        }
        st.last_sent += 1;
        let index = st.last_sent;
        let eword = (index | SRTCP_E_FLAG).to_be_bytes();
        match &self.keys {
            Keys::AesCm(k) => {
                let iv = aes_cm_iv(&k.rtcp_salt, ssrc, u64::from(index));
                ctr_xor(&k.rtcp_key, &iv, &mut buf[8..]);
                buf.extend_from_slice(&eword);
                let tag = hmac(&k.rtcp_auth, buf, &[]);
                buf.extend_from_slice(&tag[..AES_CM_RTCP_TAG]);
            }
            Keys::Gcm(k) => {
                let nonce = gcm_rtcp_nonce(&k.rtcp_salt, ssrc, index);
                let mut aad = [0u8; 12];
                aad[..8].copy_from_slice(&buf[..8]);
                aad[8..].copy_from_slice(&eword);
                let tag = k
                    .rtcp_key
                    .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut buf[8..])
                    .map_err(|_| SrtpError::TooShort)?;
                buf.extend_from_slice(tag.as_ref());
                buf.extend_from_slice(&eword);
            }
        }
        Ok(())
    }

    fn unprotect_rtcp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.expect(Direction::Inbound)?;
        let ssrc = rtcp_ssrc(buf)?;
        let len = buf.len();
        if len < 8 + self.suite.rtcp_overhead() {
            return Err(SrtpError::TooShort);
        }
        let (eword_at, tag_len) = match &self.keys {
            Keys::AesCm(_) => (len - AES_CM_RTCP_TAG - 4, AES_CM_RTCP_TAG),
            Keys::Gcm(_) => (len - 4, GCM_TAG),
        };
        let eword = u32::from_be_bytes([
            buf[eword_at],
            buf[eword_at + 1],
            buf[eword_at + 2],
            buf[eword_at + 3],
        ]);
        let index = eword & MAX_SRTCP_INDEX;
        if let Some(st) = self.rtcp.get(ssrc) {
            if !st.window.check(u64::from(index)) {
                return Err(SrtpError::Replayed);
            }
        }
        match &self.keys {
            Keys::AesCm(k) => {
                let body = len - tag_len;
                let expected = hmac(&k.rtcp_auth, &buf[..body], &[]);
                if expected[..tag_len].ct_eq(&buf[body..]).unwrap_u8() != 1 {
                    return Err(SrtpError::AuthFailed);
                }
                buf.truncate(eword_at);
                if eword & SRTCP_E_FLAG != 0 {
                    let iv = aes_cm_iv(&k.rtcp_salt, ssrc, u64::from(index));
                    ctr_xor(&k.rtcp_key, &iv, &mut buf[8..]);
                }
            }
            Keys::Gcm(k) => {
                if eword & SRTCP_E_FLAG == 0 {
                    return Err(SrtpError::UnencryptedSrtcp);
                }
                let nonce = gcm_rtcp_nonce(&k.rtcp_salt, ssrc, index);
                let mut aad = [0u8; 12];
                aad[..8].copy_from_slice(&buf[..8]);
                aad[8..].copy_from_slice(&eword.to_be_bytes());
                k.rtcp_key
                    .open_in_place(nonce, Aad::from(aad), &mut buf[8..eword_at])
                    .map_err(|_| SrtpError::AuthFailed)?;
                buf.truncate(eword_at - tag_len);
            }
        }
        self.rtcp
            .get_or_insert(ssrc)
            .window
            .accept(u64::from(index));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3711 Appendix B.2: the AES-CM keystream, through our IV layout
    /// and counter mode with a cached key.
    #[test]
    fn rfc3711_b2_keystream() {
        let key = Aes128Enc::new(GenericArray::from_slice(&h(
            "2B7E151628AED2A6ABF7158809CF4F3C",
        )));
        let salt: [u8; 14] = h("F0F1F2F3F4F5F6F7F8F9FAFBFCFD").try_into().unwrap();
        let iv = aes_cm_iv(&salt, 0, 0);
        assert_eq!(iv.to_vec(), h("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"));
        let mut ks = vec![0u8; 0xff02 * 16];
        ctr_xor(&key, &iv, &mut ks);
        let block = |i: usize| ks[i * 16..i * 16 + 16].to_vec();
        assert_eq!(block(0), h("E03EAD0935C95E80E166B16DD92B4EB4"));
        assert_eq!(block(1), h("D23513162B02D0F72A43A2FE4A5F97AB"));
        assert_eq!(block(2), h("41E95B3BB0A2E8DD477901E4FCA894C0"));
        assert_eq!(block(0xfeff), h("EC8CDF7398607CB0F2D21675EA9EA1E4"));
        assert_eq!(block(0xff00), h("362B7C3C6773516318A077D7FC5073AE"));
        assert_eq!(block(0xff01), h("6A2CC3787889374FBEB4C81B17BA6C44"));
    }

    fn rtp(seq: u16, ssrc: u32, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::with_capacity(1500);
        b.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 160, 0, 0, 0, 0]);
        b[2..4].copy_from_slice(&seq.to_be_bytes());
        b[8..12].copy_from_slice(&ssrc.to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn round_trip_and_rejects() {
        for suite in Suite::ALL {
            let keys = SrtpKeys::generate(suite).unwrap();
            let mut tx = Context::new(suite, &keys, Direction::Outbound).unwrap();
            let mut rx = Context::new(suite, &keys, Direction::Inbound).unwrap();
            let plain = rtp(7, 42, b"hello world, some audio");
            let mut b = plain.clone();
            tx.protect_rtp(&mut b).unwrap();
            assert_eq!(b.len(), plain.len() + suite.rtp_overhead());
            assert_ne!(&b[12..plain.len()], &plain[12..]);
            let sent = b.clone();
            // A flipped bit anywhere fails authentication.
            for i in [0usize, 5, 12, sent.len() - 1] {
                let mut bad = sent.clone();
                bad[i] ^= 1;
                let r = rx.unprotect_rtp(&mut bad);
                assert!(
                    matches!(r, Err(SrtpError::AuthFailed) | Err(SrtpError::BadVersion)),
                    "{suite:?} byte {i}: {r:?}"
                );
            }
            rx.unprotect_rtp(&mut b).unwrap();
            assert_eq!(b, plain);
            let mut again = sent.clone();
            assert_eq!(rx.unprotect_rtp(&mut again), Err(SrtpError::Replayed));
            assert_eq!(
                tx.unprotect_rtp(&mut sent.clone()),
                Err(SrtpError::WrongDirection)
            );

            // RTCP: a receiver report.
            let mut rr = BytesMut::with_capacity(1500);
            rr.extend_from_slice(&[0x80, 201, 0, 1, 0, 0, 0, 42]);
            let plain = rr.clone();
            tx.protect_rtcp(&mut rr).unwrap();
            assert_eq!(rr.len(), 8 + suite.rtcp_overhead());
            let sent = rr.clone();
            let mut bad = sent.clone();
            bad[9] ^= 0x80;
            assert_eq!(rx.unprotect_rtcp(&mut bad), Err(SrtpError::AuthFailed));
            rx.unprotect_rtcp(&mut rr).unwrap();
            assert_eq!(rr, plain);
            assert_eq!(
                rx.unprotect_rtcp(&mut sent.clone()),
                Err(SrtpError::Replayed)
            );
            // Truncated input is an error, never a panic.
            for n in 0..sent.len() {
                let mut t = BytesMut::from(&sent[..n]);
                assert!(rx.unprotect_rtcp(&mut t).is_err());
                let mut t = BytesMut::from(&sent[..n]);
                let _ = rx.unprotect_rtp(&mut t);
            }
        }
    }
}
