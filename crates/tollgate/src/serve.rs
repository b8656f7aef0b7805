//! `tollgate serve`: wires the key store, the signaling core, the echo
//! destination and the metrics endpoint together.

use crate::config::{self, ConfigError, FileConfig};
use crate::{Failure, ServeArgs};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tollgate_keys::{
    FileKeyStore, FileReplayCache, KeyAdmin, KeyKind, KeyStore, Limits, ReplayCache,
};
use tollgate_sip::driver::{self, Control, Sockets};
use tollgate_sip::tls::{TlsAcceptor, TlsFiles};
use tollgate_sip::{b2bua, Peer, Route, TimerConfig, Transport};
use tollgate_state::{OnUnavailable, RedisKeyStore, RedisReplayCache, StateConfig};
use tollgate_trunk::{Allocator, CallJournal, CdrSink, FileCdrStore};

/// Everything `serve` needs, resolved from defaults, the file and the flags.
pub struct Settings {
    pub listen: Vec<(Transport, SocketAddr)>,
    pub realm: String,
    pub digest_algorithms: Vec<tollgate_keys::Algorithm>,
    pub t1: Duration,
    pub invite_timeout: Duration,
    pub nonce_lifetime_secs: u64,
    /// `[sip] bearer_challenge`: offer `Bearer realm=…` on a credential-less
    /// INVITE's 401 as well as Digest (SPEC §4; default false).
    pub bearer_challenge: bool,
    /// `[[sip.digest_by_source]]`.
    pub digest_by_source: Vec<tollgate_keys::DigestBySource>,
    pub media_ip: std::net::IpAddr,
    /// `[media] advertise_ip`: SDP names this instead of `media_ip`.
    pub media_advertise_ip: Option<std::net::IpAddr>,
    /// `[sip] advertise`: Via, Contact and From name this address.
    pub sip_advertise: Option<std::net::IpAddr>,
    /// `[sip] max_message_bytes`.
    pub max_message_bytes: usize,
    pub media_ports: (u16, u16),
    pub media_timeout: Duration,
    /// SIGTERM drain: calls in progress may go on this long, then BYE.
    pub drain_timeout: Duration,
    /// `[sip.lockout]`.
    pub lockout: tollgate_sip::lockout::LockoutConfig,
    pub trunk: tollgate_trunk::TrunkConfig,
    /// `[trunk] checkpoint_s`: calls up are checkpointed this often.
    pub checkpoint: Duration,
    /// Signaling cores (shards); default: the machine's cores.
    pub sip_workers: usize,
    pub metrics_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `[admin] tls_cert` and `tls_key`: HTTPS when set.
    pub admin_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// `[webhooks]`: call events (webhook.rs).
    pub webhooks: crate::webhook::WebhookConfig,
    pub routes: Vec<RouteSettings>,
    /// `[tls]` files, present when a `tls:` listener is configured.
    pub tls: Option<TlsFiles>,
    /// `[state]`: shared state of a fleet (SPEC §8); `None`: embedded.
    pub state: Option<StateConfig>,
    /// `[dns] servers`; empty: the system's resolver.
    pub dns_servers: Vec<SocketAddr>,
    /// `[tls] ca_file`: extra CAs for TLS route targets.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `[streams]` and `[tls] ca_file`: WebSocket stream targets (SPEC §10).
    pub streams: crate::stream::StreamConfig,
    /// `[recording]` (SPEC §10).
    pub recording: crate::recording::RecordingConfig,
}

/// One `[[routes]]` entry, checked.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub model: Option<String>,
    pub prefix: Option<tollgate_keys::number::Prefix>,
    /// Tried in order; empty: the built-in echo destination.
    pub targets: Vec<String>,
    /// OPTIONS pings toward the targets (`options_ping_s`).
    pub ping_interval: Option<Duration>,
    pub media: tollgate_sip::MediaProfile,
    pub sdes_over_cleartext: bool,
    pub auth: Option<Arc<tollgate_sip::route::OutboundAuth>>,
}

impl RouteSettings {
    fn default_to(targets: Vec<String>) -> Self {
        RouteSettings {
            model: None,
            prefix: None,
            targets,
            ping_interval: None,
            media: tollgate_sip::MediaProfile::Auto,
            sdes_over_cleartext: false,
            auth: None,
        }
    }

    /// Applies to every call (no model, no prefix).
    fn is_default(&self) -> bool {
        self.model.is_none() && self.prefix.is_none()
    }
}

pub fn settings(args: &ServeArgs) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(p) => config::load(p)?,
        None => FileConfig::default(),
    };
    let (listen_field, listen_raw) = if !args.sip_listen.is_empty() {
        ("--sip-listen", args.sip_listen.clone())
    } else if let Some(l) = &file.sip.listen {
        ("sip.listen", l.clone())
    } else {
        (
            "sip.listen",
            vec!["udp:127.0.0.1:5060".into(), "tcp:127.0.0.1:5060".into()],
        )
    };
    let mut listen = Vec::new();
    for l in &listen_raw {
        let (t, a) = config::parse_listen(listen_field, l)?;
        if listen.iter().any(|(t2, _)| *t2 == t) {
            return Err(ConfigError(format!(
                "{listen_field}: more than one {} listener",
                t.label()
            )));
        }
        listen.push((t, a));
    }
    if listen.is_empty() {
        return Err(ConfigError(format!("{listen_field}: no listener")));
    }
    let digest_algorithms = match &file.sip.digest_algorithms {
        Some(v) => config::parse_algorithms("sip.digest_algorithms", v)?,
        None => vec![
            tollgate_keys::Algorithm::Sha256,
            tollgate_keys::Algorithm::Md5,
        ],
    };
    let t1_ms = file.sip.t1_ms.unwrap_or(500);
    if !(10..=10_000).contains(&t1_ms) {
        return Err(ConfigError("sip.t1_ms: must be 10..=10000".into()));
    }
    let invite_timeout_s = file.sip.invite_timeout_s.unwrap_or(180);
    if !(1..=3600).contains(&invite_timeout_s) {
        return Err(ConfigError("sip.invite_timeout_s: must be 1..=3600".into()));
    }
    let nonce_lifetime_secs = file.sip.nonce_lifetime_s.unwrap_or(300);
    if !(10..=3600).contains(&nonce_lifetime_secs) {
        return Err(ConfigError(
            "sip.nonce_lifetime_s: must be 10..=3600".into(),
        ));
    }
    let realm = file.sip.realm.clone().unwrap_or_else(|| "tollgate".into());
    if realm.is_empty() || realm.contains(['"', '\\']) || !realm.is_ascii() {
        return Err(ConfigError(
            "sip.realm: must be non-empty ASCII without quotes".into(),
        ));
    }
    let media_ip = match (&args.media_ip, &file.media.ip) {
        (Some(ip), _) => config::parse_ip("--media-ip", ip)?,
        (None, Some(ip)) => config::parse_ip("media.ip", ip)?,
        (None, None) => std::net::IpAddr::from([127, 0, 0, 1]),
    };
    let media_ports = match (&args.media_ports, &file.media.ports) {
        (Some(p), _) => config::parse_port_range("--media-ports", p)?,
        (None, Some(p)) => config::parse_port_range("media.ports", p)?,
        (None, None) => (20_000, 29_999),
    };
    let mut trunk = tollgate_trunk::TrunkConfig::default();
    if let Some(n) = file.trunk.edge_max_calls {
        if n == 0 {
            return Err(ConfigError(
                "trunk.edge_max_calls: must be at least 1".into(),
            ));
        }
        trunk.edge_max_calls = n;
    }
    trunk.numbers = config::number_plan(&file.numbers)?;
    let recording = config::recording(&file.recording)?;
    if let Some(p) = &file.trunk.premium_deny_prefixes {
        trunk.premium_deny_prefixes = p.clone();
    }
    if let Some(p) = &file.trunk.premium_deny_extra_prefixes {
        trunk.premium_deny_extra_prefixes = p.clone();
    }
    if let Some(t) = &file.trunk.premium_deny_types {
        trunk.premium_deny_types = t.clone();
    }
    // Canonicalized once here; a bad entry is named with its field.
    trunk.deny_list().map_err(ConfigError)?;
    if let Some(s) = file.trunk.idle_reclaim_s {
        trunk.idle_reclaim_secs = s;
    }
    let checkpoint_s = file.trunk.checkpoint_s.unwrap_or(10);
    if !(1..=3600).contains(&checkpoint_s) {
        return Err(ConfigError("trunk.checkpoint_s: must be 1..=3600".into()));
    }
    let sip_workers = match file.sip.workers {
        Some(0) => return Err(ConfigError("sip.workers: must be at least 1".into())),
        Some(n) => n.min(64),
        None => std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
    };
    let drain_timeout_s = file.sip.drain_timeout_s.unwrap_or(60);
    if drain_timeout_s > 86_400 {
        return Err(ConfigError("sip.drain_timeout_s: must be 0..=86400".into()));
    }
    let lockout = lockout_settings(&file.sip.lockout)?;
    let media_timeout_s = file.media.timeout_s.unwrap_or(60);
    if !(5..=86_400).contains(&media_timeout_s) {
        return Err(ConfigError("media.timeout_s: must be 5..=86400".into()));
    }
    let addr = |flag: &str, field: &str, a: &Option<String>, f: &Option<String>, d: &str| {
        let (name, v) = match (a, f) {
            (Some(v), _) => (flag, v.as_str()),
            (None, Some(v)) => (field, v.as_str()),
            (None, None) => (field, d),
        };
        v.parse::<SocketAddr>()
            .map_err(|_| ConfigError(format!("{name}: {v:?} is not IP:PORT")))
    };
    let metrics_listen = addr(
        "--metrics-listen",
        "metrics.listen",
        &args.metrics_listen,
        &file.metrics.listen,
        "127.0.0.1:9090",
    )?;
    let admin_listen = addr(
        "--admin-listen",
        "admin.listen",
        &args.admin_listen,
        &file.admin.listen,
        "127.0.0.1:8080",
    )?;
    let admin_tls = match (&file.admin.tls_cert, &file.admin.tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError(
                "admin.tls_key: needed with admin.tls_cert".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError(
                "admin.tls_cert: needed with admin.tls_key".into(),
            ))
        }
    };
    crate::admin::check_plaintext(
        if args.admin_listen.is_some() {
            "--admin-listen"
        } else {
            "admin.listen"
        },
        admin_listen,
        admin_tls.is_some(),
        file.admin.allow_plaintext.unwrap_or(false),
    )?;
    let mut routes = Vec::new();
    for (i, r) in file.routes.iter().enumerate() {
        let field = format!("routes[{i}]");
        let media = config::parse_media_profile(&format!("{field}.media"), r.media.as_deref())?;
        let prefix = match &r.prefix {
            Some(p) => Some(config::route_prefix(&field, &trunk.numbers, p)?),
            None => None,
        };
        if let Some(url) = r
            .target
            .as_deref()
            .filter(|t| crate::stream::is_stream_url(t))
        {
            if r.targets.is_some() {
                return Err(ConfigError(format!(
                    "{field}.targets: give target or targets, not both"
                )));
            }
            let media = stream_route_media(&field, url, media)?;
            routes.push(RouteSettings {
                model: r.model.clone(),
                prefix,
                targets: vec![url.to_string()],
                ping_interval: None,
                media,
                sdes_over_cleartext: r.sdes_over_cleartext.unwrap_or(false),
                auth: None,
            });
            continue;
        }
        if let Some((i, _)) = r
            .targets
            .iter()
            .flatten()
            .enumerate()
            .find(|(_, t)| crate::stream::is_stream_url(t))
        {
            return Err(ConfigError(format!(
                "{field}.targets[{i}]: a ws:// or wss:// stream target stands alone (target = \"...\")"
            )));
        }
        let (targets, transport, ping_interval) = config::route_targets(&field, r)?;
        let sdes = r.sdes_over_cleartext.unwrap_or(false);
        // SDES rule (ARCHITECTURE.md): SRTP keys toward a cleartext target
        // only when the route says so.
        if media == tollgate_sip::MediaProfile::Srtp && transport != Transport::Tls && !sdes {
            return Err(ConfigError(format!(
                "{field}.sdes_over_cleartext: media = \"srtp\" toward a {} target would send the SRTP keys (a=crypto) in cleartext; set sdes_over_cleartext = true to allow it",
                transport.label()
            )));
        }
        let auth = match &r.auth {
            Some(a) => Some(Arc::new(config::route_auth(&field, a, |v| {
                std::env::var(v).ok()
            })?)),
            None => None,
        };
        routes.push(RouteSettings {
            model: r.model.clone(),
            prefix,
            targets,
            ping_interval,
            media,
            sdes_over_cleartext: sdes,
            auth,
        });
    }
    if let Some(t) = &args.route_default {
        if crate::stream::is_stream_url(t) {
            stream_route_media("--route-default", t, tollgate_sip::MediaProfile::Rtp)?;
        } else {
            config::parse_target("--route-default", t)?;
        }
        match routes.iter_mut().find(|r| r.is_default()) {
            Some(r) => r.targets = vec![t.clone()],
            None => routes.push(RouteSettings::default_to(vec![t.clone()])),
        }
    }
    if !routes.iter().any(RouteSettings::is_default) {
        routes.push(RouteSettings::default_to(Vec::new()));
    }
    let tls = match (
        listen.iter().any(|(t, _)| *t == Transport::Tls),
        &file.tls.cert_file,
        &file.tls.key_file,
    ) {
        (false, _, _) => None,
        (true, None, _) => {
            return Err(ConfigError(
                "tls.cert_file: required for a tls: SIP listener".into(),
            ))
        }
        (true, _, None) => {
            return Err(ConfigError(
                "tls.key_file: required for a tls: SIP listener".into(),
            ))
        }
        (true, Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert_file: cert.into(),
                key_file: key.into(),
                client_ca_file: file.tls.client_ca_file.as_ref().map(Into::into),
            };
            // Unreadable or mismatched files are a config error (exit 2).
            tollgate_sip::tls::server_config(&files).map_err(|e| ConfigError(e.0))?;
            Some(files)
        }
    };
    let state = config::state(&file)?;
    Ok(Settings {
        recording,
        state,
        dns_servers: config::dns_servers(&file.dns)?,
        tls_ca_file: match &file.tls.ca_file {
            Some(f) => {
                // Unreadable or not PEM: a config error (exit 2).
                tollgate_sip::tls_client::TlsConnector::new(Some(f.as_ref()))
                    .map_err(|e| ConfigError(e.0))?;
                Some(f.into())
            }
            None => None,
        },
        listen,
        realm,
        digest_algorithms,
        t1: Duration::from_millis(t1_ms),
        invite_timeout: Duration::from_secs(invite_timeout_s),
        nonce_lifetime_secs,
        bearer_challenge: file.sip.bearer_challenge.unwrap_or(false),
        digest_by_source: config::parse_digest_by_source(&file.sip.digest_by_source)?,
        media_ip,
        media_advertise_ip: file
            .media
            .advertise_ip
            .as_deref()
            .map(|ip| config::parse_advertise("media.advertise_ip", ip))
            .transpose()?,
        sip_advertise: file
            .sip
            .advertise
            .as_deref()
            .map(|ip| config::parse_advertise("sip.advertise", ip))
            .transpose()?,
        max_message_bytes: config::max_message_bytes(file.sip.max_message_bytes)?,
        media_ports,
        media_timeout: Duration::from_secs(media_timeout_s),
        drain_timeout: Duration::from_secs(drain_timeout_s),
        lockout,
        trunk,
        checkpoint: Duration::from_secs(checkpoint_s),
        sip_workers,
        metrics_listen,
        admin_listen,
        admin_tls,
        webhooks: crate::webhook::from_section(&file.webhooks)?,
        streams: crate::stream::StreamConfig::from_section(
            &file.streams,
            file.tls.ca_file.as_deref(),
        )?,
        routes,
        tls,
    })
}

fn lockout_settings(
    l: &config::LockoutSection,
) -> Result<tollgate_sip::lockout::LockoutConfig, ConfigError> {
    let d = tollgate_sip::lockout::LockoutConfig::default();
    let window_s = l.window_s.unwrap_or(d.window.as_secs());
    if !(1..=86_400).contains(&window_s) {
        return Err(ConfigError(
            "sip.lockout.window_s: must be 1..=86400".into(),
        ));
    }
    let ban_s = l.ban_s.unwrap_or(d.ban.as_secs());
    if !(1..=604_800).contains(&ban_s) {
        return Err(ConfigError("sip.lockout.ban_s: must be 1..=604800".into()));
    }
    let max_sources = l.max_sources.unwrap_or(d.max_sources);
    if !(128..=16_777_216).contains(&max_sources) {
        return Err(ConfigError(
            "sip.lockout.max_sources: must be 128..=16777216".into(),
        ));
    }
    Ok(tollgate_sip::lockout::LockoutConfig {
        failures: l.failures.unwrap_or(d.failures),
        window: Duration::from_secs(window_s),
        ban: Duration::from_secs(ban_s),
        max_sources,
    })
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "tollgate_sip_requests_total",
        "SIP requests received, by method"
    );
    describe_counter!(
        "tollgate_sip_requests_sent_total",
        "SIP requests originated by the edge, by method"
    );
    describe_gauge!(
        "tollgate_route_target_up",
        "1 while a route target answers its OPTIONS pings (or is not pinged), 0 while calls skip it"
    );
    describe_counter!(
        "tollgate_route_target_invites_total",
        "INVITEs sent to a route target (each failover attempt counts), by target"
    );
    describe_counter!(
        "tollgate_route_target_failures_total",
        "Failed INVITEs toward a route target (408, 5xx, no answer, connection), by target and code"
    );
    describe_counter!(
        "tollgate_route_target_dns_failures_total",
        "Lookups of a route target's name (RFC 3263) that found nothing, by target"
    );
    describe_counter!(
        "tollgate_leg_b_digest_answers_total",
        "Digest challenges of a carrier answered with the route's credentials"
    );
    describe_counter!(
        "tollgate_sip_outbound_connect_failures_total",
        "Outbound TCP connects or TLS handshakes (certificate included) that failed, by transport"
    );
    describe_counter!(
        "tollgate_sip_responses_total",
        "SIP responses sent by the edge, by status code"
    );
    describe_counter!(
        "tollgate_sip_parse_errors_total",
        "SIP messages that could not be read"
    );
    describe_counter!(
        "tollgate_auth_failures_total",
        "INVITEs refused by the credential check, by reason"
    );
    describe_counter!(
        "tollgate_lockout_bans_total",
        "Sources locked out for too many bad credentials (sip.lockout)"
    );
    describe_counter!(
        "tollgate_lockout_ignored_total",
        "Requests from locked-out sources, dropped without an answer"
    );
    describe_counter!(
        "tollgate_lockout_untracked_total",
        "Bad credentials not counted because the lockout table was full of bans"
    );
    describe_counter!(
        "tollgate_key_calls_ended_total",
        "Admitted calls ended, by key and cause (normal, cancel, busy, rejected, timeout, limit_reached, media_timeout, ...)"
    );
    describe_counter!(
        "tollgate_key_calls_answered_total",
        "Answered calls, by key"
    );
    describe_counter!(
        "tollgate_admission_refusals_total",
        "Authenticated INVITEs refused by the trunk (503 rate, 486 busy, 402 budget, 403 destination), by status"
    );
    describe_counter!(
        "tollgate_sip_queue_drops_total",
        "Datagrams dropped because a signaling shard's queue was full"
    );
    describe_gauge!(
        "tollgate_calls_active",
        "Calls in progress (setup or confirmed)"
    );
    describe_counter!(
        "tollgate_calls_total",
        "Admitted calls ended, by result (answered, rejected, cancelled, timeout, failed); refused INVITEs are in tollgate_auth_failures_total and tollgate_trunk_refusals_total"
    );
    describe_histogram!(
        "tollgate_call_setup_seconds",
        Unit::Seconds,
        "Time from an admitted INVITE to leg B's answer"
    );
    // Families registered by the other crates (trunk, media, sip): HELP text
    // for each lives here, next to the exporter.
    describe_counter!(
        "tollgate_sip_reoffers_refused_total",
        "re-INVITE/UPDATE offers refused with 488 or 491 (unusable SDP, or an offer while one is outstanding)"
    );
    describe_counter!(
        "tollgate_sip_multipart_reduced_total",
        "multipart bodies (SIP-I/SIP-T: SDP + ISUP) reduced to their SDP part"
    );
    describe_counter!(
        "tollgate_sip_offer_answer_failures_total",
        "Offer/answer exchanges that failed after a 2xx (late offer without a usable answer): both legs BYE'd"
    );
    describe_counter!(
        "tollgate_key_calls_total",
        "Calls admitted onto a key's trunk, by key id"
    );
    describe_counter!(
        "tollgate_key_billable_seconds_total",
        Unit::Seconds,
        "Billable (answered) call seconds, by key id"
    );
    describe_counter!(
        "tollgate_trunk_refusals_total",
        "Authenticated INVITEs refused by a trunk, by reason: rate (calls per second over the limit, 503), budget (daily minutes spent, 402), busy (concurrent-call cap, 486), destination (denied prefix, 403)"
    );
    describe_gauge!(
        "tollgate_trunk_channels_in_use",
        "Admitted calls holding a trunk channel, all keys together"
    );
    describe_gauge!(
        "tollgate_cdr_queue_depth",
        "Call records waiting for the CDR writer"
    );
    describe_counter!(
        "tollgate_cdr_write_errors_total",
        "Failed writes or fsyncs of the durable CDR file"
    );
    describe_counter!(
        "tollgate_checkpoint_write_errors_total",
        "Failed writes of the call journal (calls.jsonl: admissions, answers, checkpoints, ends), or closes held back because the CDR store could not be flushed"
    );
    describe_counter!(
        "tollgate_replay_write_errors_total",
        "Token/nonce uses refused because their entry could not be written to the replay cache file"
    );
    describe_counter!(
        "tollgate_media_packets_total",
        "RTP and RTCP packets relayed, by direction (a_to_b, b_to_a), proto (rtp, rtcp) and transform (none: plain in and out, encrypt: plain to SRTP, decrypt: SRTP to plain, reencrypt: SRTP to SRTP)"
    );
    describe_counter!(
        "tollgate_media_bytes_total",
        Unit::Bytes,
        "RTP and RTCP bytes relayed (as sent), by direction, proto and transform"
    );
    describe_counter!(
        "tollgate_media_dropped_total",
        "Media packets dropped, by reason (source: a stranger, not the leg's latched address; replay; malformed; send; unlatched: toward a leg behind NAT not latched yet)"
    );
    describe_counter!(
        "tollgate_srtp_auth_failures_total",
        "SRTP/SRTCP packets that failed authentication (dropped, never latched)"
    );
    describe_counter!(
        "tollgate_media_latched_late_total",
        "Media streams latched to an address other than the one the SDP named"
    );
    describe_gauge!(
        "tollgate_state_up",
        "1 while the fleet's shared state ([state], Redis) answers, 0 while it does not (absent without [state])"
    );
    describe_counter!(
        "tollgate_state_refusals_total",
        "New calls refused with 503 because shared state was unreachable and on_unavailable = refuse (credential-less ones; refused credentials count in tollgate_auth_failures_total reason=state_unavailable)"
    );
    describe_counter!(
        "tollgate_fleet_refusals_total",
        "New calls the fleet-wide admission ([state]) refused, by reason: rate_limited (503), busy (486), state_unavailable (503)"
    );
    describe_gauge!(
        "tollgate_media_ports_in_use",
        "Media ports (RTP and RTCP) allocated to calls"
    );
    describe_gauge!(
        "tollgate_media_ports_capacity",
        "Media ports (RTP and RTCP) the configured range holds"
    );
    describe_gauge!(
        "tollgate_media_sessions",
        "Calls with media state in the relay (offered, running or rejected)"
    );
    describe_gauge!(
        "tollgate_sip_core_entries",
        "Entries the signaling core holds, by table: calls (any state), transactions (incl. completed ones absorbing retransmissions), index (lookups by dialog and transaction), deadlines (queued call timers); all return to 0 when idle"
    );
}

/// Raises the soft limit of open files to the hard one, as SIP and media
/// servers do (every anchored call holds four UDP sockets): at the usual
/// soft limit of 1024 an edge refuses its 250th concurrent call. Warns when
/// even the hard limit cannot hold the media port range.
fn raise_fd_limit(media_ports: (u16, u16)) {
    let sockets = u64::from(media_ports.1.saturating_sub(media_ports.0)) + 1;
    // Signaling, TLS connections, files and the admin API besides media.
    let want = sockets + 1024;
    match rlimit::increase_nofile_limit(want) {
        Ok(n) if n < want => tracing::warn!(
            open_files = n,
            media_sockets = sockets,
            "the open-files limit is below the media port range: calls beyond \
             about {} concurrent get 503 (raise LimitNOFILE / ulimit -n)",
            n.saturating_sub(1024) / 4
        ),
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

pub fn run(data_dir: &Path, args: ServeArgs) -> Result<(), Failure> {
    let s = settings(&args)?;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    raise_fd_limit(s.media_ports);
    let (store, fleet): (Arc<dyn KeyAdmin>, _) = match &s.state {
        None => {
            let store = Arc::new(FileKeyStore::open(data_dir)?);
            if store.list().is_empty() {
                let (_, key) = store.create(
                    "default",
                    KeyKind::Secret,
                    None,
                    Limits::default(),
                    None,
                    crate::unix_now(),
                )?;
                println!("tollgate: first secret key (shown once): {}", key.expose());
            }
            (store, None)
        }
        Some(cfg) => {
            let store = open_shared_keys(cfg)?;
            // The first edge on an empty store makes the root key; the
            // others find it there.
            if let Some(key) = store.create_root_if_empty(crate::unix_now())? {
                println!("tollgate: first secret key (shown once): {}", key.expose());
            }
            println!("tollgate: shared state up (node {})", cfg.node);
            (store.clone() as Arc<dyn KeyAdmin>, Some(store))
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(s.sip_workers.max(2))
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("runtime: {e}")))?;
    rt.block_on(serve(s, args, store, fleet, data_dir.to_path_buf()))
}

/// Connects to `[state] url` and loads the fleet's keys: Redis must answer
/// at startup (an edge that cannot see its keys admits nobody), afterwards
/// an outage is survived.
pub fn open_shared_keys(cfg: &StateConfig) -> Result<Arc<RedisKeyStore>, Failure> {
    let shared = tollgate_state::Shared::open(&cfg.url, cfg.timeout, cfg.ca_pem.as_deref())
        .map_err(|e| Failure::Usage(e.to_string()))?;
    RedisKeyStore::open(shared).map_err(|e| Failure::Other(format!("{e} (cannot load the keys)")))
}

async fn serve(
    s: Settings,
    args: ServeArgs,
    store: Arc<dyn KeyAdmin>,
    fleet: Option<Arc<RedisKeyStore>>,
    data_dir: std::path::PathBuf,
) -> Result<(), Failure> {
    // Admin HTTPS certificate: a bad file is a config error (exit 2) before
    // anything listens.
    let admin_tls = match &s.admin_tls {
        Some((cert, key)) => Some(crate::admin::load_tls(cert, key)?),
        None => None,
    };
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("tollgate_call_setup_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .map_err(|e| Failure::Other(format!("metrics: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| Failure::Other(format!("metrics: {e}")))?;
    describe_metrics();
    crate::webhook::describe_metrics();

    let mut udp = None;
    let mut tcp = None;
    let mut tls = None;
    let mut local = HashMap::new();
    let bind_err =
        |a: &SocketAddr, e: std::io::Error| Failure::Other(format!("cannot listen on {a}: {e}"));
    for (t, a) in &s.listen {
        match t {
            Transport::Udp => {
                let sock = driver::bind_udp(*a).map_err(|e| bind_err(a, e))?;
                let bound = sock.local_addr().map_err(|e| bind_err(a, e))?;
                local.insert(Transport::Udp, bound);
                println!("tollgate: listening sip udp {bound}");
                udp = Some(Arc::new(sock));
            }
            Transport::Tcp => {
                let l = TcpListener::bind(a).await.map_err(|e| bind_err(a, e))?;
                let bound = l.local_addr().map_err(|e| bind_err(a, e))?;
                local.insert(Transport::Tcp, bound);
                println!("tollgate: listening sip tcp {bound}");
                tcp = Some(l);
            }
            Transport::Tls => {
                let Some(files) = &s.tls else {
                    return Err(Failure::Other("tls listener without [tls] files".into()));
                };
                let acceptor = TlsAcceptor::new(files.clone())
                    .map_err(|e| Failure::Other(format!("tls: {e}")))?;
                tollgate_sip::tls::describe_metrics();
                let l = TcpListener::bind(a).await.map_err(|e| bind_err(a, e))?;
                let bound = l.local_addr().map_err(|e| bind_err(a, e))?;
                local.insert(Transport::Tls, bound);
                println!("tollgate: listening sip tls {bound}");
                tls = Some((l, Arc::new(acceptor)));
            }
        }
    }
    // The handle SIGHUP reloads certificates through (see `reload_tls`).
    let tls_acceptor = tls.as_ref().map(|(_, a)| a.clone());
    let metrics_l = TcpListener::bind(s.metrics_listen)
        .await
        .map_err(|e| bind_err(&s.metrics_listen, e))?;
    let metrics_addr = metrics_l
        .local_addr()
        .map_err(|e| bind_err(&s.metrics_listen, e))?;
    println!("tollgate: listening metrics {metrics_addr}");
    let health = crate::metrics_http::Health::default();
    tokio::spawn(crate::metrics_http::serve(
        metrics_l,
        handle.clone(),
        health.clone(),
    ));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            handle.run_upkeep();
        }
    });

    let mut echo = None;
    let tls_client = Arc::new(
        tollgate_sip::tls_client::TlsConnector::new(s.tls_ca_file.as_deref())
            .map_err(|e| Failure::Other(e.0))?,
    );
    let mut dns = Dns {
        locator: None,
        tls: tls_client.clone(),
    };
    let mut streams = None;
    let routes = build_routes(&s, &mut echo, &mut dns, &mut streams).await?;

    // Key changes made by `tollgate keys` in another process (or, with
    // [state], on another node) are seen within 1 s: a stat of keys.json, or
    // one GET of the fleet's key version, every 200 ms; pub/sub notices
    // (fleet) come sooner.
    let refresh = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let store = refresh.clone();
            match tokio::task::spawn_blocking(move || store.refresh()).await {
                Ok(Err(e)) => tracing::debug!(
                    error = %e,
                    "key store refresh failed; keeping the last good keys"
                ),
                Ok(Ok(_)) => {}
                Err(e) => tracing::warn!(error = %e, "key store refresh task failed"),
            }
        }
    });

    let mut nonce_secret = [0u8; 32];
    match &fleet {
        // The fleet shares one nonce key: a nonce issued by any edge is
        // answered on any other, and single use fleet-wide.
        Some(f) => {
            nonce_secret = f
                .shared()
                .nonce_secret()
                .map_err(|e| Failure::Other(e.to_string()))?;
            f.start_subscriber();
            let again = f.clone();
            f.shared()
                .start_health(Duration::from_millis(500), move || {
                    // Whatever changed during the outage.
                    if let Err(e) = again.reload() {
                        tracing::warn!(error = %e, "key reload after reconnect failed");
                    }
                });
        }
        None => ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce_secret)
            .map_err(|_| Failure::Other("no system randomness".into()))?,
    }
    let admin_keys = store.clone();
    let keys: Arc<dyn KeyStore> = store;
    let on_unavailable = s.state.as_ref().map(|c| c.on_unavailable);
    let cfg = b2bua::Config {
        realm: s.realm.clone(),
        digest_algorithms: s.digest_algorithms.clone(),
        nonce_lifetime_secs: s.nonce_lifetime_secs,
        bearer_challenge: s.bearer_challenge,
        digest_by_source: s.digest_by_source.clone(),
        timers: TimerConfig {
            t1: s.t1,
            ..TimerConfig::default()
        },
        invite_timeout: s.invite_timeout,
        local,
        advertise: s.sip_advertise,
        max_message_bytes: s.max_message_bytes,
        routes,
        numbers: s.trunk.numbers.clone(),
        checks_numbers: s.trunk.deny_list().is_ok_and(|d| d.is_active()),
    };
    // Our address toward a peer, for wildcard listeners (SDP, Via, Contact).
    let sources = Arc::new(tollgate_media::source::SourceIps::new());
    let engine = Arc::new(
        tollgate_media::MediaEngine::new(tollgate_media::MediaConfig {
            ip: s.media_ip,
            ports: s.media_ports,
            timeout: s.media_timeout,
        })
        .advertise(s.media_advertise_ip)
        .with_sources(sources.clone()),
    );
    // Recorded calls (SPEC §10) and their retention sweep.
    let recorder = crate::recording::Recorder::new(&data_dir, engine.clone(), s.recording.clone());
    recorder.start_sweeper();
    // Trunks and CDRs: budgets survive a restart through the CDR store.
    let cdrs = Arc::new(
        FileCdrStore::open(&data_dir)
            .map_err(|e| Failure::Other(format!("CDR store in {}: {e}", data_dir.display())))?,
    );
    // Calls that were up when the edge last died get their CDR now, before
    // the budgets are seeded and before any call is admitted.
    let flusher = cdrs.clone();
    let (journal, recovered) =
        CallJournal::open(&data_dir, &cdrs, Box::new(move || flusher.flush()))
            .map_err(|e| Failure::Other(format!("call journal in {}: {e}", data_dir.display())))?;
    let journal = Arc::new(journal);
    if !recovered.written.is_empty() {
        let secs: u64 = recovered.written.iter().map(|c| c.billable_secs).sum();
        tracing::warn!(
            calls = recovered.written.len(),
            billable_secs = secs,
            "calls up at the last crash recorded with cause edge_lost"
        );
        println!(
            "tollgate: recovered {} calls up at the last crash (edge_lost, {secs} billable s)",
            recovered.written.len()
        );
    }
    // jtis and digest nonces stay used across restarts. Opened after the CDR
    // store, whose lock keeps a second edge off this data directory.
    let now_unix = crate::unix_now() as i64;
    let (replay_file, load) = FileReplayCache::open(&data_dir, now_unix)?;
    tracing::info!(
        live = load.live,
        expired = load.expired,
        bad_lines = load.bad_lines,
        "replay cache loaded"
    );
    let replay_file = Arc::new(replay_file);
    let local_replay = (on_unavailable == Some(OnUnavailable::Local))
        .then(|| replay_file.clone() as Arc<dyn ReplayCache>);
    let replay: Arc<dyn ReplayCache> = match &fleet {
        None => replay_file.clone(),
        // `local`: while Redis is down, this edge's own file decides.
        // The INVITE's use is recorded by the fleet's admission script (one
        // round trip per INVITE), `local`: in this edge's file while Redis
        // is down.
        Some(f) => {
            Arc::new(RedisReplayCache::new(f.shared().clone(), local_replay.clone()).deferring())
        }
    };
    tokio::spawn(async move {
        let errors = metrics::counter!("tollgate_replay_write_errors_total");
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let cache = replay_file.clone();
            let now = crate::unix_now() as i64;
            match tokio::task::spawn_blocking(move || (cache.maintain(now), cache.write_errors()))
                .await
            {
                Ok((r, n)) => {
                    errors.absolute(n);
                    if let Err(e) = r {
                        tracing::error!(error = %e, "replay cache upkeep failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "replay cache upkeep failed"),
            }
        }
    });
    let alloc = Arc::new(Allocator::new(s.trunk.clone()));
    let day = tollgate_trunk::utc_day(now_unix);
    match cdrs.spent_on_day(day) {
        Ok(spent) => {
            // A key's trunk counts its descendants' calls too (SPEC §2).
            let mut totals: std::collections::HashMap<String, u64> = Default::default();
            for (key, secs) in spent {
                let chain = keys
                    .get(&key)
                    .and_then(|rec| tollgate_keys::store::ancestors(keys.as_ref(), &rec));
                if let Some(chain) = chain {
                    for a in chain {
                        *totals.entry(a.id.clone()).or_default() += secs;
                    }
                }
                *totals.entry(key).or_default() += secs;
            }
            for (key, secs) in totals {
                alloc.seed_spent(&key, day, secs);
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read today's usage from the CDR store"),
    }
    let reclaim = alloc.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            reclaim.reclaim_idle(crate::unix_now() as i64);
        }
    });
    // Call webhooks: the policies only queue events; a task delivers them.
    let webhooks = crate::webhook::start(s.webhooks.clone()).map_err(Failure::Usage)?;
    // One signaling core per worker thread, sharded by call (driver.rs).
    let shards = s.sip_workers;
    let mut cores = Vec::with_capacity(shards);
    // Admitted calls, for the admin API's GET/DELETE /v1/calls.
    let calls = crate::policy::CallRegistry::default();
    let lockout = Arc::new(tollgate_sip::lockout::Lockout::new(s.lockout));
    // Checkpoints of the answered calls up, off the SIP path: one journal
    // line per interval for all of them.
    {
        let (calls, journal) = (calls.clone(), journal.clone());
        let period = s.checkpoint;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if calls.iter().any(|c| c.answered.is_some()) {
                    journal.checkpoint(crate::unix_now() as i64);
                }
            }
        });
    }
    // The fleet's stream of call records, fed from this node's CDR file
    // (exactly once per call, a record written during an outage later).
    if let (Some(f), Some(cfg)) = (&fleet, &s.state) {
        let known = keys.clone();
        let chain = move |kid: &str| {
            let rec = known.get(kid)?;
            let ancestors = tollgate_keys::store::ancestors(known.as_ref(), &rec)?;
            let all: Vec<&tollgate_keys::KeyRecord> = std::iter::once(&*rec)
                .chain(ancestors.iter().map(|a| &**a))
                .collect();
            let root = all.last().map_or(kid, |r| r.id.as_str()).to_owned();
            let budgeted = all
                .iter()
                .filter(|r| r.limits.daily_minutes.is_some())
                .map(|r| r.id.clone())
                .collect();
            Some((root, budgeted))
        };
        tollgate_state::CdrPublisher::new(
            f.shared().clone(),
            &cfg.node,
            &data_dir,
            cfg.cdr_stream_max,
            Box::new(chain),
        )
        .start(Duration::from_millis(250));
    }
    // Fleet-wide concurrent calls: leases in Redis, renewed by this node.
    let fleet_channels = match (&fleet, &s.state) {
        (Some(f), Some(cfg)) => {
            let ch = tollgate_state::FleetChannels::new(
                f.shared().clone(),
                &cfg.node,
                Duration::from_secs(cfg.lease_s),
            );
            ch.start_renewer();
            Some(ch)
        }
        _ => None,
    };
    for index in 0..shards {
        let sink: Arc<dyn CdrSink> = cdrs.clone();
        let mut policy = crate::policy::TrunkPolicy::new(alloc.clone(), sink, keys.clone())
            .with_webhooks(webhooks.clone())
            .with_calls(calls.clone())
            .with_journal(journal.clone())
            .with_recorder(recorder.clone());
        if let (Some(f), Some(OnUnavailable::Refuse)) = (&fleet, on_unavailable) {
            policy = policy.with_state_gate(f.shared().clone());
        }
        if let Some(ch) = &fleet_channels {
            policy = policy.with_fleet_channels(ch.clone(), local_replay.clone());
        }
        let mut core =
            tollgate_sip::B2bua::new(cfg.clone(), keys.clone(), replay.clone(), nonce_secret)
                .with_policy(Box::new(policy))
                .with_lockout(lockout.clone())
                .with_source_route(Arc::new(crate::media::KernelRoute(sources.clone())))
                .with_media(Box::new(crate::media::EngineHooks(engine.clone())));
        core.set_shard(index as u64, shards as u64);
        cores.push(core);
    }
    let (ctl_tx, ctl_rx) = mpsc::channel(64);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            tracing::debug!(?ev, "call event");
        }
    });
    let sip = tokio::spawn(driver::run(
        cores,
        Sockets {
            udp,
            tcp,
            tls,
            tls_client: Some(tls_client),
        },
        ctl_rx,
        ev_tx,
    ));
    // Media silent past the timeout: BYE both legs (SPEC §5).
    let silent_ctl = ctl_tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for call in engine.silent_calls(std::time::Instant::now()) {
                if silent_ctl
                    .send(Control::Hangup(call, tollgate_sip::EndCause::MediaTimeout))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    // Stream calls hang up through the driver, found in the registry.
    let wiring = crate::stream::gateway::Wiring {
        sip_udp: cfg.local.get(&Transport::Udp).copied(),
        control: ctl_tx.clone(),
        calls: calls.clone(),
        keys: keys.clone(),
    };
    if let Some(gw) = &streams {
        gw.attach(wiring.clone());
    }
    // Admin API (SPEC §7).
    let admin_state = Arc::new(crate::admin::AdminState {
        keys: admin_keys,
        cdrs: cdrs.clone(),
        fleet_usage: fleet.as_ref().map(|f| f.shared().clone()),
        calls,
        control: ctl_tx.clone(),
        data_dir: data_dir.clone(),
    });
    let admin = crate::admin::start(admin_state, s.admin_listen, admin_tls).await?;
    println!("tollgate: listening admin {}", admin.addr);
    // Handlers first: a SIGHUP right after `ready` must reload, not kill.
    let mut signals = Signals::new();
    println!("tollgate: ready");

    let mut s = s;
    while signals.next().await == Signal::Reload {
        // SIGHUP: routes, trunk limits (key limits are live already)
        // and certificates; calls in progress keep what they have.
        match settings(&args) {
            Ok(new) => {
                let mut changed = Vec::new();
                if new.listen != s.listen {
                    changed.push("sip.listen");
                }
                if new.media_ip != s.media_ip
                    || new.media_ports != s.media_ports
                    || new.media_advertise_ip != s.media_advertise_ip
                {
                    changed.push("media");
                }
                if new.sip_advertise != s.sip_advertise {
                    changed.push("sip.advertise");
                }
                if new.max_message_bytes != s.max_message_bytes {
                    changed.push("sip.max_message_bytes");
                }
                if new.metrics_listen != s.metrics_listen {
                    changed.push("metrics.listen");
                }
                if new.admin_listen != s.admin_listen {
                    changed.push("admin.listen");
                }
                if new.tls != s.tls {
                    changed.push("tls (file paths)");
                }
                if new.lockout != s.lockout {
                    changed.push("sip.lockout");
                }
                if new.checkpoint != s.checkpoint {
                    changed.push("trunk.checkpoint_s");
                }
                reload_tls(tls_acceptor.as_deref());
                if let Err(e) = admin.reload_tls(new.admin_tls.as_ref()) {
                    tracing::error!(error = %e, "admin API certificate not reloaded; keeping the running one");
                }
                match build_routes(&new, &mut echo, &mut dns, &mut streams).await {
                    Ok(routes) => {
                        if let Some(gw) = &streams {
                            gw.attach(wiring.clone());
                        }
                        let _ = ctl_tx.send(Control::SetRoutes(routes)).await;
                        alloc.reconfigure(new.trunk.clone());
                        if !changed.is_empty() {
                            tracing::warn!(
                                fields = changed.join(", "),
                                "reload: these settings take effect at the next restart"
                            );
                        }
                        println!("tollgate: reloaded");
                        s = new;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; keeping the running configuration");
                        println!("tollgate: reload refused: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; keeping the running configuration");
                println!("tollgate: reload refused: {e}");
            }
        }
    }

    // SIGTERM: drain. New INVITEs get 503 + Retry-After (and /healthz says
    // 503, so a load balancer stops sending); calls in progress go on up to
    // the drain timeout; a second SIGTERM/SIGINT cuts it short.
    health.set_draining();
    let _ = ctl_tx.send(Control::Drain).await;
    let deadline = tokio::time::Instant::now() + s.drain_timeout;
    println!(
        "tollgate: draining {} calls, up to {} s",
        alloc.channels_in_use(),
        s.drain_timeout.as_secs()
    );
    loop {
        if alloc.channels_in_use() == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            sig = signals.next() => if sig == Signal::Stop { break },
        }
    }
    tracing::info!(
        left = alloc.channels_in_use(),
        "drain over: hanging up the calls left"
    );
    let _ = ctl_tx.send(Control::Shutdown).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sip).await;
    // The journal's closes wait for the CDRs; a close lost here only costs
    // the next start a look into the CDR file.
    match tokio::task::spawn_blocking(move || cdrs.flush().and_then(|()| journal.flush())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "CDR flush at shutdown failed"),
        Err(e) => tracing::error!(error = %e, "CDR flush at shutdown failed"),
    }
    println!("tollgate: stopped");
    Ok(())
}

/// Re-reads the SIP/TLS certificate, key and client CA files (SIGHUP): new
/// handshakes use them, connections up keep theirs; on error the running
/// certificate stays. Returns whether a reload happened and succeeded.
pub fn reload_tls(acceptor: Option<&TlsAcceptor>) -> bool {
    let Some(a) = acceptor else {
        return false;
    };
    match a.reload() {
        Ok(()) => {
            tracing::info!("reload: SIP/TLS certificate files re-read");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "reload: SIP/TLS files refused; keeping the running certificate");
            println!("tollgate: tls reload refused: {e}");
            false
        }
    }
}

/// A stream route's target checked; its leg B (the stream gateway) is plain
/// RTP: the relay decrypts an SRTP leg A (SPEC §10).
fn stream_route_media(
    field: &str,
    target: &str,
    media: tollgate_sip::MediaProfile,
) -> Result<tollgate_sip::MediaProfile, ConfigError> {
    crate::stream::connect::check_url(target).map_err(|e| ConfigError(format!("{field}: {e}")))?;
    if media == tollgate_sip::MediaProfile::Srtp {
        return Err(ConfigError(format!(
            "{field}.media: a stream target's leg is the edge's own (plain RTP inside the edge); leave media out or set \"rtp\" (leg A may still use SRTP)"
        )));
    }
    Ok(tollgate_sip::MediaProfile::Rtp)
}

/// Leg-B routes from the settings; a route without a target goes to the
/// built-in echo destination, started on first need and kept across reloads;
/// a stream target to the stream gateway, likewise.
async fn build_routes(
    s: &Settings,
    echo: &mut Option<SocketAddr>,
    dns: &mut Dns,
    streams: &mut Option<Arc<crate::stream::Gateway>>,
) -> Result<Vec<Route>, Failure> {
    let mut routes = Vec::new();
    for (ri, r) in s.routes.iter().enumerate() {
        let texts = if r.targets.is_empty() {
            let addr = match *echo {
                Some(a) => a,
                None => {
                    let a = crate::echo::start()
                        .await
                        .map_err(|e| Failure::Other(format!("echo destination: {e}")))?;
                    tracing::info!(echo = %a, "no default route configured: calls go to the built-in echo");
                    *echo = Some(a);
                    a
                }
            };
            vec![format!("sip:echo@{addr}")]
        } else if let Some(url) = r.targets.iter().find(|t| crate::stream::is_stream_url(t)) {
            if streams.is_none() {
                let gw = crate::stream::Gateway::start(s.streams.clone())
                    .await
                    .map_err(|e| Failure::Other(format!("stream gateway: {e}")))?;
                *streams = Some(gw);
            }
            match streams {
                Some(gw) => vec![gw.target_for(url)],
                None => continue,
            }
        } else {
            r.targets.clone()
        };
        let mut targets = Vec::new();
        for (ti, text) in texts.into_iter().enumerate() {
            let (uri, transport, addr) = config::parse_target("route target", &text)?;
            targets.push(match addr {
                Some(addr) => {
                    let peer = Peer {
                        transport,
                        addr,
                        flow: None,
                    };
                    tollgate_sip::route::Target::new(uri, text, peer).labelled(ri, ti)
                }
                None => {
                    let t =
                        tollgate_sip::route::Target::named(uri, text, transport).labelled(ri, ti);
                    dns.keep_located(&s.dns_servers, &t).await;
                    t
                }
            });
        }
        let first = targets[0].clone();
        routes.push(Route {
            model: r.model.clone(),
            prefix: r.prefix.clone(),
            target: first.uri,
            target_text: first.text,
            peer: first.peer,
            media: r.media,
            sdes_over_cleartext: r.sdes_over_cleartext,
            auth: r.auth.clone(),
            targets,
            ping_interval: r.ping_interval,
        });
    }
    Ok(routes)
}

/// Route targets named by DNS (SPEC §9, RFC 3263): located before the
/// routes are used, then kept fresh by a task per target, at the answer's
/// TTL, until the target is dropped (a reload replaces it). The SIP shards
/// only ever read the latest answer.
struct Dns {
    locator: Option<Arc<tollgate_sip::resolve::Locator>>,
    /// TLS targets' certificates are checked against the name they were
    /// located by.
    tls: Arc<tollgate_sip::tls_client::TlsConnector>,
}

/// Longest wait for a name's first answer at start or reload.
const DNS_FIRST_WAIT: Duration = Duration::from_secs(3);
/// Retry delay of a name that does not resolve.
const DNS_RETRY: Duration = Duration::from_secs(5);

impl Dns {
    async fn keep_located(&mut self, servers: &[SocketAddr], t: &tollgate_sip::route::Target) {
        let Some(cell) = t.located.clone() else {
            return;
        };
        let locator = match &self.locator {
            Some(l) => l.clone(),
            None => match tollgate_sip::resolve::Locator::new(servers) {
                Ok(l) => self.locator.insert(Arc::new(l)).clone(),
                Err(e) => {
                    tracing::warn!(error = %e, target = %t.text, "route target cannot be located");
                    return;
                }
            },
        };
        let uri = t.uri.clone();
        let text = t.text.clone();
        let label = t.label.clone();
        let tls = self.tls.clone();
        let next = tokio::time::timeout(
            DNS_FIRST_WAIT,
            locate_once(&locator, &tls, &uri, (&label, &text), &cell),
        )
        .await
        .unwrap_or(DNS_RETRY);
        let weak = Arc::downgrade(&cell);
        drop(cell);
        tokio::spawn(async move {
            let mut wait = next;
            loop {
                tokio::time::sleep(wait).await;
                let Some(cell) = weak.upgrade() else {
                    return; // the target is gone (reload)
                };
                wait = locate_once(&locator, &tls, &uri, (&label, &text), &cell).await;
            }
        });
    }
}

/// Locates `uri` once into `cell`; returns when to look again.
async fn locate_once(
    locator: &tollgate_sip::resolve::Locator,
    tls: &tollgate_sip::tls_client::TlsConnector,
    uri: &tollgate_sip::SipUri,
    (label, text): (&str, &str),
    cell: &tollgate_sip::resolve::Located,
) -> Duration {
    match locator.locate(uri).await {
        Ok((peers, until)) => {
            // RFC 5922 §4: the certificate must name the URI's host, not
            // what NAPTR/SRV led to.
            for p in peers.iter().filter(|p| p.transport == Transport::Tls) {
                if let Err(e) = tls.expect_name(p.addr, &uri.host) {
                    tracing::warn!(target = text, error = %e, "TLS target name unusable");
                }
            }
            tracing::debug!(target = text, found = peers.len(), "route target located");
            cell.set(peers);
            until
                .saturating_duration_since(std::time::Instant::now())
                .clamp(Duration::from_secs(1), Duration::from_secs(300))
        }
        Err(e) => {
            tracing::warn!(target = text, error = %e, "route target does not resolve");
            metrics::counter!("tollgate_route_target_dns_failures_total", "target" => label.to_owned())
                .increment(1);
            cell.set(Vec::new());
            DNS_RETRY
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGHUP.
    Reload,
    /// SIGTERM or SIGINT.
    Stop,
}

/// The process signals `serve` acts on.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            let term = async {
                match self.term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let hup = async {
                match self.hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => Signal::Stop,
                _ = hup => Signal::Reload,
                _ = tokio::signal::ctrl_c() => Signal::Stop,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_trunk(extra: &str) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!("tollgate-serve-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("t{}.toml", extra.len()));
        std::fs::write(&path, format!("[trunk]\n{extra}\n")).unwrap();
        let r = settings(&ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        });
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn checkpoint_s_default_range_and_error_naming_the_field() {
        assert_eq!(with_trunk("").unwrap().checkpoint, Duration::from_secs(10));
        assert_eq!(
            with_trunk("checkpoint_s = 1").unwrap().checkpoint,
            Duration::from_secs(1)
        );
        for bad in ["checkpoint_s = 0", "checkpoint_s = 3601"] {
            let e = with_trunk(bad).err().expect(bad);
            assert!(e.0.starts_with("trunk.checkpoint_s:"), "{bad}: {}", e.0);
        }
    }
}
