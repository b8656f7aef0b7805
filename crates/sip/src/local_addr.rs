//! The edge's own address as it names itself in a message (Via sent-by,
//! Contact, leg B's From; RFC 3261 §18.2.1, §8.1.1.8): never a wildcard.
//!
//! - `[sip] advertise` set (an edge behind 1:1 NAT): that address, with the
//!   port the transport listens on.
//! - Listening on a specific address: that address.
//! - Listening on `0.0.0.0` / `::`: the source address the kernel picks for
//!   the route to the peer ([`SourceRoute`]; on loopback 127.0.0.1), which
//!   for a request that came in is the address it arrived on.
//!
//! The choice is pure; the route lookup is the caller's (the binary hands
//! the core a [`SourceRoute`] that asks the kernel), so the core stays
//! sans-IO and its tests use a fixed table.

use std::net::{IpAddr, SocketAddr};

/// The source address the host uses toward a peer.
pub trait SourceRoute: Send + Sync {
    /// `None` when there is no route (the caller falls back to loopback).
    fn source_ip(&self, peer: IpAddr) -> Option<IpAddr>;
}

/// No route lookups: a wildcard bind names the loopback address of its
/// family (the in-memory tests' default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRoute;

impl SourceRoute for NoRoute {
    fn source_ip(&self, _: IpAddr) -> Option<IpAddr> {
        None
    }
}

/// The address to name toward `peer` for a transport bound to `bound`.
pub fn own_address(
    bound: SocketAddr,
    advertise: Option<IpAddr>,
    peer: IpAddr,
    route: &dyn SourceRoute,
) -> SocketAddr {
    let ip = match advertise {
        Some(ip) => ip,
        None if !bound.ip().is_unspecified() => bound.ip(),
        None => route
            .source_ip(peer)
            .filter(|ip| !ip.is_unspecified())
            .unwrap_or(match bound {
                SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            }),
    };
    SocketAddr::new(ip, bound.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Table;
    impl SourceRoute for Table {
        fn source_ip(&self, peer: IpAddr) -> Option<IpAddr> {
            match peer.to_string().as_str() {
                "192.0.2.10" => Some("198.51.100.1".parse().unwrap()),
                "127.0.0.2" => Some("127.0.0.1".parse().unwrap()),
                _ => None,
            }
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_wildcard_bind_names_the_route_source_never_itself() {
        let any: SocketAddr = "0.0.0.0:5060".parse().unwrap();
        assert_eq!(
            own_address(any, None, ip("192.0.2.10"), &Table),
            "198.51.100.1:5060".parse().unwrap()
        );
        assert_eq!(
            own_address(any, None, ip("127.0.0.2"), &Table),
            "127.0.0.1:5060".parse().unwrap()
        );
        // No route: loopback of the family, still not the wildcard.
        assert_eq!(
            own_address(any, None, ip("203.0.113.9"), &Table),
            "127.0.0.1:5060".parse().unwrap()
        );
        let any6: SocketAddr = "[::]:5060".parse().unwrap();
        assert_eq!(
            own_address(any6, None, ip("2001:db8::1"), &NoRoute),
            "[::1]:5060".parse().unwrap()
        );
    }

    #[test]
    fn advertise_wins_and_a_specific_bind_names_itself() {
        let any: SocketAddr = "0.0.0.0:5070".parse().unwrap();
        let nat = Some(ip("203.0.113.7"));
        assert_eq!(
            own_address(any, nat, ip("192.0.2.10"), &Table),
            "203.0.113.7:5070".parse().unwrap()
        );
        let bound: SocketAddr = "10.1.2.3:5060".parse().unwrap();
        assert_eq!(own_address(bound, None, ip("192.0.2.10"), &Table), bound);
        assert_eq!(
            own_address(bound, nat, ip("192.0.2.10"), &Table).ip(),
            ip("203.0.113.7")
        );
    }
}
