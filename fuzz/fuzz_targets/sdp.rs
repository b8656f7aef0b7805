//! `tollgate_media::sdp::SessionDescription::parse` on arbitrary bytes (an
//! offer or answer body), then the engine's offer/answer rewrite.
//!
//! Oracles (in `tollgate_media::fuzzing::sdp`): no panic; accessors total;
//! `parse(to_bytes(d)) == d`; the rewritten description re-parses with our
//! address, port, rtcp and crypto and none of the peer's crypto lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate_media::fuzzing::sdp(data));
