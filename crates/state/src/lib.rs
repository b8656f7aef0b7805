//! Shared state of a fleet of edges on Redis (or Valkey), SPEC §8.
//!
//! Behind the traits the rest of the edge already uses, so nothing above
//! them knows which store it has:
//!
//! * [`RedisReplayCache`]: a [`ReplayCache`] whose first use of a `jti` or
//!   digest nonce is one `SET key 1 NX EXAT <exp>`, so a credential used on
//!   one node is refused on every other.
//! * [`RedisKeyStore`]: a [`KeyStore`] + [`KeyAdmin`] whose source of truth is
//!   Redis; each node serves reads from an in-memory snapshot (with the
//!   trusted-source index) refreshed on a pub/sub notice and by a version
//!   check every few hundred milliseconds, so a missed notice cannot leave a
//!   revoked key working.
//! * [`Shared`]: the connection pool, timeouts and the up/down flag behind
//!   the `tollgate_state_up` gauge.
//!
//! # Keys in Redis
//!
//! A fleet runs on one Redis (`redis://`, `rediss://`) or on a Redis
//! Cluster (`redis+cluster://host:port,host:port`, `rediss+cluster://`).
//! Every script and every multi-key command addresses keys of ONE hash
//! slot, so the same layout serves both: the keys of a hierarchy of API
//! keys carry its root key's id as their hash tag (the admission of a key
//! and all its ancestors is one script in one slot), and nothing is a
//! MULTI across slots.
//!
//! | key | value |
//! |---|---|
//! | `tg:key:{<kid>}` | the [`KeyRecord`] as JSON (verification material only, never a key) |
//! | `tg:keys` | index: set of key ids (reloads read it, then each record) |
//! | `tg:keys:version` | incremented by every key change, after its records |
//! | `tg:keys:lock` | writers' lock (token, 5 s expiry) |
//! | `tg:replay:{<root>}:<kid>:<jti>`, `tg:replay:{<root>}:nonce:<n>` | `1`, expiring with the credential |
//! | `tg:ch:{<root>}:<kid>`, `tg:cps:…`, `tg:res:…`, `tg:spent:…:<day>` | a key's leases, rate, reservations, spent seconds |
//! | `tg:settled:{<root>}:<call_id>` | a call's seconds are on its budgets |
//! | `tg:cdrs`, `tg:cdr:{tg:cdrs}:<call_id>` | the fleet's CDR stream and its dedupe marks (one slot) |
//! | `tg:nonce_secret` | hex HMAC key of digest nonces, shared by the fleet |
//!
//! Key changes are announced with a classic `PUBLISH` on [`KEYS_CHANNEL`],
//! which a cluster broadcasts to every node: each edge subscribes on one
//! node (the first seed that answers), and the version check catches what
//! a subscription missed.
//!
//! # Blocking
//!
//! The traits are synchronous and called on the SIP shard threads. Each call
//! takes a pooled synchronous connection with read/write timeouts of
//! [`StateConfig::timeout`] (default 250 ms): on loopback or a LAN one round
//! trip is well under a millisecond. While Redis is known down (the health
//! thread pings every 500 ms) calls fail at once without touching the
//! network, so an outage costs the shards nothing.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cdrs;
pub use cdrs::{fleet_usage, CdrPublisher};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection};
use redis::{Client, Connection};
use tollgate_keys::store::{self, KeyMap};
use tollgate_keys::{
    ApiKey, KeyAdmin, KeyError, KeyKind, KeyRecord, KeyStore, Limits, MemoryKeyStore, PendingUse,
    ReplayCache, Scope, Use,
};

/// What `[state] on_unavailable` says new INVITEs get while Redis is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// `503` with `Retry-After`.
    Refuse,
    /// Checked against the node's embedded state alone.
    Local,
}

/// `[state]` as the edge uses it.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// This edge's name in the fleet.
    pub node: String,
    /// A dead edge's channels are freed within this (next increment).
    pub lease_s: u64,
    /// See [`OnUnavailable`].
    pub on_unavailable: OnUnavailable,
    /// Connect, read and write timeout of one request.
    pub timeout: Duration,
    /// PEM of the CAs a `rediss://` server must chain to; `None`: the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Records the fleet's CDR stream is trimmed to (`XADD MAXLEN ~`).
    pub cdr_stream_max: u64,
}

/// The crate's error.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The URL cannot be used.
    #[error("[state] url: {0}")]
    Url(String),
    /// Redis is down or answered with an error.
    #[error("[state] url: {0}")]
    Redis(String),
    /// Redis is known to be down: not tried.
    #[error("shared state is down")]
    Down,
}

impl From<StateError> for KeyError {
    fn from(e: StateError) -> KeyError {
        KeyError::Unavailable(e.to_string())
    }
}

fn redis_err(e: redis::RedisError) -> StateError {
    StateError::Redis(e.to_string())
}

/// Where the fleet's state lives: one Redis, or a Redis Cluster.
enum Backend {
    Single(Client),
    /// The cluster client, and one plain client per seed node for the
    /// key-change subscription (a `PUBLISH` reaches every node).
    Cluster(ClusterClient, Vec<Client>),
}

/// One pooled connection: to the one Redis, or to the cluster (which routes
/// each command to the master of its keys' slot).
pub enum Con {
    /// To one Redis.
    Single(Connection),
    /// To a Redis Cluster (boxed: a map of node connections and slots).
    Cluster(Box<ClusterConnection>),
}

impl redis::ConnectionLike for Con {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Con::Single(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Con::Single(c) => c.req_packed_commands(cmd, offset, count),
            Con::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self {
            Con::Single(c) => c.req_command(cmd),
            Con::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Con::Single(c) => c.supports_pipelining(),
            Con::Cluster(c) => c.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Con::Single(c) => c.check_connection(),
            Con::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Con::Single(c) => c.is_open(),
            Con::Cluster(c) => c.is_open(),
        }
    }
}

impl Con {
    /// `cmds` in one pipeline, not a transaction: on a cluster each node
    /// gets its share, in no order between nodes (a caller that needs an
    /// order sends what must come after as a second request).
    pub fn pipeline<T: redis::FromRedisValue>(
        &mut self,
        cmds: impl IntoIterator<Item = redis::Cmd>,
    ) -> redis::RedisResult<T> {
        match self {
            Con::Single(c) => {
                let mut p = redis::pipe();
                cmds.into_iter().for_each(|cmd| {
                    p.add_command(cmd);
                });
                p.query(c)
            }
            Con::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                cmds.into_iter().for_each(|cmd| {
                    p.add_command(cmd);
                });
                p.query(c.as_mut())
            }
        }
    }
}

/// `redis+cluster://[user:password@]host:port,host:port[/...]` (or
/// `rediss+cluster://`, TLS): the URL of each seed node, `None` for a
/// plain `redis://` or `rediss://` URL. The error never repeats the URL.
pub fn cluster_seeds(url: &str) -> Result<Option<Vec<String>>, StateError> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("redis+cluster://") {
        ("redis", r)
    } else if let Some(r) = url.strip_prefix("rediss+cluster://") {
        ("rediss", r)
    } else {
        return Ok(None);
    };
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let (hosts, tail) = match hosts.find(['/', '?']) {
        Some(i) => hosts.split_at(i),
        None => (hosts, ""),
    };
    let mut seeds = Vec::new();
    for node in hosts.split(',') {
        let ok = node
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(StateError::Url(
                "a cluster URL lists host:port,host:port,... (each with its port)".into(),
            ));
        }
        seeds.push(format!("{scheme}://{auth}{node}{tail}"));
    }
    Ok(Some(seeds))
}

/// Connections to one Redis (or one Redis Cluster) and whether it answers.
pub struct Shared {
    backend: Backend,
    timeout: Duration,
    pool: Mutex<Vec<Con>>,
    up: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// Most idle connections kept (one per SIP shard is plenty).
const POOL_MAX: usize = 16;

impl Shared {
    /// Parses `url` (no connection yet); a bad URL is an error naming
    /// `[state] url` that never repeats the URL (it may carry a password).
    /// `ca_pem`: the CAs a `rediss://` server must chain to (rustls, the
    /// edge's one TLS stack); `None`: the system's roots.
    pub fn open(
        url: &str,
        timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<Arc<Shared>, StateError> {
        let certs = |pem: &[u8]| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        };
        let plain = |url: &str| {
            match ca_pem {
                None => Client::open(url),
                Some(pem) => Client::build_with_tls(url, certs(pem)),
            }
            .map_err(|e| StateError::Url(e.to_string()))
        };
        let backend =
            match cluster_seeds(url)? {
                Some(seeds) => {
                    let mut b = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        // A MOVED or ASK after a resharding, then an answer or
                        // an error: never a wait longer than a few timeouts.
                        .retries(2)
                        .min_retry_wait(10)
                        .max_retry_wait(50);
                    if let (Some(pem), true) = (ca_pem, url.starts_with("rediss+")) {
                        b = b.certs(certs(pem));
                    }
                    let cluster = b.build().map_err(|e| StateError::Url(e.to_string()))?;
                    let subs = seeds
                        .iter()
                        .map(|s| plain(s))
                        .collect::<Result<Vec<_>, _>>()?;
                    Backend::Cluster(cluster, subs)
                }
                None if url.starts_with("redis://") || url.starts_with("rediss://") => {
                    Backend::Single(plain(url)?)
                }
                None => return Err(StateError::Url(
                    "must start with redis://, rediss://, redis+cluster:// or rediss+cluster://"
                        .into(),
                )),
            };
        Ok(Arc::new(Shared {
            backend,
            timeout,
            pool: Mutex::new(Vec::new()),
            up: AtomicBool::new(false),
        }))
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(..))
    }

    /// Whether the last request (or health ping) got an answer.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!("tollgate_state_up").set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("shared state reachable");
            } else {
                tracing::error!("shared state unreachable");
            }
        }
    }

    fn connect_one(&self, client: &Client) -> Result<Connection, StateError> {
        let c = client
            .get_connection_with_timeout(self.timeout)
            .map_err(redis_err)?;
        c.set_read_timeout(Some(self.timeout)).map_err(redis_err)?;
        c.set_write_timeout(Some(self.timeout)).map_err(redis_err)?;
        Ok(c)
    }

    fn connect(&self) -> Result<Con, StateError> {
        match &self.backend {
            Backend::Single(client) => self.connect_one(client).map(Con::Single),
            Backend::Cluster(cluster, _) => {
                let c = cluster.get_connection().map_err(redis_err)?;
                c.set_read_timeout(Some(self.timeout)).map_err(redis_err)?;
                c.set_write_timeout(Some(self.timeout)).map_err(redis_err)?;
                Ok(Con::Cluster(Box::new(c)))
            }
        }
    }

    /// A plain connection for the key-change subscription: to the one
    /// Redis, or to the first seed node of a cluster that answers (a
    /// `PUBLISH` on any node of a cluster reaches the subscribers of all).
    fn connect_pubsub(&self) -> Result<Connection, StateError> {
        match &self.backend {
            Backend::Single(client) => self.connect_one(client),
            Backend::Cluster(_, seeds) => {
                let mut last = StateError::Down;
                for seed in seeds {
                    match self.connect_one(seed) {
                        Ok(c) => return Ok(c),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// Runs `f` on a pooled connection. Fails at once while Redis is known
    /// down unless `probe`; a transport error marks it down and drops the
    /// connection.
    fn run<T>(
        &self,
        probe: bool,
        f: impl FnOnce(&mut Con) -> redis::RedisResult<T>,
    ) -> Result<T, StateError> {
        if !probe && !self.is_up() {
            return Err(StateError::Down);
        }
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut con = match pooled {
            Some(c) => c,
            None => match self.connect() {
                Ok(c) => c,
                Err(e) => {
                    self.set_up(false);
                    return Err(e);
                }
            },
        };
        match f(&mut con) {
            Ok(v) => {
                self.set_up(true);
                let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
                if pool.len() < POOL_MAX {
                    pool.push(con);
                }
                Ok(v)
            }
            Err(e) => {
                // A server-side error (wrong type, script error) leaves the
                // connection usable and Redis up; anything else does not.
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    self.set_up(false);
                    self.pool
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                }
                Err(redis_err(e))
            }
        }
    }

    /// One `PING`, tried even while down: the first connection at startup
    /// and the health thread's probe.
    pub fn ping(&self) -> Result<(), StateError> {
        self.run(true, |c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    /// Starts the health thread: a `PING` every `every`, keeping
    /// [`Shared::is_up`] and `tollgate_state_up` current; `on_up` runs each
    /// time Redis comes back.
    pub fn start_health(self: &Arc<Self>, every: Duration, on_up: impl Fn() + Send + 'static) {
        let me = self.clone();
        metrics::gauge!("tollgate_state_up").set(if me.is_up() { 1.0 } else { 0.0 });
        let spawned = std::thread::Builder::new()
            .name("state-health".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let was = me.is_up();
                let now_up = me.ping().is_ok();
                if now_up && !was {
                    on_up();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the shared-state health thread");
        }
    }

    /// The fleet's digest nonce key: the first node stores a random one,
    /// every node reads the same, so a nonce issued by one edge is answered
    /// on another (and single use fleet-wide through the replay cache).
    pub fn nonce_secret(&self) -> Result<[u8; 32], StateError> {
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| StateError::Redis("no system randomness".into()))?;
        let hexed = hex::encode(fresh);
        let stored: String = self.run(false, |c| {
            redis::cmd("SET")
                .arg(NONCE_SECRET)
                .arg(&hexed)
                .arg("NX")
                .query::<Option<String>>(c)?;
            redis::cmd("GET").arg(NONCE_SECRET).query(c)
        })?;
        let bytes = hex::decode(stored.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| StateError::Redis(format!("{NONCE_SECRET} is not 64 hex digits")))?;
        Ok(bytes)
    }
}

const NONCE_SECRET: &str = "tg:nonce_secret";
const KEYS_SET: &str = "tg:keys";
const KEYS_VERSION: &str = "tg:keys:version";
const KEYS_LOCK: &str = "tg:keys:lock";
/// Channel on which every key change is announced (payload: the version).
pub const KEYS_CHANNEL: &str = "tg:keys:changed";

fn record_key(id: &str) -> String {
    format!("tg:key:{{{id}}}")
}

/// The Redis key of the single use `id` (`"<kid>:<jti>"` or
/// `"nonce:<nonce>"`) under the hash tag `tag`: the root key of the
/// credential's hierarchy in the admission script, so that it shares the
/// slot of the chain's limits (a digest nonce is then single use per
/// hierarchy: its response is bound to the key anyway).
pub fn replay_key(tag: &str, id: &str) -> String {
    format!("tg:replay:{{{tag}}}:{id}")
}

/// The tag of a use [`RedisReplayCache`] records by itself (not deferred):
/// the token's key id, or the whole nonce id. One key per command, so any
/// slot will do; the same as the admission's for a root key's tokens.
fn own_tag(id: &str) -> &str {
    match id.split_once(':') {
        Some(("nonce", _)) | None => id,
        Some((kid, _)) => kid,
    }
}

// ---- replay ------------------------------------------------------------------------

/// A fleet-wide [`ReplayCache`] on Redis, with an optional embedded
/// fallback (`on_unavailable = "local"`) used while Redis is down.
pub struct RedisReplayCache {
    shared: Arc<Shared>,
    fallback: Option<Arc<dyn ReplayCache>>,
    deferred: bool,
}

impl RedisReplayCache {
    /// Without `fallback`, a use while Redis is down is
    /// [`Use::Unavailable`] (the INVITE gets 503 + Retry-After).
    pub fn new(shared: Arc<Shared>, fallback: Option<Arc<dyn ReplayCache>>) -> Self {
        RedisReplayCache {
            shared,
            fallback,
            deferred: false,
        }
    }

    /// Leaves the uses of INVITE credentials to the admission script
    /// ([`FleetChannels::admit`]), so that one INVITE is one round trip
    /// ([`ReplayCache::deferred`]). Only with a call policy that records
    /// them.
    pub fn deferring(mut self) -> Self {
        self.deferred = true;
        self
    }
}

/// `SET <replay key> 1 NX EXAT <exp>`: `true` the first time.
fn set_once(shared: &Shared, key: &str, expires_at: i64, now: i64) -> Result<bool, StateError> {
    shared
        .run(false, |c| {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("EXAT")
                .arg(replay_exat(expires_at, now))
                .query::<Option<String>>(c)
        })
        .map(|set| set.is_some())
}

/// EXAT in the past would delete the key at once: keep it a second.
fn replay_exat(expires_at: i64, now: i64) -> i64 {
    expires_at.max(now.saturating_add(1))
}

impl ReplayCache for RedisReplayCache {
    fn first_use(&self, id: &str, expires_at: i64, now: i64) -> bool {
        self.record_use(id, expires_at, now) == Use::First
    }

    fn record_use(&self, id: &str, expires_at: i64, now: i64) -> Use {
        match set_once(&self.shared, &replay_key(own_tag(id), id), expires_at, now) {
            Ok(true) => Use::First,
            Ok(false) => Use::Replayed,
            Err(_) => match &self.fallback {
                Some(local) => local.record_use(id, expires_at, now),
                None => Use::Unavailable,
            },
        }
    }

    fn deferred(&self) -> bool {
        self.deferred
    }
}

// ---- keys --------------------------------------------------------------------------

/// A fleet-wide key store: Redis is the source of truth, reads come from
/// the node's snapshot.
pub struct RedisKeyStore {
    shared: Arc<Shared>,
    mem: MemoryKeyStore,
    /// `tg:keys:version` of the snapshot (-1: never loaded).
    version: AtomicI64,
    /// Serialises reloads within this process.
    reload: Mutex<()>,
}

impl std::fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeyStore")
            .field("version", &self.version.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How long a writer waits for the writers' lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

impl RedisKeyStore {
    /// Loads every key from Redis (which must answer).
    pub fn open(shared: Arc<Shared>) -> Result<Arc<Self>, StateError> {
        shared.ping()?;
        let s = Arc::new(RedisKeyStore {
            shared,
            mem: MemoryKeyStore::new(),
            version: AtomicI64::new(-1),
            reload: Mutex::new(()),
        });
        s.reload()?;
        Ok(s)
    }

    /// The connections this store uses.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn version_now(&self) -> Result<i64, StateError> {
        self.shared.run(false, |c| {
            redis::cmd("GET")
                .arg(KEYS_VERSION)
                .query::<Option<i64>>(c)
                .map(|v| v.unwrap_or(0))
        })
    }

    /// Every record, the version read before them, and the ids of the
    /// index that had no record (keys are never deleted: a cluster node
    /// that restarted without its data).
    fn load_all(&self) -> Result<(KeyMap, i64, Vec<String>), StateError> {
        self.shared.run(false, |c| {
            let version: Option<i64> = redis::cmd("GET").arg(KEYS_VERSION).query(c)?;
            let ids: Vec<String> = redis::cmd("SMEMBERS").arg(KEYS_SET).query(c)?;
            let values: Vec<Option<String>> = if ids.is_empty() {
                Vec::new()
            } else {
                c.pipeline(ids.iter().map(|id| {
                    let mut get = redis::cmd("GET");
                    get.arg(record_key(id));
                    get
                }))?
            };
            let mut map = KeyMap::with_capacity(ids.len());
            let mut missing = Vec::new();
            for (id, v) in ids.iter().zip(values) {
                let Some(v) = v else {
                    missing.push(id.clone());
                    continue;
                };
                match serde_json::from_str::<KeyRecord>(&v) {
                    Ok(rec) if rec.id == *id => {
                        map.insert(rec.id.clone(), Arc::new(rec));
                    }
                    // Position and line only: the record's text is never logged.
                    Ok(_) => tracing::error!(key = %id, "shared key record names another id; skipped"),
                    Err(e) => tracing::error!(key = %id, line = e.line(), column = e.column(), "shared key record unreadable; skipped"),
                }
            }
            Ok((map, version.unwrap_or(0), missing))
        })
    }

    /// Reloads every record from Redis and installs them.
    ///
    /// Keys are never deleted (revocation marks them), so a store that comes
    /// back empty while this node held keys lost its data (a Redis restarted
    /// without persistence): the node keeps its last good keys and says so,
    /// rather than refusing every customer.
    pub fn reload(&self) -> Result<(), StateError> {
        let _g = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut map, version, missing) = self.load_all()?;
        self.keep_lost(&mut map, &missing);
        if map.is_empty() && !self.mem.list().is_empty() {
            tracing::error!(
                "shared state holds no keys but this edge had some: Redis lost its data \
                 (run it with AOF); keeping the last good keys"
            );
            return Err(StateError::Redis("the shared key set is empty".into()));
        }
        self.mem.replace_all(map);
        self.version.store(version, Ordering::Relaxed);
        Ok(())
    }

    /// Puts this node's last good record of each id in `missing` (listed
    /// by the index, its record gone: a cluster master that restarted
    /// without its data) into `map`: its customers keep working, every
    /// other key's changes still apply, and the next key change writes it
    /// back (it differs from what Redis holds).
    fn keep_lost(&self, map: &mut KeyMap, missing: &[String]) {
        if missing.is_empty() {
            return;
        }
        let mut kept = 0;
        for id in missing {
            if let Some(rec) = self.mem.get(id) {
                map.insert(id.clone(), rec);
                kept += 1;
            }
        }
        tracing::error!(
            missing = missing.len(),
            kept,
            "shared key index lists keys whose records are gone (a Redis node lost its data? \
             run it with AOF); keeping this edge's last good records of them"
        );
    }

    /// Reloads if `tg:keys:version` moved since the snapshot: one `GET` when
    /// nothing changed.
    pub fn refresh_if_changed(&self) -> Result<bool, StateError> {
        if self.version_now()? == self.version.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Starts the subscriber thread: each notice on [`KEYS_CHANNEL`] reloads
    /// the keys at once (reconnecting by itself after an outage).
    pub fn start_subscriber(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("state-keys-sub".into())
            .spawn(move || loop {
                if let Err(e) = me.subscribe_once() {
                    tracing::debug!(error = %e, "key notices: subscription ended");
                }
                std::thread::sleep(Duration::from_millis(500));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the key-notice thread");
        }
    }

    fn subscribe_once(&self) -> Result<(), StateError> {
        let mut con = self.shared.connect_pubsub()?;
        let mut ps = con.as_pubsub();
        ps.subscribe(KEYS_CHANNEL).map_err(redis_err)?;
        ps.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(redis_err)?;
        // Whatever changed while not subscribed.
        if let Err(e) = self.reload() {
            tracing::debug!(error = %e, "key reload after subscribing failed");
        }
        loop {
            match ps.get_message() {
                Ok(_) => {
                    if let Err(e) = self.refresh_if_changed() {
                        tracing::warn!(error = %e, "key reload on notice failed");
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(redis_err(e)),
            }
        }
    }

    /// Runs `f` on the current records under the fleet's writers' lock, then
    /// writes the records it changed, bumps the version and announces it.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut KeyMap) -> tollgate_keys::Result<T>,
    ) -> tollgate_keys::Result<T> {
        let token = hex::encode(random16()?);
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            let got: Option<String> = self.shared.run(false, |c| {
                redis::cmd("SET")
                    .arg(KEYS_LOCK)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(5000)
                    .query(c)
            })?;
            if got.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(KeyError::Unavailable(
                    "the fleet's key lock is held by another writer".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.mutate_locked(f);
        let unlock = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        if let Err(e) = self.shared.run(false, |c| {
            unlock.key(KEYS_LOCK).arg(&token).invoke::<i64>(c)
        }) {
            tracing::warn!(error = %e, "key lock release failed (expires by itself)");
        }
        out
    }

    fn mutate_locked<T>(
        &self,
        f: impl FnOnce(&mut KeyMap) -> tollgate_keys::Result<T>,
    ) -> tollgate_keys::Result<T> {
        let (before, _, missing) = self.load_all()?;
        let mut map = before.clone();
        self.keep_lost(&mut map, &missing);
        let out = f(&mut map)?;
        let changed: Vec<&Arc<KeyRecord>> = map
            .values()
            .filter(|r| before.get(&r.id).is_none_or(|b| **b != ***r))
            .collect();
        // Each record in its own slot, then the index, then the version
        // (three requests: a cluster keeps no order between nodes). A
        // reader reads them the other way round (`load_all`), so one that
        // saw some of these writes and not the bump reloads at the bump, and
        // an id in the index always has its record. No MULTI across slots.
        let mut records = Vec::with_capacity(changed.len());
        let mut index = redis::cmd("SADD");
        index.arg(KEYS_SET);
        for rec in &changed {
            let json = serde_json::to_string(&***rec)
                .map_err(|e| KeyError::Invalid(format!("key record: {e}")))?;
            let mut set = redis::cmd("SET");
            set.arg(record_key(&rec.id)).arg(json);
            records.push(set);
            index.arg(&rec.id);
        }
        let version: i64 = self.shared.run(false, |c| {
            if !records.is_empty() {
                c.pipeline::<redis::Value>(records)?;
                index.query::<i64>(c)?;
            }
            redis::cmd("INCR").arg(KEYS_VERSION).query(c)
        })?;
        self.shared.run(false, |c| {
            redis::cmd("PUBLISH")
                .arg(KEYS_CHANNEL)
                .arg(version)
                .query::<i64>(c)
        })?;
        let _g = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
        self.mem.replace_all(map);
        self.version.store(version, Ordering::Relaxed);
        Ok(out)
    }

    /// On a store with no key at all, creates the root secret key and
    /// returns it (to print once); `None` when a key exists already (another
    /// edge was first). Under the writers' lock, so two edges starting at
    /// once make one root key.
    pub fn create_root_if_empty(&self, now: u64) -> tollgate_keys::Result<Option<ApiKey>> {
        self.mutate(|m| {
            if !m.is_empty() {
                return Ok(None);
            }
            let (_, key) = store::create_in(
                m,
                "default",
                KeyKind::Secret,
                None,
                Limits::default(),
                None,
                now,
            )?;
            Ok(Some(key))
        })
    }
}

fn random16() -> Result<[u8; 16], KeyError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| KeyError::Rng)?;
    Ok(b)
}

impl KeyStore for RedisKeyStore {
    fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.mem.get(id)
    }

    fn list(&self) -> Vec<Arc<KeyRecord>> {
        self.mem.list()
    }

    fn trusted_for(&self, ip: std::net::IpAddr, now: u64) -> Option<Arc<KeyRecord>> {
        self.mem.trusted_for(ip, now)
    }
}

impl KeyAdmin for RedisKeyStore {
    fn create(
        &self,
        name: &str,
        kind: KeyKind,
        scopes: Option<Vec<Scope>>,
        limits: Limits,
        parent: Option<&str>,
        now: u64,
    ) -> tollgate_keys::Result<(Arc<KeyRecord>, ApiKey)> {
        self.mutate(|m| store::create_in(m, name, kind, scopes, limits, parent, now))
    }

    fn roll(&self, id: &str, grace_secs: Option<u64>, now: u64) -> tollgate_keys::Result<ApiKey> {
        self.mutate(|m| store::roll_in(m, id, grace_secs, now))
    }

    fn revoke(&self, id: &str, now: u64) -> tollgate_keys::Result<()> {
        self.mutate(|m| store::revoke_in(m, id, now))
    }

    fn set_webhook(&self, id: &str, url: Option<&str>) -> tollgate_keys::Result<()> {
        self.mutate(|m| store::set_webhook_in(m, id, url))
    }

    fn refresh(&self) -> tollgate_keys::Result<bool> {
        Ok(self.refresh_if_changed()?)
    }
}

// ---- admission: channels, rate, budget ---------------------------------------------

/// The fleet's admission (SPEC §8): the credential's single use, calls per
/// second, concurrent calls and daily budget of a key and its ancestors.
///
/// * Channels: one lease per call up in a sorted set per key,
///   `tg:ch:{<root>}:<kid>` (member `<node>:<call>`, score the lease's end
///   in ms). The owning node renews its leases every `lease_s / 3`; a node
///   that dies stops renewing and its channels are free within `lease_s`.
/// * Budget, as on one edge (the trunk allocator's slices): an answered
///   call is granted a slice of what no ended call spent and no live call
///   holds (a quarter of it, 1..300 s) and asks again when it has used it.
///   `tg:spent:{<root>}:<kid>:<day>` holds the seconds ended calls billed
///   on a UTC day, `tg:res:{<root>}:<kid>` the seconds granted to each call
///   up (field: its lease member). A reservation counts only while its
///   call's lease in `tg:ch` lives, so a dead node's reservations expire
///   with its leases. Grant and settle are each one script: concurrent
///   calls on different nodes never get the same free seconds twice.
///
/// The whole hierarchy of a root key shares its hash tag, so the check of
/// a key and all its ancestors is one script in one slot.
pub struct FleetChannels {
    shared: Arc<Shared>,
    node: String,
    lease: Duration,
    admit: redis::Script,
    grant: redis::Script,
    settle: redis::Script,
    /// What this node holds: call handle -> its keys and grants.
    held: Mutex<HashMap<u64, Held>>,
}

/// One call's hold on the fleet's state.
#[derive(Debug, Clone)]
struct Held {
    member: String,
    /// The root key of the chain (the hash tag of its keys).
    root: String,
    /// Channel sets the call holds a lease in (capped or budgeted keys).
    leases: Vec<String>,
    /// (channel set, reservations, spent key prefix, daily seconds) of each
    /// budgeted key of the chain.
    budgets: Vec<(String, String, String, u64)>,
    answered_at: Option<i64>,
    /// Budget seconds granted to the call so far.
    granted: u64,
}

impl std::fmt::Debug for FleetChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetChannels")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Free budget seconds of one key: its budget minus the day's settled
/// seconds and the live reservations (dead ones are dropped on the way).
const FREE_LUA: &str = r"
local function free_secs(ch, res, spent, budget, now)
  local used = tonumber(redis.call('GET', spent) or 0)
  local held = redis.call('HGETALL', res)
  for j = 1, #held, 2 do
    local s = redis.call('ZSCORE', ch, held[j])
    if (not s) or tonumber(s) < now then
      redis.call('HDEL', res, held[j])
    else
      used = used + tonumber(held[j + 1])
    end
  end
  return budget - used
end
";

/// The per-INVITE admission, one script: the credential's single use
/// (token `jti` or digest nonce, `SET NX` as [`RedisReplayCache`] does),
/// then the daily budget, calls per second (GCRA, a burst of one second, as
/// the embedded token bucket) and concurrent calls, of the key and every
/// ancestor, checked first and only then taken, so a limit's refusal
/// consumes no rate or channel (the credential's use stays recorded, as on
/// one edge where the replay check comes before the limits).
///
/// KEYS: the replay key when ARGV[4] >= 0, then for each key of the chain
/// its channel set, CPS state, reservations and today's spent seconds.
/// ARGV: now_ms, lease_end_ms, member, replay_exat (-1: no credential use
/// to record), then per key max_calls, cps and daily seconds (-1: none).
/// Returns {0, 0} admitted, {1, ms} rate limited (ms until a call would
/// pass), {2, 0} a key at its channel cap, {3, 0} the credential was used
/// before, {4, 0} a key's budget is spent or held by calls up.
const ADMIT_LUA: &str = r"
local now, lease_end, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local off = 0
if tonumber(ARGV[4]) >= 0 then
  off = 1
  if not redis.call('SET', KEYS[1], 1, 'NX', 'EXAT', ARGV[4]) then return {3, 0} end
end
local n = (#KEYS - off) / 4
local function k(i, j) return KEYS[off + 4 * (i - 1) + j] end
local function a(i, j) return tonumber(ARGV[4 + 3 * (i - 1) + j]) end
for i = 1, n do
  if a(i, 3) >= 0 and free_secs(k(i, 1), k(i, 3), k(i, 4), a(i, 3), now) <= 0 then
    return {4, 0}
  end
end
local tats = {}
for i = 1, n do
  local cap, cps = a(i, 1), a(i, 2)
  if cps >= 0 then
    if cps == 0 then return {1, 86400000} end
    local t = 1000 / cps
    local tat = tonumber(redis.call('GET', k(i, 2)) or now)
    if tat < now then tat = now end
    local new_tat = tat + t
    if new_tat - now > 1000 then return {1, math.ceil(new_tat - now - 1000)} end
    tats[i] = new_tat
  end
  if cap >= 0 then
    redis.call('ZREMRANGEBYSCORE', k(i, 1), '-inf', now)
    if redis.call('ZCARD', k(i, 1)) >= cap then return {2, 0} end
  end
end
for i = 1, n do
  if tats[i] then redis.call('SET', k(i, 2), tats[i], 'PX', 2000) end
  if a(i, 1) >= 0 or a(i, 3) >= 0 then
    redis.call('ZADD', k(i, 1), lease_end, member)
    redis.call('PEXPIREAT', k(i, 1), lease_end + 1000)
  end
end
return {0, 0}
";

/// The next budget slice of an answered call: the smallest any budgeted
/// key of its chain can give (a quarter of its free seconds, 1..300, 0 when
/// none is left), reserved on every one of them.
///
/// KEYS: per budgeted key its channel set, reservations, today's spent
/// seconds. ARGV: now_ms, member, then per key its daily seconds.
const GRANT_LUA: &str = r"
local now, member = tonumber(ARGV[1]), ARGV[2]
local slice = nil
for i = 1, #KEYS / 3 do
  local free = free_secs(KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], tonumber(ARGV[2 + i]), now)
  local s = 0
  if free > 0 then s = math.min(math.max(math.floor(free / 4), 1), 300) end
  if slice == nil or s < slice then slice = s end
end
if slice == nil then return -1 end
if slice > 0 then
  for i = 1, #KEYS / 3 do
    redis.call('HINCRBY', KEYS[3 * i - 1], member, slice)
    redis.call('EXPIRE', KEYS[3 * i - 1], 172800)
  end
end
return slice
";

/// A call's end: its leases are freed, its reservations dropped and its
/// billable seconds added to the day's spent seconds of every budgeted key,
/// once: the call's settled mark (`tg:settled:{<root>}:<call_id>`, also
/// what the CDR publication checks for a call whose end this did not see)
/// is set with it.
///
/// KEYS: the settled mark, the channel sets of its leases, then per
/// budgeted key its reservations and that day's spent seconds. ARGV:
/// member, the number of channel sets, billable seconds, mark's seconds.
const SETTLE_LUA: &str = r"
local member, nch, secs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[4]) then secs = 0 end
for i = 2, nch + 1 do redis.call('ZREM', KEYS[i], member) end
for i = nch + 2, #KEYS, 2 do
  redis.call('HDEL', KEYS[i], member)
  if secs > 0 then
    redis.call('INCRBY', KEYS[i + 1], secs)
    redis.call('EXPIRE', KEYS[i + 1], 172800)
  end
end
return 0
";

/// The fleet's answer to one admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted; the call holds a lease on every capped or budgeted key of
    /// the chain.
    Admitted,
    /// A key (or ancestor) is over its calls per second fleet-wide: retry
    /// after this many seconds (at least 1).
    RateLimited(u32),
    /// A key (or ancestor) is at its concurrent calls fleet-wide.
    Busy,
    /// The credential's single use was recorded before (`401`).
    Replayed,
    /// A key's (or ancestor's) daily budget is spent fleet-wide, or held
    /// whole by calls up (`402`).
    BudgetExhausted,
}

/// A key of the chain as [`FleetChannels::admit`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct ChainKey<'a> {
    /// The key id.
    pub id: &'a str,
    /// Its `max_calls` (`None`: no cap).
    pub max_calls: Option<u32>,
    /// Its `cps` (`None`: no limit).
    pub cps: Option<u32>,
    /// Its `daily_minutes` (`None`: no budget).
    pub daily_minutes: Option<u32>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The UTC day of a Unix time (as `tollgate_trunk::utc_day`).
fn utc_day(unix: i64) -> i64 {
    unix.div_euclid(86_400)
}

fn spent_key(prefix: &str, unix: i64) -> String {
    format!("{prefix}:{}", utc_day(unix))
}

/// The billable seconds key `kid` (of the hierarchy of `root`) spent on
/// the UTC day of `unix`, fleet-wide.
pub fn spent_key_of(root: &str, kid: &str, unix: i64) -> String {
    spent_key(&format!("tg:spent:{{{root}}}:{kid}"), unix)
}

/// Set when a call's seconds are settled on its keys' budgets: by the end
/// of the call ([`FleetChannels::release`]) or, for a call whose end the
/// fleet did not see (Redis down then, or recovered after a crash), by the
/// publication of its CDR; never twice.
pub fn settled_key(root: &str, call_id: &str) -> String {
    format!("tg:settled:{{{root}}}:{call_id}")
}

/// How long a settled mark is kept (longer than any record is re-sent).
pub const SETTLED_SECS: i64 = 8 * 86_400;

impl FleetChannels {
    /// Leases of `node`, each `lease` long.
    pub fn new(shared: Arc<Shared>, node: &str, lease: Duration) -> Arc<Self> {
        Arc::new(FleetChannels {
            shared,
            node: node.to_owned(),
            lease,
            admit: redis::Script::new(&format!("{FREE_LUA}{ADMIT_LUA}")),
            grant: redis::Script::new(&format!("{FREE_LUA}{GRANT_LUA}")),
            settle: redis::Script::new(SETTLE_LUA),
            held: Mutex::new(HashMap::new()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fleet's admission of `call` for `chain` (the key, then its
    /// ancestors up to `root`) with the credential's single use `pending`:
    /// one script, one round trip; none at all when there is no use to
    /// record and no key of the chain has a limit.
    pub fn admit(
        &self,
        root: &str,
        chain: &[ChainKey<'_>],
        call: u64,
        pending: Option<&PendingUse>,
    ) -> Result<Admission, StateError> {
        if pending.is_none()
            && chain
                .iter()
                .all(|k| k.max_calls.is_none() && k.cps.is_none() && k.daily_minutes.is_none())
        {
            return Ok(Admission::Admitted);
        }
        let now = now_ms();
        let tag = |what: &str, id: &str| format!("tg:{what}:{{{root}}}:{id}");
        let mut keys = Vec::with_capacity(chain.len() * 4);
        for k in chain {
            keys.push(tag("ch", k.id));
            keys.push(tag("cps", k.id));
            keys.push(tag("res", k.id));
            keys.push(spent_key(&tag("spent", k.id), now / 1000));
        }
        let member = format!("{}:{call}", self.node);
        let mut inv = self.admit.prepare_invoke();
        if let Some(p) = pending {
            inv.key(replay_key(root, &p.id));
        }
        for k in &keys {
            inv.key(k);
        }
        inv.arg(now)
            .arg(now + self.lease.as_millis() as i64)
            .arg(&member)
            .arg(pending.map_or(-1, |p| replay_exat(p.expires_at, now / 1000)));
        for k in chain {
            inv.arg(k.max_calls.map_or(-1, i64::from));
            inv.arg(k.cps.map_or(-1, i64::from));
            inv.arg(k.daily_minutes.map_or(-1, |m| i64::from(m) * 60));
        }
        let (verdict, ms): (i64, i64) = self.shared.run(false, |c| inv.invoke(c))?;
        Ok(match verdict {
            0 => {
                let mut held = Held {
                    member,
                    root: root.to_owned(),
                    leases: Vec::new(),
                    budgets: Vec::new(),
                    answered_at: None,
                    granted: 0,
                };
                for (k, ks) in chain.iter().zip(keys.chunks(4)) {
                    if k.max_calls.is_some() || k.daily_minutes.is_some() {
                        held.leases.push(ks[0].clone());
                    }
                    if let Some(m) = k.daily_minutes {
                        held.budgets.push((
                            ks[0].clone(),
                            ks[2].clone(),
                            tag("spent", k.id),
                            u64::from(m) * 60,
                        ));
                    }
                }
                if !held.leases.is_empty() {
                    self.held().insert(call, held);
                }
                Admission::Admitted
            }
            1 => {
                Admission::RateLimited(u32::try_from((ms + 999) / 1000).unwrap_or(u32::MAX).max(1))
            }
            3 => Admission::Replayed,
            4 => Admission::BudgetExhausted,
            _ => Admission::Busy,
        })
    }

    /// Records `pending` (of `root`'s hierarchy) alone (one `SET NX`, the
    /// key [`FleetChannels::admit`] uses): for a call this edge refused
    /// on its own limits before asking the fleet, so that a replay is
    /// still a `401` there. `true` the first time.
    pub fn record_use(&self, root: &str, pending: &PendingUse) -> Result<bool, StateError> {
        set_once(
            &self.shared,
            &replay_key(root, &pending.id),
            pending.expires_at,
            now_ms() / 1000,
        )
    }

    /// `call` was answered at `unix`: grants it the first slice of the
    /// fleet's budget and returns its length (as
    /// `tollgate_trunk::Allocator::answered`): `None` when no key of its
    /// chain has a budget, `Some(0)` when it is spent.
    pub fn answered(&self, call: u64, unix: i64) -> Result<Option<u64>, StateError> {
        {
            let mut held = self.held();
            let Some(h) = held.get_mut(&call) else {
                return Ok(None);
            };
            if h.budgets.is_empty() {
                return Ok(None);
            }
            if h.answered_at.is_none() {
                h.answered_at = Some(unix);
            }
        }
        self.budget_check(call, unix)
    }

    /// The seconds `call` may go on (as
    /// `tollgate_trunk::Allocator::budget_check`): what is left of its
    /// grant, or the next slice (one script) when it has used it up.
    pub fn budget_check(&self, call: u64, unix: i64) -> Result<Option<u64>, StateError> {
        let Some(h) = self.held().get(&call).cloned() else {
            return Ok(None);
        };
        let Some(answered) = h.answered_at else {
            return Ok(if h.budgets.is_empty() { None } else { Some(0) });
        };
        if h.budgets.is_empty() {
            return Ok(None);
        }
        let used = unix.saturating_sub(answered).max(0) as u64;
        let left = h.granted.saturating_sub(used);
        if left > 0 {
            return Ok(Some(left));
        }
        let mut inv = self.grant.prepare_invoke();
        for (ch, res, spent, _) in &h.budgets {
            inv.key(ch).key(res).key(spent_key(spent, unix));
        }
        inv.arg(now_ms()).arg(&h.member);
        for (_, _, _, secs) in &h.budgets {
            inv.arg(*secs);
        }
        let slice: i64 = self.shared.run(false, |c| inv.invoke(c))?;
        let slice = u64::try_from(slice).unwrap_or(0);
        if slice > 0 {
            if let Some(h) = self.held().get_mut(&call) {
                // The slice counts from now: time used past the last grant
                // (a late check) is not granted twice.
                h.granted = h.granted.max(used).saturating_add(slice);
            }
        }
        Ok(Some(slice))
    }

    /// `call` (CDR id `call_id`) ended at `unix` with `billable_secs`:
    /// frees its channels, drops its reservations and settles its seconds
    /// on the day's budget of every budgeted key (one script). A failure is
    /// logged: the lease ends by itself, and with it the reservations; the
    /// seconds are settled when the CDR is published.
    pub fn release(&self, call: u64, call_id: &str, billable_secs: u64, unix: i64) {
        let Some(h) = self.held().remove(&call) else {
            return;
        };
        let mut inv = self.settle.prepare_invoke();
        inv.key(settled_key(&h.root, call_id));
        for ch in &h.leases {
            inv.key(ch);
        }
        for (_, res, spent, _) in &h.budgets {
            inv.key(res).key(spent_key(spent, unix));
        }
        inv.arg(&h.member)
            .arg(h.leases.len())
            .arg(billable_secs)
            .arg(SETTLED_SECS);
        if let Err(e) = self.shared.run(false, |c| inv.invoke::<i64>(c)) {
            tracing::warn!(error = %e, "fleet release failed; the lease ends by itself");
        }
    }

    /// Renews every lease this node holds (one pipeline). Plain `ZADD`, not
    /// `XX`: after an outage the calls still up count fleet-wide again.
    pub fn renew(&self) -> Result<(), StateError> {
        let held: Vec<(Vec<String>, String)> = self
            .held()
            .values()
            .map(|h| (h.leases.clone(), h.member.clone()))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let end = now_ms() + self.lease.as_millis() as i64;
        let mut cmds = Vec::new();
        for (keys, member) in &held {
            for k in keys {
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(k).arg(end).arg(member);
                let mut exp = redis::cmd("PEXPIREAT");
                exp.arg(k).arg(end + 1000);
                cmds.push(zadd);
                cmds.push(exp);
            }
        }
        self.shared
            .run(false, |c| c.pipeline::<redis::Value>(cmds))
            .map(|_| ())
    }

    /// Starts the renewing thread (every `lease / 3`).
    pub fn start_renewer(self: &Arc<Self>) {
        let me = self.clone();
        let every = (self.lease / 3).max(Duration::from_millis(200));
        let spawned = std::thread::Builder::new()
            .name("state-leases".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                if let Err(e) = me.renew() {
                    tracing::debug!(error = %e, "lease renewal failed");
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lease renewal thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keys_carry_one_hash_tag_per_api_key() {
        assert_eq!(
            replay_key("root00000001", "abc123def456:j-1"),
            "tg:replay:{root00000001}:abc123def456:j-1"
        );
        assert_eq!(own_tag("abc123def456:j-1"), "abc123def456");
        assert_eq!(own_tag("nonce:XYZ"), "nonce:XYZ");
        assert_eq!(record_key("abc123def456"), "tg:key:{abc123def456}");
    }

    #[test]
    fn bad_urls_name_the_field_and_hide_the_url() {
        let e = Shared::open(
            "http://u:hunter2@127.0.0.1:1",
            Duration::from_millis(50),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[state] url"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn cluster_urls_list_their_seed_nodes() {
        assert_eq!(cluster_seeds("redis://127.0.0.1:6379/0").unwrap(), None);
        assert_eq!(
            cluster_seeds("redis+cluster://127.0.0.1:7001,127.0.0.1:7002").unwrap(),
            Some(vec![
                "redis://127.0.0.1:7001".to_string(),
                "redis://127.0.0.1:7002".to_string()
            ])
        );
        assert_eq!(
            cluster_seeds("rediss+cluster://u:p@a.example:7001,b.example:7002/?x=1").unwrap(),
            Some(vec![
                "rediss://u:p@a.example:7001/?x=1".to_string(),
                "rediss://u:p@b.example:7002/?x=1".to_string()
            ])
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://u:hunter2@127.0.0.1",
            "redis+cluster://127.0.0.1:7001,",
            "redis+cluster://127.0.0.1:0",
            "redis+cluster://:7001",
        ] {
            let e = Shared::open(bad, Duration::from_millis(50), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("[state] url"), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let s = Shared::open(
            "redis+cluster://127.0.0.1:1,127.0.0.1:2",
            Duration::from_millis(50),
            None,
        )
        .unwrap();
        assert!(s.is_cluster());
        // Nothing listens: down at once, no hang.
        let t = Instant::now();
        assert!(s.ping().is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn down_store_refuses_or_falls_back_without_waiting() {
        // Port 1 on loopback: nothing listens, the connect fails at once.
        let shared =
            Shared::open("redis://127.0.0.1:1/0", Duration::from_millis(100), None).unwrap();
        assert!(shared.ping().is_err());
        assert!(!shared.is_up());
        let refuse = RedisReplayCache::new(shared.clone(), None);
        let t = Instant::now();
        assert_eq!(refuse.record_use("k:j", 100, 10), Use::Unavailable);
        assert!(!refuse.first_use("k:j", 100, 10));
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        let local = RedisReplayCache::new(
            shared,
            Some(Arc::new(tollgate_keys::MemoryReplayCache::new())),
        );
        assert_eq!(local.record_use("k:j", 100, 10), Use::First);
        assert_eq!(local.record_use("k:j", 100, 10), Use::Replayed);
    }
}
