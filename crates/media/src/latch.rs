//! Symmetric RTP with latching (SPEC §5; the "comedia" model of RFC 4961
//! and of rtpengine/Kamailio nathelper), hardened against RTP bleed
//! (CVE-2017-14114, CVE-2025-53399): which sources one socket of a leg
//! accepts, and where the edge sends that leg's media.
//!
//! The rules, for RTP and RTCP (each socket of a leg has its own [`Latch`]),
//! plain and SRTP alike:
//! - Packets from the address (IP and port) the leg's SDP named are always
//!   that leg's.
//! - A leg is **behind NAT** when its SDP names no address (`0.0.0.0`, port
//!   0), or names one that differs from the IP its signaling came from and is
//!   private, shared, link-local, unspecified or loopback (RFC 1918,
//!   100.64/10, 169.254/16, 0.0.0.0, 127/8, fc00::/7, fe80::/10, ::1): an
//!   address the edge cannot or must not reach. Only such a leg learns: from
//!   the signaling IP (any port: that is the NAT), while nothing has come
//!   from the SDP address yet, within [`LEARN_WINDOW`] of the relay starting,
//!   once; and never from a packet that failed SRTP authentication (the
//!   relay authenticates first and [`Latch::confirm`]s after).
//! - Safety rule (our design decision): the edge sends a leg behind NAT
//!   nothing until it has latched to a packet from the signaling IP, so it
//!   never sprays a caller's private address (nor its own loopback
//!   services). This is what rtpengine/Kamailio nathelper users expect.
//! - Every other leg is strict: it is sent to, and accepted from, its SDP
//!   address only. A packet from another port on the same host, or from
//!   another host, is a stranger at any time: before, during and after the
//!   call's own streams. Strangers get no packet from the edge and have none
//!   of theirs relayed (the relay drops them before authentication and
//!   counts them, `tollgate_media_dropped_total{reason="source"}`).
//!
//! Loopback counts as "must not reach" (an addition to the list above that
//! SPEC §5 implies): a remote caller whose SDP names 127.0.0.1 would
//! otherwise make the edge send RTP to services on its own host.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long after the relay starts a leg behind NAT may latch onto the
/// address its packets come from.
pub const LEARN_WINDOW: Duration = Duration::from_secs(5);

/// Whether `ip` is an address the edge must not send a leg's media to on the
/// SDP's word alone (see the module doc).
pub fn is_unroutable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_loopback()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10, RFC 6598
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            v6.is_unspecified()
                || v6.is_loopback()
                || (s & 0xfe00) == 0xfc00 // fc00::/7, RFC 4193
                || (s & 0xffc0) == 0xfe80 // fe80::/10
        }
    }
}

/// What the latch has seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Nothing accepted yet.
    Nothing,
    /// A packet from the SDP address: no learning from now on.
    Named,
    /// Latched to a learned address (a leg behind NAT).
    Learned(SocketAddr),
}

/// The decision for one packet (see [`Latch::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The leg's own packet: relay it.
    Accept,
    /// The leg's own packet, and from now on the leg's address: relay it.
    Latch,
    /// A stranger's packet, or one that failed authentication: drop it.
    Drop,
}

/// Whom one socket of a leg accepts, and where the edge sends to it.
#[derive(Debug, Clone)]
pub struct Latch {
    named: Option<SocketAddr>,
    signaling: Option<IpAddr>,
    behind_nat: bool,
    seen: Seen,
    learn_until: Instant,
}

impl Latch {
    /// A strict latch: `named` (the SDP's address, None for 0.0.0.0 / port
    /// 0) only, nothing learned (no signaling IP known).
    pub fn new(named: Option<SocketAddr>, started: Instant) -> Latch {
        Latch::for_leg(named, None, started)
    }

    /// The latch of a leg whose SDP named `named` (None for 0.0.0.0 / port
    /// 0) and whose signaling (the INVITE, response or ACK that carried that
    /// SDP) came from `signaling`.
    pub fn for_leg(
        named: Option<SocketAddr>,
        signaling: Option<IpAddr>,
        started: Instant,
    ) -> Latch {
        let canon = |ip: IpAddr| ip.to_canonical();
        let behind_nat = match named {
            None => true,
            Some(n) => {
                signaling.is_some_and(|s| canon(s) != canon(n.ip()) && is_unroutable(n.ip()))
            }
        };
        Latch {
            named,
            signaling: signaling.map(canon),
            behind_nat,
            seen: Seen::Nothing,
            learn_until: started + LEARN_WINDOW,
        }
    }

    /// Whether the leg is behind NAT (it learns, and is sent nothing until
    /// it has).
    pub fn behind_nat(&self) -> bool {
        self.behind_nat
    }

    fn may_learn(&self, src: SocketAddr, now: Instant) -> bool {
        self.behind_nat
            && self.seen == Seen::Nothing
            && now < self.learn_until
            && self.signaling == Some(src.ip().to_canonical())
    }

    /// Whether a packet from `src` may be processed at all (authenticated,
    /// for an SRTP leg). A stranger's packet is dropped without more ado.
    pub fn admits(&self, src: SocketAddr, now: Instant) -> bool {
        Some(src) == self.named
            || matches!(self.seen, Seen::Learned(a) if a == src)
            || self.may_learn(src, now)
    }

    /// After the packet from `src` was admitted and accepted (authenticated
    /// for SRTP): latch onto it where the rules say so. Returns true when it
    /// latched onto an address that the SDP did not name.
    pub fn confirm(&mut self, src: SocketAddr, now: Instant) -> bool {
        if Some(src) == self.named {
            if self.seen == Seen::Nothing {
                self.seen = Seen::Named;
            }
            return false;
        }
        if self.may_learn(src, now) {
            self.seen = Seen::Learned(src);
            return true;
        }
        false
    }

    /// The whole decision for one packet from `src` whose SRTP
    /// authentication gave `auth_ok` (true for plain RTP): what the relay
    /// does with [`Latch::admits`], the transform and [`Latch::confirm`].
    pub fn decide(&mut self, src: SocketAddr, now: Instant, auth_ok: bool) -> Verdict {
        if !self.admits(src, now) || !auth_ok {
            Verdict::Drop
        } else if self.confirm(src, now) {
            Verdict::Latch
        } else {
            Verdict::Accept
        }
    }

    /// Where to send this leg's media: its SDP address; for a leg behind NAT
    /// the address it latched to, and nothing before it has.
    pub fn target(&self) -> Option<SocketAddr> {
        match (self.behind_nat, self.seen) {
            (false, _) => self.named,
            (true, Seen::Learned(a)) => Some(a),
            (true, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const T: Duration = Duration::from_millis(1);

    #[test]
    fn unroutable_addresses() {
        for a in [
            "10.0.0.7",
            "172.16.1.1",
            "172.31.255.255",
            "192.168.1.20",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.3.4",
            "0.0.0.0",
            "127.0.0.9",
            "fc00::1",
            "fd12:3456::9",
            "fe80::1",
            "febf::1",
            "::",
            "::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(is_unroutable(a.parse().unwrap()), "{a}");
        }
        for a in [
            "198.51.100.9",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "8.8.8.8",
            "2001:db8::7",
            "fec0::1",
            "::ffff:198.51.100.9",
        ] {
            assert!(!is_unroutable(a.parse().unwrap()), "{a}");
        }
    }

    /// The RTP-bleed case: a leg whose SDP names its signaling host (no NAT)
    /// takes nothing from another port of that host, nor from another host,
    /// before, during or after its own stream, and is always sent to its SDP
    /// address.
    #[test]
    fn a_public_leg_is_strict_before_during_and_after() {
        let t0 = Instant::now();
        let named = addr("198.51.100.9:4000");
        let mut l = Latch::for_leg(Some(named), ip("198.51.100.9"), t0);
        assert!(!l.behind_nat());
        assert_eq!(l.target(), Some(named), "sent to its SDP address at once");
        let same_host = addr("198.51.100.9:4002");
        let other_host = addr("203.0.113.66:4000");
        // Before its own stream: even an authenticated packet is a stranger's.
        assert_eq!(l.decide(same_host, t0, true), Verdict::Drop);
        assert_eq!(l.decide(other_host, t0, true), Verdict::Drop);
        assert!(!l.admits(same_host, t0), "dropped before authentication");
        assert_eq!(l.target(), Some(named));
        // During.
        assert_eq!(l.decide(named, t0 + T, true), Verdict::Accept);
        assert_eq!(l.decide(same_host, t0 + T, true), Verdict::Drop);
        assert_eq!(l.decide(other_host, t0 + T, true), Verdict::Drop);
        // After (the caller stopped; past the window too).
        let later = t0 + LEARN_WINDOW * 2;
        assert_eq!(l.decide(same_host, later, true), Verdict::Drop);
        assert_eq!(l.decide(other_host, later, true), Verdict::Drop);
        assert_eq!(l.decide(named, later, true), Verdict::Accept);
        assert_eq!(l.target(), Some(named));
        // Its own packet with a bad tag is dropped, and changes nothing.
        assert_eq!(l.decide(named, later, false), Verdict::Drop);
    }

    /// A public SDP address that is not the signaling IP (a separate media
    /// host): strict too, the signaling host's packets included.
    #[test]
    fn a_public_media_host_apart_from_signaling_is_strict() {
        let t0 = Instant::now();
        let named = addr("198.51.100.20:4000");
        let mut l = Latch::for_leg(Some(named), ip("198.51.100.9"), t0);
        assert!(!l.behind_nat());
        assert_eq!(l.decide(addr("198.51.100.9:4000"), t0, true), Verdict::Drop);
        assert_eq!(l.decide(named, t0, true), Verdict::Accept);
        assert_eq!(l.target(), Some(named));
    }

    /// The NAT case, at unit level only: SDP 10.0.0.7, signaling from
    /// 198.51.100.9. Nothing is sent until a packet from the signaling IP
    /// latched the leg; a bad tag never latches; strangers never do; the
    /// latch is taken once.
    #[test]
    fn a_private_sdp_address_is_behind_nat_and_learns_from_the_signaling_ip_only() {
        let t0 = Instant::now();
        let named = addr("10.0.0.7:4000");
        let mut l = Latch::for_leg(Some(named), ip("198.51.100.9"), t0);
        assert!(l.behind_nat());
        assert_eq!(l.target(), None, "never sprays the private address");
        // Another host may not latch, even authenticated.
        let other_host = addr("203.0.113.66:61000");
        assert_eq!(l.decide(other_host, t0, true), Verdict::Drop);
        // The signaling IP with a bad tag: admitted for authentication, but
        // it fails, so no latch.
        let stranger_same_ip = addr("198.51.100.9:62000");
        assert!(l.admits(stranger_same_ip, t0));
        assert_eq!(l.decide(stranger_same_ip, t0, false), Verdict::Drop);
        assert_eq!(l.target(), None);
        // The caller's authenticated packet through its NAT latches.
        let nat = addr("198.51.100.9:61000");
        assert_eq!(l.decide(nat, t0 + T, true), Verdict::Latch);
        assert_eq!(l.target(), Some(nat));
        assert_eq!(l.decide(nat, t0 + T, true), Verdict::Accept);
        // Then another port of the same host is a stranger, authenticated
        // or not, and so is everyone else.
        assert_eq!(l.decide(stranger_same_ip, t0 + T, true), Verdict::Drop);
        assert_eq!(l.decide(other_host, t0 + T, true), Verdict::Drop);
        assert_eq!(l.target(), Some(nat));
        // The SDP address is still the leg's, but never a destination.
        assert_eq!(l.decide(named, t0 + T, true), Verdict::Accept);
        assert_eq!(l.target(), Some(nat));
    }

    #[test]
    fn nat_learning_ends_with_the_window_or_a_packet_from_the_sdp_address() {
        let t0 = Instant::now();
        let named = addr("192.168.1.20:4000");
        let sig = ip("198.51.100.9");
        let nat = addr("198.51.100.9:61000");
        // Past the window: nothing learned, nothing sent.
        let mut l = Latch::for_leg(Some(named), sig, t0);
        assert_eq!(l.decide(nat, t0 + LEARN_WINDOW, true), Verdict::Drop);
        assert_eq!(l.target(), None);
        // Something came from the SDP address first: no learning after.
        let mut l = Latch::for_leg(Some(named), sig, t0);
        assert_eq!(l.decide(named, t0, true), Verdict::Accept);
        assert_eq!(l.decide(nat, t0 + T, true), Verdict::Drop);
        assert_eq!(l.target(), None, "a private address is never a target");
    }

    /// `c=IN IP4 0.0.0.0` (or port 0): no address, so the leg learns from
    /// its signaling IP like a NATed one, and gets nothing before.
    #[test]
    fn no_sdp_address_learns_from_the_signaling_ip() {
        let t0 = Instant::now();
        let mut l = Latch::for_leg(None, ip("127.0.0.1"), t0);
        assert!(l.behind_nat());
        assert_eq!(l.target(), None);
        assert_eq!(l.decide(addr("127.0.0.3:5000"), t0, true), Verdict::Drop);
        assert_eq!(l.decide(addr("127.0.0.1:5000"), t0, true), Verdict::Latch);
        assert_eq!(l.target(), Some(addr("127.0.0.1:5000")));
        // Without a known signaling IP, nothing is ever learned.
        let mut l = Latch::new(None, t0);
        assert_eq!(l.decide(addr("127.0.0.1:5000"), t0, true), Verdict::Drop);
        assert_eq!(l.target(), None);
    }

    /// Loopback in the SDP of a leg signaling from elsewhere is behind NAT
    /// (the edge's own services are never sprayed); the same loopback
    /// address as the signaling IP is a plain local leg.
    #[test]
    fn loopback_sdp_address() {
        let t0 = Instant::now();
        let named = addr("127.0.0.1:4000");
        let l = Latch::for_leg(Some(named), ip("198.51.100.9"), t0);
        assert!(l.behind_nat());
        assert_eq!(l.target(), None);
        let mut l = Latch::for_leg(Some(named), ip("127.0.0.1"), t0);
        assert!(!l.behind_nat());
        assert_eq!(l.target(), Some(named));
        assert_eq!(l.decide(addr("127.0.0.1:4002"), t0, true), Verdict::Drop);
        // v4-mapped signaling compares as v4.
        let l = Latch::for_leg(Some(named), ip("::ffff:127.0.0.1"), t0);
        assert!(!l.behind_nat());
    }
}
