//! Per-SSRC packet-index state: ROC estimation (RFC 3711 §3.3.1, Appendix A)
//! and the replay window (§3.3.2), apart from any cryptography.

/// Replay window width in packets (RFC 3711 asks for at least 64).
pub(crate) const WINDOW: u64 = 128;

/// Streams (SSRCs) tracked per context; the least recently used is forgotten
/// beyond this. Only authenticated packets create inbound state.
pub(crate) const MAX_STREAMS: usize = 16;

/// Highest index seen and which of the `WINDOW` indices below it were seen.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Window {
    started: bool,
    highest: u64,
    seen: u128,
}

impl Window {
    pub(crate) fn highest(&self) -> Option<u64> {
        self.started.then_some(self.highest)
    }

    /// Whether `index` is new: above the highest, or inside the window and unseen.
    pub(crate) fn check(&self, index: u64) -> bool {
        if !self.started || index > self.highest {
            return true;
        }
        let delta = self.highest - index;
        delta < WINDOW && self.seen & (1u128 << delta) == 0
    }

    /// Records `index` (call only after the packet authenticated).
    pub(crate) fn accept(&mut self, index: u64) {
        if !self.started {
            self.started = true;
            self.highest = index;
            self.seen = 1;
        } else if index > self.highest {
            let shift = index - self.highest;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = index;
        } else {
            let delta = self.highest - index;
            if delta < WINDOW {
                self.seen |= 1u128 << delta;
            }
        }
    }
}

/// The 48-bit SRTP index a receiver (or a relay's sender) should use for
/// sequence number `seq`, given the highest index processed so far
/// (RFC 3711 Appendix A). The ROC never goes below zero.
pub(crate) fn estimate_index(highest: Option<u64>, seq: u16) -> u64 {
    let Some(highest) = highest else {
        return u64::from(seq);
    };
    let roc = highest >> 16;
    let s_l = highest as u16;
    let v = if s_l < 0x8000 {
        if i32::from(seq) - i32::from(s_l) > 0x8000 && roc > 0 {
            roc - 1
        } else {
            roc
        }
    } else if s_l - 0x8000 > seq {
        roc + 1
    } else {
        roc
    };
    (v << 16) | u64::from(seq)
}

/// A small SSRC -> state table that never allocates after construction.
pub(crate) struct Streams<S> {
    entries: Vec<(u32, u64, S)>,
    tick: u64,
}

impl<S: Default> Streams<S> {
    pub(crate) fn new() -> Self {
        Streams {
            entries: Vec::with_capacity(MAX_STREAMS),
            tick: 0,
        }
    }

    /// The state of `ssrc`, if tracked.
    pub(crate) fn get(&self, ssrc: u32) -> Option<&S> {
        self.entries
            .iter()
            .find(|(s, _, _)| *s == ssrc)
            .map(|(_, _, st)| st)
    }

    /// The state of `ssrc`, created (evicting the least recently used) if new.
    pub(crate) fn get_or_insert(&mut self, ssrc: u32) -> &mut S {
        self.tick += 1;
        let tick = self.tick;
        let pos = match self.entries.iter().position(|(s, _, _)| *s == ssrc) {
            Some(p) => p,
            None if self.entries.len() < MAX_STREAMS => {
                self.entries.push((ssrc, tick, S::default()));
                self.entries.len() - 1
            }
            None => {
                let (p, _) = self
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, (_, t, _))| *t)
                    .expect("table is full, so not empty");
                self.entries[p] = (ssrc, tick, S::default());
                p
            }
        };
        let e = &mut self.entries[pos];
        e.1 = tick;
        &mut e.2
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_estimation() {
        assert_eq!(estimate_index(None, 65000), 65000);
        // Forward across the wrap.
        assert_eq!(estimate_index(Some(65535), 0), 0x1_0000);
        assert_eq!(estimate_index(Some(65000), 10), 0x1_000a);
        // Late packet from before the wrap.
        assert_eq!(estimate_index(Some(0x1_0002), 65534), 0xfffe);
        // Never below ROC 0.
        assert_eq!(estimate_index(Some(10), 65000), 65000);
        // Ordinary.
        assert_eq!(estimate_index(Some(0x3_1234), 0x1240), 0x3_1240);
        assert_eq!(estimate_index(Some(0x3_9000), 0x8800), 0x3_8800);
    }

    #[test]
    fn replay_window() {
        let mut w = Window::default();
        assert!(w.check(100));
        w.accept(100);
        assert!(!w.check(100));
        assert!(w.check(99));
        w.accept(99);
        assert!(!w.check(99));
        w.accept(300);
        assert!(!w.check(100), "too old now");
        assert!(w.check(300 - WINDOW + 1));
        assert!(!w.check(300 - WINDOW));
        w.accept(250);
        assert!(!w.check(250));
        assert!(w.check(251));
        w.accept(1000);
        assert!(w.check(999) && !w.check(1000) && !w.check(250));
    }

    #[test]
    fn streams_evict_lru() {
        let mut t: Streams<u32> = Streams::new();
        for i in 0..MAX_STREAMS as u32 {
            *t.get_or_insert(i) = i + 100;
        }
        t.get_or_insert(0); // 0 is now the most recent; 1 the least
        *t.get_or_insert(999) = 7;
        assert_eq!(t.len(), MAX_STREAMS);
        assert!(t.get(1).is_none());
        assert_eq!(t.get(0), Some(&100));
        assert_eq!(t.get(999), Some(&7));
    }
}
