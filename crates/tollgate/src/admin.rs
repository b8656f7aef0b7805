//! The admin HTTP API (SPEC §2, §7): JSON over HTTPS (rustls, when
//! `[admin] tls_cert` and `tls_key` are set) or plain HTTP (loopback by
//! default), authenticated with `Authorization: Bearer tg_sk_...`.
//!
//! The routes are [`ROUTES`]; `docs/admin-openapi.yaml` describes each of
//! them (a test keeps the two in step).
//!
//! Who may do what:
//! * the bearer must be a usable secret key: what the key store keeps of it
//!   (a SHA-256 hash) is compared in constant time ([`KeyStore::verify_key`]);
//!   a missing, malformed, unknown, revoked, expired or rolled key gets 401,
//!   a public key 403;
//! * `/v1/keys*` need the `keys` scope, `/v1/usage` the `usage` scope and
//!   `/v1/calls*` the `trunks` scope (403 otherwise);
//! * the request must come from the key's `source_cidrs` and every
//!   ancestor's (SPEC §2; [`tollgate_keys::store::source_allowed`]), else 403
//!   `source_not_allowed`;
//! * a key manages (lists, creates under, rolls, revokes) only itself and its
//!   own descendants, and sees only their usage and calls, never an ancestor,
//!   a sibling or another root key, whether it has a parent or not
//!   ([`tollgate_keys::store::within_subtree`]). Anything else is 404 rather
//!   than 403, so that a key cannot learn which ids exist outside its subtree.
//!   (The `tollgate keys` CLI works on the data directory with the operator's
//!   file-system rights and manages every key.)
//!
//! Keys created here are children of the caller, or of a key in its subtree
//! named by `parent`: scopes a subset of the parent's scopes, limits no
//! looser than its limits (a limit left out is inherited).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tollgate_keys::{ApiKey, KeyAdmin, KeyError, KeyKind, KeyRecord, KeyStore, Limits, Scope};
use tollgate_sip::driver::Control;
use tollgate_sip::EndCause;
use tollgate_trunk::{FileCdrStore, KeyUsage};

use crate::config::ConfigError;
use crate::policy::{ActiveCall, CallRegistry};
use crate::Failure;

/// Every route the router serves: (method, path). `docs/admin-openapi.yaml`
/// has exactly these operations (checked by the tests, which also probe
/// the router with every method on every path).
#[cfg(test)]
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/{id}"),
    ("POST", "/v1/keys/{id}/roll"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/calls"),
    ("DELETE", "/v1/calls/{id}"),
    ("GET", "/v1/calls/{id}/recording"),
];

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 64 * 1024;
/// Longest grace period a roll may give the old secret.
pub const MAX_GRACE_SECS: u64 = 30 * 86_400;
/// `WWW-Authenticate` of a 401 without a bearer key, and with a bad one.
const CHALLENGE: &str = "Bearer realm=\"tollgate-admin\"";
const CHALLENGE_INVALID: &str = "Bearer realm=\"tollgate-admin\", error=\"invalid_token\"";
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
pub struct AdminState {
    pub keys: Arc<dyn KeyAdmin>,
    pub cdrs: Arc<FileCdrStore>,
    /// `[state]`: usage is the fleet's, summed from its stream of records.
    pub fleet_usage: Option<Arc<tollgate_state::Shared>>,
    pub calls: CallRegistry,
    pub control: mpsc::Sender<Control>,
    /// Where recordings are (`<data dir>/recordings`, recording.rs).
    pub data_dir: PathBuf,
}

// ---- errors ----------------------------------------------------------------------

/// An error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }
    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the edge's log",
        )
    }
    /// An extractor's rejection (body too large, bad query string...).
    fn rejected(status: StatusCode, text: String) -> Self {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                status,
                "payload_too_large",
                format!("request body larger than {MAX_BODY} bytes"),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::new(
                status,
                "unsupported_media_type",
                "Content-Type must be application/json",
            ),
            s if s.is_server_error() => {
                tracing::warn!(error = %text, "admin request failed");
                Self::internal()
            }
            _ => Self::bad_request(text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = if self.code == "invalid_key" {
                CHALLENGE_INVALID
            } else {
                CHALLENGE
            };
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        resp
    }
}

fn key_error(e: KeyError) -> ApiError {
    match e {
        KeyError::Invalid(m) => ApiError::bad_request(m),
        KeyError::Malformed => ApiError::bad_request("malformed key id"),
        KeyError::NotFound(_) => ApiError::not_found("key"),
        KeyError::Revoked(id) => ApiError::new(
            StatusCode::CONFLICT,
            "key_revoked",
            format!("key {id:?} is revoked"),
        ),
        // The fleet's shared state (SPEC §8) is down: try again shortly.
        KeyError::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            "shared state unreachable; retry shortly",
        ),
        other => {
            tracing::error!(error = %other, "admin API: key store operation failed");
            ApiError::internal()
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "admin API: blocking task failed");
        Err(ApiError::internal())
    })
}

// ---- authentication ----------------------------------------------------------------

/// The authenticated caller: a usable secret key.
pub struct Caller(Arc<KeyRecord>);

/// The TCP peer of a request, put in its extensions by [`serve_conn`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

impl FromRequestParts<Arc<AdminState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<Peer>().map(|p| p.0);
        authenticate(&parts.headers, peer, &*st.keys, crate::unix_now()).map(Caller)
    }
}

/// The key record a request's bearer key belongs to, if the request came
/// from `peer` and the key's (and its ancestors') `source_cidrs` allow it.
/// An unknown peer passes only keys without any source restriction.
pub fn authenticate(
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    keys: &dyn KeyStore,
    now: u64,
) -> Result<Arc<KeyRecord>, ApiError> {
    let invalid = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_key",
            "the bearer key is not a valid, current secret key",
        )
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing Authorization: Bearer <secret key>",
        ));
    };
    let value = value.to_str().map_err(|_| invalid())?.trim();
    let (scheme, token) = value.split_once(' ').ok_or_else(invalid)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "use Authorization: Bearer <secret key>",
        ));
    }
    let key = ApiKey::parse(token.trim()).map_err(|_| invalid())?;
    let rec = keys.verify_key(&key, now).ok_or_else(invalid)?;
    if rec.kind != KeyKind::Secret {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "public_key",
            "public keys may place calls only; the admin API needs a secret key",
        ));
    }
    let allowed = match peer {
        Some(ip) => tollgate_keys::store::source_allowed(keys, &rec, ip),
        None => {
            rec.limits.source_cidrs.is_empty()
                && tollgate_keys::store::ancestors(keys, &rec)
                    .is_some_and(|a| a.iter().all(|p| p.limits.source_cidrs.is_empty()))
        }
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "source_not_allowed",
            "this key may not be used from this address",
        ));
    }
    Ok(rec)
}

impl Caller {
    fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this key lacks the {scope} scope"),
            ))
        }
    }

    /// Whether the caller may see and manage the key `target`.
    fn manages(&self, target: &KeyRecord, keys: &dyn KeyStore) -> bool {
        manages(&self.0, target, keys)
    }

    fn manages_id(&self, id: &str, keys: &dyn KeyStore) -> bool {
        keys.get(id).is_some_and(|r| self.manages(&r, keys))
    }
}

/// A key manages itself and its descendants only (SPEC §2), root or not.
pub fn manages(caller: &KeyRecord, target: &KeyRecord, keys: &dyn KeyStore) -> bool {
    tollgate_keys::store::within_subtree(keys, &target.id, &caller.id)
}

// ---- request bodies ----------------------------------------------------------------

/// A JSON body (`Content-Type: application/json`); `None` for an empty body
/// when `optional`.
fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    optional: bool,
) -> Result<Option<T>, ApiError> {
    let body = body.map_err(|r| ApiError::rejected(r.status(), r.body_text()))?;
    if optional && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::rejected(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            String::new(),
        ));
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

/// A duration: seconds, or text like `30s`, `10m`, `1h`, `2d`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Dur {
    Secs(u64),
    Text(String),
}

impl Dur {
    fn secs(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            Dur::Secs(n) => Ok(*n),
            Dur::Text(t) => {
                crate::config::parse_duration(field, t).map_err(|e| ApiError::bad_request(e.0))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindParam {
    Secret,
    Public,
}

/// `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    kind: Option<KindParam>,
    #[serde(default)]
    scopes: Option<Vec<Scope>>,
    #[serde(default)]
    cps: Option<u32>,
    #[serde(default)]
    max_calls: Option<u32>,
    #[serde(default)]
    daily_minutes: Option<u32>,
    #[serde(default)]
    allow_prefixes: Vec<String>,
    #[serde(default)]
    deny_prefixes: Vec<String>,
    #[serde(default)]
    source_cidrs: Vec<String>,
    /// Sources admitted without a credential (inside `source_cidrs`).
    #[serde(default)]
    trusted_cidrs: Vec<String>,
    /// The key to create under: the caller (default) or one of its descendants.
    #[serde(default)]
    parent: Option<String>,
    /// Caller identities the key may present (numbers or prefixes).
    #[serde(default)]
    caller_ids: Vec<String>,
    #[serde(default)]
    expires_in: Option<Dur>,
    #[serde(default)]
    expires_at: Option<u64>,
    /// Default https URL for call events when a call's token names none.
    #[serde(default)]
    webhook: Option<String>,
}

/// `POST /v1/keys/{id}/roll`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollKey {
    #[serde(default)]
    grace: Option<Dur>,
}

/// `GET /v1/usage` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    key: Option<String>,
    since: Option<String>,
}

/// The new key's limits: the request's, with every limit the caller has and
/// the request leaves out inherited, and the caller's denied prefixes added.
/// The store then checks they are no looser than the caller's.
fn child_limits(req: &CreateKey, parent: &Limits, now: u64) -> Result<Limits, ApiError> {
    let expires_at = match (&req.expires_in, req.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give expires_in or expires_at, not both",
            ))
        }
        (Some(d), None) => {
            let secs = d.secs("expires_in")?;
            if secs == 0 {
                return Err(ApiError::bad_request("expires_in: must be positive"));
            }
            Some(now.saturating_add(secs))
        }
        (None, Some(t)) => {
            if t <= now {
                return Err(ApiError::bad_request("expires_at: must be in the future"));
            }
            Some(t)
        }
        (None, None) => parent.expires_at,
    };
    let cidrs = |field: &str, list: &[String]| -> Result<Vec<_>, ApiError> {
        list.iter()
            .map(|c| {
                c.trim()
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("{field}: {c:?} is not a CIDR")))
            })
            .collect()
    };
    let mut source_cidrs = cidrs("source_cidrs", &req.source_cidrs)?;
    if source_cidrs.is_empty() {
        source_cidrs = parent.source_cidrs.clone();
    }
    let trusted_cidrs = cidrs("trusted_cidrs", &req.trusted_cidrs)?;
    let mut deny_prefixes = req.deny_prefixes.clone();
    for p in &parent.deny_prefixes {
        if !deny_prefixes.contains(p) {
            deny_prefixes.push(p.clone());
        }
    }
    for (field, list) in [
        ("allow_prefixes", &req.allow_prefixes),
        ("deny_prefixes", &req.deny_prefixes),
        ("caller_ids", &req.caller_ids),
    ] {
        tollgate_keys::number::check_list(field, list).map_err(ApiError::bad_request)?;
    }
    Ok(Limits {
        cps: req.cps.or(parent.cps),
        max_calls: req.max_calls.or(parent.max_calls),
        daily_minutes: req.daily_minutes.or(parent.daily_minutes),
        allow_prefixes: if req.allow_prefixes.is_empty() {
            parent.allow_prefixes.clone()
        } else {
            req.allow_prefixes.clone()
        },
        deny_prefixes,
        source_cidrs,
        trusted_cidrs,
        caller_ids: if req.caller_ids.is_empty() {
            parent.caller_ids.clone()
        } else {
            req.caller_ids.clone()
        },
        expires_at,
    })
}

// ---- views -------------------------------------------------------------------------

fn key_view(r: &KeyRecord, now: u64) -> Value {
    let status = if r.revoked_at.is_some() {
        "revoked"
    } else if !r.is_usable(now) {
        "expired"
    } else {
        "active"
    };
    let grace_until = r
        .secrets
        .iter()
        .skip(1)
        .filter(|s| s.is_live(now))
        .filter_map(|s| s.not_after)
        .max();
    json!({
        "id": r.id,
        "name": r.name,
        "kind": r.kind,
        "parent": r.parent,
        "scopes": r.scopes,
        "limits": r.limits,
        "created_at": r.created_at,
        "revoked_at": r.revoked_at,
        "status": status,
        "old_secret_valid_until": grace_until,
        "webhook": r.webhook,
    })
}

fn with_key(mut view: Value, key: &ApiKey) -> Value {
    if let Some(o) = view.as_object_mut() {
        o.insert("key".into(), Value::String(key.expose().to_string()));
    }
    view
}

fn usage_view(key: &str, u: &KeyUsage) -> Value {
    json!({
        "key": key,
        "calls": u.calls,
        "answered": u.answered,
        "failed": u.failed,
        "failed_by_cause": u.failed_by_cause,
        "billable_secs": u.billable_secs,
    })
}

fn call_view(c: &ActiveCall) -> Value {
    json!({
        "id": c.call_id,
        "sip_call_id": c.a_call_id,
        "key": c.key_id,
        "from": c.from,
        "to": c.to,
        "start": c.start,
        "answered_at": c.answered,
        "state": if c.answered.is_some() { "answered" } else { "setup" },
    })
}

fn path_param(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|r| ApiError::rejected(r.status(), r.body_text()))
}

fn check_key_id(id: &str) -> Result<(), ApiError> {
    if tollgate_keys::apikey::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request("a key id is 12 characters [a-z0-9]"))
    }
}

// ---- handlers ----------------------------------------------------------------------

type St = State<Arc<AdminState>>;

async fn list_keys(State(st): St, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Keys)?;
    let now = crate::unix_now();
    let keys: Vec<Value> = st
        .keys
        .list()
        .iter()
        .filter(|r| caller.manages(r, &*st.keys))
        .map(|r| key_view(r, now))
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

async fn create_key(
    State(st): St,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Keys)?;
    let req: CreateKey = json_body(&headers, body, false)?
        .ok_or_else(|| ApiError::bad_request("request body: a JSON object"))?;
    if req.name.trim().is_empty() {
        return Err(ApiError::bad_request("name: must not be empty"));
    }
    let now = crate::unix_now();
    // The parent: the caller, or a key of its subtree (404 outside it).
    let parent_rec = match &req.parent {
        None => caller.0.clone(),
        Some(pid) => {
            check_key_id(pid)?;
            match st.keys.get(pid) {
                Some(p) if caller.manages(&p, &*st.keys) => p,
                _ => return Err(ApiError::not_found("key")),
            }
        }
    };
    let limits = child_limits(&req, &parent_rec.limits, now)?;
    let kind = match req.kind {
        Some(KindParam::Public) => KeyKind::Public,
        Some(KindParam::Secret) | None => KeyKind::Secret,
    };
    let held = match &req.scopes {
        Some(s) => !s.is_empty(),
        None => Scope::allowed_for(kind)
            .iter()
            .any(|s| parent_rec.has_scope(*s)),
    };
    if !held {
        return Err(ApiError::bad_request(
            "scopes: the new key would hold no scope",
        ));
    }
    if let Some(w) = &req.webhook {
        crate::webhook::check_url(w).map_err(|e| ApiError::bad_request(format!("webhook: {e}")))?;
    }
    let parent = parent_rec.id.clone();
    let store = st.keys.clone();
    let (rec, key) = blocking(move || {
        let (rec, key) = store
            .create(&req.name, kind, req.scopes, limits, Some(&parent), now)
            .map_err(key_error)?;
        match &req.webhook {
            Some(w) => {
                store.set_webhook(&rec.id, Some(w)).map_err(key_error)?;
                let rec = store.get(&rec.id).unwrap_or(rec);
                Ok((rec, key))
            }
            None => Ok((rec, key)),
        }
    })
    .await?;
    tracing::info!(caller = %caller.0.id, key = %rec.id, kind = %rec.kind, "admin API: key created");
    let body = with_key(key_view(&rec, now), &key);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn roll_key(
    State(st): St,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Keys)?;
    let id = path_param(id)?;
    check_key_id(&id)?;
    let req: RollKey = json_body(&headers, body, true)?.unwrap_or_default();
    let grace = match &req.grace {
        Some(g) => {
            let secs = g.secs("grace")?;
            if secs > MAX_GRACE_SECS {
                return Err(ApiError::bad_request(format!(
                    "grace: at most {MAX_GRACE_SECS} s (30 days)"
                )));
            }
            Some(secs)
        }
        None => None,
    };
    if !caller.manages_id(&id, &*st.keys) {
        return Err(ApiError::not_found("key"));
    }
    let now = crate::unix_now();
    let store = st.keys.clone();
    let rid = id.clone();
    let key = blocking(move || store.roll(&rid, grace, now).map_err(key_error)).await?;
    let rec = st.keys.get(&id).ok_or_else(ApiError::internal)?;
    tracing::info!(caller = %caller.0.id, key = %id, grace_secs = grace.unwrap_or(0), "admin API: key rolled");
    Ok(Json(with_key(key_view(&rec, now), &key)))
}

async fn revoke_key(
    State(st): St,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Keys)?;
    let id = path_param(id)?;
    check_key_id(&id)?;
    if !caller.manages_id(&id, &*st.keys) {
        return Err(ApiError::not_found("key"));
    }
    let now = crate::unix_now();
    let store = st.keys.clone();
    let rid = id.clone();
    blocking(move || store.revoke(&rid, now).map_err(key_error)).await?;
    let rec = st.keys.get(&id).ok_or_else(ApiError::internal)?;
    tracing::info!(caller = %caller.0.id, key = %id, "admin API: key revoked");
    Ok(Json(key_view(&rec, now)))
}

async fn usage(
    State(st): St,
    caller: Caller,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Usage)?;
    let Query(q) = q.map_err(|r| ApiError::rejected(r.status(), r.body_text()))?;
    let since = match q.since.as_deref() {
        None => None,
        Some(s) => Some(crate::parse_since(s).map_err(|_| {
            ApiError::bad_request(format!(
                "since: {s:?} is not Unix seconds, YYYY-MM-DD or a duration ago (24h)"
            ))
        })?),
    };
    if let Some(k) = &q.key {
        check_key_id(k)?;
        if !caller.manages_id(k, &*st.keys) {
            return Err(ApiError::not_found("key"));
        }
    }
    // Which keys the caller may see: its subtree.
    let visible: HashSet<String> = st
        .keys
        .list()
        .iter()
        .filter(|r| caller.manages(r, &*st.keys))
        .map(|r| r.id.clone())
        .collect();
    let cdrs = st.cdrs.clone();
    let fleet = st.fleet_usage.clone();
    let key = q.key.clone();
    let mut totals = blocking(move || match fleet {
        Some(shared) => tollgate_state::fleet_usage(&shared, key.as_deref(), since).map_err(|e| {
            tracing::warn!(error = %e, "admin API: reading the fleet's records failed");
            key_error(KeyError::Unavailable(e.to_string()))
        }),
        None => cdrs.totals(key.as_deref(), since).map_err(|e| {
            tracing::error!(error = %e, "admin API: reading the CDR store failed");
            ApiError::internal()
        }),
    })
    .await?;
    totals.keys.retain(|k, _| visible.contains(k));
    if let Some(k) = &q.key {
        totals.keys.entry(k.clone()).or_default();
    }
    let keys: Vec<Value> = totals.keys.iter().map(|(k, u)| usage_view(k, u)).collect();
    let total = totals.total();
    Ok(Json(json!({
        "since": since,
        "keys": keys,
        "total": {
            "calls": total.calls,
            "answered": total.answered,
            "failed": total.failed,
            "failed_by_cause": total.failed_by_cause,
            "billable_secs": total.billable_secs,
        },
        "unreadable_records": totals.bad_lines,
    })))
}

async fn list_calls(State(st): St, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Trunks)?;
    let mut calls: Vec<ActiveCall> = st
        .calls
        .iter()
        .map(|e| e.value().clone())
        .filter(|c| caller.manages_id(&c.key_id, &*st.keys))
        .collect();
    calls.sort_by(|a, b| (a.start, &a.call_id).cmp(&(b.start, &b.call_id)));
    let calls: Vec<Value> = calls.iter().map(call_view).collect();
    Ok(Json(json!({ "calls": calls })))
}

async fn hang_up(
    State(st): St,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Trunks)?;
    let id = path_param(id)?;
    let found = st
        .calls
        .iter()
        .find(|e| e.value().call_id == id)
        .map(|e| (*e.key(), e.value().clone()));
    let Some((handle, call)) = found else {
        return Err(ApiError::not_found("call"));
    };
    if !caller.manages_id(&call.key_id, &*st.keys) {
        return Err(ApiError::not_found("call"));
    }
    st.control
        .send(Control::Hangup(handle, EndCause::Admin))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the edge is shutting down",
            )
        })?;
    tracing::info!(caller = %caller.0.id, call = %id, "admin API: hang-up requested");
    let mut view = call_view(&call);
    if let Some(o) = view.as_object_mut() {
        o.insert("state".into(), Value::String("hanging_up".into()));
    }
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// `GET /v1/calls/{id}/recording` (SPEC §10): the call's WAV, to the key
/// that made the call only (an ancestor, a sibling or anyone else gets the
/// same 404 as for a call that was not recorded).
async fn recording(
    State(st): St,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Trunks)?;
    let id = path_param(id)?;
    let path = crate::recording::Recorder::path_of(&st.data_dir, &caller.0.id, &id);
    match tokio::fs::read(&path).await {
        Ok(wav) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static("audio/wav"))],
            wav,
        )
            .into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::not_found("recording")),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "admin API: recording unreadable");
            Err(ApiError::internal())
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// The admin API.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", delete(revoke_key))
        .route("/v1/keys/{id}/roll", post(roll_key))
        .route("/v1/usage", get(usage))
        .route("/v1/calls", get(list_calls))
        .route("/v1/calls/{id}", delete(hang_up))
        .route("/v1/calls/{id}/recording", get(recording))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

// ---- configuration and serving ---------------------------------------------------------

/// Refuses plain HTTP off loopback unless the operator said so: the bearer
/// is a secret key.
pub fn check_plaintext(
    field: &str,
    addr: SocketAddr,
    tls: bool,
    allow_plaintext: bool,
) -> Result<(), ConfigError> {
    if tls || allow_plaintext || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(ConfigError(format!(
        "{field}: {addr} is not a loopback address: set admin.tls_cert and admin.tls_key \
         (secret keys must not cross a network in clear), or admin.allow_plaintext = true \
         behind a TLS-terminating proxy"
    )))
}

/// The rustls server configuration from PEM files (errors name the field).
pub fn load_tls(cert: &FsPath, key: &FsPath) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError(format!("admin.tls_cert: {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ConfigError(format!(
            "admin.tls_cert: {}: no PEM certificate in it",
            cert.display()
        )));
    }
    let pkey = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ConfigError(format!("admin.tls_key: {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("admin.tls_cert: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, pkey)
        .map_err(|e| {
            ConfigError(format!(
                "admin.tls_key: {} does not go with admin.tls_cert {}: {e}",
                key.display(),
                cert.display()
            ))
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The running admin API: where it listens, and its certificate (SIGHUP
/// reloads it).
pub struct AdminServer {
    pub addr: SocketAddr,
    tls: Option<Arc<RwLock<Arc<rustls::ServerConfig>>>>,
}

impl AdminServer {
    /// Re-reads the certificate and key (SIGHUP): new connections use them,
    /// open ones keep theirs; on error the running certificate stays.
    /// Turning HTTPS on or off takes a restart. Returns whether it reloaded.
    pub fn reload_tls(&self, files: Option<&(PathBuf, PathBuf)>) -> Result<bool, ConfigError> {
        match (&self.tls, files) {
            (Some(current), Some((cert, key))) => {
                let cfg = load_tls(cert, key)?;
                *current.write().unwrap_or_else(PoisonError::into_inner) = cfg;
                Ok(true)
            }
            (None, None) => Ok(false),
            (Some(_), None) => Err(ConfigError(
                "admin.tls_cert: turning HTTPS off takes a restart".into(),
            )),
            (None, Some(_)) => Err(ConfigError(
                "admin.tls_cert: turning HTTPS on takes a restart".into(),
            )),
        }
    }
}

/// Binds `listen` and serves the API on it (HTTPS with `tls`).
pub async fn start(
    state: Arc<AdminState>,
    listen: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<AdminServer, Failure> {
    let err = |e: std::io::Error| Failure::Other(format!("cannot listen on {listen}: {e}"));
    let l = TcpListener::bind(listen).await.map_err(err)?;
    let addr = l.local_addr().map_err(err)?;
    let tls = tls.map(|c| Arc::new(RwLock::new(c)));
    tokio::spawn(accept_loop(l, tls.clone(), router(state)));
    Ok(AdminServer { addr, tls })
}

async fn accept_loop(
    l: TcpListener,
    tls: Option<Arc<RwLock<Arc<rustls::ServerConfig>>>>,
    app: Router,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.as_ref().map(|t| {
            let cfg = t.read().unwrap_or_else(PoisonError::into_inner).clone();
            tokio_rustls::TlsAcceptor::from(cfg)
        });
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let peer_ip = Peer(peer.ip().to_canonical());
            match tls {
                None => serve_conn(tcp, app, peer_ip).await,
                Some(acc) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(tcp)).await {
                    Ok(Ok(s)) => serve_conn(s, app, peer_ip).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "admin API: TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "admin API: TLS handshake timed out"),
                },
            }
        });
    }
}

/// Serves one connection; every request carries the peer address ([`Peer`])
/// for the source check.
async fn serve_conn<I>(io: I, app: Router, peer: Peer)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = tower::ServiceExt::map_request(
        app,
        move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer);
            req
        },
    );
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "admin API: connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::collections::BTreeSet;
    use tollgate_keys::FileKeyStore;
    use tower::ServiceExt as _;

    const OPENAPI: &str = include_str!("../../../docs/admin-openapi.yaml");

    /// (method, path) of every operation in the OpenAPI document: path keys
    /// are indented two spaces under `paths:`, operations four.
    fn openapi_operations() -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        let mut in_paths = false;
        let mut path: Option<String> = None;
        for line in OPENAPI.lines() {
            if !line.starts_with(' ') && !line.trim().is_empty() {
                in_paths = line.trim_end() == "paths:";
                path = None;
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) {
                path = p
                    .trim_end()
                    .strip_suffix(':')
                    .map(|p| p.trim_matches(['"', '\'']).to_string());
            } else if let (Some(p), Some(m)) = (
                &path,
                line.strip_prefix("    ").filter(|l| !l.starts_with(' ')),
            ) {
                let m = m.trim_end().trim_end_matches(':');
                if ["get", "post", "put", "patch", "delete", "head", "options"].contains(&m) {
                    ops.insert((m.to_ascii_uppercase(), p.clone()));
                }
            }
        }
        ops
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "tollgate-admin-unit-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn state(dir: &TempDir) -> (Arc<AdminState>, mpsc::Receiver<Control>) {
        let (tx, rx) = mpsc::channel(8);
        let st = AdminState {
            keys: Arc::new(FileKeyStore::open(&dir.0).unwrap()),
            cdrs: Arc::new(FileCdrStore::open_read_only(&dir.0).unwrap()),
            fleet_usage: None,
            calls: CallRegistry::default(),
            control: tx,
            data_dir: dir.0.clone(),
        };
        (Arc::new(st), rx)
    }

    async fn send(
        app: &Router,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Body::from(body.unwrap_or("").to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    fn concrete(path: &str) -> String {
        path.replace("{id}", "abcdefghij12")
    }

    #[tokio::test]
    async fn openapi_document_lists_exactly_the_routes_served() {
        let doc = openapi_operations();
        let table: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(
            doc, table,
            "docs/admin-openapi.yaml and admin::ROUTES differ"
        );
        assert!(
            OPENAPI.starts_with("openapi: 3."),
            "not an OpenAPI 3 document"
        );

        // The router serves exactly the table: each listed operation reaches
        // authentication (401, not 404/405); every other method on those
        // paths is 405; other paths are 404.
        let dir = TempDir::new("routes");
        let (st, _rx) = state(&dir);
        let app = router(st);
        let paths: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
        for p in &paths {
            for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                let listed = ROUTES.contains(&(m, p));
                let (status, body) = send(&app, m, &concrete(p), None, None).await;
                let want = if listed {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::METHOD_NOT_ALLOWED
                };
                assert_eq!(status, want, "{m} {p}: {body}");
                assert!(body["error"]["code"].is_string(), "{m} {p}: {body}");
            }
        }
        for p in [
            "/",
            "/v1",
            "/v1/key",
            "/v1/keys/abcdefghij12/rolls",
            "/v2/keys",
            "/metrics",
        ] {
            let (status, body) = send(&app, "GET", p, None, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{p}: {body}");
            assert_eq!(body["error"]["code"], "not_found");
        }
    }

    #[tokio::test]
    async fn scopes_parents_and_body_errors() {
        let dir = TempDir::new("scopes");
        let (st, mut rx) = state(&dir);
        let now = crate::unix_now();
        let (_, root) = st
            .keys
            .create("root", KeyKind::Secret, None, Limits::default(), None, now)
            .unwrap();
        let (_, usage_only) = st
            .keys
            .create(
                "u",
                KeyKind::Secret,
                Some(vec![Scope::Usage]),
                Limits::default(),
                None,
                now,
            )
            .unwrap();
        let app = router(st.clone());
        let root_s = root.expose();

        // Wrong content type, bad JSON, unknown field, oversized body.
        let req = Request::builder()
            .method("POST")
            .uri("/v1/keys")
            .header("authorization", format!("Bearer {root_s}"))
            .header("content-type", "text/plain")
            .body(Body::from("{\"name\":\"x\"}"))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let (s, b) = send(&app, "POST", "/v1/keys", Some(root_s), Some("{")).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
        let (s, b) = send(
            &app,
            "POST",
            "/v1/keys",
            Some(root_s),
            Some("{\"name\":\"x\",\"colour\":1}"),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("colour"),
            "{b}"
        );
        let big = format!("{{\"name\":\"{}\"}}", "a".repeat(MAX_BODY));
        let (s, b) = send(&app, "POST", "/v1/keys", Some(root_s), Some(&big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
        assert_eq!(b["error"]["code"], "payload_too_large");

        // A scope the caller lacks.
        let (s, b) = send(&app, "GET", "/v1/keys", Some(usage_only.expose()), None).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("insufficient_scope"))
        );

        // A child with the keys scope sees itself and its descendants only.
        let (s, b) = send(&app, "POST", "/v1/keys", Some(root_s),
            Some(r#"{"name":"team","scopes":["calls","keys","usage","trunks"],"cps":5,"allow_prefixes":["+1"],"deny_prefixes":["+1900"]}"#)).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let team = b["key"].as_str().unwrap().to_string();
        let (s, b) = send(
            &app,
            "POST",
            "/v1/keys",
            Some(&team),
            Some(r#"{"name":"app","kind":"public","allow_prefixes":["+1415"]}"#),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        // Limits left out are inherited; the parent's denials are kept.
        assert_eq!(b["limits"]["cps"], 5);
        assert_eq!(b["limits"]["deny_prefixes"], json!(["+1900"]));
        assert_eq!(b["scopes"], json!(["calls"]));
        let (s, b) = send(
            &app,
            "POST",
            "/v1/keys",
            Some(&team),
            Some(r#"{"name":"x","cps":6}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("cps"),
            "{b}"
        );
        let (s, b) = send(
            &app,
            "POST",
            "/v1/keys",
            Some(&team),
            Some(r#"{"name":"x","allow_prefixes":["+44"]}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        let (s, _) = send(&app, "GET", "/v1/keys", Some(&team), None).await;
        assert_eq!(s, StatusCode::OK);
        let (_, b) = send(&app, "GET", "/v1/keys", Some(&team), None).await;
        let mut names: Vec<&str> = b["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["app", "team"]);
        // The root sees its subtree only: not the other root key "u".
        let (_, b) = send(&app, "GET", "/v1/keys", Some(root_s), None).await;
        assert_eq!(b["keys"].as_array().unwrap().len(), 3, "{b}");
        let u_path = format!("/v1/keys/{}/roll", usage_only.id());
        let (s, _) = send(&app, "POST", &u_path, Some(root_s), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "another root is out of reach");
        // The root key is outside the child's reach: 404, as if absent.
        let root_path = format!("/v1/keys/{}", root.id());
        let (s, _) = send(&app, "DELETE", &root_path, Some(&team), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = send(&app, "DELETE", "/v1/keys/NOT-AN-ID", Some(root_s), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);

        // Calls: listed and hung up through the control channel.
        st.calls.insert(
            7,
            ActiveCall {
                call_id: "abc.0@tollgate".into(),
                a_call_id: "a@x".into(),
                key_id: root.id().into(),
                from: "+15550001".into(),
                to: "+15550002".into(),
                start: 1,
                answered: Some(2),
            },
        );
        let (_, b) = send(&app, "GET", "/v1/calls", Some(&team), None).await;
        assert_eq!(b["calls"], json!([]), "a child sees only its keys' calls");
        let (_, b) = send(&app, "GET", "/v1/calls", Some(root_s), None).await;
        assert_eq!(b["calls"][0]["id"], "abc.0@tollgate");
        let (s, _) = send(
            &app,
            "DELETE",
            "/v1/calls/abc.0@tollgate",
            Some(&team),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, b) = send(
            &app,
            "DELETE",
            "/v1/calls/abc.0@tollgate",
            Some(root_s),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
        assert!(matches!(
            rx.try_recv(),
            Ok(Control::Hangup(7, EndCause::Admin))
        ));
    }

    #[test]
    fn plaintext_only_on_loopback_unless_allowed() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(check_plaintext("admin.listen", a("127.0.0.1:8080"), false, false).is_ok());
        assert!(check_plaintext("admin.listen", a("[::1]:8080"), false, false).is_ok());
        let e = check_plaintext("--admin-listen", a("0.0.0.0:8080"), false, false).unwrap_err();
        assert!(
            e.0.contains("--admin-listen") && e.0.contains("tls_cert"),
            "{}",
            e.0
        );
        assert!(check_plaintext("admin.listen", a("10.1.2.3:8080"), false, false).is_err());
        assert!(check_plaintext("admin.listen", a("10.1.2.3:8080"), true, false).is_ok());
        assert!(check_plaintext("admin.listen", a("10.1.2.3:8080"), false, true).is_ok());
    }

    #[test]
    fn tls_files_errors_name_the_field() {
        let dir = TempDir::new("tls");
        std::fs::create_dir_all(&dir.0).unwrap();
        let missing = dir.0.join("nope.pem");
        let e = load_tls(&missing, &missing).unwrap_err();
        assert!(e.0.starts_with("admin.tls_cert"), "{}", e.0);
        let empty = dir.0.join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = load_tls(&empty, &empty).unwrap_err();
        assert!(e.0.starts_with("admin.tls_cert"), "{}", e.0);
    }
}
