//! Call webhooks (SPEC §7): `call.initiated`, `call.answered` and
//! `call.completed` POSTed as JSON to the `webhook` claim of the call's bearer
//! token, signed `X-Tollgate-Signature: t=<unix ts>,v1=<hex>` where `<hex>` is
//! HMAC-SHA256(key = the key's webhook secret, message = `<ts>.<raw body>`).
//!
//! Never on the SIP hot path: the call policy ([`Hooks`]) only does a
//! `try_send` onto a bounded queue (a full queue drops the event and counts
//! it). A dispatcher task owns everything else:
//!
//! * per-call order: one event of a call in flight at a time, the next one
//!   waits behind it; calls are independent of each other;
//! * retries with capped exponential backoff and jitter, for up to
//!   `[webhooks] retry_for_s` after the event happened;
//! * bounded memory: the queue, the events held (`max_pending`) and the
//!   requests in flight (`concurrency`) are all capped;
//! * SSRF safety: `https` only; the dispatcher resolves the host itself, keeps
//!   only addresses that are public or inside `[webhooks] allow_cidrs`
//!   ([`permitted`]), and the HTTP client connects only to those (a resolver
//!   that answers from the checked set, never from DNS); no proxies, no
//!   redirects. A target with no permitted address is refused: never
//!   contacted, counted, logged by host only (a URL may carry a token).
//!
//! Which secret signs: the webhook secret of the key's current secret (the
//! one derived from the key as last created or rolled). A key record written
//! before webhooks existed has none: its calls send no webhooks, and this is
//! logged once per key.

use bytes::Bytes;
use ipnet::IpNet;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tollgate_keys::KeyRecord;
use tollgate_sip::b2bua::{AdmitInfo, CallRecord};

/// `[webhooks]` settings, resolved.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// How long after an event it is still retried.
    pub retry_for: Duration,
    /// Addresses permitted although private, loopback, link-local, ...
    pub allow_cidrs: Vec<IpNet>,
    /// Extra trust anchors (PEM) besides the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// Whole-request timeout of one attempt.
    pub timeout: Duration,
    /// Capacity of the queue between the call hooks and the dispatcher.
    pub queue: usize,
    /// Events held by the dispatcher (waiting or being retried), all calls.
    pub max_pending: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// First retry delay; doubles per attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            retry_for: Duration::from_secs(3600),
            allow_cidrs: Vec::new(),
            ca_file: None,
            timeout: Duration::from_secs(5),
            queue: 4096,
            max_pending: 20_000,
            concurrency: 32,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// The `[webhooks]` section resolved; errors name the field.
pub fn from_section(
    sec: &crate::config::WebhooksSection,
) -> Result<WebhookConfig, crate::config::ConfigError> {
    use crate::config::ConfigError;
    let d = WebhookConfig::default();
    let range = |field: &str, v: Option<u64>, lo: u64, hi: u64, dflt: u64| match v {
        None => Ok(dflt),
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        Some(_) => Err(ConfigError(format!(
            "webhooks.{field}: must be {lo}..={hi}"
        ))),
    };
    let size = |field: &str, v: Option<usize>, hi: u64, dflt: usize| {
        range(field, v.map(|x| x as u64), 1, hi, dflt as u64).map(|x| x as usize)
    };
    let allow_cidrs = parse_cidrs("webhooks.allow_cidrs", sec.allow_cidrs.as_deref())?;
    let backoff_initial_ms = range(
        "backoff_initial_ms",
        sec.backoff_initial_ms,
        10,
        600_000,
        500,
    )?;
    let backoff_max_s = range("backoff_max_s", sec.backoff_max_s, 1, 86_400, 60)?;
    Ok(WebhookConfig {
        retry_for: Duration::from_secs(range("retry_for_s", sec.retry_for_s, 0, 7 * 86_400, 3600)?),
        allow_cidrs,
        ca_file: match &sec.ca_file {
            None => None,
            Some(f) => {
                // Checked here so that a bad file stops `serve` before it listens.
                let pem = std::fs::read(f)
                    .map_err(|e| ConfigError(format!("webhooks.ca_file: {f}: {e}")))?;
                if reqwest::Certificate::from_pem_bundle(&pem).map_or(true, |c| c.is_empty()) {
                    return Err(ConfigError(format!(
                        "webhooks.ca_file: {f}: no PEM certificate in it"
                    )));
                }
                Some(PathBuf::from(f))
            }
        },
        timeout: Duration::from_millis(range("timeout_ms", sec.timeout_ms, 100, 120_000, 5000)?),
        queue: size("queue", sec.queue, 1 << 20, d.queue)?,
        max_pending: size("max_pending", sec.max_pending, 1 << 22, d.max_pending)?,
        concurrency: size("concurrency", sec.concurrency, 4096, d.concurrency)?,
        backoff_initial: Duration::from_millis(backoff_initial_ms),
        backoff_max: Duration::from_secs(backoff_max_s)
            .max(Duration::from_millis(backoff_initial_ms)),
    })
}

/// An `allow_cidrs` list (CIDRs or bare addresses); errors name `field`.
pub fn parse_cidrs(
    field: &str,
    list: Option<&[String]>,
) -> Result<Vec<IpNet>, crate::config::ConfigError> {
    let mut out = Vec::new();
    for c in list.into_iter().flatten() {
        let net: IpNet = c
            .trim()
            .parse()
            .or_else(|_| c.trim().parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                crate::config::ConfigError(format!(
                    "{field}: {c:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address"
                ))
            })?;
        out.push(net);
    }
    Ok(out)
}

/// HELP text of the webhook metric families.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "tollgate_webhook_deliveries_total",
        "Webhook events finished, by outcome: delivered (2xx), rejected (the receiver answered 3xx/4xx), expired (retried for retry_for_s without success), refused (target address not permitted), invalid (not an https URL), no_secret (the key has no webhook secret)"
    );
    describe_counter!(
        "tollgate_webhook_retries_total",
        "Webhook delivery attempts that failed and were scheduled again"
    );
    describe_counter!(
        "tollgate_webhook_drops_total",
        "Webhook events dropped before delivery, by reason (queue_full, pending_full, closed)"
    );
    describe_gauge!(
        "tollgate_webhook_queue_depth",
        "Webhook events accepted and not yet finished (queued, in flight or waiting to be retried)"
    );
}

// ---- the call hooks' side ----------------------------------------------------

/// The webhook secret, never shown by `Debug`.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One call with a webhook: made at admission, shared by its events.
#[derive(Debug)]
pub struct CallCtx {
    url: String,
    secret: Secret,
    call_id: String,
    a_call_id: String,
    key_id: String,
    from: String,
    to: String,
    start: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initiated,
    Answered,
    Completed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Initiated => "call.initiated",
            Kind::Answered => "call.answered",
            Kind::Completed => "call.completed",
        }
    }
}

#[derive(Debug)]
struct Job {
    ctx: Arc<CallCtx>,
    kind: Kind,
    /// When it happened (Unix seconds) and on our clock (retry deadline).
    at: i64,
    born: Instant,
    answer: Option<i64>,
    end: Option<i64>,
    billable_secs: u64,
    cause: &'static str,
    sip_code: Option<u16>,
    /// `call.completed` of a recorded call: the recording's name.
    recording: Option<String>,
}

enum Msg {
    Event(Arc<Job>),
    NoSecret(String),
}

/// The call policy's handle: cheap to clone, never blocks, never fails loudly.
#[derive(Clone)]
pub struct Hooks {
    tx: mpsc::Sender<Msg>,
}

impl Hooks {
    fn push(&self, job: Job) {
        match self.tx.try_send(Msg::Event(Arc::new(job))) {
            Ok(()) => metrics::gauge!("tollgate_webhook_queue_depth").increment(1.0),
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("tollgate_webhook_drops_total", "reason" => "queue_full")
                    .increment(1)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!("tollgate_webhook_drops_total", "reason" => "closed").increment(1)
            }
        }
    }

    fn job(ctx: &Arc<CallCtx>, kind: Kind, at: i64) -> Job {
        Job {
            ctx: ctx.clone(),
            kind,
            at,
            born: Instant::now(),
            answer: None,
            end: None,
            billable_secs: 0,
            cause: "",
            sip_code: None,
            recording: None,
        }
    }

    /// An admitted call: if its token names a webhook, queues `call.initiated`
    /// and returns the context for the call's later events.
    pub fn initiated(
        &self,
        key: &KeyRecord,
        destination: &str,
        info: &AdmitInfo<'_>,
        unix: i64,
    ) -> Option<Arc<CallCtx>> {
        // The token's `webhook`, else the key's default.
        let url = info.webhook.or(key.webhook.as_deref())?;
        let Some(secret) = key.webhook_secret() else {
            // The dispatcher logs it once per key; nothing is sent.
            let _ = self.tx.try_send(Msg::NoSecret(key.id.clone()));
            metrics::counter!("tollgate_webhook_deliveries_total", "outcome" => "no_secret")
                .increment(1);
            return None;
        };
        let ctx = Arc::new(CallCtx {
            url: url.to_owned(),
            secret: Secret(secret.to_owned()),
            call_id: info.call_id.to_owned(),
            a_call_id: info.a_call_id.to_owned(),
            key_id: key.id.clone(),
            from: info.from.to_owned(),
            to: destination.to_owned(),
            start: unix,
        });
        self.push(Self::job(&ctx, Kind::Initiated, unix));
        Some(ctx)
    }

    /// Leg B answered.
    pub fn answered(&self, ctx: &Arc<CallCtx>, unix: i64) {
        let mut j = Self::job(ctx, Kind::Answered, unix);
        j.answer = Some(unix);
        self.push(j);
    }

    /// The call ended (its CDR is `r`, its cause label `cause`).
    pub fn completed(
        &self,
        ctx: &Arc<CallCtx>,
        r: &CallRecord,
        cause: &'static str,
        recording: Option<&str>,
    ) {
        let mut j = Self::job(ctx, Kind::Completed, r.end);
        j.answer = r.answer;
        j.end = Some(r.end);
        j.billable_secs = r.billable_secs;
        j.cause = cause;
        j.sip_code = r.sip_code;
        j.recording = recording.map(str::to_owned);
        self.push(j);
    }
}

/// The JSON body of an event.
fn body(j: &Job) -> Vec<u8> {
    let c = &j.ctx;
    let mut v = serde_json::json!({
        "type": j.kind.name(),
        "event_id": format!("{}/{}", c.call_id, j.kind.name()),
        "created": j.at,
        "call_id": c.call_id,
        "sip_call_id": c.a_call_id,
        "key_id": c.key_id,
        "from": c.from,
        "to": c.to,
        "start": c.start,
    });
    if let Some(a) = j.answer {
        v["answer"] = a.into();
    }
    if j.kind == Kind::Completed {
        let end = j.end.unwrap_or(j.at);
        v["end"] = end.into();
        v["duration_secs"] = (end - c.start).max(0).into();
        v["billable_secs"] = j.billable_secs.into();
        v["cause"] = j.cause.into();
        v["sip_code"] = j.sip_code.map_or(serde_json::Value::Null, Into::into);
        if let Some(r) = &j.recording {
            v["recording"] = r.as_str().into();
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// `t=<ts>,v1=<hex of HMAC-SHA256(secret, "<ts>.<body>")>`.
pub fn signature(secret: &str, ts: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(ts.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={ts},v1={}", hex::encode(ctx.sign().as_ref()))
}

// ---- address policy ------------------------------------------------------------

/// True if `ip` may be contacted: inside an allow-listed CIDR, or a public
/// unicast address. IPv4-mapped/-compatible and NAT64/6to4 forms are judged
/// by the IPv4 address they carry.
pub fn permitted(ip: IpAddr, allow: &[IpNet]) -> bool {
    let canon = ip.to_canonical();
    if allow.iter().any(|n| n.contains(&ip) || n.contains(&canon)) {
        return true;
    }
    is_public(canon)
}

/// Public unicast: not loopback, private, link-local, CGNAT, unspecified,
/// multicast, broadcast, documentation, benchmarking or otherwise reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    let refused = o[0] == 0                                  // 0.0.0.0/8 "this network"
        || o[0] == 10                                        // RFC 1918
        || (o[0] == 100 && (o[1] & 0xc0) == 64)              // 100.64.0.0/10 CGNAT
        || o[0] == 127                                       // loopback
        || (o[0] == 169 && o[1] == 254)                      // link-local
        || (o[0] == 172 && (o[1] & 0xf0) == 16)              // RFC 1918
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)           // 192.0.0.0/24 IETF assignments
        || (o[0] == 192 && o[1] == 0 && o[2] == 2)           // TEST-NET-1
        || (o[0] == 192 && o[1] == 88 && o[2] == 99)         // 6to4 relay anycast
        || (o[0] == 192 && o[1] == 168)                      // RFC 1918
        || (o[0] == 198 && (o[1] & 0xfe) == 18)              // 198.18.0.0/15 benchmarking
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)        // TEST-NET-2
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)         // TEST-NET-3
        || o[0] >= 224; // multicast 224/4, reserved 240/4, broadcast
    !refused
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    // ::a.b.c.d (IPv4-compatible, deprecated) and ::ffff:a.b.c.d (mapped).
    if s[..5] == [0; 5] && (s[5] == 0 || s[5] == 0xffff) {
        return s[5] == 0xffff && is_public_v4(embedded(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96: judged by the IPv4 address inside.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return is_public_v4(embedded(s[6], s[7]));
    }
    // 6to4 2002::/16: the IPv4 address is in bits 16..48.
    if s[0] == 0x2002 {
        return is_public_v4(embedded(s[1], s[2]));
    }
    let refused = (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)  // 64:ff9b:1::/48 local NAT64
        || (s[0] == 0x100 && s[1..4] == [0; 3])                  // 100::/64 discard
        || (s[0] == 0x2001 && s[1] < 0x200)                      // 2001::/23 IETF special (Teredo, benchmarking, ORCHID)
        || (s[0] == 0x2001 && s[1] == 0xdb8)                     // documentation
        || (s[0] == 0x3fff && s[1] < 0x1000)                             // 3fff::/20 documentation
        || (s[0] & 0xfe00) == 0xfc00                             // fc00::/7 unique local
        || (s[0] & 0xffc0) == 0xfe80                             // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0                             // fec0::/10 site-local
        || (s[0] & 0xff00) == 0xff00; // multicast
    !refused
}

/// Answers the HTTP client's name lookups from the addresses the dispatcher
/// checked, never from DNS: the connection goes only where the check said.
#[derive(Default)]
struct Pins(Mutex<HashMap<String, Vec<IpAddr>>>);

impl Pins {
    fn set(&self, host: &str, addrs: Vec<IpAddr>) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if m.len() >= 4096 && !m.contains_key(host) {
            m.clear();
        }
        m.insert(host.to_owned(), addrs);
    }
}

impl reqwest::dns::Resolve for Pins {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addrs = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name.as_str())
            .cloned();
        Box::pin(async move {
            match addrs {
                Some(a) if !a.is_empty() => {
                    let it: reqwest::dns::Addrs =
                        Box::new(a.into_iter().map(|ip| SocketAddr::new(ip, 0)));
                    Ok(it)
                }
                _ => Err("webhook host was not checked".into()),
            }
        })
    }
}

// ---- the dispatcher ------------------------------------------------------------

struct Shared {
    client: reqwest::Client,
    pins: Arc<Pins>,
    cfg: WebhookConfig,
    permits: Semaphore,
}

/// Starts the dispatcher on the current runtime and returns the hooks' handle.
/// Errors name the config field (`webhooks.ca_file`).
pub fn start(cfg: WebhookConfig) -> Result<Hooks, String> {
    let pins = Arc::new(Pins::default());
    let mut b = reqwest::Client::builder()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_max_idle_per_host(4)
        .user_agent("tollgate-webhook/1")
        .dns_resolver(pins.clone());
    if let Some(p) = &cfg.ca_file {
        let pem =
            std::fs::read(p).map_err(|e| format!("webhooks.ca_file: {}: {e}", p.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("webhooks.ca_file: {}: {e}", p.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "webhooks.ca_file: {}: no PEM certificate in it",
                p.display()
            ));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    let client = b
        .build()
        .map_err(|e| format!("webhooks: HTTP client: {e}"))?;
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    metrics::gauge!("tollgate_webhook_queue_depth").set(0.0);
    let shared = Arc::new(Shared {
        client,
        pins,
        permits: Semaphore::new(cfg.concurrency.max(1)),
        cfg,
    });
    tokio::spawn(dispatch(rx, shared));
    Ok(Hooks { tx })
}

async fn dispatch(mut rx: mpsc::Receiver<Msg>, shared: Arc<Shared>) {
    // Per call: its events in order; the front one is being delivered.
    let mut calls: HashMap<String, VecDeque<Arc<Job>>> = HashMap::new();
    let mut pending = 0usize;
    let mut warned: HashSet<String> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let depth = metrics::gauge!("tollgate_webhook_queue_depth");
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(Msg::NoSecret(key)) => {
                    if warned.len() < 10_000 && warned.insert(key.clone()) {
                        tracing::warn!(key = %key, "webhook requested but the key has no webhook secret (made before webhooks); roll the key to enable webhooks");
                    }
                }
                Some(Msg::Event(job)) => {
                    if pending >= shared.cfg.max_pending {
                        depth.decrement(1.0);
                        metrics::counter!("tollgate_webhook_drops_total", "reason" => "pending_full").increment(1);
                        continue;
                    }
                    pending += 1;
                    let q = calls.entry(job.ctx.call_id.clone()).or_default();
                    q.push_back(job);
                    if q.len() == 1 {
                        if let Some(front) = q.front() {
                            spawn_delivery(front, &shared, &done_tx);
                        }
                    }
                }
            },
            Some(call_id) = done_rx.recv() => {
                pending = pending.saturating_sub(1);
                depth.decrement(1.0);
                let next = match calls.get_mut(&call_id) {
                    Some(q) => {
                        q.pop_front();
                        q.front().map(|j| spawn_delivery(j, &shared, &done_tx)).is_some()
                    }
                    None => false,
                };
                if !next {
                    calls.remove(&call_id);
                }
            }
        }
    }
}

fn spawn_delivery(job: &Arc<Job>, shared: &Arc<Shared>, done: &mpsc::UnboundedSender<String>) {
    let (job, shared, done) = (job.clone(), shared.clone(), done.clone());
    tokio::spawn(async move {
        let outcome = deliver(&job, &shared).await;
        metrics::counter!("tollgate_webhook_deliveries_total", "outcome" => outcome).increment(1);
        let _ = done.send(job.ctx.call_id.clone());
    });
}

enum Fail {
    /// Give up on this event now (metric outcome label).
    Permanent(&'static str),
    /// Try again later.
    Transient(String),
}

/// Delivers one event, retrying; returns the outcome label.
async fn deliver(job: &Job, shared: &Shared) -> &'static str {
    let body = Bytes::from(body(job));
    let deadline = job.born + shared.cfg.retry_for;
    let mut attempt: u32 = 0;
    loop {
        match attempt_once(job, &body, shared).await {
            Ok(()) => return "delivered",
            Err(Fail::Permanent(label)) => return label,
            Err(Fail::Transient(why)) => {
                let delay = backoff(&shared.cfg, attempt);
                attempt = attempt.saturating_add(1);
                if Instant::now() + delay > deadline {
                    tracing::warn!(call = %job.ctx.call_id, event = job.kind.name(), attempts = attempt, error = %why, "webhook given up after the retry period");
                    return "expired";
                }
                tracing::debug!(call = %job.ctx.call_id, event = job.kind.name(), attempts = attempt, error = %why, "webhook attempt failed; retrying");
                metrics::counter!("tollgate_webhook_retries_total").increment(1);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Exponential, capped, with jitter: uniform in [d/2, d].
fn backoff(cfg: &WebhookConfig, attempt: u32) -> Duration {
    let base = cfg
        .backoff_initial
        .saturating_mul(1u32 << attempt.min(20))
        .min(cfg.backoff_max);
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
    base.mul_f64(0.5 + 0.5 * frac)
}

/// Checks a webhook URL given to a key (CLI, admin API): `https`, no
/// credentials in it, a host, at most 2048 characters. The address is checked
/// at delivery time (it may resolve differently later).
pub fn check_url(u: &str) -> Result<(), String> {
    if u.len() > 2048 {
        return Err("at most 2048 characters".into());
    }
    let url = reqwest::Url::parse(u).map_err(|e| format!("{u:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("{u:?}: webhooks must use https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{u:?}: no credentials in the URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{u:?}: no host"));
    }
    Ok(())
}

async fn attempt_once(job: &Job, body: &Bytes, shared: &Shared) -> Result<(), Fail> {
    let url = reqwest::Url::parse(&job.ctx.url).map_err(|_| Fail::Permanent("invalid"))?;
    if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
        return Err(Fail::Permanent("invalid"));
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let host = url.host_str().unwrap_or_default().to_owned();
    let literal: Option<IpAddr> = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => Some(v6.parse().map_err(|_| Fail::Permanent("invalid"))?),
        None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    let candidates: Vec<IpAddr> = match (literal, host.as_str()) {
        (Some(ip), _) => vec![ip],
        (None, "") => return Err(Fail::Permanent("invalid")),
        (None, d) => {
            let look =
                tokio::time::timeout(shared.cfg.timeout, tokio::net::lookup_host((d, port))).await;
            match look {
                Ok(Ok(it)) => it.map(|a| a.ip()).collect(),
                Ok(Err(e)) => return Err(Fail::Transient(format!("resolving {d}: {e}"))),
                Err(_) => return Err(Fail::Transient(format!("resolving {d}: timed out"))),
            }
        }
    };
    let allowed: Vec<IpAddr> = candidates
        .iter()
        .copied()
        .filter(|ip| permitted(*ip, &shared.cfg.allow_cidrs))
        .collect();
    if allowed.is_empty() {
        if candidates.is_empty() {
            return Err(Fail::Transient(format!("{host} has no address")));
        }
        tracing::warn!(host = %host, call = %job.ctx.call_id, "webhook target refused: no permitted address (private, loopback, link-local or reserved, and not in webhooks.allow_cidrs)");
        return Err(Fail::Permanent("refused"));
    }
    if literal.is_none() {
        shared.pins.set(&host, allowed);
    }
    let ts = crate::unix_now() as i64;
    let sig = signature(&job.ctx.secret.0, ts, body);
    let _permit = shared
        .permits
        .acquire()
        .await
        .map_err(|_| Fail::Permanent("expired"))?;
    let resp = shared
        .client
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Tollgate-Signature", sig)
        .header("X-Tollgate-Event", job.kind.name())
        .body(body.clone())
        .send()
        .await
        .map_err(|e| Fail::Transient(format!("{host}: {}", without_url(&e))))?;
    let st = resp.status().as_u16();
    match st {
        200..=299 => Ok(()),
        408 | 425 | 429 | 500..=599 => Err(Fail::Transient(format!("{host}: HTTP {st}"))),
        _ => {
            tracing::warn!(host = %host, status = st, call = %job.ctx.call_id, event = job.kind.name(), "webhook rejected by the receiver");
            Err(Fail::Permanent("rejected"))
        }
    }
}

/// A reqwest error without its URL (which may carry a customer's token).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "failed"
    };
    let mut src = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = src {
        detail = s.to_string();
        src = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_special_addresses() {
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.1.1",
            "240.0.0.1",
            "192.0.2.10",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.1",
            "192.0.0.8",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "3fff::1",
            "3fff:fff::1",
            "2001::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:c0a8:0101::1",
            "2002:7f00:0001::1",
        ] {
            assert!(!is_public(ip(s)), "{s} must be refused");
            assert!(!permitted(ip(s), &[]), "{s} must be refused");
        }
    }

    #[test]
    fn permits_public_addresses() {
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "169.253.1.1",
            "192.0.3.1",
            "198.20.0.1",
            "223.255.255.254",
            "2606:4700::1111",
            "3ffe:1::1",
            "3fff:1000::1",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert!(is_public(ip(s)), "{s} must be permitted");
            assert!(permitted(ip(s), &[]), "{s} must be permitted");
        }
    }

    #[test]
    fn allow_list_opens_exactly_its_cidrs() {
        let allow: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(permitted(ip("127.0.0.1"), &allow));
        assert!(
            permitted(ip("::ffff:127.0.0.1"), &allow),
            "mapped form of an allowed address"
        );
        assert!(!permitted(ip("127.0.0.2"), &allow));
        assert!(!permitted(ip("::1"), &allow));
        assert!(permitted(ip("fd00::5"), &allow));
        assert!(!permitted(ip("fc00::5"), &allow));
        assert!(!permitted(ip("10.0.0.1"), &allow));
    }

    #[test]
    fn config_section_defaults_and_errors_name_the_field() {
        let parse = |t: &str| {
            let f: crate::config::FileConfig = toml::from_str(t).unwrap();
            from_section(&f.webhooks)
        };
        let d = parse("").unwrap();
        assert_eq!(d.retry_for, Duration::from_secs(3600));
        assert!(d.allow_cidrs.is_empty() && d.ca_file.is_none());
        let c =
            parse("[webhooks]\nallow_cidrs = [\"127.0.0.1\", \"10.0.0.0/8\"]\nretry_for_s = 60\n")
                .unwrap();
        assert_eq!(c.allow_cidrs.len(), 2);
        assert!(permitted(ip("10.9.9.9"), &c.allow_cidrs));
        assert_eq!(c.retry_for, Duration::from_secs(60));
        for (t, field) in [
            ("allow_cidrs = [\"10.0.0.0/33\"]", "webhooks.allow_cidrs"),
            ("ca_file = \"/nonexistent/ca.pem\"", "webhooks.ca_file"),
            ("timeout_ms = 0", "webhooks.timeout_ms"),
            ("queue = 0", "webhooks.queue"),
        ] {
            let e = parse(&format!("[webhooks]\n{t}\n")).unwrap_err();
            assert!(e.0.contains(field), "{t}: {}", e.0);
        }
    }

    #[test]
    fn signature_matches_an_independent_computation() {
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"s3cret", b"1700000000.{\"a\":1}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature("s3cret", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let cfg = WebhookConfig {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..WebhookConfig::default()
        };
        for a in 0..40 {
            let d = backoff(&cfg, a);
            let base = Duration::from_millis(100)
                .saturating_mul(1 << a.min(20))
                .min(Duration::from_secs(2));
            assert!(d >= base / 2 && d <= base, "attempt {a}: {d:?} vs {base:?}");
        }
    }

    #[test]
    fn bodies_carry_the_call() {
        let ctx = Arc::new(CallCtx {
            url: "https://example.com/h".into(),
            secret: Secret("x".into()),
            call_id: "b1.0@tollgate".into(),
            a_call_id: "a1@host".into(),
            key_id: "abcdefghij12".into(),
            from: "+15550001111".into(),
            to: "+15551230000".into(),
            start: 100,
        });
        let mut j = Hooks::job(&ctx, Kind::Completed, 130);
        j.answer = Some(105);
        j.end = Some(130);
        j.billable_secs = 25;
        j.cause = "normal";
        let v: serde_json::Value = serde_json::from_slice(&body(&j)).unwrap();
        assert_eq!(v["type"], "call.completed");
        assert_eq!(v["call_id"], "b1.0@tollgate");
        assert_eq!(v["sip_call_id"], "a1@host");
        assert_eq!(v["duration_secs"], 30);
        assert_eq!(v["billable_secs"], 25);
        assert_eq!(v["cause"], "normal");
        assert!(v["sip_code"].is_null());
        assert!(
            v.get("recording").is_none(),
            "an unrecorded call names none"
        );
        j.recording = Some("recordings/abcdefghij12/b1.0_tollgate.wav".into());
        let v: serde_json::Value = serde_json::from_slice(&body(&j)).unwrap();
        assert_eq!(v["recording"], "recordings/abcdefghij12/b1.0_tollgate.wav");
        assert!(!format!("{ctx:?}").contains("\"x\""));
        let i: serde_json::Value =
            serde_json::from_slice(&body(&Hooks::job(&ctx, Kind::Initiated, 100))).unwrap();
        assert_eq!(i["type"], "call.initiated");
        assert!(i.get("end").is_none() && i.get("answer").is_none());
    }
}
