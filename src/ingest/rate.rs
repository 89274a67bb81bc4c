//! Per-connection publish rate limit (`local.max_rate`, `local.rate_burst`): a token bucket,
//! and the episode bookkeeping around it. Pure: time is passed in, so it is tested without
//! sleeping; the session ([`super::mqtt`]) asks before it decodes each PUBLISH.
//!
//! Why slow down rather than disconnect: a device over its rate is usually a device catching up
//! after an outage, and a disconnect makes it resend everything in flight. Not reading its
//! socket holds it back through TCP, exactly like a store that is behind, and costs the other
//! devices nothing: the publishes it has not sent yet wait on the device.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` banked. Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `rate` > 0 tokens per second; `burst` 0 means one second's worth (at least 1).
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        let rate = f64::from(rate.max(1));
        let burst = if burst == 0 { rate } else { f64::from(burst) }.max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // A clock that went backwards (never for Instant, but cheap to be sure) adds nothing.
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Take one token, or say how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whether the bucket is full again (the device stayed under its rate long enough).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// What the session does with the next PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Decode it now.
    Go,
    /// Leave it (and the socket) unread until then. `first` is true for the first wait of an
    /// episode: the caller counts and logs it then, once.
    Wait { until: Instant, first: bool },
}

/// The rate limit of one connection: its bucket and whether it is in a throttled episode.
#[derive(Debug)]
pub struct Throttle {
    bucket: Option<TokenBucket>,
    /// Since when the device has been over its rate, and how many publishes had to wait.
    episode: Option<(Instant, u64)>,
}

/// How a throttled episode ended: how long it lasted and how many publishes waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    pub lasted: Duration,
    pub waits: u64,
}

impl Throttle {
    /// `rate` 0: no limit.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Throttle {
        Throttle {
            bucket: (rate > 0).then(|| TokenBucket::new(rate, burst, now)),
            episode: None,
        }
    }

    /// Ask for the next PUBLISH. An episode ends once the bucket has refilled completely.
    pub fn next(&mut self, now: Instant) -> (Decision, Option<Episode>) {
        let Some(bucket) = &mut self.bucket else {
            return (Decision::Go, None);
        };
        let mut ended = None;
        if let Some((since, waits)) = self.episode {
            if bucket.is_full(now) {
                self.episode = None;
                ended = Some(Episode {
                    lasted: now.saturating_duration_since(since),
                    waits,
                });
            }
        }
        match bucket.take(now) {
            Ok(()) => (Decision::Go, ended),
            Err(wait) => {
                let first = match &mut self.episode {
                    Some((_, waits)) => {
                        *waits += 1;
                        false
                    }
                    None => {
                        self.episode = Some((now, 1));
                        true
                    }
                };
                let until = now + wait;
                (Decision::Wait { until, first }, ended)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        for _ in 0..5 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(99));
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn one_episode_per_overrun_and_it_ends_when_refilled() {
        let t0 = Instant::now();
        let mut t = Throttle::new(100, 2, t0);
        assert_eq!(t.next(t0).0, Decision::Go);
        assert_eq!(t.next(t0).0, Decision::Go);
        let (d, _) = t.next(t0);
        assert!(matches!(d, Decision::Wait { first: true, .. }));
        let (d, _) = t.next(t0 + Duration::from_millis(1));
        assert!(matches!(d, Decision::Wait { first: false, .. }));
        let (d, ended) = t.next(t0 + Duration::from_millis(15));
        assert_eq!((d, ended), (Decision::Go, None));
        // Quiet long enough to refill: the episode ends at the next publish.
        let (d, ended) = t.next(t0 + Duration::from_secs(1));
        assert_eq!(d, Decision::Go);
        assert_eq!(ended.map(|e| e.waits), Some(2));
        // No limit configured: always go.
        let mut off = Throttle::new(0, 0, t0);
        for _ in 0..1000 {
            assert_eq!(off.next(t0), (Decision::Go, None));
        }
    }

    proptest! {
        /// Over any window, the publishes let through never exceed burst + rate x elapsed.
        #[test]
        fn never_more_than_burst_plus_rate(rate in 1u32..1000, burst in 0u32..100,
                steps in proptest::collection::vec(0u64..20_000, 1..300)) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, burst, t0);
            let cap = if burst == 0 { rate } else { burst } as f64;
            let mut now = t0;
            let mut passed = 0u64;
            for us in steps {
                now += Duration::from_micros(us);
                if b.take(now).is_ok() {
                    passed += 1;
                }
            }
            let allowed = cap + f64::from(rate) * (now - t0).as_secs_f64();
            prop_assert!(passed as f64 <= allowed + 1e-6, "{passed} > {allowed}");
        }
    }
}
