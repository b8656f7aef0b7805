//! The media port allocator: pairs of ports from the configured range, RTP on
//! the even port and RTCP on the odd one above it (RFC 3550 §11). A
//! [`PortPair`] returns itself to the pool when dropped, so every way a call
//! can end gives its ports back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// An allocated even/odd pair; released on drop.
#[derive(Debug)]
pub struct PortPair {
    rtp: u16,
    pool: Arc<Pool>,
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
}

impl Drop for PortPair {
    fn drop(&mut self) {
        self.pool.release(self.rtp);
    }
}

#[derive(Debug)]
struct Pool {
    /// Free even ports, least recently released first (so a port just freed
    /// is reused last, and late packets of an old call rarely hit a new one).
    free: Mutex<VecDeque<u16>>,
    total: usize,
}

impl Pool {
    fn release(&self, rtp: u16) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        f.push_back(rtp);
        metrics::gauge!("tollgate_media_ports_in_use").set((2 * (self.total - f.len())) as f64);
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
        let free: VecDeque<u16> = (start..last)
            .step_by(2)
            .filter(|p| p.checked_add(1).is_some_and(|o| o <= last))
            .collect();
        let total = free.len();
        // Both gauges from the start, so "ports near exhaustion" can be
        // computed (in_use / capacity) before the first call.
        metrics::gauge!("tollgate_media_ports_capacity").set((2 * total) as f64);
        metrics::gauge!("tollgate_media_ports_in_use").set(0.0);
        PortAllocator {
            pool: Arc::new(Pool {
                free: Mutex::new(free),
                total,
            }),
        }
    }

    /// A free pair, or `None` when the range is exhausted.
    pub fn allocate(&self) -> Option<PortPair> {
        let mut f = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        let rtp = f.pop_front()?;
        metrics::gauge!("tollgate_media_ports_in_use")
            .set((2 * (self.pool.total - f.len())) as f64);
        Some(PortPair {
            rtp,
            pool: self.pool.clone(),
        })
    }

    /// Ports (not pairs) currently allocated.
    pub fn in_use(&self) -> usize {
        let f = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        2 * (self.pool.total - f.len())
    }

    /// Pairs the range holds.
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

    #[test]
    fn edges() {
        assert_eq!(PortAllocator::new(65534, 65535).capacity(), 1);
        assert_eq!(PortAllocator::new(65535, 65535).capacity(), 0);
        assert_eq!(PortAllocator::new(10, 10).capacity(), 0);
        assert_eq!(PortAllocator::new(10, 11).capacity(), 1);
    }
}
