//! Exponential backoff with jitter, the one reconnect/retry policy both daemons use.

use std::time::Duration;

use rand::Rng;

/// Doubles from `initial` up to `max`; each delay is drawn uniformly from `[d/2, d]` ("equal
/// jitter") so that many nodes reconnecting at once spread out, while the worst case stays `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait, with jitter.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        let spread = d.saturating_sub(half).as_micros() as u64;
        half + Duration::from_micros(rand::rng().random_range(0..=spread))
    }

    /// The next delay without jitter (deterministic retry schedules).
    pub fn next_plain(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// Start again from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut last_upper = Duration::ZERO;
        for i in 0..20 {
            let upper = Duration::from_millis((100u64 << i.min(10)).min(1000));
            let d = b.next_delay();
            assert!(
                d >= upper / 2 && d <= upper,
                "step {i}: {d:?} not in [{:?}, {upper:?}]",
                upper / 2
            );
            assert!(upper >= last_upper);
            last_upper = upper;
        }
        assert!(b.next_delay() <= Duration::from_millis(1000));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn plain_schedule_doubles() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        let got: Vec<u64> = (0..6).map(|_| b.next_plain().as_secs()).collect();
        assert_eq!(got, [5, 10, 20, 40, 60, 60]);
    }
}
