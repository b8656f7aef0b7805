//! Elastic trunks: one per API key, grown per call up to the key's limits.
//!
//! # Concurrency
//!
//! State lives in three `DashMap`s: `trunks` (per key), `channels` (per
//! channel id) and `parked` (the day's spent seconds of reclaimed trunks). An
//! admission locks one shard of `trunks` (the key's), so keys do not contend
//! with each other; the edge-wide channel count is an atomic. There is no
//! global lock on the admit path and every operation is O(1) in the number of
//! keys and calls (the premium deny list is scanned linearly; it is short).
//!
//! Lock order, where two are held at once: `trunks` shard, then `channels`
//! or `parked` shard. Nothing takes a `trunks` shard while holding another.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dashmap::DashMap;
use metrics::{Counter, Gauge};
use serde::{Deserialize, Serialize};

use crate::bucket::TokenBucket;
use crate::policy::{DenyList, DEFAULT_PREMIUM_DENY_PREFIXES, DEFAULT_PREMIUM_DENY_TYPES};
use crate::utc_day;
use tollgate_keys::number::{Dest, NumberPlan};

/// A key's limits, as far as the trunk enforces them. `None` = no limit;
/// `Some(0)` = nothing allowed (cps 0: every call is rate limited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyLimits {
    /// Calls per second (token bucket, burst of one second).
    pub cps: Option<u32>,
    /// Concurrent calls.
    pub max_calls: Option<u32>,
    /// Billable minutes per UTC day.
    pub daily_minutes: Option<u32>,
}

impl From<&tollgate_keys::Limits> for KeyLimits {
    fn from(l: &tollgate_keys::Limits) -> Self {
        KeyLimits {
            cps: l.cps,
            max_calls: l.max_calls,
            daily_minutes: l.daily_minutes,
        }
    }
}

/// Edge-wide trunk settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrunkConfig {
    /// Edge-wide cap on concurrent channels (default 10 000).
    pub edge_max_calls: u32,
    /// Destination prefixes refused for every key (default
    /// [`DEFAULT_PREMIUM_DENY_PREFIXES`], the revenue-share ranges); setting
    /// it replaces the default, empty turns the prefix check off.
    pub premium_deny_prefixes: Vec<String>,
    /// More prefixes refused for every key, on top of `premium_deny_prefixes`
    /// (extends the default list without restating it).
    pub premium_deny_extra_prefixes: Vec<String>,
    /// Number types (libphonenumber metadata) refused for every key (default
    /// [`DEFAULT_PREMIUM_DENY_TYPES`]: premium rate and shared cost, every
    /// country); empty turns the type check off.
    pub premium_deny_types: Vec<String>,
    /// How the deny prefixes are canonicalized (`[numbers]`).
    #[serde(skip)]
    pub numbers: NumberPlan,
    /// A trunk with no channels for this long is dropped by
    /// [`Allocator::reclaim_idle`] (default 300).
    pub idle_reclaim_secs: u64,
}

impl Default for TrunkConfig {
    fn default() -> Self {
        TrunkConfig {
            edge_max_calls: 10_000,
            premium_deny_prefixes: DEFAULT_PREMIUM_DENY_PREFIXES
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            premium_deny_extra_prefixes: Vec::new(),
            premium_deny_types: DEFAULT_PREMIUM_DENY_TYPES
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            numbers: NumberPlan::default(),
            idle_reclaim_secs: 300,
        }
    }
}

/// Why a call was not admitted. The B2BUA maps each to its SIP response
/// (SPEC §4) in one place.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Over the key's calls per second (`503` + `Retry-After`).
    #[error("calls per second over the key's limit; retry after {retry_after_secs} s")]
    RateLimited {
        /// Whole seconds until the key's bucket has a token again, at least 1.
        retry_after_secs: u32,
    },
    /// At the key's concurrent-call limit or the edge-wide cap (`486`).
    #[error("concurrent calls at the key's or the edge's cap")]
    Busy,
    /// The key's daily minutes are spent for this UTC day (`402`).
    #[error("the key's daily budget is spent")]
    BudgetExhausted,
    /// The destination is on the premium-rate deny list (`403`).
    #[error("destination denied")]
    DestinationDenied,
}

impl Refusal {
    /// Short label, as used in `tollgate_trunk_refusals_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::RateLimited { .. } => "rate",
            Refusal::Busy => "busy",
            Refusal::BudgetExhausted => "budget",
            Refusal::DestinationDenied => "destination",
        }
    }
}

/// A channel on a trunk: one admitted call. Ids are never reused by an
/// [`Allocator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(u64);

impl ChannelId {
    /// The raw id (for logs and maps).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ChannelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ch-{}", self.0)
    }
}

/// Billable seconds spent on one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DaySpent {
    day: i64,
    secs: u64,
}

impl DaySpent {
    fn on(&self, day: i64) -> u64 {
        if self.day == day {
            self.secs
        } else {
            0
        }
    }

    /// Adds `secs` on `day`; a later day starts afresh, an earlier one (time
    /// going backwards) is ignored.
    fn add(&mut self, day: i64, secs: u64) {
        if day > self.day {
            *self = DaySpent { day, secs };
        } else if day == self.day {
            self.secs = self.secs.saturating_add(secs);
        }
    }

    /// Raises the day's total to at least `secs` (idempotent).
    fn seed(&mut self, day: i64, secs: u64) {
        if day > self.day {
            *self = DaySpent { day, secs };
        } else if day == self.day {
            self.secs = self.secs.max(secs);
        }
    }

    fn merge(&mut self, other: DaySpent) {
        self.seed(other.day, other.secs);
    }
}

/// A key's elastic trunk.
struct Trunk {
    in_use: u32,
    bucket: Option<TokenBucket>,
    spent: DaySpent,
    /// The daily budget in seconds, from the limits of the latest admit.
    daily_secs: Option<u64>,
    /// Channels answered and not yet released, and the sum of their answer
    /// times: their elapsed time at `t` is `answered * t - answer_sum`, O(1).
    answered: u32,
    answer_sum: i64,
    /// Since when the trunk has had no channels.
    idle_since: Option<i64>,
    calls: Counter,
    billable: Counter,
}

impl Trunk {
    fn new(key: &str, spent: DaySpent, unix: i64) -> Self {
        Trunk {
            in_use: 0,
            bucket: None,
            spent,
            daily_secs: None,
            answered: 0,
            answer_sum: 0,
            idle_since: Some(unix),
            calls: metrics::counter!("tollgate_key_calls_total", "key" => key.to_owned()),
            billable: metrics::counter!(
                "tollgate_key_billable_seconds_total",
                "key" => key.to_owned()
            ),
        }
    }

    /// Seconds used today: ended calls plus the time so far on calls up now.
    fn used(&self, unix: i64) -> u64 {
        let live = i64::from(self.answered)
            .saturating_mul(unix)
            .saturating_sub(self.answer_sum)
            .max(0);
        self.spent.on(utc_day(unix)).saturating_add(live as u64)
    }
}

struct Channel {
    key: Arc<str>,
    answered_at: Option<i64>,
}

struct Metrics {
    channels: Gauge,
    rate: Counter,
    busy: Counter,
    budget: Counter,
    destination: Counter,
}

impl Metrics {
    fn new() -> Self {
        let refusals = |reason: &'static str| metrics::counter!("tollgate_trunk_refusals_total", "reason" => reason);
        Metrics {
            channels: metrics::gauge!("tollgate_trunk_channels_in_use"),
            rate: refusals("rate"),
            busy: refusals("busy"),
            budget: refusals("budget"),
            destination: refusals("destination"),
        }
    }
}

struct EdgeSettings {
    cfg: TrunkConfig,
    deny: DenyList,
}

impl TrunkConfig {
    /// The edge-wide deny list these settings describe; the error names the
    /// `[trunk]` field and the entry (checked when the configuration loads).
    pub fn deny_list(&self) -> Result<DenyList, String> {
        let prefixes: Vec<&String> = self
            .premium_deny_prefixes
            .iter()
            .chain(&self.premium_deny_extra_prefixes)
            .collect();
        let field = |i: usize| {
            if i < self.premium_deny_prefixes.len() {
                "trunk.premium_deny_prefixes"
            } else {
                "trunk.premium_deny_extra_prefixes"
            }
        };
        for (i, p) in prefixes.iter().enumerate() {
            DenyList::new::<_, &str>(&self.numbers, &[p.as_str()], &[])
                .map_err(|e| format!("{}: {e}", field(i)))?;
        }
        DenyList::new(&self.numbers, &prefixes, &self.premium_deny_types)
            .map_err(|e| format!("trunk.premium_deny_types: {e}"))
    }
}

impl EdgeSettings {
    fn new(cfg: TrunkConfig) -> Self {
        // An invalid list is refused when the configuration loads; should one
        // get here anyway, the default list applies (fail closed).
        let deny = cfg
            .deny_list()
            .or_else(|_| TrunkConfig::default().deny_list())
            .unwrap_or_default();
        EdgeSettings { deny, cfg }
    }
}

/// The trunk allocator: admits calls onto per-key elastic trunks.
///
/// `Send + Sync`; share it behind an `Arc`. Metric handles are created on
/// first use, so install the metrics recorder before the first call.
pub struct Allocator {
    /// Edge-wide settings; replaced whole on a reload (SIGHUP).
    edge: std::sync::RwLock<Arc<EdgeSettings>>,
    trunks: DashMap<Arc<str>, Trunk>,
    channels: DashMap<u64, Channel>,
    /// Today's spent seconds of keys whose trunk was reclaimed.
    parked: DashMap<Arc<str>, DaySpent>,
    in_use: AtomicUsize,
    next_id: AtomicU64,
    metrics: OnceLock<Metrics>,
}

impl Allocator {
    /// An allocator with no trunks.
    pub fn new(cfg: TrunkConfig) -> Self {
        Allocator {
            edge: std::sync::RwLock::new(Arc::new(EdgeSettings::new(cfg))),
            trunks: DashMap::new(),
            channels: DashMap::new(),
            parked: DashMap::new(),
            in_use: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            metrics: OnceLock::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> TrunkConfig {
        self.edge().cfg.clone()
    }

    /// Replaces the edge-wide settings (SIGHUP reload). Channels taken stay;
    /// the next admit sees the new cap and deny list.
    pub fn reconfigure(&self, cfg: TrunkConfig) {
        let new = Arc::new(EdgeSettings::new(cfg));
        match self.edge.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    fn edge(&self) -> Arc<EdgeSettings> {
        match self.edge.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn metrics(&self) -> &Metrics {
        self.metrics.get_or_init(Metrics::new)
    }

    fn refuse(&self, r: Refusal) -> Result<ChannelId, Refusal> {
        let m = self.metrics();
        match r {
            Refusal::RateLimited { .. } => m.rate.increment(1),
            Refusal::Busy => m.busy.increment(1),
            Refusal::BudgetExhausted => m.budget.increment(1),
            Refusal::DestinationDenied => m.destination.increment(1),
        }
        Err(r)
    }

    /// True if the canonical `destination` is on the edge-wide deny list.
    pub fn destination_denied(&self, destination: &Dest) -> bool {
        self.edge().deny.denies(destination)
    }

    /// True if the edge-wide deny list is on (then every number attempt
    /// must canonicalize: the credential check answers `484` otherwise).
    pub fn checks_numbers(&self) -> bool {
        self.edge().deny.is_active()
    }

    /// Takes a channel on the key's elastic trunk (created on first use).
    ///
    /// Checks, in order: destination, daily budget, concurrency (key, then
    /// edge), calls per second. A call refused for any reason takes no rate
    /// token and no channel. `limits` are the key's current limits; a change
    /// takes effect on the next admit.
    pub fn admit(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        destination: &Dest,
        now: Instant,
        unix: i64,
    ) -> Result<ChannelId, Refusal> {
        let edge = self.edge();
        if edge.deny.denies(destination) {
            return self.refuse(Refusal::DestinationDenied);
        }
        let mut trunk = match self.trunks.get_mut(key_id) {
            Some(t) => t,
            None => self
                .trunks
                .entry(Arc::from(key_id))
                .or_insert_with(|| self.new_trunk(key_id, unix)),
        };
        let t = &mut *trunk;
        t.daily_secs = limits.daily_minutes.map(|m| u64::from(m) * 60);

        if let Some(budget) = t.daily_secs {
            if t.used(unix) >= budget {
                return self.refuse(Refusal::BudgetExhausted);
            }
        }
        if limits.max_calls.is_some_and(|max| t.in_use >= max) {
            return self.refuse(Refusal::Busy);
        }
        let cap = edge.cfg.edge_max_calls as usize;
        match limits.cps {
            Some(cps) => {
                let bucket = t.bucket.get_or_insert_with(|| TokenBucket::new(cps, now));
                bucket.refill(cps, now);
            }
            None => t.bucket = None,
        }
        if let Some(bucket) = t.bucket.as_ref().filter(|b| !b.has_token()) {
            // Concurrency comes before rate: a full edge is Busy either way.
            if self.in_use.load(Ordering::Acquire) >= cap {
                return self.refuse(Refusal::Busy);
            }
            let retry_after_secs = bucket.retry_after_secs();
            return self.refuse(Refusal::RateLimited { retry_after_secs });
        }
        if self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_err()
        {
            return self.refuse(Refusal::Busy);
        }
        if let Some(bucket) = t.bucket.as_mut() {
            bucket.take();
        }
        t.in_use += 1;
        t.idle_since = None;
        t.calls.increment(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.channels.insert(
            id,
            Channel {
                key: trunk.key().clone(),
                answered_at: None,
            },
        );
        drop(trunk);
        self.metrics().channels.increment(1.0);
        Ok(ChannelId(id))
    }

    fn new_trunk(&self, key_id: &str, unix: i64) -> Trunk {
        let spent = self
            .parked
            .remove(key_id)
            .map(|(_, s)| s)
            .unwrap_or_default();
        Trunk::new(key_id, spent, unix)
    }

    /// The call on `ch` was answered at `unix`. Returns the billable seconds
    /// the key has left today (its daily budget minus ended calls minus the
    /// time so far on its other answered calls), `None` if the key has no
    /// daily budget. The B2BUA cuts the call with BYE when that runs out.
    ///
    /// Several calls answered at once each get the whole remainder, so a key
    /// can overrun its budget by (answered calls - 1) x remainder; the next
    /// admit is then refused. An unknown or released channel gets `Some(0)`
    /// (fail closed). Calling it twice keeps the first answer time.
    pub fn answered(&self, ch: ChannelId, unix: i64) -> Option<u64> {
        let Some(key) = self.channels.get(&ch.0).map(|c| c.key.clone()) else {
            return Some(0);
        };
        let Some(mut trunk) = self.trunks.get_mut(&key) else {
            return Some(0);
        };
        let t = &mut *trunk;
        let Some(mut channel) = self.channels.get_mut(&ch.0) else {
            return Some(0);
        };
        if channel.answered_at.is_none() {
            channel.answered_at = Some(unix);
            t.answered += 1;
            t.answer_sum = t.answer_sum.saturating_add(unix);
        }
        drop(channel);
        t.daily_secs
            .map(|budget| budget.saturating_sub(t.used(unix)))
    }

    /// Gives the channel back; `billable_secs` count against the key's UTC
    /// day of `unix`. Idempotent: releasing an unknown or released id is a
    /// no-op.
    pub fn release(&self, ch: ChannelId, billable_secs: u64, unix: i64) {
        let Some(key) = self.channels.get(&ch.0).map(|c| c.key.clone()) else {
            return;
        };
        let day = utc_day(unix);
        match self.trunks.get_mut(&key) {
            Some(mut trunk) => {
                // Removing under the trunk's lock makes a concurrent second
                // release (or answered()) see either all of this or none.
                let Some((_, channel)) = self.channels.remove(&ch.0) else {
                    return;
                };
                let t = &mut *trunk;
                if let Some(at) = channel.answered_at {
                    t.answered -= 1;
                    t.answer_sum = t.answer_sum.saturating_sub(at);
                }
                t.in_use -= 1;
                if t.in_use == 0 {
                    t.idle_since = Some(unix);
                }
                t.spent.add(day, billable_secs);
                t.billable.increment(billable_secs);
            }
            None => {
                // Not reachable while the invariant "a trunk with channels is
                // never reclaimed" holds; stay correct anyway.
                if self.channels.remove(&ch.0).is_none() {
                    return;
                }
                let mut spent = DaySpent::default();
                spent.add(day, billable_secs);
                self.parked.entry(key).or_default().merge(spent);
            }
        }
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        self.metrics().channels.decrement(1.0);
    }

    /// Channels in use, edge-wide.
    pub fn channels_in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// Channels in use on the key's trunk.
    pub fn key_channels(&self, key_id: &str) -> usize {
        self.trunks.get(key_id).map_or(0, |t| t.in_use as usize)
    }

    /// Live trunks.
    pub fn trunks(&self) -> usize {
        self.trunks.len()
    }

    /// The key's billable seconds on the UTC day of `unix`, ended calls only.
    pub fn spent_today(&self, key_id: &str, unix: i64) -> u64 {
        let day = utc_day(unix);
        if let Some(t) = self.trunks.get(key_id) {
            return t.spent.on(day);
        }
        self.parked.get(key_id).map_or(0, |s| s.on(day))
    }

    /// Drops trunks that have had no channels for `idle_reclaim_secs`. Their
    /// spent seconds for today are kept aside and restored when the key calls
    /// again; those of earlier days are forgotten.
    pub fn reclaim_idle(&self, unix: i64) {
        let today = utc_day(unix);
        let idle_for = i64::try_from(self.edge().cfg.idle_reclaim_secs).unwrap_or(i64::MAX);
        self.trunks.retain(|key, t| {
            let idle = t.in_use == 0
                && t.idle_since
                    .is_some_and(|since| unix.saturating_sub(since) >= idle_for);
            if idle && t.spent.on(today) > 0 {
                self.parked.entry(key.clone()).or_default().merge(t.spent);
            }
            !idle
        });
        self.parked.retain(|_, s| s.day >= today);
    }

    /// Seeds the key's spent seconds on UTC `day` (from the CDR store at
    /// start-up, so that a restart keeps budgets). Raises the day's total to
    /// at least `secs`; never lowers it, so seeding twice is harmless.
    pub fn seed_spent(&self, key_id: &str, day: i64, secs: u64) {
        let seeded = DaySpent { day, secs };
        if let Some(mut t) = self.trunks.get_mut(key_id) {
            t.spent.merge(seeded);
            return;
        }
        self.parked
            .entry(Arc::from(key_id))
            .or_default()
            .merge(seeded);
        // A trunk created meanwhile took what was parked before, not this.
        if let Some(mut t) = self.trunks.get_mut(key_id) {
            if let Some((_, s)) = self.parked.remove(key_id) {
                t.spent.merge(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    use std::time::Duration;

    const DAY0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
    const OK_DEST: &str = "+14155550100";

    fn dest(s: &str) -> Dest {
        NumberPlan::default().canonicalize(s)
    }

    fn alloc() -> Allocator {
        Allocator::new(TrunkConfig::default())
    }

    fn limits(cps: Option<u32>, max_calls: Option<u32>, daily_minutes: Option<u32>) -> KeyLimits {
        KeyLimits {
            cps,
            max_calls,
            daily_minutes,
        }
    }

    #[test]
    fn cps_10_offered_50_per_second_for_10_seconds() {
        let a = alloc();
        let l = limits(Some(10), None, None);
        let t0 = Instant::now();
        let (mut admitted, mut limited) = (0, 0);
        for i in 0..500u64 {
            let now = t0 + Duration::from_millis(20 * i);
            let unix = DAY0 + (i / 50) as i64;
            match a.admit("k1", &l, &dest(OK_DEST), now, unix) {
                Ok(ch) => {
                    admitted += 1;
                    a.release(ch, 0, unix);
                }
                Err(Refusal::RateLimited { retry_after_secs }) => {
                    limited += 1;
                    assert_eq!(retry_after_secs, 1);
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert!((90..=110).contains(&admitted), "admitted {admitted}");
        assert_eq!(admitted + limited, 500);
        assert_eq!(a.channels_in_use(), 0);
    }

    #[test]
    fn retry_after_reflects_slow_refill() {
        let a = alloc();
        let l = limits(Some(1), None, None);
        let t0 = Instant::now();
        a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        let r = a.admit(
            "k",
            &l,
            &dest(OK_DEST),
            t0 + Duration::from_millis(10),
            DAY0,
        );
        assert_eq!(
            r,
            Err(Refusal::RateLimited {
                retry_after_secs: 1
            })
        );
        assert!(a
            .admit(
                "k",
                &l,
                &dest(OK_DEST),
                t0 + Duration::from_millis(1000),
                DAY0
            )
            .is_ok());
        let zero = limits(Some(0), None, None);
        assert!(matches!(
            a.admit("z", &zero, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::RateLimited { retry_after_secs }) if retry_after_secs > 1
        ));
    }

    #[test]
    fn max_calls_then_release() {
        let a = alloc();
        let l = limits(None, Some(5), None);
        let t0 = Instant::now();
        let chans: Vec<_> = (0..5)
            .map(|_| a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap())
            .collect();
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        assert_eq!(a.key_channels("k"), 5);
        // Another key is not affected.
        assert!(a.admit("other", &l, &dest(OK_DEST), t0, DAY0).is_ok());
        a.release(chans[0], 0, DAY0 + 5);
        assert!(a.admit("k", &l, &dest(OK_DEST), t0, DAY0 + 5).is_ok());
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, DAY0 + 5),
            Err(Refusal::Busy)
        );
    }

    #[test]
    fn busy_takes_no_rate_token_and_rate_takes_no_channel() {
        let a = alloc();
        let l = limits(Some(2), Some(1), None);
        let t0 = Instant::now();
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        // Busy many times: the one remaining token must survive.
        for _ in 0..10 {
            assert_eq!(
                a.admit("k", &l, &dest(OK_DEST), t0, DAY0),
                Err(Refusal::Busy)
            );
        }
        a.release(ch, 0, DAY0);
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        a.release(ch, 0, DAY0);
        // Bucket empty now: rate limited, and no channel taken.
        assert!(matches!(
            a.admit("k", &l, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::RateLimited { .. })
        ));
        assert_eq!(a.key_channels("k"), 0);
        assert_eq!(a.channels_in_use(), 0);
    }

    #[test]
    fn edge_cap() {
        let a = Allocator::new(TrunkConfig {
            edge_max_calls: 3,
            ..TrunkConfig::default()
        });
        let l = KeyLimits::default();
        let t0 = Instant::now();
        let c1 = a.admit("a", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        a.admit("b", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        a.admit("c", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        assert_eq!(
            a.admit("d", &l, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        // Edge full beats an empty bucket: concurrency is checked first.
        let slow = limits(Some(1), None, None);
        assert_eq!(
            a.admit("a", &slow, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        a.release(c1, 0, DAY0);
        assert!(a.admit("d", &l, &dest(OK_DEST), t0, DAY0).is_ok());
        assert_eq!(a.channels_in_use(), 3);
    }

    #[test]
    fn reconfigure_takes_effect_on_the_next_admit_and_keeps_channels() {
        let a = Allocator::new(TrunkConfig {
            edge_max_calls: 2,
            ..TrunkConfig::default()
        });
        let l = KeyLimits::default();
        let t0 = Instant::now();
        let c1 = a.admit("a", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        a.admit("b", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        assert_eq!(
            a.admit("c", &l, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        a.reconfigure(TrunkConfig {
            edge_max_calls: 3,
            premium_deny_prefixes: vec!["+4420".into()],
            ..TrunkConfig::default()
        });
        assert_eq!(a.config().edge_max_calls, 3);
        // The two channels taken before the reload are still counted.
        assert_eq!(a.channels_in_use(), 2);
        assert_eq!(
            a.admit("c", &l, &dest("+442071234567"), t0, DAY0),
            Err(Refusal::DestinationDenied)
        );
        assert!(a.admit("c", &l, &dest(OK_DEST), t0, DAY0).is_ok());
        assert_eq!(
            a.admit("d", &l, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        a.release(c1, 0, DAY0);
        assert!(a.admit("d", &l, &dest(OK_DEST), t0, DAY0).is_ok());
    }

    #[test]
    fn daily_minutes_budget_and_new_day() {
        let a = alloc();
        let l = limits(None, None, Some(1));
        let t0 = Instant::now();
        let start = DAY0 + 3600;
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, start).unwrap();
        assert_eq!(a.answered(ch, start + 2), Some(60));
        a.release(ch, 60, start + 62);
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, start + 63),
            Err(Refusal::BudgetExhausted)
        );
        assert_eq!(a.spent_today("k", start + 63), 60);
        // Next UTC day: fresh budget.
        let next_day = DAY0 + 86_400;
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, next_day).unwrap();
        assert_eq!(a.answered(ch, next_day), Some(60));
        // Unlimited key: None.
        let ch = a
            .admit("u", &KeyLimits::default(), &dest(OK_DEST), t0, next_day)
            .unwrap();
        assert_eq!(a.answered(ch, next_day), None);
    }

    #[test]
    fn budget_counts_calls_still_up() {
        let a = alloc();
        let l = limits(None, None, Some(1));
        let t0 = Instant::now();
        let c1 = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        assert_eq!(a.answered(c1, DAY0), Some(60));
        // 40 s into the first call, a second is answered: 20 s left.
        let c2 = a.admit("k", &l, &dest(OK_DEST), t0, DAY0 + 40).unwrap();
        assert_eq!(a.answered(c2, DAY0 + 40), Some(20));
        // Second answered() on the same channel keeps the first answer time.
        assert_eq!(a.answered(c2, DAY0 + 45), Some(10));
        // At 60 s of the first call's time the budget is used: refused.
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, DAY0 + 60),
            Err(Refusal::BudgetExhausted)
        );
        a.release(c1, 60, DAY0 + 60);
        a.release(c2, 20, DAY0 + 60);
        assert_eq!(a.spent_today("k", DAY0 + 60), 80);
        assert_eq!(a.channels_in_use(), 0);
        // Unknown/released channel: fail closed.
        assert_eq!(a.answered(c1, DAY0 + 61), Some(0));
    }

    #[test]
    fn premium_prefix_refused_first() {
        let a = alloc();
        let t0 = Instant::now();
        // Even a key at every limit gets 403 for a premium number, and the
        // refusal creates no trunk.
        let l = limits(Some(0), Some(0), Some(0));
        for d in [
            "+19005551234",
            "sip:+44-909-123-4567@x",
            "tel:+979123456789",
            "19005551234",
        ] {
            assert_eq!(
                a.admit("k", &l, &dest(d), t0, DAY0),
                Err(Refusal::DestinationDenied),
                "{d}"
            );
        }
        assert_eq!(a.trunks(), 0);
        assert!(a.destination_denied(&dest("+448712345678")));
        // Configurable: an empty list turns it off.
        let open = Allocator::new(TrunkConfig {
            premium_deny_prefixes: vec![],
            premium_deny_types: vec![],
            ..TrunkConfig::default()
        });
        assert!(open
            .admit("k", &KeyLimits::default(), &dest("+19005551234"), t0, DAY0)
            .is_ok());
    }

    #[test]
    fn release_is_idempotent_and_channels_return_to_zero() {
        let a = alloc();
        let l = limits(None, Some(2), Some(10));
        let t0 = Instant::now();
        let c1 = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        let c2 = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        a.answered(c1, DAY0 + 1);
        a.release(c1, 30, DAY0 + 31);
        a.release(c1, 30, DAY0 + 31);
        a.release(c1, 999, DAY0 + 40);
        assert_eq!(a.spent_today("k", DAY0 + 40), 30);
        assert_eq!(a.channels_in_use(), 1);
        a.release(c2, 0, DAY0 + 40);
        a.release(c2, 0, DAY0 + 40);
        assert_eq!(a.channels_in_use(), 0);
        assert_eq!(a.key_channels("k"), 0);
        a.release(ChannelId(12345), 10, DAY0);
        assert_eq!(a.channels_in_use(), 0);
    }

    #[test]
    fn idle_trunks_reclaimed_budget_kept() {
        let a = Allocator::new(TrunkConfig {
            idle_reclaim_secs: 60,
            ..TrunkConfig::default()
        });
        let l = limits(None, None, Some(1));
        let t0 = Instant::now();
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        a.admit("busy", &KeyLimits::default(), &dest(OK_DEST), t0, DAY0)
            .unwrap();
        a.answered(ch, DAY0);
        a.release(ch, 60, DAY0 + 60);
        a.reclaim_idle(DAY0 + 100);
        assert_eq!(a.trunks(), 2, "not idle long enough");
        a.reclaim_idle(DAY0 + 120);
        assert_eq!(a.trunks(), 1, "the trunk with a live channel stays");
        assert_eq!(a.key_channels("k"), 0);
        // The day's spend survived reclaim.
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, DAY0 + 130),
            Err(Refusal::BudgetExhausted)
        );
        assert_eq!(a.trunks(), 2);
        // Next day, after reclaim, the old day's spend is forgotten.
        a.reclaim_idle(DAY0 + 86_400 + 10);
        assert_eq!(a.spent_today("k", DAY0 + 86_400 + 10), 0);
        assert!(a
            .admit("k", &l, &dest(OK_DEST), t0, DAY0 + 86_400 + 10)
            .is_ok());
    }

    #[test]
    fn seed_spent_restores_budget() {
        let a = alloc();
        let l = limits(None, None, Some(2));
        let t0 = Instant::now();
        let day = crate::utc_day(DAY0);
        a.seed_spent("k", day, 100);
        a.seed_spent("k", day, 90); // never lowers
        assert_eq!(a.spent_today("k", DAY0), 100);
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        assert_eq!(a.answered(ch, DAY0), Some(20));
        // Seeding a live trunk works too.
        a.seed_spent("k", day, 120);
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, DAY0),
            Err(Refusal::BudgetExhausted)
        );
        // A seed for an earlier day does not count today.
        a.seed_spent("old", day - 1, 10_000);
        assert!(a.admit("old", &l, &dest(OK_DEST), t0, DAY0).is_ok());
    }

    #[test]
    fn concurrent_admits_never_exceed_max_calls() {
        const THREADS: usize = 8;
        let a = Arc::new(alloc());
        let l = limits(Some(1_000_000), Some(5), None);
        let t0 = Instant::now();

        // Phase 1: everyone admits and holds; exactly 5 succeed.
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (a, b) = (a.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    (0..20)
                        .filter_map(|_| a.admit("k", &l, &dest(OK_DEST), t0, DAY0).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let held: Vec<ChannelId> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(held.len(), 5);
        assert_eq!(a.key_channels("k"), 5);
        for ch in held {
            a.release(ch, 0, DAY0);
        }

        // Phase 2: admit/release churn; what callers hold never exceeds 5.
        let holding = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (a, b) = (a.clone(), barrier.clone());
                let (holding, max_seen) = (holding.clone(), max_seen.clone());
                std::thread::spawn(move || {
                    b.wait();
                    for _ in 0..2_000 {
                        if let Ok(ch) = a.admit("k", &l, &dest(OK_DEST), t0, DAY0) {
                            let n = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            max_seen.fetch_max(n, Ordering::SeqCst);
                            assert!(a.key_channels("k") <= 5);
                            holding.fetch_sub(1, Ordering::SeqCst);
                            a.release(ch, 1, DAY0);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(max_seen.load(Ordering::SeqCst) <= 5);
        assert!(max_seen.load(Ordering::SeqCst) >= 1);
        assert_eq!(a.channels_in_use(), 0);
        assert_eq!(a.key_channels("k"), 0);
    }

    #[test]
    fn allocator_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Allocator>();
    }
}
