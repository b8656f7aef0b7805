//! Tollgate's media relay (SPEC §5): anchors both legs of every call, converts
//! between RTP and SRTP in place, rewrites SDP, allocates ports.
//!
//! Knows nothing of SIP: the B2BUA hands it SDP bodies and call ids.
//!
//! | module | RFC concept |
//! | --- | --- |
//! | [`srtp`] | RFC 3711 SRTP/SRTCP, RFC 7714 AES-GCM, behind a provider trait |
//! | [`sdp`] | RFC 4566 SDP, RFC 3264 offer/answer, RFC 4568 SDES `a=crypto` |
//! | [`ports`] | RFC 3550 §11 even/odd RTP/RTCP port pairs |
//! | [`latch`] | symmetric RTP with latching (SPEC §5), RTP-bleed protection, the NAT safety rule |
//! | [`g711`] | ITU-T G.711 µ-law/A-law, µ<->A tables |
//! | [`playout`] | paced playout of bursty audio, RFC 3550 numbering |
//! | [`relay`] | the per-call packet path, RFC 5761 rtcp-mux demux |
//! | [`record`] | call recording: the relay's tap, RFC 3550 timestamps to a two-channel timeline |
//! | `batch` | Linux `recvmmsg`/`sendmmsg`/UDP GSO for the relay's hot path |
//! | [`source`] | RFC 6724 source address selection: our address toward a peer, for wildcard binds |
//! | [`engine`] | the B2BUA-facing API ([`MediaEngine`]) |
//! | `fuzzing` | fuzz oracles for SDP and SRTP unprotect (`fuzz/`, and its own tests) |
// Unsafe code only in `batch` (raw recvmmsg/sendmmsg), which allows it.
#![deny(unsafe_code)]

#[cfg(target_os = "linux")]
mod batch;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod g711;
pub mod latch;
pub mod playout;
pub mod ports;
pub mod record;
pub mod relay;
pub mod sdp;
pub mod source;
pub mod srtp;

pub use engine::{MediaConfig, MediaEngine, MediaError, Profile};
