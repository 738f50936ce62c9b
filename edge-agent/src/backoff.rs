//! Jittered exponential backoff for reconnects.
//!
//! The goal is that a fleet that lost the manager at the same moment (a
//! manager restart under 10,000 agents) does not come back in lock-step.
//! Each delay is drawn uniformly from `[0, ceiling]` ("full jitter"), and
//! the ceiling doubles from `min` up to `max` with every failed attempt.
//! Equal jitter (`[ceiling/2, ceiling]`), which this replaced, keeps every
//! agent in the same half of the window, so the fleet stays bunched; full
//! jitter spreads the attempts evenly over the whole window, and unlike
//! decorrelated jitter it does not pile delays up at exactly `max`.

use std::time::Duration;

/// Full-jitter exponential backoff; see the module comment.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// The ceiling of the next delay.
    ceiling: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            ceiling: min,
        }
    }

    /// After a stable session: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }

    /// The next delay, given a random number (injected for tests): uniform
    /// in `[0, ceiling]`; the ceiling then doubles, up to `max`.
    pub fn next_with(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        uniform(ceiling, random)
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(random())
    }

    /// The delay after the server asked to retry in `hint` (a
    /// `RESOURCE_EXHAUSTED` with `retry-after-ms`): the hint plus a random
    /// part of up to the hint or the current ceiling, whichever is larger,
    /// so the agents one busy manager refused do not all return together
    /// when the hint runs out. Counts as a failed attempt.
    pub fn after_hint_with(&mut self, hint: Duration, random: u64) -> Duration {
        let spread = hint.max(self.ceiling).min(self.max.max(hint));
        self.ceiling = (self.ceiling * 2).min(self.max);
        hint + uniform(spread, random)
    }

    pub fn after_hint(&mut self, hint: Duration) -> Duration {
        self.after_hint_with(hint, random())
    }
}

/// Uniform in `[0, upto]` at millisecond resolution.
fn uniform(upto: Duration, random: u64) -> Duration {
    let span = upto.as_millis().min(u128::from(u64::MAX - 1)) as u64;
    Duration::from_millis(random % (span + 1))
}

fn random() -> u64 {
    // No entropy (which does not happen on Linux) still leaves the
    // agents' different start times as jitter.
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos().into())
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A small deterministic generator (SplitMix64) for the spread tests.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn delays_stay_under_a_ceiling_that_doubles_up_to_max() {
        let mut next = rng(1);
        for _ in 0..200 {
            let mut b = Backoff::new(100 * MS, 1000 * MS);
            let mut ceiling = 100u64;
            for _ in 0..10 {
                let d = b.next_with(next()).as_millis() as u64;
                assert!(d <= ceiling, "{d} vs {ceiling}");
                ceiling = (ceiling * 2).min(1000);
            }
        }
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        for _ in 0..10 {
            b.next_with(0);
        }
        assert_eq!(
            b.next_with(u64::MAX),
            Duration::from_millis(u64::MAX % 1001)
        );
        b.reset();
        assert!(b.next_with(u64::MAX) <= 100 * MS);
        // The extremes are reachable: 0 and the ceiling itself.
        assert_eq!(Backoff::new(100 * MS, MS).next_with(0), Duration::ZERO);
        assert_eq!(Backoff::new(100 * MS, MS).next_with(100), 100 * MS);
    }

    /// 10,000 agents that lost the manager together: after the same number
    /// of failures their delays cover the whole window evenly (each tenth
    /// of it gets about a tenth of the fleet), not one half of it.
    #[test]
    fn a_fleet_spreads_over_the_whole_window() {
        let mut next = rng(7);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            let mut b = Backoff::new(200 * MS, 10_000 * MS);
            for _ in 0..4 {
                b.next_with(next());
            }
            // Fifth attempt: ceiling 200 ms * 2^4 = 3.2 s.
            let d = b.next_with(next()).as_millis() as usize;
            assert!(d <= 3200);
            buckets[(d * 10 / 3201).min(9)] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((800..=1200).contains(n), "bucket {i}: {n} of 10000");
        }
    }

    #[test]
    fn a_retry_hint_is_waited_for_plus_jitter() {
        let mut next = rng(3);
        let hint = 1000 * MS;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let mut b = Backoff::new(200 * MS, 10_000 * MS);
            let d = b.after_hint_with(hint, next());
            assert!(d >= hint && d <= 2 * hint, "{d:?}");
            seen.insert(d.as_millis() / 100);
        }
        // Spread over the whole second after the hint.
        assert!(seen.len() >= 10, "{seen:?}");
        // Repeated refusals widen the spread with the backoff, up to max.
        let mut b = Backoff::new(200 * MS, 10_000 * MS);
        for _ in 0..10 {
            b.after_hint_with(hint, 0);
        }
        assert_eq!(
            b.after_hint_with(hint, u64::MAX),
            hint + uniform(10_000 * MS, u64::MAX)
        );
        // A hint larger than max is still honoured.
        let mut b = Backoff::new(200 * MS, 1000 * MS);
        assert!(b.after_hint_with(5000 * MS, u64::MAX) >= 5000 * MS);
    }
}
