//! Counters, gauges and latency histograms, the Prometheus text endpoint, and log setup.
//!
//! Every notable event (a duplicate suppressed, a commit error, a reconnect, a local drop)
//! updates a counter here as well as logging, so operators can alert on numbers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Why the MQTT ingress refused a device or one of its packets (`edgeferry_ingress_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressRefusal {
    /// `local.max_connections` devices were connected.
    ConnectionLimit,
    /// `local.max_handshakes` connections had not sent CONNECT yet.
    HandshakeLimit,
    /// `local.max_connections_per_address` from this source address.
    AddressLimit,
    /// No CONNECT within `local.connect_timeout`.
    ConnectTimeout,
    /// Bytes that are not MQTT, or not valid in this state.
    Malformed,
    /// A packet larger than `local.max_payload` allows.
    Oversized,
    /// A topic name no upstream accepts (wildcard, NUL, not UTF-8, empty, bad alias).
    InvalidTopic,
    /// A v5 payload marked UTF-8 that is not.
    PayloadFormat,
    /// Silent for 1.5 times its keepalive.
    KeepAlive,
}

impl IngressRefusal {
    pub const ALL: [IngressRefusal; 9] = [
        IngressRefusal::ConnectionLimit,
        IngressRefusal::HandshakeLimit,
        IngressRefusal::AddressLimit,
        IngressRefusal::ConnectTimeout,
        IngressRefusal::Malformed,
        IngressRefusal::Oversized,
        IngressRefusal::InvalidTopic,
        IngressRefusal::PayloadFormat,
        IngressRefusal::KeepAlive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IngressRefusal::ConnectionLimit => "connection-limit",
            IngressRefusal::HandshakeLimit => "handshake-limit",
            IngressRefusal::AddressLimit => "address-limit",
            IngressRefusal::ConnectTimeout => "connect-timeout",
            IngressRefusal::Malformed => "malformed",
            IngressRefusal::Oversized => "oversized",
            IngressRefusal::InvalidTopic => "invalid-topic",
            IngressRefusal::PayloadFormat => "payload-format",
            IngressRefusal::KeepAlive => "keepalive",
        }
    }
}

/// Why local security refused a device or one of its packets
/// (`edgeferry_security_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityRefusal {
    /// Unknown user or wrong password.
    BadCredentials,
    /// No user name while `local.allow_anonymous = false`.
    Anonymous,
    /// A publish outside the device's write rights (never queued).
    AclPublish,
    /// A subscription outside the device's read rights.
    AclSubscribe,
    /// A will on a topic outside the device's write rights.
    AclWill,
    /// A client id longer than `local.max_client_id_len`.
    ClientIdLength,
    /// A topic longer than `local.max_topic_len` or with more levels than `local.max_topic_levels`.
    TopicSize,
    /// User properties above `local.max_user_property_bytes`.
    UserProperties,
    /// Subscriptions above `local.max_subscriptions`.
    Subscriptions,
    /// QoS 2 publishes not yet released above `local.max_qos2_inflight`.
    Qos2Inflight,
    /// Retained messages above `local.max_retained` or `local.max_retained_bytes`.
    Retained,
    /// Publishes faster than `local.max_rate` allows (the device is slowed down, then counted).
    Rate,
    /// A keepalive above `local.max_keepalive` (capped, v5 told so; v3.1.1 refused).
    KeepAlive,
    /// A TLS handshake that failed (bad or expired client certificate, wrong CA, not TLS).
    TlsHandshake,
}

impl SecurityRefusal {
    pub const ALL: [SecurityRefusal; 14] = [
        SecurityRefusal::BadCredentials,
        SecurityRefusal::Anonymous,
        SecurityRefusal::AclPublish,
        SecurityRefusal::AclSubscribe,
        SecurityRefusal::AclWill,
        SecurityRefusal::ClientIdLength,
        SecurityRefusal::TopicSize,
        SecurityRefusal::UserProperties,
        SecurityRefusal::Subscriptions,
        SecurityRefusal::Qos2Inflight,
        SecurityRefusal::Retained,
        SecurityRefusal::Rate,
        SecurityRefusal::KeepAlive,
        SecurityRefusal::TlsHandshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SecurityRefusal::BadCredentials => "bad-credentials",
            SecurityRefusal::Anonymous => "anonymous",
            SecurityRefusal::AclPublish => "acl-publish",
            SecurityRefusal::AclSubscribe => "acl-subscribe",
            SecurityRefusal::AclWill => "acl-will",
            SecurityRefusal::ClientIdLength => "client-id-length",
            SecurityRefusal::TopicSize => "topic-size",
            SecurityRefusal::UserProperties => "user-properties",
            SecurityRefusal::Subscriptions => "subscriptions",
            SecurityRefusal::Qos2Inflight => "qos2-inflight",
            SecurityRefusal::Retained => "retained",
            SecurityRefusal::Rate => "rate",
            SecurityRefusal::KeepAlive => "keepalive",
            SecurityRefusal::TlsHandshake => "tls-handshake",
        }
    }
}

/// Denied publishes per client id, for `edgeferry_acl_denied_publishes_total{client}`. Bounded:
/// beyond [`PerClient::CAP`] distinct clients the rest are summed under `client="(other)"`, so
/// a device cycling client ids cannot grow the metrics.
#[derive(Debug, Default)]
pub struct PerClient {
    counts: std::sync::Mutex<(std::collections::BTreeMap<String, u64>, u64)>,
}

impl PerClient {
    pub const CAP: usize = 256;

    pub fn inc(&self, client: &str) {
        let mut g = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (map, other) = &mut *g;
        if let Some(n) = map.get_mut(client) {
            *n += 1;
        } else if map.len() < Self::CAP {
            map.insert(client.to_string(), 1);
        } else {
            *other += 1;
        }
    }

    fn render(&self, name: &str, out: &mut String) {
        let g = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (client, n) in &g.0 {
            let escaped = client
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(out, "{name}{{client=\"{escaped}\"}} {n}");
        }
        if g.1 > 0 {
            let _ = writeln!(out, "{name}{{client=\"(other)\"}} {}", g.1);
        }
    }
}

/// Log-linear histogram of durations in microseconds: 8 sub-buckets per power of two, so any
/// quantile is within 12.5% of the true value; fixed memory, lock-free recording.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

const SUB: u32 = 8;
const GROUPS: u32 = 40;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..(SUB * GROUPS)).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < SUB as u64 {
            return us as usize;
        }
        let group = 63 - us.leading_zeros(); // floor(log2), >= 3
        let sub = (us >> (group - 3)) & (SUB as u64 - 1);
        (((group - 2) * SUB) as u64 + sub).min((SUB * GROUPS - 1) as u64) as usize
    }

    /// Lower bound of bucket `i` in microseconds.
    fn lower(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB as u64 {
            return i;
        }
        let group = i / SUB as u64 + 2;
        let sub = i % SUB as u64;
        (SUB as u64 + sub) << (group - 3)
    }

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[Self::index(us)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Approximate quantile (0.0..=1.0) in microseconds; None when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                // Report the bucket's upper edge: a conservative (never optimistic) figure.
                return Some(Self::lower(i + 1).saturating_sub(1).max(Self::lower(i)));
            }
        }
        None
    }
}

/// Label values of `edgeferry_upstream_refusals_total{reason=...}`.
pub const UPSTREAM_REFUSAL_REASONS: [&str; 7] = [
    "bad_credentials",
    "not_authorized",
    "banned",
    "client_id",
    "protocol",
    "busy",
    "other",
];

/// Label values of `edgeferry_upstream_tls_failures_total{reason=...}`.
pub const UPSTREAM_TLS_FAILURES: [&str; 5] = [
    "unknown_ca",
    "name_mismatch",
    "expired",
    "client_cert_refused",
    "other",
];

/// Increment the counter of `labels` named `label`, or the "other" one.
fn count_by_label(counters: &[Counter], labels: &[&str], label: &str) {
    let i = labels
        .iter()
        .position(|l| *l == label)
        .or_else(|| labels.iter().position(|l| *l == "other"));
    if let Some(c) = i.and_then(|i| counters.get(i)) {
        c.inc();
    }
}

/// Why a row was moved to the dead-letter table: the `reason` label of
/// `edgeferry_dead_lettered_total`, and the start of the row's `reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The upstream dropped the connection each time the row was sent alone.
    Poison,
    /// Refused for good: an MQTT 5 PUBACK or DISCONNECT reason about the message (not
    /// authorised, payload format invalid), or the MQTT client would not send it.
    Refused,
    /// Larger than the upstream's maximum packet size (announced, or told by a reason code).
    TooLarge,
    /// The topic is not a valid MQTT topic name (wildcards, NUL or control characters, empty).
    InvalidTopic,
    /// The stored row cannot be read as a message (e.g. its topic is not UTF-8 text).
    Undecodable,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 5] = [
        DeadLetterReason::Poison,
        DeadLetterReason::Refused,
        DeadLetterReason::TooLarge,
        DeadLetterReason::InvalidTopic,
        DeadLetterReason::Undecodable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Poison => "poison",
            DeadLetterReason::Refused => "refused",
            DeadLetterReason::TooLarge => "too-large",
            DeadLetterReason::InvalidTopic => "invalid-topic",
            DeadLetterReason::Undecodable => "undecodable",
        }
    }
}

/// All of the daemon's metrics. Names in the Prometheus output are `edgeferry_<field>`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages received from local devices on a routed topic.
    pub ingested: Counter,
    /// Messages committed to the queue.
    pub committed: Counter,
    /// Messages not queued because their dedup key was seen within the window.
    pub ingest_duplicates: Counter,
    /// Messages on a dedup route that carried no usable key (queued without dedup).
    pub ingest_dedup_key_missing: Counter,
    /// Devices or packets the MQTT ingress refused, by [`IngressRefusal`].
    pub ingress_refused: [Counter; 9],
    /// Devices or packets refused by local security (auth, ACL, limits), by [`SecurityRefusal`].
    pub security_refused: [Counter; SecurityRefusal::ALL.len()],
    /// Publishes denied by the ACL, by client id (bounded, see [`PerClient`]).
    pub acl_denied_publishes: PerClient,
    /// Password and ACL files reloaded on SIGHUP.
    pub security_reloads: Counter,
    /// SIGHUP reloads refused because a new file was invalid (the old one stays in force).
    pub security_reload_errors: Counter,
    /// Device publishes refused for their topic, by `route::TopicError` (declaration order).
    pub ingress_invalid_topics: [Counter; 5],
    /// Device publishes that matched no route (acknowledged, not queued).
    pub ingress_unrouted: Counter,
    /// Failed accept() calls on the device listeners (out of file descriptors and the like).
    pub ingress_accept_errors: Counter,
    /// Device connections open now.
    pub ingress_connections: Gauge,
    /// Device publishes that had to wait for a token of `local.max_rate` (the device was slowed).
    pub ingress_rate_limited: Counter,
    /// Dedup keys found stamped in the future at start-up (the clock stepped back since they
    /// were stored) and re-stamped to the start-up time.
    pub ingest_dedup_restamped: Counter,
    /// Queue rows deleted after the upstream's PUBACK.
    pub acked: Counter,
    /// Publishes handed to the upstream connection (resends included).
    pub published: Counter,
    /// Rows moved to the dead-letter table, by [`DeadLetterReason`] (index = position in
    /// `DeadLetterReason::ALL`).
    pub dead_lettered: [Counter; DeadLetterReason::ALL.len()],
    /// Times a message sent alone was followed at once by the upstream dropping the connection
    /// (a strike towards quarantining it as poison).
    pub poison_strikes: Counter,
    /// Failed store commits (each is retried; ingest pauses meanwhile).
    pub store_commit_errors: Counter,
    /// Buffered messages lost because commits kept failing through shutdown.
    pub store_lost_uncommitted: Counter,
    /// Store transactions committed.
    pub store_commits: Counter,
    /// Successful upstream connections.
    pub upstream_connects: Counter,
    /// Upstream connections lost or attempts failed.
    pub upstream_errors: Counter,
    /// Frames decoded from serial ports (all ports).
    pub serial_frames: Counter,
    /// Bad serial frames, by `codec::ErrorKind` (index = position in `ErrorKind::ALL`).
    pub serial_bad_frames: [Counter; 5],
    /// Serial ports (re)opened after being absent or failing.
    pub serial_opens: Counter,
    /// Acknowledgement frames written back to serial devices after commit.
    pub serial_acks: Counter,
    /// Downlink messages received from the upstream.
    pub downlink_received: Counter,
    /// Downlink messages dropped (the port was absent or its queue full).
    pub downlink_dropped: Counter,
    /// CONNACK refusals, by reason (index = position in `UPSTREAM_REFUSAL_REASONS`).
    pub upstream_refusals: [Counter; UPSTREAM_REFUSAL_REASONS.len()],
    /// Failed TLS handshakes, by reason (index = position in `UPSTREAM_TLS_FAILURES`).
    pub upstream_tls_failures: [Counter; UPSTREAM_TLS_FAILURES.len()],
    /// TCP probes of upstream addresses (while down, and of preferred addresses while failed
    /// over).
    pub upstream_probes: Counter,
    /// Connections made to another address than the previous connection's, away from the
    /// first address of the list.
    pub upstream_failovers: Counter,
    /// Sessions ended to go back to an earlier (preferred) address.
    pub upstream_failbacks: Counter,
    /// Index in `upstream.address` of the address in use (0 = the first).
    pub upstream_address: Gauge,
    /// 1 while connected upstream.
    pub upstream_connected: Gauge,
    /// 1 while store commits fail and are retried (disk full, I/O error).
    pub store_commit_failing: Gauge,
    /// Messages in the queue.
    pub queue_depth: Gauge,
    /// Rows in the dead-letter table.
    pub dead_letters: Gauge,
    /// From ingest receiving a message to its commit: the window in which a device already has
    /// its PUBACK but the message is not yet on disk.
    pub commit_latency: Histogram,
    /// From publish to PUBACK upstream.
    pub upstream_ack_latency: Histogram,
    /// Messages dropped from the queue by a policy, by reason (index = position in
    /// `queue::DROP_REASONS`).
    pub queue_dropped: [Counter; 5],
    /// Rows moved to the dead-letter table because their route's ttl passed.
    pub dead_lettered_expired: Counter,
    /// Bytes queued (topic + payload).
    pub queue_bytes: Gauge,
    /// Inserts of reject-new routes held back (uncommitted, their devices wait for PUBACK).
    pub queue_held: Gauge,
    /// Per-route queue gauges and dead letters by reason, refreshed by the store each second.
    pub queue_routes: std::sync::Mutex<QueueGauges>,
}

/// Per-route gauges and dead letters by reason.
pub type QueueGauges = (Vec<RouteGauges>, Vec<(String, u64)>);

/// One route's queue, as the store last saw it.
#[derive(Debug, Clone, Default)]
pub struct RouteGauges {
    pub route: String,
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_seconds: f64,
}

/// `write_bytes` of /proc/self/io: what this process caused to be written to storage (flash
/// wear), page cache writeback included. None where /proc is unavailable.
pub fn disk_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Escape a label value for the Prometheus text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Count a CONNACK refusal by its reason label.
    pub fn count_upstream_refusal(&self, reason: &str) {
        count_by_label(&self.upstream_refusals, &UPSTREAM_REFUSAL_REASONS, reason);
    }

    /// Count a failed TLS handshake by its reason label.
    pub fn count_upstream_tls_failure(&self, reason: &str) {
        count_by_label(&self.upstream_tls_failures, &UPSTREAM_TLS_FAILURES, reason);
    }

    /// Count messages a queue policy dropped (`reason` is one of `queue::DROP_REASONS`).
    pub fn count_queue_drop(&self, reason: &str, n: u64) {
        if let Some(i) = crate::queue::DROP_REASONS.iter().position(|r| *r == reason) {
            self.queue_dropped[i].add(n);
        }
    }

    /// Replace the per-route gauges and the dead letters by reason.
    pub fn set_queue_routes(&self, routes: Vec<RouteGauges>, dead: Vec<(String, u64)>) {
        if let Ok(mut g) = self.queue_routes.lock() {
            *g = (routes, dead);
        }
    }

    fn render_queue(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP edgeferry_queue_dropped_total Messages dropped from the queue by a policy (overflow, expired, purged, rejected, dead-letter-expired)\n# TYPE edgeferry_queue_dropped_total counter");
        for (reason, c) in crate::queue::DROP_REASONS.iter().zip(&self.queue_dropped) {
            let _ = writeln!(
                out,
                "edgeferry_queue_dropped_total{{reason=\"{reason}\"}} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "edgeferry_dead_lettered_total{{reason=\"expired\"}} {}",
            self.dead_lettered_expired.get()
        );
        let _ = writeln!(out, "# HELP edgeferry_queue_bytes Bytes queued (topic + payload)\n# TYPE edgeferry_queue_bytes gauge\nedgeferry_queue_bytes {}", self.queue_bytes.get());
        let _ = writeln!(out, "# HELP edgeferry_queue_held Inserts of reject-new routes held back without PUBACK\n# TYPE edgeferry_queue_held gauge\nedgeferry_queue_held {}", self.queue_held.get());
        let (routes, dead) = self
            .queue_routes
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        for (name, help) in [
            ("queue_route_depth", "Messages queued per route"),
            ("queue_route_bytes", "Bytes queued per route"),
            (
                "queue_oldest_age_seconds",
                "Age of the oldest queued message per route (data freshness)",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP edgeferry_{name} {help}\n# TYPE edgeferry_{name} gauge"
            );
            for r in &routes {
                let v = match name {
                    "queue_route_depth" => r.depth as f64,
                    "queue_route_bytes" => r.bytes as f64,
                    _ => r.oldest_age_seconds,
                };
                let _ = writeln!(out, "edgeferry_{name}{{route=\"{}\"}} {v}", label(&r.route));
            }
        }
        let _ = writeln!(out, "# HELP edgeferry_dead_letters_by_reason Rows in the dead-letter table, by reason\n# TYPE edgeferry_dead_letters_by_reason gauge");
        for (reason, n) in &dead {
            let _ = writeln!(
                out,
                "edgeferry_dead_letters_by_reason{{reason=\"{}\"}} {n}",
                label(reason)
            );
        }
        if let Some(b) = disk_write_bytes() {
            let _ = writeln!(out, "# HELP edgeferry_process_disk_written_bytes_total Bytes this process caused to be written to storage (/proc/self/io write_bytes)\n# TYPE edgeferry_process_disk_written_bytes_total counter\nedgeferry_process_disk_written_bytes_total {b}");
        }
    }

    /// Count a row moved to the dead-letter table.
    pub fn count_dead_letter(&self, reason: DeadLetterReason) {
        let i = DeadLetterReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dead_lettered[i].inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &Counter, &str); 22] = [
            (
                "ingress_rate_limited_total",
                &self.ingress_rate_limited,
                "Device publishes that waited for a local.max_rate token (the device was slowed down)",
            ),
            (
                "upstream_poison_strikes_total",
                &self.poison_strikes,
                "Connections the upstream dropped right after a suspect message was sent alone",
            ),
            (
                "ingested_total",
                &self.ingested,
                "Messages received from local devices on a routed topic",
            ),
            (
                "committed_total",
                &self.committed,
                "Messages committed to the queue",
            ),
            (
                "ingest_duplicates_total",
                &self.ingest_duplicates,
                "Messages suppressed by ingest dedup",
            ),
            (
                "ingest_dedup_key_missing_total",
                &self.ingest_dedup_key_missing,
                "Messages on a dedup route without a usable key",
            ),
            (
                "ingest_dedup_restamped_total",
                &self.ingest_dedup_restamped,
                "Dedup keys stamped in the future at start-up (the clock stepped back), re-stamped to then",
            ),
            (
                "ingress_unrouted_total",
                &self.ingress_unrouted,
                "Device publishes that matched no route (acknowledged, not queued)",
            ),
            (
                "ingress_accept_errors_total",
                &self.ingress_accept_errors,
                "Failed accepts on the device listeners (out of file descriptors?)",
            ),
            (
                "acked_total",
                &self.acked,
                "Queue rows deleted after the upstream PUBACK",
            ),
            (
                "published_total",
                &self.published,
                "Publishes sent upstream, resends included",
            ),
            (
                "store_commit_errors_total",
                &self.store_commit_errors,
                "Failed store commits (retried)",
            ),
            (
                "store_lost_uncommitted_total",
                &self.store_lost_uncommitted,
                "Buffered messages lost because commits failed through shutdown",
            ),
            (
                "store_commits_total",
                &self.store_commits,
                "Store transactions committed",
            ),
            (
                "upstream_connects_total",
                &self.upstream_connects,
                "Successful upstream connections",
            ),
            (
                "upstream_errors_total",
                &self.upstream_errors,
                "Upstream connections lost or attempts failed",
            ),
            (
                "serial_frames_total",
                &self.serial_frames,
                "Frames decoded from serial ports",
            ),
            (
                "serial_opens_total",
                &self.serial_opens,
                "Serial ports opened or reopened",
            ),
            (
                "serial_acks_total",
                &self.serial_acks,
                "Ack frames written to serial devices after commit",
            ),
            (
                "downlink_received_total",
                &self.downlink_received,
                "Downlink messages received from the upstream",
            ),
            (
                "downlink_dropped_total",
                &self.downlink_dropped,
                "Downlink messages dropped (port absent or queue full)",
            ),
            (
                "build_info",
                &Counter(AtomicU64::new(1)),
                concat!("edgeferry ", env!("CARGO_PKG_VERSION")),
            ),
        ];
        for (name, c, help) in counters {
            let _ = writeln!(out, "# HELP edgeferry_{name} {help}\n# TYPE edgeferry_{name} counter\nedgeferry_{name} {}", c.get());
        }
        let _ = writeln!(out, "# HELP edgeferry_serial_bad_frames_total Bad serial frames by kind\n# TYPE edgeferry_serial_bad_frames_total counter");
        for (kind, c) in crate::codec::ErrorKind::ALL
            .iter()
            .zip(&self.serial_bad_frames)
        {
            let _ = writeln!(
                out,
                "edgeferry_serial_bad_frames_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                c.get()
            );
        }
        for (name, help, labels, counters) in [
            (
                "upstream_refusals_total",
                "Upstream CONNACK refusals by reason",
                &UPSTREAM_REFUSAL_REASONS[..],
                &self.upstream_refusals[..],
            ),
            (
                "upstream_tls_failures_total",
                "Failed upstream TLS handshakes by reason",
                &UPSTREAM_TLS_FAILURES[..],
                &self.upstream_tls_failures[..],
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP edgeferry_{name} {help}\n# TYPE edgeferry_{name} counter"
            );
            for (label, c) in labels.iter().zip(counters) {
                let _ = writeln!(out, "edgeferry_{name}{{reason=\"{label}\"}} {}", c.get());
            }
        }
        for (name, c, help) in [
            (
                "upstream_probes_total",
                &self.upstream_probes,
                "TCP probes of upstream addresses",
            ),
            (
                "upstream_failovers_total",
                &self.upstream_failovers,
                "Upstream connections made to a later address of upstream.address",
            ),
            (
                "upstream_failbacks_total",
                &self.upstream_failbacks,
                "Upstream sessions ended to go back to an earlier address",
            ),
        ] {
            let _ = writeln!(out, "# HELP edgeferry_{name} {help}\n# TYPE edgeferry_{name} counter\nedgeferry_{name} {}", c.get());
        }
        let _ = writeln!(
            out,
            "# HELP edgeferry_upstream_address Index in upstream.address of the address in use\n# TYPE edgeferry_upstream_address gauge\nedgeferry_upstream_address {}",
            self.upstream_address.get()
        );
        let _ = writeln!(out, "# HELP edgeferry_dead_lettered_total Rows moved to the dead-letter table, by reason\n# TYPE edgeferry_dead_lettered_total counter");
        for (reason, c) in DeadLetterReason::ALL.iter().zip(&self.dead_lettered) {
            let _ = writeln!(
                out,
                "edgeferry_dead_lettered_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                c.get()
            );
        }
        let _ = writeln!(out, "# HELP edgeferry_ingress_refused_total Devices or packets the MQTT ingress refused, by reason\n# TYPE edgeferry_ingress_refused_total counter");
        for (why, c) in IngressRefusal::ALL.iter().zip(&self.ingress_refused) {
            let _ = writeln!(
                out,
                "edgeferry_ingress_refused_total{{reason=\"{}\"}} {}",
                why.as_str(),
                c.get()
            );
        }
        let _ = writeln!(out, "# HELP edgeferry_security_refused_total Devices or packets refused by local security (password, ACL, limits, TLS), by reason\n# TYPE edgeferry_security_refused_total counter");
        for (why, c) in SecurityRefusal::ALL.iter().zip(&self.security_refused) {
            let _ = writeln!(
                out,
                "edgeferry_security_refused_total{{reason=\"{}\"}} {}",
                why.as_str(),
                c.get()
            );
        }
        let _ = writeln!(out, "# HELP edgeferry_acl_denied_publishes_total Publishes the ACL denied, by client id (at most 256 ids, then \"(other)\")\n# TYPE edgeferry_acl_denied_publishes_total counter");
        self.acl_denied_publishes
            .render("edgeferry_acl_denied_publishes_total", &mut out);
        let _ = writeln!(out, "# HELP edgeferry_security_reloads_total Password/ACL reloads on SIGHUP, by result\n# TYPE edgeferry_security_reloads_total counter\nedgeferry_security_reloads_total{{result=\"ok\"}} {}\nedgeferry_security_reloads_total{{result=\"invalid\"}} {}", self.security_reloads.get(), self.security_reload_errors.get());
        let _ = writeln!(out, "# HELP edgeferry_ingress_invalid_topics_total Device publishes refused for their topic name, by kind\n# TYPE edgeferry_ingress_invalid_topics_total counter");
        for (kind, c) in ["empty", "not-utf8", "wildcard", "nul", "too-long"]
            .iter()
            .zip(&self.ingress_invalid_topics)
        {
            let _ = writeln!(
                out,
                "edgeferry_ingress_invalid_topics_total{{kind=\"{kind}\"}} {}",
                c.get()
            );
        }
        let gauges: [(&str, &Gauge, &str); 5] = [
            (
                "store_commit_failing",
                &self.store_commit_failing,
                "1 while store commits fail and are retried (disk full?)",
            ),
            (
                "ingress_connections",
                &self.ingress_connections,
                "Device connections open now",
            ),
            (
                "upstream_connected",
                &self.upstream_connected,
                "1 while connected upstream",
            ),
            (
                "queue_depth",
                &self.queue_depth,
                "Messages waiting in the queue",
            ),
            (
                "dead_letters",
                &self.dead_letters,
                "Rows in the dead-letter table",
            ),
        ];
        for (name, g, help) in gauges {
            let _ = writeln!(out, "# HELP edgeferry_{name} {help}\n# TYPE edgeferry_{name} gauge\nedgeferry_{name} {}", g.get());
        }
        self.render_queue(&mut out);
        for (name, h, help) in [
            (
                "commit_latency_seconds",
                &self.commit_latency,
                "Ingest receive to commit",
            ),
            (
                "upstream_ack_latency_seconds",
                &self.upstream_ack_latency,
                "Publish to PUBACK upstream",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP edgeferry_{name} {help}\n# TYPE edgeferry_{name} summary"
            );
            for q in [0.5, 0.9, 0.99, 0.999] {
                if let Some(us) = h.quantile_us(q) {
                    let _ = writeln!(
                        out,
                        "edgeferry_{name}{{quantile=\"{q}\"}} {:.6}",
                        us as f64 / 1e6
                    );
                }
            }
            let _ = writeln!(
                out,
                "edgeferry_{name}_sum {:.6}\nedgeferry_{name}_count {}",
                h.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
                h.count()
            );
        }
        out
    }
}

/// Serve `GET /metrics` (any path, in fact) in Prometheus text format until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read (and ignore) the request head, bounded in size and time.
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
            let body = metrics.render();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                debug!(%peer, error = %e, "metrics: write failed");
            }
        });
    }
}

/// Bind the metrics listener (separately, so a bad address fails before start-up completes).
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Why a log filter (`telemetry.log_level`, or `RUST_LOG`) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter is empty: it would log nothing, ERROR included.
    #[error("is empty; use error, warn, info, debug or trace")]
    Empty,
    /// A directive that names no level. tracing reads a bare word such as "verbose" as "every
    /// level, but only from a module named verbose": nothing at all is logged, ERROR included.
    #[error("{0:?} is not a log level; use error, warn, info, debug or trace, or a filter such as \"info,edgeferry=debug\" (NAME=LEVEL)")]
    NoLevel(String),
    /// Not a filter tracing understands.
    #[error("{0:?} is not a valid log filter: {1}")]
    Syntax(String, String),
}

/// Parse a log filter: a level ("info"), or comma-separated directives each of which names a
/// level ("info,edgeferry=debug"). Refuses what would parse but silence the daemon.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, TelemetryError> {
    use std::str::FromStr;
    use tracing_subscriber::filter::LevelFilter;
    if text.trim().is_empty() {
        return Err(TelemetryError::Empty);
    }
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if LevelFilter::from_str(level.trim()).is_err() {
            return Err(TelemetryError::NoLevel(directive.to_string()));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text)
        .map_err(|e| TelemetryError::Syntax(text.to_string(), e.to_string()))
}

/// Log to stderr, coloured only on a terminal. Under systemd (JOURNAL_STREAM set) timestamps are left to the journal.
/// The embedded broker logs ordinary device disconnects at ERROR ("router-drop", "connection
/// already gone", "connection closed by peer"), which would make ERROR meaningless in the
/// journal; its lines are off unless RUST_LOG asks for them (`RUST_LOG=info,rumqttd=info`). The
/// router event that matters, a log overflow, is counted and logged by ingest itself; bind
/// failures are caught before rumqttd starts, and a broker that does not serve is reported by
/// the start-up readiness check.
///
/// `level` is `telemetry.log_level`, already validated by the config. A `RUST_LOG` that is not
/// a usable filter (see [`log_filter`]) is ignored with a warning on stderr: a daemon that
/// silently logs nothing is worse than one that logs at its configured level.
pub fn init_logging(level: &str) {
    let rust_log = match std::env::var("RUST_LOG") {
        Ok(f) if f.trim().is_empty() => None,
        Ok(f) => Some(log_filter(&f).map_err(|e| format!("RUST_LOG {e}"))),
        Err(std::env::VarError::NotUnicode(_)) => {
            Some(Err("RUST_LOG is not valid UTF-8".to_string()))
        }
        Err(std::env::VarError::NotPresent) => None,
    };
    let configured = || {
        log_filter(&format!("{level},rumqttd=off,rumqttc=warn"))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let filter = match rust_log {
        Some(Ok(f)) => f,
        Some(Err(problem)) => {
            // On stderr directly: the configured level may be too quiet for a WARN line.
            eprintln!("edgeferry: warning: {problem}; ignoring RUST_LOG and logging at telemetry.log_level {level:?}");
            configured()
        }
        None => configured(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Colours only for a person at a terminal: escape codes in a log file or a pipe are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).try_init()
    } else {
        builder.with_ansi(ansi).try_init()
    };
    let _ = result;
}

/// The panic policy (README, "Panic policy"): a panic is a bug, never the answer to an input.
/// Log where it happened at ERROR (the default message may not reach the journal's view of the
/// unit), then abort in every build: the release profile aborts anyway, and a debug build must
/// not differ by letting tokio swallow a panicked task and run on half-broken. systemd restarts
/// the daemon; what was committed is in the store and is forwarded after the restart.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| l.to_string())
            .unwrap_or_else(|| "unknown location".into());
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(%location, %thread, "panic: {message}; aborting (a bug: please report this line)");
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn log_filters_must_name_a_level() {
        for good in ["info", "DEBUG", "warn,edgeferry=debug", "off", "trace,"] {
            assert!(log_filter(good).is_ok(), "{good}");
        }
        for bad in ["verbose", "edgeferry", "info,loud", "", "  ", "info,[x"] {
            assert!(log_filter(bad).is_err(), "{bad:?} accepted");
        }
        let e = log_filter("verbose").unwrap_err().to_string();
        assert!(e.contains("\"verbose\" is not a log level"), "{e}");
    }

    #[test]
    fn empty_histogram_has_no_quantiles() {
        assert_eq!(Histogram::default().quantile_us(0.99), None);
    }

    proptest! {
        /// A quantile is never below the true value and at most 12.5% (+1 us) above it.
        #[test]
        fn quantiles_are_close_and_conservative(mut values in proptest::collection::vec(0u64..10_000_000, 1..300), q in 0.01f64..1.0) {
            let h = Histogram::default();
            for v in &values { h.record(Duration::from_micros(*v)); }
            values.sort();
            let rank = ((q * values.len() as f64).ceil() as usize).max(1);
            let truth = values[rank - 1];
            let got = h.quantile_us(q).unwrap();
            prop_assert!(got >= truth, "got {got} < truth {truth}");
            prop_assert!(got as f64 <= truth as f64 * 1.125 + 1.0, "got {got} too far above {truth}");
        }
    }

    #[test]
    fn render_names_every_counter() {
        let m = Metrics::default();
        m.committed.add(3);
        m.commit_latency.record(Duration::from_millis(2));
        m.count_dead_letter(DeadLetterReason::Poison);
        let text = m.render();
        assert!(text.contains("edgeferry_committed_total 3"));
        assert!(text.contains("edgeferry_dead_lettered_total{reason=\"poison\"} 1"));
        assert!(text.contains("edgeferry_dead_lettered_total{reason=\"too-large\"} 0"));
        assert!(text.contains("edgeferry_commit_latency_seconds_count 1"));
    }

    #[test]
    fn upstream_failures_are_counted_by_reason() {
        let m = Metrics::default();
        m.count_upstream_refusal("bad_credentials");
        m.count_upstream_refusal("no such reason");
        m.count_upstream_tls_failure("unknown_ca");
        let text = m.render();
        assert!(text.contains("edgeferry_upstream_refusals_total{reason=\"bad_credentials\"} 1"));
        assert!(text.contains("edgeferry_upstream_refusals_total{reason=\"other\"} 1"));
        assert!(text.contains("edgeferry_upstream_refusals_total{reason=\"banned\"} 0"));
        assert!(text.contains("edgeferry_upstream_tls_failures_total{reason=\"unknown_ca\"} 1"));
        assert!(text.contains("edgeferry_upstream_failovers_total 0"));
    }
}
