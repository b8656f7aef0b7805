//! `tollgate`: the authenticated SIP/RTP edge (SPEC §6).
#![forbid(unsafe_code)]

/// mimalloc: the SIP path allocates small strings per message on two worker
/// threads; glibc malloc spent a quarter of the edge's CPU under SIPp load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod config;
mod echo;
mod media;
mod metrics_http;
mod policy;
mod recording;
mod serve;
mod stream;
mod webhook;

use clap::{Args, Parser, Subcommand};
use config::{parse_duration, ConfigError};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_keys::{ApiKey, Claims, FileKeyStore, KeyAdmin, KeyKind, Limits, Scope};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Authenticated SIP/RTP edge for voice-AI traffic"
)]
struct Cli {
    /// Where keys and usage records live.
    #[arg(long, global = true, default_value = "./tollgate-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the edge (the default).
    Serve(ServeArgs),
    /// Manage API keys in the data directory, or with `--config FILE`
    /// naming a `[state]`, in the fleet's shared state.
    Keys {
        /// TOML configuration file; its `[state]` (if any) names the store.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Per-call bearer tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Usage totals from the durable call records (with `--config FILE`
    /// naming a `[state]`: the fleet's, from its shared stream).
    Usage {
        /// TOML configuration file; its `[state]` (if any) names the store.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// udp:IP:PORT, tcp:IP:PORT or tls:IP:PORT (repeatable).
    #[arg(long = "sip-listen")]
    pub sip_listen: Vec<String>,
    /// Address put in SDP for anchored media.
    #[arg(long)]
    pub media_ip: Option<String>,
    /// RTP port range LO-HI.
    #[arg(long)]
    pub media_ports: Option<String>,
    /// Target of the default route (leg B), e.g. sip:agent@127.0.0.1:5080.
    #[arg(long)]
    pub route_default: Option<String>,
    /// Where /metrics is served.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Where the admin API is served.
    #[arg(long)]
    pub admin_listen: Option<String>,
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Create a key; prints it once.
    Create(Box<CreateArgs>),
    /// Is KEY a well-formed key with a valid checksum? Offline: reads no
    /// store, needs no data directory, never prints the secret part.
    /// Exit 0: well formed with a valid checksum; 1: malformed, or no valid
    /// checksum.
    Check {
        /// The key, or `-` to read it from standard input (keeps it out of
        /// the shell history and the process list).
        key: String,
    },
    /// One line per key: id, kind, status, name.
    List,
    /// New secret for the same id; prints it once.
    Roll {
        id: String,
        /// Let the old secret work this much longer (e.g. 10m).
        #[arg(long)]
        grace: Option<String>,
    },
    /// The key stops working at once.
    Revoke { id: String },
}

#[derive(Args, Debug)]
struct CreateArgs {
    #[arg(long)]
    name: String,
    /// A client-side key: calls only, to its allow-list only.
    #[arg(long)]
    public: bool,
    /// Comma-separated scopes: calls, keys, usage, trunks.
    #[arg(long, value_delimiter = ',')]
    scopes: Vec<String>,
    /// The secret key this one is restricted from (its limits bound the new key's).
    #[arg(long)]
    parent: Option<String>,
    #[arg(long)]
    cps: Option<u32>,
    #[arg(long)]
    max_calls: Option<u32>,
    #[arg(long)]
    daily_minutes: Option<u32>,
    #[arg(long = "allow-prefix")]
    allow_prefix: Vec<String>,
    #[arg(long = "deny-prefix")]
    deny_prefix: Vec<String>,
    /// The only addresses the key's credentials work from (repeatable).
    #[arg(long = "source-cidr")]
    source_cidr: Vec<String>,
    /// Addresses admitted without a credential, e.g. a carrier (repeatable;
    /// inside --source-cidr when both are given).
    #[arg(long = "trust-cidr")]
    trust_cidr: Vec<String>,
    /// A caller identity the key may present (number or prefix, any form;
    /// repeatable). None: any caller.
    #[arg(long = "caller-id")]
    caller_id: Vec<String>,
    #[arg(long)]
    expires_in: Option<String>,
    /// Default https URL for call events when a call's token names none.
    #[arg(long)]
    webhook: Option<String>,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Mint a per-call bearer token; prints the JWT.
    Mint {
        #[arg(long)]
        key: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        from: String,
        /// Lifetime, at most 1h.
        #[arg(long, default_value = "5m")]
        ttl: String,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        webhook: Option<String>,
        #[arg(long)]
        record: Option<bool>,
        #[arg(long)]
        max_duration: Option<u64>,
    },
}

/// What the process exits with: 2 for usage/config errors, 1 otherwise.
pub enum Failure {
    Usage(String),
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Other(m) => f.write_str(m),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Usage(e.0)
    }
}

impl From<tollgate_keys::KeyError> for Failure {
    fn from(e: tollgate_keys::KeyError) -> Self {
        match e {
            tollgate_keys::KeyError::Invalid(_)
            | tollgate_keys::KeyError::Malformed
            | tollgate_keys::KeyError::NotFound(_)
            | tollgate_keys::KeyError::Revoked(_) => Failure::Usage(e.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve::run(&cli.data_dir, cli.serve),
        Some(Command::Serve(args)) => serve::run(&cli.data_dir, args),
        Some(Command::Keys { config, cmd }) => keys(&cli.data_dir, config.as_deref(), cmd),
        Some(Command::Token(TokenCmd::Mint {
            key,
            to,
            from,
            ttl,
            model,
            webhook,
            record,
            max_duration,
        })) => mint(&key, &to, &from, &ttl, model, webhook, record, max_duration),
        Some(Command::Usage { config, key, since }) => usage(
            &cli.data_dir,
            config.as_deref(),
            key.as_deref(),
            since.as_deref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("tollgate: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Other(m)) => {
            eprintln!("tollgate: {m}");
            ExitCode::from(1)
        }
    }
}

/// CIDRs of a repeatable flag; the error names the flag.
fn parse_cidrs(flag: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, Failure> {
    list.iter()
        .map(|c| {
            c.trim()
                .parse()
                .map_err(|_| Failure::Usage(format!("{flag}: {c:?} is not a CIDR")))
        })
        .collect()
}

/// `tollgate keys check`: what the string is, without its secret part.
fn check_key(arg: &str) -> Result<(), Failure> {
    let text = if arg == "-" {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Failure::Other(format!("reading the key from standard input: {e}")))?;
        line.trim().to_string()
    } else {
        arg.to_string()
    };
    let key = match ApiKey::parse(&text) {
        Ok(k) => k,
        Err(_) => {
            println!("well formed: no");
            return Err(Failure::Other(
                "not a key: expected tg_sk_<12 [a-z0-9]>_<32+ [A-Za-z0-9]> or tg_pk_...".into(),
            ));
        }
    };
    println!("well formed: yes");
    println!("kind: {}", key.kind());
    println!("id: {}", key.id());
    if key.has_valid_checksum() {
        println!("checksum: valid");
        Ok(())
    } else {
        println!("checksum: none valid");
        Err(Failure::Other(
            "no valid checksum: a key from before checksums, or mistyped".into(),
        ))
    }
}

fn keys(
    dir: &std::path::Path,
    config: Option<&std::path::Path>,
    cmd: KeysCmd,
) -> Result<(), Failure> {
    if let KeysCmd::Check { key } = &cmd {
        return check_key(key);
    }
    let state = match config {
        Some(p) => config::state(&config::load(p)?)?,
        None => None,
    };
    let store: std::sync::Arc<dyn KeyAdmin> = match &state {
        Some(cfg) => serve::open_shared_keys(cfg)?,
        None => std::sync::Arc::new(FileKeyStore::open(dir)?),
    };
    let now = unix_now();
    match cmd {
        KeysCmd::Create(a) => {
            let kind = if a.public {
                KeyKind::Public
            } else {
                KeyKind::Secret
            };
            let scopes = if a.scopes.is_empty() {
                None
            } else {
                Some(
                    a.scopes
                        .iter()
                        .map(|s| s.parse::<Scope>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| Failure::Usage(format!("--scopes: {e}")))?,
                )
            };
            let source_cidrs = parse_cidrs("--source-cidr", &a.source_cidr)?;
            let trusted_cidrs = parse_cidrs("--trust-cidr", &a.trust_cidr)?;
            let expires_at = match &a.expires_in {
                Some(d) => Some(now + parse_duration("--expires-in", d)?),
                None => None,
            };
            for (flag, list) in [
                ("--allow-prefix", &a.allow_prefix),
                ("--deny-prefix", &a.deny_prefix),
                ("--caller-id", &a.caller_id),
            ] {
                tollgate_keys::number::check_list(flag, list).map_err(Failure::Usage)?;
            }
            let limits = Limits {
                cps: a.cps,
                max_calls: a.max_calls,
                daily_minutes: a.daily_minutes,
                allow_prefixes: a.allow_prefix,
                deny_prefixes: a.deny_prefix,
                source_cidrs,
                trusted_cidrs,
                caller_ids: a.caller_id,
                expires_at,
            };
            if let Some(w) = &a.webhook {
                webhook::check_url(w).map_err(|e| Failure::Usage(format!("--webhook: {e}")))?;
            }
            let (rec, key) =
                store.create(&a.name, kind, scopes, limits, a.parent.as_deref(), now)?;
            if let Some(w) = &a.webhook {
                store.set_webhook(&rec.id, Some(w))?;
            }
            eprintln!(
                "tollgate: created {} key {} ({}); it is shown once, store it now",
                rec.kind.as_str(),
                rec.id,
                rec.name
            );
            println!("{}", key.expose());
        }
        KeysCmd::List => {
            let mut all = store.list();
            all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            for k in all {
                let kind = match k.kind {
                    KeyKind::Secret => "sk",
                    KeyKind::Public => "pk",
                };
                let status = if k.revoked_at.is_some() {
                    "revoked"
                } else if !k.is_usable(now) {
                    "expired"
                } else {
                    "active"
                };
                println!("{}\t{kind}\t{status}\t{}", k.id, k.name);
            }
        }
        KeysCmd::Roll { id, grace } => {
            let grace = match grace {
                Some(g) => Some(parse_duration("--grace", &g)?),
                None => None,
            };
            let key = store.roll(&id, grace, now)?;
            eprintln!("tollgate: rolled key {id}; the new key is shown once");
            println!("{}", key.expose());
        }
        KeysCmd::Revoke { id } => {
            store.revoke(&id, now)?;
            eprintln!("tollgate: revoked key {id}");
        }
        KeysCmd::Check { .. } => {} // answered above, without opening the store
    }
    Ok(())
}

/// `--since`: Unix seconds, `YYYY-MM-DD` (UTC midnight), or a duration ago (`24h`).
fn parse_since(s: &str) -> Result<i64, Failure> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let parts: Vec<&str> = s.split('-').collect();
    if let [y, m, d] = parts[..] {
        if let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i64>(), m.parse::<u32>(), d.parse::<u32>()) {
            if (1..=12).contains(&m) && (1..=31).contains(&d) {
                return Ok(days_from_civil(y, m, d) * 86_400);
            }
        }
    }
    match parse_duration("--since", s) {
        Ok(ago) => Ok(unix_now() as i64 - ago as i64),
        Err(_) => Err(Failure::Usage(format!(
            "--since: {s:?} is not Unix seconds, YYYY-MM-DD or a duration ago (24h)"
        ))),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn usage(
    dir: &std::path::Path,
    config: Option<&std::path::Path>,
    key: Option<&str>,
    since: Option<&str>,
) -> Result<(), Failure> {
    let since = since.map(parse_since).transpose()?;
    let state = match config {
        Some(p) => config::state(&config::load(p)?)?,
        None => None,
    };
    if let Some(cfg) = state {
        let shared = tollgate_state::Shared::open(&cfg.url, cfg.timeout, cfg.ca_pem.as_deref())
            .map_err(|e| Failure::Usage(e.to_string()))?;
        let totals = tollgate_state::fleet_usage(&shared, key, since)
            .map_err(|e| Failure::Other(format!("{e} (cannot read the fleet's usage)")))?;
        print!("{}", tollgate_trunk::format_usage(&totals));
        return Ok(());
    }
    let store = tollgate_trunk::FileCdrStore::open_read_only(dir)
        .map_err(|e| Failure::Other(format!("CDR store in {}: {e}", dir.display())))?;
    let totals = store
        .totals(key, since)
        .map_err(|e| Failure::Other(format!("CDR store in {}: {e}", dir.display())))?;
    print!("{}", tollgate_trunk::format_usage(&totals));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn mint(
    key: &str,
    to: &str,
    from: &str,
    ttl: &str,
    model: Option<String>,
    webhook: Option<String>,
    record: Option<bool>,
    max_duration: Option<u64>,
) -> Result<(), Failure> {
    let key = ApiKey::parse(key.trim()).map_err(|e| Failure::Usage(format!("--key: {e}")))?;
    let ttl = parse_duration("--ttl", ttl)?;
    if ttl == 0 || ttl > 3600 {
        return Err(Failure::Usage("--ttl: must be between 1s and 1h".into()));
    }
    let to_n = tollgate_keys::number::normalize(to);
    let from_n = tollgate_keys::number::normalize(from);
    if to_n.is_empty() {
        return Err(Failure::Usage("--to: empty destination".into()));
    }
    if from_n.is_empty() {
        return Err(Failure::Usage("--from: empty caller".into()));
    }
    let now = unix_now() as i64;
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| Failure::Other("no system randomness".into()))?;
    let claims = Claims {
        iat: now,
        exp: now + ttl as i64,
        jti: hex::encode(jti),
        to: to_n,
        from: from_n,
        model,
        webhook,
        record,
        max_duration,
    };
    println!("{}", tollgate_keys::jwt::mint(&key, &claims));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_python_calendar_timegm() {
        // python3 -c "import calendar; print(calendar.timegm((2026,11,27,0,0,0))//86400)"
        assert_eq!(days_from_civil(2026, 11, 27), 20_784);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(parse_since("2026-11-27").ok(), Some(20_784 * 86_400));
        assert!(matches!(parse_since("yesterday"), Err(Failure::Usage(_))));
    }
}
