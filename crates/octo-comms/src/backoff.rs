//! Reconnect delays: exponential backoff with full jitter.
//!
//! delay(n) = uniform(0, min(cap, base * 2^n)). Full jitter spreads thousands of
//! tentacles that lost the server at the same instant over the whole window, so
//! they do not come back in lock-step (the original's reconnect storms).

use std::time::Duration;

use rand::Rng;

/// Backoff state of one reconnecting loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    /// Starts about 1 s, capped at 60 s.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Backoff {
    /// Backoff starting at `base` and never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay (uniform in [0, ceiling]) and advances the state.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    /// After a good connection: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_and_resets() {
        let mut b = Backoff::default();
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c);
                c.as_secs()
            })
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_over_the_window() {
        // 1,000 tentacles at the same attempt must not pick the same delay.
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut b = Backoff::default();
                for _ in 0..5 {
                    b.next_delay();
                }
                b.next_delay()
            })
            .collect();
        let below_half = delays
            .iter()
            .filter(|d| **d < Duration::from_secs(16))
            .count();
        // Uniform over [0, 32 s]: about half below 16 s. Bounds are loose (p < 1e-9).
        assert!((350..650).contains(&below_half), "{below_half}");
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 900);
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
