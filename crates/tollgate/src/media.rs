//! The B2BUA's media hooks, backed by the media relay (crates/media): SDP in,
//! rewritten SDP out, and the one place where a media refusal becomes a SIP
//! status.

use bytes::Bytes;
use std::net::IpAddr;
use std::sync::Arc;
use tollgate_media::engine::Leg;
use tollgate_media::{MediaEngine, MediaError, Profile};
use tollgate_sip::b2bua::{MediaHooks, Side};
use tollgate_sip::MediaProfile;

pub struct EngineHooks(pub Arc<MediaEngine>);

/// 488 for SDP we cannot serve; 503 when we are out of ports or of file
/// descriptors (a temporary overload: a carrier tries its next edge); 500
/// otherwise.
fn status_of(e: &MediaError) -> u16 {
    match e {
        MediaError::Ports | MediaError::Bind(_) => 503,
        e if e.is_not_acceptable() => 488,
        _ => 500,
    }
}

fn profile(p: MediaProfile) -> Profile {
    match p {
        MediaProfile::Rtp => Profile::Rtp,
        MediaProfile::Srtp => Profile::Srtp,
        MediaProfile::Auto => Profile::Auto,
    }
}

impl MediaHooks for EngineHooks {
    fn offer(
        &mut self,
        call: u64,
        sdp: &[u8],
        profile_b: MediaProfile,
        signaling: IpAddr,
    ) -> Result<Bytes, u16> {
        self.0
            .offer(call, sdp, profile(profile_b), signaling)
            .map(Bytes::from)
            .map_err(|e| {
                tracing::debug!(call, error = %e, "offer refused by the media relay");
                status_of(&e)
            })
    }

    /// Offers from either leg (late offers, re-offers from leg B); the
    /// profile rules are [`MediaEngine::offer_from`]'s.
    fn offer_from(
        &mut self,
        call: u64,
        from: Side,
        sdp: &[u8],
        profile_a: MediaProfile,
        profile_b: MediaProfile,
        signaling: IpAddr,
    ) -> Result<Bytes, u16> {
        let leg = match from {
            Side::A => Leg::A,
            Side::B => Leg::B,
        };
        self.0
            .offer_from(
                call,
                leg,
                sdp,
                [profile(profile_a), profile(profile_b)],
                signaling,
            )
            .map(Bytes::from)
            .map_err(|e| {
                tracing::debug!(call, ?from, error = %e, "offer refused by the media relay");
                status_of(&e)
            })
    }

    fn answer(&mut self, call: u64, sdp: &[u8], signaling: IpAddr) -> Result<Bytes, u16> {
        self.0
            .answer(call, sdp, signaling)
            .map(Bytes::from)
            .map_err(|e| {
                tracing::debug!(call, error = %e, "answer refused by the media relay");
                status_of(&e)
            })
    }

    fn release(&mut self, call: u64) {
        self.0.release(call);
    }

    fn anchors(&self) -> bool {
        true
    }

    fn cancel_offer(&mut self, call: u64) {
        self.0.cancel_offer(call);
    }
}

/// The signaling core's view of the host's routes: the source address
/// toward a peer, as the kernel picks it (cached; shared with the media
/// engine, see `tollgate_media::source`).
pub struct KernelRoute(pub Arc<tollgate_media::source::SourceIps>);

impl tollgate_sip::local_addr::SourceRoute for KernelRoute {
    fn source_ip(&self, peer: IpAddr) -> Option<IpAddr> {
        self.0.toward(peer)
    }
}
