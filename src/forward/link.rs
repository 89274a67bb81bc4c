//! The upstream link between sessions: which address to use, when to try it, and when to go back
//! to a preferred one. The timing rules are pure ([`crate::backoff`]); this is their I/O side.
//!
//! - While down, a try is a TCP probe of each address in order (an unanswered SYN costs nothing
//!   on a metered link and nothing on the broker); the first that answers gets the full
//!   connection (TLS, CONNECT) after a short random spread.
//! - An address whose full connection failed is skipped for a while: the outage delay after a
//!   network failure, the circuit breaker's wait after a refusal or a certificate failure. The
//!   next address of the list is tried meanwhile (failover).
//! - While connected to a later address, earlier ones are probed (TCP only: a full connection
//!   with the same client id would take the session over) and the session is ended gracefully,
//!   in-flight acks first, once one has answered every check for `upstream.failback_after`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::{Failback, Outage};
use crate::telemetry::Metrics;

/// Longest a TCP probe waits for an answer (less when `upstream.connect_timeout` is shorter).
/// A link that comes back while a probe waits is noticed by its SYN retransmission.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `host:port` accepts a TCP connection within `timeout`. The connection is closed at
/// once.
pub async fn probe(host: &str, port: u16, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// Reconnect bookkeeping across sessions.
#[derive(Debug)]
pub struct LinkState {
    /// Per address: not to be tried before this instant.
    blocked_until: Vec<Option<Instant>>,
    pub outage: Outage,
    /// Failure kinds already logged: per address (refusals, certificates: until that address
    /// connects) or for the link (network failures: until any connects).
    reported: Vec<(Option<usize>, String)>,
}

impl LinkState {
    pub fn new(addresses: usize) -> LinkState {
        LinkState {
            blocked_until: vec![None; addresses],
            outage: Outage::default(),
            reported: Vec::new(),
        }
    }

    /// Skip address `i` until `until`.
    pub fn block(&mut self, i: usize, until: Instant) {
        if let Some(slot) = self.blocked_until.get_mut(i) {
            *slot = Some(until);
        }
    }

    pub fn blocked(&self, i: usize, now: Instant) -> bool {
        self.blocked_until
            .get(i)
            .copied()
            .flatten()
            .is_some_and(|t| t > now)
    }

    /// When every address is blocked at `now`: the instant the first becomes free.
    pub fn all_blocked_until(&self, now: Instant) -> Option<Instant> {
        let mut first: Option<Instant> = None;
        for b in &self.blocked_until {
            match b {
                Some(t) if *t > now => first = Some(first.map_or(*t, |f| f.min(*t))),
                _ => return None,
            }
        }
        first
    }

    /// A copy of the blocks, for a session's failback watcher.
    pub fn blocks(&self) -> Vec<Option<Instant>> {
        self.blocked_until.clone()
    }

    /// Address `i` accepted a connection: a new episode of network failures starts with the
    /// next loss, and what was reported about `i` may be reported again. Other addresses stay
    /// blocked: a refusing primary keeps its circuit breaker while a secondary serves.
    pub fn connected(&mut self, i: usize) {
        self.reported.retain(|(a, _)| a.is_some() && *a != Some(i));
        if let Some(b) = self.blocked_until.get_mut(i) {
            *b = None;
        }
    }

    /// Whether failure kind `key` (of address `address`, or of the link when None) is new, and
    /// remember it.
    pub fn first_report(&mut self, address: Option<usize>, key: &str) -> bool {
        if self.reported.iter().any(|(a, k)| *a == address && k == key) {
            return false;
        }
        self.reported.push((address, key.to_string()));
        true
    }
}

/// What a session's watcher needs.
pub struct Watch {
    /// The session's address, as an index into `addresses`.
    pub index: usize,
    /// The address of the previous connection, if any.
    pub previous: Option<usize>,
    pub addresses: Vec<(String, u16)>,
    pub failback_after: Duration,
    pub probe_timeout: Duration,
    /// Addresses not to go back to before these instants (circuit breakers).
    pub blocked_until: Vec<Option<Instant>>,
    pub metrics: Arc<Metrics>,
    /// Cancelled to end the session for a failback.
    pub stop: CancellationToken,
}

/// Runs beside a session: once it is connected, records the address in use (counting a
/// failover), then, on a later address, probes the earlier ones and ends the session when one
/// has been answering for `failback_after`. Returns the address to go back to.
pub async fn watch_session(w: Watch, mut connected: watch::Receiver<bool>) -> Option<usize> {
    if connected.wait_for(|c| *c).await.is_err() {
        return None;
    }
    w.metrics.upstream_address.set(w.index as u64);
    if w.index == 0 {
        return None;
    }
    let (host, port) = &w.addresses[w.index];
    if w.previous != Some(w.index) {
        w.metrics.upstream_failovers.inc();
        warn!(
            address = %format!("{host}:{port}"),
            position = w.index + 1,
            "upstream failed over to a later address; earlier ones are unavailable and are checked for a return"
        );
    }
    let mut failback = Failback::new(w.index, w.failback_after);
    loop {
        // Jittered, so a fleet's checks of a recovering primary do not line up.
        let pause = failback
            .check_interval()
            .mul_f64(0.75 + 0.5 * fastrand::f64());
        tokio::time::sleep(pause).await;
        for (i, (host, port)) in w.addresses[..w.index].iter().enumerate() {
            let blocked = w
                .blocked_until
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|t| t > Instant::now());
            let answered = !blocked && {
                w.metrics.upstream_probes.inc();
                probe(host, *port, w.probe_timeout).await
            };
            failback.checked(i, answered, Instant::now());
        }
        if let Some(i) = failback.ready(Instant::now()) {
            let (to_host, to_port) = &w.addresses[i];
            info!(
                from = %format!("{host}:{port}"),
                to = %format!("{to_host}:{to_port}"),
                "a preferred upstream address has answered for upstream.failback_after; going back to it once in-flight messages are acknowledged"
            );
            w.stop.cancel();
            return Some(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_expire_and_connecting_lifts_them() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let mut s = LinkState::new(2);
        assert_eq!(s.all_blocked_until(now), None);
        s.block(0, later);
        assert!(s.blocked(0, now) && !s.blocked(1, now));
        assert_eq!(s.all_blocked_until(now), None, "address 1 is free");
        s.block(1, later + Duration::from_secs(5));
        assert_eq!(s.all_blocked_until(now), Some(later));
        assert!(!s.blocked(0, later));
        s.connected(1);
        assert!(!s.blocked(1, now));
        assert!(s.blocked(0, now), "another address keeps its block");
    }

    #[test]
    fn each_failure_kind_is_reported_once_until_its_address_connects() {
        let mut s = LinkState::new(2);
        assert!(s.first_report(Some(0), "refused:bad_credentials"));
        assert!(!s.first_report(Some(0), "refused:bad_credentials"));
        assert!(s.first_report(Some(1), "refused:bad_credentials"));
        assert!(s.first_report(None, "network"));
        assert!(!s.first_report(None, "network"));
        s.connected(1);
        assert!(s.first_report(None, "network"), "a new episode");
        assert!(!s.first_report(Some(0), "refused:bad_credentials"));
        assert!(s.first_report(Some(1), "refused:bad_credentials"));
    }

    #[tokio::test]
    async fn probe_tells_an_open_port_from_a_closed_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(probe("127.0.0.1", port, Duration::from_secs(2)).await);
        drop(listener);
        assert!(!probe("127.0.0.1", port, Duration::from_secs(2)).await);
    }
}
