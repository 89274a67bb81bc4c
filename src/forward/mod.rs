//! The forwarder: reads committed rows oldest first, publishes them upstream with QoS 1 inside a
//! bounded window, and deletes each row only on the upstream's PUBACK for it.
//!
//! rumqttc does not tell `publish()` callers the packet id; it reports `Outgoing::Publish(pkid)`
//! events in the order publishes were queued (it stops taking new requests while a packet id
//! collision is pending, so that order holds). The forwarder keeps a FIFO of rows handed to the
//! client and pairs each with the next such event, then a pkid -> row map until the PUBACK.
//!
//! Every session starts reading from the oldest row, so after a reconnect whatever was in flight
//! is resent with the same message id: at-least-once, with duplicates bounded by the window.

pub mod backoff;
pub mod client;
pub mod link;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::queue::{Row, StoreHandle};
use crate::service::systemd::answer;
use crate::telemetry::Metrics;
use client::{LinkError, Report, Settings, UpClient, UpEvent};
use link::LinkState;

/// How a session ended.
enum End {
    /// Shutdown requested and handled.
    Shutdown,
    /// The store is gone (only at shutdown).
    StoreClosed,
    /// The connection failed or was lost.
    Failed { error: String, connected: bool },
}

/// Link state, so the log records changes once rather than every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Starting,
    Up,
    Down,
}

/// Where upstream messages on a downlink topic go (e.g. a serial port's writer).
pub struct Downlink {
    pub filter: crate::route::TopicFilter,
    /// Bounded: when full (the port is absent or slow), the message is dropped and counted;
    /// downlink is best effort, the upstream side owns retries of commands.
    pub tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

pub struct Forwarder {
    pub settings: Settings,
    pub gateway: String,
    pub grace: Duration,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    pub downlinks: Vec<Downlink>,
    /// Liveness probes from the systemd watchdog, answered from the select loops.
    pub probes: crate::service::systemd::ProbeRx,
}

/// A row between "handed to the client" and its PUBACK.
struct Inflight {
    seq: i64,
    sent: Instant,
}

impl Forwarder {
    /// Run sessions until `shutdown`, reconnecting as `link` describes; then give in-flight
    /// publishes up to the grace period for their acks.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut link = Link::Starting;
        let mut down_since = Instant::now();
        let mut state = LinkState::new(self.settings.addresses.len());
        // The address of the next session; None: probe for one. The first try goes straight
        // to the first address.
        let mut next = Some(0);
        let mut previous: Option<usize> = None;
        loop {
            let index = match next.take() {
                Some(i) => i,
                None => match self.find_address(&state, down_since, &shutdown).await {
                    Some(i) => i,
                    None => return,
                },
            };
            let (host, port) = self.settings.addresses[index].clone();
            self.settings.host = host;
            self.settings.port = port;
            let report = Arc::new(Report::default());
            self.settings.report = report.clone();
            // Cancelled by shutdown, or by the watcher to go back to a preferred address: the
            // session treats both alike (stop publishing, wait for in-flight acks, disconnect).
            let session_stop = shutdown.child_token();
            let watcher = tokio::spawn(link::watch_session(
                link::Watch {
                    index,
                    previous,
                    addresses: self.settings.addresses.clone(),
                    failback_after: self.settings.failback_after,
                    probe_timeout: self.probe_timeout(),
                    blocked_until: state.blocks(),
                    metrics: self.metrics.clone(),
                    stop: session_stop.clone(),
                },
                report.connected(),
            ));
            let started = Instant::now();
            let end = self.session(&session_stop, &mut link, down_since).await;
            let lived = started.elapsed();
            let failback = session_stop.is_cancelled() && !shutdown.is_cancelled();
            let failback_to = if failback {
                watcher.await.ok().flatten()
            } else {
                watcher.abort();
                None
            };
            self.metrics.upstream_connected.set(0);
            let connected = *report.connected().borrow();
            if connected {
                previous = Some(index);
                state.connected(index);
            }
            let now = Instant::now();
            match end {
                End::StoreClosed => break,
                End::Shutdown if !failback => break,
                End::Shutdown => {
                    self.metrics.upstream_failbacks.inc();
                    state
                        .outage
                        .connection_ended(lived, self.settings.reconnect.stable_after, now);
                    next = Some(failback_to.unwrap_or(0));
                }
                End::Failed { error, connected } => {
                    self.metrics.upstream_errors.inc();
                    let reconnect = &self.settings.reconnect;
                    if connected {
                        state
                            .outage
                            .connection_ended(lived, reconnect.stable_after, now);
                    } else {
                        state.outage.failed(now);
                    }
                    let failure = report.take_failure().unwrap_or(LinkError::Network(error));
                    let key = match &failure {
                        LinkError::Network(_) => None,
                        LinkError::Refused { reason, .. } => {
                            self.metrics.count_upstream_refusal(reason.label());
                            Some(format!("refused:{}", reason.label()))
                        }
                        LinkError::Tls { reason, .. } => {
                            self.metrics.count_upstream_tls_failure(reason.label());
                            Some(format!("tls:{}", reason.label()))
                        }
                    };
                    // An address that answered but did not give a working session is skipped
                    // for a while, so the next one is tried (failover); after a refusal or a
                    // certificate failure for the longest time at once (circuit breaker).
                    let blocked_for = if failure.needs_operator() {
                        reconnect.breaker(fastrand::f64())
                    } else if !connected {
                        reconnect.delay(state.outage.age(now), fastrand::f64())
                    } else {
                        Duration::ZERO
                    };
                    if !blocked_for.is_zero() {
                        state.block(index, now + blocked_for);
                    }
                    let first = link != Link::Down;
                    if first {
                        down_since = now;
                        link = Link::Down;
                    }
                    let depth = self.metrics.queue_depth.get();
                    let address = format!("{}:{}", self.settings.host, self.settings.port);
                    let new_kind = match &key {
                        Some(k) => state.first_report(Some(index), k),
                        None => state.first_report(None, "network"),
                    };
                    if failure.needs_operator() && new_kind {
                        error!(%address, error = %failure, depth, retry_in = ?blocked_for,
                            "upstream refuses this gateway; messages wait on disk; retrying only after upstream.backoff_max (circuit breaker)");
                    } else if key.is_some() && new_kind {
                        warn!(%address, error = %failure, depth, "upstream is busy; messages wait on disk; retrying with backoff");
                    } else if first && connected {
                        warn!(%address, error = %failure, depth, "upstream connection lost; messages wait on disk; reconnecting");
                    } else if first {
                        warn!(%address, error = %failure, depth, "upstream unreachable; messages wait on disk; retrying");
                    } else {
                        debug!(%address, error = %failure, outage = ?state.outage.age(now), "upstream attempt failed");
                    }
                }
            }
        }
    }

    /// While down: wait the outage delay, then probe the addresses in order and return the
    /// first that answers, after the spread. None on shutdown.
    async fn find_address(
        &mut self,
        state: &LinkState,
        down_since: Instant,
        shutdown: &CancellationToken,
    ) -> Option<usize> {
        let timeout = self.probe_timeout();
        loop {
            let now = Instant::now();
            let age = state.outage.age(now);
            let mut wait = self.settings.reconnect.delay(age, fastrand::f64());
            if let Some(free) = state.all_blocked_until(now) {
                wait = wait.max(free.saturating_duration_since(now));
            }
            self.guarded(tokio::time::sleep(wait), shutdown).await?;
            for i in 0..self.settings.addresses.len() {
                if state.blocked(i, Instant::now()) {
                    continue;
                }
                let (host, port) = self.settings.addresses[i].clone();
                self.metrics.upstream_probes.inc();
                if self
                    .guarded(link::probe(&host, port, timeout), shutdown)
                    .await?
                {
                    let spread = self
                        .settings
                        .reconnect
                        .spread(down_since.elapsed(), fastrand::f64());
                    debug!(address = %format!("{host}:{port}"), ?spread, "upstream port answers; connecting after the spread");
                    self.guarded(tokio::time::sleep(spread), shutdown).await?;
                    return Some(i);
                }
            }
        }
    }

    /// Await `fut` while answering liveness probes; None if `shutdown` comes first.
    async fn guarded<F: std::future::Future>(
        &mut self,
        fut: F,
        shutdown: &CancellationToken,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                Some(reply) = self.probes.recv() => answer(Some(reply)),
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    fn probe_timeout(&self) -> Duration {
        self.settings.connect_timeout.min(link::PROBE_TIMEOUT)
    }

    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        link: &mut Link,
        down_since: Instant,
    ) -> End {
        if shutdown.is_cancelled() {
            return End::Shutdown;
        }
        let (client, mut events, task) = match UpClient::connect(&self.settings) {
            Ok(x) => x,
            Err(error) => {
                return End::Failed {
                    error,
                    connected: false,
                }
            }
        };
        let end = self
            .drive(&client, &mut events, shutdown, link, down_since)
            .await;
        if matches!(end, End::Shutdown) {
            client.disconnect().await;
            // Let the DISCONNECT go out, briefly.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while events.recv().await.is_some() {}
            })
            .await;
        }
        task.abort();
        end
    }

    async fn drive(
        &mut self,
        client: &UpClient,
        events: &mut client::Events,
        shutdown: &CancellationToken,
        link: &mut Link,
        down_since: Instant,
    ) -> End {
        let window = self.settings.window as usize;
        let mut committed = self.store.committed();
        let mut connected = false;
        let mut max_packet: Option<u32> = None;
        // Every session re-reads from the oldest unacknowledged row.
        let mut cursor = 0i64;
        let mut more = true;
        let mut unsent: VecDeque<Inflight> = VecDeque::with_capacity(window);
        let mut inflight: HashMap<u16, Inflight> = HashMap::with_capacity(window);
        let mut draining: Option<tokio::time::Instant> = None;
        // Rows read ahead of the window, so the store is asked once per batch rather than once
        // per PUBACK. Refilled when less than a window's worth is left.
        let prefetch = window + window.clamp(64, 1024);
        let mut ready: VecDeque<Row> = VecDeque::with_capacity(prefetch);

        loop {
            if connected && draining.is_none() {
                if more && ready.len() < window {
                    committed.borrow_and_update();
                    let rows = match self.store.fetch(cursor, prefetch - ready.len()).await {
                        Ok(rows) => rows,
                        Err(e) => {
                            error!(error = %e, "forwarder cannot read the store");
                            return End::StoreClosed;
                        }
                    };
                    // Empty means caught up: wait for the next commit. (A short batch may be
                    // cut by size, so only an empty one says so.)
                    more = !rows.is_empty();
                    if let Some(last) = rows.last() {
                        cursor = last.seq;
                    }
                    ready.extend(rows);
                }
                while unsent.len() + inflight.len() < window {
                    let Some(row) = ready.pop_front() else { break };
                    if let Some(limit) = max_packet {
                        if packet_size(&row, &self.settings.id_property) > limit as usize {
                            self.refuse(
                                row.seq,
                                format!("larger than the upstream maximum packet size {limit}"),
                            )
                            .await;
                            continue;
                        }
                    }
                    let Row {
                        seq,
                        topic,
                        payload,
                        ..
                    } = row;
                    let id = self.message_id(seq);
                    if let Err(error) = client.publish(&topic, payload, id).await {
                        return End::Failed { error, connected };
                    }
                    self.metrics.published.inc();
                    unsent.push_back(Inflight {
                        seq,
                        sent: Instant::now(),
                    });
                }
                // Read ahead again at once if the window still has room and rows remain.
                if more && ready.len() < window && unsent.len() + inflight.len() < window {
                    continue;
                }
            }
            if draining.is_some() && unsent.is_empty() && inflight.is_empty() {
                return End::Shutdown;
            }
            let grace_over = async {
                match draining {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(UpEvent::Connected { max_packet: mp })) => {
                        connected = true;
                        max_packet = mp;
                        self.metrics.upstream_connects.inc();
                        self.metrics.upstream_connected.set(1);
                        let backlog = self.metrics.queue_depth.get();
                        match *link {
                            Link::Down => info!(backlog, down_for = ?down_since.elapsed(), "upstream connected again; draining the backlog"),
                            _ => info!(backlog, "upstream connected"),
                        }
                        *link = Link::Up;
                        for d in &self.downlinks {
                            if let Err(error) = client.subscribe(d.filter.as_str()).await {
                                return End::Failed { error, connected };
                            }
                        }
                    }
                    Some(Ok(UpEvent::Message { topic, payload })) => self.deliver_downlink(&topic, payload),
                    Some(Ok(UpEvent::Sent(pkid))) => match unsent.pop_front() {
                        Some(m) => {
                            inflight.insert(pkid, m);
                        }
                        None => warn!(pkid, "upstream client sent a publish the forwarder did not queue"),
                    },
                    Some(Ok(UpEvent::Acked { pkid, refusal })) => {
                        let Some(m) = inflight.remove(&pkid) else {
                            debug!(pkid, "PUBACK for an unknown packet id ignored");
                            continue;
                        };
                        self.metrics.upstream_ack_latency.record(m.sent.elapsed());
                        match refusal {
                            None => {
                                if self.store.ack(m.seq).await.is_err() {
                                    return End::StoreClosed;
                                }
                            }
                            Some(r) if !r.retry => self.refuse(m.seq, r.reason).await,
                            Some(r) => {
                                // Transient refusal: reconnect later and resend from the queue.
                                return End::Failed { error: r.reason, connected };
                            }
                        }
                    }
                    Some(Err(error)) => return End::Failed { error, connected },
                    None => return End::Failed { error: "upstream event loop ended".into(), connected },
                },
                changed = committed.changed(), if !more => {
                    if changed.is_err() {
                        return End::StoreClosed;
                    }
                    more = true;
                }
                _ = shutdown.cancelled(), if draining.is_none() => {
                    if !connected || (unsent.is_empty() && inflight.is_empty()) {
                        return End::Shutdown;
                    }
                    debug!(in_flight = unsent.len() + inflight.len(), "waiting for in-flight acks before stopping");
                    draining = Some(tokio::time::Instant::now() + self.grace);
                }
                Some(reply) = self.probes.recv() => answer(Some(reply)),
                _ = grace_over => {
                    warn!(unacked = unsent.len() + inflight.len(),
                        "shutdown grace over; unacknowledged messages stay queued and are resent at next start");
                    return End::Shutdown;
                }
            }
        }
    }

    fn deliver_downlink(&self, topic: &str, payload: Vec<u8>) {
        self.metrics.downlink_received.inc();
        let mut delivered = false;
        for d in self.downlinks.iter().filter(|d| d.filter.matches(topic)) {
            if d.tx.try_send(payload.clone()).is_ok() {
                delivered = true;
            }
        }
        if !delivered {
            self.metrics.downlink_dropped.inc();
            warn!(%topic, "downlink message dropped: no port ready for it");
        }
    }

    async fn refuse(&self, seq: i64, reason: String) {
        error!(id = %self.message_id(seq), %reason, "upstream refused a message; moved to the dead-letter table");
        self.metrics.dead_lettered.inc();
        let _ = self.store.dead_letter(seq, reason).await;
    }

    fn message_id(&self, seq: i64) -> String {
        format!("{}-{}-{}", self.gateway, self.store.epoch(), seq)
    }
}

/// Upper estimate of a publish packet's size on the wire.
fn packet_size(row: &Row, id_property: &str) -> usize {
    row.payload.len() + row.topic.len() + id_property.len() + 64 + 32
}
