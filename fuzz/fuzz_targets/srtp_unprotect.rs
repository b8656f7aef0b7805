//! SRTP/SRTCP unprotect of arbitrary bytes in place, for each suite, with a
//! context from fixed keys. Byte 0 selects the suite (bits 0-1, `% 3`) and
//! RTP or RTCP (bit 2); the rest is the packet.
//!
//! Oracles (in `tollgate_media::fuzzing::srtp`): no panic; a replay is
//! refused; `unprotect(protect(p)) == p`; a flipped bit is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate_media::fuzzing::srtp(data));
