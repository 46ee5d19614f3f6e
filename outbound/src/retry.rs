//! The delays between attempts while calls keep failing.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays between attempts while calls keep failing: `first`, doubling per failure up to
/// `max` (backon's exponential backoff), each scaled by a jitter into its upper half, so
/// that many clients failing together spread their retries without any coming sooner
/// than half the delay. One per thing retried; [`Retry::succeeded`] starts over.
#[derive(Debug)]
pub struct Retry {
    first: Duration,
    max: Duration,
    /// The delays to come, built at the first failure after a success.
    delays: Option<ExponentialBackoff>,
    failures: u32,
}

impl Retry {
    /// Retries starting at `first` and never more than `max` apart.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max: max.max(first), delays: None, failures: 0 }
    }

    /// One more failure: the delay before the next attempt. `jitter` in `[0, 1]` picks the
    /// point in the upper half of the delay (1: the whole delay).
    pub fn failed(&mut self, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let (first, max) = (self.first, self.max);
        let delay = self
            .delays
            .get_or_insert_with(|| {
                ExponentialBuilder::default()
                    .with_min_delay(first)
                    .with_max_delay(max)
                    .with_factor(2.0)
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(max);
        delay.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// The call worked: the next failure waits `first` again.
    pub fn succeeded(&mut self) {
        self.delays = None;
        self.failures = 0;
    }

    /// Failures since the last success, for logs.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_in_their_upper_half_and_start_over_after_a_success() {
        let secs = |d: Duration| d.as_secs_f64().round() as u64;
        let mut retry = Retry::new(Duration::from_secs(1), Duration::from_secs(60));
        let top: Vec<u64> = (0..8).map(|_| secs(retry.failed(1.0))).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(retry.failures(), 8);
        for _ in 0..1000 {
            retry.failed(1.0);
        }
        assert_eq!(retry.failed(0.0), Duration::from_secs(30), "no overflow; the lower half is never used");
        retry.succeeded();
        assert_eq!(retry.failures(), 0);
        assert_eq!(retry.failed(0.0), Duration::from_millis(500));
        assert_eq!(retry.failed(0.5), Duration::from_millis(1500));
    }
}
