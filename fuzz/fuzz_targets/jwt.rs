//! `tollgate_keys::jwt::verify` on arbitrary text, and on `header.claims`
//! JSON signed with a fixed key (so the claims parser is reached).
//!
//! Oracles (in `tollgate_keys::fuzzing::jwt`): no panic; verified claims obey
//! the claim rules and survive re-minting; a changed signature is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate_keys::fuzzing::jwt(data));
