//! A token bucket for byte rates (the resync bandwidth cap), sans I/O: the
//! caller says how many bytes went and when; the bucket says how long to wait
//! before the next ones may go.

use std::time::{Duration, Instant};

/// Limits a byte stream to `rate` bytes per second on average, allowing
/// bursts of `burst` bytes after a pause. Bytes are charged after the fact
/// (the bucket may go into debt), so a caller that sends in steps of N bytes
/// overshoots the rate by at most one step.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: `rate` bytes/s (at least 1), `burst` bytes of credit.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1),
            burst,
            tokens: burst as f64,
            last: now,
        }
    }

    /// The rate, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
    }

    /// Charge `bytes` sent at `now`; returns how long to wait before sending
    /// more (zero while there is credit).
    pub fn charge(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_rate_holds_and_bursts_are_bounded() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, 100_000, t0);
        // The burst goes at once.
        assert_eq!(b.charge(100_000, t0), Duration::ZERO);
        // Then 1 MB costs one second.
        let w = b.charge(1_000_000, t0);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
        // Sending at the advised times keeps the rate: 10 steps of 500 kB
        // take 5 s of waiting.
        let mut now = t0 + w;
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            let w = b.charge(500_000, now);
            waited += w;
            now += w;
        }
        assert!((waited.as_secs_f64() - 5.0).abs() < 1e-3, "{waited:?}");
        // A long pause refills only up to the burst.
        now += Duration::from_secs(100);
        assert_eq!(b.charge(100_000, now), Duration::ZERO);
        assert!(b.charge(1, now) > Duration::ZERO);
    }

    #[test]
    fn time_going_back_is_ignored() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(10, 0, t0);
        let w = b.charge(10, t0 - Duration::from_secs(5));
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
    }
}
