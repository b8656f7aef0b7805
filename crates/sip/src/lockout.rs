//! Lockout of sources that guess credentials (SPEC §4).
//!
//! A source that sends more than `failures` bad credentials (a wrong token
//! signature or digest response, a replayed or expired token, an unknown key:
//! not a missing credential, which is how digest starts, and not a stale
//! nonce, which is how a right digest answer is told to retry) within
//! `window` is ignored for `ban`: no response at all to its out-of-dialog
//! requests, so a guesser learns nothing and spends its time waiting for
//! timeouts. Trusted carrier sources are never locked out (the caller skips
//! them); other sources are never affected, since an entry names one address.
//!
//! Memory is fixed, whatever the flood: a table of `max_sources` slots split
//! into stripes (one lock each, so shards rarely contend), each address
//! hashed with a per-process random key to two candidate slots of its stripe.
//! A new address takes a free slot, else evicts the candidate with fewer
//! failures that is not banned; if both are banned it is not tracked (and
//! counted): a flood from many addresses can only ever blind the lockout to
//! new addresses, never lock out anyone who did not fail.
//!
//! A sans-IO core: every call takes `now`.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// `[sip.lockout]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutConfig {
    /// Bad credentials tolerated within `window` (the next one bans).
    /// 0 turns the lockout off.
    pub failures: u32,
    /// The counting window.
    pub window: Duration,
    /// How long a locked-out source is ignored.
    pub ban: Duration,
    /// Sources tracked at once (memory: about 64 bytes each).
    pub max_sources: usize,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            failures: 20,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            max_sources: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    ip: IpAddr,
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

impl Slot {
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| now < t)
    }

    /// Holds nothing that still matters at `now`.
    fn stale(&self, now: Instant, window: Duration) -> bool {
        !self.banned(now) && now.saturating_duration_since(self.window_start) > window
    }
}

const STRIPES: usize = 64;

/// A ban that [`Lockout::record_failure`] just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    /// The source.
    pub ip: IpAddr,
    /// Bad credentials counted in the window, this one included.
    pub failures: u32,
    /// How long it lasts.
    pub duration: Duration,
}

/// The lockout table, shared by every signaling shard.
#[derive(Debug)]
pub struct Lockout {
    cfg: LockoutConfig,
    stripes: Box<[Mutex<Vec<Option<Slot>>>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Lockout {
    /// An empty table.
    pub fn new(cfg: LockoutConfig) -> Self {
        let per_stripe = cfg.max_sources.div_ceil(STRIPES).max(2);
        Lockout {
            cfg,
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(vec![None; per_stripe]))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> LockoutConfig {
        self.cfg
    }

    fn place(&self, ip: IpAddr) -> (usize, [usize; 2]) {
        let x = self.hasher.hash_one(ip);
        let per_stripe = self.cfg.max_sources.div_ceil(STRIPES).max(2);
        let stripe = (x % STRIPES as u64) as usize;
        let a = ((x >> 8) % per_stripe as u64) as usize;
        let mut b = ((x >> 36) % per_stripe as u64) as usize;
        if b == a {
            b = (a + 1) % per_stripe;
        }
        (stripe, [a, b])
    }

    fn stripe(&self, i: usize) -> std::sync::MutexGuard<'_, Vec<Option<Slot>>> {
        self.stripes[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// True while `ip` is locked out.
    pub fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        if self.cfg.failures == 0 {
            return false;
        }
        let (s, slots) = self.place(ip);
        let table = self.stripe(s);
        slots
            .iter()
            .filter_map(|&i| table[i].as_ref())
            .any(|slot| slot.ip == ip && slot.banned(now))
    }

    /// Counts a bad credential from `ip`; returns the ban it starts, if this
    /// one is over the threshold. Failures while banned are not counted
    /// (the source is ignored, so they should not arrive).
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Option<Ban> {
        if self.cfg.failures == 0 {
            return None;
        }
        let (s, cand) = self.place(ip);
        let mut table = self.stripe(s);
        let found = cand
            .iter()
            .copied()
            .find(|&i| table[i].is_some_and(|slot| slot.ip == ip));
        let i = match found {
            Some(i) => i,
            None => {
                let pick = cand
                    .iter()
                    .copied()
                    .find(|&i| table[i].is_none_or(|slot| slot.stale(now, self.cfg.window)));
                let pick = pick.or_else(|| {
                    cand.iter()
                        .copied()
                        .filter(|&i| table[i].is_some_and(|slot| !slot.banned(now)))
                        .min_by_key(|&i| table[i].map_or(0, |slot| slot.count))
                });
                let Some(i) = pick else {
                    metrics::counter!("tollgate_lockout_untracked_total").increment(1);
                    return None;
                };
                table[i] = Some(Slot {
                    ip,
                    window_start: now,
                    count: 0,
                    banned_until: None,
                });
                i
            }
        };
        let slot = table[i].as_mut()?;
        if slot.banned(now) {
            return None;
        }
        if now.saturating_duration_since(slot.window_start) > self.cfg.window
            || slot.banned_until.is_some()
        {
            // A new window (also right after a ban has run out).
            *slot = Slot {
                ip,
                window_start: now,
                count: 0,
                banned_until: None,
            };
        }
        slot.count = slot.count.saturating_add(1);
        if slot.count <= self.cfg.failures {
            return None;
        }
        slot.banned_until = Some(now + self.cfg.ban);
        Some(Ban {
            ip,
            failures: slot.count,
            duration: self.cfg.ban,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(failures: u32) -> LockoutConfig {
        LockoutConfig {
            failures,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            max_sources: 1024,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bans_after_the_threshold_for_the_ban_time_and_only_that_source() {
        let l = Lockout::new(cfg(20));
        let t0 = Instant::now();
        let (bad, other) = (ip("127.0.0.2"), ip("127.0.0.3"));
        for i in 0..20 {
            assert_eq!(l.record_failure(bad, t0 + Duration::from_millis(i)), None);
            assert!(!l.is_banned(bad, t0));
        }
        let ban = l.record_failure(bad, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(ban.failures, 21);
        assert_eq!(ban.duration, Duration::from_secs(300));
        assert!(l.is_banned(bad, t0 + Duration::from_secs(2)));
        assert!(!l.is_banned(other, t0 + Duration::from_secs(2)));
        assert!(l.is_banned(bad, t0 + Duration::from_secs(300)));
        assert!(!l.is_banned(bad, t0 + Duration::from_secs(302)));
        // After the ban, a fresh window: 20 more are tolerated.
        let later = t0 + Duration::from_secs(400);
        for _ in 0..20 {
            assert_eq!(l.record_failure(bad, later), None);
        }
        assert!(l.record_failure(bad, later).is_some());
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_ban() {
        let l = Lockout::new(cfg(3));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for k in 0..30 {
            // three per window, windows 61 s apart
            let t = t0 + Duration::from_secs(61 * (k / 3));
            assert_eq!(l.record_failure(a, t), None, "failure {k}");
        }
        assert!(!l.is_banned(a, t0 + Duration::from_secs(61 * 10)));
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let l = Lockout::new(cfg(0));
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(l.record_failure(ip("10.1.1.1"), t0), None);
        }
        assert!(!l.is_banned(ip("10.1.1.1"), t0));
    }

    #[test]
    fn a_flood_from_many_sources_keeps_memory_fixed_and_bans_nobody_else() {
        let l = Lockout::new(cfg(5));
        let t0 = Instant::now();
        let guesser = ip("2001:db8::1");
        for _ in 0..6 {
            l.record_failure(guesser, t0);
        }
        assert!(l.is_banned(guesser, t0));
        // 200k other sources, one failure each, in a 1024-slot table.
        for n in 0..200_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            assert_eq!(l.record_failure(a, t0), None);
        }
        let slots: usize = l.stripes.iter().map(|s| s.lock().unwrap().len()).sum();
        assert_eq!(slots, 1024);
        // The banned entry was never evicted by the flood.
        assert!(l.is_banned(guesser, t0 + Duration::from_secs(1)));
        // Nobody who failed once is banned.
        for n in (0..200_000u32).step_by(997) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            assert!(!l.is_banned(a, t0));
        }
    }

    #[test]
    fn concurrent_failures_from_one_source_ban_exactly_once() {
        let l = std::sync::Arc::new(Lockout::new(cfg(20)));
        let t0 = Instant::now();
        let bans: usize = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| l.record_failure(ip("127.0.0.2"), t0).is_some())
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(bans, 1);
    }
}
