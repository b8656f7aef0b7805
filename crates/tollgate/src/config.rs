//! The TOML configuration file (`deploy/tollgate.toml` is the annotated
//! example) merged with command-line flags: a flag overrides the file.
//! Every error names the field it concerns.

use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use tollgate_keys::Algorithm;
use tollgate_sip::{MediaProfile, SipUri, Transport};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub sip: SipSection,
    #[serde(default)]
    pub media: MediaSection,
    #[serde(default)]
    pub metrics: ListenSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    #[serde(default)]
    pub trunk: TrunkSection,
    #[serde(default)]
    pub webhooks: WebhooksSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub streams: StreamsSection,
    #[serde(default)]
    pub numbers: NumbersSection,
    #[serde(default)]
    pub recording: RecordingSection,
    /// `[state]`: a fleet's shared state on Redis (SPEC §8); absent: embedded.
    pub state: Option<StateSection>,
    /// `[dns]`: the resolver for route targets named by DNS (SPEC §9).
    #[serde(default)]
    pub dns: DnsSection,
}

/// `[dns]`: where route targets' names are looked up (RFC 3263).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// `["IP:PORT", ...]` instead of the system's resolver (/etc/resolv.conf).
    pub servers: Option<Vec<String>>,
}

/// The `[dns] servers`, checked (empty: the system's resolver).
pub fn dns_servers(d: &DnsSection) -> Result<Vec<SocketAddr>, ConfigError> {
    let Some(v) = &d.servers else {
        return Ok(Vec::new());
    };
    if v.is_empty() {
        return Err(ConfigError(
            "dns.servers: at least one IP:PORT (or leave it out for the system's)".into(),
        ));
    }
    v.iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .map_err(|_| ConfigError(format!("dns.servers: {s:?} is not IP:PORT")))
        })
        .collect()
}

/// `[recording]`: recorded calls' WAV files (SPEC §10, recording.rs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingSection {
    /// Recordings are deleted this many days after their last write
    /// (default 30; 0 = at the next sweep after the call ended).
    pub retention_days: Option<u64>,
    /// How often the retention sweep runs (seconds; default 3600).
    pub sweep_interval_s: Option<u64>,
}

/// The recording settings of `[recording]`; errors name the field.
pub fn recording(s: &RecordingSection) -> Result<crate::recording::RecordingConfig, ConfigError> {
    let days = s.retention_days.unwrap_or(30);
    if days > 36_500 {
        return Err(ConfigError(
            "recording.retention_days: must be 0..=36500".into(),
        ));
    }
    let every = s.sweep_interval_s.unwrap_or(3600);
    if !(1..=86_400).contains(&every) {
        return Err(ConfigError(
            "recording.sweep_interval_s: must be 1..=86400".into(),
        ));
    }
    Ok(crate::recording::RecordingConfig {
        retention: std::time::Duration::from_secs(days * 86_400),
        sweep_every: std::time::Duration::from_secs(every),
    })
}

/// `[numbers]`: how numbers are canonicalized to E.164 (SPEC §4a).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumbersSection {
    /// National forms are read in this country's plan (default "US").
    pub default_country: Option<String>,
    /// Dialling prefixes followed by a country code (default ["011", "00"]).
    pub international_prefixes: Option<Vec<String>>,
}

/// The number plan of `[numbers]`; errors name the field.
pub fn number_plan(s: &NumbersSection) -> Result<tollgate_keys::number::NumberPlan, ConfigError> {
    let intl: Vec<String> = match &s.international_prefixes {
        Some(v) => v.clone(),
        None => tollgate_keys::number::DEFAULT_INTERNATIONAL_PREFIXES
            .iter()
            .map(|p| (*p).to_owned())
            .collect(),
    };
    tollgate_keys::number::NumberPlan::new(s.default_country.as_deref().unwrap_or("US"), &intl)
        .map_err(|e| {
            ConfigError(
                e.to_string()
                    .trim_start_matches("invalid key request: ")
                    .into(),
            )
        })
}

/// `[state]` (SPEC §8): every promise of §2-§4 holds for the fleet of edges
/// that name the same Redis.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// `redis://[user:password@]host:port/db` or `rediss://...` (TLS).
    pub url: Option<String>,
    /// Unique per edge; default: the hostname.
    pub node: Option<String>,
    /// A dead edge's channels are freed within this (seconds; default 10).
    pub lease_s: Option<u64>,
    /// `refuse` (default): new INVITEs get 503 + Retry-After while Redis is
    /// unreachable; `local`: they are checked on this edge's embedded state.
    pub on_unavailable: Option<String>,
    /// Timeout of one Redis request, connect included (ms; default 250).
    pub timeout_ms: Option<u64>,
    /// PEM file of the CAs a `rediss://` server must chain to (default: the
    /// system's roots).
    pub ca_file: Option<String>,
    /// Records the fleet's CDR stream is trimmed to (`XADD MAXLEN ~`;
    /// default 1,000,000): fleet usage covers the latest this many calls.
    pub cdr_stream_max: Option<u64>,
}

/// Validates `[state]`; `Ok(None)` without the section.
pub fn state(file: &FileConfig) -> Result<Option<tollgate_state::StateConfig>, ConfigError> {
    let Some(st) = &file.state else {
        return Ok(None);
    };
    let url = st.url.clone().ok_or_else(|| {
        ConfigError("[state] url: missing (e.g. \"redis://127.0.0.1:6379/0\")".into())
    })?;
    let ca_pem = match &st.ca_file {
        None => None,
        Some(_) if !(url.starts_with("rediss://") || url.starts_with("rediss+cluster://")) => {
            return Err(ConfigError(
                "[state] ca_file: only with a rediss:// or rediss+cluster:// url".into(),
            ))
        }
        Some(f) => {
            Some(std::fs::read(f).map_err(|e| ConfigError(format!("[state] ca_file: {f}: {e}")))?)
        }
    };
    // Checks the scheme and syntax; the message never repeats the URL (it
    // may hold a password).
    tollgate_state::Shared::open(
        &url,
        std::time::Duration::from_millis(250),
        ca_pem.as_deref(),
    )
    .map_err(|e| ConfigError(e.to_string()))?;
    let node = match &st.node {
        Some(n) => n.clone(),
        None => hostname(),
    };
    if node.is_empty()
        || node.len() > 64
        || !node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(ConfigError(
            "[state] node: 1 to 64 characters [A-Za-z0-9._-]".into(),
        ));
    }
    let lease_s = st.lease_s.unwrap_or(10);
    if !(1..=300).contains(&lease_s) {
        return Err(ConfigError("[state] lease_s: must be 1..=300".into()));
    }
    let on_unavailable = match st.on_unavailable.as_deref().unwrap_or("refuse") {
        "refuse" => tollgate_state::OnUnavailable::Refuse,
        "local" => tollgate_state::OnUnavailable::Local,
        other => {
            return Err(ConfigError(format!(
                "[state] on_unavailable: {other:?} is not refuse or local"
            )))
        }
    };
    let timeout_ms = st.timeout_ms.unwrap_or(250);
    if !(10..=5000).contains(&timeout_ms) {
        return Err(ConfigError("[state] timeout_ms: must be 10..=5000".into()));
    }
    let cdr_stream_max = st
        .cdr_stream_max
        .unwrap_or(tollgate_state::cdrs::CDR_STREAM_MAXLEN);
    if !(1_000..=100_000_000).contains(&cdr_stream_max) {
        return Err(ConfigError(
            "[state] cdr_stream_max: must be 1000..=100000000".into(),
        ));
    }
    Ok(Some(tollgate_state::StateConfig {
        url,
        cdr_stream_max,
        node,
        lease_s,
        on_unavailable,
        timeout: std::time::Duration::from_millis(timeout_ms),
        ca_pem,
    }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// `[tls]`: certificate and key for `tls:` SIP listeners (PEM files); with
/// `client_ca_file`, mutual TLS (clients must present a certificate that
/// chains to it). Re-read on reload.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub client_ca_file: Option<String>,
    /// Extra CAs (PEM) trusted, besides the web PKI roots, for the edge's
    /// own TLS connections: TLS route targets (SPEC §9) and `wss://` stream
    /// backends (§10).
    pub ca_file: Option<String>,
}

/// `[streams]`: WebSocket media streams to AI backends (SPEC §10, stream/).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsSection {
    /// Loopback/private/link-local CIDRs a stream may nevertheless connect
    /// to; `ws://` (no TLS) only toward these.
    pub allow_cidrs: Option<Vec<String>>,
    /// Resolve, connect, TLS and upgrade, all within this (ms; default 5000).
    pub connect_timeout_ms: Option<u64>,
    /// Backend audio held for playout, per call (ms; default 30000).
    pub queue_ms: Option<u64>,
}

/// `[webhooks]`: call events to the token's `webhook` (webhook.rs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksSection {
    /// How long an event is retried (seconds; default 3600).
    pub retry_for_s: Option<u64>,
    /// Private/loopback/link-local CIDRs that may nevertheless be contacted.
    pub allow_cidrs: Option<Vec<String>>,
    /// PEM file of extra CAs trusted for webhook receivers.
    pub ca_file: Option<String>,
    /// Timeout of one attempt (milliseconds; default 5000).
    pub timeout_ms: Option<u64>,
    /// Events queued between the calls and the dispatcher (default 4096).
    pub queue: Option<usize>,
    /// Events held for delivery or retry, all calls (default 20000).
    pub max_pending: Option<usize>,
    /// Requests in flight at once (default 32).
    pub concurrency: Option<usize>,
    /// First retry delay (milliseconds; default 500), doubling up to `backoff_max_s`.
    pub backoff_initial_ms: Option<u64>,
    /// Longest retry delay (seconds; default 60).
    pub backoff_max_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkSection {
    pub edge_max_calls: Option<u32>,
    pub premium_deny_prefixes: Option<Vec<String>>,
    pub premium_deny_extra_prefixes: Option<Vec<String>>,
    pub premium_deny_types: Option<Vec<String>>,
    pub idle_reclaim_s: Option<u64>,
    /// Seconds between checkpoints of the calls up (billable time lost at a
    /// crash is at most this); default 10.
    pub checkpoint_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    pub listen: Option<Vec<String>>,
    pub realm: Option<String>,
    pub digest_algorithms: Option<Vec<String>>,
    pub t1_ms: Option<u64>,
    pub invite_timeout_s: Option<u64>,
    pub nonce_lifetime_s: Option<u64>,
    /// Offer `Bearer realm=…` on a credential-less INVITE's 401 as well as
    /// Digest (SPEC §4; default false: libre/baresip reject such a 401).
    pub bearer_challenge: Option<bool>,
    pub workers: Option<usize>,
    /// The address named in Via, Contact and From instead of the bound one
    /// (an edge behind 1:1 NAT).
    pub advertise: Option<String>,
    /// Largest SIP message accepted (bytes); larger requests get 513.
    pub max_message_bytes: Option<usize>,
    /// SIGTERM: how long calls in progress may go on before the edge BYEs them.
    pub drain_timeout_s: Option<u64>,
    /// `[sip.lockout]`: sources that guess credentials are ignored.
    #[serde(default)]
    pub lockout: LockoutSection,
    /// `[[sip.digest_by_source]]`: another digest offer for some sources.
    #[serde(default)]
    pub digest_by_source: Vec<DigestBySourceSection>,
}

/// `[[sip.digest_by_source]]`: sources in `cidrs` are offered (and may
/// answer with) `algorithms` instead of `[sip] digest_algorithms`; the
/// first entry holding the source wins. For digest stacks that refuse a 401
/// carrying an algorithm they lack (libre/baresip: MD5 only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestBySourceSection {
    pub cidrs: Vec<String>,
    pub algorithms: Vec<String>,
}

/// Validates `[[sip.digest_by_source]]`; errors name the entry and field.
pub fn parse_digest_by_source(
    v: &[DigestBySourceSection],
) -> Result<Vec<tollgate_keys::DigestBySource>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, e)| {
            let field = |f: &str| format!("sip.digest_by_source[{i}].{f}");
            if e.cidrs.is_empty() {
                return Err(ConfigError(format!(
                    "{}: at least one CIDR",
                    field("cidrs")
                )));
            }
            let cidrs = e
                .cidrs
                .iter()
                .map(|c| {
                    c.parse::<ipnet::IpNet>()
                        .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| {
                            ConfigError(format!("{}: {c:?} is not a CIDR", field("cidrs")))
                        })
                })
                .collect::<Result<_, _>>()?;
            Ok(tollgate_keys::DigestBySource {
                cidrs,
                algorithms: parse_algorithms(&field("algorithms"), &e.algorithms)?,
            })
        })
        .collect()
}

/// `[sip.lockout]` (SPEC §4): more than `failures` bad credentials from one
/// source within `window_s` and it is ignored for `ban_s`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutSection {
    /// Default 20; 0 turns the lockout off.
    pub failures: Option<u32>,
    /// Default 60.
    pub window_s: Option<u64>,
    /// Default 300.
    pub ban_s: Option<u64>,
    /// Sources tracked at once (fixed memory, about 64 bytes each); default 65536.
    pub max_sources: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaSection {
    pub ip: Option<String>,
    /// The address SDP names instead of `ip` (an edge behind 1:1 NAT).
    pub advertise_ip: Option<String>,
    pub ports: Option<String>,
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    pub listen: Option<String>,
}

/// `[admin]`: the admin HTTP API (SPEC §7).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<String>,
    /// PEM certificate chain; with `tls_key`, the API is served over HTTPS.
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// Serve plain HTTP on a non-loopback address (bearer keys in clear:
    /// only behind a TLS-terminating proxy on a private network).
    pub allow_plaintext: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub model: Option<String>,
    /// Destinations starting with this (canonical E.164, SPEC §4a; or a
    /// name, matched exactly) take this route; the longest prefix wins.
    pub prefix: Option<String>,
    /// One target, or `targets`: several, tried in order (SPEC §9).
    pub target: Option<String>,
    pub targets: Option<Vec<String>>,
    /// OPTIONS pings toward each target, seconds apart; 0 = none. Default
    /// 30 for a route with several targets, none for one target.
    pub options_ping_s: Option<u64>,
    #[serde(default)]
    pub media: Option<String>,
    /// Allow SDES keys (`a=crypto`) over cleartext (UDP/TCP) signaling on
    /// this route's calls (both legs). Default false: see ARCHITECTURE.md.
    #[serde(default)]
    pub sdes_over_cleartext: Option<bool>,
    /// `[routes.auth]`: digest credentials for a carrier that challenges
    /// leg B's INVITE (401/407).
    pub auth: Option<RouteAuthSection>,
}

/// `[routes.auth]`: the password in the file, or (better) the name of an
/// environment variable holding it. Never logged.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthSection {
    pub username: String,
    pub password: Option<String>,
    pub password_env: Option<String>,
}

impl std::fmt::Debug for RouteAuthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteAuthSection")
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .finish_non_exhaustive()
    }
}

/// A route's targets (`target` or `targets`, one of them), checked, with
/// their transport (one per route) and the ping interval.
pub fn route_targets(
    field: &str,
    r: &RouteSection,
) -> Result<(Vec<String>, Transport, Option<std::time::Duration>), ConfigError> {
    let (name, list) = match (&r.target, &r.targets) {
        (Some(t), None) => ("target", vec![t.clone()]),
        (None, Some(v)) if !v.is_empty() => ("targets", v.clone()),
        (None, Some(_)) => return Err(ConfigError(format!("{field}.targets: empty"))),
        (None, None) => {
            return Err(ConfigError(format!(
                "{field}.target: missing (or targets = [...])"
            )))
        }
        (Some(_), Some(_)) => {
            return Err(ConfigError(format!(
                "{field}.targets: give target or targets, not both"
            )))
        }
    };
    let mut transport = None;
    for (i, t) in list.iter().enumerate() {
        let f = if name == "target" {
            format!("{field}.target")
        } else {
            format!("{field}.targets[{i}]")
        };
        let (_, tr, _) = parse_target(&f, t)?;
        if transport.is_some_and(|t0| t0 != tr) {
            return Err(ConfigError(format!(
                "{f}: all targets of a route use one transport"
            )));
        }
        transport = Some(tr);
    }
    let ping_s = r
        .options_ping_s
        .unwrap_or(if list.len() > 1 { 30 } else { 0 });
    if ping_s > 3600 {
        return Err(ConfigError(format!(
            "{field}.options_ping_s: must be 0..=3600"
        )));
    }
    let ping = (ping_s > 0).then(|| std::time::Duration::from_secs(ping_s));
    Ok((list, transport.unwrap_or(Transport::Udp), ping))
}

/// Validates `[routes.auth]` of the route at `field` (`routes[i]`); the
/// secret is taken from the file or the environment and never echoed.
pub fn route_auth(
    field: &str,
    a: &RouteAuthSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<tollgate_sip::route::OutboundAuth, ConfigError> {
    if a.username.is_empty() || a.username.contains(['"', '\\']) || !a.username.is_ascii() {
        return Err(ConfigError(format!(
            "{field}.auth.username: must be non-empty ASCII without quotes"
        )));
    }
    let password = match (&a.password, &a.password_env) {
        (Some(p), None) => p.clone(),
        (None, Some(var)) => env(var).filter(|p| !p.is_empty()).ok_or_else(|| {
            ConfigError(format!(
                "{field}.auth.password_env: environment variable {var:?} is not set"
            ))
        })?,
        _ => {
            return Err(ConfigError(format!(
                "{field}.auth.password: give password or password_env (one of them)"
            )))
        }
    };
    if password.is_empty() {
        return Err(ConfigError(format!("{field}.auth.password: empty")));
    }
    Ok(tollgate_sip::route::OutboundAuth::new(
        a.username.clone(),
        password,
    ))
}

/// A route's `prefix`, canonical under the edge's number plan.
pub fn route_prefix(
    field: &str,
    plan: &tollgate_keys::number::NumberPlan,
    p: &str,
) -> Result<tollgate_keys::number::Prefix, ConfigError> {
    plan.prefix(p).ok_or_else(|| {
        ConfigError(format!(
            "{field}.prefix: {p:?} is not a number prefix (e.g. \"+44\") or a name"
        ))
    })
}

/// A configuration error: exit code 2, message names the field.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("config {}: {e}", path.display())))
}

/// A listening address: `udp:IP:PORT`, `tcp:...`, `tls:...`.
pub fn parse_listen(field: &str, s: &str) -> Result<(Transport, SocketAddr), ConfigError> {
    let (t, addr) = s
        .split_once(':')
        .ok_or_else(|| ConfigError(format!("{field}: {s:?} is not udp:|tcp:|tls:IP:PORT")))?;
    let t = match t.to_ascii_lowercase().as_str() {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        other => {
            return Err(ConfigError(format!(
                "{field}: unknown transport {other:?} (udp, tcp or tls)"
            )))
        }
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| ConfigError(format!("{field}: {addr:?} is not IP:PORT")))?;
    Ok((t, addr))
}

pub fn parse_algorithms(field: &str, v: &[String]) -> Result<Vec<Algorithm>, ConfigError> {
    if v.is_empty() {
        return Err(ConfigError(format!("{field}: at least one algorithm")));
    }
    v.iter()
        .map(|s| {
            Algorithm::from_name(s).ok_or_else(|| {
                ConfigError(format!("{field}: unknown algorithm {s:?} (MD5, SHA-256)"))
            })
        })
        .collect()
}

pub fn parse_media_profile(field: &str, s: Option<&str>) -> Result<MediaProfile, ConfigError> {
    match s.unwrap_or("auto") {
        "rtp" => Ok(MediaProfile::Rtp),
        "srtp" => Ok(MediaProfile::Srtp),
        "auto" => Ok(MediaProfile::Auto),
        other => Err(ConfigError(format!(
            "{field}: {other:?} is not rtp, srtp or auto"
        ))),
    }
}

pub fn parse_port_range(field: &str, s: &str) -> Result<(u16, u16), ConfigError> {
    let err = || ConfigError(format!("{field}: {s:?} is not LO-HI (e.g. 20000-29999)"));
    let (lo, hi) = s.split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo == 0 || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

pub fn parse_ip(field: &str, s: &str) -> Result<IpAddr, ConfigError> {
    s.parse()
        .map_err(|_| ConfigError(format!("{field}: {s:?} is not an IP address")))
}

/// An address to advertise (`sip.advertise`, `media.advertise_ip`): an IP
/// a peer can send to, so not a wildcard and not multicast.
pub fn parse_advertise(field: &str, s: &str) -> Result<IpAddr, ConfigError> {
    let ip = parse_ip(field, s)?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(ConfigError(format!(
            "{field}: {s:?} is not an address a peer can send to"
        )));
    }
    Ok(ip)
}

/// `sip.max_message_bytes`: 1500 (one datagram) up to 65535 (UDP's limit).
pub fn max_message_bytes(v: Option<usize>) -> Result<usize, ConfigError> {
    let n = v.unwrap_or(tollgate_sip::message::DEFAULT_MAX_MESSAGE_BYTES);
    if !(1500..=tollgate_sip::message::MAX_MESSAGE_LEN).contains(&n) {
        return Err(ConfigError(format!(
            "sip.max_message_bytes: must be 1500..=65535, not {n}"
        )));
    }
    Ok(n)
}

/// A route target: a sip URI whose host is an IP literal, `localhost`, or
/// a DNS name (located by RFC 3263 at run time: the address is `None`).
pub fn parse_target(
    field: &str,
    s: &str,
) -> Result<(SipUri, Transport, Option<SocketAddr>), ConfigError> {
    let uri =
        SipUri::parse(s).map_err(|_| ConfigError(format!("{field}: {s:?} is not a SIP URI")))?;
    if uri.scheme == "tel" {
        return Err(ConfigError(format!(
            "{field}: {s:?} needs a host (sip:user@HOST[:PORT])"
        )));
    }
    let ip: Option<IpAddr> = if uri.host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::from([127, 0, 0, 1]))
    } else if let Ok(ip) = uri.host.parse() {
        Some(ip)
    } else if is_dns_name(&uri.host) {
        None
    } else {
        return Err(ConfigError(format!(
            "{field}: host {:?} is neither an IP address nor a DNS name",
            uri.host
        )));
    };
    let transport = match uri
        .transport
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        // sips: is TLS whatever the transport parameter says (RFC 5630).
        _ if uri.scheme == "sips" => Transport::Tls,
        None | Some("udp") => Transport::Udp,
        Some("tcp") => Transport::Tcp,
        Some("tls") => Transport::Tls,
        Some(t) => {
            return Err(ConfigError(format!(
                "{field}: transport {t:?} not supported for routes (udp, tcp, tls)"
            )))
        }
    };
    let port = uri.port.unwrap_or(if transport == Transport::Tls {
        5061
    } else {
        5060
    });
    Ok((uri, transport, ip.map(|ip| SocketAddr::new(ip, port))))
}

/// A host name as DNS knows it (RFC 1123 labels).
fn is_dns_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && h.bytes().any(|b| b.is_ascii_alphabetic())
}

/// `30s`, `10m`, `1h`, `2d` or plain seconds.
pub fn parse_duration(field: &str, s: &str) -> Result<u64, ConfigError> {
    let err = || {
        ConfigError(format!(
            "{field}: {s:?} is not a duration (e.g. 30s, 10m, 1h, 2d)"
        ))
    };
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        Some(_) => (s, 1),
        None => return Err(err()),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_names_them_in_errors() {
        assert_eq!(parse_duration("--ttl", "10m").unwrap(), 600);
        assert_eq!(parse_duration("--ttl", "45").unwrap(), 45);
        assert!(parse_duration("--ttl", "x")
            .unwrap_err()
            .0
            .contains("--ttl"));
        let (t, a) = parse_listen("--sip-listen", "tcp:127.0.0.1:5070").unwrap();
        assert_eq!((t, a.port()), (Transport::Tcp, 5070));
        assert!(parse_listen("--sip-listen", "sctp:1.2.3.4:5")
            .unwrap_err()
            .0
            .contains("--sip-listen"));
        assert_eq!(
            parse_port_range("media.ports", "20000-20010").unwrap(),
            (20000, 20010)
        );
        assert!(parse_port_range("media.ports", "5-1").is_err());
        let (_, t, a) =
            parse_target("routes[0].target", "sip:agent@127.0.0.1:5080;transport=tcp").unwrap();
        assert_eq!((t, a.map(|a| a.port())), (Transport::Tcp, Some(5080)));
        let (_, _, a) = parse_target("routes[0].target", "sip:agent@backend.test").unwrap();
        assert_eq!(a, None, "a name is located at run time");
        let (_, t, a) = parse_target("routes[0].target", "sips:agent@127.0.0.1").unwrap();
        assert_eq!((t, a.map(|a| a.port())), (Transport::Tls, Some(5061)));
        let (_, t, _) = parse_target("f", "sip:agent@backend.test;transport=TLS").unwrap();
        assert_eq!(t, Transport::Tls);
        assert!(parse_target("routes[0].target", "sip:agent@bad_host!").is_err());
        assert!(parse_target("routes[0].target", "sip:agent@-x.test").is_err());
        let plan = |t: &str| number_plan(&toml::from_str::<FileConfig>(t).unwrap().numbers);
        assert_eq!(plan("").unwrap().default_country(), "US");
        let gb = plan("[numbers]\ndefault_country = \"GB\"\ninternational_prefixes = [\"00\"]\n");
        assert_eq!(gb.unwrap().international_prefixes(), ["00"]);
        assert!(plan("[numbers]\ndefault_country = \"ZZ\"\n")
            .unwrap_err()
            .0
            .starts_with("numbers.default_country"));
        assert!(plan("[numbers]\ninternational_prefixes = [\"+\"]\n")
            .unwrap_err()
            .0
            .starts_with("numbers.international_prefixes"));
        let dns = |t: &str| dns_servers(&toml::from_str::<FileConfig>(t).unwrap().dns);
        assert!(dns("").unwrap().is_empty());
        assert_eq!(
            dns("[dns]\nservers = [\"127.0.0.1:5353\"]\n")
                .unwrap()
                .len(),
            1
        );
        assert!(dns("[dns]\nservers = [\"ns.test\"]\n")
            .unwrap_err()
            .0
            .starts_with("dns.servers"));
        let e = toml::from_str::<FileConfig>("[sip]\nlisten_on = []\n").unwrap_err();
        assert!(e.to_string().contains("listen_on"));
    }

    /// deploy/tollgate.toml documents `[state]` commented out (a single
    /// edge needs none): uncommented, it is valid.
    #[test]
    fn deploy_example_state_section_is_valid_uncommented() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/tollgate.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let block = text
            .split("\n# [state]\n")
            .nth(1)
            .expect("a [state] example");
        let mut section = String::from("[state]\n");
        for l in block.lines().take_while(|l| l.starts_with('#')) {
            let l = l.trim_start_matches('#').trim();
            // ca_file names a file the test machine has not (and needs rediss://).
            if l.contains(" = ")
                && !l.starts_with('[')
                && !l.starts_with("ca_file")
                && l.split(' ').nth(1) == Some("=")
            {
                section.push_str(l);
                section.push('\n');
            }
        }
        let st = state_of(&section).unwrap().unwrap();
        assert_eq!(st.url, "redis://127.0.0.1:6379/0");
        assert_eq!(st.node, "edge-1");
        assert_eq!(st.on_unavailable, tollgate_state::OnUnavailable::Refuse);
    }

    fn state_of(toml_text: &str) -> Result<Option<tollgate_state::StateConfig>, ConfigError> {
        state(&toml::from_str::<FileConfig>(toml_text).unwrap())
    }

    #[test]
    fn state_section_validated_with_the_field_named() {
        assert!(state_of("").unwrap().is_none());
        let s = state_of("[state]\nurl = \"redis://127.0.0.1:6379/0\"\nnode = \"edge-1\"\n")
            .unwrap()
            .unwrap();
        assert_eq!((s.node.as_str(), s.lease_s), ("edge-1", 10));
        assert_eq!(s.on_unavailable, tollgate_state::OnUnavailable::Refuse);
        assert_eq!(s.timeout, std::time::Duration::from_millis(250));
        let local = state_of(
            "[state]\nurl = \"rediss://u:p@127.0.0.1:6380\"\non_unavailable = \"local\"\nlease_s = 3\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(local.on_unavailable, tollgate_state::OnUnavailable::Local);
        let cluster =
            state_of("[state]\nurl = \"redis+cluster://127.0.0.1:7001,127.0.0.1:7002\"\n")
                .unwrap()
                .unwrap();
        assert!(cluster.url.starts_with("redis+cluster://"));
        for (text, field) in [
            (
                "[state]\nurl = \"redis+cluster://127.0.0.1:7001,127.0.0.1\"\n",
                "[state] url",
            ),
            (
                "[state]\nurl = \"redis+cluster://127.0.0.1:7001\"\nca_file = \"/x\"\n",
                "[state] ca_file",
            ),
            ("[state]\nnode = \"a\"\n", "[state] url"),
            ("[state]\nurl = \"http://x:1\"\n", "[state] url"),
            (
                "[state]\nurl = \"redis://127.0.0.1\"\nnode = \"a b\"\n",
                "[state] node",
            ),
            (
                "[state]\nurl = \"redis://127.0.0.1\"\nlease_s = 0\n",
                "[state] lease_s",
            ),
            (
                "[state]\nurl = \"redis://127.0.0.1\"\non_unavailable = \"maybe\"\n",
                "[state] on_unavailable",
            ),
            (
                "[state]\nurl = \"redis://127.0.0.1\"\ntimeout_ms = 1\n",
                "[state] timeout_ms",
            ),
            (
                "[state]\nurl = \"redis://127.0.0.1\"\ncdr_stream_max = 10\n",
                "[state] cdr_stream_max",
            ),
            (
                "[state]\nurl = \"redis://127.0.0.1\"\nca_file = \"/x\"\n",
                "[state] ca_file",
            ),
            (
                "[state]\nurl = \"rediss://127.0.0.1\"\nca_file = \"/nonexistent/ca.pem\"\n",
                "[state] ca_file",
            ),
        ] {
            let e = state_of(text).unwrap_err().0;
            assert!(e.starts_with(field), "{text}: {e}");
        }
        let e = toml::from_str::<FileConfig>("[state]\nurls = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("urls"));
    }

    #[test]
    fn route_targets_validated_with_the_field_named() {
        let of = |t: &str| {
            let f = toml::from_str::<FileConfig>(&format!("[[routes]]\n{t}")).unwrap();
            route_targets("routes[0]", &f.routes[0])
        };
        let (v, t, ping) =
            of("targets = [\"sip:127.0.0.1:5070\", \"sip:127.0.0.1:5071\"]").unwrap();
        assert_eq!((v.len(), t), (2, Transport::Udp));
        assert_eq!(ping, Some(std::time::Duration::from_secs(30)));
        let (_, _, ping) = of("target = \"sip:127.0.0.1:5070\"").unwrap();
        assert_eq!(ping, None, "one target: no pings by default");
        let (_, _, ping) = of("target = \"sip:127.0.0.1:5070\"\noptions_ping_s = 5").unwrap();
        assert_eq!(ping, Some(std::time::Duration::from_secs(5)));
        for (t, field) in [
            ("media = \"rtp\"", "routes[0].target"),
            ("targets = []", "routes[0].targets"),
            (
                "target = \"sip:127.0.0.1\"\ntargets = [\"sip:127.0.0.1\"]",
                "routes[0].targets",
            ),
            (
                "targets = [\"sip:127.0.0.1\", \"x\"]",
                "routes[0].targets[1]",
            ),
            (
                "targets = [\"sip:127.0.0.1\", \"sip:127.0.0.1;transport=tcp\"]",
                "routes[0].targets[1]",
            ),
            (
                "target = \"sip:127.0.0.1\"\noptions_ping_s = 99999",
                "routes[0].options_ping_s",
            ),
        ] {
            let e = of(t).unwrap_err().0;
            assert!(e.starts_with(field), "{t}: {e}");
        }
    }

    #[test]
    fn route_prefix_and_auth_validated_with_the_field_named() {
        let text = "[[routes]]\nprefix = \"011 44\"\ntarget = \"sip:127.0.0.1:5090\"\n[routes.auth]\nusername = \"trunk\"\npassword_env = \"TG_PW\"\n";
        let file = toml::from_str::<FileConfig>(text).unwrap();
        let r = &file.routes[0];
        let plan = number_plan(&file.numbers).unwrap();
        let p = route_prefix("routes[0]", &plan, r.prefix.as_deref().unwrap()).unwrap();
        assert_eq!(p.as_str(), "+44");
        assert!(route_prefix("routes[0]", &plan, "+")
            .unwrap_err()
            .0
            .starts_with("routes[0].prefix"));
        let a = r.auth.as_ref().unwrap();
        assert!(!format!("{a:?}").contains("TG_PW=") && format!("{a:?}").contains("trunk"));
        let env = |v: &str| (v == "TG_PW").then(|| "pw-from-env".to_owned());
        let auth = route_auth("routes[0]", a, env).unwrap();
        assert_eq!(auth.username, "trunk");
        let unset = route_auth("routes[0]", a, |_| None).unwrap_err().0;
        assert!(unset.starts_with("routes[0].auth.password_env"), "{unset}");
        for (body, field) in [
            ("username = \"u\"\n", "routes[0].auth.password"),
            (
                "username = \"u\"\npassword = \"p\"\npassword_env = \"X\"\n",
                "routes[0].auth.password",
            ),
            (
                "username = \"\"\npassword = \"p\"\n",
                "routes[0].auth.username",
            ),
            (
                "username = \"u\"\npassword = \"\"\n",
                "routes[0].auth.password",
            ),
        ] {
            let t = format!("[[routes]]\ntarget = \"sip:127.0.0.1\"\n[routes.auth]\n{body}");
            let f = toml::from_str::<FileConfig>(&t).unwrap();
            let e = route_auth("routes[0]", f.routes[0].auth.as_ref().unwrap(), |_| None)
                .unwrap_err()
                .0;
            assert!(e.starts_with(field), "{body}: {e}");
            assert!(!e.contains("\"p\""), "{e}");
        }
    }
}
