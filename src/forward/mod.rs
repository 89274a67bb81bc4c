//! The forwarder: reads committed rows oldest first, publishes them upstream with QoS 1 inside a
//! bounded window, and deletes each row only on the upstream's PUBACK for it.
//!
//! # Packet ids
//!
//! rumqttc does not tell `publish()` callers the packet id; it reports `Outgoing::Publish(pkid)`
//! events in the order publishes were queued. The forwarder keeps a FIFO of rows handed to the
//! client and pairs each with the next such event, then a pkid -> row map until the PUBACK.
//!
//! It also predicts each id before handing a publish over ([`PacketIds`]), and holds a row back
//! while the id it would get still belongs to an unacknowledged row. rumqttc would otherwise
//! park such a publish as a "collision" until that id is acknowledged, and it forgets to release
//! it when the acknowledgement is a refusal (rumqttc 0.25, `v5/state.rs`), stalling the session
//! until a keepalive timeout. Should rumqttc still report a collision, or an id other than the
//! predicted one, the session is restarted at once.
//!
//! # Quarantine
//!
//! No row may stop the queue, whatever is in the store:
//! - **Refused locally.** A row that cannot be read, whose topic is not a valid MQTT topic name,
//!   or whose encoded PUBLISH exceeds the upstream's (or the client's) maximum packet size is
//!   moved to the dead-letter table before it is sent.
//! - **Refused by the upstream.** A PUBACK reason, or an MQTT 5 DISCONNECT reason, that names
//!   the message (topic name invalid, packet too large, payload format invalid, not authorised)
//!   is final for it: with one row in flight that row is dead-lettered at once; with several,
//!   the oldest is sent alone on the next connection to confirm it.
//! - **Poison.** When a connection is lost with rows in flight, the oldest becomes the suspect;
//!   the next connection sends it alone (window 1), after the link proved it stays up without
//!   it. Lost again shortly after it went out (or never acknowledged while the upstream answers
//!   other packets) is a strike; `upstream.poison_after` strikes in a row quarantine it with
//!   reason `poison`. Its acknowledgement clears the suspicion and restores the full window.
//!   Connection attempts that fail, and sessions ended for reasons about no message (a silent
//!   link, a broker shutting down), never strike, so an outage dead-letters nothing.
//!
//! Every session starts reading from the oldest row, so after a reconnect whatever was in flight
//! is resent with the same message id: at-least-once, with duplicates bounded by the window.

pub use crate::backoff;
pub mod client;
pub mod link;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Protocol;
use crate::health::answer;
use crate::queue::{Row, StoreHandle};
use crate::telemetry::{DeadLetterReason, Metrics};
use client::{LinkError, Report, SessionError, Settings, UpClient, UpEvent};
use link::LinkState;

/// Batches of freshly committed rows the store may push ahead of the forwarder before it stops
/// pushing and the forwarder reads them itself.
const TAIL_BATCHES: usize = 16;

/// How a session ended.
enum End {
    /// Shutdown requested and handled.
    Shutdown,
    /// The store is gone (only at shutdown).
    StoreClosed,
    /// The connection failed or was lost.
    Failed {
        error: SessionError,
        connected: bool,
    },
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
    pub probes: crate::health::ProbeRx,
}

/// A row handed to the client, waiting for its `Sent` event.
struct Handed {
    seq: i64,
    /// The packet id rumqttc will give it (see [`PacketIds`]).
    pkid: u16,
    topic: String,
}

/// A row on the wire, waiting for its PUBACK.
struct Inflight {
    seq: i64,
    topic: String,
    sent: Instant,
}

/// Packet ids in the order rumqttc 0.25 assigns them (`next_pkid` in `state.rs` and
/// `v5/state.rs`): 1, 2, ..., max, 1, 2, ..., where max is the client's in-flight limit (MQTT 5:
/// lowered to the broker's Receive Maximum by its CONNACK). Publishes and subscribes draw from
/// the same sequence, and each session starts a fresh one.
#[derive(Debug, Clone)]
struct PacketIds {
    last: u16,
    max: u16,
}

impl PacketIds {
    fn new(max: u16) -> PacketIds {
        PacketIds {
            last: 0,
            max: max.max(1),
        }
    }

    /// The id the next publish or subscribe will get.
    fn peek(&self) -> u16 {
        self.last + 1
    }

    /// Consume the next id (a publish or subscribe was handed to the client).
    fn take(&mut self) -> u16 {
        let next = self.last + 1;
        self.last = if next >= self.max { 0 } else { next };
        next
    }
}

/// The row blamed for the last lost connection: sent alone on the next connections until it is
/// acknowledged (suspicion cleared) or quarantined. Kept in memory only: after a restart the
/// first lost connection marks it again.
#[derive(Debug, Clone)]
struct Suspect {
    seq: i64,
    strikes: u32,
    /// A reason code that named a message while several were in flight: final for this row if
    /// it recurs while the row is alone on the wire.
    named: Option<(DeadLetterReason, String)>,
}

/// One session's view of the rows it handed out and of the link.
struct Flight {
    started: Instant,
    connected_at: Option<Instant>,
    /// From the start of the attempt to CONNACK (TCP, TLS, MQTT): the link's round-trip scale.
    handshake: Duration,
    unsent: VecDeque<Handed>,
    inflight: HashMap<u16, Inflight>,
    /// When the upstream last sent anything (an ack, a PINGRESP).
    last_heard: Option<Instant>,
    pkids: PacketIds,
    /// In a probe session: the suspect goes out only after the link stayed up this long, so a
    /// link that dies right after every connect is not taken for a message that kills it.
    probe_at: Option<Instant>,
}

impl Flight {
    fn new(window: u16) -> Flight {
        Flight {
            started: Instant::now(),
            connected_at: None,
            handshake: Duration::ZERO,
            unsent: VecDeque::with_capacity(window as usize),
            inflight: HashMap::with_capacity(window as usize),
            last_heard: None,
            pkids: PacketIds::new(window),
            probe_at: None,
        }
    }

    /// How soon after the suspect went out a lost connection counts as a strike: a broker
    /// that refuses a packet closes the connection within about a round trip; a link that
    /// fails does so at any moment. Four handshakes, at least 1 s, at most 10 s.
    fn strike_window(&self) -> Duration {
        (self.handshake * 4).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// How long a probe session waits after CONNACK before sending the suspect: two
    /// handshakes, at least 100 ms, at most 5 s.
    fn settle(&self) -> Duration {
        (self.handshake * 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
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
        let mut suspect: Option<Suspect> = None;
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
            let end = self
                .session(&session_stop, &mut link, down_since, &mut suspect)
                .await;
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
                    let failure = report
                        .take_failure()
                        .unwrap_or_else(|| LinkError::Network(error.to_string()));
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
        suspect: &mut Option<Suspect>,
    ) -> End {
        if shutdown.is_cancelled() {
            return End::Shutdown;
        }
        let mut flight = Flight::new(self.settings.window);
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
            .drive(
                &client,
                &mut events,
                shutdown,
                link,
                down_since,
                &mut flight,
                suspect,
            )
            .await;
        match &end {
            End::Shutdown => {
                client.disconnect().await;
                // Let the DISCONNECT go out, briefly.
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while events.recv().await.is_some() {}
                })
                .await;
            }
            End::Failed { error, .. } => self.judge(&flight, error, suspect).await,
            End::StoreClosed => {}
        }
        task.abort();
        end
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &mut self,
        client: &UpClient,
        events: &mut client::Events,
        shutdown: &CancellationToken,
        link: &mut Link,
        down_since: Instant,
        flight: &mut Flight,
        suspect: &mut Option<Suspect>,
    ) -> End {
        let mut window = self.settings.window as usize;
        // Once caught up, the store pushes freshly committed rows here instead of being asked.
        let mut tail: Option<tokio::sync::mpsc::Receiver<Vec<Row>>> = None;
        let mut connected = false;
        // The upstream's maximum packet size (MQTT 5 CONNACK); with MQTT 3.1.1, the client's own
        // limit, which rumqttc enforces by failing the session.
        let mut max_packet: Option<u32> = match self.settings.protocol {
            Protocol::V311 => Some(u32::try_from(self.settings.max_packet).unwrap_or(u32::MAX)),
            Protocol::V5 => None,
        };
        // Every session re-reads from the oldest unacknowledged row.
        let mut cursor = 0i64;
        let mut more = true;
        // The client's event loop has stopped taking requests; its reason is on `events`.
        let mut client_gone = false;
        let mut draining: Option<tokio::time::Instant> = None;
        // Rows read ahead of the window, so the store is asked once per batch rather than once
        // per PUBACK. Refilled when less than a window's worth is left.
        let prefetch = window + window.clamp(64, 1024);
        let mut ready: VecDeque<Row> = VecDeque::with_capacity(prefetch);
        // Checks for a row left unacknowledged (see `SessionError::Unacked`).
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ack_timeout = self.settings.keepalive * 2;

        loop {
            let mut settling = false;
            if connected && draining.is_none() && !client_gone {
                if more && ready.len() < window {
                    let (tail_tx, tail_rx) = tokio::sync::mpsc::channel(TAIL_BATCHES);
                    let rows = match self
                        .store
                        .fetch_or_tail(cursor, prefetch - ready.len(), Some(tail_tx))
                        .await
                    {
                        Ok(rows) => rows,
                        Err(e) => {
                            error!(error = %e, "forwarder cannot read the store");
                            return End::StoreClosed;
                        }
                    };
                    // Empty means caught up: the store now pushes each commit's rows into the
                    // tail. (A short batch may be cut by size, so only an empty one says so.)
                    more = !rows.is_empty();
                    tail = (!more).then_some(tail_rx);
                    // Max, not last: dead letters replayed under their original (lower) seqs
                    // come back before newer rows (see `queue` invariants).
                    if let Some(max) = rows.iter().map(|r| r.seq).max() {
                        cursor = cursor.max(max);
                    }
                    ready.extend(rows);
                }
                loop {
                    // A suspect goes out alone; rows before it (if any) one at a time too.
                    let limit = if suspect.is_some() { 1 } else { window };
                    if flight.unsent.len() + flight.inflight.len() >= limit {
                        break;
                    }
                    let Some(next_seq) = ready.front().map(|r| r.seq) else {
                        break;
                    };
                    if let Some(s) = suspect.as_ref() {
                        if next_seq > s.seq {
                            // Acknowledged or quarantined meanwhile: nothing left to prove.
                            *suspect = None;
                            continue;
                        }
                        if flight.probe_at.is_some_and(|at| Instant::now() < at) {
                            settling = true;
                            break;
                        }
                    }
                    // Never hand rumqttc a publish whose packet id is still in flight.
                    let pkid = flight.pkids.peek();
                    if flight.inflight.contains_key(&pkid)
                        || flight.unsent.iter().any(|h| h.pkid == pkid)
                    {
                        break;
                    }
                    let Some(row) = ready.pop_front() else { break };
                    let id = self.message_id(row.seq);
                    let Row {
                        seq,
                        topic,
                        payload,
                        defect,
                        ..
                    } = row;
                    let payload = Bytes::from(payload);
                    if let Some((reason, detail)) =
                        self.unsendable(&topic, &payload, &id, defect, max_packet)
                    {
                        self.quarantine(seq, &topic, reason, &detail).await;
                        continue;
                    }
                    if client.publish(&topic, payload, id).await.is_err() {
                        client_gone = true;
                        break;
                    }
                    flight.pkids.take();
                    self.metrics.published.inc();
                    flight.unsent.push_back(Handed { seq, pkid, topic });
                }
                // Read ahead again at once if the window still has room and rows remain.
                if more
                    && !client_gone
                    && !settling
                    && ready.len() < window
                    && flight.unsent.len() + flight.inflight.len() < window
                    && suspect.is_none()
                {
                    continue;
                }
            }
            if draining.is_some() && flight.unsent.is_empty() && flight.inflight.is_empty() {
                return End::Shutdown;
            }
            let grace_over = async {
                match draining {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let settled = async {
                match flight.probe_at {
                    Some(at) if settling => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(UpEvent::Connected { max_packet: mp, receive_max })) => {
                        connected = true;
                        let now = Instant::now();
                        flight.connected_at = Some(now);
                        flight.handshake = now.duration_since(flight.started);
                        if suspect.is_some() {
                            flight.probe_at = Some(now + flight.settle());
                        }
                        if let Some(mp) = mp {
                            max_packet = Some(mp);
                        }
                        // rumqttc lowers its in-flight limit, and so its packet id cycle, to
                        // the broker's Receive Maximum; the window follows.
                        let limit = receive_max.map_or(self.settings.window, |r| r.min(self.settings.window));
                        window = usize::from(limit.max(1));
                        flight.pkids = PacketIds::new(limit);
                        self.metrics.upstream_connects.inc();
                        self.metrics.upstream_connected.set(1);
                        let backlog = self.metrics.queue_depth.get();
                        match *link {
                            Link::Down => info!(backlog, down_for = ?down_since.elapsed(), "upstream connected again; draining the backlog"),
                            _ => info!(backlog, "upstream connected"),
                        }
                        *link = Link::Up;
                        for d in &self.downlinks {
                            if let Err(e) = client.subscribe(d.filter.as_str()).await {
                                return End::Failed {
                                    error: SessionError::Ended(format!("cannot subscribe to downlink {}: {e}", d.filter.as_str())),
                                    connected,
                                };
                            }
                            flight.pkids.take();
                        }
                    }
                    Some(Ok(UpEvent::Message { topic, payload })) => {
                        flight.last_heard = Some(Instant::now());
                        self.deliver_downlink(&topic, payload);
                    }
                    Some(Ok(UpEvent::Heard)) => flight.last_heard = Some(Instant::now()),
                    Some(Ok(UpEvent::Sent(pkid))) => match flight.unsent.pop_front() {
                        Some(h) if h.pkid == pkid => {
                            flight.inflight.insert(pkid, Inflight { seq: h.seq, topic: h.topic, sent: Instant::now() });
                        }
                        Some(h) => {
                            // The row map would no longer be trustworthy: start over.
                            return End::Failed {
                                error: SessionError::Ended(format!("upstream client sent packet id {pkid} where {} was expected", h.pkid)),
                                connected,
                            };
                        }
                        None => warn!(pkid, "upstream client sent a publish the forwarder did not queue"),
                    },
                    Some(Ok(UpEvent::Collision(pkid))) => {
                        return End::Failed {
                            error: SessionError::Ended(format!("upstream client parked a publish on packet id {pkid}, still in flight")),
                            connected,
                        };
                    }
                    Some(Ok(UpEvent::Acked { pkid, refusal })) => {
                        flight.last_heard = Some(Instant::now());
                        let Some(m) = flight.inflight.remove(&pkid) else {
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
                            Some(r) if !r.retry => self.quarantine(m.seq, &m.topic, r.label, &r.reason).await,
                            Some(r) => {
                                // Transient refusal: reconnect later and resend from the queue.
                                return End::Failed { error: SessionError::Ended(r.reason), connected };
                            }
                        }
                        if suspect.as_ref().is_some_and(|s| s.seq == m.seq) {
                            info!(id = %self.message_id(m.seq), "the message sent alone after the lost connection was acknowledged; resuming the full window");
                            *suspect = None;
                        }
                    }
                    Some(Err(error)) => return End::Failed { error, connected },
                    None => return End::Failed { error: SessionError::Ended("upstream event loop ended".into()), connected },
                },
                batch = async {
                    match tail.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => None,
                    }
                }, if !more && ready.len() < window => match batch {
                    Some(rows) => {
                        if let Some(last) = rows.last() {
                            cursor = last.seq;
                        }
                        ready.extend(rows);
                    }
                    // The store stopped pushing (we fell behind, or it closed): read again.
                    None => {
                        tail = None;
                        more = true;
                    }
                },
                _ = shutdown.cancelled(), if draining.is_none() => {
                    if !connected || (flight.unsent.is_empty() && flight.inflight.is_empty()) {
                        return End::Shutdown;
                    }
                    debug!(in_flight = flight.unsent.len() + flight.inflight.len(), "waiting for in-flight acks before stopping");
                    draining = Some(tokio::time::Instant::now() + self.grace);
                }
                Some(reply) = self.probes.recv() => answer(Some(reply)),
                _ = grace_over => {
                    warn!(unacked = flight.unsent.len() + flight.inflight.len(),
                        "shutdown grace over; unacknowledged messages stay queued and are resent at next start");
                    return End::Shutdown;
                }
                _ = settled => {}
                _ = tick.tick(), if !flight.inflight.is_empty() => {
                    // A row the upstream keeps unacknowledged while answering other packets
                    // would hold its packet id, and so the queue, for ever: end the session so
                    // it is sent again (and, if it happens again, alone).
                    let stuck = flight.inflight.values().min_by_key(|m| m.sent).filter(|m| {
                        m.sent.elapsed() >= ack_timeout && flight.last_heard.is_some_and(|h| h > m.sent)
                    });
                    if let Some(m) = stuck {
                        return End::Failed {
                            error: SessionError::Unacked(format!(
                                "message {} not acknowledged within {ack_timeout:?} while the upstream answered other packets",
                                self.message_id(m.seq)
                            )),
                            connected,
                        };
                    }
                }
            }
        }
    }

    /// Why a row cannot be sent at all, if it cannot: checked before publishing, since the
    /// store may hold rows from an older version and the upstream's limits are learnt only at
    /// CONNACK.
    fn unsendable(
        &self,
        topic: &str,
        payload: &Bytes,
        id: &str,
        defect: Option<String>,
        max_packet: Option<u32>,
    ) -> Option<(DeadLetterReason, String)> {
        if let Some(d) = defect {
            return Some((DeadLetterReason::Undecodable, d));
        }
        if let Some(problem) = client::topic_name_problem(topic) {
            return Some((DeadLetterReason::InvalidTopic, problem));
        }
        let limit = max_packet? as usize;
        let prop = &self.settings.id_property;
        // Fast path: far enough below the limit whatever the header sizes are.
        if payload.len() + topic.len() + prop.len() + id.len() + 32 <= limit {
            return None;
        }
        let size = client::publish_size(self.settings.protocol, topic, payload, prop, id);
        (size > limit).then(|| {
            (
                DeadLetterReason::TooLarge,
                format!("the {size}-byte PUBLISH exceeds the maximum packet size {limit}"),
            )
        })
    }

    /// Decide what a failed session says about the rows it had on the wire: quarantine one
    /// that a reason code named or that struck out, or mark the oldest as the suspect to send
    /// alone next time. Sessions that never connected blame nobody.
    async fn judge(&self, flight: &Flight, error: &SessionError, suspect: &mut Option<Suspect>) {
        if flight.connected_at.is_none() {
            return;
        }
        // Handed rows that never went out cannot be the cause; of those that did, brokers
        // answer in order and the acks read before the failure were applied, so the oldest
        // unacknowledged one is the likeliest.
        let Some(oldest) = flight.inflight.values().min_by_key(|m| m.seq) else {
            return;
        };
        let alone = flight.inflight.len() == 1;
        let current = suspect.take();
        let previous = current.clone().filter(|s| s.seq == oldest.seq);
        match error {
            SessionError::Message { reason, detail } if alone => {
                self.quarantine(oldest.seq, &oldest.topic, *reason, detail)
                    .await;
                *suspect = current.filter(|s| s.seq != oldest.seq);
            }
            SessionError::Message { reason, detail } => {
                debug!(id = %self.message_id(oldest.seq), %error, "the upstream named a message while several were in flight; the oldest is sent alone next");
                *suspect = Some(Suspect {
                    seq: oldest.seq,
                    strikes: previous.map_or(0, |s| s.strikes),
                    named: Some((*reason, detail.clone())),
                });
            }
            SessionError::Lost(_) | SessionError::Unacked(_) => {
                let Some(mut s) = previous.filter(|_| alone) else {
                    debug!(id = %self.message_id(oldest.seq), %error, "connection lost with messages in flight; the oldest is sent alone next");
                    *suspect = Some(Suspect {
                        seq: oldest.seq,
                        strikes: 0,
                        named: None,
                    });
                    return;
                };
                let after = oldest.sent.elapsed();
                let strike =
                    matches!(error, SessionError::Unacked(_)) || after <= flight.strike_window();
                if !strike {
                    debug!(id = %self.message_id(s.seq), ?after, "connection lost long after the suspect was sent; not counted against it");
                    *suspect = Some(s);
                    return;
                }
                s.strikes += 1;
                self.metrics.poison_strikes.inc();
                let limit = self.settings.poison_after;
                warn!(id = %self.message_id(s.seq), topic = ?oldest.topic, strikes = s.strikes, of = limit, ?after, %error,
                    "upstream ended the connection right after this message was sent alone");
                if let Some((reason, named)) = s.named.take() {
                    // The upstream had named a message for this failure; now the connection
                    // died with this one alone on the wire: that confirms it.
                    let detail = format!("{named}; then the connection was lost right after it was sent alone ({error})");
                    self.quarantine(s.seq, &oldest.topic, reason, &detail).await;
                } else if s.strikes >= limit {
                    let detail = format!(
                        "the upstream ended the connection {} times in a row right after this message was sent alone (last: {error})",
                        s.strikes
                    );
                    self.quarantine(s.seq, &oldest.topic, DeadLetterReason::Poison, &detail)
                        .await;
                } else {
                    *suspect = Some(s);
                }
            }
            // An outage, a refusal of the connection, or an end about no message: the suspect
            // (if any) stays as it was.
            _ => *suspect = current,
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

    /// Move a row to the dead-letter table, with one ERROR line and a count by reason. The
    /// stored reason starts with the label (`poison: ...`).
    async fn quarantine(&self, seq: i64, topic: &str, reason: DeadLetterReason, detail: &str) {
        error!(id = %self.message_id(seq), ?topic, reason = reason.as_str(), %detail,
            "message moved to the dead-letter table; the queue continues without it");
        self.metrics.count_dead_letter(reason);
        let _ = self
            .store
            .dead_letter(seq, format!("{}: {detail}", reason.as_str()))
            .await;
    }

    fn message_id(&self, seq: i64) -> String {
        format!("{}-{}-{}", self.gateway, self.store.epoch(), seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_cycle_like_rumqttc() {
        // rumqttc: 1..=max, then 1 again.
        let mut ids = PacketIds::new(3);
        let got: Vec<u16> = (0..7).map(|_| ids.take()).collect();
        assert_eq!(got, [1, 2, 3, 1, 2, 3, 1]);
        let mut one = PacketIds::new(1);
        assert_eq!((one.take(), one.take(), one.peek()), (1, 1, 1));
        let mut max = PacketIds::new(u16::MAX);
        for _ in 0..u16::MAX - 1 {
            max.take();
        }
        assert_eq!((max.take(), max.take()), (u16::MAX, 1));
    }
}
