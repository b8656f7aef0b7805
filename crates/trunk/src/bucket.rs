//! Token bucket for calls per second.

use std::time::Instant;

/// Capacity `cps` tokens (a burst of one second), refilled at `cps` tokens/s.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
    cps: u32,
}

/// Retry-After for a key whose cps limit is 0 (it may not call at all).
const NEVER_RETRY_SECS: u32 = 86_400;

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(cps: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(cps),
            last: now,
            cps,
        }
    }

    /// Adds the tokens earned since the last refill; adopts a changed limit
    /// (clamping the tokens to the new capacity). Time going backwards is
    /// ignored.
    pub(crate) fn refill(&mut self, cps: u32, now: Instant) {
        let cap = f64::from(cps);
        if cps != self.cps {
            self.cps = cps;
            self.tokens = self.tokens.min(cap);
        }
        if now > self.last {
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * cap).min(cap);
            self.last = now;
        }
    }

    pub(crate) fn has_token(&self) -> bool {
        self.tokens >= 1.0
    }

    pub(crate) fn take(&mut self) {
        debug_assert!(self.has_token());
        self.tokens -= 1.0;
    }

    /// Whole seconds until a token is available, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u32 {
        if self.cps == 0 {
            return NEVER_RETRY_SECS;
        }
        let wait = (1.0 - self.tokens).max(0.0) / f64::from(self.cps);
        (wait.ceil() as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        for _ in 0..3 {
            b.refill(3, t0);
            assert!(b.has_token());
            b.take();
        }
        b.refill(3, t0);
        assert!(!b.has_token());
        assert_eq!(b.retry_after_secs(), 1);
        b.refill(3, t0 + Duration::from_millis(340));
        assert!(b.has_token());
        // Never more than one second's worth.
        b.refill(3, t0 + Duration::from_secs(100));
        assert!((b.tokens - 3.0).abs() < 1e-9);
    }

    #[test]
    fn slow_rate_retry_after() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, t0);
        b.take();
        b.refill(1, t0 + Duration::from_millis(100));
        assert_eq!(b.retry_after_secs(), 1);
        let mut z = TokenBucket::new(0, t0);
        z.refill(0, t0 + Duration::from_secs(5));
        assert!(!z.has_token());
        assert_eq!(z.retry_after_secs(), NEVER_RETRY_SECS);
    }

    #[test]
    fn limit_change_clamps() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        b.refill(2, t0);
        assert!((b.tokens - 2.0).abs() < 1e-9);
    }
}
