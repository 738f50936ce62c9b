//! Jittered exponential backoff for reconnects.

use std::time::Duration;

/// Doubles from `min` up to `max`; each delay is drawn uniformly from
/// [d/2, d] ("equal jitter"), so a fleet that lost the manager at the same
/// moment does not come back in lock-step.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next delay, given a random number (injected for tests).
    pub fn next_with(&mut self, random: u64) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        let span = (d - half).as_millis() as u64;
        half + Duration::from_millis(if span == 0 { 0 } else { random % (span + 1) })
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(getrandom::u64().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_and_stays_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut nominal = 100u64;
        for i in 0..10u64 {
            let d = b.next_with(i * 7919).as_millis() as u64;
            assert!(d >= nominal / 2 && d <= nominal, "{d} vs {nominal}");
            nominal = (nominal * 2).min(1000);
        }
        b.reset();
        assert!(b.next_with(u64::MAX).as_millis() <= 100);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for r in 0..50u64 {
            let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_millis(1000));
            seen.insert(b.next_with(r * 104_729));
        }
        assert!(seen.len() > 10);
    }
}
