//! Key records and key stores.
//!
//! A [`KeyRecord`] holds what the edge needs to verify credentials made from a
//! key (never the key itself). [`KeyStore`] is the read side used on the hot
//! path; [`FileKeyStore`] keeps records in `<data-dir>/keys.json`, shared by
//! the running server and the `tollgate keys` CLI; [`MemoryKeyStore`] is for
//! tests and as the shape of a future distributed store.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::apikey::{ApiKey, KeyKind};
use crate::number::NumberPlan;
use crate::{KeyError, Result};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Place calls (the only scope a public key may hold).
    Calls,
    /// Manage keys (admin API).
    Keys,
    /// Read usage and CDRs.
    Usage,
    /// Manage trunks and active calls.
    Trunks,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Calls, Scope::Keys, Scope::Usage, Scope::Trunks];

    /// The lowercase name (same as serde).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Calls => "calls",
            Scope::Keys => "keys",
            Scope::Usage => "usage",
            Scope::Trunks => "trunks",
        }
    }

    /// Scopes a key of `kind` may hold, and gets by default: all for a secret
    /// key, `calls` for a public key.
    pub fn allowed_for(kind: KeyKind) -> &'static [Scope] {
        match kind {
            KeyKind::Secret => &Scope::ALL,
            KeyKind::Public => &[Scope::Calls],
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Scope> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| KeyError::Invalid(format!("unknown scope {s:?}")))
    }
}

/// A key's limits. `None` / empty means "no limit" except where noted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Calls per second.
    pub cps: Option<u32>,
    /// Concurrent calls.
    pub max_calls: Option<u32>,
    /// Billable minutes per UTC day.
    pub daily_minutes: Option<u32>,
    /// Destinations allowed (prefixes or names, canonical per SPEC §4a, see
    /// [`crate::number::NumberPlan::prefix`]).
    /// Empty: any destination for a secret key, none for a public key.
    pub allow_prefixes: Vec<String>,
    /// Destinations denied; beats `allow_prefixes`.
    pub deny_prefixes: Vec<String>,
    /// The only addresses the key's credentials work from, whatever the kind
    /// (bearer, digest, admin API; SPEC §2): from elsewhere the answer is 403.
    /// Empty: anywhere. The source check applies this list of the key **and
    /// of every ancestor** ([`source_allowed`]), so a child cannot escape its
    /// parent's restriction.
    pub source_cidrs: Vec<IpNet>,
    /// Sources admitted without a credential (carrier interconnects, SPEC
    /// §3c); must lie inside `source_cidrs` when both are set. A bad
    /// credential from such a source is still refused.
    ///
    /// Records stored before this field existed used `source_cidrs` to mean
    /// "trusted": [`KeyRecord`]'s deserialisation copies `source_cidrs` into
    /// `trusted_cidrs` when the field is absent, so they keep admitting their
    /// carriers (and their credentials now also work only from there).
    pub trusted_cidrs: Vec<IpNet>,
    /// Caller identities the key may present (numbers or prefixes, SPEC
    /// §3d); empty: any.
    pub caller_ids: Vec<String>,
    /// The key stops working at this Unix time (seconds).
    pub expires_at: Option<u64>,
}

impl Limits {
    /// Checks that these limits are no looser than `parent`'s; the error says which field.
    ///
    /// * `cps`, `max_calls`, `daily_minutes`, `expires_at`: if the parent sets
    ///   one, the child must set it to at most the parent's value.
    /// * `allow_prefixes`: if the parent has any, the child must have some, each
    ///   within one of the parent's.
    /// * `deny_prefixes`: each of the parent's must be covered by one of the child's.
    /// * `caller_ids`: like `allow_prefixes`.
    /// * `source_cidrs`: if the parent restricts (has any), the child must
    ///   have some, each within one of the parent's.
    /// * `trusted_cidrs`: if the parent restricts sources, each within one of
    ///   the parent's `source_cidrs` (a parent cannot hand out credential-less
    ///   trust from where its own credentials do not work).
    ///
    /// Prefixes are compared canonical (stored ones are canonical already;
    /// an older national form is read in the default plan). The child's own rules ([`Limits::check_own`]) are checked too.
    pub fn check_within(&self, parent: &Limits) -> std::result::Result<(), String> {
        self.check_own()?;
        for (name, child, parent) in [
            ("cps", self.cps.map(u64::from), parent.cps.map(u64::from)),
            (
                "max_calls",
                self.max_calls.map(u64::from),
                parent.max_calls.map(u64::from),
            ),
            (
                "daily_minutes",
                self.daily_minutes.map(u64::from),
                parent.daily_minutes.map(u64::from),
            ),
            ("expires_at", self.expires_at, parent.expires_at),
        ] {
            if let Some(p) = parent {
                if child.is_none_or(|c| c > p) {
                    return Err(format!("{name} must be set and at most {p} (the parent's)"));
                }
            }
        }
        let plan = NumberPlan::default();
        let within = |c: &str, p: &str| match (plan.prefix(c), plan.prefix(p)) {
            (Some(c), Some(p)) => c.within(&p),
            (_, None) => p == c || p.is_empty(),
            (None, Some(_)) => false,
        };
        for (name, child, parent) in [
            (
                "allow_prefixes",
                &self.allow_prefixes,
                &parent.allow_prefixes,
            ),
            ("caller_ids", &self.caller_ids, &parent.caller_ids),
        ] {
            if parent.is_empty() {
                continue;
            }
            if child.is_empty() {
                return Err(format!("{name} must be set (the parent has some)"));
            }
            for c in child {
                if !parent.iter().any(|p| within(c, p)) {
                    return Err(format!("{name}: {c:?} is outside the parent's"));
                }
            }
        }
        for p in &parent.deny_prefixes {
            if !self.deny_prefixes.iter().any(|c| within(p, c)) {
                return Err(format!("deny prefix {p:?} of the parent must be kept"));
            }
        }
        if !parent.source_cidrs.is_empty() {
            if self.source_cidrs.is_empty() {
                return Err("source_cidrs must be set (the parent restricts its sources)".into());
            }
            for (field, list) in [
                ("source_cidrs", &self.source_cidrs),
                ("trusted_cidrs", &self.trusted_cidrs),
            ] {
                if let Some(c) = list.iter().find(|c| !within_any(c, &parent.source_cidrs)) {
                    return Err(format!("{field}: {c} is outside the parent's source_cidrs"));
                }
            }
        }
        Ok(())
    }

    /// Rules of one key's limits on their own: `trusted_cidrs` lie inside
    /// `source_cidrs` when both are set.
    pub fn check_own(&self) -> std::result::Result<(), String> {
        if !self.source_cidrs.is_empty() {
            if let Some(c) = self
                .trusted_cidrs
                .iter()
                .find(|c| !within_any(c, &self.source_cidrs))
            {
                return Err(format!(
                    "trusted_cidrs: {c} is outside the key's source_cidrs"
                ));
            }
        }
        Ok(())
    }

    /// True if `ip` is one of the key's own allowed sources (no list: any).
    /// See [`source_allowed`] for the check that includes ancestors.
    pub fn allows_source(&self, ip: IpAddr) -> bool {
        self.source_cidrs.is_empty() || self.source_cidrs.iter().any(|c| c.contains(&ip))
    }
}

fn within_any(c: &IpNet, outer: &[IpNet]) -> bool {
    outer.iter().any(|o| o.contains(c))
}

/// What is stored for one secret of a key: enough to verify, never the key.
///
/// `Debug` shows only `not_after`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMaterial {
    /// JWT signing key ([`crate::apikey::signing_key`]); hex in JSON.
    #[serde(with = "hex32")]
    pub signing_key: [u8; 32],
    /// Digest password ([`crate::apikey::digest_password`]).
    pub digest_password: String,
    /// SHA-256 of the full key, for the admin API; hex in JSON.
    #[serde(with = "hex32")]
    pub key_hash: [u8; 32],
    /// Webhook signing secret ([`crate::apikey::webhook_secret`], lowercase
    /// hex). `None` in records written before webhooks existed: such a key
    /// sends no webhooks until it is rolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// `None` for the current secret; for an old secret kept after a roll
    /// with grace, the Unix time it stops working.
    #[serde(default)]
    pub not_after: Option<u64>,
}

impl SecretMaterial {
    /// Derives the stored material of `key`.
    pub fn derive(key: &ApiKey, not_after: Option<u64>) -> Self {
        SecretMaterial {
            signing_key: key.signing_key(),
            digest_password: key.digest_password(),
            key_hash: key.key_hash(),
            webhook_secret: Some(key.webhook_secret()),
            not_after,
        }
    }

    /// True if this secret still works at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        self.not_after.is_none_or(|t| now < t)
    }
}

impl fmt::Debug for SecretMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretMaterial")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// One API key as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Secret or public.
    pub kind: KeyKind,
    /// The key that created this one, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// Limits and destination/source policy.
    #[serde(default, deserialize_with = "limits_compat")]
    pub limits: Limits,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Revocation time, Unix seconds.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// Current secret first, then old secrets still in their grace period.
    pub secrets: Vec<SecretMaterial>,
    /// Where call events go when a call's token names no `webhook` (an
    /// https URL, checked by the caller; SPEC §7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

/// Reads stored limits; a record from before `trusted_cidrs` existed (no such
/// field) meant its `source_cidrs` as "trusted without a credential", so
/// they become its `trusted_cidrs` as well (see [`Limits::trusted_cidrs`]).
fn limits_compat<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Limits, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let legacy = v
        .as_object()
        .is_some_and(|o| !o.contains_key("trusted_cidrs"));
    let mut limits = Limits::deserialize(v).map_err(serde::de::Error::custom)?;
    if legacy {
        limits.trusted_cidrs = limits.source_cidrs.clone();
    }
    Ok(limits)
}

impl KeyRecord {
    /// Not revoked and not expired at `now`.
    pub fn is_usable(&self, now: u64) -> bool {
        self.revoked_at.is_none() && self.limits.expires_at.is_none_or(|t| now < t)
    }

    /// Secrets that still work at `now` (current, and old ones within grace).
    /// Does not look at revocation or expiry: check [`KeyRecord::is_usable`] too.
    pub fn live_secrets(&self, now: u64) -> impl Iterator<Item = &SecretMaterial> + '_ {
        self.secrets.iter().filter(move |s| s.is_live(now))
    }

    /// The webhook secret of the current secret (SPEC §7), if the record has
    /// one (records from before webhooks do not).
    pub fn webhook_secret(&self) -> Option<&str> {
        self.secrets.first()?.webhook_secret.as_deref()
    }

    /// Signing keys of the live secrets, or nothing if the key is not usable.
    pub fn live_signing_keys(&self, now: u64) -> Vec<[u8; 32]> {
        if !self.is_usable(now) {
            return Vec::new();
        }
        self.live_secrets(now).map(|s| s.signing_key).collect()
    }

    /// True if the key holds `scope`.
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// True if `key` is this key (id, kind and a live secret's hash, compared
    /// in constant time) and the key is usable at `now`. For the admin API.
    pub fn matches_key(&self, key: &ApiKey, now: u64) -> bool {
        if key.id() != self.id || key.kind() != self.kind || !self.is_usable(now) {
            return false;
        }
        let h = key.key_hash();
        self.live_secrets(now)
            .fold(false, |ok, s| ok | crate::ct::eq(&s.key_hash, &h))
    }
}

/// Read access to key records, cheap enough for every INVITE.
pub trait KeyStore: Send + Sync + 'static {
    /// The record with this id, if any (revoked and expired ones included).
    fn get(&self, id: &str) -> Option<Arc<KeyRecord>>;

    /// Every record, ordered by creation time then id.
    fn list(&self) -> Vec<Arc<KeyRecord>>;

    /// The usable record that `key` belongs to (admin-API authentication).
    fn verify_key(&self, key: &ApiKey, now: u64) -> Option<Arc<KeyRecord>> {
        self.get(key.id()).filter(|r| r.matches_key(key, now))
    }

    /// The usable key whose `trusted_cidrs` admit `ip` without a credential
    /// (SPEC §3c): the most specific CIDR wins, then the lowest id. Looked up
    /// in an index built when keys load or change ([`TrustIndex`]), never by
    /// scanning every key. The caller still applies [`source_allowed`].
    fn trusted_for(&self, ip: IpAddr, now: u64) -> Option<Arc<KeyRecord>>;
}

/// The write side of a key store (CLI and admin API), beside [`KeyStore`].
///
/// Methods block (file lock and fsync, or a network round trip): call them
/// off the async runtime. Implemented by [`FileKeyStore`] (embedded) and by
/// the shared store of a fleet (crates/state).
pub trait KeyAdmin: KeyStore {
    /// Creates a key; returns its record and the key (shown once, never stored).
    fn create(
        &self,
        name: &str,
        kind: KeyKind,
        scopes: Option<Vec<Scope>>,
        limits: Limits,
        parent: Option<&str>,
        now: u64,
    ) -> Result<(Arc<KeyRecord>, ApiKey)>;
    /// Gives key `id` a new secret and returns the new key.
    fn roll(&self, id: &str, grace_secs: Option<u64>, now: u64) -> Result<ApiKey>;
    /// Revokes key `id` and its descendants, at `now`. Idempotent.
    fn revoke(&self, id: &str, now: u64) -> Result<()>;
    /// Sets (or clears) the key's default webhook.
    fn set_webhook(&self, id: &str, url: Option<&str>) -> Result<()>;
    /// Reloads what other processes changed; returns whether anything did.
    fn refresh(&self) -> Result<bool>;
}

/// Most parent links followed by [`ancestors`] and [`within_subtree`].
pub const MAX_DEPTH: usize = 64;

/// The ancestors of `rec`, parent first. `None` if a parent is missing, the
/// chain loops, or it is deeper than [`MAX_DEPTH`]: callers treat that as
/// "not allowed" (fail closed).
pub fn ancestors<S: KeyStore + ?Sized>(store: &S, rec: &KeyRecord) -> Option<Vec<Arc<KeyRecord>>> {
    let mut out: Vec<Arc<KeyRecord>> = Vec::new();
    let mut next = rec.parent.clone();
    while let Some(id) = next {
        if out.len() >= MAX_DEPTH || id == rec.id || out.iter().any(|a| a.id == id) {
            return None;
        }
        let p = store.get(&id)?;
        next = p.parent.clone();
        out.push(p);
    }
    Some(out)
}

/// True if key `id` is `root` or one of its descendants (SPEC §2: a key with
/// the `keys` scope manages only itself and its descendants). Walks parent
/// links up from `id`, at most [`MAX_DEPTH`], stopping at a cycle: a loop or
/// an over-deep chain is "not within".
pub fn within_subtree<S: KeyStore + ?Sized>(store: &S, id: &str, root: &str) -> bool {
    if id == root {
        return true;
    }
    let mut seen = HashSet::new();
    let mut cur = store.get(id).and_then(|r| r.parent.clone());
    while let Some(p) = cur {
        if p == root {
            return true;
        }
        if seen.len() >= MAX_DEPTH || !seen.insert(p.clone()) {
            return false;
        }
        cur = store.get(&p).and_then(|r| r.parent.clone());
    }
    false
}

/// The source check of SPEC §2: `ip` must be allowed by the `source_cidrs`
/// of `rec` **and of every ancestor** (a child cannot escape its parent's
/// restriction), whatever the credential (bearer, digest, trusted source,
/// admin API). A broken ancestor chain ([`ancestors`]) is refused.
pub fn source_allowed<S: KeyStore + ?Sized>(store: &S, rec: &KeyRecord, ip: IpAddr) -> bool {
    if !rec.limits.allows_source(ip) {
        return false;
    }
    // Only walk the chain for child keys.
    rec.parent.is_none()
        || ancestors(store, rec).is_some_and(|a| a.iter().all(|p| p.limits.allows_source(ip)))
}

// ---- trusted-source index ----------------------------------------------------------

/// Networks of one prefix length (masked address) -> keys, lowest id first.
type LenTable<K> = (u8, HashMap<K, Vec<Arc<KeyRecord>>>);

/// Longest-prefix table from `trusted_cidrs` to the keys naming them, built
/// when keys load or change, so a credential-less INVITE costs one hash
/// lookup per distinct prefix length in use instead of a scan of every key.

#[derive(Debug, Default)]
pub struct TrustIndex {
    /// Per prefix length, longest first: network -> keys, lowest id first.
    v4: Vec<LenTable<u32>>,
    v6: Vec<LenTable<u128>>,
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (!0u32 << (32 - u32::from(len)))
    }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (!0u128 << (128 - u32::from(len)))
    }
}

impl TrustIndex {
    /// Indexes the unrevoked records of `keys` that have `trusted_cidrs`.
    pub fn build<'a>(keys: impl IntoIterator<Item = &'a Arc<KeyRecord>>) -> TrustIndex {
        let mut v4: HashMap<u8, HashMap<u32, Vec<Arc<KeyRecord>>>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, Vec<Arc<KeyRecord>>>> = HashMap::new();
        for rec in keys {
            if rec.revoked_at.is_some() {
                continue;
            }
            for c in &rec.limits.trusted_cidrs {
                let len = c.prefix_len();
                let slot = match c {
                    IpNet::V4(n) => v4
                        .entry(len)
                        .or_default()
                        .entry(mask4(n.network().to_bits(), len))
                        .or_default(),
                    IpNet::V6(n) => v6
                        .entry(len)
                        .or_default()
                        .entry(mask6(n.network().to_bits(), len))
                        .or_default(),
                };
                if !slot.iter().any(|r| r.id == rec.id) {
                    slot.push(rec.clone());
                }
            }
        }
        fn finish<K>(m: HashMap<u8, HashMap<K, Vec<Arc<KeyRecord>>>>) -> Vec<LenTable<K>> {
            let mut v: Vec<_> = m.into_iter().collect();
            for (_, t) in &mut v {
                for recs in t.values_mut() {
                    recs.sort_by(|a, b| a.id.cmp(&b.id));
                }
            }
            v.sort_by_key(|t| std::cmp::Reverse(t.0));
            v
        }
        TrustIndex {
            v4: finish(v4),
            v6: finish(v6),
        }
    }

    /// The usable key trusting `ip` at `now`: most specific CIDR, then lowest id.
    pub fn lookup(&self, ip: IpAddr, now: u64) -> Option<Arc<KeyRecord>> {
        fn first<K: std::hash::Hash + Eq>(
            table: &[LenTable<K>],
            key: impl Fn(u8) -> K,
            now: u64,
        ) -> Option<Arc<KeyRecord>> {
            table.iter().find_map(|(len, t)| {
                t.get(&key(*len))?
                    .iter()
                    .find(|r| r.is_usable(now))
                    .cloned()
            })
        }
        match ip {
            IpAddr::V4(a) => first(&self.v4, |len| mask4(a.to_bits(), len), now),
            // As `IpNet::contains`: an IPv4-mapped IPv6 address is not in an IPv4 net.
            IpAddr::V6(a) => first(&self.v6, |len| mask6(a.to_bits(), len), now),
        }
    }
}

/// Records by id: what the mutations below work on.
pub type KeyMap = HashMap<String, Arc<KeyRecord>>;

fn sorted(map: &KeyMap) -> Vec<Arc<KeyRecord>> {
    let mut v: Vec<_> = map.values().cloned().collect();
    v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    v
}

// ---- mutations shared by every store ------------------------------------------
//
// Public so that a store on another medium (crates/state: Redis) applies
// exactly the same rules to the records it loaded.

/// [`FileKeyStore::create`] on a map of records.
pub fn create_in(
    map: &mut KeyMap,
    name: &str,
    kind: KeyKind,
    scopes: Option<Vec<Scope>>,
    limits: Limits,
    parent: Option<&str>,
    now: u64,
) -> Result<(Arc<KeyRecord>, ApiKey)> {
    if name.len() > 256 || name.chars().any(char::is_control) {
        return Err(KeyError::Invalid(
            "name must be at most 256 characters, without control characters".into(),
        ));
    }
    for p in limits
        .allow_prefixes
        .iter()
        .chain(&limits.deny_prefixes)
        .chain(&limits.caller_ids)
    {
        if p.trim().is_empty() {
            return Err(KeyError::Invalid("empty destination prefix".into()));
        }
    }
    let parent_rec = match parent {
        None => None,
        Some(pid) => {
            let p = map
                .get(pid)
                .ok_or_else(|| KeyError::NotFound(pid.to_owned()))?;
            if p.revoked_at.is_some() {
                return Err(KeyError::Revoked(pid.to_owned()));
            }
            if !p.is_usable(now) {
                return Err(KeyError::Invalid(format!("parent key {pid:?} has expired")));
            }
            if p.kind != KeyKind::Secret || !p.has_scope(Scope::Keys) {
                return Err(KeyError::Invalid(format!(
                    "parent key {pid:?} may not create keys (needs a secret key with the keys scope)"
                )));
            }
            Some(p.clone())
        }
    };
    let allowed = Scope::allowed_for(kind);
    let mut scopes = match scopes {
        Some(s) => s,
        None => allowed
            .iter()
            .copied()
            .filter(|s| parent_rec.as_ref().is_none_or(|p| p.has_scope(*s)))
            .collect(),
    };
    scopes.sort();
    scopes.dedup();
    for s in &scopes {
        if !allowed.contains(s) {
            return Err(KeyError::Invalid(format!(
                "a {kind} key may not hold the {s} scope"
            )));
        }
        if let Some(p) = &parent_rec {
            if !p.has_scope(*s) {
                return Err(KeyError::Invalid(format!(
                    "scope {s} is not held by the parent key"
                )));
            }
        }
    }
    match &parent_rec {
        Some(p) => limits.check_within(&p.limits),
        None => limits.check_own(),
    }
    .map_err(KeyError::Invalid)?;
    let key = loop {
        let k = ApiKey::try_generate(kind)?;
        if !map.contains_key(k.id()) {
            break k;
        }
    };
    let rec = Arc::new(KeyRecord {
        id: key.id().to_owned(),
        name: name.to_owned(),
        kind,
        parent: parent.map(str::to_owned),
        scopes,
        limits,
        created_at: now,
        revoked_at: None,
        secrets: vec![SecretMaterial::derive(&key, None)],
        webhook: None,
    });
    map.insert(rec.id.clone(), rec.clone());
    Ok((rec, key))
}

/// [`FileKeyStore::set_webhook`] on a map of records.
pub fn set_webhook_in(map: &mut KeyMap, id: &str, url: Option<&str>) -> Result<()> {
    let rec = map
        .get_mut(id)
        .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
    if url.is_some_and(|u| u.len() > 2048 || u.chars().any(char::is_control)) {
        return Err(KeyError::Invalid(
            "webhook must be at most 2048 characters, without control characters".into(),
        ));
    }
    Arc::make_mut(rec).webhook = url.map(str::to_owned);
    Ok(())
}

/// [`FileKeyStore::roll`] on a map of records.
pub fn roll_in(map: &mut KeyMap, id: &str, grace_secs: Option<u64>, now: u64) -> Result<ApiKey> {
    let rec = map
        .get_mut(id)
        .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
    if rec.revoked_at.is_some() {
        return Err(KeyError::Revoked(id.to_owned()));
    }
    let key = ApiKey::try_generate_with_id(rec.kind, id)?;
    let rec = Arc::make_mut(rec);
    match grace_secs.filter(|g| *g > 0) {
        None => rec.secrets.clear(),
        Some(g) => {
            let until = now.saturating_add(g);
            for s in &mut rec.secrets {
                s.not_after = Some(s.not_after.map_or(until, |t| t.min(until)));
            }
            rec.secrets.retain(|s| s.is_live(now));
        }
    }
    rec.secrets.insert(0, SecretMaterial::derive(&key, None));
    Ok(key)
}

/// [`FileKeyStore::revoke`] on a map of records (the key and its descendants).
pub fn revoke_in(map: &mut KeyMap, id: &str, now: u64) -> Result<()> {
    if !map.contains_key(id) {
        return Err(KeyError::NotFound(id.to_owned()));
    }
    // The key and every descendant.
    let mut doomed = vec![id.to_owned()];
    let mut i = 0;
    while i < doomed.len() {
        let children: Vec<String> = map
            .values()
            .filter(|r| r.parent.as_deref() == Some(doomed[i].as_str()))
            .map(|r| r.id.clone())
            .filter(|c| !doomed.contains(c))
            .collect();
        doomed.extend(children);
        i += 1;
    }
    for d in doomed {
        if let Some(r) = map.get_mut(&d) {
            if r.revoked_at.is_none() {
                Arc::make_mut(r).revoked_at = Some(now);
            }
        }
    }
    Ok(())
}

// ---- MemoryKeyStore --------------------------------------------------------------

/// A [`KeyStore`] in memory only.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    keys: RwLock<Snapshot>,
}

/// Records and the trusted-source index built from them, swapped together.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    keys: Arc<KeyMap>,
    trusted: Arc<TrustIndex>,
}

impl Snapshot {
    fn of(keys: KeyMap) -> Snapshot {
        let trusted = Arc::new(TrustIndex::build(keys.values()));
        Snapshot {
            keys: Arc::new(keys),
            trusted,
        }
    }
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a record.
    pub fn insert(&self, rec: KeyRecord) {
        self.mutate(|m| {
            m.insert(rec.id.clone(), Arc::new(rec));
            Ok(())
        })
        .expect("infallible");
    }

    /// Replaces every record at once (one snapshot swap, index rebuilt):
    /// how a shared store installs what it loaded.
    pub fn replace_all(&self, keys: KeyMap) {
        let snapshot = Snapshot::of(keys);
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }

    /// The records now held, by id (a cheap clone of the snapshot's map).
    pub fn snapshot(&self) -> KeyMap {
        (*self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys)
            .clone()
    }

    /// As [`FileKeyStore::create`].
    pub fn create(
        &self,
        name: &str,
        kind: KeyKind,
        scopes: Option<Vec<Scope>>,
        limits: Limits,
        parent: Option<&str>,
        now: u64,
    ) -> Result<(Arc<KeyRecord>, ApiKey)> {
        self.mutate(|m| create_in(m, name, kind, scopes, limits, parent, now))
    }

    /// As [`FileKeyStore::roll`].
    pub fn roll(&self, id: &str, grace_secs: Option<u64>, now: u64) -> Result<ApiKey> {
        self.mutate(|m| roll_in(m, id, grace_secs, now))
    }

    /// As [`FileKeyStore::revoke`].
    pub fn revoke(&self, id: &str, now: u64) -> Result<()> {
        self.mutate(|m| revoke_in(m, id, now))
    }

    /// As [`FileKeyStore::set_webhook`].
    pub fn set_webhook(&self, id: &str, url: Option<&str>) -> Result<()> {
        self.mutate(|m| set_webhook_in(m, id, url))
    }

    fn mutate<T>(&self, f: impl FnOnce(&mut KeyMap) -> Result<T>) -> Result<T> {
        let mut guard = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let mut map = (*guard.keys).clone();
        let out = f(&mut map)?;
        *guard = Snapshot::of(map);
        Ok(out)
    }
}

impl KeyStore for MemoryKeyStore {
    fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        let g = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        g.keys.get(id).cloned()
    }

    fn list(&self) -> Vec<Arc<KeyRecord>> {
        let g = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        sorted(&g.keys)
    }

    fn trusted_for(&self, ip: IpAddr, now: u64) -> Option<Arc<KeyRecord>> {
        let index = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .trusted
            .clone();
        index.lookup(ip, now)
    }
}

// ---- FileKeyStore ----------------------------------------------------------------

/// File name of the key file in the data directory.
pub const KEYS_FILE: &str = "keys.json";
const KEYS_TMP: &str = "keys.json.tmp";
const KEYS_LOCK: &str = "keys.lock";
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    keys: Vec<KeyRecord>,
}

/// Identity of one version of keys.json: every write renames a new file over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    keys: Snapshot,
    /// Stamp of the last version looked at (loaded or found corrupt); `None`: no file.
    seen: Option<Stamp>,
}

/// A [`KeyStore`] persisted in `<dir>/keys.json`.
///
/// Several processes (the server and `tollgate keys …`) may open the same
/// directory. Writers take an exclusive lock on `<dir>/keys.lock`, re-read the
/// file under it, write `keys.json.tmp`, fsync it, rename it over `keys.json`
/// and fsync the directory, so a crash leaves either the old or the new file.
/// Readers see another process's changes after [`FileKeyStore::refresh_if_changed`].
///
/// Write methods block (file lock and fsync): call them off the async runtime.
#[derive(Debug)]
pub struct FileKeyStore {
    dir: PathBuf,
    path: PathBuf,
    state: RwLock<State>,
    /// Serialises reloads and writes within this process, so that a slow
    /// reload cannot install an older snapshot over a newer write.
    io: Mutex<()>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

impl FileKeyStore {
    /// Opens (creating with mode 0700 if needed) the data directory `dir` and
    /// loads `keys.json` if it exists. A corrupt file is an error naming it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let store = FileKeyStore {
            path: dir.join(KEYS_FILE),
            dir,
            state: RwLock::new(State::default()),
            io: Mutex::new(()),
        };
        let _io = store.io.lock().unwrap_or_else(PoisonError::into_inner);
        let (keys, stamp) = store.read_disk()?;
        store.install(keys, stamp);
        drop(_io);
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `keys.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads `keys.json` if it changed (inode, size, mtime or ctime) since
    /// last seen; returns whether a new version was loaded.
    ///
    /// Costs one `stat` when nothing changed. On a corrupt file returns the
    /// error once and keeps the previous snapshot; the same bad version is not
    /// reported again. A deleted `keys.json` reads as an empty key set (writes
    /// always rename a complete file into place, so it is never missing
    /// transiently).
    pub fn refresh_if_changed(&self) -> Result<bool> {
        let _io = self.io.lock().unwrap_or_else(PoisonError::into_inner);
        let current = match fs::metadata(&self.path) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        if current == self.read_state().seen {
            return Ok(false);
        }
        match self.read_disk() {
            Ok((keys, stamp)) => {
                self.install(keys, stamp);
                Ok(true)
            }
            Err(e) => {
                let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
                st.seen = current;
                Err(e)
            }
        }
    }

    /// Creates a key; returns its record and the key (shown once, never stored).
    ///
    /// `scopes: None` gives the kind's default scopes (all for secret, `calls`
    /// for public), limited to the parent's. With a `parent`, the parent must
    /// be a usable secret key with the `keys` scope, and the new key's scopes
    /// must be a subset of the parent's and its limits no looser
    /// ([`Limits::check_within`]).
    pub fn create(
        &self,
        name: &str,
        kind: KeyKind,
        scopes: Option<Vec<Scope>>,
        limits: Limits,
        parent: Option<&str>,
        now: u64,
    ) -> Result<(Arc<KeyRecord>, ApiKey)> {
        self.mutate(|m| create_in(m, name, kind, scopes, limits, parent, now))
    }

    /// Gives key `id` a new secret and returns the new key.
    ///
    /// Without grace (`None` or 0) every old secret stops working at once;
    /// with grace, old secrets keep working until `now + grace` (or their
    /// earlier end). A revoked key cannot be rolled.
    pub fn roll(&self, id: &str, grace_secs: Option<u64>, now: u64) -> Result<ApiKey> {
        self.mutate(|m| roll_in(m, id, grace_secs, now))
    }

    /// Revokes key `id` and every key created from it, at `now`. Idempotent.
    pub fn revoke(&self, id: &str, now: u64) -> Result<()> {
        self.mutate(|m| revoke_in(m, id, now))
    }

    /// Sets (or clears) the key's default webhook: call events go there when
    /// a call's token names none.
    pub fn set_webhook(&self, id: &str, url: Option<&str>) -> Result<()> {
        self.mutate(|m| set_webhook_in(m, id, url))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn install(&self, keys: KeyMap, stamp: Option<Stamp>) {
        // Build the index before taking the lock: readers never wait for it.
        let snapshot = Snapshot::of(keys);
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.keys = snapshot;
        st.seen = stamp;
    }

    /// Reads keys.json through one handle, so the stamp matches the content.
    fn read_disk(&self) -> Result<(KeyMap, Option<Stamp>)> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((KeyMap::new(), None)),
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let stamp = Stamp::of(&f.metadata().map_err(io_err(&self.path))?);
        let mut buf = Vec::with_capacity(stamp.len as usize);
        f.read_to_end(&mut buf).map_err(io_err(&self.path))?;
        let file: KeyFile = serde_json::from_slice(&buf).map_err(|source| KeyError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        if file.version != FORMAT_VERSION {
            return Err(KeyError::Invalid(format!(
                "{}: unsupported key file version {}",
                self.path.display(),
                file.version
            )));
        }
        let mut map = KeyMap::with_capacity(file.keys.len());
        for rec in file.keys {
            let id = rec.id.clone();
            if map.insert(id.clone(), Arc::new(rec)).is_some() {
                return Err(KeyError::Invalid(format!(
                    "{}: duplicate key id {id:?}",
                    self.path.display()
                )));
            }
        }
        Ok((map, Some(stamp)))
    }

    fn mutate<T>(&self, f: impl FnOnce(&mut KeyMap) -> Result<T>) -> Result<T> {
        let _io = self.io.lock().unwrap_or_else(PoisonError::into_inner);
        let lock_path = self.dir.join(KEYS_LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        // Under the lock, start from what is on disk now, not from our snapshot.
        let (mut map, _) = self.read_disk()?;
        let out = f(&mut map)?;
        let stamp = self.write_disk(&map)?;
        self.install(map, Some(stamp));
        drop(lock); // unlocks
        Ok(out)
    }

    fn write_disk(&self, map: &KeyMap) -> Result<Stamp> {
        let file = KeyFile {
            version: FORMAT_VERSION,
            keys: sorted(map).iter().map(|r| (**r).clone()).collect(),
        };
        let mut json = serde_json::to_vec_pretty(&file).expect("key records serialise");
        json.push(b'\n');
        let tmp = self.dir.join(KEYS_TMP);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&json).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        let m = fs::metadata(&self.path).map_err(io_err(&self.path))?;
        Ok(Stamp::of(&m))
    }
}

impl KeyAdmin for FileKeyStore {
    fn create(
        &self,
        name: &str,
        kind: KeyKind,
        scopes: Option<Vec<Scope>>,
        limits: Limits,
        parent: Option<&str>,
        now: u64,
    ) -> Result<(Arc<KeyRecord>, ApiKey)> {
        FileKeyStore::create(self, name, kind, scopes, limits, parent, now)
    }
    fn roll(&self, id: &str, grace_secs: Option<u64>, now: u64) -> Result<ApiKey> {
        FileKeyStore::roll(self, id, grace_secs, now)
    }
    fn revoke(&self, id: &str, now: u64) -> Result<()> {
        FileKeyStore::revoke(self, id, now)
    }
    fn set_webhook(&self, id: &str, url: Option<&str>) -> Result<()> {
        FileKeyStore::set_webhook(self, id, url)
    }
    fn refresh(&self) -> Result<bool> {
        self.refresh_if_changed()
    }
}

impl KeyStore for FileKeyStore {
    fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.read_state().keys.keys.get(id).cloned()
    }

    fn list(&self) -> Vec<Arc<KeyRecord>> {
        let keys = self.read_state().keys.keys.clone();
        sorted(&keys)
    }

    fn trusted_for(&self, ip: IpAddr, now: u64) -> Option<Arc<KeyRecord>> {
        let index = self.read_state().keys.trusted.clone();
        index.lookup(ip, now)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "tollgate-keys-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn create_persists_with_private_modes_and_no_key_text() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("data");
        let s = FileKeyStore::open(&dir).unwrap();
        assert!(s.list().is_empty());
        let (rec, key) = s
            .create("main", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        assert_eq!(rec.id, key.id());
        assert_eq!(rec.scopes, Scope::ALL.to_vec());
        assert_eq!(s.get(key.id()).unwrap(), rec);
        let text = fs::read_to_string(s.path()).unwrap();
        assert!(!text.contains(key.expose()));
        assert!(!text.contains(&key.expose()[19..]), "secret part stored");
        assert!(text.contains(&hex::encode(key.signing_key())));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(s.path()), 0o600);
        assert!(!dir.join(KEYS_TMP).exists());
        // A second instance sees it at open.
        let s2 = FileKeyStore::open(&dir).unwrap();
        assert_eq!(s2.get(key.id()).unwrap(), rec);
        assert!(s2.verify_key(&key, NOW).is_some());
        let other = ApiKey::generate(KeyKind::Secret);
        assert!(s2.verify_key(&other, NOW).is_none());
    }

    #[test]
    fn two_instances_cli_and_server() {
        let tmp = TempDir::new();
        let server = FileKeyStore::open(&tmp.0).unwrap();
        let cli = FileKeyStore::open(&tmp.0).unwrap();
        assert!(!server.refresh_if_changed().unwrap(), "nothing changed");

        let (rec, key) = cli
            .create("pbx", KeyKind::Public, None, Limits::default(), None, NOW)
            .unwrap();
        assert_eq!(rec.scopes, vec![Scope::Calls]);
        assert!(server.get(key.id()).is_none());
        assert!(server.refresh_if_changed().unwrap());
        assert!(!server.refresh_if_changed().unwrap());
        assert_eq!(server.get(key.id()).unwrap(), rec);

        // Server-side write after a CLI write it has not refreshed: nothing lost.
        let (rec2, _) = cli
            .create("b", KeyKind::Secret, None, Limits::default(), None, NOW + 1)
            .unwrap();
        let (rec3, _) = server
            .create("c", KeyKind::Secret, None, Limits::default(), None, NOW + 2)
            .unwrap();
        assert!(server.get(&rec2.id).is_some(), "re-read under the lock");
        assert!(cli.refresh_if_changed().unwrap());
        assert_eq!(cli.list().len(), 3);
        assert_eq!(
            cli.list().iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            vec![rec.id.clone(), rec2.id.clone(), rec3.id.clone()]
        );

        // Roll in the CLI: the server drops the old secret after refresh.
        let old_sk = key.signing_key();
        let new = cli.roll(key.id(), None, NOW + 10).unwrap();
        assert_eq!(new.id(), key.id());
        assert_eq!(new.kind(), KeyKind::Public);
        assert!(server.refresh_if_changed().unwrap());
        let r = server.get(key.id()).unwrap();
        assert_eq!(r.live_signing_keys(NOW + 10), vec![new.signing_key()]);
        assert!(!r.live_signing_keys(NOW + 10).contains(&old_sk));

        // Revoke in the CLI.
        cli.revoke(key.id(), NOW + 20).unwrap();
        cli.revoke(key.id(), NOW + 30).unwrap(); // idempotent
        assert!(server.refresh_if_changed().unwrap());
        let r = server.get(key.id()).unwrap();
        assert_eq!(r.revoked_at, Some(NOW + 20));
        assert!(!r.is_usable(NOW + 20));
        assert!(r.live_signing_keys(NOW + 20).is_empty());
        assert!(matches!(
            cli.roll(key.id(), None, NOW),
            Err(KeyError::Revoked(_))
        ));
        assert!(matches!(
            cli.revoke("nosuchkey000", NOW),
            Err(KeyError::NotFound(_))
        ));
    }

    #[test]
    fn default_webhook_is_set_cleared_and_checked() {
        let s = MemoryKeyStore::new();
        let (_, k) = s
            .create("k", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        assert_eq!(s.get(k.id()).unwrap().webhook, None);
        s.set_webhook(k.id(), Some("https://hooks.example.com/t"))
            .unwrap();
        assert_eq!(
            s.get(k.id()).unwrap().webhook.as_deref(),
            Some("https://hooks.example.com/t")
        );
        assert!(matches!(
            s.set_webhook(k.id(), Some("https://x/\n")),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            s.set_webhook("nosuchkey000", Some("https://x/")),
            Err(KeyError::NotFound(_))
        ));
        s.set_webhook(k.id(), None).unwrap();
        assert_eq!(s.get(k.id()).unwrap().webhook, None);
    }

    #[test]
    fn roll_with_grace() {
        let s = MemoryKeyStore::new();
        let (_, k0) = s
            .create("k", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        let k1 = s.roll(k0.id(), Some(60), NOW).unwrap();
        let r = s.get(k0.id()).unwrap();
        assert_eq!(r.secrets.len(), 2);
        assert_eq!(r.secrets[0].not_after, None);
        assert_eq!(r.secrets[1].not_after, Some(NOW + 60));
        assert_eq!(
            r.live_signing_keys(NOW + 59),
            vec![k1.signing_key(), k0.signing_key()]
        );
        assert_eq!(r.live_signing_keys(NOW + 60), vec![k1.signing_key()]);
        // Roll again within grace: the oldest keeps its earlier end.
        let k2 = s.roll(k0.id(), Some(600), NOW + 30).unwrap();
        let r = s.get(k0.id()).unwrap();
        assert_eq!(
            r.secrets.iter().map(|x| x.not_after).collect::<Vec<_>>(),
            vec![None, Some(NOW + 630), Some(NOW + 60)]
        );
        // Roll without grace drops every old secret.
        let k3 = s.roll(k0.id(), Some(0), NOW + 40).unwrap();
        let r = s.get(k0.id()).unwrap();
        assert_eq!(r.live_signing_keys(NOW + 40), vec![k3.signing_key()]);
        assert_eq!(r.secrets.len(), 1);
        assert!(s.verify_key(&k2, NOW + 40).is_none());
        assert!(s.verify_key(&k3, NOW + 40).is_some());
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let tmp = TempDir::new();
        let s = FileKeyStore::open(&tmp.0).unwrap();
        let (_, key) = s
            .create("k", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        fs::write(tmp.0.join(KEYS_FILE), b"{\"version\":1,\"keys\":[{").unwrap();
        let e = FileKeyStore::open(&tmp.0).unwrap_err();
        assert!(matches!(e, KeyError::Corrupt { .. }));
        assert!(e.to_string().contains("keys.json"), "{e}");
        // The running store reports it once, keeps its snapshot, and refuses to write.
        assert!(s.refresh_if_changed().is_err());
        assert!(!s.refresh_if_changed().unwrap());
        assert!(s.get(key.id()).is_some());
        assert!(s.revoke(key.id(), NOW).is_err());
        fs::write(tmp.0.join(KEYS_FILE), b"not json at all").unwrap();
        assert!(s.refresh_if_changed().is_err());
        fs::write(tmp.0.join(KEYS_FILE), b"{\"version\":9,\"keys\":[]}").unwrap();
        assert!(FileKeyStore::open(&tmp.0)
            .unwrap_err()
            .to_string()
            .contains("version"));
    }

    #[test]
    fn stale_tmp_file_is_ignored_and_replaced() {
        let tmp = TempDir::new();
        let s = FileKeyStore::open(&tmp.0).unwrap();
        s.create("a", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        // A crash mid-write leaves a partial tmp file: keys.json is intact.
        fs::write(tmp.0.join(KEYS_TMP), b"{\"vers").unwrap();
        let s2 = FileKeyStore::open(&tmp.0).unwrap();
        assert_eq!(s2.list().len(), 1);
        s2.create("b", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        assert_eq!(FileKeyStore::open(&tmp.0).unwrap().list().len(), 2);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let tmp = TempDir::new();
        let dir = tmp.0.clone();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let s = FileKeyStore::open(&dir).unwrap();
                    for i in 0..5 {
                        s.create(
                            &format!("{t}-{i}"),
                            KeyKind::Secret,
                            None,
                            Limits::default(),
                            None,
                            NOW,
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(FileKeyStore::open(&dir).unwrap().list().len(), 20);
    }

    #[test]
    fn child_keys_are_subsets() {
        let s = MemoryKeyStore::new();
        let parent_limits = Limits {
            cps: Some(10),
            max_calls: Some(5),
            allow_prefixes: vec!["+1".into()],
            deny_prefixes: vec!["+1900".into()],
            source_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            caller_ids: vec!["+1415555".into()],
            expires_at: Some(NOW + 1000),
            ..Limits::default()
        };
        let (p, _) = s
            .create(
                "parent",
                KeyKind::Secret,
                Some(vec![Scope::Calls, Scope::Keys, Scope::Usage]),
                parent_limits.clone(),
                None,
                NOW,
            )
            .unwrap();
        let ok = Limits {
            cps: Some(2),
            max_calls: Some(5),
            // National and 011 forms of numbers within the parent's lists.
            allow_prefixes: vec!["415".into(), "011 1 212".into()],
            deny_prefixes: vec!["1 9".into()],
            source_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            caller_ids: vec!["+1 415 555 0100".into()],
            expires_at: Some(NOW + 10),
            ..Limits::default()
        };
        let (c, _) = s
            .create("child", KeyKind::Public, None, ok.clone(), Some(&p.id), NOW)
            .unwrap();
        assert_eq!(c.parent.as_deref(), Some(p.id.as_str()));
        assert_eq!(c.scopes, vec![Scope::Calls]);
        let (c2, _) = s
            .create(
                "child2",
                KeyKind::Secret,
                None,
                ok.clone(),
                Some(&p.id),
                NOW,
            )
            .unwrap();
        assert_eq!(c2.scopes, vec![Scope::Calls, Scope::Keys, Scope::Usage]);

        type Tweak = Box<dyn Fn(&mut Limits)>;
        let looser: Vec<(&str, Tweak)> = vec![
            ("cps", Box::new(|l| l.cps = Some(11))),
            ("cps", Box::new(|l| l.cps = None)),
            ("max_calls", Box::new(|l| l.max_calls = Some(6))),
            ("expires_at", Box::new(|l| l.expires_at = None)),
            ("expires_at", Box::new(|l| l.expires_at = Some(NOW + 1001))),
            ("allow_prefixes", Box::new(|l| l.allow_prefixes.clear())),
            (
                "allow_prefixes: \"+44\"",
                Box::new(|l| l.allow_prefixes.push("+44".into())),
            ),
            // Other forms of a number outside the parent's +1.
            (
                "allow_prefixes: \"0044\"",
                Box::new(|l| l.allow_prefixes.push("0044".into())),
            ),
            ("caller_ids", Box::new(|l| l.caller_ids.clear())),
            (
                "caller_ids: \"+1415\"",
                Box::new(|l| l.caller_ids = vec!["+1415".into()]),
            ),
            (
                "deny prefix",
                Box::new(|l| l.deny_prefixes = vec!["+19001".into()]),
            ),
            (
                "source_cidrs: 11.0.0.0/8 is outside",
                Box::new(|l| l.source_cidrs = vec!["11.0.0.0/8".parse().unwrap()]),
            ),
            (
                "source_cidrs: 0.0.0.0/0 is outside",
                Box::new(|l| l.source_cidrs = vec!["0.0.0.0/0".parse().unwrap()]),
            ),
            (
                "source_cidrs must be set",
                Box::new(|l| l.source_cidrs.clear()),
            ),
            (
                "trusted_cidrs: 10.2.0.0/16 is outside the key's",
                Box::new(|l| l.trusted_cidrs = vec!["10.2.0.0/16".parse().unwrap()]),
            ),
        ];
        for (what, f) in looser {
            let mut l = ok.clone();
            f(&mut l);
            let e = s
                .create("x", KeyKind::Secret, None, l, Some(&p.id), NOW)
                .unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        // Scopes.
        let e = s
            .create(
                "x",
                KeyKind::Secret,
                Some(vec![Scope::Trunks]),
                ok.clone(),
                Some(&p.id),
                NOW,
            )
            .unwrap_err();
        assert!(e.to_string().contains("trunks"), "{e}");
        let e = s
            .create(
                "x",
                KeyKind::Public,
                Some(vec![Scope::Usage]),
                ok.clone(),
                Some(&p.id),
                NOW,
            )
            .unwrap_err();
        assert!(e.to_string().contains("public"), "{e}");
        // Public or scope-less parents cannot create keys.
        assert!(s
            .create("x", KeyKind::Public, None, ok.clone(), Some(&c.id), NOW)
            .is_err());
        let (nokeys, _) = s
            .create(
                "n",
                KeyKind::Secret,
                Some(vec![Scope::Calls]),
                parent_limits.clone(),
                None,
                NOW,
            )
            .unwrap();
        assert!(s
            .create(
                "x",
                KeyKind::Public,
                None,
                ok.clone(),
                Some(&nokeys.id),
                NOW
            )
            .is_err());
        assert!(matches!(
            s.create(
                "x",
                KeyKind::Public,
                None,
                ok.clone(),
                Some("nosuchkey000"),
                NOW
            ),
            Err(KeyError::NotFound(_))
        ));
        // Expired parent.
        assert!(s
            .create(
                "x",
                KeyKind::Public,
                None,
                ok.clone(),
                Some(&p.id),
                NOW + 1000
            )
            .is_err());
        // Revoking the parent revokes its descendants.
        let (grandchild, _) = s
            .create("gc", KeyKind::Public, None, ok.clone(), Some(&c2.id), NOW)
            .unwrap();
        s.revoke(&p.id, NOW + 5).unwrap();
        for id in [&p.id, &c.id, &c2.id, &grandchild.id] {
            assert_eq!(s.get(id).unwrap().revoked_at, Some(NOW + 5));
        }
        assert!(matches!(
            s.create("x", KeyKind::Public, None, ok, Some(&p.id), NOW),
            Err(KeyError::Revoked(_))
        ));
    }

    #[test]
    fn record_json_shape_and_debug() {
        let s = MemoryKeyStore::new();
        let (rec, key) = s
            .create(
                "k",
                KeyKind::Public,
                None,
                Limits {
                    source_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
                    ..Limits::default()
                },
                None,
                NOW,
            )
            .unwrap();
        let v = serde_json::to_value(&*rec).unwrap();
        assert_eq!(v["kind"], "public");
        assert_eq!(v["scopes"], serde_json::json!(["calls"]));
        assert_eq!(
            v["limits"]["source_cidrs"],
            serde_json::json!(["192.0.2.0/24"])
        );
        assert_eq!(
            v["secrets"][0]["signing_key"],
            hex::encode(key.signing_key())
        );
        let back: KeyRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, *rec);
        let dbg = format!("{rec:?}");
        assert!(!dbg.contains(&key.digest_password()), "{dbg}");
        assert!(!dbg.contains(&hex::encode(key.signing_key())));
        assert!(!dbg.contains("signing_key: ["));
        assert_eq!("Calls".parse::<Scope>().unwrap(), Scope::Calls);
        assert!("admin".parse::<Scope>().is_err());
    }

    #[test]
    fn webhook_secret_stored_on_create_and_roll_and_old_records_load() {
        let tmp = TempDir::new();
        let s = FileKeyStore::open(&tmp.0).unwrap();
        let (rec, key) = s
            .create("w", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        let want = key.webhook_secret();
        assert_eq!(rec.webhook_secret(), Some(want.as_str()));
        assert!(
            !format!("{rec:?}").contains(&want),
            "Debug shows the secret"
        );
        let rolled = s.roll(key.id(), Some(60), NOW + 1).unwrap();
        let rec = s.get(key.id()).unwrap();
        assert_eq!(rec.webhook_secret(), Some(rolled.webhook_secret().as_str()));
        assert_eq!(
            rec.secrets[1].webhook_secret.as_deref(),
            Some(want.as_str())
        );
        // Persisted, and read back by another instance.
        let s2 = FileKeyStore::open(&tmp.0).unwrap();
        assert_eq!(
            s2.get(key.id()).unwrap().webhook_secret(),
            Some(rolled.webhook_secret().as_str())
        );
        // A record written before webhooks existed still loads, without a secret.
        let mut v = serde_json::to_value(&*rec).unwrap();
        for sec in v["secrets"].as_array_mut().unwrap() {
            sec.as_object_mut().unwrap().remove("webhook_secret");
        }
        let old: KeyRecord = serde_json::from_value(v).unwrap();
        assert_eq!(old.webhook_secret(), None);
        assert!(old.live_signing_keys(NOW + 2).len() == 2);
    }

    fn cidrs(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// Limits with these source and trusted CIDRs only.
    fn sourced(source: &[&str], trusted: &[&str]) -> Limits {
        Limits {
            source_cidrs: cidrs(source),
            trusted_cidrs: cidrs(trusted),
            ..Limits::default()
        }
    }

    #[test]
    fn trusted_index_most_specific_then_lowest_id_and_rebuilt_on_change() {
        let s = MemoryKeyStore::new();
        let mk = |trusted: &[&str], expires_at| {
            s.create(
                "t",
                KeyKind::Secret,
                None,
                Limits {
                    trusted_cidrs: cidrs(trusted),
                    expires_at,
                    ..Limits::default()
                },
                None,
                NOW,
            )
            .unwrap()
            .0
        };
        let wide = mk(&["10.0.0.0/8", "2001:db8::/32"], None);
        let narrow_a = mk(&["10.1.0.0/16"], None);
        let narrow_b = mk(&["10.1.0.0/16"], Some(NOW + 10));
        let host = mk(&["10.1.2.3/32", "0.0.0.0/0"], None);
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        let at = |t: &str, now| s.trusted_for(ip(t), now).map(|r| r.id.clone());
        let lowest = std::cmp::min(&narrow_a.id, &narrow_b.id).clone();
        assert_eq!(at("10.1.9.9", NOW), Some(lowest.clone()));
        // The expired one drops out; the other of the same length remains.
        assert_eq!(at("10.1.9.9", NOW + 10), Some(narrow_a.id.clone()));
        assert_eq!(at("10.1.2.3", NOW), Some(host.id.clone()));
        assert_eq!(at("10.200.0.1", NOW), Some(wide.id.clone()));
        assert_eq!(at("192.0.2.1", NOW), Some(host.id.clone()), "0.0.0.0/0");
        assert_eq!(at("2001:db8::5", NOW), Some(wide.id.clone()));
        assert_eq!(at("2001:db9::5", NOW), None);
        assert_eq!(at("::ffff:10.1.2.3", NOW), None, "as IpNet::contains");
        // Revocation rebuilds the index.
        s.revoke(&host.id, NOW).unwrap();
        assert_eq!(at("10.1.2.3", NOW), Some(lowest));
        assert_eq!(at("192.0.2.1", NOW), None);
        // The index agrees with a scan of every key on many addresses.
        let all = s.list();
        for a in 0..=255u32 {
            for now in [NOW, NOW + 10] {
                let addr = IpAddr::from(std::net::Ipv4Addr::from(
                    (10 << 24) | (1 << 16) | (a << 8) | 3,
                ));
                let scan = all
                    .iter()
                    .filter(|r| r.is_usable(now))
                    .filter_map(|r| {
                        let len = r
                            .limits
                            .trusted_cidrs
                            .iter()
                            .filter(|c| c.contains(&addr))
                            .map(|c| c.prefix_len())
                            .max()?;
                        Some((std::cmp::Reverse(len), r.id.clone()))
                    })
                    .min()
                    .map(|(_, id)| id);
                assert_eq!(
                    s.trusted_for(addr, now).map(|r| r.id.clone()),
                    scan,
                    "{addr}"
                );
            }
        }
    }

    #[test]
    fn file_store_index_follows_other_writers() {
        let tmp = TempDir::new();
        let server = FileKeyStore::open(&tmp.0).unwrap();
        let cli = FileKeyStore::open(&tmp.0).unwrap();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(server.trusted_for(ip, NOW).is_none());
        let (rec, _) = cli
            .create(
                "carrier",
                KeyKind::Secret,
                None,
                sourced(&["198.51.100.0/24"], &["198.51.100.0/28"]),
                None,
                NOW,
            )
            .unwrap();
        assert!(server.trusted_for(ip, NOW).is_none(), "not refreshed yet");
        assert!(server.refresh_if_changed().unwrap());
        assert_eq!(server.trusted_for(ip, NOW).unwrap().id, rec.id);
        cli.revoke(&rec.id, NOW).unwrap();
        assert!(server.refresh_if_changed().unwrap());
        assert!(server.trusted_for(ip, NOW).is_none());
    }

    #[test]
    fn trusted_must_lie_inside_source_for_root_keys_too() {
        let s = MemoryKeyStore::new();
        let e = s
            .create(
                "k",
                KeyKind::Secret,
                None,
                sourced(&["10.0.0.0/24"], &["10.0.0.0/16"]),
                None,
                NOW,
            )
            .unwrap_err();
        assert!(e.to_string().contains("trusted_cidrs"), "{e}");
        // Trusted alone (no source restriction) is fine; so is inside.
        for (src, tr) in [
            (&[][..], &["10.0.0.0/16"][..]),
            (&["10.0.0.0/16"], &["10.0.0.0/24"]),
        ] {
            s.create("k", KeyKind::Secret, None, sourced(src, tr), None, NOW)
                .unwrap();
        }
        // A child's trusted CIDRs must lie within a restricting parent's sources.
        let (p, _) = s
            .create(
                "p",
                KeyKind::Secret,
                None,
                sourced(&["10.0.0.0/16"], &[]),
                None,
                NOW,
            )
            .unwrap();
        let child = |src: &[&str], tr: &[&str]| {
            s.create(
                "c",
                KeyKind::Secret,
                None,
                sourced(src, tr),
                Some(&p.id),
                NOW,
            )
        };
        assert!(child(&["10.0.1.0/24"], &["10.0.1.0/28"]).is_ok());
        let e = child(&["10.0.1.0/24"], &["10.0.2.0/28"]).unwrap_err();
        assert!(e.to_string().contains("trusted_cidrs"), "{e}");
        // A parent that does not restrict lets a child restrict itself.
        let (free, _) = s
            .create("f", KeyKind::Secret, None, Limits::default(), None, NOW)
            .unwrap();
        s.create(
            "c",
            KeyKind::Secret,
            None,
            sourced(&["192.0.2.0/24"], &["192.0.2.1/32"]),
            Some(&free.id),
            NOW,
        )
        .unwrap();
    }

    /// Records from before `trusted_cidrs`: their source_cidrs meant
    /// "trusted", and they keep admitting those sources.
    #[test]
    fn records_without_trusted_cidrs_load_as_trusted_and_source() {
        let s = MemoryKeyStore::new();
        let (rec, _) = s
            .create(
                "old",
                KeyKind::Secret,
                None,
                sourced(&["203.0.113.0/24"], &[]),
                None,
                NOW,
            )
            .unwrap();
        let mut v = serde_json::to_value(&*rec).unwrap();
        assert_eq!(v["limits"]["trusted_cidrs"], serde_json::json!([]));
        let new: KeyRecord = serde_json::from_value(v.clone()).unwrap();
        assert!(new.limits.trusted_cidrs.is_empty(), "present field is kept");
        v["limits"].as_object_mut().unwrap().remove("trusted_cidrs");
        let old: KeyRecord = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(old.limits.trusted_cidrs, cidrs(&["203.0.113.0/24"]));
        assert_eq!(old.limits.source_cidrs, cidrs(&["203.0.113.0/24"]));
        // And through the file store, which writes the field back.
        let tmp = TempDir::new();
        fs::create_dir_all(&tmp.0).unwrap();
        fs::write(
            tmp.0.join(KEYS_FILE),
            serde_json::to_vec(&serde_json::json!({"version": 1, "keys": [v]})).unwrap(),
        )
        .unwrap();
        let fstore = FileKeyStore::open(&tmp.0).unwrap();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(fstore.trusted_for(ip, NOW).unwrap().id, rec.id);
        fstore.set_webhook(&rec.id, None).unwrap();
        let text = fs::read_to_string(tmp.0.join(KEYS_FILE)).unwrap();
        assert!(text.contains("trusted_cidrs"), "{text}");
        assert_eq!(
            FileKeyStore::open(&tmp.0)
                .unwrap()
                .trusted_for(ip, NOW)
                .unwrap()
                .id,
            rec.id
        );
        // A record with no limits at all still loads.
        v.as_object_mut().unwrap().remove("limits");
        let bare: KeyRecord = serde_json::from_value(v).unwrap();
        assert_eq!(bare.limits, Limits::default());
    }

    #[test]
    fn subtree_reach_and_cycles() {
        let s = MemoryKeyStore::new();
        let mk = |parent: Option<&str>| {
            s.create("k", KeyKind::Secret, None, Limits::default(), parent, NOW)
                .unwrap()
                .0
                .id
                .clone()
        };
        let root = mk(None);
        let a = mk(Some(&root));
        let a1 = mk(Some(&a));
        let a11 = mk(Some(&a1));
        let b = mk(Some(&root));
        let other_root = mk(None);
        assert!(within_subtree(&s, &a11, &a));
        assert!(within_subtree(&s, &a, &a), "itself");
        assert!(within_subtree(&s, &a11, &root));
        assert!(!within_subtree(&s, &a, &a1), "an ancestor");
        assert!(!within_subtree(&s, &root, &a), "the root");
        assert!(!within_subtree(&s, &b, &a), "a sibling");
        assert!(!within_subtree(&s, &a1, &b), "a sibling's child");
        assert!(!within_subtree(&s, &root, &other_root), "another root");
        assert!(!within_subtree(&s, "nosuchkey000", &a));
        assert_eq!(
            ancestors(&s, &s.get(&a11).unwrap())
                .unwrap()
                .iter()
                .map(|r| r.id.clone())
                .collect::<Vec<_>>(),
            vec![a1.clone(), a.clone(), root.clone()]
        );
        // A cycle (only a corrupt or hand-edited store has one) ends the walk.
        let mut r = (*s.get(&a).unwrap()).clone();
        r.parent = Some(a11.clone());
        s.insert(r);
        assert!(!within_subtree(&s, &a1, &root));
        assert!(within_subtree(&s, &a1, &a), "still found before looping");
        assert!(!within_subtree(&s, &a1, &b));
        assert!(ancestors(&s, &s.get(&a1).unwrap()).is_none());
        // A chain deeper than MAX_DEPTH is "not within".
        let mut prev = root.clone();
        let mut chain = Vec::new();
        for i in 0..MAX_DEPTH + 2 {
            let id = format!("deep{i:08}");
            let mut rec = (*s.get(&root).unwrap()).clone();
            rec.id = id.clone();
            rec.parent = Some(prev.clone());
            s.insert(rec);
            chain.push(id.clone());
            prev = id;
        }
        assert!(within_subtree(&s, &chain[MAX_DEPTH - 1], &root));
        assert!(!within_subtree(&s, &chain[MAX_DEPTH + 1], &root));
        assert!(within_subtree(&s, &chain[MAX_DEPTH + 1], &chain[1]));
    }

    #[test]
    fn expiry_makes_unusable() {
        let s = MemoryKeyStore::new();
        let (rec, key) = s
            .create(
                "k",
                KeyKind::Secret,
                None,
                Limits {
                    expires_at: Some(NOW + 5),
                    ..Limits::default()
                },
                None,
                NOW,
            )
            .unwrap();
        assert!(rec.is_usable(NOW + 4));
        assert!(!rec.is_usable(NOW + 5));
        assert!(rec.live_signing_keys(NOW + 5).is_empty());
        assert!(s.verify_key(&key, NOW + 5).is_none());
    }
}
