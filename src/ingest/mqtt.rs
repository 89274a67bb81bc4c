//! The MQTT ingress: edgeferry's device-facing listeners. It speaks MQTT itself (rumqttd's codec,
//! `rumqttd::protocol`) and terminates every device PUBLISH: validation, routes, topic templates,
//! dedup keys, enqueue, and the PUBACK (QoS 1) or PUBREC (QoS 2) only after the commit that holds
//! the message. Everything else a device does with other devices (CONNECT, SUBSCRIBE, wills,
//! acknowledgements of messages sent to it) is relayed, packet by packet, to the embedded
//! broker ([`super::broker`]) on an internal connection per device.
//!
//! # Guarantees
//! - **A PUBACK means committed.** A device's acknowledgement is written only after the store
//!   reported the commit of every queue row the message produced (one per matching route), or
//!   that dedup recognised it. No window remains in which a device holds a PUBACK for a message
//!   that is not on disk.
//! - **Back-pressure per device.** A connection stops reading once `local.max_inflight` of its
//!   publishes wait for their commit; the store's input channel is bounded, so when the store is
//!   behind every connection's enqueue waits and devices are held back by TCP. Nothing is
//!   buffered in memory beyond that.
//! - **Order.** Acknowledgements leave in the order the publishes arrived (MQTT 4.6), including
//!   the immediate ones for publishes that match no route or were refused.
//! - **Bad input closes only its own connection**, counted by reason and logged at most once per
//!   [`LOG_EVERY`] per reason with the client id.
//! - **Bounded accept.** A cap on connections that have not finished CONNECT, a CONNECT
//!   timeout, a per-source-address cap, the total connection cap, and backoff on accept errors
//!   (out of file descriptors) logged once per episode.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    self, v4::V4, v5::V5, Packet, Protocol as _, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, Publish, PublishProperties, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, DedupKey, RouteSpec};
use crate::dedup;
use crate::health::{answer, ProbeRx};
use crate::queue::{Enqueued, NewMessage, StoreHandle};
use crate::route::{self, TopicFilter};
use crate::telemetry::{IngressRefusal, Metrics, SecurityRefusal};

use super::frame::{self, Kind};
use super::limits::Limits;
use super::security::{self, Grant, Security};

/// Why the local side could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The listen address is unusable (in use, not local, permission).
    #[error("{key} {addr}: cannot listen: {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// rumqttd refused its configuration or did not start.
    #[error("local broker: {0}")]
    Broker(String),
    /// The password or ACL file could not be loaded.
    #[error(transparent)]
    Security(#[from] super::security::SecurityError),
}

/// Log lines about one kind of refusal, at most one per this period (with the count since).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Topic aliases a v5 device may register (announced in CONNACK; bounds the memory they hold).
const TOPIC_ALIAS_MAX: u16 = 64;

/// How long the internal connection to the embedded broker may take (connect and CONNACK).
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read from a socket per read call.
const READ_CHUNK: usize = 16 * 1024;

/// MQTT version a listener speaks (one codec per listener, as devices choose the port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    V4,
    V5,
}

impl Proto {
    fn read(self, buf: &mut BytesMut, max: usize) -> Result<Packet, protocol::Error> {
        match self {
            Proto::V4 => V4.read_mut(buf, max),
            Proto::V5 => V5.read_mut(buf, max),
        }
    }

    fn write(self, packet: Packet, out: &mut BytesMut) -> Result<usize, protocol::Error> {
        match self {
            Proto::V4 => V4.write(packet, out),
            Proto::V5 => V5.write(packet, out),
        }
    }
}

/// The device listeners, bound before anything starts (so "address in use" is a start-up error).
pub struct Ingress {
    listeners: Vec<(&'static str, std::net::TcpListener, Proto, SocketAddr)>,
    shared: Arc<Shared>,
}

/// What every session shares.
struct Shared {
    gateway: String,
    routes: Vec<RouteSpec>,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    subs: LocalSubs,
    /// Largest frame accepted from a device: the payload limit plus room for topic and properties.
    max_frame: usize,
    max_payload: usize,
    max_inflight: usize,
    connect_timeout: Duration,
    max_per_address: usize,
    max_connections: usize,
    /// Connections that have not sent CONNECT yet, oldest first (see `Shared::handshake`).
    handshakes: Mutex<VecDeque<(u64, CancellationToken)>>,
    handshake_seq: AtomicU64,
    max_handshakes: usize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    live: Live,
    logs: RefusalLogs,
    /// Passwords and ACLs (reloaded on SIGHUP through [`Ingress::security`]).
    security: Arc<Security>,
    limits: Limits,
}

impl Ingress {
    /// Bind the device listeners; `v4`/`v5` are the embedded broker's internal addresses.
    pub fn bind(
        config: &Config,
        v4: SocketAddr,
        v5: Option<SocketAddr>,
        store: StoreHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Ingress, IngestError> {
        let l = &config.local;
        let mut listeners = Vec::new();
        let mut plan = vec![("local.listen", l.listen, Proto::V4, v4)];
        if let (Some(addr), Some(internal)) = (l.listen_v5, v5) {
            plan.push(("local.listen_v5", addr, Proto::V5, internal));
        }
        for (key, addr, proto, internal) in plan {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| IngestError::Listen { key, addr, source })?;
            listeners.push((key, listener, proto, internal));
        }
        let max_payload = l.max_payload.0 as usize;
        let security = Arc::new(Security::load(l, metrics.clone())?);
        Ok(Ingress {
            listeners,
            shared: Arc::new(Shared {
                gateway: config.gateway.id.clone(),
                routes: config.route_specs(),
                store,
                metrics,
                subs: LocalSubs::default(),
                max_frame: max_payload + 70 * 1024,
                max_payload,
                max_inflight: l.max_inflight as usize,
                connect_timeout: l.connect_timeout.0,
                max_per_address: l.max_connections_per_address,
                max_connections: l.max_connections,
                handshakes: Mutex::new(VecDeque::new()),
                handshake_seq: AtomicU64::new(0),
                max_handshakes: l.max_handshakes,
                per_address: Mutex::new(HashMap::new()),
                live: Live::default(),
                logs: RefusalLogs::default(),
                security,
                limits: Limits::from_config(l),
            }),
        })
    }

    /// Password and ACL checks, for reloading them (SIGHUP).
    pub fn security(&self) -> Arc<Security> {
        self.shared.security.clone()
    }

    /// Accept and serve devices until `shutdown`; then every session stops reading, waits for
    /// the commits its device is owed acknowledgements for, writes them, and closes. Returns when
    /// the last session has ended.
    pub async fn run(self, mut probes: ProbeRx, shutdown: CancellationToken) {
        let Ingress { listeners, shared } = self;
        let mut accepts = Vec::new();
        for (key, listener, proto, internal) in listeners {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    warn!(listener = key, error = %e, "cannot register listener");
                    continue;
                }
            };
            accepts.push(tokio::spawn(accept_loop(
                key,
                listener,
                proto,
                internal,
                shared.clone(),
                shutdown.clone(),
            )));
        }
        // Liveness: the accept side answers from here; sessions are independent of each other.
        loop {
            tokio::select! {
                Some(reply) = probes.recv() => answer(Some(reply)),
                _ = shutdown.cancelled() => break,
            }
        }
        for a in accepts {
            let _ = a.await;
        }
        shared.live.wait_idle().await;
        info!("local listeners closed; every acknowledged message is committed");
    }
}

/// Counts live sessions so shutdown can wait for the last one.
#[derive(Default)]
struct Live {
    count: AtomicUsize,
    idle: Notify,
}

impl Live {
    fn enter(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }
    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Rate-limited logging of refusals: one line per reason per [`LOG_EVERY`], with the count.
#[derive(Default)]
struct RefusalLogs {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RefusalLogs {
    /// Returns how many occurrences the caller's line covers, or None when it must stay quiet.
    fn due(&self, reason: &'static str) -> Option<u64> {
        let mut m = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match m.get_mut(reason) {
            Some((at, n)) if now.duration_since(*at) < LOG_EVERY => {
                *n += 1;
                None
            }
            Some((at, n)) => {
                let covered = *n + 1;
                *at = now;
                *n = 0;
                Some(covered)
            }
            None => {
                m.insert(reason, (now, 0));
                Some(1)
            }
        }
    }
}

impl Shared {
    fn refuse(&self, why: IngressRefusal, client: &str, peer: SocketAddr, detail: &str) {
        self.metrics.ingress_refused[why as usize].inc();
        if let Some(n) = self.logs.due(why.as_str()) {
            warn!(reason = why.as_str(), client, %peer, detail, occurrences = n,
                "device refused (logged at most once per 10 s per reason; counted in edgeferry_ingress_refused_total)");
        }
    }
}

/// Accept errors (out of file descriptors, most often): back off, log once per episode.
async fn accept_loop(
    key: &'static str,
    listener: TcpListener,
    proto: Proto,
    internal: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut failing: Option<(Instant, u64)> = None;
    let mut delay = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (socket, peer) = match accepted {
            Ok(x) => {
                if let Some((since, n)) = failing.take() {
                    info!(listener = key, errors = n, after = ?since.elapsed(), "accepting device connections again");
                }
                delay = Duration::from_millis(5);
                x
            }
            Err(e) => {
                shared.metrics.ingress_accept_errors.inc();
                match &mut failing {
                    None => {
                        warn!(listener = key, error = %e, "cannot accept device connections (out of file descriptors?); backing off, logged once until it recovers");
                        failing = Some((Instant::now(), 1));
                    }
                    Some((_, n)) => *n += 1,
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // Admission: total, per address, and not-yet-connected caps, all before any read.
        if shared.live.count.load(Ordering::SeqCst) >= shared.max_connections {
            shared.refuse(
                IngressRefusal::ConnectionLimit,
                "",
                peer,
                "local.max_connections reached",
            );
            continue;
        }
        let Some(address) = AddressSlot::take(&shared, peer.ip()) else {
            shared.refuse(
                IngressRefusal::AddressLimit,
                "",
                peer,
                "local.max_connections_per_address reached",
            );
            continue;
        };
        let handshake = shared.clone().handshake(peer);
        shared.live.enter();
        let shared2 = shared.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let result =
                Session::serve(socket, peer, proto, internal, &shared2, handshake, stop).await;
            if let Err(e) = result {
                debug!(%peer, error = %e, "device connection ended");
            }
            drop(address);
            shared2.live.leave();
        });
    }
    info!(listener = key, "local listener closed");
}

impl Shared {
    /// A place among the connections that have not sent CONNECT yet. When all
    /// `local.max_handshakes` places are taken, the connection silent for longest is closed to
    /// make room: a device that speaks at once always gets in, while sockets that never speak
    /// cannot hold the ingress (nor its file descriptors) for long.
    fn handshake(self: Arc<Self>, peer: SocketAddr) -> HandshakePermit {
        let evict = CancellationToken::new();
        let id = self.handshake_seq.fetch_add(1, Ordering::Relaxed);
        let oldest = {
            let mut q = self.handshakes.lock().unwrap_or_else(|e| e.into_inner());
            let oldest = (q.len() >= self.max_handshakes)
                .then(|| q.pop_front())
                .flatten();
            q.push_back((id, evict.clone()));
            oldest
        };
        if let Some((_, token)) = oldest {
            token.cancel();
            self.refuse(
                IngressRefusal::HandshakeLimit,
                "",
                peer,
                "local.max_handshakes connections had not sent CONNECT; the longest silent was closed",
            );
        }
        HandshakePermit {
            shared: Some(self),
            id,
            evict,
        }
    }
}

/// A place among the connections that have not completed CONNECT; released once they have.
/// `evict` fires when a newer connection needed the place.
struct HandshakePermit {
    shared: Option<Arc<Shared>>,
    id: u64,
    evict: CancellationToken,
}

impl HandshakePermit {
    fn release(&mut self) {
        if let Some(s) = self.shared.take() {
            let mut q = s.handshakes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = q.iter().position(|(id, _)| *id == self.id) {
                q.remove(i);
            }
        }
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.release();
    }
}

/// A connection's place in its source address's count.
struct AddressSlot(Arc<Shared>, IpAddr);

impl AddressSlot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<AddressSlot> {
        let mut m = shared.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= shared.max_per_address {
            return None;
        }
        *n += 1;
        Some(AddressSlot(shared.clone(), ip))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.0.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Topic filters local devices subscribed to, so a device publish reaches the embedded broker
/// only when some local subscriber may want it (or it is retained). Filters of clean sessions
/// are counted per subscribing connection and dropped when it ends; those of persistent sessions
/// are kept (the broker keeps their session). Over-approximating costs a copy, never a message.
#[derive(Default)]
struct LocalSubs {
    filters: RwLock<HashMap<String, (TopicFilter, usize)>>,
    /// Bumped on every change so sessions can cache the list.
    generation: AtomicU64,
}

impl LocalSubs {
    fn add(&self, filter: &str) -> Option<String> {
        // A shared subscription "$share/group/filter" receives what "filter" matches.
        let plain = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map(|(_, f)| f)?,
            None => filter,
        };
        let parsed = TopicFilter::parse(plain).ok()?;
        let mut m = self.filters.write().unwrap_or_else(|e| e.into_inner());
        m.entry(plain.to_string()).or_insert((parsed, 0)).1 += 1;
        self.generation.fetch_add(1, Ordering::SeqCst);
        Some(plain.to_string())
    }

    fn remove(&self, plain: &str) {
        let mut m = self.filters.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = m.get_mut(plain) {
            *n -= 1;
            if *n == 0 {
                m.remove(plain);
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn snapshot(&self) -> (u64, Vec<TopicFilter>) {
        let generation = self.generation.load(Ordering::SeqCst);
        let m = self.filters.read().unwrap_or_else(|e| e.into_inner());
        (generation, m.values().map(|(f, _)| f.clone()).collect())
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
    /// Closed by the device before it sent anything worth a word (a bare TCP connect).
    #[error("closed before CONNECT")]
    Silent,
}

/// A publish waiting for its commit(s), or an acknowledgement waiting for its turn.
struct Pending {
    /// The acknowledgement to send once every receiver has answered: (packet type, pkid, reason).
    ack: Option<Ack>,
    waits: Vec<oneshot::Receiver<Enqueued>>,
}

#[derive(Debug, Clone, Copy)]
enum Ack {
    /// QoS 1: PUBACK with this v5 reason (Success for v3.1.1).
    PubAck(u16, PubAckReason),
    /// QoS 2: PUBREC; the pkid then waits for PUBREL.
    PubRec(u16, PubRecReason),
}

/// One device connection.
struct Session<'a> {
    shared: &'a Shared,
    proto: Proto,
    peer: SocketAddr,
    client_id: String,
    clean: bool,
    /// v5 topic aliases registered by the device.
    aliases: HashMap<u16, Bytes>,
    /// QoS 2 packet ids between PUBLISH and PUBREL (pending commit or acknowledged).
    qos2: HashSet<u16>,
    /// Filters this connection added to [`LocalSubs`].
    subscribed: Vec<String>,
    subs_cache: (u64, Vec<TopicFilter>),
    will: Option<(protocol::LastWill, Option<protocol::LastWillProperties>)>,
    pending: VecDeque<Pending>,
    /// Packet id of the last QoS 1 copy handed to the embedded broker.
    copy_pkid: u16,
    /// Bytes for the device.
    out: BytesMut,
    /// Bytes for the embedded broker.
    to_broker: BytesMut,
    /// What local security granted this device.
    grant: Grant,
    /// SUBSCRIBE packet ids whose broker SUBACK needs the codes of refused filters put back in
    /// (position, code); see [`security::splice_codes`].
    suback_fixups: HashMap<u16, Vec<(usize, SubscribeReasonCode)>>,
}

impl<'a> Session<'a> {
    async fn serve(
        mut device: TcpStream,
        peer: SocketAddr,
        proto: Proto,
        internal: SocketAddr,
        shared: &'a Shared,
        mut handshake: HandshakePermit,
        shutdown: CancellationToken,
    ) -> Result<(), SessionError> {
        let _ = device.set_nodelay(true);
        let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
        // CONNECT, within the timeout; nothing else first.
        let connect = tokio::select! {
            r = tokio::time::timeout(shared.connect_timeout, read_connect(&mut device, &mut inbuf, shared.max_frame, proto)) => match r {
                Ok(Ok(p)) => p,
                // A bare TCP connect (a port check, a load balancer's probe) is not an error.
                Ok(Err(SessionError::Io(_))) | Ok(Err(SessionError::Silent)) => return Ok(()),
                Ok(Err(e)) => {
                    shared.refuse(IngressRefusal::Malformed, "", peer, &e.to_string());
                    return Err(e);
                }
                Err(_) => {
                    shared.refuse(IngressRefusal::ConnectTimeout, "", peer, "no CONNECT within local.connect_timeout");
                    return Ok(());
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
            _ = handshake.evict.cancelled() => return Ok(()),
        };
        let Packet::Connect(mut connect, props, will, will_props, login) = connect else {
            shared.refuse(
                IngressRefusal::Malformed,
                "",
                peer,
                "first packet is not CONNECT",
            );
            return Ok(());
        };
        let client_id = connect.client_id.clone();
        // Credentials and the will's topic are decided here; a refused CONNECT never reaches
        // the broker.
        let admitted = match shared.limits.check_client_id(&client_id) {
            Err(detail) => {
                let why = SecurityRefusal::ClientIdLength;
                shared.security.refuse(why, "", &peer.to_string(), &detail);
                Err(protocol::ConnectReturnCode::ClientIdentifierNotValid)
            }
            Ok(()) => {
                shared
                    .security
                    .admit(
                        &client_id,
                        &peer.to_string(),
                        login.as_ref().map(|l| l.username.as_str()),
                        login.as_ref().map(|l| l.password.as_bytes()),
                        will.as_ref()
                            .and_then(|w| std::str::from_utf8(&w.topic).ok()),
                    )
                    .await
            }
        };
        let grant = match admitted {
            Ok(g) => g,
            Err(code) => {
                let mut out = BytesMut::new();
                let connack = protocol::ConnAck {
                    session_present: false,
                    code,
                };
                proto
                    .write(Packet::ConnAck(connack, None), &mut out)
                    .map_err(|e| SessionError::Refused(format!("encoding CONNACK: {e}")))?;
                device.write_all(&out).await?;
                let _ = device.shutdown().await;
                return Ok(());
            }
        };
        let keep_alive = connect.keep_alive;
        let clean = connect.clean_session;
        // The broker must not time the device out on its own: telemetry never reaches it, so the
        // ingress enforces the device's keepalive and the internal connection asks for none.
        connect.keep_alive = u16::MAX;
        let mut hello = BytesMut::new();
        proto
            .write(
                Packet::Connect(connect, props, will.clone(), will_props.clone(), login),
                &mut hello,
            )
            .map_err(|e| SessionError::Refused(format!("re-encoding CONNECT: {e}")))?;
        let mut broker = tokio::time::timeout(BROKER_TIMEOUT, TcpStream::connect(internal))
            .await
            .map_err(|_| SessionError::Refused("embedded broker connect timed out".into()))??;
        let _ = broker.set_nodelay(true);
        broker.write_all(&hello).await?;
        let mut bbuf = BytesMut::with_capacity(READ_CHUNK);
        let connack = tokio::time::timeout(
            BROKER_TIMEOUT,
            read_frame(&mut broker, &mut bbuf, usize::MAX),
        )
        .await
        .map_err(|_| SessionError::Refused("embedded broker CONNACK timed out".into()))??;
        let mut out = BytesMut::with_capacity(READ_CHUNK);
        let accepted = relay_connack(proto, connack, &mut out)?;
        device.write_all(&out).await?;
        out.clear();
        handshake.release();
        if !accepted {
            return Ok(());
        }
        let mut s = Session {
            shared,
            proto,
            peer,
            client_id,
            clean,
            aliases: HashMap::new(),
            qos2: HashSet::new(),
            subscribed: Vec::new(),
            subs_cache: (u64::MAX, Vec::new()),
            will: will.map(|w| (w, will_props)),
            pending: VecDeque::new(),
            copy_pkid: 0,
            out,
            to_broker: BytesMut::new(),
            grant,
            suback_fixups: HashMap::new(),
        };
        shared.metrics.ingress_connections.add(1);
        let result = s
            .run(&mut device, &mut broker, inbuf, bbuf, keep_alive, &shutdown)
            .await;
        shared.metrics.ingress_connections.sub(1);
        s.finish(&result).await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        device: &mut TcpStream,
        broker: &mut TcpStream,
        mut inbuf: BytesMut,
        mut bbuf: BytesMut,
        keep_alive: u16,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        // MQTT: the server closes a connection silent for 1.5 times the keepalive.
        let silence = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut last_heard = tokio::time::Instant::now();
        let mut stopping = false;
        // Frames already buffered after CONNECT / CONNACK (a persistent session's redelivery
        // may follow the CONNACK in the same read).
        self.take_broker_frames(&mut bbuf)?;
        self.take_frames(&mut inbuf).await?;
        loop {
            if !self.out.is_empty() {
                device.write_all(&self.out).await?;
                self.out.clear();
            }
            if !self.to_broker.is_empty() {
                broker.write_all(&self.to_broker).await?;
                self.to_broker.clear();
            }
            if stopping && self.pending.is_empty() {
                return Ok(());
            }
            let reading = !stopping && self.pending.len() < self.shared.max_inflight;
            let timer = async {
                match silence {
                    Some(s) => tokio::time::sleep_until(last_heard + s).await,
                    None => std::future::pending().await,
                }
            };
            let pending = &mut self.pending;
            tokio::select! {
                biased;
                done = std::future::poll_fn(|cx| poll_front(pending, cx)), if !pending.is_empty() => {
                    self.acknowledge(done)?;
                    // Frames left unread while the window was full.
                    if !stopping && !inbuf.is_empty() && self.take_frames(&mut inbuf).await? {
                        return Ok(());
                    }
                }
                r = device.read_buf(&mut inbuf), if reading => {
                    if r? == 0 {
                        return Err(SessionError::Refused("device closed the connection".into()));
                    }
                    last_heard = tokio::time::Instant::now();
                    if self.take_frames(&mut inbuf).await? {
                        return Ok(());
                    }
                }
                r = broker.read_buf(&mut bbuf) => {
                    if r? == 0 {
                        return Err(SessionError::Refused("embedded broker closed the connection".into()));
                    }
                    self.take_broker_frames(&mut bbuf)?;
                }
                _ = timer => {
                    self.shared.refuse(IngressRefusal::KeepAlive, &self.client_id, self.peer, "silent for 1.5x its keepalive");
                    return Err(SessionError::Refused("keepalive expired".into()));
                }
                _ = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                }
            }
        }
    }

    /// Pass the broker's complete frames on to the device. Whole frames only, so
    /// acknowledgements are never spliced into a packet.
    fn take_broker_frames(&mut self, bbuf: &mut BytesMut) -> Result<(), SessionError> {
        while let Some(h) = frame::header(bbuf, usize::MAX)
            .map_err(|e| SessionError::Refused(format!("broker framing: {e}")))?
        {
            let f = bbuf.split_to(h.frame_len);
            if h.kind == Kind::PubAck {
                // For a local copy (device publishes themselves never reach the broker): the
                // device must not see it.
                continue;
            }
            if h.kind == Kind::SubAck && !self.suback_fixups.is_empty() {
                self.fix_suback(f, &h)?;
            } else {
                self.out.extend_from_slice(&f);
            }
        }
        Ok(())
    }

    /// Decode and act on the complete frames in `inbuf` while the in-flight window has room;
    /// true when the device disconnected.
    async fn take_frames(&mut self, inbuf: &mut BytesMut) -> Result<bool, SessionError> {
        loop {
            if self.pending.len() >= self.shared.max_inflight {
                return Ok(false);
            }
            let h = match frame::header(inbuf, self.shared.max_frame) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(false),
                Err(frame::FrameError::TooLarge { size, .. }) => {
                    self.shared.refuse(
                        IngressRefusal::Oversized,
                        &self.client_id,
                        self.peer,
                        &format!(
                            "packet of {size} bytes; local.max_payload is {}",
                            self.shared.max_payload
                        ),
                    );
                    return Err(SessionError::Refused("oversized packet".into()));
                }
                Err(e) => return Err(self.malformed(e.to_string())),
            };
            match h.kind {
                Kind::Publish => {
                    let qos = h.qos();
                    let pkid = frame::publish_pkid(inbuf, &h);
                    let retain = h.retain();
                    let packet = self
                        .proto
                        .read(inbuf, self.shared.max_frame)
                        .map_err(|e| self.malformed(e.to_string()))?;
                    let Packet::Publish(publish, props) = packet else {
                        return Err(self.malformed("PUBLISH did not decode as one".into()));
                    };
                    self.publish(publish, props, qos, pkid.unwrap_or(0), retain)
                        .await?;
                }
                Kind::PubRel => {
                    let pkid = frame::ack_pkid(inbuf, &h).unwrap_or(0);
                    self.proto
                        .read(inbuf, self.shared.max_frame)
                        .map_err(|e| self.malformed(e.to_string()))?;
                    // The device's QoS 2 flow ends here; the broker never saw this publish.
                    self.qos2.remove(&pkid);
                    let reason = PubCompReason::Success;
                    self.write(Packet::PubComp(PubComp { pkid, reason }, None))?;
                }
                Kind::PingReq => {
                    let _ = inbuf.split_to(h.frame_len);
                    self.write(Packet::PingResp(protocol::PingResp))?;
                }
                Kind::Subscribe
                | Kind::Unsubscribe
                | Kind::PubAck
                | Kind::PubRec
                | Kind::PubComp => {
                    let raw = inbuf[..h.frame_len].to_vec();
                    let packet = self
                        .proto
                        .read(inbuf, self.shared.max_frame)
                        .map_err(|e| self.malformed(e.to_string()))?;
                    let relay = match packet {
                        Packet::Subscribe(s, props) => self.subscribe(s, props, raw)?,
                        Packet::Unsubscribe(u, _) => {
                            for f in &u.filters {
                                if let Some(i) = self.subscribed.iter().position(|s| s == f) {
                                    let plain = self.subscribed.swap_remove(i);
                                    self.shared.subs.remove(&plain);
                                }
                            }
                            Some(raw)
                        }
                        _ => Some(raw),
                    };
                    if let Some(raw) = relay {
                        self.to_broker.extend_from_slice(&raw);
                    }
                }
                Kind::Disconnect => {
                    let raw = inbuf.split_to(h.frame_len);
                    // v5 "disconnect with will" keeps the will; anything else discards it.
                    let with_will =
                        self.proto == Proto::V5 && raw.get(h.header_len).copied() == Some(0x04);
                    if !with_will {
                        self.will = None;
                    }
                    self.to_broker.extend_from_slice(&raw);
                    return Ok(true);
                }
                Kind::Connect => return Err(self.malformed("second CONNECT".into())),
                Kind::ConnAck | Kind::SubAck | Kind::UnsubAck | Kind::PingResp | Kind::Auth => {
                    return Err(self.malformed(format!("{:?} from a client", h.kind)));
                }
            }
        }
    }

    /// A device SUBSCRIBE: filters outside the device's read rights are answered with a
    /// failure code (v3.1.1 0x80, v5 0x87) and never reach the broker. Returns the bytes to
    /// relay, if any filter is left.
    fn subscribe(
        &mut self,
        mut s: protocol::Subscribe,
        props: Option<protocol::SubscribeProperties>,
        raw: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, SessionError> {
        let security = &self.shared.security;
        let peer = self.peer.to_string();
        let mut refused = Vec::new();
        let mut kept = Vec::with_capacity(s.filters.len());
        let limits = self.shared.limits;
        for (i, f) in std::mem::take(&mut s.filters).into_iter().enumerate() {
            let limited = if let Err(d) = limits.check_topic(&f.path) {
                Some((SecurityRefusal::TopicSize, d))
            } else if self.subscribed.len() + kept.len() >= limits.max_subscriptions {
                let d = format!(
                    "more than local.max_subscriptions = {}",
                    limits.max_subscriptions
                );
                Some((SecurityRefusal::Subscriptions, d))
            } else {
                None
            };
            if let Some((why, detail)) = limited {
                security.refuse(why, &self.client_id, &peer, &detail);
                let code = if self.proto == Proto::V5 {
                    SubscribeReasonCode::QuotaExceeded
                } else {
                    SubscribeReasonCode::Failure
                };
                refused.push((i, code));
            } else if self.grant.may_subscribe(security, &f.path) {
                kept.push(f);
            } else {
                security.refuse(
                    SecurityRefusal::AclSubscribe,
                    &self.client_id,
                    &peer,
                    &format!("subscription {:?} outside the device's read rights", f.path),
                );
                refused.push((i, security::refused_code(self.proto == Proto::V5)));
            }
        }
        for f in &kept {
            if let Some(plain) = self.shared.subs.add(&f.path) {
                self.subscribed.push(plain);
            }
        }
        if refused.is_empty() {
            return Ok(Some(raw));
        }
        if kept.is_empty() {
            let codes = refused.into_iter().map(|(_, c)| c).collect();
            self.write(Packet::SubAck(
                protocol::SubAck {
                    pkid: s.pkid,
                    return_codes: codes,
                },
                None,
            ))?;
            return Ok(None);
        }
        s.filters = kept;
        self.suback_fixups.insert(s.pkid, refused);
        let mut bytes = BytesMut::new();
        self.proto
            .write(Packet::Subscribe(s, props), &mut bytes)
            .map_err(|e| SessionError::Refused(format!("re-encoding SUBSCRIBE: {e}")))?;
        Ok(Some(bytes.to_vec()))
    }

    /// The broker's SUBACK for a SUBSCRIBE some of whose filters were refused: put their codes
    /// back in place so the device sees one code per filter it sent.
    fn fix_suback(&mut self, mut f: BytesMut, h: &frame::Header) -> Result<(), SessionError> {
        let pkid = frame::ack_pkid(&f, h).unwrap_or(0);
        let Some(refused) = self.suback_fixups.remove(&pkid) else {
            self.out.extend_from_slice(&f);
            return Ok(());
        };
        match self.proto.read(&mut f, usize::MAX) {
            Ok(Packet::SubAck(mut ack, props)) => {
                security::splice_codes(&mut ack.return_codes, refused);
                self.write(Packet::SubAck(ack, props))
            }
            _ => Err(SessionError::Refused("broker SUBACK did not decode".into())),
        }
    }

    fn malformed(&self, detail: String) -> SessionError {
        self.shared.refuse(
            IngressRefusal::Malformed,
            &self.client_id,
            self.peer,
            &detail,
        );
        SessionError::Refused(format!("malformed packet: {detail}"))
    }

    fn write(&mut self, packet: Packet) -> Result<(), SessionError> {
        self.proto
            .write(packet, &mut self.out)
            .map(drop)
            .map_err(|e| SessionError::Refused(format!("encoding: {e}")))
    }

    /// One device PUBLISH: validate, route, enqueue, and queue its acknowledgement.
    async fn publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        retain: bool,
    ) -> Result<(), SessionError> {
        // v5 topic aliases: resolve, or register.
        if let Some(alias) = props.as_mut().and_then(|p| p.topic_alias.take()) {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Err(self.invalid_topic(
                    qos,
                    pkid,
                    &format!("topic alias {alias} out of range 1..={TOPIC_ALIAS_MAX}"),
                ));
            }
            if publish.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => publish.topic = t.clone(),
                    None => {
                        return Err(self.invalid_topic(
                            qos,
                            pkid,
                            &format!("unknown topic alias {alias}"),
                        ))
                    }
                }
            } else {
                self.aliases.insert(alias, publish.topic.clone());
            }
        }
        let topic = match route::topic_name(&publish.topic) {
            Ok(t) => t.to_string(),
            Err(e) => {
                self.shared.metrics.ingress_invalid_topics[e as usize].inc();
                return self.refuse_publish(
                    qos,
                    pkid,
                    PubAckReason::TopicNameInvalid,
                    &e.to_string(),
                );
            }
        };
        if let Err(detail) = self.shared.limits.check_topic(&topic) {
            let peer = self.peer.to_string();
            let why = SecurityRefusal::TopicSize;
            self.shared
                .security
                .refuse(why, &self.client_id, &peer, &detail);
            return self.refuse_publish(qos, pkid, PubAckReason::TopicNameInvalid, &detail);
        }
        if qos == 2
            && !self.qos2.contains(&pkid)
            && self.qos2.len() >= self.shared.limits.max_qos2_inflight
        {
            // The device exceeded the receive maximum it was given: MQTT says disconnect.
            let detail = format!(
                "more than local.max_qos2_inflight = {} QoS 2 publishes awaiting PUBREL",
                self.shared.limits.max_qos2_inflight
            );
            let peer = self.peer.to_string();
            let why = SecurityRefusal::Qos2Inflight;
            self.shared
                .security
                .refuse(why, &self.client_id, &peer, &detail);
            return Err(SessionError::Refused(detail));
        }
        if !self.grant.may_publish(&self.shared.security, &topic) {
            return self.denied_publish(qos, pkid, &topic);
        }
        // v5: a payload that says it is UTF-8 must be.
        if props.as_ref().and_then(|p| p.payload_format_indicator) == Some(1)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            return self.refuse_publish(
                qos,
                pkid,
                PubAckReason::PayloadFormatInvalid,
                "payload format indicator says UTF-8, payload is not",
            );
        }
        if qos == 2 && self.qos2.contains(&pkid) {
            // A resend of a QoS 2 publish already taken: never queue it twice. Its PUBREC is
            // pending or was sent; send it (again) in order.
            self.pending.push_back(Pending {
                ack: Some(Ack::PubRec(pkid, PubRecReason::Success)),
                waits: Vec::new(),
            });
            return Ok(());
        }
        let received = Instant::now();
        let mut waits = Vec::new();
        let mut routed = false;
        let shared = self.shared;
        for spec in shared.routes.iter().filter(|r| r.filter.matches(&topic)) {
            routed = true;
            let upstream_topic = if spec.template.is_identity() {
                topic.clone()
            } else {
                let t = spec.template.render(&topic, &shared.gateway);
                if let Err(e) = route::check_topic_str(&t) {
                    self.shared.metrics.ingress_invalid_topics[e as usize].inc();
                    return self.refuse_publish(
                        qos,
                        pkid,
                        PubAckReason::TopicNameInvalid,
                        &format!("rendered upstream topic: {e}"),
                    );
                }
                t
            };
            let dedup_key = spec.dedup.as_ref().and_then(|rule| {
                let user: &[(String, String)] = props
                    .as_ref()
                    .map(|p| p.user_properties.as_slice())
                    .unwrap_or(&[]);
                let key = dedup::extract(rule, &topic, &publish.payload, user);
                if key.is_none() {
                    shared.metrics.ingest_dedup_key_missing.inc();
                    if matches!(rule, DedupKey::Property(_)) {
                        debug!(%topic, "dedup property missing");
                    }
                }
                key
            });
            let done = if qos > 0 {
                let (tx, rx) = oneshot::channel();
                waits.push(rx);
                Some(tx)
            } else {
                None
            };
            shared.metrics.ingested.inc();
            let msg = NewMessage {
                route: spec.name.clone(),
                topic: upstream_topic,
                payload: publish.payload.clone(),
                dedup_key,
                received,
                done,
            };
            if shared.store.enqueue(msg).await.is_err() {
                return Err(SessionError::Refused("the store is closed".into()));
            }
        }
        if !routed {
            shared.metrics.ingress_unrouted.inc();
        }
        // Local fan-out: a copy for the embedded broker, only when someone may want it. A QoS 1
        // or 2 publish goes on as QoS 1 under the ingress's own packet id (the broker's PUBACK
        // for it is swallowed), so local QoS 1 subscribers and persistent sessions keep their
        // guarantees; QoS 0 stays QoS 0.
        if retain || self.local_interest(&topic) {
            let mut copy = Publish::new(
                Bytes::from(topic.into_bytes()),
                publish.payload.clone(),
                retain,
            );
            copy.retain = retain;
            let copy_props = match self.proto {
                Proto::V4 => None,
                Proto::V5 => props.map(|mut p| {
                    p.topic_alias = None;
                    p.subscription_identifiers.clear();
                    p
                }),
            };
            let mut encoded = BytesMut::new();
            self.proto
                .write(Packet::Publish(copy, copy_props), &mut encoded)
                .map_err(|e| {
                    SessionError::Refused(format!("encoding for the local broker: {e}"))
                })?;
            if qos > 0 {
                self.copy_pkid = self.copy_pkid.checked_add(1).unwrap_or(1).max(1);
                let f = frame::qos0_to_qos1(&encoded, self.copy_pkid)
                    .ok_or_else(|| SessionError::Refused("re-framing the local copy".into()))?;
                self.to_broker.extend_from_slice(&f);
            } else {
                self.to_broker.extend_from_slice(&encoded);
            }
        }
        match qos {
            1 => self.pending.push_back(Pending {
                ack: Some(Ack::PubAck(pkid, PubAckReason::Success)),
                waits,
            }),
            2 => {
                self.qos2.insert(pkid);
                self.pending.push_back(Pending {
                    ack: Some(Ack::PubRec(pkid, PubRecReason::Success)),
                    waits,
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn local_interest(&mut self, topic: &str) -> bool {
        let generation = self.shared.subs.generation.load(Ordering::SeqCst);
        if generation != self.subs_cache.0 {
            self.subs_cache = self.shared.subs.snapshot();
        }
        self.subs_cache.1.iter().any(|f| f.matches(topic))
    }

    fn invalid_topic(&self, _qos: u8, _pkid: u16, detail: &str) -> SessionError {
        self.shared.refuse(
            IngressRefusal::InvalidTopic,
            &self.client_id,
            self.peer,
            detail,
        );
        SessionError::Refused(detail.to_string())
    }

    /// A publish no upstream can take: a v5 device gets the reason code (QoS 1/2) in order; a
    /// v3.1.1 device is disconnected, as MQTT 3.1.1 requires. Nothing is acknowledged as accepted.
    fn refuse_publish(
        &mut self,
        qos: u8,
        pkid: u16,
        reason: PubAckReason,
        detail: &str,
    ) -> Result<(), SessionError> {
        let why = match reason {
            PubAckReason::PayloadFormatInvalid => IngressRefusal::PayloadFormat,
            _ => IngressRefusal::InvalidTopic,
        };
        self.shared.refuse(why, &self.client_id, self.peer, detail);
        if self.proto == Proto::V4 {
            return Err(SessionError::Refused(detail.to_string()));
        }
        let rec = match reason {
            PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
            _ => PubRecReason::TopicNameInvalid,
        };
        match qos {
            1 => self.pending.push_back(Pending {
                ack: Some(Ack::PubAck(pkid, reason)),
                waits: Vec::new(),
            }),
            2 => self.pending.push_back(Pending {
                ack: Some(Ack::PubRec(pkid, rec)),
                waits: Vec::new(),
            }),
            _ => {}
        }
        Ok(())
    }

    /// A publish outside the device's write rights is never queued, forwarded or fanned out.
    /// It is answered as Mosquitto answers it: v5 PUBACK/PUBREC 0x87; v3.1.1 acknowledged (the
    /// protocol has no refusal code) and dropped. Acknowledgements stay in order.
    fn denied_publish(&mut self, qos: u8, pkid: u16, topic: &str) -> Result<(), SessionError> {
        self.grant
            .denied_publish(&self.shared.security, &self.peer.to_string(), topic);
        let v5 = self.proto == Proto::V5;
        let ack = match qos {
            1 => Some(Ack::PubAck(
                pkid,
                if v5 {
                    PubAckReason::NotAuthorized
                } else {
                    PubAckReason::Success
                },
            )),
            2 => {
                if !v5 {
                    // The device's PUBREL completes the flow.
                    self.qos2.insert(pkid);
                }
                Some(Ack::PubRec(
                    pkid,
                    if v5 {
                        PubRecReason::NotAuthorized
                    } else {
                        PubRecReason::Success
                    },
                ))
            }
            _ => None,
        };
        if ack.is_some() {
            self.pending.push_back(Pending {
                ack,
                waits: Vec::new(),
            });
        }
        Ok(())
    }

    /// The front publish's commits are all known: write its acknowledgement.
    fn acknowledge(&mut self, done: Result<Option<Ack>, ()>) -> Result<(), SessionError> {
        let ack = done.map_err(|()| {
            SessionError::Refused(
                "the store stopped before committing; the device will resend".into(),
            )
        })?;
        match ack {
            Some(Ack::PubAck(pkid, reason)) => {
                self.write(Packet::PubAck(PubAck { pkid, reason }, None))
            }
            Some(Ack::PubRec(pkid, reason)) => {
                self.write(Packet::PubRec(PubRec { pkid, reason }, None))
            }
            None => Ok(()),
        }
    }

    /// After the connection ended: forget this connection's subscriptions (clean sessions), and
    /// queue the will when the device vanished without DISCONNECT and the will is routed.
    async fn finish(&mut self, result: &Result<(), SessionError>) {
        if self.clean {
            for plain in self.subscribed.drain(..) {
                self.shared.subs.remove(&plain);
            }
        }
        let _ = result;
        if let Some((will, _props)) = self.will.take() {
            let Ok(topic) = route::topic_name(&will.topic) else {
                return;
            };
            let shared = self.shared;
            for spec in shared.routes.iter().filter(|r| r.filter.matches(topic)) {
                let t = spec.template.render(topic, &shared.gateway);
                if route::check_topic_str(&t).is_err() {
                    continue;
                }
                shared.metrics.ingested.inc();
                let _ = shared
                    .store
                    .enqueue(NewMessage {
                        route: spec.name.clone(),
                        topic: t,
                        payload: will.message.clone(),
                        dedup_key: None,
                        received: Instant::now(),
                        done: None,
                    })
                    .await;
            }
        }
    }
}

/// Ready when the oldest pending publish has all its commits (or the store dropped one: Err).
fn poll_front(
    pending: &mut VecDeque<Pending>,
    cx: &mut std::task::Context<'_>,
) -> Poll<Result<Option<Ack>, ()>> {
    let Some(front) = pending.front_mut() else {
        return Poll::Pending;
    };
    while let Some(rx) = front.waits.last_mut() {
        match std::pin::Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(_)) => {
                front.waits.pop();
            }
            Poll::Ready(Err(_)) => {
                pending.pop_front();
                return Poll::Ready(Err(()));
            }
            Poll::Pending => return Poll::Pending,
        }
    }
    let ack = front.ack;
    pending.pop_front();
    Poll::Ready(Ok(ack))
}

use std::future::Future as _;

/// Read until one whole frame is buffered; return it (split off `buf`).
async fn read_frame(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<BytesMut, SessionError> {
    loop {
        if let Some(h) =
            frame::header(buf, limit).map_err(|e| SessionError::Refused(e.to_string()))?
        {
            return Ok(buf.split_to(h.frame_len));
        }
        if s.read_buf(buf).await? == 0 {
            return Err(SessionError::Refused("connection closed".into()));
        }
    }
}

/// Read and decode the first packet, which must be CONNECT.
async fn read_connect(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    limit: usize,
    proto: Proto,
) -> Result<Packet, SessionError> {
    loop {
        if let Some(h) =
            frame::header(buf, limit).map_err(|e| SessionError::Refused(e.to_string()))?
        {
            if h.kind != Kind::Connect {
                return Err(SessionError::Refused(format!(
                    "{:?} before CONNECT",
                    h.kind
                )));
            }
            return proto
                .read(buf, limit)
                .map_err(|e| SessionError::Refused(format!("CONNECT: {e}")));
        }
        if s.read_buf(buf).await? == 0 {
            return Err(SessionError::Silent);
        }
    }
}

/// Pass the broker's CONNACK on to the device, for v5 with the topic aliases the ingress
/// resolves capped at [`TOPIC_ALIAS_MAX`] (they hold memory per connection). Returns whether the
/// connection was accepted. (rumqttd's codec decodes only what clients send, not CONNACK.)
fn relay_connack(
    proto: Proto,
    mut frame: BytesMut,
    out: &mut BytesMut,
) -> Result<bool, SessionError> {
    let h = frame::header(&frame, usize::MAX)
        .ok()
        .flatten()
        .filter(|h| h.kind == Kind::ConnAck)
        .ok_or_else(|| {
            SessionError::Refused("broker answered CONNECT with something else".into())
        })?;
    let accepted = frame::connack_code(&frame, &h) == Some(0);
    if proto == Proto::V5 {
        frame::cap_topic_alias_max(&mut frame, &h, TOPIC_ALIAS_MAX);
    }
    out.extend_from_slice(&frame);
    Ok(accepted)
}
