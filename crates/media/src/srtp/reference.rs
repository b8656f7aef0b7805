//! `webrtc-srtp` 0.17 behind [`SrtpTransform`]: the reference implementation
//! (and KDF oracle) for differential tests, and the benchmark baseline. It
//! allocates a new buffer per packet and re-expands the AES key per packet;
//! the relay does not use it.

use bytes::{Bytes, BytesMut};
use webrtc_srtp::context::Context as WebrtcContext;
use webrtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use webrtc_srtp::protection_profile::ProtectionProfile;

use super::{Direction, SrtpError, SrtpKeys, SrtpTransform, Suite};

/// A `webrtc_srtp::context::Context` for one direction.
pub struct Context {
    inner: WebrtcContext,
    direction: Direction,
}

fn profile(suite: Suite) -> ProtectionProfile {
    match suite {
        Suite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        Suite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        Suite::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
    }
}

fn map_err(e: webrtc_srtp::Error) -> SrtpError {
    use webrtc_srtp::Error as E;
    match e {
        E::RtpFailedToVerifyAuthTag
        | E::RtcpFailedToVerifyAuthTag
        | E::ErrFailedToVerifyAuthTag
        | E::AesGcm(_) => SrtpError::AuthFailed,
        E::SrtpSsrcDuplicated(..) | E::SrtcpSsrcDuplicated(..) | E::ErrDuplicated => {
            SrtpError::Replayed
        }
        E::ErrTooShortRtp | E::ErrTooShortRtcp | E::SrtpTooSmall(..) | E::SrtcpTooSmall(..) => {
            SrtpError::TooShort
        }
        E::ErrExceededMaxPackets => SrtpError::IndexExhausted,
        other => SrtpError::Reference(other.to_string()),
    }
}

impl Context {
    /// A context with a 64-packet replay window on the inbound side.
    pub fn new(suite: Suite, keys: &SrtpKeys, direction: Direction) -> Result<Context, SrtpError> {
        keys.check(suite)?;
        let (srtp_opt, srtcp_opt) = match direction {
            Direction::Inbound => (
                Some(srtp_replay_protection(64)),
                Some(srtcp_replay_protection(64)),
            ),
            Direction::Outbound => (None, None),
        };
        let inner = WebrtcContext::new(
            &keys.master_key,
            &keys.master_salt,
            profile(suite),
            srtp_opt,
            srtcp_opt,
        )
        .map_err(map_err)?;
        Ok(Context { inner, direction })
    }

    fn run(
        &mut self,
        d: Direction,
        buf: &mut BytesMut,
        f: impl FnOnce(&mut WebrtcContext, &[u8]) -> Result<Bytes, webrtc_srtp::Error>,
    ) -> Result<(), SrtpError> {
        if self.direction != d {
            return Err(SrtpError::WrongDirection);
        }
        let out = f(&mut self.inner, buf).map_err(map_err)?;
        buf.clear();
        buf.extend_from_slice(&out);
        Ok(())
    }
}

impl SrtpTransform for Context {
    fn protect_rtp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.run(Direction::Outbound, buf, |c, b| c.encrypt_rtp(b))
    }
    fn unprotect_rtp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.run(Direction::Inbound, buf, |c, b| c.decrypt_rtp(b))
    }
    fn protect_rtcp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.run(Direction::Outbound, buf, |c, b| c.encrypt_rtcp(b))
    }
    fn unprotect_rtcp(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        self.run(Direction::Inbound, buf, |c, b| c.decrypt_rtcp(b))
    }
}
