//! Reconnect backoff: exponential with full jitter, capped, reset after a stable connection.
//! Pure: the caller supplies the random draw, so the math is testable and a fleet of gateways
//! restarted together spreads its reconnects over the whole window instead of in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    stable_after: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, stable_after: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            stable_after,
            failures: 0,
        }
    }

    /// The ceiling for the next delay: initial * 2^failures, capped at max.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Record a failure and return the delay before the next attempt: uniform in
    /// [0, ceiling] ("full jitter"), `unit` being a uniform draw in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// A connection ended after lasting `lived`: if it was stable, start over.
    pub fn connection_ended(&mut self, lived: Duration) {
        if lived >= self.stable_after {
            self.failures = 0;
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b() -> Backoff {
        Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(120),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = b();
        let mut ceilings = vec![];
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay(0.5);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
    }

    #[test]
    fn stable_connection_resets_short_one_does_not() {
        let mut b = b();
        for _ in 0..5 {
            b.next_delay(0.5);
        }
        b.connection_ended(Duration::from_secs(5));
        assert_eq!(b.ceiling(), Duration::from_secs(32));
        b.connection_ended(Duration::from_secs(60));
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn delay_within_zero_and_ceiling(fails in 0u32..200, unit in 0.0f64..1.0) {
            let mut b = b();
            for _ in 0..fails { b.next_delay(0.3); }
            let ceiling = b.ceiling();
            let d = b.next_delay(unit);
            prop_assert!(d <= ceiling && ceiling <= Duration::from_secs(120));
        }
    }
}
