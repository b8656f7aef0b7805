//! Elastic trunks, admission limits, usage and call detail records.
//!
//! This crate knows neither SIP nor media. It is a sans-IO core: every method
//! takes the time from the caller (`now: Instant` for rate limiting, `unix: i64`
//! Unix seconds for budgets, UTC days and CDR stamps), so that the tests run on
//! a simulated clock.
//!
//! * [`Allocator`]: one elastic trunk per API key, created on the key's first
//!   call and reclaimed when idle. [`Allocator::admit`] takes a channel or says
//!   why not ([`Refusal`]); the B2BUA maps refusals to SIP responses (SPEC §4)
//!   in one place.
//! * [`Cdr`], [`CdrSink`], [`FileCdrStore`]: a durable, append-only JSON-lines
//!   CDR store with a group-committing writer thread, and the usage totals
//!   computed from it ([`Usage`], [`format_usage`]).
//! * [`CallJournal`]: checkpoints of the calls up, so that a call that was up
//!   when the edge died gets its CDR (cause [`EDGE_LOST`]) at the next start.
#![forbid(unsafe_code)]

mod allocator;
mod bucket;
pub mod cdr;
pub mod checkpoint;
pub mod policy;

pub use allocator::{Allocator, ChannelId, KeyLimits, Refusal, TrunkConfig, TrunkKey, MAX_CHAIN};
pub use cdr::{format_usage, Cdr, CdrSink, FileCdrStore, KeyUsage, MemoryCdrSink, Recovery, Usage};
pub use checkpoint::{CallJournal, OpenCall, Recovered, EDGE_LOST};
pub use policy::DEFAULT_PREMIUM_DENY_PREFIXES;

/// Seconds in a UTC day; `unix.div_euclid(SECS_PER_DAY)` is the day number.
pub const SECS_PER_DAY: i64 = 86_400;

/// The UTC day number (days since 1970-01-01) of a Unix time in seconds.
pub fn utc_day(unix: i64) -> i64 {
    unix.div_euclid(SECS_PER_DAY)
}
