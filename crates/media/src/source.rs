//! Source address selection (RFC 6724 as the kernel does it): which of the
//! host's addresses a packet toward a peer leaves from. For an edge bound to
//! a wildcard (`0.0.0.0`, `::`) this is the address to put in SDP (and, in
//! the signaling core, in Via and Contact) instead of the wildcard, which a
//! peer cannot send to.
//!
//! The kernel answers through `connect(2)` on an unbound UDP socket (no
//! packet is sent); answers are cached per peer address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Mutex;

/// Peers remembered before the cache starts over.
const CACHE_MAX: usize = 4096;

/// The kernel's source address toward `peer`, or `None` without a route.
pub fn source_ip_toward(peer: IpAddr) -> Option<IpAddr> {
    let any: SocketAddr = match peer {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any).ok()?;
    // The discard port: only the route matters, nothing is sent.
    sock.connect(SocketAddr::new(peer, 9)).ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// [`source_ip_toward`] with a cache, shared by the media engine and the
/// signaling cores.
#[derive(Debug, Default)]
pub struct SourceIps {
    cache: Mutex<HashMap<IpAddr, Option<IpAddr>>>,
}

impl SourceIps {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn toward(&self, peer: IpAddr) -> Option<IpAddr> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cache.get(&peer) {
            return *hit;
        }
        let ip = source_ip_toward(peer);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(peer, ip);
        ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_peers_are_reached_from_loopback() {
        let s = SourceIps::new();
        for peer in ["127.0.0.1", "127.0.0.2"] {
            assert_eq!(
                s.toward(peer.parse().unwrap()),
                Some(IpAddr::from([127, 0, 0, 1]))
            );
        }
        assert_eq!(s.cache.lock().unwrap().len(), 2);
    }
}
