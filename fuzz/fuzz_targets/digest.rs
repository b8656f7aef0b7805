//! `tollgate_keys::digest::parse_authorization` on arbitrary text, then the
//! response check and the nonce check.
//!
//! Oracles (in `tollgate_keys::fuzzing::digest`): no panic; re-quoting the
//! parsed credentials parses back to them; the correct response verifies,
//! a wrong one or another method does not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate_keys::fuzzing::digest(data));
