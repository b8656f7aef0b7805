//! The per-call relay: two legs, each a pair of UDP sockets on the media IP;
//! what leg A's peer sends goes, transformed (RTP->SRTP, SRTP->RTP, SRTP->SRTP
//! with new keys, or as is), to leg B's peer, and the reverse.
//!
//! The packet path ([`Relay::on_packet`]) is sans-IO: bytes, source and `now`
//! in, an action out. The tokio driver ([`run`]) is one task per call that
//! waits on the four sockets and drains the one that is readable. On Linux
//! it drains with `recvmmsg` (up to 32 datagrams per system call, into
//! buffers preallocated once per worker thread) and sends what goes on with
//! one UDP GSO `sendmsg` when the batch is same-size packets to one peer,
//! else with `sendmmsg`; elsewhere (or if the kernel says ENOSYS) with
//! `try_recv_buf_from`/a plain `sendto` into one reused `BytesMut`
//! ([`IoMode::Single`]). Either way no allocation per packet, and the shared
//! metrics are added to once per burst.
//!
//! Latching (SPEC §5, [`crate::latch`]): every datagram's source is checked
//! against its socket's [`Latch`] before anything else is done with it (a
//! stranger's packet is never authenticated, never relayed); an SRTP packet
//! latches only after it authenticated; and what goes to a leg goes to its
//! latch's target only: none yet for a leg behind NAT that has not latched,
//! and the packet is dropped (`reason="unlatched"`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metrics::Counter;
use tokio::net::UdpSocket;

pub use crate::latch::{Latch, LEARN_WINDOW};
use crate::srtp::{SrtpError, SrtpTransform};

/// Receive buffer size; larger datagrams are dropped.
pub(crate) const BUF_SIZE: usize = 2048;
/// Largest packet we relay (room left for the SRTP tag and SRTCP index).
const MAX_PACKET: usize = BUF_SIZE - 64;

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    AtoB = 0,
    BtoA = 1,
}

impl Way {
    /// The socket a packet going this way arrives on (RTP or RTCP), and the
    /// leg it leaves by.
    pub(crate) fn sockets(self, socks: &[Sockets; 2], rtcp: bool) -> (&UdpSocket, &Sockets) {
        let (inbound, outbound) = match self {
            Way::AtoB => (&socks[0], &socks[1]),
            Way::BtoA => (&socks[1], &socks[0]),
        };
        (if rtcp { &inbound.rtcp } else { &inbound.rtp }, outbound)
    }
}

/// The `transform` label of the packet and byte counters: what the relay
/// did to a packet's protection on its way through (SRTP in, SRTP out).
const TRANSFORMS: [&str; 4] = ["none", "encrypt", "decrypt", "reencrypt"];

/// Index into [`TRANSFORMS`].
fn transform(decrypts: bool, encrypts: bool) -> usize {
    usize::from(decrypts) << 1 | usize::from(encrypts)
}

/// Relayed packets (or bytes) by [way][rtp, rtcp][transform].
type ByKind<T> = [[[T; 4]; 2]; 2];

/// Cached metric handles (looked up once per process, not per packet).
pub(crate) struct Metrics {
    packets: ByKind<Counter>,
    bytes: ByKind<Counter>,
    auth_failures: Counter,
    dropped_source: Counter,
    dropped_replay: Counter,
    pub(crate) dropped_malformed: Counter,
    pub(crate) dropped_send: Counter,
    dropped_unlatched: Counter,
    latched_late: Counter,
}

pub(crate) fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let by_kind = |name: &'static str| -> ByKind<Counter> {
            std::array::from_fn(|way| {
                std::array::from_fn(|proto| {
                    std::array::from_fn(|t| {
                        metrics::counter!(
                            name,
                            "direction" => ["a_to_b", "b_to_a"][way],
                            "proto" => ["rtp", "rtcp"][proto],
                            "transform" => TRANSFORMS[t]
                        )
                    })
                })
            })
        };
        let dropped = |reason: &'static str| metrics::counter!("tollgate_media_dropped_total", "reason" => reason);
        Metrics {
            packets: by_kind("tollgate_media_packets_total"),
            bytes: by_kind("tollgate_media_bytes_total"),
            auth_failures: metrics::counter!("tollgate_srtp_auth_failures_total"),
            dropped_source: dropped("source"),
            dropped_replay: dropped("replay"),
            dropped_malformed: dropped("malformed"),
            dropped_send: dropped("send"),
            dropped_unlatched: dropped("unlatched"),
            latched_late: metrics::counter!("tollgate_media_latched_late_total"),
        }
    })
}

/// Per-call counters, readable while the call runs (and for the CDR).
#[derive(Debug, Default)]
pub struct CallStats {
    /// Packets relayed A->B and B->A.
    pub relayed: [AtomicU64; 2],
    /// Packets that failed SRTP/SRTCP authentication.
    pub auth_failures: AtomicU64,
    /// Replayed SRTP/SRTCP packets.
    pub replayed: AtomicU64,
    /// Packets from an address the leg may not take.
    pub strangers: AtomicU64,
    /// Packets that were not RTP/RTCP, or too large.
    pub malformed: AtomicU64,
    /// Latches onto an address the SDP did not name.
    pub latched_late: AtomicU64,
    /// When the last packet was accepted, in ms since `epoch` (+1; 0 = never).
    last_packet_ms: AtomicU64,
    epoch: OnceLock<Instant>,
}

/// A snapshot of [`CallStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub relayed_a_to_b: u64,
    pub relayed_b_to_a: u64,
    pub auth_failures: u64,
    pub replayed: u64,
    pub strangers: u64,
    pub malformed: u64,
    pub latched_late: u64,
}

impl CallStats {
    pub(crate) fn new(epoch: Instant) -> CallStats {
        let s = CallStats::default();
        let _ = s.epoch.set(epoch);
        s
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            relayed_a_to_b: l(&self.relayed[0]),
            relayed_b_to_a: l(&self.relayed[1]),
            auth_failures: l(&self.auth_failures),
            replayed: l(&self.replayed),
            strangers: l(&self.strangers),
            malformed: l(&self.malformed),
            latched_late: l(&self.latched_late),
        }
    }

    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    pub(crate) fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch()).as_millis() as u64 + 1;
        self.last_packet_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When media was last accepted from either side (the relay start if never).
    pub fn last_packet(&self) -> Instant {
        match self.last_packet_ms.load(Ordering::Relaxed) {
            0 => self.epoch(),
            ms => self.epoch() + Duration::from_millis(ms - 1),
        }
    }
}

/// One leg's relay state.
pub struct Side {
    pub rtp_latch: Latch,
    pub rtcp_latch: Latch,
    /// RTCP shares the RTP port (RFC 5761) toward this peer.
    pub mux: bool,
    /// Unprotects what this leg's peer sends (None: plain RTP).
    pub rx: Option<Box<dyn SrtpTransform>>,
    /// Protects what we send this leg's peer (None: plain RTP).
    pub tx: Option<Box<dyn SrtpTransform>>,
}

/// What to do with a packet after [`Relay::on_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the (transformed) buffer to `dst` from the other leg's RTP
    /// (`rtcp == false`) or RTCP socket.
    Send {
        dst: SocketAddr,
        rtcp_socket: bool,
    },
    Drop,
}

/// Both legs of a call (the sans-IO part of the relay).
pub struct Relay {
    pub sides: [Side; 2],
    pub stats: Arc<CallStats>,
    /// Raised when the relay is replaced (a re-offer was answered) or its
    /// call ends; from then on it forwards nothing.
    pub stop: StopSignal,
    /// Where a recorded call's plaintext audio goes (SPEC §10).
    pub tap: Option<crate::record::Tap>,
}

/// Tells a relay to stop forwarding, at once.
///
/// Aborting the relay's task is not enough on its own: a task that is in
/// the middle of a poll when it is aborted (its worker thread preempted, on
/// a loaded machine) goes on until that poll returns, and would forward
/// what arrived meanwhile on a path that signaling already closed. The
/// relay checks this flag for every datagram it received, before it sends.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// RFC 5761 §4: RTCP packet types 192..=223 on a muxed port.
fn looks_like_rtcp(buf: &[u8]) -> bool {
    buf.len() >= 2 && (192..=223).contains(&buf[1])
}

/// Global counters accumulated over a burst of packets and added to the
/// shared metrics once per burst (`increment(n)`), not once per packet: the
/// Prometheus counters are atomics shared by every worker thread.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    packets: ByKind<u64>,
    bytes: ByKind<u64>,
    touched: Option<Instant>,
}

impl Tally {
    /// Adds what was counted to the metrics and the call's stats, and resets.
    pub(crate) fn flush(&mut self, stats: &CallStats) {
        let m = metrics();
        for way in 0..2 {
            let mut relayed = 0;
            for proto in 0..2 {
                for t in 0..TRANSFORMS.len() {
                    let n = self.packets[way][proto][t];
                    if n != 0 {
                        m.packets[way][proto][t].increment(n);
                        m.bytes[way][proto][t].increment(self.bytes[way][proto][t]);
                        relayed += n;
                    }
                }
            }
            if relayed != 0 {
                stats.relayed[way].fetch_add(relayed, Ordering::Relaxed);
            }
        }
        if let Some(now) = self.touched {
            stats.touch(now);
        }
        *self = Tally::default();
    }
}

impl Relay {
    /// Handles a datagram that arrived from `src` on leg `from`'s RTP or RTCP
    /// socket; transforms `buf` in place for the other leg.
    pub fn on_packet(
        &mut self,
        from: Way,
        on_rtcp_socket: bool,
        src: SocketAddr,
        buf: &mut BytesMut,
        now: Instant,
    ) -> Action {
        let mut tally = Tally::default();
        let action = self.process(from, on_rtcp_socket, src, buf, now, &mut tally);
        tally.flush(&self.stats);
        action
    }

    /// [`Relay::on_packet`] with the relayed-packet counters (and the
    /// last-packet time) left in `tally` for the caller to flush once per
    /// burst. Drops are counted at once (they are rare).
    pub(crate) fn process(
        &mut self,
        from: Way,
        on_rtcp_socket: bool,
        src: SocketAddr,
        buf: &mut BytesMut,
        now: Instant,
        tally: &mut Tally,
    ) -> Action {
        if self.stop.is_stopped() {
            return Action::Drop;
        }
        let m = metrics();
        let rtcp = on_rtcp_socket || looks_like_rtcp(buf);
        if buf.len() > MAX_PACKET || buf.len() < if rtcp { 8 } else { 12 } || buf[0] >> 6 != 2 {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            m.dropped_malformed.increment(1);
            return Action::Drop;
        }
        let (a, b) = self.sides.split_at_mut(1);
        let (inbound, outbound) = match from {
            Way::AtoB => (&mut a[0], &mut b[0]),
            Way::BtoA => (&mut b[0], &mut a[0]),
        };
        let latch = if on_rtcp_socket {
            &mut inbound.rtcp_latch
        } else {
            &mut inbound.rtp_latch
        };
        if !latch.admits(src, now) {
            self.stats.strangers.fetch_add(1, Ordering::Relaxed);
            m.dropped_source.increment(1);
            return Action::Drop;
        }
        if let Some(rx) = &mut inbound.rx {
            let r = if rtcp {
                rx.unprotect_rtcp(buf)
            } else {
                rx.unprotect_rtp(buf)
            };
            if let Err(e) = r {
                match e {
                    SrtpError::AuthFailed => {
                        self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                        m.auth_failures.increment(1);
                    }
                    SrtpError::Replayed => {
                        self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                        m.dropped_replay.increment(1);
                    }
                    _ => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        m.dropped_malformed.increment(1);
                    }
                }
                return Action::Drop;
            }
        }
        if latch.confirm(src, now) {
            self.stats.latched_late.fetch_add(1, Ordering::Relaxed);
            m.latched_late.increment(1);
        }
        tally.touched = Some(now);
        if let (Some(tap), false) = (&self.tap, rtcp) {
            tap.rtp(from as u8, buf, now);
        }
        if let Some(tx) = &mut outbound.tx {
            let r = if rtcp {
                tx.protect_rtcp(buf)
            } else {
                tx.protect_rtp(buf)
            };
            if r.is_err() {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                m.dropped_malformed.increment(1);
                return Action::Drop;
            }
        }
        let (dst, rtcp_socket) = if rtcp && !outbound.mux {
            (outbound.rtcp_latch.target(), true)
        } else {
            (outbound.rtp_latch.target(), false)
        };
        let Some(dst) = dst else {
            // A leg behind NAT that has not latched yet: sent nothing.
            m.dropped_unlatched.increment(1);
            return Action::Drop;
        };
        let (way, t) = (
            from as usize,
            transform(inbound.rx.is_some(), outbound.tx.is_some()),
        );
        tally.packets[way][rtcp as usize][t] += 1;
        tally.bytes[way][rtcp as usize][t] += buf.len() as u64;
        Action::Send { dst, rtcp_socket }
    }
}

/// A leg's two sockets, and the ports they hold: the pair goes back to the
/// pool only after these sockets are closed (fields drop in order), keeping
/// a duplicate of each for the next call (see [`crate::ports`]).
pub struct Sockets {
    pub rtp: UdpSocket,
    pub rtcp: UdpSocket,
    pub ports: Option<crate::ports::PortPair>,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        use std::os::fd::AsFd;
        let Some(pair) = self.ports.as_mut() else {
            return;
        };
        // dup(2): the tokio sockets deregister from the reactor and close
        // their descriptors as the fields drop; the duplicates keep the
        // ports bound, without a new socket(2) and bind(2) per call.
        let dup = |s: &UdpSocket| {
            s.as_fd()
                .try_clone_to_owned()
                .map(std::net::UdpSocket::from)
        };
        if let (Ok(rtp), Ok(rtcp)) = (dup(&self.rtp), dup(&self.rtcp)) {
            pair.recycle(rtp, rtcp);
        }
    }
}

/// How the relay task moves datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// Batched `recvmmsg`/`sendmmsg` where the OS has them (Linux), else
    /// one datagram per system call.
    Auto,
    /// One `recvfrom`/`sendto` per datagram (the portable path).
    Single,
}

/// Whether [`IoMode::Auto`] batches on this system (false off Linux, or once
/// the kernel refused `recvmmsg`/`sendmmsg` with ENOSYS).
pub fn batched_io_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        crate::batch::available()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Drains one socket: every datagram waiting is handled and sent on.
fn drain(
    relay: &mut Relay,
    socks: &[Sockets; 2],
    from: Way,
    rtcp: bool,
    mode: IoMode,
    buf: &mut BytesMut,
) {
    #[cfg(target_os = "linux")]
    if mode == IoMode::Auto
        && crate::batch::available()
        && crate::batch::drain(relay, socks, from, rtcp)
    {
        return;
    }
    let _ = mode;
    drain_single(relay, socks, from, rtcp, buf);
}

/// The portable path: one `try_recv_buf_from` and one `sendto` per
/// datagram, into one reused buffer.
fn drain_single(
    relay: &mut Relay,
    socks: &[Sockets; 2],
    from: Way,
    rtcp: bool,
    buf: &mut BytesMut,
) {
    let (sock, outbound) = from.sockets(socks, rtcp);
    // One clock read per burst, not per packet.
    let now = Instant::now();
    let mut tally = Tally::default();
    let mut errors = 0u32;
    loop {
        buf.clear();
        let src = match sock.try_recv_buf_from(buf) {
            Ok((_, src)) => src,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP port unreachable and the like surface here: keep going
            // (but not forever on an error that does not clear).
            Err(_) => {
                errors += 1;
                if errors > MAX_ERRORS {
                    break;
                }
                continue;
            }
        };
        if let Action::Send { dst, rtcp_socket } =
            relay.process(from, rtcp, src, buf, now, &mut tally)
        {
            let out = if rtcp_socket {
                &outbound.rtcp
            } else {
                &outbound.rtp
            };
            if send_now(out, buf, dst).is_err() {
                metrics().dropped_send.increment(1);
            }
        }
    }
    tally.flush(&relay.stats);
}

/// Sends one datagram now: a non-blocking `sendto` on the socket, whatever
/// tokio believes of its write readiness.
///
/// `UdpSocket::try_send_to` (and `try_io(WRITABLE)`) fail with WouldBlock
/// without trying while the reactor has not yet reported the socket
/// writable, which for a relay started by an answer is every send before
/// the reactor's next turn: the first packets, already queued on the
/// offerer's port, were lost now and then (seen on a loaded machine). The
/// relay never waits for writability (a UDP send that would block is a
/// drop), so readiness has nothing to add here.
pub(crate) fn send_now(sock: &UdpSocket, buf: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
    socket2::SockRef::from(sock).send_to(buf, &dst.into())
}

/// Consecutive receive errors (other than "would block") after which a
/// drain gives up until the next readiness event.
pub(crate) const MAX_ERRORS: u32 = 64;

/// The relay task of one call: runs until aborted or stopped ([`StopSignal`]).
pub async fn run(relay: Relay, socks: [Sockets; 2]) {
    run_with(relay, socks, IoMode::Auto).await
}

/// [`run`] with a chosen I/O path.
pub async fn run_with(mut relay: Relay, socks: [Sockets; 2], mode: IoMode) {
    let mut buf = BytesMut::with_capacity(BUF_SIZE);
    // (leg, RTCP socket) by bit of the readiness mask.
    const SOCKETS: [(Way, bool); 4] = [
        (Way::AtoB, false),
        (Way::AtoB, true),
        (Way::BtoA, false),
        (Way::BtoA, true),
    ];
    let socket = |i: usize| {
        let leg = &socks[i / 2];
        if i % 2 == 1 {
            &leg.rtcp
        } else {
            &leg.rtp
        }
    };
    loop {
        // Every socket that is readable, in one wake-up; each pending one
        // keeps this task's waker (this task is their only reader).
        let ready = std::future::poll_fn(|cx| {
            let mut ready = 0u8;
            for i in 0..SOCKETS.len() {
                match socket(i).poll_recv_ready(cx) {
                    Poll::Ready(Ok(())) => ready |= 1 << i,
                    Poll::Ready(Err(_)) => return Poll::Ready(None),
                    Poll::Pending => {}
                }
            }
            if ready == 0 {
                Poll::Pending
            } else {
                Poll::Ready(Some(ready))
            }
        })
        .await;
        let Some(ready) = ready else {
            return;
        };
        if relay.stop.is_stopped() {
            return;
        }
        for (i, &(from, rtcp)) in SOCKETS.iter().enumerate() {
            if ready & (1 << i) != 0 {
                drain(&mut relay, &socks, from, rtcp, mode, &mut buf);
            }
        }
        // Stopped while draining: what arrived meanwhile was dropped and
        // cleared the readiness, so no wake-up may come to notice the stop.
        if relay.stop.is_stopped() {
            return;
        }
        if buf.capacity() < BUF_SIZE {
            buf = BytesMut::with_capacity(BUF_SIZE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn transform_labels() {
        assert_eq!(TRANSFORMS[transform(false, false)], "none");
        assert_eq!(TRANSFORMS[transform(false, true)], "encrypt");
        assert_eq!(TRANSFORMS[transform(true, false)], "decrypt");
        assert_eq!(TRANSFORMS[transform(true, true)], "reencrypt");
    }

    fn side(named: &str, signaling: &str, t0: Instant) -> Side {
        let named = Some(addr(named));
        let sig = Some(signaling.parse().unwrap());
        Side {
            rtp_latch: Latch::for_leg(named, sig, t0),
            rtcp_latch: Latch::for_leg(named, sig, t0),
            mux: false,
            rx: None,
            tx: None,
        }
    }

    fn relay(a: Side, b: Side, t0: Instant) -> Relay {
        Relay {
            sides: [a, b],
            stats: Arc::new(CallStats::new(t0)),
            stop: StopSignal::default(),
            tap: None,
        }
    }

    fn packet(fill: u8) -> BytesMut {
        let mut b = BytesMut::from(&[0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7][..]);
        b.extend_from_slice(&[fill; 20]);
        b
    }

    /// RTP bleed on a plain RTP call: a stranger on the caller's host (another
    /// port) and one on another host send before the caller's stream starts,
    /// during and after it. None of their packets is relayed, and the other
    /// leg's media never goes to them.
    #[test]
    fn strangers_are_never_relayed_nor_sent_to() {
        let t0 = Instant::now();
        let mut r = relay(
            side("127.0.0.1:4000", "127.0.0.1", t0),
            side("127.0.0.1:6000", "127.0.0.1", t0),
            t0,
        );
        let (a, b) = (addr("127.0.0.1:4000"), addr("127.0.0.1:6000"));
        let strangers = [addr("127.0.0.1:4444"), addr("127.0.0.3:4000")];
        let send = |dst, rtcp_socket| Action::Send { dst, rtcp_socket };
        let run = |r: &mut Relay, from, src, t| r.on_packet(from, false, src, &mut packet(1), t);
        for (i, t) in [t0, t0 + LEARN_WINDOW / 2, t0 + LEARN_WINDOW * 2]
            .into_iter()
            .enumerate()
        {
            for s in strangers {
                assert_eq!(
                    run(&mut r, Way::AtoB, s, t),
                    Action::Drop,
                    "{s} on A, phase {i}"
                );
                assert_eq!(
                    run(&mut r, Way::BtoA, s, t),
                    Action::Drop,
                    "{s} on B, phase {i}"
                );
            }
            // B's media goes to A's SDP address, never to a stranger.
            assert_eq!(run(&mut r, Way::BtoA, b, t), send(a, false), "phase {i}");
            if i == 1 {
                // The caller's own stream, in the middle phase only.
                assert_eq!(run(&mut r, Way::AtoB, a, t), send(b, false));
            }
        }
        let st = r.stats.snapshot();
        assert_eq!((st.strangers, st.latched_late), (12, 0), "{st:?}");
        assert_eq!((st.relayed_a_to_b, st.relayed_b_to_a), (1, 3), "{st:?}");
    }

    /// A leg behind NAT gets nothing until it latched: the other leg's
    /// media is dropped (`unlatched`), not sent to the SDP's address.
    #[test]
    fn a_leg_behind_nat_is_sent_nothing_until_it_latched() {
        let t0 = Instant::now();
        let mut r = relay(
            side("10.0.0.7:4000", "198.51.100.9", t0),
            side("198.51.100.20:6000", "198.51.100.20", t0),
            t0,
        );
        let b = addr("198.51.100.20:6000");
        let nat = addr("198.51.100.9:61000");
        let mut buf = packet(2);
        assert_eq!(r.on_packet(Way::BtoA, false, b, &mut buf, t0), Action::Drop);
        let mut buf = packet(3);
        let to_b = Action::Send {
            dst: b,
            rtcp_socket: false,
        };
        assert_eq!(r.on_packet(Way::AtoB, false, nat, &mut buf, t0), to_b);
        let mut buf = packet(4);
        let to_a = Action::Send {
            dst: nat,
            rtcp_socket: false,
        };
        assert_eq!(r.on_packet(Way::BtoA, false, b, &mut buf, t0), to_a);
        assert_eq!(r.stats.snapshot().latched_late, 1);
    }
}
