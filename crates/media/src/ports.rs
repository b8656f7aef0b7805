//! The media port allocator: pairs of ports from the configured range, RTP on
//! the even port and RTCP on the odd one above it (RFC 3550 §11). A
//! [`PortPair`] returns itself to the pool when dropped, so every way a call
//! can end gives its ports back.

use std::collections::VecDeque;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Gauge;

/// At most this many released pairs keep their sockets bound for the next
/// call (8 Ki descriptors): creating, binding and closing a UDP socket costs
/// the kernel an inode and a socket allocation each time, four times per
/// anchored call, which the CPS profile showed among the edge's largest
/// costs. A pooled socket costs one `dup(2)` and a drain instead.
const WARM_CAP: usize = 4096;
/// A pooled pair is reused only after this long (unless the range has no
/// other free pair), so that late packets of the call that held it have
/// stopped. Strict latching (SPEC §5) drops packets from anyone but the new
/// call's peers in any case.
const MIN_IDLE: Duration = Duration::from_millis(500);

/// An allocated even/odd pair; released on drop (with its sockets, if the
/// holder recycled them, see [`PortPair::recycle`]).
#[derive(Debug)]
pub struct PortPair {
    rtp: u16,
    pool: Arc<Pool>,
    sockets: Option<[UdpSocket; 2]>,
}

impl PortPair {
    /// The even RTP port.
    pub fn rtp(&self) -> u16 {
        self.rtp
    }
    /// The odd RTCP port (`rtp + 1`).
    pub fn rtcp(&self) -> u16 {
        self.rtp + 1
    }
    /// The RTP and RTCP sockets an earlier call left bound to this pair,
    /// non-blocking; the caller drains what they received since.
    pub fn take_sockets(&mut self) -> Option<[UdpSocket; 2]> {
        self.sockets.take()
    }
    /// Keeps `rtp` and `rtcp` (bound to this pair's ports, non-blocking) for
    /// the next call that gets this pair.
    pub fn recycle(&mut self, rtp: UdpSocket, rtcp: UdpSocket) {
        self.sockets = Some([rtp, rtcp]);
    }
}

impl Drop for PortPair {
    fn drop(&mut self) {
        let sockets = self.sockets.take();
        // Sockets the pool has no room for close after its lock is released.
        drop(self.pool.release(self.rtp, sockets));
    }
}

#[derive(Debug)]
struct Warm {
    rtp: u16,
    since: Instant,
    sockets: [UdpSocket; 2],
}

#[derive(Debug, Default)]
struct Free {
    /// Free even ports without sockets, least recently released first (so
    /// a port just freed is reused last).
    cold: VecDeque<u16>,
    /// Free pairs whose sockets are still bound, least recently released
    /// first.
    warm: VecDeque<Warm>,
}

impl Free {
    fn len(&self) -> usize {
        self.cold.len() + self.warm.len()
    }
}

#[derive(Debug)]
struct Pool {
    free: Mutex<Free>,
    total: usize,
    in_use: Gauge,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the sockets it did not keep.
    fn release(&self, rtp: u16, sockets: Option<[UdpSocket; 2]>) -> Option<[UdpSocket; 2]> {
        let mut f = self.lock();
        let rest = match sockets {
            Some(sockets) if f.warm.len() < WARM_CAP => {
                f.warm.push_back(Warm {
                    rtp,
                    since: Instant::now(),
                    sockets,
                });
                None
            }
            other => {
                f.cold.push_back(rtp);
                other
            }
        };
        self.in_use.set((2 * (self.total - f.len())) as f64);
        rest
    }

    fn pair(self: &Arc<Self>, rtp: u16, sockets: Option<[UdpSocket; 2]>) -> PortPair {
        PortPair {
            rtp,
            pool: self.clone(),
            sockets,
        }
    }
}

/// Allocates [`PortPair`]s from an inclusive range.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    pool: Arc<Pool>,
}

impl PortAllocator {
    /// A pool over `first..=last`; odd `first` and even `last` are trimmed
    /// so every pair is (even, even + 1) inside the range.
    pub fn new(first: u16, last: u16) -> PortAllocator {
        let start = first.saturating_add(first % 2);
        let cold: VecDeque<u16> = (start..last)
            .step_by(2)
            .filter(|p| p.checked_add(1).is_some_and(|o| o <= last))
            .collect();
        let total = cold.len();
        // Both gauges from the start, so "ports near exhaustion" can be
        // computed (in_use / capacity) before the first call.
        metrics::gauge!("tollgate_media_ports_capacity").set((2 * total) as f64);
        let in_use = metrics::gauge!("tollgate_media_ports_in_use");
        in_use.set(0.0);
        PortAllocator {
            pool: Arc::new(Pool {
                free: Mutex::new(Free {
                    cold,
                    warm: VecDeque::new(),
                }),
                total,
                in_use,
            }),
        }
    }

    /// A free pair, or `None` when the range is exhausted: one whose sockets
    /// are still bound if it has been idle for [`MIN_IDLE`], else one
    /// without, else the oldest with.
    pub fn allocate(&self) -> Option<PortPair> {
        self.allocate_at(Instant::now())
    }

    fn allocate_at(&self, now: Instant) -> Option<PortPair> {
        let mut f = self.pool.lock();
        let idle = f
            .warm
            .front()
            .is_some_and(|w| now.saturating_duration_since(w.since) >= MIN_IDLE);
        let pair = if !idle && !f.cold.is_empty() {
            let rtp = f.cold.pop_front()?;
            self.pool.pair(rtp, None)
        } else {
            let w = f.warm.pop_front()?;
            self.pool.pair(w.rtp, Some(w.sockets))
        };
        self.pool
            .in_use
            .set((2 * (self.pool.total - f.len())) as f64);
        Some(pair)
    }

    /// A free pair whose sockets are still bound, however recently
    /// released: for when binding new sockets failed (out of descriptors).
    pub fn allocate_warm(&self) -> Option<PortPair> {
        let mut f = self.pool.lock();
        let w = f.warm.pop_front()?;
        self.pool
            .in_use
            .set((2 * (self.pool.total - f.len())) as f64);
        Some(self.pool.pair(w.rtp, Some(w.sockets)))
    }

    /// Ports (not pairs) currently allocated (pooled sockets count as free).
    pub fn in_use(&self) -> usize {
        2 * (self.pool.total - self.pool.lock().len())
    }

    /// Number of pairs in the range.
    pub fn capacity(&self) -> usize {
        self.pool.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_odd_and_released_on_drop() {
        let a = PortAllocator::new(30001, 30010); // pairs 30002..=30009
        assert_eq!(a.capacity(), 4);
        let p: Vec<PortPair> = (0..4).map(|_| a.allocate().unwrap()).collect();
        assert!(a.allocate().is_none());
        assert_eq!(a.in_use(), 8);
        for x in &p {
            assert_eq!(x.rtp() % 2, 0);
            assert_eq!(x.rtcp(), x.rtp() + 1);
            assert!(x.rtp() >= 30002 && x.rtcp() <= 30009);
        }
        drop(p);
        assert_eq!(a.in_use(), 0);
        // Freed ports go to the back of the queue.
        let first = a.allocate().unwrap();
        let port = first.rtp();
        drop(first);
        let n = a.allocate().unwrap();
        assert_ne!(n.rtp(), port);
    }

    fn bound(p: &PortPair) -> (UdpSocket, UdpSocket) {
        let b = |port| UdpSocket::bind(("127.0.0.1", port)).unwrap();
        (b(p.rtp()), b(p.rtcp()))
    }

    #[test]
    fn recycled_sockets_are_reused_once_idle_and_cold_pairs_meanwhile() {
        let a = PortAllocator::new(31000, 31005); // pairs 31000, 31002, 31004
        let mut p = a.allocate().unwrap();
        let port = p.rtp();
        let (rtp, rtcp) = bound(&p);
        let addr = rtp.local_addr().unwrap();
        let before_release = Instant::now();
        p.recycle(rtp, rtcp);
        drop(p);
        assert_eq!(a.in_use(), 0, "a pooled pair counts as free");

        // Just released: a pair without sockets is preferred.
        let q = a.allocate_at(before_release).unwrap();
        assert_ne!(q.rtp(), port);
        drop(q); // back to the cold list, without sockets

        // Idle long enough: the pooled pair, its sockets still bound.
        let mut w = a.allocate_at(Instant::now() + MIN_IDLE).unwrap();
        assert_eq!(w.rtp(), port);
        let [rtp, _rtcp] = w.take_sockets().expect("the pooled sockets");
        assert_eq!(rtp.local_addr().unwrap(), addr);
        assert!(
            UdpSocket::bind(addr).is_err(),
            "the pooled socket must still hold its port"
        );
        drop(rtp);
        drop(_rtcp);
        drop(w);
    }

    #[test]
    fn with_no_cold_pair_left_a_recent_pooled_pair_is_used() {
        let a = PortAllocator::new(31100, 31101); // one pair
        let mut p = a.allocate().unwrap();
        let (rtp, rtcp) = bound(&p);
        let before_release = Instant::now();
        p.recycle(rtp, rtcp);
        drop(p);
        let mut q = a.allocate_at(before_release).expect("the only pair");
        assert!(q.take_sockets().is_some());
        assert!(a.allocate().is_none());
        drop(q);
        // Released without sockets this time: nothing stays bound.
        let q = a.allocate_warm();
        assert!(q.is_none(), "allocate_warm hands out only pooled pairs");
    }

    #[test]
    fn edges() {
        assert_eq!(PortAllocator::new(65534, 65535).capacity(), 1);
        assert_eq!(PortAllocator::new(65535, 65535).capacity(), 0);
        assert_eq!(PortAllocator::new(10, 10).capacity(), 0);
        assert_eq!(PortAllocator::new(10, 11).capacity(), 1);
    }
}
