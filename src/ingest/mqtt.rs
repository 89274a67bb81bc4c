//! The embedded MQTT broker (rumqttd) devices publish to, and the local links that carry every
//! routed publish into the queue.
//!
//! rumqttd acknowledges a device's QoS 1 publish once it is in its in-memory log, before
//! edgeferry commits it: that is the documented loss window (README, "Delivery contract"). Each
//! route has its own link subscribed to its filter, so a message matching two routes is queued
//! once per route, and every link reads as fast as the store accepts; with back-pressure
//! ([`super::gate`]) devices are held back while the store is behind. The broker keeps
//! `local.buffer` bytes of log per route; if ingest still falls further behind than that, the
//! broker skips ahead and every message skipped is counted (`edgeferry_local_dropped_total`).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Notification};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, DedupKey, RouteSpec};
use crate::dedup;
use crate::queue::{NewMessage, StoreHandle};
use crate::service::systemd::{answer, ProbeRx};
use crate::telemetry::Metrics;

use super::gate::{self, Gate};

/// Why the local broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The listen address is unusable (in use, not local, permission).
    #[error("{key} {addr}: cannot listen: {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// rumqttd refused its configuration or a link.
    #[error("local broker: {0}")]
    Broker(String),
}

/// The running local side: the broker's thread, one link per route, and with back-pressure the
/// device-facing listeners with the internal broker address each relays to.
pub struct LocalBroker {
    broker: Broker,
    links: Vec<(RouteSpec, LinkTx, LinkRx)>,
    fronts: Vec<(&'static str, std::net::TcpListener, SocketAddr)>,
    ready_addr: SocketAddr,
}

/// Segments per route log. Fewer, larger segments waste less per segment; more, smaller ones
/// make eviction drop less at a time. Four is the middle.
const SEGMENTS: u64 = 4;

impl LocalBroker {
    /// Number of local links (one per route); `run` wants one probe receiver per link.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Bind or check the listen addresses, configure rumqttd and subscribe one link per route.
    /// Devices are served from [`LocalBroker::run`].
    pub fn new(config: &Config) -> Result<LocalBroker, IngestError> {
        let mut listens = vec![("local.listen", config.local.listen)];
        if let Some(v5) = config.local.listen_v5 {
            listens.push(("local.listen_v5", v5));
        }
        let mut fronts = Vec::new();
        let mut broker_addrs = Vec::new();
        for (key, addr) in listens {
            if config.local.backpressure {
                // Devices connect to our listener; rumqttd listens on a free loopback port.
                let listener = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| IngestError::Listen { key, addr, source })?;
                let internal = free_loopback_port()
                    .map_err(|e| IngestError::Broker(format!("no internal port: {e}")))?;
                fronts.push((key, listener, internal));
                broker_addrs.push(internal);
            } else {
                // rumqttd binds on its own thread and only logs a failure there; binding here
                // first turns "address in use" into a clear start-up error.
                probe_listen(key, addr)?;
                broker_addrs.push(addr);
            }
        }
        let ready_addr = loopback(broker_addrs[0]);
        let broker_config = broker_config(config, broker_addrs[0], broker_addrs.get(1).copied())?;
        let broker = Broker::new(broker_config);
        let mut links = Vec::new();
        for (i, spec) in config.route_specs().into_iter().enumerate() {
            let (mut tx, rx) = broker
                .link(&format!("edgeferry-route-{i}"))
                .map_err(|e| IngestError::Broker(format!("link for route {i}: {e}")))?;
            tx.subscribe(spec.filter.as_str()).map_err(|e| {
                IngestError::Broker(format!("subscribe {}: {e}", spec.filter.as_str()))
            })?;
            links.push((spec, tx, rx));
        }
        Ok(LocalBroker {
            broker,
            links,
            fronts,
            ready_addr,
        })
    }

    /// Where to check that the broker itself accepts connections.
    pub fn ready_addr(&self) -> SocketAddr {
        self.ready_addr
    }

    /// Start the listeners (on rumqttd's own threads) and the ingest tasks. Returns when
    /// `shutdown` fires and every link has handed what it had read to the store.
    pub async fn run(
        self,
        gateway: String,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        probes: Vec<ProbeRx>,
        shutdown: CancellationToken,
    ) -> Result<(), IngestError> {
        let LocalBroker {
            mut broker,
            links,
            fronts,
            ready_addr,
        } = self;
        let alerts = broker
            .alerts()
            .map_err(|e| IngestError::Broker(e.to_string()))?;
        std::thread::Builder::new()
            .name("edgeferry-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    error!(error = %e, "local broker stopped");
                }
            })
            .map_err(|e| IngestError::Broker(format!("cannot start thread: {e}")))?;

        let alert_task = tokio::spawn(async move {
            while let Ok(batch) = alerts.next().await {
                for alert in batch {
                    // rumqttd does not export AlertKind; its name() is the stable handle.
                    // Cursor jumps are counted exactly, and logged, by the link that
                    // skipped (see `Gaps`); the alert itself carries no count.
                    if alert.kind.name() == "cursor_jump" {
                        debug!(client = %alert.client_id, kind = ?alert.kind, "local broker alert");
                    } else {
                        warn!(client = %alert.client_id, kind = ?alert.kind, "local broker alert");
                    }
                }
            }
        });

        let gate = (!fronts.is_empty()).then(|| Gate::new(store.clone(), metrics.clone()));
        let mut relays = Vec::new();
        for (key, listener, internal) in fronts {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| IngestError::Broker(format!("{key}: {e}")))?;
            relays.push(tokio::spawn(gate::relay(
                key,
                listener,
                internal,
                gate.clone().expect("gate exists with fronts"),
                shutdown.clone(),
            )));
        }
        if let Some(gate) = gate.clone() {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                gate.broker_ready(ready_addr, stop.clone()).await;
                stop.cancelled().await;
                gate.halt();
            });
        }
        let mut tasks = Vec::new();
        for ((spec, tx, rx), probes) in links.into_iter().zip(probes) {
            tasks.push(tokio::spawn(read_link(
                spec,
                tx,
                rx,
                probes,
                gateway.clone(),
                Sink {
                    store: store.clone(),
                    gate: gate.clone(),
                },
                metrics.clone(),
                shutdown.clone(),
            )));
        }
        for t in tasks.into_iter().chain(relays) {
            let _ = t.await;
        }
        alert_task.abort();
        Ok(())
    }
}

/// Where ingest puts messages: the store, and the gate that watches it.
#[derive(Clone)]
struct Sink {
    store: StoreHandle,
    gate: Option<Gate>,
}

/// A loopback port free right now, for rumqttd's internal listener. 127.0.0.2 (also loopback on
/// Linux) keeps it out of the way of whatever else on the box picks ports on 127.0.0.1; the port
/// is free when picked and rumqttd binds it moments later.
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.2:0")
        .or_else(|_| TcpListener::bind("127.0.0.1:0"))?
        .local_addr()
}

fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

fn probe_listen(key: &'static str, addr: SocketAddr) -> Result<(), IngestError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| IngestError::Listen { key, addr, source })
}

/// rumqttd's configuration, written as its own TOML (several of its fields are private and
/// settable only through deserialisation). Alerts (cursor jumps) are pushed every 5 s; rumqttd's
/// timer unwraps both intervals, so meters must be configured too (daily, unused).
fn broker_config(
    config: &Config,
    listen: SocketAddr,
    listen_v5: Option<SocketAddr>,
) -> Result<rumqttd::Config, IngestError> {
    let l = &config.local;
    let segment = (l.buffer.0 / SEGMENTS).max(l.max_payload.0 + 1024);
    let connections = format!(
        "connection_timeout_ms = 10000\nmax_payload_size = {}\nmax_inflight_count = 100\ndynamic_filters = true\n",
        l.max_payload.0
    );
    let mut text = format!(
        "id = 0\n\
         [router]\nid = 0\nmax_connections = {}\nmax_outgoing_packet_count = 1024\nmax_segment_size = {segment}\nmax_segment_count = {SEGMENTS}\n\
         [metrics.alerts]\npush_interval = 5\n[metrics.meters]\npush_interval = 86400\n\
         [v4.1]\nname = \"local-v4\"\nlisten = \"{}\"\nnext_connection_delay_ms = 0\n[v4.1.connections]\n{connections}",
        // Our own links count against the router's connection limit.
        l.max_connections + config.routes.len() + 8,
        listen,
    );
    if let Some(v5) = listen_v5 {
        text += &format!(
            "[v5.1]\nname = \"local-v5\"\nlisten = \"{v5}\"\nnext_connection_delay_ms = 0\n[v5.1.connections]\n{connections}"
        );
    }
    toml::from_str(&text).map_err(|e| IngestError::Broker(format!("internal config: {e}")))
}

/// Read one route's link until shutdown, queueing every publish.
#[allow(clippy::too_many_arguments)] // one task per route: its link ends, probe, and shared context
async fn read_link(
    spec: RouteSpec,
    _tx: LinkTx,
    mut rx: LinkRx,
    mut probes: ProbeRx,
    gateway: String,
    sink: Sink,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let route = spec.filter.as_str().to_string();
    let mut gaps = Gaps::new(&route);
    loop {
        let notification = tokio::select! {
            biased;
            n = rx.next() => n,
            Some(reply) = probes.recv() => {
                answer(Some(reply));
                continue;
            }
            _ = shutdown.cancelled() => break,
        };
        if !handle(
            notification,
            &spec,
            &gateway,
            &mut rx,
            &sink,
            &metrics,
            &mut gaps,
        )
        .await
        {
            return;
        }
    }
    // Shutdown: take what the broker already handed us (acknowledged to devices) without
    // waiting for more, so it is committed rather than lost.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(50), rx.next()).await {
            Ok(n @ Ok(Some(_))) => {
                if !handle(n, &spec, &gateway, &mut rx, &sink, &metrics, &mut gaps).await {
                    return;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    gaps.flush();
    info!(%route, "ingest stopped");
}

/// Counts what the broker evicted from a route's log before its link read it.
///
/// Every publish in a filter's log has an absolute offset, one more than the previous; the link
/// reads them in order. A gap between consecutive offsets is exactly the number of messages that
/// were acknowledged to devices and then evicted unread (rumqttd's own alert says only that a
/// jump happened). The link subscribes before the listeners start, so its first offset is 0.
/// Logged at most once per [`Gaps::LOG_EVERY`] per route with the count since the last line;
/// `edgeferry_local_dropped_total` has every one.
struct Gaps {
    route: String,
    next: u64,
    unlogged: u64,
    last_log: Option<Instant>,
}

impl Gaps {
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn new(route: &str) -> Gaps {
        Gaps {
            route: route.to_string(),
            next: 0,
            unlogged: 0,
            last_log: None,
        }
    }

    fn saw(&mut self, offset: u64, metrics: &Metrics) {
        if offset > self.next {
            let lost = offset - self.next;
            metrics.local_dropped.add(lost);
            self.unlogged += lost;
            if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
                self.flush();
            }
        }
        self.next = self.next.max(offset + 1);
    }

    fn flush(&mut self) {
        if self.unlogged > 0 {
            error!(route = %self.route, lost = self.unlogged,
                "local broker evicted messages ingest had not read yet: acknowledged to devices, never committed (counted in edgeferry_local_dropped_total; the store is too slow or stalled: check its disk, or raise local.buffer)");
            self.unlogged = 0;
            self.last_log = Some(Instant::now());
        }
    }
}

/// Act on one link notification; false when ingest for this route must stop.
async fn handle(
    notification: Result<Option<Notification>, rumqttd::local::LinkError>,
    spec: &RouteSpec,
    gateway: &str,
    rx: &mut LinkRx,
    sink: &Sink,
    metrics: &Metrics,
    gaps: &mut Gaps,
) -> bool {
    let route = spec.filter.as_str();
    match notification {
        Ok(Some(Notification::Forward(fwd))) => {
            if let Some((_, offset)) = fwd.cursor {
                gaps.saw(offset, metrics);
            }
            queue_one(spec, gateway, fwd.publish, fwd.properties, sink, metrics).await
        }
        Ok(Some(Notification::Unschedule)) => {
            // The router paused this link because its buffer filled; we have drained it.
            if rx.wake().await.is_err() {
                error!(%route, "local broker is gone; ingest for this route stopped");
                return false;
            }
            true
        }
        Ok(Some(other)) => {
            debug!(%route, ?other, "ignoring local notification");
            true
        }
        Ok(None) => true,
        Err(e) => {
            error!(%route, error = %e, "local link failed; ingest for this route stopped");
            false
        }
    }
}

/// Queue one publish; false when the store is gone.
async fn queue_one(
    spec: &RouteSpec,
    gateway: &str,
    publish: rumqttd::protocol::Publish,
    properties: Option<rumqttd::protocol::PublishProperties>,
    sink: &Sink,
    metrics: &Metrics,
) -> bool {
    let received = Instant::now();
    metrics.ingested.inc();
    let Ok(topic) = std::str::from_utf8(&publish.topic) else {
        // rumqttd validates topics as UTF-8 already; this is a guard, counted as missing key.
        warn!("local publish with a non-UTF-8 topic dropped");
        return true;
    };
    let dedup_key = spec.dedup.as_ref().and_then(|rule| {
        let props: &[(String, String)] = properties
            .as_ref()
            .map(|p| p.user_properties.as_slice())
            .unwrap_or(&[]);
        let key = dedup::extract(rule, topic, &publish.payload, props);
        if key.is_none() {
            metrics.ingest_dedup_key_missing.inc();
            if matches!(rule, DedupKey::Property(_)) {
                debug!(%topic, "dedup property missing");
            }
        }
        key
    });
    let upstream_topic = if spec.template.is_identity() {
        topic.to_string()
    } else {
        spec.template.render(topic, gateway)
    };
    let queued = sink
        .store
        .enqueue(NewMessage {
            topic: upstream_topic,
            payload: publish.payload,
            dedup_key,
            received,
            done: None,
        })
        .await
        .is_ok();
    if let Some(gate) = &sink.gate {
        gate.check();
    }
    queued
}
