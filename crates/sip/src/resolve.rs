//! Locating SIP servers (RFC 3263 §4): a route target named by DNS becomes
//! an ordered list of (transport, address, port) from NAPTR, then SRV, then
//! A/AAAA records, valid until the shortest of their TTLs.
//!
//! The choice among records is sans-IO ([`naptr_services`],
//! [`srv_order`]); [`Locator`] asks DNS (hickory, on tokio) and is only
//! ever awaited on the async side: the SIP shards read the last answer from
//! the target's [`Located`] and never wait for DNS.

use crate::message::SipUri;
use crate::transaction::{Peer, Transport};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Why a target could not be located. Never fatal: the target is skipped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocateError {
    #[error("no DNS record for {0}")]
    NotFound(String),
    #[error("DNS lookup of {name} failed: {detail}")]
    Lookup { name: String, detail: String },
    #[error("no DNS resolver: {0}")]
    NoResolver(String),
}

/// The addresses a named target resolved to, newest answer, shared by the
/// async refresher (writer) and the shards (readers).
#[derive(Debug, Default)]
pub struct Located {
    peers: RwLock<Vec<Peer>>,
}

impl Located {
    /// The peer to try first, if the name resolved.
    pub fn first(&self) -> Option<Peer> {
        self.peers.read().ok()?.first().cloned()
    }

    /// Replaces the answer (empty: the name does not resolve now).
    pub fn set(&self, peers: Vec<Peer>) {
        if let Ok(mut p) = self.peers.write() {
            *p = peers;
        }
    }
}

/// One usable NAPTR record (RFC 3263 §4.1): its transport and the SRV name
/// it points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaptrService {
    pub order: u16,
    pub preference: u16,
    pub transport: Transport,
    pub srv_name: String,
}

/// A NAPTR record as read: order, preference, flags, services, replacement.
pub type NaptrRecord<'a> = (u16, u16, &'a [u8], &'a [u8], String);

/// The NAPTR records a client for `uri` may follow, best first: flag `S`,
/// services we speak (`SIP+D2U`, `SIP+D2T`, `SIPS+D2T`), only `SIPS+D2T`
/// for a `sips:` URI.
pub fn naptr_services(records: &[NaptrRecord<'_>], sips: bool) -> Vec<NaptrService> {
    let mut v: Vec<NaptrService> = records
        .iter()
        .filter(|(_, _, flags, _, _)| flags.eq_ignore_ascii_case(b"s"))
        .filter_map(|(order, preference, _, service, replacement)| {
            let transport = match service.to_ascii_uppercase().as_slice() {
                b"SIPS+D2T" => Transport::Tls,
                b"SIP+D2T" if !sips => Transport::Tcp,
                b"SIP+D2U" if !sips => Transport::Udp,
                _ => return None,
            };
            Some(NaptrService {
                order: *order,
                preference: *preference,
                transport,
                srv_name: replacement.trim_end_matches('.').to_owned(),
            })
        })
        .collect();
    v.sort_by_key(|s| (s.order, s.preference));
    v
}

/// SRV records (priority, weight, port, target) in the order to try:
/// lowest priority first, heavier weight first within one (RFC 2782's
/// random weighting is left out: one edge, few targets, deterministic).
pub fn srv_order(mut records: Vec<(u16, u16, u16, String)>) -> Vec<(u16, String)> {
    records.sort_by_key(|(prio, weight, _, _)| (*prio, std::cmp::Reverse(*weight)));
    records
        .into_iter()
        .filter(|(_, _, _, t)| t != ".")
        .map(|(_, _, port, t)| (port, t.trim_end_matches('.').to_owned()))
        .collect()
}

/// The transport a URI asks for itself (`;transport=`, `sips:`), if any.
pub fn uri_transport(uri: &SipUri) -> Option<Transport> {
    match uri
        .transport
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("tls") => Some(Transport::Tls),
        Some("tcp") if uri.scheme == "sips" => Some(Transport::Tls),
        Some("tcp") => Some(Transport::Tcp),
        Some("udp") => Some(Transport::Udp),
        _ if uri.scheme == "sips" => Some(Transport::Tls),
        _ => None,
    }
}

fn srv_prefix(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "_sip._udp",
        Transport::Tcp => "_sip._tcp",
        Transport::Tls => "_sips._tcp",
    }
}

fn default_port(t: Transport) -> u16 {
    if t == Transport::Tls {
        5061
    } else {
        5060
    }
}

/// Asks DNS where a target is.
pub struct Locator {
    resolver: TokioResolver,
}

/// Fallback validity when an answer carries no usable TTL.
const MAX_VALID: Duration = Duration::from_secs(300);

impl Locator {
    /// A resolver asking `servers` (`[dns] servers`), or the system's
    /// (`/etc/resolv.conf`) when empty.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, LocateError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.ndots = 0;
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| LocateError::NoResolver(e.to_string()))?
        } else {
            let group: Vec<NameServerConfig> = servers
                .iter()
                .flat_map(|a| {
                    [
                        NameServerConfig::new(*a, Protocol::Udp),
                        NameServerConfig::new(*a, Protocol::Tcp),
                    ]
                })
                .collect();
            let cfg = ResolverConfig::from_parts(None, Vec::new(), group);
            TokioResolver::builder_with_config(cfg, TokioConnectionProvider::default())
        };
        Ok(Locator {
            resolver: builder.with_options(opts).build(),
        })
    }

    /// RFC 3263 §4 for `uri`: the peers to try, best first, and until when
    /// the answer holds.
    pub async fn locate(&self, uri: &SipUri) -> Result<(Vec<Peer>, Instant), LocateError> {
        let host = uri.host.trim_end_matches('.').to_owned();
        let sips = uri.scheme == "sips";
        let mut until = Instant::now() + MAX_VALID;
        let wanted = uri_transport(uri);
        if let Some(port) = uri.port {
            // An explicit port: A/AAAA only (§4.2).
            let t = wanted.unwrap_or(Transport::Udp);
            return self
                .addresses(&host, port, t, &mut until)
                .await
                .map(|p| (p, until));
        }
        // The (transport, SRV name) pairs to try, in order.
        let mut srvs: Vec<(Transport, String)> = Vec::new();
        if let Some(t) = wanted {
            srvs.push((t, format!("{}.{host}", srv_prefix(t))));
        } else {
            let naptr = self.naptr(&host, sips, &mut until).await?;
            if naptr.is_empty() {
                let ts: &[Transport] = if sips {
                    &[Transport::Tls]
                } else {
                    &[Transport::Udp, Transport::Tcp, Transport::Tls]
                };
                srvs.extend(
                    ts.iter()
                        .map(|t| (*t, format!("{}.{host}", srv_prefix(*t)))),
                );
            } else {
                srvs.extend(naptr.into_iter().map(|n| (n.transport, n.srv_name)));
            }
        }
        let mut peers = Vec::new();
        for (t, name) in &srvs {
            for (port, target) in self.srv(name, &mut until).await? {
                if let Ok(mut p) = self.addresses(&target, port, *t, &mut until).await {
                    peers.append(&mut p);
                }
            }
        }
        if peers.is_empty() {
            // No SRV: the host's own addresses (§4.2).
            let t = wanted.unwrap_or(if sips { Transport::Tls } else { Transport::Udp });
            peers = self
                .addresses(&host, default_port(t), t, &mut until)
                .await?;
        }
        Ok((peers, until))
    }

    async fn naptr(
        &self,
        host: &str,
        sips: bool,
        until: &mut Instant,
    ) -> Result<Vec<NaptrService>, LocateError> {
        let lookup = match self.resolver.lookup(fqdn(host), RecordType::NAPTR).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(lookup_error(host, e)),
        };
        *until = (*until).min(lookup.valid_until());
        let records: Vec<NaptrRecord<'_>> = lookup
            .iter()
            .filter_map(|r| match r {
                RData::NAPTR(n) => Some((
                    n.order(),
                    n.preference(),
                    n.flags(),
                    n.services(),
                    n.replacement().to_ascii(),
                )),
                _ => None,
            })
            .collect();
        Ok(naptr_services(&records, sips))
    }

    async fn srv(
        &self,
        name: &str,
        until: &mut Instant,
    ) -> Result<Vec<(u16, String)>, LocateError> {
        let lookup = match self.resolver.lookup(fqdn(name), RecordType::SRV).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(lookup_error(name, e)),
        };
        *until = (*until).min(lookup.valid_until());
        let records = lookup
            .iter()
            .filter_map(|r| match r {
                RData::SRV(s) => Some((s.priority(), s.weight(), s.port(), s.target().to_ascii())),
                _ => None,
            })
            .collect();
        Ok(srv_order(records))
    }

    async fn addresses(
        &self,
        host: &str,
        port: u16,
        transport: Transport,
        until: &mut Instant,
    ) -> Result<Vec<Peer>, LocateError> {
        let peer = |ip: IpAddr| Peer {
            transport,
            addr: SocketAddr::new(ip, port),
            flow: None,
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![peer(ip)]);
        }
        let ips = self.resolver.lookup_ip(fqdn(host)).await.map_err(|e| {
            if e.is_no_records_found() || e.is_nx_domain() {
                LocateError::NotFound(host.to_owned())
            } else {
                lookup_error(host, e)
            }
        })?;
        *until = (*until).min(ips.valid_until());
        let v: Vec<Peer> = ips.iter().map(peer).collect();
        if v.is_empty() {
            return Err(LocateError::NotFound(host.to_owned()));
        }
        Ok(v)
    }
}

/// Names from the configuration are absolute (no search list).
fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

fn lookup_error(name: &str, e: hickory_resolver::ResolveError) -> LocateError {
    LocateError::Lookup {
        name: name.to_owned(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naptr_records_are_filtered_by_service_and_ordered() {
        let recs: Vec<NaptrRecord<'_>> = vec![
            (20, 10, b"s", b"SIP+D2U", "_sip._udp.x.test.".into()),
            (10, 20, b"S", b"SIP+D2T", "_sip._tcp.x.test.".into()),
            (10, 10, b"s", b"SIPS+D2T", "_sips._tcp.x.test.".into()),
            (5, 10, b"u", b"E2U+sip", "!^.*$!sip:x@y!".into()),
            (5, 10, b"s", b"SIP+D2S", "_sip._sctp.x.test.".into()),
        ];
        let all = naptr_services(&recs, false);
        let ts: Vec<Transport> = all.iter().map(|n| n.transport).collect();
        assert_eq!(ts, [Transport::Tls, Transport::Tcp, Transport::Udp]);
        assert_eq!(all[0].srv_name, "_sips._tcp.x.test");
        let secure = naptr_services(&recs, true);
        assert_eq!(secure.len(), 1);
        assert_eq!(secure[0].transport, Transport::Tls);
    }

    #[test]
    fn srv_records_by_priority_then_weight() {
        let v = srv_order(vec![
            (20, 0, 5070, "c.test.".into()),
            (10, 10, 5060, "b.test.".into()),
            (10, 60, 5062, "a.test.".into()),
            (30, 0, 0, ".".into()),
        ]);
        assert_eq!(
            v,
            [
                (5062, "a.test".to_owned()),
                (5060, "b.test".to_owned()),
                (5070, "c.test".to_owned())
            ]
        );
    }

    #[test]
    fn the_uri_may_name_its_transport() {
        let t = |s: &str| uri_transport(&SipUri::parse(s).unwrap());
        assert_eq!(t("sips:agent@backend.test"), Some(Transport::Tls));
        assert_eq!(
            t("sip:agent@backend.test;transport=tls"),
            Some(Transport::Tls)
        );
        assert_eq!(
            t("sip:agent@backend.test;transport=TCP"),
            Some(Transport::Tcp)
        );
        assert_eq!(t("sip:agent@backend.test"), None);
    }
}
