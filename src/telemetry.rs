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
    /// Messages the local broker evicted from its log before ingest read them (acknowledged to
    /// devices, never committed), counted exactly from gaps in the log offsets.
    pub local_dropped: Counter,
    /// Times reading from local devices was paused because the store fell behind.
    pub local_paused: Counter,
    /// Milliseconds reading from local devices was paused, in all.
    pub local_paused_ms: Counter,
    /// 1 while reading from local devices is paused.
    pub local_paused_now: Gauge,
    /// Queue rows deleted after the upstream's PUBACK.
    pub acked: Counter,
    /// Publishes handed to the upstream connection (resends included).
    pub published: Counter,
    /// Rows moved to the dead-letter table (the upstream refused them).
    pub dead_lettered: Counter,
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
    /// Messages in the queue.
    pub queue_depth: Gauge,
    /// Rows in the dead-letter table.
    pub dead_letters: Gauge,
    /// From ingest receiving a message to its commit: the window in which a device already has
    /// its PUBACK but the message is not yet on disk.
    pub commit_latency: Histogram,
    /// From publish to PUBACK upstream.
    pub upstream_ack_latency: Histogram,
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

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &Counter, &str); 21] = [
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
                "local_dropped_total",
                &self.local_dropped,
                "Messages acknowledged to local devices that the broker evicted before ingest read them",
            ),
            (
                "local_paused_total",
                &self.local_paused,
                "Times reading from local devices paused because the store fell behind (back-pressure)",
            ),
            (
                "local_paused_milliseconds_total",
                &self.local_paused_ms,
                "Time reading from local devices was paused, in all",
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
                "dead_lettered_total",
                &self.dead_lettered,
                "Rows moved to the dead-letter table",
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
        let gauges: [(&str, &Gauge, &str); 4] = [
            (
                "local_paused",
                &self.local_paused_now,
                "1 while reading from local devices is paused (back-pressure)",
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

/// Log to stderr, coloured only on a terminal. Under systemd (JOURNAL_STREAM set) timestamps are left to the journal.
/// The embedded broker logs ordinary device disconnects at ERROR ("router-drop", "connection
/// already gone", "connection closed by peer"), which would make ERROR meaningless in the
/// journal; its lines are off unless RUST_LOG asks for them (`RUST_LOG=info,rumqttd=info`). The
/// router event that matters, a log overflow, is counted and logged by ingest itself; bind
/// failures are caught before rumqttd starts, and a broker that does not serve is reported by
/// the start-up readiness check.
pub fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_new(format!("{level},rumqttd=off,rumqttc=warn"))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let text = m.render();
        assert!(text.contains("edgeferry_committed_total 3"));
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
