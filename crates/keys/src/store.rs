//! Key records and key stores.
//!
//! A [`KeyRecord`] holds what the edge needs to verify credentials made from a
//! key (never the key itself). [`KeyStore`] is the read side used on the hot
//! path; [`FileKeyStore`] keeps records in `<data-dir>/keys.json`, shared by
//! the running server and the `tollgate keys` CLI; [`MemoryKeyStore`] is for
//! tests and as the shape of a future distributed store.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
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
    /// Sources trusted without a credential (SPEC §3c). They only grant trust
    /// to credential-less INVITEs; they do not restrict bearer or digest use.
    pub source_cidrs: Vec<IpNet>,
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
    ///
    /// Prefixes are compared canonical (stored ones are canonical already;
    /// an older national form is read in the default plan).
    /// * `source_cidrs`: each must lie within one of the parent's (so a parent
    ///   without source CIDRs cannot give its children any).
    pub fn check_within(&self, parent: &Limits) -> std::result::Result<(), String> {
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
        for c in &self.source_cidrs {
            if !parent.source_cidrs.iter().any(|p| p.contains(c)) {
                return Err(format!(
                    "source CIDR {c} is outside the parent's source CIDRs"
                ));
            }
        }
        Ok(())
    }
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
    #[serde(default)]
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
}

type KeyMap = HashMap<String, Arc<KeyRecord>>;

fn sorted(map: &KeyMap) -> Vec<Arc<KeyRecord>> {
    let mut v: Vec<_> = map.values().cloned().collect();
    v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    v
}

// ---- mutations shared by both stores -------------------------------------------

fn create_in(
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
    if let Some(p) = &parent_rec {
        limits.check_within(&p.limits).map_err(KeyError::Invalid)?;
    }
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

fn set_webhook_in(map: &mut KeyMap, id: &str, url: Option<&str>) -> Result<()> {
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

fn roll_in(map: &mut KeyMap, id: &str, grace_secs: Option<u64>, now: u64) -> Result<ApiKey> {
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

fn revoke_in(map: &mut KeyMap, id: &str, now: u64) -> Result<()> {
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
    keys: RwLock<Arc<KeyMap>>,
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
        let mut map = (**guard).clone();
        let out = f(&mut map)?;
        *guard = Arc::new(map);
        Ok(out)
    }
}

impl KeyStore for MemoryKeyStore {
    fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        let g = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        g.get(id).cloned()
    }

    fn list(&self) -> Vec<Arc<KeyRecord>> {
        let g = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        sorted(&g)
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
    keys: Arc<KeyMap>,
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
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.keys = Arc::new(keys);
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

impl KeyStore for FileKeyStore {
    fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.read_state().keys.get(id).cloned()
    }

    fn list(&self) -> Vec<Arc<KeyRecord>> {
        let keys = self.read_state().keys.clone();
        sorted(&keys)
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
                "source CIDR",
                Box::new(|l| l.source_cidrs = vec!["11.0.0.0/8".parse().unwrap()]),
            ),
            (
                "source CIDR",
                Box::new(|l| l.source_cidrs = vec!["0.0.0.0/0".parse().unwrap()]),
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
