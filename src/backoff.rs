//! Retry timing, pure: the caller supplies the clock readings and the random draws, so the math
//! is testable and a fleet of gateways restarted together spreads its attempts instead of
//! retrying in lockstep.
//!
//! - [`Backoff`]: exponential with full jitter, capped, reset after a stable session (serial
//!   ports reopening).
//! - [`Reconnect`]: the upstream link. Its delays grow with the *age of the outage*, not with
//!   the number of failed attempts: after an outage of `t` the next try comes within
//!   `max(initial, t/30)` (capped), so a short outage costs seconds and a long one costs at most
//!   a thirtieth of its length, however many attempts failed on the way (a flapping link is
//!   caught in every up phase). A try while the link is down is a cheap TCP probe; only when the
//!   port answers does the full (TLS, MQTT) connection follow, after a random spread. Refusals
//!   (credentials, certificates) are not outages: they open a circuit breaker.

use std::time::{Duration, Instant};

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

/// The outage age is divided by this for the delay ceiling: a gateway returns within about a
/// thirtieth of the outage (at least `initial`). 30 keeps outages under a minute under a 2 s
/// ceiling while a link down for an hour probes about once a minute.
pub const AGE_DIVISOR: u32 = 30;

/// The spread before a full connection is at most this fraction of the outage: seconds of spread
/// are worth it after a long outage (when many gateways wait on the same broker), not after a
/// blip, and a link flapping 3 s up / 3 s down must still be caught in each up phase.
pub const SPREAD_DIVISOR: u32 = 3;

/// Upstream reconnect policy (see the module docs).
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Smallest delay ceiling.
    pub initial: Duration,
    /// Largest delay, and the circuit breaker's wait.
    pub max: Duration,
    /// A connection that lived this long ends the outage.
    pub stable_after: Duration,
    /// Largest spread between the port answering and the full connection.
    pub spread: Duration,
}

impl Reconnect {
    /// Ceiling of the delay before the next try, for an outage that began `age` ago.
    pub fn ceiling(&self, age: Duration) -> Duration {
        (age / AGE_DIVISOR).clamp(self.initial, self.max.max(self.initial))
    }

    /// Delay before the next try: uniform in [0, ceiling] ("full jitter"), `unit` in [0, 1).
    pub fn delay(&self, age: Duration, unit: f64) -> Duration {
        self.ceiling(age).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Wait between the port answering again and the full connection, after the link was down
    /// for `down_for`: uniform in [0, min(spread, down_for / 3)].
    pub fn spread(&self, down_for: Duration, unit: f64) -> Duration {
        self.spread
            .min(down_for / SPREAD_DIVISOR)
            .mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The circuit breaker's wait after a refusal: the maximum at once, jittered in
    /// [max/2, max] so a fleet whose credentials were revoked together does not retry together.
    pub fn breaker(&self, unit: f64) -> Duration {
        self.max.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// When the current outage began, for [`Reconnect::ceiling`]. An outage is a period without a
/// stable connection: short-lived connections (a broker that accepts and then drops us, a link
/// flapping) do not start it over, so they cannot make a gateway hammer its broker.
#[derive(Debug, Clone, Default)]
pub struct Outage {
    since: Option<Instant>,
}

impl Outage {
    /// A try failed or a connection ended at `now`.
    pub fn failed(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// A connection ended after living `lived`: if that was stable, the outage (if any) is over
    /// and a new one starts now.
    pub fn connection_ended(&mut self, lived: Duration, stable_after: Duration, now: Instant) {
        if lived >= stable_after {
            self.since = Some(now);
        } else {
            self.failed(now);
        }
    }

    /// Age of the outage at `now`; zero when there is none.
    pub fn age(&self, now: Instant) -> Duration {
        self.since
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default()
    }
}

/// Failback: while connected to a later address of the list, an earlier one is preferred again
/// once its port has answered every check for `after`.
#[derive(Debug, Clone)]
pub struct Failback {
    after: Duration,
    /// For each earlier address, since when it has answered without a miss.
    answering_since: Vec<Option<Instant>>,
}

impl Failback {
    /// Watch the addresses before index `current`.
    pub fn new(current: usize, after: Duration) -> Failback {
        Failback {
            after,
            answering_since: vec![None; current],
        }
    }

    /// Record a check of address `i` at `now`.
    pub fn checked(&mut self, i: usize, answered: bool, now: Instant) {
        if let Some(slot) = self.answering_since.get_mut(i) {
            *slot = if answered { slot.or(Some(now)) } else { None };
        }
    }

    /// The earliest address that has answered for long enough at `now`, if any.
    pub fn ready(&self, now: Instant) -> Option<usize> {
        self.answering_since
            .iter()
            .position(|s| s.is_some_and(|s| now.saturating_duration_since(s) >= self.after))
    }

    /// Time between checks: a sixth of `after`, between 1 s and 30 s, so an address is checked
    /// several times before it is trusted again.
    pub fn check_interval(&self) -> Duration {
        (self.after / 6).clamp(Duration::from_secs(1), Duration::from_secs(30))
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

    fn r() -> Reconnect {
        Reconnect {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(120),
            stable_after: Duration::from_secs(60),
            spread: Duration::from_secs(2),
        }
    }

    #[test]
    fn reconnect_ceiling_grows_with_the_outage_not_the_attempts() {
        let r = r();
        let s = |n| Duration::from_secs(n);
        assert_eq!(r.ceiling(s(0)), s(1));
        assert_eq!(r.ceiling(s(30)), s(1));
        assert_eq!(r.ceiling(s(60)), s(2));
        assert_eq!(r.ceiling(s(600)), s(20));
        assert_eq!(r.ceiling(s(3600)), s(120));
        assert_eq!(r.ceiling(s(86400)), s(120));
    }

    #[test]
    fn spread_is_bounded_by_a_third_of_the_outage() {
        let r = r();
        let s = |n| Duration::from_secs(n);
        assert_eq!(r.spread(s(3), 1.0), s(1));
        assert_eq!(r.spread(s(30), 1.0), s(2));
        assert_eq!(r.spread(s(30), 0.0), s(0));
    }

    #[test]
    fn breaker_waits_between_half_and_all_of_the_maximum() {
        let r = r();
        assert_eq!(r.breaker(0.0), Duration::from_secs(60));
        assert_eq!(r.breaker(1.0), Duration::from_secs(120));
    }

    #[test]
    fn short_connections_do_not_restart_the_outage_stable_ones_do() {
        let t0 = Instant::now();
        let at = |n| t0 + Duration::from_secs(n);
        let stable = Duration::from_secs(60);
        let mut o = Outage::default();
        assert_eq!(o.age(at(5)), Duration::ZERO);
        o.failed(at(0));
        o.failed(at(10));
        assert_eq!(o.age(at(20)), Duration::from_secs(20));
        // Up for 3 s (a flap): still the same outage.
        o.connection_ended(Duration::from_secs(3), stable, at(23));
        assert_eq!(o.age(at(30)), Duration::from_secs(30));
        // Up for a while: a new outage starts at the loss.
        o.connection_ended(Duration::from_secs(90), stable, at(200));
        assert_eq!(o.age(at(201)), Duration::from_secs(1));
    }

    #[test]
    fn failback_needs_every_check_to_answer_for_the_whole_period() {
        let t0 = Instant::now();
        let at = |n| t0 + Duration::from_secs(n);
        let mut f = Failback::new(2, Duration::from_secs(60));
        assert_eq!(f.check_interval(), Duration::from_secs(10));
        f.checked(1, true, at(0));
        f.checked(0, true, at(10));
        f.checked(0, false, at(20));
        f.checked(0, true, at(30));
        assert_eq!(f.ready(at(59)), None);
        assert_eq!(f.ready(at(60)), Some(1));
        assert_eq!(f.ready(at(90)), Some(0), "the primary is preferred");
        f.checked(5, true, at(0)); // out of range: ignored
    }

    proptest! {
        #[test]
        fn reconnect_delay_within_bounds(age_s in 0u64..1_000_000, unit in 0.0f64..1.0) {
            let r = r();
            let age = Duration::from_secs(age_s);
            let d = r.delay(age, unit);
            prop_assert!(d <= r.ceiling(age) && r.ceiling(age) <= r.max);
            prop_assert!(r.spread(age, unit) <= r.spread);
        }

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
