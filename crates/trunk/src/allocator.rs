//! Elastic trunks: one per API key, grown per call up to the key's limits.
//!
//! # Hierarchy (SPEC §2)
//!
//! A restricted key's call counts against its own trunk **and the trunk of
//! every ancestor**: [`Allocator::admit_chain`] takes the key and its
//! ancestors ([`TrunkKey`], the key first) and admits only if every one of
//! them has a rate token, a free channel and budget left; the call then holds
//! a channel and a rate token on each. Ten children of a key with
//! `max_calls = 5` share those 5 channels with their parent.
//!
//! # Budgets shared by concurrent calls
//!
//! An answered call does not get "the rest of the day": it is granted a slice
//! of the budget that no other live call holds ([`Allocator::answered`]), and
//! asks for the next slice when it has used that one
//! ([`Allocator::budget_check`]). Slices granted on a trunk never add up to
//! more than its budget minus what ended calls spent, so however many calls
//! of a key (or of its descendants) are up at once, the day bills at most the
//! daily minutes plus the rounding of each call's last second.
//!
//! # Concurrency
//!
//! `trunks` maps a key id to its trunk behind its own mutex; `channels` maps
//! a channel id to the trunks it holds; `parked` keeps the day's spent seconds
//! of reclaimed trunks. An admission clones the handles of the chain's trunks
//! out of the map (no map lock is held while a trunk is locked) and locks the
//! trunks in key-id order, so two admissions over overlapping chains cannot
//! deadlock; keys outside each other's chains do not contend. The edge-wide
//! channel count is an atomic. Every operation is O(depth of the key) and O(1)
//! in the number of keys and calls.
//!
//! Lock order: a `channels` shard may be held while trunk mutexes are taken;
//! trunk mutexes in key-id order; a `trunks` or `parked` shard only for a
//! lookup or insert, never while waiting for a trunk mutex.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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

/// One key of an admission chain: the calling key first, then its parent,
/// and so on up to the root (SPEC §2). Ids must be distinct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrunkKey<'a> {
    /// The key id.
    pub id: &'a str,
    /// That key's limits.
    pub limits: KeyLimits,
}

/// Longest budget slice granted to an answered call at a time: a call of a
/// key with a large budget looks at it again at least this often.
const MAX_SLICE_SECS: u64 = 300;

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
    /// Budget seconds granted to live answered channels (sum of their slices).
    reserved: u64,
    /// Since when the trunk has had no channels.
    idle_since: Option<i64>,
    /// Set under the trunk's lock when it is dropped from the map: an admit
    /// that cloned the handle before must look the key up again.
    reclaimed: bool,
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
            reserved: 0,
            idle_since: Some(unix),
            reclaimed: false,
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

    /// The next slice this trunk can grant: a quarter of what no ended call
    /// spent and no live call holds, at least 1 s while any is left, at most
    /// [`MAX_SLICE_SECS`]; `None` without a budget.
    fn slice(&self, unix: i64) -> Option<u64> {
        let budget = self.daily_secs?;
        let free = budget
            .saturating_sub(self.spent.on(utc_day(unix)))
            .saturating_sub(self.reserved);
        Some(if free == 0 {
            0
        } else {
            (free / 4).clamp(1, MAX_SLICE_SECS)
        })
    }
}

type TrunkHandle = Arc<Mutex<Trunk>>;

fn lock(t: &TrunkHandle) -> MutexGuard<'_, Trunk> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Channel {
    /// The trunks this channel holds, the calling key's first.
    trunks: Box<[(Arc<str>, TrunkHandle)]>,
    answered_at: Option<i64>,
    /// Budget seconds granted to this call so far (on every trunk it holds).
    granted: u64,
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
    trunks: DashMap<Arc<str>, TrunkHandle>,
    channels: DashMap<u64, Channel>,
    /// Today's spent seconds of keys whose trunk was reclaimed.
    parked: DashMap<Arc<str>, DaySpent>,
    in_use: AtomicUsize,
    next_id: AtomicU64,
    metrics: OnceLock<Metrics>,
}

/// Longest key chain admitted (a longer one is refused as busy): a key and
/// the most ancestors a key store follows.
pub const MAX_CHAIN: usize = tollgate_keys::store::MAX_DEPTH + 1;

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

    fn refuse<T>(&self, r: Refusal) -> Result<T, Refusal> {
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
    /// The same as [`Allocator::admit_chain`] for a key without ancestors.
    pub fn admit(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        destination: &Dest,
        now: Instant,
        unix: i64,
    ) -> Result<ChannelId, Refusal> {
        let chain = [TrunkKey {
            id: key_id,
            limits: *limits,
        }];
        self.admit_chain(&chain, destination, now, unix)
    }

    /// Takes a channel on the trunk of `chain[0]` (the calling key) and of
    /// each of its ancestors (`chain[1..]`), creating trunks on first use.
    ///
    /// Checks, in order: destination, daily budget, concurrency (every key
    /// of the chain, then the edge), calls per second (every key). A call
    /// refused for any reason takes no rate token and no channel anywhere.
    /// Limits are each key's current ones; a change takes effect on the next
    /// admit. An empty chain, or one deeper than [`MAX_CHAIN`], is refused as
    /// [`Refusal::Busy`].
    pub fn admit_chain(
        &self,
        chain: &[TrunkKey<'_>],
        destination: &Dest,
        now: Instant,
        unix: i64,
    ) -> Result<ChannelId, Refusal> {
        let edge = self.edge();
        if edge.deny.denies(destination) {
            return self.refuse(Refusal::DestinationDenied);
        }
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return self.refuse(Refusal::Busy);
        }
        loop {
            let handles: Box<[(Arc<str>, TrunkHandle)]> = chain
                .iter()
                .map(|k| self.trunk_handle(k.id, unix))
                .collect();
            let mut guards = lock_in_order(&handles);
            if guards.iter().any(|g| g.reclaimed) {
                continue; // reclaimed between the lookup and the lock
            }
            let admitted = self.admit_locked(chain, &mut guards, &edge, now, unix);
            drop(guards);
            return admitted.map(|()| {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.channels.insert(
                    id,
                    Channel {
                        trunks: handles,
                        answered_at: None,
                        granted: 0,
                    },
                );
                self.metrics().channels.increment(1.0);
                ChannelId(id)
            });
        }
    }

    /// The checks and takes of [`Allocator::admit_chain`] on the locked chain.
    fn admit_locked(
        &self,
        chain: &[TrunkKey<'_>],
        guards: &mut [MutexGuard<'_, Trunk>],
        edge: &EdgeSettings,
        now: Instant,
        unix: i64,
    ) -> Result<(), Refusal> {
        for (g, k) in guards.iter_mut().zip(chain) {
            g.daily_secs = k.limits.daily_minutes.map(|m| u64::from(m) * 60);
        }
        if guards
            .iter()
            .any(|g| g.daily_secs.is_some_and(|budget| g.used(unix) >= budget))
        {
            return self.refuse(Refusal::BudgetExhausted);
        }
        if guards
            .iter()
            .zip(chain)
            .any(|(g, k)| k.limits.max_calls.is_some_and(|max| g.in_use >= max))
        {
            return self.refuse(Refusal::Busy);
        }
        let cap = edge.cfg.edge_max_calls as usize;
        let mut retry_after: Option<u32> = None;
        for (g, k) in guards.iter_mut().zip(chain) {
            match k.limits.cps {
                Some(cps) => {
                    let bucket = g.bucket.get_or_insert_with(|| TokenBucket::new(cps, now));
                    bucket.refill(cps, now);
                    if !bucket.has_token() {
                        let r = bucket.retry_after_secs();
                        retry_after = Some(retry_after.map_or(r, |x| x.max(r)));
                    }
                }
                None => g.bucket = None,
            }
        }
        if let Some(retry_after_secs) = retry_after {
            // Concurrency comes before rate: a full edge is Busy either way.
            if self.in_use.load(Ordering::Acquire) >= cap {
                return self.refuse(Refusal::Busy);
            }
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
        for g in guards.iter_mut() {
            if let Some(bucket) = g.bucket.as_mut() {
                bucket.take();
            }
            g.in_use += 1;
            g.idle_since = None;
        }
        guards[0].calls.increment(1);
        Ok(())
    }

    fn trunk_handle(&self, key_id: &str, unix: i64) -> (Arc<str>, TrunkHandle) {
        if let Some(e) = self.trunks.get(key_id) {
            return (e.key().clone(), e.value().clone());
        }
        let e = self.trunks.entry(Arc::from(key_id)).or_insert_with(|| {
            let spent = self
                .parked
                .remove(key_id)
                .map(|(_, s)| s)
                .unwrap_or_default();
            Arc::new(Mutex::new(Trunk::new(key_id, spent, unix)))
        });
        (e.key().clone(), e.value().clone())
    }

    /// The call on `ch` was answered at `unix`. Grants it the first slice of
    /// the budget and returns its length in seconds: the B2BUA calls
    /// [`Allocator::budget_check`] when it has run out. `None` if no key of
    /// the chain has a daily budget; `Some(0)` if the budget is spent (cut
    /// the call), also for an unknown or released channel (fail closed).
    /// Calling it twice keeps the first answer time and grants nothing more.
    pub fn answered(&self, ch: ChannelId, unix: i64) -> Option<u64> {
        let Some(mut channel) = self.channels.get_mut(&ch.0) else {
            return Some(0);
        };
        if channel.answered_at.is_some() {
            return Self::remaining_grant(&channel, unix);
        }
        channel.answered_at = Some(unix);
        for (_, t) in channel.trunks.iter() {
            let mut t = lock(t);
            t.answered += 1;
            t.answer_sum = t.answer_sum.saturating_add(unix);
        }
        self.grant(&mut channel, unix)
    }

    /// The budget slice of an answered call on `ch` has run out at `unix`
    /// (or the B2BUA wants to know how long it may go on): returns the
    /// seconds until the next check, after granting the next slice when
    /// the current one is used up; `Some(0)` when the budget of the key or
    /// of an ancestor is spent (cut the call), `None` without a budget.
    pub fn budget_check(&self, ch: ChannelId, unix: i64) -> Option<u64> {
        let Some(mut channel) = self.channels.get_mut(&ch.0) else {
            return Some(0);
        };
        if channel.answered_at.is_none() {
            return Some(0);
        }
        match Self::remaining_grant(&channel, unix) {
            Some(0) => self.grant(&mut channel, unix),
            other => other,
        }
    }

    /// Seconds left of what `channel` was granted (`None`: no budget).
    fn remaining_grant(channel: &Channel, unix: i64) -> Option<u64> {
        let answered = channel.answered_at?;
        let has_budget = channel
            .trunks
            .iter()
            .any(|(_, t)| lock(t).daily_secs.is_some());
        if !has_budget {
            return None;
        }
        let used = unix.saturating_sub(answered).max(0) as u64;
        Some(channel.granted.saturating_sub(used))
    }

    /// Grants `channel` the next slice (the smallest any trunk of its chain
    /// can give) on every trunk; returns it (0: spent), `None` without budget.
    fn grant(&self, channel: &mut Channel, unix: i64) -> Option<u64> {
        // Computed and reserved under every lock of the chain, so that
        // concurrent grants never hand out the same free seconds twice.
        let mut guards = lock_in_order(&channel.trunks);
        let slice = guards.iter().filter_map(|g| g.slice(unix)).min()?;
        if slice > 0 {
            for g in guards.iter_mut() {
                g.reserved = g.reserved.saturating_add(slice);
            }
        }
        drop(guards);
        if slice > 0 {
            let answered = channel.answered_at.unwrap_or(unix);
            // The slice counts from now: time already used past the last
            // grant (a late check) is not granted twice.
            let used = unix.saturating_sub(answered).max(0) as u64;
            channel.granted = channel.granted.max(used).saturating_add(slice);
        }
        Some(slice)
    }

    /// Gives the channel back; `billable_secs` count against the UTC day of
    /// `unix` of the key and of every ancestor it was admitted with.
    /// Idempotent: releasing an unknown or released id is a no-op.
    pub fn release(&self, ch: ChannelId, billable_secs: u64, unix: i64) {
        let Some((_, channel)) = self.channels.remove(&ch.0) else {
            return;
        };
        let day = utc_day(unix);
        for (i, (_, t)) in channel.trunks.iter().enumerate() {
            let mut t = lock(t);
            if let Some(at) = channel.answered_at {
                t.answered = t.answered.saturating_sub(1);
                t.answer_sum = t.answer_sum.saturating_sub(at);
            }
            t.reserved = t.reserved.saturating_sub(channel.granted);
            t.in_use = t.in_use.saturating_sub(1);
            if t.in_use == 0 {
                t.idle_since = Some(unix);
            }
            t.spent.add(day, billable_secs);
            if i == 0 {
                t.billable.increment(billable_secs);
            }
        }
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        self.metrics().channels.decrement(1.0);
    }

    /// Channels in use, edge-wide.
    pub fn channels_in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// Channels in use on the key's trunk (its own calls and its descendants').
    pub fn key_channels(&self, key_id: &str) -> usize {
        self.trunks
            .get(key_id)
            .map(|t| t.value().clone())
            .map_or(0, |t| lock(&t).in_use as usize)
    }

    /// Live trunks.
    pub fn trunks(&self) -> usize {
        self.trunks.len()
    }

    /// The key's billable seconds on the UTC day of `unix`, ended calls only
    /// (its descendants' included).
    pub fn spent_today(&self, key_id: &str, unix: i64) -> u64 {
        let day = utc_day(unix);
        if let Some(t) = self.trunks.get(key_id).map(|t| t.value().clone()) {
            return lock(&t).spent.on(day);
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
            // An admit holding this trunk's lock is about to take a channel:
            // keep it.
            let Ok(mut t) = t.try_lock() else {
                return true;
            };
            let idle = t.in_use == 0
                && t.idle_since
                    .is_some_and(|since| unix.saturating_sub(since) >= idle_for);
            if idle {
                t.reclaimed = true;
                if t.spent.on(today) > 0 {
                    self.parked.entry(key.clone()).or_default().merge(t.spent);
                }
            }
            !idle
        });
        self.parked.retain(|_, s| s.day >= today);
    }

    /// Seeds the key's spent seconds on UTC `day` (from the CDR store at
    /// start-up, so that a restart keeps budgets). Raises the day's total to
    /// at least `secs`; never lowers it, so seeding twice is harmless. The
    /// caller seeds each ancestor with the sum over its subtree.
    pub fn seed_spent(&self, key_id: &str, day: i64, secs: u64) {
        let seeded = DaySpent { day, secs };
        if let Some(t) = self.trunks.get(key_id).map(|t| t.value().clone()) {
            lock(&t).spent.merge(seeded);
            return;
        }
        self.parked
            .entry(Arc::from(key_id))
            .or_default()
            .merge(seeded);
        // A trunk created meanwhile took what was parked before, not this.
        if let Some(t) = self.trunks.get(key_id).map(|t| t.value().clone()) {
            if let Some((_, s)) = self.parked.remove(key_id) {
                lock(&t).spent.merge(s);
            }
        }
    }
}

/// Locks every trunk of `handles` in key-id order (deadlock-free across
/// overlapping chains); the guards come back in the order of `handles`.
fn lock_in_order(handles: &[(Arc<str>, TrunkHandle)]) -> Vec<MutexGuard<'_, Trunk>> {
    let mut order: Vec<usize> = (0..handles.len()).collect();
    order.sort_by(|&a, &b| handles[a].0.cmp(&handles[b].0));
    let mut slots: Vec<Option<MutexGuard<'_, Trunk>>> = (0..handles.len()).map(|_| None).collect();
    for i in order {
        slots[i] = Some(lock(&handles[i].1));
    }
    slots.into_iter().flatten().collect()
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
        // A quarter of the free budget at a time.
        assert_eq!(a.answered(ch, start + 2), Some(15));
        assert_eq!(a.budget_check(ch, start + 10), Some(7));
        assert_eq!(a.budget_check(ch, start + 17), Some(11)); // (60-15)/4
        a.release(ch, 60, start + 62);
        assert_eq!(
            a.admit("k", &l, &dest(OK_DEST), t0, start + 63),
            Err(Refusal::BudgetExhausted)
        );
        assert_eq!(a.spent_today("k", start + 63), 60);
        // Next UTC day: fresh budget.
        let next_day = DAY0 + 86_400;
        let ch = a.admit("k", &l, &dest(OK_DEST), t0, next_day).unwrap();
        assert_eq!(a.answered(ch, next_day), Some(15));
        // Unlimited key: None.
        let ch = a
            .admit("u", &KeyLimits::default(), &dest(OK_DEST), t0, next_day)
            .unwrap();
        assert_eq!(a.answered(ch, next_day), None);
        assert_eq!(a.budget_check(ch, next_day + 100), None);
    }

    #[test]
    fn budget_counts_calls_still_up() {
        let a = alloc();
        let l = limits(None, None, Some(1));
        let t0 = Instant::now();
        let c1 = a.admit("k", &l, &dest(OK_DEST), t0, DAY0).unwrap();
        assert_eq!(a.answered(c1, DAY0), Some(15));
        // 40 s into the first call (it re-checked on time), a second is
        // answered: of the 60 s, 40 are used and c1 is granted 5 more.
        assert_eq!(a.budget_check(c1, DAY0 + 15), Some(11));
        assert_eq!(a.budget_check(c1, DAY0 + 26), Some(8));
        assert_eq!(a.budget_check(c1, DAY0 + 34), Some(6));
        assert_eq!(a.budget_check(c1, DAY0 + 40), Some(5));
        let c2 = a.admit("k", &l, &dest(OK_DEST), t0, DAY0 + 40).unwrap();
        // free: 60 - 45 (granted to c1) = 15 -> 3.
        assert_eq!(a.answered(c2, DAY0 + 40), Some(3));
        // Second answered() on the same channel keeps the first answer time.
        assert_eq!(a.answered(c2, DAY0 + 42), Some(1));
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
        assert_eq!(a.budget_check(c1, DAY0 + 61), Some(0));
    }

    /// Runs answered calls of `chains` (answer times given) the way the
    /// B2BUA does: each checks its budget when its slice runs out and ends
    /// when it is spent (billable: its whole seconds up). Returns each
    /// call's billable seconds.
    fn run_budgeted_calls(a: &Allocator, chains: &[(&[TrunkKey<'_>], i64)]) -> Vec<u64> {
        let t0 = Instant::now();
        let chs: Vec<(ChannelId, i64)> = chains
            .iter()
            .map(|(c, at)| (a.admit_chain(c, &dest(OK_DEST), t0, DAY0).unwrap(), *at))
            .collect();
        let mut next: Vec<Option<i64>> = vec![None; chs.len()];
        let mut billed = vec![0; chs.len()];
        for t in DAY0..DAY0 + 3600 {
            for (i, (ch, at)) in chs.iter().enumerate() {
                let due = match next[i] {
                    None if t == DAY0 + at => a.answered(*ch, t),
                    Some(n) if n == t => a.budget_check(*ch, t),
                    _ => continue,
                };
                match due {
                    Some(0) => {
                        billed[i] = (t - DAY0 - at) as u64;
                        a.release(*ch, billed[i], t);
                        next[i] = Some(i64::MIN);
                    }
                    Some(s) => next[i] = Some(t + s as i64),
                    None => panic!("no budget"),
                }
            }
            if next.iter().all(|n| *n == Some(i64::MIN)) {
                return billed;
            }
        }
        panic!("calls not cut within an hour: {next:?}");
    }

    #[test]
    fn concurrent_answered_calls_share_the_remaining_budget() {
        let a = alloc();
        let key = [TrunkKey {
            id: "k",
            limits: limits(None, None, Some(1)),
        }];
        // Three calls answered together, and three that join later.
        for answers in [[0, 0, 0], [0, 10, 30]] {
            let a = alloc();
            let chains: Vec<(&[TrunkKey<'_>], i64)> =
                answers.iter().map(|&at| (&key[..], at)).collect();
            let billed = run_budgeted_calls(&a, &chains);
            let total: u64 = billed.iter().sum();
            assert!((57..=66).contains(&total), "{answers:?}: {billed:?}");
            assert_eq!(a.channels_in_use(), 0);
        }
        // Spent: the next call is refused.
        let ch = a
            .admit_chain(&key, &dest(OK_DEST), Instant::now(), DAY0)
            .unwrap();
        a.release(ch, 60, DAY0 + 1);
        assert_eq!(
            a.admit_chain(&key, &dest(OK_DEST), Instant::now(), DAY0 + 2),
            Err(Refusal::BudgetExhausted)
        );
    }

    #[test]
    fn a_child_counts_against_every_ancestor() {
        let a = alloc();
        let t0 = Instant::now();
        let root = TrunkKey {
            id: "root",
            limits: limits(Some(1000), Some(1), None),
        };
        let child = TrunkKey {
            id: "child",
            limits: limits(Some(1000), Some(1), None),
        };
        let sibling = TrunkKey {
            id: "sibling",
            limits: limits(None, Some(5), None),
        };
        // The parent's only channel is busy: its child gets Busy.
        let p = a.admit_chain(&[root], &dest(OK_DEST), t0, DAY0).unwrap();
        assert_eq!(
            a.admit_chain(&[child, root], &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        a.release(p, 0, DAY0);
        // The child's call holds the parent's channel: siblings and the
        // parent itself are Busy until it ends.
        let c = a
            .admit_chain(&[child, root], &dest(OK_DEST), t0, DAY0)
            .unwrap();
        assert_eq!(a.key_channels("root"), 1);
        assert_eq!(
            a.admit_chain(&[sibling, root], &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        assert_eq!(
            a.admit_chain(&[root], &dest(OK_DEST), t0, DAY0),
            Err(Refusal::Busy)
        );
        a.release(c, 30, DAY0 + 30);
        assert_eq!(a.key_channels("root"), 0);
        assert_eq!(a.key_channels("child"), 0);
        assert_eq!(a.spent_today("root", DAY0 + 30), 30);
        assert_eq!(a.spent_today("child", DAY0 + 30), 30);
        assert_eq!(a.channels_in_use(), 0);
    }

    #[test]
    fn calls_per_second_of_an_ancestor_bound_its_children() {
        let a = alloc();
        let t0 = Instant::now();
        let root = TrunkKey {
            id: "root",
            limits: limits(Some(2), None, None),
        };
        let kids: Vec<TrunkKey<'_>> = ["c1", "c2", "c3"]
            .iter()
            .map(|id| TrunkKey {
                id,
                limits: limits(Some(2), None, None),
            })
            .collect();
        let mut admitted = 0;
        for k in &kids {
            for _ in 0..2 {
                match a.admit_chain(&[*k, root], &dest(OK_DEST), t0, DAY0) {
                    Ok(ch) => {
                        admitted += 1;
                        a.release(ch, 0, DAY0);
                    }
                    Err(Refusal::RateLimited { retry_after_secs }) => {
                        assert!(retry_after_secs >= 1)
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        assert_eq!(admitted, 2, "the root's 2 cps are shared by its children");
    }

    #[test]
    fn daily_minutes_of_an_ancestor_bound_its_children() {
        let a = alloc();
        let root = TrunkKey {
            id: "root",
            limits: limits(None, None, Some(1)),
        };
        let c1 = TrunkKey {
            id: "c1",
            limits: limits(None, None, Some(1)),
        };
        let c2 = TrunkKey {
            id: "c2",
            limits: limits(None, None, None),
        };
        let chain1 = [c1, root];
        let chain2 = [c2, root];
        let billed =
            run_budgeted_calls(&a, &[(&chain1[..], 0), (&chain2[..], 0), (&chain2[..], 5)]);
        let total: u64 = billed.iter().sum();
        assert!((57..=66).contains(&total), "{billed:?}");
        assert_eq!(
            a.admit_chain(&chain2, &dest(OK_DEST), Instant::now(), DAY0 + 3000),
            Err(Refusal::BudgetExhausted)
        );
        assert!(a.spent_today("root", DAY0 + 3000) >= 57);
    }

    #[test]
    fn overlapping_chains_admitted_from_many_threads_do_not_deadlock() {
        const THREADS: usize = 8;
        let a = Arc::new(alloc());
        let t0 = Instant::now();
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (a, b) = (a.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let ids = ["a", "b", "c", "d"];
                    let l = limits(None, Some(3), Some(100));
                    let chain: Vec<TrunkKey<'_>> = (0..3)
                        .map(|j| TrunkKey {
                            id: ids[(i + j) % 4],
                            limits: l,
                        })
                        .collect();
                    b.wait();
                    for n in 0..2_000 {
                        if let Ok(ch) = a.admit_chain(&chain, &dest(OK_DEST), t0, DAY0) {
                            assert!(ids.iter().all(|k| a.key_channels(k) <= 3));
                            a.answered(ch, DAY0);
                            a.budget_check(ch, DAY0 + 1);
                            a.release(ch, 0, DAY0);
                        }
                        if n % 500 == 0 {
                            a.reclaim_idle(DAY0 + 10_000);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.channels_in_use(), 0);
        for k in ["a", "b", "c", "d"] {
            assert_eq!(a.key_channels(k), 0);
        }
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
        assert_eq!(a.answered(ch, DAY0), Some(5)); // (120 - 100) / 4
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
