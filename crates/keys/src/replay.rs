//! Single-use caches for token `jti`s and digest nonces.
//!
//! Behind a trait so that a fleet can later share one cache on a distributed
//! store; [`MemoryReplayCache`] is the embedded default.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

/// Remembers identifiers until they expire.
pub trait ReplayCache: Send + Sync {
    /// Records a use of `id`, valid until `expires_at` (Unix seconds).
    ///
    /// Returns `true` the first time, and `false` while an earlier use of the
    /// same `id` has not expired (`expires_at > now`). Callers namespace ids:
    /// `"<kid>:<jti>"` for tokens, `"nonce:<nonce>"` for digest nonces.
    fn first_use(&self, id: &str, expires_at: i64, now: i64) -> bool;
}

/// In-memory [`ReplayCache`] on a sharded concurrent map.
///
/// Expired entries are purged every `sweep_every` inserts (amortised). Only
/// credentials that already passed their signature / MAC check are recorded,
/// so memory is bounded by (authenticated INVITE rate × longest lifetime):
/// at most 3600 s for tokens, the nonce lifetime for nonces.
#[derive(Debug)]
pub struct MemoryReplayCache {
    entries: DashMap<String, i64>,
    inserts: AtomicU64,
    sweep_every: u64,
}

impl Default for MemoryReplayCache {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryReplayCache {
    /// A cache that sweeps expired entries every 1024 inserts.
    pub fn new() -> Self {
        Self::with_sweep_interval(1024)
    }

    /// A cache that sweeps expired entries every `sweep_every` inserts (min 1).
    pub fn with_sweep_interval(sweep_every: u64) -> Self {
        MemoryReplayCache {
            entries: DashMap::new(),
            inserts: AtomicU64::new(0),
            sweep_every: sweep_every.max(1),
        }
    }

    /// Number of entries held (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every entry that has expired at `now`.
    pub fn purge_expired(&self, now: i64) {
        self.entries.retain(|_, exp| *exp > now);
    }
}

impl ReplayCache for MemoryReplayCache {
    fn first_use(&self, id: &str, expires_at: i64, now: i64) -> bool {
        let first = match self.entries.entry(id.to_owned()) {
            Entry::Occupied(mut e) => {
                if *e.get() > now {
                    false
                } else {
                    e.insert(expires_at);
                    true
                }
            }
            Entry::Vacant(v) => {
                v.insert(expires_at);
                true
            }
        }; // The shard lock is released here, before any sweep.
        if first
            && (self.inserts.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(self.sweep_every)
        {
            self.purge_expired(now);
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_then_replay_until_expiry() {
        let c = MemoryReplayCache::new();
        assert!(c.first_use("k:a", 110, 100));
        assert!(!c.first_use("k:a", 110, 100));
        assert!(!c.first_use("k:a", 200, 109));
        assert!(c.first_use("k:b", 110, 100));
        // Expired: usable again (the token itself is expired by then anyway).
        assert!(c.first_use("k:a", 300, 110));
        assert!(!c.first_use("k:a", 300, 250));
    }

    #[test]
    fn sweeps_bound_memory() {
        let c = MemoryReplayCache::with_sweep_interval(10);
        for i in 0..100 {
            assert!(c.first_use(&format!("id{i}"), i + 1, i));
        }
        // Entries expire one second after insertion; each sweep empties all but the newest.
        assert!(c.len() <= 10, "{}", c.len());
        c.purge_expired(1000);
        assert!(c.is_empty());
    }

    #[test]
    fn concurrent_single_winner() {
        let c = std::sync::Arc::new(MemoryReplayCache::with_sweep_interval(3));
        let wins: usize = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..200)
                        .filter(|i| c.first_use(&format!("j{i}"), 10, 0))
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(wins, 200);
    }
}
