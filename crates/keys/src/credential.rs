//! The credential check on an initial INVITE (SPEC §3, §4), as a pure function
//! of the request's relevant parts, the key store, the replay cache and `now`.
//!
//! Order: a `Bearer` credential if present, else a `Digest` credential for our
//! realm, else the trusted-source ACL (`trusted_cidrs`), else a challenge. A
//! credential that is present but bad is refused even if the source address
//! is trusted. Whatever admitted it, a key is used only from its
//! `source_cidrs` and every ancestor's ([`crate::store::source_allowed`]):
//! from elsewhere `403` (reason `source_not_allowed`).
//!
//! This check consumes single-use values (`jti`, nonce): run it once per
//! server transaction, never for a retransmitted INVITE.

use std::net::IpAddr;
use std::sync::Arc;

use crate::digest::{self, Algorithm, DigestError, NonceIssuer};
use crate::jwt::{self, Claims};
use crate::number::{Dest, NumberPlan, Prefix};
use crate::replay::{PendingUse, ReplayCache, Use};
use crate::store::{source_allowed, KeyRecord, KeyStore, Scope};
use crate::KeyKind;

/// The parts of an INVITE the credential check looks at. All untrusted.
#[derive(Debug, Clone, Copy)]
pub struct InviteView<'a> {
    /// The method, `"INVITE"`.
    pub method: &'a str,
    /// The full Request-URI text, compared with the digest `uri`.
    pub request_uri: &'a str,
    /// The Request-URI user part (may be empty): the destination.
    pub request_user: &'a str,
    /// The From user part: the caller identity (SPEC §3d).
    pub from_user: &'a str,
    /// The P-Asserted-Identity user part, if any: honoured only from a
    /// trusted source ([`Method::SourceIp`]), ignored otherwise.
    pub asserted_user: Option<&'a str>,
    /// Every `Authorization` header value, in order.
    pub authorization: &'a [&'a str],
    /// Where the request came from.
    pub source_ip: IpAddr,
}

/// Settings of the check, and the current time.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Realm shared by the Bearer and Digest challenges.
    pub realm: String,
    /// Digest algorithms offered, in order (default SHA-256 then MD5; SIPp
    /// tests put MD5 first). Responses with another algorithm are refused.
    pub digest_algorithms: Vec<Algorithm>,
    /// Lifetime of the nonces we issue, seconds.
    pub nonce_lifetime_secs: u64,
    /// Whether a fresh challenge also offers `Bearer realm="…"` (SPEC §4,
    /// `[sip] bearer_challenge`, default false): digest-only stacks such as
    /// libre/baresip reject a 401 carrying any non-Digest challenge.
    pub bearer_challenge: bool,
    /// Sources whose digest stack needs another offer (e.g. MD5 only for
    /// libre): the first entry whose CIDRs hold the source replaces
    /// `digest_algorithms` for it.
    pub digest_by_source: Vec<DigestBySource>,
    /// Current Unix time, seconds.
    pub now: i64,
    /// How numbers are canonicalized (`[numbers]`, SPEC §4a).
    pub numbers: NumberPlan,
    /// An edge-wide number policy is on (the premium deny list): every
    /// destination that is a number attempt must canonicalize, else `484`.
    pub edge_checks_numbers: bool,
}

/// `[[sip.digest_by_source]]`: the digest algorithms offered to, and
/// accepted from, the sources in `cidrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestBySource {
    /// The sources this entry is for.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Offered in this order, and the only ones accepted from them.
    pub algorithms: Vec<Algorithm>,
}

impl AuthConfig {
    /// The digest algorithms offered to and accepted from `source`, in offer
    /// order.
    pub fn digest_algorithms_for(&self, source: IpAddr) -> &[Algorithm] {
        self.digest_by_source
            .iter()
            .find(|o| o.cidrs.iter().any(|c| c.contains(&source)))
            .map_or(&self.digest_algorithms, |o| &o.algorithms)
    }
}

/// The default digest algorithms, in offer order (RFC 8760).
pub const DEFAULT_DIGEST_ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Md5];

/// How the caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `Authorization: Bearer <jwt>`.
    Bearer,
    /// `Authorization: Digest …`.
    Digest,
    /// Trusted source address, no credential.
    SourceIp,
}

impl Method {
    /// `"bearer"`, `"digest"` or `"source_ip"`, for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Bearer => "bearer",
            Method::Digest => "digest",
            Method::SourceIp => "source_ip",
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key the call is charged to; its limits apply.
    pub key: Arc<KeyRecord>,
    /// How it authenticated.
    pub method: Method,
    /// The token's claims (runtime parameters) for [`Method::Bearer`].
    pub claims: Option<Claims>,
    /// The destination (Request-URI user), canonical: what the policy checked.
    pub destination: Dest,
    /// The caller identity (SPEC §3d), canonical: what the token's `from`
    /// and the key's `caller_ids` were checked against. Leg B's From (and
    /// P-Asserted-Identity when [`Principal::asserted`]) carry exactly it.
    pub caller: Dest,
    /// The identity came from a P-Asserted-Identity of a trusted source.
    pub asserted: bool,
    /// The credential's single use, still to be recorded by the call's
    /// admission (a [`ReplayCache::deferred`] cache); `None`: recorded
    /// already, or nothing to record (a trusted source).
    pub pending_use: Option<PendingUse>,
}

/// The result of the check; the SIP layer maps it to a response.
// Made once per INVITE and matched at once: boxing the principal would
// cost an allocation per call for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Authenticated and allowed by the key's policy.
    Accepted(Principal),
    /// No credential: `401` with these `WWW-Authenticate` values (Bearer if
    /// [`AuthConfig::bearer_challenge`], then one Digest per configured
    /// algorithm).
    Challenge {
        /// `WWW-Authenticate` header values, in order.
        headers: Vec<String>,
    },
    /// Bad bearer token: `401` with this single `WWW-Authenticate` value.
    InvalidToken {
        /// `Bearer realm="…", error="invalid_token"`.
        header: String,
        /// Metrics label; never sent.
        reason: &'static str,
    },
    /// Bad digest credential: `401` with fresh challenges (`stale=true` on the
    /// Digest ones when the response was right but the nonce expired or was used).
    InvalidDigest {
        /// `WWW-Authenticate` header values, in order.
        headers: Vec<String>,
        /// Metrics label; never sent.
        reason: &'static str,
    },
    /// Authenticated but not allowed: `403`.
    Forbidden {
        /// Metrics label; never sent.
        reason: &'static str,
    },
    /// The destination is a number attempt that does not canonicalize and
    /// the policy needs a number: `484 Address Incomplete`.
    AddressIncomplete,
    /// The credential could not be checked because shared state (SPEC §8)
    /// is unreachable: `503` with `Retry-After`, never a `401`.
    Unavailable {
        /// Metrics label; never sent.
        reason: &'static str,
    },
}

impl Outcome {
    /// A short label for metrics: `"accepted"`, `"challenge"`, or the refusal reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Accepted(_) => "accepted",
            Outcome::Challenge { .. } => "challenge",
            Outcome::AddressIncomplete => "address_incomplete",
            Outcome::InvalidToken { reason, .. }
            | Outcome::InvalidDigest { reason, .. }
            | Outcome::Forbidden { reason }
            | Outcome::Unavailable { reason } => reason,
        }
    }
}

fn invalid_token_header(cfg: &AuthConfig) -> String {
    format!(
        "Bearer realm={}, error=\"invalid_token\"",
        digest::quote(&cfg.realm)
    )
}

fn unavailable() -> Outcome {
    Outcome::Unavailable {
        reason: "state_unavailable",
    }
}

/// Performs the credential check against a key store and a replay cache.
pub struct Authenticator<S: KeyStore + ?Sized, R: ReplayCache + ?Sized> {
    store: Arc<S>,
    replay: Arc<R>,
    nonces: NonceIssuer,
    /// Each key's number lists, canonicalized once per key version and plan.
    numbers: dashmap::DashMap<String, CachedNumbers>,
}

struct CachedNumbers {
    record: Arc<KeyRecord>,
    plan: NumberPlan,
    numbers: Arc<KeyNumbers>,
}

/// A key's number lists (`allow_prefixes`, `deny_prefixes`, `caller_ids`)
/// canonical under one [`NumberPlan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyNumbers {
    /// Canonical `allow_prefixes`.
    pub allow: Vec<Prefix>,
    /// Canonical `deny_prefixes`.
    pub deny: Vec<Prefix>,
    /// Canonical `caller_ids`.
    pub caller_ids: Vec<Prefix>,
}

impl KeyNumbers {
    /// Canonicalizes `limits`' lists. Keys are checked when created, so an
    /// entry that is no prefix comes only from an older key file: in a deny
    /// list it denies every number (`+`), elsewhere it is dropped (stricter).
    pub fn new(limits: &crate::store::Limits, plan: &NumberPlan) -> KeyNumbers {
        let list = |l: &[String], bad: Option<Prefix>| {
            let mut v: Vec<Prefix> = l
                .iter()
                .filter_map(|p| plan.prefix(p).or_else(|| bad.clone()))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        KeyNumbers {
            allow: list(&limits.allow_prefixes, None),
            deny: list(&limits.deny_prefixes, Some(Prefix::Number("+".into()))),
            caller_ids: list(&limits.caller_ids, None),
        }
    }

    /// True if a destination list holds a number prefix (then a destination
    /// must be a number the edge can canonicalize).
    pub fn checks_numbers(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|p| matches!(p, Prefix::Number(_)))
    }
}

impl<S: KeyStore + ?Sized, R: ReplayCache + ?Sized> std::fmt::Debug for Authenticator<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

enum Credential<'a> {
    Bearer(&'a str),
    Digest(Vec<&'a str>),
    None,
}

fn classify<'a>(values: &[&'a str]) -> Credential<'a> {
    let mut digests = Vec::new();
    for v in values {
        let v = v.trim();
        let (scheme, rest) = match v.find([' ', '\t']) {
            Some(i) => (&v[..i], v[i..].trim()),
            None => (v, ""),
        };
        if scheme.eq_ignore_ascii_case("Bearer") {
            return Credential::Bearer(rest);
        }
        if scheme.eq_ignore_ascii_case("Digest") {
            digests.push(v);
        }
    }
    if digests.is_empty() {
        Credential::None
    } else {
        Credential::Digest(digests)
    }
}

impl<S: KeyStore + ?Sized, R: ReplayCache + ?Sized> Authenticator<S, R> {
    /// An authenticator over `store` and `replay`, issuing nonces keyed with
    /// `nonce_secret` (edges that share it accept each other's nonces).
    ///
    /// Nonce lifetime comes from [`AuthConfig::nonce_lifetime_secs`] at each check.
    pub fn new(store: Arc<S>, replay: Arc<R>, nonce_secret: [u8; 32]) -> Self {
        Authenticator {
            store,
            replay,
            // Lifetime unused: expiry is computed from `AuthConfig` per check.
            nonces: NonceIssuer::new(nonce_secret, 0),
            numbers: dashmap::DashMap::new(),
        }
    }

    /// `key`'s number lists under `plan`, canonicalized on first use of each
    /// version of the key (a roll or an edit stores a new record).
    pub fn key_numbers(&self, key: &Arc<KeyRecord>, plan: &NumberPlan) -> Arc<KeyNumbers> {
        if let Some(c) = self.numbers.get(&key.id) {
            if Arc::ptr_eq(&c.record, key) && c.plan == *plan {
                return c.numbers.clone();
            }
        }
        let numbers = Arc::new(KeyNumbers::new(&key.limits, plan));
        self.numbers.insert(
            key.id.clone(),
            CachedNumbers {
                record: key.clone(),
                plan: plan.clone(),
                numbers: numbers.clone(),
            },
        );
        numbers
    }

    /// The key store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Checks the credentials of `inv`.
    pub fn check(&self, inv: &InviteView<'_>, cfg: &AuthConfig) -> Outcome {
        // Canonicalized once per INVITE; every comparison uses these.
        let destination = cfg.numbers.canonicalize(inv.request_user);
        let from = cfg.numbers.canonicalize(inv.from_user);
        let call = CallParties {
            destination: &destination,
            from: &from,
        };
        match classify(inv.authorization) {
            Credential::Bearer(token) => self.check_bearer(token, inv, &call, cfg),
            Credential::Digest(values) => self.check_digest(&values, inv, &call, cfg),
            Credential::None => self.check_source(inv, &call, cfg),
        }
    }

    /// The `WWW-Authenticate` values of a fresh challenge to `source`.
    pub fn challenge_headers(&self, cfg: &AuthConfig, stale: bool, source: IpAddr) -> Vec<String> {
        let algorithms = cfg.digest_algorithms_for(source);
        let mut h = Vec::with_capacity(1 + algorithms.len());
        if cfg.bearer_challenge {
            h.push(format!("Bearer realm={}", digest::quote(&cfg.realm)));
        }
        for alg in algorithms {
            let nonce = self.nonces.issue(cfg.now);
            h.push(digest::challenge_with(&cfg.realm, *alg, &nonce, stale));
        }
        h
    }

    fn now_u64(cfg: &AuthConfig) -> u64 {
        cfg.now.max(0) as u64
    }

    fn check_bearer(
        &self,
        token: &str,
        inv: &InviteView<'_>,
        call: &CallParties<'_>,
        cfg: &AuthConfig,
    ) -> Outcome {
        let invalid = |reason| Outcome::InvalidToken {
            header: invalid_token_header(cfg),
            reason,
        };
        let now = Self::now_u64(cfg);
        let mut record = None;
        let verified = jwt::verify(token, cfg.now, |kid| {
            let rec = self.store.get(kid)?;
            let keys = rec.live_signing_keys(now);
            record = Some(rec);
            Some(keys)
        });
        let (kid, claims) = match verified {
            Ok(v) => v,
            Err(e) => return invalid(e.reason()),
        };
        let Some(rec) = record else {
            return invalid("unknown_key");
        };
        // `from` is checked against the identity (the From user), never
        // against a P-Asserted-Identity: a bearer caller is no trusted source.
        let to_ok = cfg.numbers.canonicalize(&claims.to) == *call.destination;
        let from_ok = cfg.numbers.canonicalize(&claims.from) == *call.from;
        if !to_ok || !from_ok {
            return invalid("claim_mismatch");
        }
        let pending = match self.use_once(format!("{kid}:{}", claims.jti), claims.exp, cfg) {
            Ok(p) => p,
            Err(Use::Unavailable) => return unavailable(),
            Err(_) => return invalid("replayed"),
        };
        self.admit(rec, Method::Bearer, Some(claims), pending, inv, call, cfg)
    }

    fn check_digest(
        &self,
        values: &[&str],
        inv: &InviteView<'_>,
        call: &CallParties<'_>,
        cfg: &AuthConfig,
    ) -> Outcome {
        let invalid = |reason, stale| Outcome::InvalidDigest {
            headers: self.challenge_headers(cfg, stale, inv.source_ip),
            reason,
        };
        // Several Digest credentials may be present (one per realm); use ours.
        let mut parsed = None;
        let mut first_err = DigestError::Malformed;
        for v in values {
            match digest::parse_authorization(v) {
                Ok(r) if r.realm == cfg.realm => {
                    parsed = Some(r);
                    break;
                }
                Ok(_) => first_err = DigestError::Malformed,
                Err(e) => first_err = e,
            }
        }
        let Some(resp) = parsed else {
            return invalid(
                if first_err == DigestError::Malformed {
                    "malformed"
                } else {
                    first_err.reason()
                },
                false,
            );
        };
        if !cfg
            .digest_algorithms_for(inv.source_ip)
            .contains(&resp.algorithm)
        {
            return invalid("bad_alg", false);
        }
        let expiry = match self.nonces.issued_at(&resp.nonce) {
            Ok(issued) => issued.saturating_add(cfg.nonce_lifetime_secs),
            Err(e) => return invalid(e.reason(), false),
        };
        if !digest_uri_matches(&resp.uri, inv.request_uri) {
            return invalid("uri_mismatch", false);
        }
        let now = Self::now_u64(cfg);
        let Some(rec) = self.store.get(&resp.username) else {
            return invalid("unknown_key", false);
        };
        if !rec.is_usable(now) {
            return invalid("unknown_key", false);
        }
        let ok = rec.live_secrets(now).fold(false, |ok, s| {
            ok | digest::verify(&resp, inv.method, &s.digest_password)
        });
        if !ok {
            return invalid("bad_response", false);
        }
        // The response is right; only now can a nonce problem be called stale.
        if now >= expiry {
            return invalid("stale_nonce", true);
        }
        let expires_at = i64::try_from(expiry).unwrap_or(i64::MAX);
        let pending = match self.use_once(format!("nonce:{}", resp.nonce), expires_at, cfg) {
            Ok(p) => p,
            Err(Use::Unavailable) => return unavailable(),
            Err(_) => return invalid("nonce_reused", true),
        };
        self.admit(rec, Method::Digest, None, pending, inv, call, cfg)
    }

    /// Credential-less INVITE: admitted if a usable key lists a trusted CIDR
    /// containing the source address (the most specific CIDR wins, then the
    /// lowest id), looked up in the store's index ([`KeyStore::trusted_for`]).
    fn check_source(
        &self,
        inv: &InviteView<'_>,
        call: &CallParties<'_>,
        cfg: &AuthConfig,
    ) -> Outcome {
        match self.store.trusted_for(inv.source_ip, Self::now_u64(cfg)) {
            Some(rec) => self.admit(rec, Method::SourceIp, None, None, inv, call, cfg),
            None => Outcome::Challenge {
                headers: self.challenge_headers(cfg, false, inv.source_ip),
            },
        }
    }

    /// Applies the key's policy. The caller identity is the From user; a
    /// P-Asserted-Identity replaces it only from a trusted source
    /// ([`Method::SourceIp`], RFC 3325 trust domain); anywhere else it is
    /// ignored here and removed by the B2BUA (leg B gets only `caller`).
    /// Records the single use of `id` now, or (a deferred cache) hands it on
    /// to the call's admission; `Err`: replayed or unavailable.
    fn use_once(
        &self,
        id: String,
        expires_at: i64,
        cfg: &AuthConfig,
    ) -> Result<Option<PendingUse>, Use> {
        if self.replay.deferred() {
            return Ok(Some(PendingUse { id, expires_at }));
        }
        match self.replay.record_use(&id, expires_at, cfg.now) {
            Use::First => Ok(None),
            refused => Err(refused),
        }
    }

    /// The answer to a credential whose [`PendingUse`] the admission found
    /// used before: what [`Authenticator::check`] answers to a replay when
    /// it records the use itself (`401`, a fresh `stale=true` challenge for
    /// a digest nonce).
    pub fn replayed(&self, pending: &PendingUse, source: IpAddr, cfg: &AuthConfig) -> Outcome {
        if pending.is_nonce() {
            Outcome::InvalidDigest {
                headers: self.challenge_headers(cfg, true, source),
                reason: "nonce_reused",
            }
        } else {
            Outcome::InvalidToken {
                header: invalid_token_header(cfg),
                reason: "replayed",
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        key: Arc<KeyRecord>,
        method: Method,
        claims: Option<Claims>,
        pending_use: Option<PendingUse>,
        inv: &InviteView<'_>,
        call: &CallParties<'_>,
        cfg: &AuthConfig,
    ) -> Outcome {
        // The key's and every ancestor's source_cidrs, whatever the method.
        if !source_allowed(&*self.store, &key, inv.source_ip) {
            return Outcome::Forbidden {
                reason: "source_not_allowed",
            };
        }
        let (caller, asserted) = match (method, inv.asserted_user) {
            (Method::SourceIp, Some(pai)) => (cfg.numbers.canonicalize(pai), true),
            _ => (call.from.clone(), false),
        };
        let numbers = self.key_numbers(&key, &cfg.numbers);
        match policy(
            &key,
            &numbers,
            call.destination,
            &caller,
            cfg.edge_checks_numbers,
        ) {
            Ok(()) => Outcome::Accepted(Principal {
                key,
                method,
                claims,
                destination: call.destination.clone(),
                caller,
                asserted,
                pending_use,
            }),
            Err(PolicyRefusal::AddressIncomplete) => Outcome::AddressIncomplete,
            Err(PolicyRefusal::Forbidden(reason)) => Outcome::Forbidden { reason },
        }
    }
}

/// The canonical destination and From identity of the INVITE being checked.
struct CallParties<'a> {
    destination: &'a Dest,
    from: &'a Dest,
}

/// Why [`policy`] refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyRefusal {
    /// `403` with this metrics label.
    Forbidden(&'static str),
    /// `484`: the destination is no number, and the policy needs one.
    AddressIncomplete,
}

/// Whether the digest `uri` names the Request-URI (RFC 2617 §3.2.2.5). Exact
/// text, or the same host and port with the user part left out: SIPp 3.6 and
/// several PBXs send `sip:host:port` for `sip:user@host:port`. The response
/// hash covers the `uri` and the nonce is single use, so the looser form
/// does not open a replay.
pub fn digest_uri_matches(digest_uri: &str, request_uri: &str) -> bool {
    if digest_uri == request_uri {
        return true;
    }
    fn host_port(u: &str) -> Option<(String, String)> {
        let (scheme, rest) = u.split_once(':')?;
        let rest = rest.split([';', '?']).next()?;
        let hp = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        Some((scheme.to_ascii_lowercase(), hp.to_ascii_lowercase()))
    }
    let (Some(d), Some(r)) = (host_port(digest_uri), host_port(request_uri)) else {
        return false;
    };
    !digest_uri.contains('@') && d == r
}

/// The key's call policy for a canonical destination and caller identity.
///
/// The key needs the `calls` scope. A destination that is a number attempt
/// but no number ([`Dest::Invalid`]) is refused `484` when a number policy
/// applies (`edge_checks_numbers`, or a number prefix in the key's lists).
/// A deny prefix beats the allow-list; a non-empty allow-list must contain
/// the destination; a public key with an empty allow-list may call nothing.
/// A non-empty `caller_ids` must contain the caller identity. Numbers match
/// number prefixes, names match names exactly ([`Dest::matches`]). Source
/// CIDRs are checked before, by [`crate::store::source_allowed`].
pub fn policy(
    key: &KeyRecord,
    numbers: &KeyNumbers,
    destination: &Dest,
    caller: &Dest,
    edge_checks_numbers: bool,
) -> Result<(), PolicyRefusal> {
    use PolicyRefusal::Forbidden;
    if !key.has_scope(Scope::Calls) {
        return Err(Forbidden("scope"));
    }
    if matches!(destination, Dest::Invalid(_)) && (edge_checks_numbers || numbers.checks_numbers())
    {
        return Err(PolicyRefusal::AddressIncomplete);
    }
    if destination.matches_any(&numbers.deny) {
        return Err(Forbidden("destination_denied"));
    }
    if numbers.allow.is_empty() {
        if key.kind == KeyKind::Public {
            return Err(Forbidden("destination_not_allowed"));
        }
    } else if !destination.matches_any(&numbers.allow) {
        return Err(Forbidden("destination_not_allowed"));
    }
    if !numbers.caller_ids.is_empty() && !caller.matches_any(&numbers.caller_ids) {
        return Err(Forbidden("caller_id_not_allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestResponse;
    use crate::replay::MemoryReplayCache;
    use crate::store::{Limits, MemoryKeyStore};
    use crate::ApiKey;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    const NOW: i64 = 1_700_000_000;
    const RURI: &str = "sip:+14155550100@edge.example.com";
    const TO: &str = "+14155550100";
    const FROM: &str = "+14155550199";

    struct Fixture {
        store: Arc<MemoryKeyStore>,
        auth: Authenticator<MemoryKeyStore, dyn ReplayCache>,
    }

    impl Fixture {
        fn new() -> Self {
            let store = Arc::new(MemoryKeyStore::new());
            let replay: Arc<dyn ReplayCache> = Arc::new(MemoryReplayCache::new());
            let auth = Authenticator::new(store.clone(), replay, [42; 32]);
            Fixture { store, auth }
        }

        fn key(&self, kind: KeyKind, limits: Limits) -> ApiKey {
            self.store
                .create("k", kind, None, limits, None, NOW as u64 - 100)
                .unwrap()
                .1
        }

        fn check(&self, authz: &[&str]) -> Outcome {
            self.check_at(authz, NOW, "192.0.2.1")
        }

        fn check_at(&self, authz: &[&str], now: i64, ip: &str) -> Outcome {
            let inv = InviteView {
                method: "INVITE",
                request_uri: RURI,
                request_user: "+1 (415) 555-0100",
                from_user: "sip:1-415-555-0199@pbx",
                asserted_user: Some("sip:+19998887777@carrier"),
                authorization: authz,
                source_ip: ip.parse().unwrap(),
            };
            self.auth.check(&inv, &cfg(now))
        }
    }

    fn cfg(now: i64) -> AuthConfig {
        AuthConfig {
            realm: "tollgate".into(),
            digest_algorithms: vec![Algorithm::Md5, Algorithm::Sha256],
            nonce_lifetime_secs: 300,
            bearer_challenge: false,
            digest_by_source: Vec::new(),
            now,
            numbers: NumberPlan::default(),
            edge_checks_numbers: true,
        }
    }

    fn claims(jti: &str) -> Claims {
        Claims {
            iat: NOW,
            exp: NOW + 60,
            jti: jti.into(),
            to: TO.into(),
            from: FROM.into(),
            model: None,
            webhook: None,
            record: None,
            max_duration: None,
        }
    }

    fn bearer(key: &ApiKey, c: &Claims) -> String {
        format!("Bearer {}", jwt::mint(key, c))
    }

    /// A shared cache that cannot be reached (SPEC §8, `refuse`).
    struct DownCache;
    impl ReplayCache for DownCache {
        fn first_use(&self, _: &str, _: i64, _: i64) -> bool {
            false
        }
        fn record_use(&self, _: &str, _: i64, _: i64) -> Use {
            Use::Unavailable
        }
    }

    #[test]
    fn unreachable_replay_cache_is_unavailable_not_a_401() {
        let store = Arc::new(MemoryKeyStore::new());
        let f = Fixture {
            auth: Authenticator::new(store.clone(), Arc::new(DownCache), [42; 32]),
            store,
        };
        let key = f.key(KeyKind::Secret, Limits::default());
        let o = f.check(&[&bearer(&key, &claims("j1"))]);
        assert!(
            matches!(
                o,
                Outcome::Unavailable {
                    reason: "state_unavailable"
                }
            ),
            "{o:?}"
        );
        assert_eq!(o.reason(), "state_unavailable");
        // Only a credential that checks out reaches the cache: an unknown
        // key is still a 401.
        let stranger = ApiKey::try_generate(KeyKind::Secret).unwrap();
        assert_invalid_token(f.check(&[&bearer(&stranger, &claims("j2"))]), "unknown_key");
        // Digest: the right answer to a fresh nonce is unavailable too.
        let n = nonce(&f, NOW);
        let pw = key.digest_password();
        let authz = digest_authz(key.id(), &pw, Algorithm::Md5, &n, RURI, true);
        let o = f.check(&[&authz]);
        assert!(matches!(o, Outcome::Unavailable { .. }), "{o:?}");
    }

    /// A shared cache that records uses with the admission (SPEC §8).
    struct DeferredCache;
    impl ReplayCache for DeferredCache {
        fn first_use(&self, _: &str, _: i64, _: i64) -> bool {
            panic!("a deferred cache is never asked by the credential check")
        }
        fn deferred(&self) -> bool {
            true
        }
    }

    #[test]
    fn deferred_cache_hands_the_use_to_the_admission_and_a_replay_answers_as_before() {
        let store = Arc::new(MemoryKeyStore::new());
        let f = Fixture {
            auth: Authenticator::new(store.clone(), Arc::new(DeferredCache), [42; 32]),
            store,
        };
        let key = f.key(KeyKind::Secret, Limits::default());
        let p = assert_accepted(f.check(&[&bearer(&key, &claims("j1"))]), Method::Bearer);
        let pending = p.pending_use.expect("the jti is left to the admission");
        assert_eq!(pending.id, format!("{}:j1", key.id()));
        assert!(!pending.is_nonce());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_invalid_token(f.auth.replayed(&pending, ip, &cfg(NOW)), "replayed");
        let n = nonce(&f, NOW);
        let authz = digest_authz(
            key.id(),
            &key.digest_password(),
            Algorithm::Md5,
            &n,
            RURI,
            true,
        );
        let p = assert_accepted(f.check(&[&authz]), Method::Digest);
        let pending = p.pending_use.expect("the nonce is left to the admission");
        assert_eq!(pending.id, format!("nonce:{n}"));
        match f.auth.replayed(&pending, ip, &cfg(NOW)) {
            Outcome::InvalidDigest { headers, reason } => {
                assert_eq!(reason, "nonce_reused");
                assert!(
                    headers.iter().all(|h| h.contains("stale=true")),
                    "{headers:?}"
                );
            }
            o => panic!("expected InvalidDigest, got {o:?}"),
        }
        // The embedded cache records at once: nothing pending.
        let embedded = Fixture::new();
        let key = embedded.key(KeyKind::Secret, Limits::default());
        let p = assert_accepted(
            embedded.check(&[&bearer(&key, &claims("j2"))]),
            Method::Bearer,
        );
        assert_eq!(p.pending_use, None);
    }

    fn assert_invalid_token(o: Outcome, want: &str) {
        match o {
            Outcome::InvalidToken { header, reason } => {
                assert_eq!(header, "Bearer realm=\"tollgate\", error=\"invalid_token\"");
                assert_eq!(reason, want);
            }
            o => panic!("expected InvalidToken({want}), got {o:?}"),
        }
    }

    fn assert_accepted(o: Outcome, method: Method) -> Principal {
        match o {
            Outcome::Accepted(p) => {
                assert_eq!(p.method, method);
                p
            }
            o => panic!("expected Accepted, got {o:?}"),
        }
    }

    fn assert_invalid_digest(o: Outcome, want: &str, stale: bool) {
        match o {
            Outcome::InvalidDigest { headers, reason } => {
                assert_eq!(reason, want);
                assert_eq!(headers.len(), 2);
                assert!(headers.iter().all(|h| h.ends_with(", stale=true") == stale));
            }
            o => panic!("expected InvalidDigest({want}), got {o:?}"),
        }
    }

    /// Nonce from the first Digest challenge of a fresh 401.
    fn nonce(f: &Fixture, now: i64) -> String {
        let Outcome::Challenge { headers } = f.check_at(&[], now, "192.0.2.1") else {
            panic!()
        };
        nonce_in(&headers[0])
    }

    /// The nonce of one Digest challenge.
    fn nonce_in(h: &str) -> String {
        let start = h.find("nonce=\"").unwrap() + 7;
        h[start..start + h[start..].find('"').unwrap()].to_owned()
    }

    /// An INVITE to [`TO`] from [`FROM`] with `authorization`, from `ip`.
    fn invite_from<'a>(authorization: &'a [&'a str], ip: IpAddr) -> InviteView<'a> {
        InviteView {
            method: "INVITE",
            request_uri: RURI,
            request_user: TO,
            from_user: FROM,
            asserted_user: None,
            authorization,
            source_ip: ip,
        }
    }

    fn digest_authz(
        user: &str,
        password: &str,
        alg: Algorithm,
        nonce: &str,
        uri: &str,
        qop: bool,
    ) -> String {
        let mut r = DigestResponse {
            username: user.into(),
            realm: "tollgate".into(),
            nonce: nonce.into(),
            uri: uri.into(),
            response: String::new(),
            algorithm: alg,
            cnonce: qop.then(|| "0a4f113b".into()),
            nc: qop.then(|| "00000001".into()),
            qop: qop.then(|| "auth".into()),
            opaque: None,
        };
        r.response = digest::expected_response(&r, "INVITE", password).unwrap();
        let mut s = format!(
            "Digest username=\"{user}\", realm=\"tollgate\", nonce=\"{nonce}\", uri=\"{uri}\", \
             response=\"{}\", algorithm={}",
            r.response,
            alg.name()
        );
        if qop {
            s.push_str(", qop=auth, nc=00000001, cnonce=\"0a4f113b\"");
        }
        s
    }

    #[test]
    fn no_credential_gives_challenge() {
        let f = Fixture::new();
        let o = f.check(&[]);
        let Outcome::Challenge { headers } = o else {
            panic!("{o:?}")
        };
        // Digest only by default (SPEC §4): libre rejects a 401 carrying
        // any non-Digest challenge.
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert!(headers[0].starts_with("Digest realm=\"tollgate\", nonce=\""));
        assert!(headers[0].ends_with("algorithm=MD5, qop=\"auth\""));
        assert!(headers[1].ends_with("algorithm=SHA-256, qop=\"auth\""));
        // Unknown schemes count as no credential.
        assert!(matches!(
            f.check(&["Basic YWxhZGRpbjpvcGVuc2VzYW1l"]),
            Outcome::Challenge { .. }
        ));
    }

    #[test]
    fn bearer_challenge_offered_only_when_configured() {
        let f = Fixture::new();
        let inv = invite_from(&[], "192.0.2.1".parse().unwrap());
        let on = AuthConfig {
            bearer_challenge: true,
            ..cfg(NOW)
        };
        let Outcome::Challenge { headers } = f.auth.check(&inv, &on) else {
            panic!()
        };
        assert_eq!(headers.len(), 3, "{headers:?}");
        assert_eq!(headers[0], "Bearer realm=\"tollgate\"");
        assert!(headers[1..].iter().all(|h| h.starts_with("Digest ")));
        // A wrong digest answer is re-challenged the same way.
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(f.auth.challenge_headers(&on, true, ip).len(), 3);
        assert_eq!(f.auth.challenge_headers(&cfg(NOW), true, ip).len(), 2);
    }

    #[test]
    fn digest_by_source_replaces_the_offer_and_the_accepted_algorithms() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        let pw = k.digest_password();
        let mut c = cfg(NOW);
        c.digest_algorithms = vec![Algorithm::Sha256, Algorithm::Md5];
        c.digest_by_source = vec![DigestBySource {
            cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            algorithms: vec![Algorithm::Md5],
        }];
        let libre: IpAddr = "198.51.100.7".parse().unwrap();
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let h = f.auth.challenge_headers(&c, false, libre);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h[0].ends_with("algorithm=MD5, qop=\"auth\""));
        let h = f.auth.challenge_headers(&c, false, other);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h[0].contains("algorithm=SHA-256"));
        // What a source is offered is what it may answer with.
        let check = |ip: IpAddr, alg: Algorithm| {
            let n = nonce_in(&f.auth.challenge_headers(&c, false, ip)[0]);
            let authz = digest_authz(k.id(), &pw, alg, &n, RURI, true);
            f.auth.check(&invite_from(&[&authz], ip), &c)
        };
        assert_accepted(check(libre, Algorithm::Md5), Method::Digest);
        assert!(matches!(
            check(libre, Algorithm::Sha256),
            Outcome::InvalidDigest {
                reason: "bad_alg",
                ..
            }
        ));
        assert_accepted(check(other, Algorithm::Sha256), Method::Digest);
    }

    #[test]
    fn bearer_accepted_with_claims() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        let mut c = claims("j1");
        c.model = Some("support-agent".into());
        let p = assert_accepted(f.check(&[&bearer(&k, &c)]), Method::Bearer);
        assert_eq!(p.key.id, k.id());
        assert_eq!(p.claims.unwrap().model.as_deref(), Some("support-agent"));
        // Scheme is case-insensitive; extra whitespace tolerated.
        let t = format!("bEaReR   {}", jwt::mint(&k, &claims("j2")));
        assert_accepted(f.check(&[&t]), Method::Bearer);
    }

    #[test]
    fn bearer_bad_credentials() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        let other = ApiKey::generate(KeyKind::Secret);
        // Wrong signature (right kid, other key's signing key).
        let t = format!(
            "Bearer {}",
            jwt::mint_with(k.id(), &other.signing_key(), &claims("a"))
        );
        assert_invalid_token(f.check(&[&t]), "bad_signature");
        // Unknown kid.
        assert_invalid_token(f.check(&[&bearer(&other, &claims("b"))]), "unknown_key");
        // Expired.
        let mut c = claims("c");
        c.iat = NOW - 120;
        c.exp = NOW;
        assert_invalid_token(f.check(&[&bearer(&k, &c)]), "expired");
        // Future iat.
        let mut c = claims("d");
        c.iat = NOW + 31;
        c.exp = NOW + 100;
        assert_invalid_token(f.check(&[&bearer(&k, &c)]), "not_yet_valid");
        // Lifetime.
        let mut c = claims("e");
        c.exp = NOW + 3601;
        assert_invalid_token(f.check(&[&bearer(&k, &c)]), "lifetime");
        // alg=none.
        let none = format!(
            "Bearer {}.{}.",
            URL_SAFE_NO_PAD.encode(format!(
                "{{\"alg\":\"none\",\"typ\":\"JWT\",\"kid\":\"{}\"}}",
                k.id()
            )),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("f")).unwrap())
        );
        assert_invalid_token(f.check(&[&none]), "bad_alg");
        // Garbage and empty tokens.
        assert_invalid_token(f.check(&["Bearer"]), "malformed");
        assert_invalid_token(f.check(&["Bearer x.y.z"]), "malformed");
        // Claim mismatches.
        let mut c = claims("g");
        c.to = "+19005551234".into();
        assert_invalid_token(f.check(&[&bearer(&k, &c)]), "claim_mismatch");
        let mut c = claims("h");
        c.from = "+15550000000".into();
        assert_invalid_token(f.check(&[&bearer(&k, &c)]), "claim_mismatch");
        // `from` matches the From identity in any form, never the
        // P-Asserted-Identity of an untrusted source.
        let mut c = claims("i");
        c.from = "tel:+1 (415) 555-0199".into();
        let p = assert_accepted(f.check(&[&bearer(&k, &c)]), Method::Bearer);
        assert_eq!(p.caller.as_str(), "+14155550199");
        assert!(!p.asserted);
        assert_eq!(p.destination.as_str(), "+14155550100");
        let mut c = claims("j");
        c.from = "+19998887777".into();
        assert_invalid_token(f.check(&[&bearer(&k, &c)]), "claim_mismatch");
        // `to` in another form of the same number.
        let mut c = claims("k");
        c.to = "sip:0014155550100@edge".into();
        assert_accepted(f.check(&[&bearer(&k, &c)]), Method::Bearer);
    }

    #[test]
    fn bearer_replayed_jti() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        let t = bearer(&k, &claims("once"));
        assert_accepted(f.check(&[&t]), Method::Bearer);
        assert_invalid_token(f.check(&[&t]), "replayed");
        assert_invalid_token(f.check_at(&[&t], NOW + 59, "192.0.2.1"), "replayed");
        // Same jti under another key is a different id.
        let k2 = f.key(KeyKind::Secret, Limits::default());
        assert_accepted(f.check(&[&bearer(&k2, &claims("once"))]), Method::Bearer);
    }

    #[test]
    fn bearer_revoked_and_rolled_keys() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        f.store.revoke(k.id(), NOW as u64 - 1).unwrap();
        assert_invalid_token(f.check(&[&bearer(&k, &claims("a"))]), "unknown_key");

        // Roll without grace: old secret refused at once, new one works.
        let k = f.key(KeyKind::Secret, Limits::default());
        let new = f.store.roll(k.id(), None, NOW as u64).unwrap();
        assert_invalid_token(f.check(&[&bearer(&k, &claims("b"))]), "bad_signature");
        assert_accepted(f.check(&[&bearer(&new, &claims("c"))]), Method::Bearer);

        // Roll with grace: old secret works until the grace ends.
        let k = f.key(KeyKind::Secret, Limits::default());
        let new = f.store.roll(k.id(), Some(30), NOW as u64).unwrap();
        assert_accepted(f.check(&[&bearer(&k, &claims("d"))]), Method::Bearer);
        assert_accepted(f.check(&[&bearer(&new, &claims("e"))]), Method::Bearer);
        let late = |jti: &str| {
            let mut c = claims(jti);
            c.iat = NOW + 30;
            c.exp = NOW + 90;
            c
        };
        assert_invalid_token(
            f.check_at(&[&bearer(&k, &late("f"))], NOW + 30, "192.0.2.1"),
            "bad_signature",
        );
        assert_accepted(
            f.check_at(&[&bearer(&new, &late("g"))], NOW + 30, "192.0.2.1"),
            Method::Bearer,
        );

        // Expired key.
        let k = f.key(
            KeyKind::Secret,
            Limits {
                expires_at: Some(NOW as u64),
                ..Limits::default()
            },
        );
        assert_invalid_token(f.check(&[&bearer(&k, &claims("h"))]), "unknown_key");
    }

    #[test]
    fn policy_after_bearer() {
        let f = Fixture::new();
        // Public key without allow-list calls nothing.
        let pk = f.key(KeyKind::Public, Limits::default());
        let o = f.check(&[&bearer(&pk, &claims("a"))]);
        assert!(
            matches!(
                o,
                Outcome::Forbidden {
                    reason: "destination_not_allowed"
                }
            ),
            "{o:?}"
        );
        // Public key off its allow-list.
        let pk = f.key(
            KeyKind::Public,
            Limits {
                allow_prefixes: vec!["+44".into()],
                ..Limits::default()
            },
        );
        let o = f.check(&[&bearer(&pk, &claims("b"))]);
        assert!(
            matches!(
                o,
                Outcome::Forbidden {
                    reason: "destination_not_allowed"
                }
            ),
            "{o:?}"
        );
        // On its allow-list.
        let pk = f.key(
            KeyKind::Public,
            Limits {
                allow_prefixes: vec!["+1415".into()],
                ..Limits::default()
            },
        );
        assert_accepted(f.check(&[&bearer(&pk, &claims("c"))]), Method::Bearer);
        // Deny beats allow.
        let k = f.key(
            KeyKind::Secret,
            Limits {
                allow_prefixes: vec!["+1".into()],
                deny_prefixes: vec!["+1 415".into()],
                ..Limits::default()
            },
        );
        let o = f.check(&[&bearer(&k, &claims("d"))]);
        assert!(
            matches!(
                o,
                Outcome::Forbidden {
                    reason: "destination_denied"
                }
            ),
            "{o:?}"
        );
        // Missing calls scope.
        let (_, k) = f
            .store
            .create(
                "u",
                KeyKind::Secret,
                Some(vec![Scope::Usage]),
                Limits::default(),
                None,
                0,
            )
            .unwrap();
        let o = f.check(&[&bearer(&k, &claims("e"))]);
        assert!(matches!(o, Outcome::Forbidden { reason: "scope" }), "{o:?}");
    }

    /// SPEC §2: source_cidrs restrict every credential kind, and every
    /// ancestor's apply to a child.
    #[test]
    fn source_cidrs_restrict_bearer_digest_and_trusted_incl_ancestors() {
        let f = Fixture::new();
        let limits = |src: &str, trusted: &[&str]| Limits {
            source_cidrs: vec![src.parse().unwrap()],
            trusted_cidrs: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            ..Limits::default()
        };
        let k = f.key(KeyKind::Secret, limits("10.0.0.0/8", &[]));
        let forbidden = |o: Outcome| {
            assert!(
                matches!(
                    o,
                    Outcome::Forbidden {
                        reason: "source_not_allowed"
                    }
                ),
                "{o:?}"
            )
        };
        // Bearer: outside 403, inside accepted.
        forbidden(f.check_at(&[&bearer(&k, &claims("s1"))], NOW, "192.0.2.1"));
        assert_accepted(
            f.check_at(&[&bearer(&k, &claims("s2"))], NOW, "10.9.9.9"),
            Method::Bearer,
        );
        // Digest likewise.
        let pw = k.digest_password();
        let a = |n: &str| digest_authz(k.id(), &pw, Algorithm::Md5, n, RURI, true);
        forbidden(f.check_at(&[&a(&nonce(&f, NOW))], NOW, "192.0.2.1"));
        assert_accepted(
            f.check_at(&[&a(&nonce(&f, NOW))], NOW, "10.1.1.1"),
            Method::Digest,
        );
        // A child without its own restriction is held to its parent's; one
        // with its own to both (ancestors' lists are checked at use, too).
        let (parent, pk) = f
            .store
            .create(
                "p",
                KeyKind::Secret,
                None,
                limits("10.0.0.0/8", &["10.5.0.0/16"]),
                None,
                NOW as u64 - 100,
            )
            .unwrap();
        let (child, ck) = f
            .store
            .create(
                "c",
                KeyKind::Secret,
                None,
                limits("10.5.0.0/16", &["10.5.5.0/24"]),
                Some(&parent.id),
                NOW as u64 - 100,
            )
            .unwrap();
        assert_accepted(
            f.check_at(&[&bearer(&ck, &claims("c1"))], NOW, "10.5.1.1"),
            Method::Bearer,
        );
        forbidden(f.check_at(&[&bearer(&ck, &claims("c2"))], NOW, "10.6.1.1"));
        assert_accepted(
            f.check_at(&[&bearer(&pk, &claims("p1"))], NOW, "10.6.1.1"),
            Method::Bearer,
        );
        // Narrow the parent's record behind the store's back: the child is
        // held to it at once.
        let mut p2 = (*parent).clone();
        p2.limits.source_cidrs = vec!["10.5.5.0/24".parse().unwrap()];
        f.store.insert(p2);
        forbidden(f.check_at(&[&bearer(&ck, &claims("c3"))], NOW, "10.5.1.1"));
        // Trusted source: the child's /24 is the most specific; admitted.
        let p = assert_accepted(f.check_at(&[], NOW, "10.5.5.5"), Method::SourceIp);
        assert_eq!(p.key.id, child.id);
        // A cycle in the parent links (a corrupt store) is refused, not looped.
        let mut c2 = (*child).clone();
        c2.parent = Some(child.id.clone());
        f.store.insert(c2);
        forbidden(f.check_at(&[&bearer(&ck, &claims("c4"))], NOW, "10.5.5.1"));
    }

    #[test]
    fn digest_roundtrips_md5_and_sha256() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            for qop in [true, false] {
                let n = nonce(&f, NOW);
                let a = digest_authz(k.id(), &k.digest_password(), alg, &n, RURI, qop);
                let p = assert_accepted(f.check(&[&a]), Method::Digest);
                assert_eq!(p.key.id, k.id());
                assert!(p.claims.is_none());
                // Single use.
                assert_invalid_digest(f.check(&[&a]), "nonce_reused", true);
            }
        }
    }

    /// SPEC §3: a `jti` and a digest nonce stay used across a restart (the
    /// cache reopened from its file, same keys and nonce secret, as a fleet
    /// sharing the secret would have).
    #[test]
    fn single_use_survives_a_reopened_file_cache() {
        let dir = std::env::temp_dir().join(format!("tollgate-cred-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(MemoryKeyStore::new());
        let k = store
            .create(
                "k",
                KeyKind::Secret,
                None,
                Limits::default(),
                None,
                NOW as u64 - 100,
            )
            .unwrap()
            .1;
        let open = || {
            let (c, _) = crate::FileReplayCache::open(&dir, NOW).unwrap();
            Fixture {
                store: store.clone(),
                auth: Authenticator::new(
                    store.clone(),
                    Arc::new(c) as Arc<dyn ReplayCache>,
                    [42; 32],
                ),
            }
        };
        let f = open();
        let t = bearer(&k, &claims("once"));
        let n = nonce(&f, NOW);
        let d = digest_authz(k.id(), &k.digest_password(), Algorithm::Md5, &n, RURI, true);
        assert_accepted(f.check(&[&t]), Method::Bearer);
        assert_accepted(f.check(&[&d]), Method::Digest);
        drop(f);
        let f = open();
        assert_invalid_token(f.check(&[&t]), "replayed");
        assert_invalid_digest(f.check(&[&d]), "nonce_reused", true);
        // A fresh token and a fresh nonce still work.
        assert_accepted(f.check(&[&bearer(&k, &claims("twice"))]), Method::Bearer);
        let n2 = nonce(&f, NOW);
        let d2 = digest_authz(
            k.id(),
            &k.digest_password(),
            Algorithm::Md5,
            &n2,
            RURI,
            true,
        );
        assert_accepted(f.check(&[&d2]), Method::Digest);
        drop(f);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn digest_bad_credentials() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        let pw = k.digest_password();
        let n = nonce(&f, NOW);
        let a = |user: &str, pw: &str, n: &str, uri: &str| {
            digest_authz(user, pw, Algorithm::Md5, n, uri, true)
        };
        assert_invalid_digest(
            f.check(&[&a(k.id(), "wrong", &n, RURI)]),
            "bad_response",
            false,
        );
        assert_invalid_digest(
            f.check(&[&a("zzzzzzzzzzzz", &pw, &n, RURI)]),
            "unknown_key",
            false,
        );
        assert_invalid_digest(
            f.check(&[&a(k.id(), &pw, &n, "sip:+19005551234@edge.example.com")]),
            "uri_mismatch",
            false,
        );
        assert!(digest_uri_matches(
            "sip:127.0.0.1:5060",
            "sip:service@127.0.0.1:5060"
        ));
        assert!(!digest_uri_matches(
            "sip:127.0.0.1:5061",
            "sip:service@127.0.0.1:5060"
        ));
        assert!(!digest_uri_matches(
            "sip:other@127.0.0.1:5060",
            "sip:service@127.0.0.1:5060"
        ));
        // Nonce not ours / tampered.
        let foreign = NonceIssuer::new([1; 32], 300).issue(NOW);
        assert_invalid_digest(
            f.check(&[&a(k.id(), &pw, &foreign, RURI)]),
            "bad_nonce",
            false,
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&n).unwrap();
        raw[7] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(raw);
        assert_invalid_digest(
            f.check(&[&a(k.id(), &pw, &tampered, RURI)]),
            "bad_nonce",
            false,
        );
        // Expired nonce with a correct response: stale.
        let old = nonce(&f, NOW - 300);
        assert_invalid_digest(f.check(&[&a(k.id(), &pw, &old, RURI)]), "stale_nonce", true);
        // Expired nonce with a wrong response: not stale.
        assert_invalid_digest(
            f.check(&[&a(k.id(), "x", &old, RURI)]),
            "bad_response",
            false,
        );
        // Other realm only.
        let other = a(k.id(), &pw, &n, RURI).replace("realm=\"tollgate\"", "realm=\"other\"");
        assert_invalid_digest(f.check(&[&other]), "malformed", false);
        // Our realm among several.
        assert_accepted(
            f.check(&[&other, &a(k.id(), &pw, &n, RURI)]),
            Method::Digest,
        );
        // Algorithm not offered.
        let mut c = cfg(NOW);
        c.digest_algorithms = vec![Algorithm::Sha256];
        let n2 = nonce(&f, NOW);
        let authz = a(k.id(), &pw, &n2, RURI);
        let o = f
            .auth
            .check(&invite_from(&[&authz], "192.0.2.1".parse().unwrap()), &c);
        assert!(
            matches!(o, Outcome::InvalidDigest { reason: "bad_alg", ref headers } if headers.len() == 1),
            "{o:?}"
        );
        // Garbage.
        assert_invalid_digest(f.check(&["Digest garbage"]), "malformed", false);
        // Revoked key and rolled-away secret.
        let n3 = nonce(&f, NOW);
        let k2 = f.key(KeyKind::Secret, Limits::default());
        let new = f.store.roll(k2.id(), None, NOW as u64).unwrap();
        assert_invalid_digest(
            f.check(&[&a(k2.id(), &k2.digest_password(), &n3, RURI)]),
            "bad_response",
            false,
        );
        assert_accepted(
            f.check(&[&a(k2.id(), &new.digest_password(), &n3, RURI)]),
            Method::Digest,
        );
        f.store.revoke(k.id(), 0).unwrap();
        let n4 = nonce(&f, NOW);
        assert_invalid_digest(f.check(&[&a(k.id(), &pw, &n4, RURI)]), "unknown_key", false);
    }

    #[test]
    fn digest_policy_applies() {
        let f = Fixture::new();
        let pk = f.key(KeyKind::Public, Limits::default());
        let n = nonce(&f, NOW);
        let a = digest_authz(
            pk.id(),
            &pk.digest_password(),
            Algorithm::Sha256,
            &n,
            RURI,
            true,
        );
        assert!(matches!(f.check(&[&a]), Outcome::Forbidden { .. }));
    }

    #[test]
    fn source_ip_acl() {
        let f = Fixture::new();
        let wide = f.key(
            KeyKind::Secret,
            Limits {
                trusted_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                ..Limits::default()
            },
        );
        let narrow = f.key(
            KeyKind::Secret,
            Limits {
                trusted_cidrs: vec![
                    "10.1.0.0/16".parse().unwrap(),
                    "2001:db8::/32".parse().unwrap(),
                ],
                deny_prefixes: vec!["+1415".into()],
                ..Limits::default()
            },
        );
        let p = assert_accepted(f.check_at(&[], NOW, "10.2.3.4"), Method::SourceIp);
        assert_eq!(p.key.id, wide.id());
        // Most specific CIDR wins, and its policy applies.
        let o = f.check_at(&[], NOW, "10.1.2.3");
        assert!(
            matches!(
                o,
                Outcome::Forbidden {
                    reason: "destination_denied"
                }
            ),
            "{o:?}"
        );
        assert!(matches!(
            f.check_at(&[], NOW, "2001:db8::1"),
            Outcome::Forbidden { .. }
        ));
        assert!(matches!(
            f.check_at(&[], NOW, "192.0.2.1"),
            Outcome::Challenge { .. }
        ));
        // A good credential from a trusted source is the credential's key.
        let other = f.key(KeyKind::Secret, Limits::default());
        let p = assert_accepted(
            f.check_at(&[&bearer(&other, &claims("t"))], NOW, "10.2.3.4"),
            Method::Bearer,
        );
        assert_eq!(p.key.id, other.id());
        // A bad credential from a trusted source is still refused.
        assert_invalid_token(f.check_at(&["Bearer x"], NOW, "10.2.3.4"), "malformed");
        // Revoked keys grant nothing.
        f.store.revoke(wide.id(), 0).unwrap();
        f.store.revoke(narrow.id(), 0).unwrap();
        assert!(matches!(
            f.check_at(&[], NOW, "10.2.3.4"),
            Outcome::Challenge { .. }
        ));
    }

    #[test]
    fn caller_identity_caller_ids_and_484() {
        let f = Fixture::new();
        // Trusted source: the PAI is the identity, and caller_ids apply to it.
        let trusted = f.key(
            KeyKind::Secret,
            Limits {
                source_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                trusted_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                caller_ids: vec!["+1 999 888".into()],
                ..Limits::default()
            },
        );
        let p = assert_accepted(f.check_at(&[], NOW, "10.2.3.4"), Method::SourceIp);
        assert_eq!(p.key.id, trusted.id());
        assert_eq!(p.caller.as_str(), "+19998887777");
        assert!(p.asserted);
        // Bearer: the identity is the From, whatever the PAI says.
        let k = f.key(
            KeyKind::Secret,
            Limits {
                caller_ids: vec!["0014155550199".into()],
                ..Limits::default()
            },
        );
        assert_accepted(f.check(&[&bearer(&k, &claims("a"))]), Method::Bearer);
        let k = f.key(
            KeyKind::Secret,
            Limits {
                caller_ids: vec!["+1999".into()],
                ..Limits::default()
            },
        );
        let o = f.check(&[&bearer(&k, &claims("b"))]);
        assert!(
            matches!(
                o,
                Outcome::Forbidden {
                    reason: "caller_id_not_allowed"
                }
            ),
            "{o:?}"
        );
        // 484: a number attempt that is no number, while a number policy applies.
        let k = f.key(KeyKind::Secret, Limits::default());
        let check = |k: &ApiKey, to: &str, edge: bool| {
            let mut c = claims(&unique_jti());
            c.to = to.into();
            let t = bearer(k, &c);
            let inv = InviteView {
                method: "INVITE",
                request_uri: RURI,
                request_user: to,
                from_user: FROM,
                asserted_user: None,
                authorization: &[&t],
                source_ip: "192.0.2.1".parse().unwrap(),
            };
            let mut cfg = cfg(NOW);
            cfg.edge_checks_numbers = edge;
            f.auth.check(&inv, &cfg)
        };
        assert!(matches!(
            check(&k, "12345", true),
            Outcome::AddressIncomplete
        ));
        assert!(matches!(check(&k, "12345", false), Outcome::Accepted(_)));
        assert!(matches!(check(&k, "agent", true), Outcome::Accepted(_)));
        // The key's own number prefixes need a number, edge list or not.
        let k2 = f.key(
            KeyKind::Secret,
            Limits {
                deny_prefixes: vec!["+1900".into()],
                ..Limits::default()
            },
        );
        assert!(matches!(check(&k2, "+", false), Outcome::AddressIncomplete));
    }

    fn unique_jti() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        format!("u{}", N.fetch_add(1, Ordering::Relaxed))
    }

    #[test]
    fn works_behind_trait_objects_and_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Authenticator<MemoryKeyStore, MemoryReplayCache>>();
        assert_send_sync::<Authenticator<dyn KeyStore, dyn ReplayCache>>();
        let store = Arc::new(MemoryKeyStore::new());
        let (_, k) = store
            .create("k", KeyKind::Secret, None, Limits::default(), None, 0)
            .unwrap();
        let dyn_store: Arc<dyn KeyStore> = store;
        let dyn_replay: Arc<dyn ReplayCache> = Arc::new(MemoryReplayCache::new());
        let auth = Authenticator::new(dyn_store, dyn_replay, [0; 32]);
        let t = bearer(&k, &claims("dyn"));
        let inv = InviteView {
            method: "INVITE",
            request_uri: RURI,
            request_user: TO,
            from_user: FROM,
            asserted_user: None,
            authorization: &[&t],
            source_ip: "192.0.2.1".parse().unwrap(),
        };
        assert_accepted(auth.check(&inv, &cfg(NOW)), Method::Bearer);
    }

    #[test]
    fn outcomes_never_leak_secrets() {
        let f = Fixture::new();
        let k = f.key(KeyKind::Secret, Limits::default());
        let t = bearer(&k, &claims("a"));
        let token = t.trim_start_matches("Bearer ");
        for o in [f.check(&[&t]), f.check(&[&t])] {
            let d = format!("{o:?}");
            assert!(!d.contains(token));
            assert!(!d.contains(&k.expose()[19..]));
            assert!(!d.contains(&k.digest_password()));
            assert!(!d.contains(&hex::encode(k.signing_key())));
        }
    }
}
