//! vmesh-retry: the one retry policy of vmesh. Capped exponential backoff with full jitter: the
//! n-th delay is uniform in `[0, min(cap, base * 2^n)]` (AWS's "full jitter"), so agents that lost
//! the controller at the same moment, or replicas that lost Consul, do not come back in lockstep.
//!
//! Used by every retry loop: the Consul watch driver, leader election, the status writer, the
//! relay's record writer and certificate renewal in the controller, the agent's registration,
//! reconnects and renewals, and the registry's check-and-set retries (so vmeshctl too).
//!
//! Pure: it reads no clock. [`Backoff::new`] seeds its pseudo-random sequence from [`seed`] (the
//! time and the process id, read once); state machines that must not read the clock take a seed
//! with [`Backoff::with_seed`].
#![forbid(unsafe_code)]

use std::time::Duration;

/// Retry delays for one kind of failure. Pure apart from its own pseudo-random state.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Delays from `base`, doubling up to `cap`, seeded by [`seed`].
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_seed(base, cap, seed())
    }

    /// A backoff with a given seed: state machines that read no clock, and tests.
    pub fn with_seed(base: Duration, cap: Duration, seed: u64) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
            // xorshift must not start at 0.
            rng: seed | 1,
        }
    }

    /// The upper bound of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The cap.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The next delay, uniform in `[0, ceiling]`; the ceiling then doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let unit = self.next_unit();
        self.next_delay_with(unit)
    }

    /// The next delay for a given random draw `unit` in `[0, 1]` (tests).
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Success: the next delay starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A draw uniform in `[0, 1)` from this backoff's sequence, for other jitter (e.g. spreading
    /// periodic work of many processes apart).
    pub fn next_unit(&mut self) -> f64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed that differs between processes and calls: the time's nanoseconds and the process id.
/// The one place the retry policy reads a clock.
pub fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::with_seed(200 * MS, Duration::from_secs(30), 7);
        let ceilings: Vec<Duration> = (0..10)
            .map(|_| {
                let c = b.ceiling();
                b.next_delay_with(1.0);
                c
            })
            .collect();
        assert_eq!(
            ceilings,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000].map(|m| m * MS)
        );
        // Many attempts later it stays at the cap, without overflowing.
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        assert_eq!(b.next_delay_with(1.0), Duration::from_secs(30));
    }

    #[test]
    fn delays_are_full_jitter_within_the_ceiling() {
        let mut b = Backoff::with_seed(200 * MS, Duration::from_secs(30), 42);
        let mut seen_small = false;
        for _ in 0..200 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            seen_small |= d < ceiling / 2;
        }
        assert!(seen_small, "full jitter goes below half the ceiling");
        assert_eq!(b.next_delay_with(0.0), Duration::ZERO);
        assert_eq!(b.next_delay_with(0.5), Duration::from_secs(15));
    }

    #[test]
    fn reset_starts_over_and_seeds_differ() {
        let mut b = Backoff::with_seed(200 * MS, Duration::from_secs(30), 1);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert_eq!(b.ceiling(), 200 * MS);
        let mut a = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(1), 1);
        let mut c = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(1), 2);
        let da: Vec<_> = (0..5).map(|_| a.next_delay()).collect();
        let dc: Vec<_> = (0..5).map(|_| c.next_delay()).collect();
        assert_ne!(da, dc);
    }
}
