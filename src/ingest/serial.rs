//! Serial ports as sources: one task per `[[serial]]` port opens (and reopens) the device,
//! decodes its byte stream into frames with the port's framing, and queues each frame like an
//! MQTT publish, with the same delivery contract.
//!
//! - **Acks follow commits.** With `ack`, a frame's acknowledgement is written only after the
//!   store reported `Enqueued::Committed` or `Enqueued::Duplicate`, and acks are written in frame
//!   order, so a retransmit's ack never overtakes the commit of the frame it repeats. A device
//!   that got no ack retransmits; the store's persisted dedup window (keyed by port name and
//!   sequence number) keeps the retransmit from being queued twice, across restarts too.
//! - **Loss window.** Without acks a frame decoded but not yet committed (at most the store's
//!   commit interval) is lost on a crash, as are bytes still in the kernel's tty buffer. With
//!   acks the device keeps it until the ack, so nothing is lost.
//! - **Unplug.** A missing path or a failing port is closed, reported once (WARN), and reopened
//!   with backoff and full jitter; a path that reappears (USB replug) is opened at once. Nothing
//!   committed is affected, and other ports and MQTT ingest keep running.
//! - **Bounded.** One read buffer and one decoder per port; at most [`MAX_PENDING_ACKS`] frames
//!   awaiting their commit (then reading pauses and the kernel buffers, then the device's flow
//!   control or its own retransmits take over); at most [`WRITE_QUEUE`] frames waiting to be
//!   written; every write has a deadline.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::codec::{self, BadFrame, Decoded, Decoder, ErrorKind, Quarantine};
use crate::config::serial::{FlowControl, Parity, SeqSource, SerialPort};
use crate::dedup;
use crate::queue::{Enqueued, NewMessage, StoreHandle};
use crate::route::Template;
use crate::telemetry::Metrics;

/// What a port task needs from the daemon.
pub struct SerialContext {
    pub gateway: String,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    /// Upstream messages to frame and write to the port (when `downlink` is configured).
    pub downlink: Option<mpsc::Receiver<Vec<u8>>>,
}

/// Frames queued but not yet committed, per port, when acks are on. When full, reading pauses
/// until the oldest commits (a few ms): the kernel's tty buffer holds what arrives meanwhile.
pub const MAX_PENDING_ACKS: usize = 256;
/// Frames (acks and downlink) waiting to be written to the port. When full, an ack is skipped
/// (the device retransmits and is acked then) and a downlink message is dropped and counted.
pub const WRITE_QUEUE: usize = 64;
/// Longest one frame may take to write: a device that stopped reading (hardware flow control
/// held off, a wedged USB adapter) must not hold the port task.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest an open() may take; a wedged USB adapter can block it.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an absent path is checked for reappearing (one stat() each).
const PRESENCE_POLL: Duration = Duration::from_millis(250);
/// A port that stayed open this long (or delivered data) is reported open at INFO.
const CONFIRM_AFTER: Duration = Duration::from_millis(500);
/// A session that lasted this long resets the reopen backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Bad frames are summarised at WARN at most this often per port (each is logged at debug).
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Recent bad frames kept per port for inspection (64 bytes each).
const QUARANTINE: usize = 16;
/// On shutdown, how long queued frames may wait for their commit so their acks still go out.
const SHUTDOWN_ACK_GRACE: Duration = Duration::from_millis(500);
const READ_BUF: usize = 4096;

/// Why a port session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    /// The device went away or the port failed (EOF on a hung-up tty, EIO on unplug).
    #[error("{0}")]
    Lost(io::Error),
    /// Shutdown was requested.
    #[error("shutdown")]
    Shutdown,
    /// The store is closed: the daemon is stopping.
    #[error("store closed")]
    StoreClosed,
}

/// Whether the port is up, as last reported in the log (state changes are logged once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    Nothing,
    Open,
    Down,
}

/// A frame to write, and what it is (for counting the outcome).
struct Outgoing {
    bytes: Vec<u8>,
    ack: bool,
}

/// Per-port state that outlives a session: decoding, counting, rate-limited reporting.
struct Port {
    port: SerialPort,
    name: Arc<str>,
    topic: String,
    seq: Option<SeqSource>,
    decoder: Decoder,
    quarantine: Quarantine,
    metrics: Arc<Metrics>,
    store: StoreHandle,
    /// Bad frames since the last WARN summary, by kind.
    unreported: [u64; ErrorKind::ALL.len()],
    last_warn: Option<Instant>,
    /// Frames queued with `done`, oldest first: (ack payload, outcome).
    pending: VecDeque<(Vec<u8>, oneshot::Receiver<Enqueued>)>,
    /// The state last logged at INFO/WARN.
    reported: Reported,
    /// Dedup keys are `dedup::scoped(dedup_scope, seq)`, with the scope `NUL "serial/" name`.
    /// MQTT keys are scoped by topic, and a topic never contains NUL, so a port named like a
    /// device topic ("meter") cannot suppress that device's messages or be suppressed by them.
    dedup_scope: Vec<u8>,
}

/// Run one port until `shutdown`: open (and reopen) it, decode frames, queue them.
pub async fn run_port(port: SerialPort, ctx: SerialContext, shutdown: CancellationToken) {
    let SerialContext {
        gateway,
        store,
        metrics,
        mut downlink,
    } = ctx;
    let name: Arc<str> = port.name.as_str().into();
    // Both were validated with the config; failing here means a caller skipped validation.
    let topic = match Template::parse(&port.topic) {
        Ok(t) => t.render(&port.name, &gateway),
        Err(e) => {
            warn!(port = %name, error = %e, "serial port not started: invalid topic");
            return;
        }
    };
    let decoder = match Decoder::new(port.framing(), port.max_frame.0 as usize) {
        Ok(d) => d,
        Err(e) => {
            warn!(port = %name, error = %e, "serial port not started: invalid framing settings");
            return;
        }
    };
    let port_name = port.name.clone();
    let mut p = Port {
        seq: port.seq_source(),
        port,
        name,
        topic,
        decoder,
        quarantine: Quarantine::new(QUARANTINE, codec::SAMPLE_LEN),
        metrics,
        store,
        unreported: [0; ErrorKind::ALL.len()],
        last_warn: None,
        pending: VecDeque::new(),
        reported: Reported::Nothing,
        dedup_scope: [&b"\0serial/"[..], port_name.as_bytes()].concat(),
    };
    let mut backoff = Backoff::new(p.port.reopen_initial.0, p.port.reopen_max.0, STABLE_AFTER);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match open(&p.port).await {
            Ok(stream) => {
                p.metrics.serial_opens.inc();
                let opened = Instant::now();
                let end = p.session(stream, &mut downlink, &shutdown).await;
                backoff.connection_ended(opened.elapsed());
                match end {
                    SessionEnd::Lost(e) if p.reported != Reported::Down => {
                        let what = match p.reported {
                            Reported::Open => "lost",
                            _ => "fails right after opening",
                        };
                        warn!(port = %p.name, path = %p.port.path.display(), error = %e,
                            "serial port {} {what}; reopening with backoff (reported once)", p.name);
                        p.reported = Reported::Down;
                    }
                    // Opened but failed before it was confirmed: part of the same outage.
                    SessionEnd::Lost(e) => {
                        debug!(port = %p.name, error = %e, "serial port failed right after opening")
                    }
                    SessionEnd::Shutdown | SessionEnd::StoreClosed => break,
                }
            }
            Err(e) => {
                let absent = !p.port.path.exists();
                if p.reported != Reported::Down {
                    let what = if absent { "absent" } else { "cannot be opened" };
                    warn!(port = %p.name, path = %p.port.path.display(), error = %e,
                        "serial port {} {what}; retrying with backoff (reported once)", p.name);
                    p.reported = Reported::Down;
                } else {
                    debug!(port = %p.name, error = %e, "serial port reopen failed");
                }
            }
        }
        let delay = backoff.next_delay(fastrand::f64());
        let appeared = wait_to_reopen(&p, delay, &mut downlink, &shutdown).await;
        if appeared {
            // A replugged device: try at once, and from the bottom of the backoff.
            backoff = Backoff::new(p.port.reopen_initial.0, p.port.reopen_max.0, STABLE_AFTER);
        }
    }
    // Anything the store has not confirmed yet is still committed by the service's final flush;
    // its ack is simply not written (the device retransmits, and is acked after the restart).
    debug!(port = %p.name, "serial port stopped");
}

/// Sleep `delay` before the next open attempt, dropping downlink messages meanwhile (stale
/// commands must not pile up for a device that is not there). Returns early, with true, if the
/// path was absent and reappeared; with false on shutdown or after the delay.
async fn wait_to_reopen(
    p: &Port,
    delay: Duration,
    downlink: &mut Option<mpsc::Receiver<Vec<u8>>>,
    shutdown: &CancellationToken,
) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    let was_absent = !p.port.path.exists();
    let mut poll = tokio::time::interval(PRESENCE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = poll.tick(), if was_absent => {
                if p.port.path.exists() {
                    return true;
                }
            }
            Some(_) = recv_downlink(downlink) => {
                p.metrics.downlink_dropped.inc();
                warn!(port = %p.name, "downlink message dropped: serial port {} is not open", p.name);
            }
        }
    }
}

/// The next downlink message, or never when the port has no downlink (or it closed).
async fn recv_downlink(downlink: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match downlink {
        Some(rx) => match rx.recv().await {
            Some(m) => Some(m),
            None => {
                *downlink = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Open the device with the port's line settings. Runs on the blocking pool with a deadline:
/// open() on a wedged USB adapter can hang.
async fn open(port: &SerialPort) -> io::Result<SerialStream> {
    let path = port.path.to_string_lossy().into_owned();
    let builder = tokio_serial::new(path, port.baud)
        .data_bits(match port.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .parity(match port.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(match port.stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        })
        .flow_control(match port.flow_control {
            FlowControl::None => tokio_serial::FlowControl::None,
            FlowControl::Software => tokio_serial::FlowControl::Software,
            FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
        });
    if !port.path.exists() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such device"));
    }
    // The stream registers with the runtime's reactor; blocking-pool threads have its context.
    let task = tokio::task::spawn_blocking(move || builder.open_native_async());
    match tokio::time::timeout(OPEN_TIMEOUT, task).await {
        Ok(Ok(Ok(stream))) => Ok(stream),
        Ok(Ok(Err(e))) => Err(io::Error::other(e.to_string())),
        Ok(Err(join)) => Err(io::Error::other(format!("open task failed: {join}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("open did not finish within {OPEN_TIMEOUT:?}"),
        )),
    }
}

impl Port {
    /// Read, decode and queue until the port fails or shutdown. Writes (acks, downlink) go
    /// through a separate task so a device that stops reading cannot stall ingest.
    async fn session(
        &mut self,
        stream: SerialStream,
        downlink: &mut Option<mpsc::Receiver<Vec<u8>>>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let (mut rd, wr) = tokio::io::split(stream);
        let (wtx, wrx) = mpsc::channel(WRITE_QUEUE);
        let writer = tokio::spawn(write_loop(self.name.clone(), wr, wrx, self.metrics.clone()));
        let mut buf = vec![0u8; READ_BUF];
        let mut last_byte = tokio::time::Instant::now();
        let confirm_at = last_byte + CONFIRM_AFTER;
        let end = loop {
            let unconfirmed = self.reported != Reported::Open;
            let idle_at = last_byte + self.port.idle_flush.0;
            let warn_at = self
                .last_warn
                .map(|t| tokio::time::Instant::from_std(t + WARN_EVERY))
                .unwrap_or_else(tokio::time::Instant::now);
            let has_unreported = self.unreported.iter().any(|&n| n > 0);
            let mid_frame = self.decoder.buffered() > 0;
            let can_read = self.pending.len() < MAX_PENDING_ACKS;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                outcome = next_outcome(&mut self.pending) => {
                    if let Some((ack, outcome)) = outcome {
                        self.ack(&wtx, ack, outcome);
                    }
                }
                n = read_some(&mut rd, &mut buf), if can_read => match n {
                    Ok(n) => {
                        last_byte = tokio::time::Instant::now();
                        self.confirm_open();
                        let decoded = self.decoder.feed(&buf[..n]);
                        if let Err(end) = self.handle(decoded).await {
                            break end;
                        }
                    }
                    Err(e) => break SessionEnd::Lost(e),
                },
                _ = tokio::time::sleep_until(idle_at), if mid_frame => {
                    let decoded = self.decoder.finish();
                    if let Err(end) = self.handle(decoded).await {
                        break end;
                    }
                }
                _ = tokio::time::sleep_until(warn_at), if has_unreported => self.warn_bad_frames(),
                _ = tokio::time::sleep_until(confirm_at), if unconfirmed => self.confirm_open(),
                Some(msg) = recv_downlink(downlink) => self.downlink(&wtx, msg),
            }
        };
        // Whatever was decoded is queued; a partial frame is counted as truncated.
        let decoded = self.decoder.finish();
        let end = match self.handle(decoded).await {
            Err(SessionEnd::StoreClosed) => SessionEnd::StoreClosed,
            _ => end,
        };
        if matches!(end, SessionEnd::Shutdown) {
            // Let frames committed in the next few ms still be acknowledged.
            let deadline = tokio::time::Instant::now() + SHUTDOWN_ACK_GRACE;
            while let Ok(Some((ack, outcome))) =
                tokio::time::timeout_at(deadline, next_outcome(&mut self.pending)).await
            {
                self.ack(&wtx, ack, outcome);
            }
        }
        // Commits still outstanding are not acknowledged on this port handle: the device
        // retransmits them and is acked as a duplicate.
        self.pending.clear();
        drop(wtx);
        // The writer ends once its queue is drained (each write has a deadline).
        let limit = WRITE_TIMEOUT * 2;
        if tokio::time::timeout(limit, finish_writer(writer))
            .await
            .is_err()
        {
            debug!(port = %self.name, "serial writer did not finish in time");
        }
        end
    }

    /// The port works (it delivered data, or stayed open a while): log the recovery once.
    /// Logging at open() instead would log every attempt of a port that opens and fails at once.
    fn confirm_open(&mut self) {
        if self.reported != Reported::Open {
            info!(port = %self.name, path = %self.port.path.display(), baud = self.port.baud,
                framing = %self.port.framing, "serial port {} open", self.name);
            self.reported = Reported::Open;
        }
    }

    /// Queue the frames, count and quarantine the bad ones.
    async fn handle(&mut self, decoded: Vec<Decoded>) -> Result<(), SessionEnd> {
        for d in decoded {
            match d {
                Decoded::Frame(payload) => self.queue(payload).await?,
                Decoded::Bad(bad) => self.bad_frame(bad),
            }
        }
        Ok(())
    }

    async fn queue(&mut self, payload: Bytes) -> Result<(), SessionEnd> {
        let received = Instant::now();
        self.metrics.serial_frames.inc();
        let seq = self.seq.as_ref().and_then(|s| s.extract(&payload));
        if self.seq.is_some() && seq.is_none() {
            self.metrics.ingest_dedup_key_missing.inc();
            debug!(port = %self.name, len = payload.len(), "frame without a sequence number: queued without dedup, not acknowledged");
        }
        let dedup_key = seq.as_deref().map(|s| dedup::scoped(&self.dedup_scope, s));
        let (done, outcome) = match (&seq, &self.seq) {
            (Some(s), Some(source)) if self.port.ack => {
                let (tx, rx) = oneshot::channel();
                let ack = SerialPort::ack_payload(source, s);
                (Some(tx), Some((ack, rx)))
            }
            _ => (None, None),
        };
        self.store
            .enqueue(NewMessage {
                // Serial ports are routes of their own in the queue, "serial/NAME".
                route: format!("serial/{}", self.name).into(),
                topic: self.topic.clone(),
                payload,
                dedup_key,
                received,
                done,
            })
            .await
            .map_err(|_| SessionEnd::StoreClosed)?;
        if let Some(o) = outcome {
            self.pending.push_back(o);
        }
        Ok(())
    }

    fn bad_frame(&mut self, bad: BadFrame) {
        let i = ErrorKind::ALL
            .iter()
            .position(|k| *k == bad.kind)
            .unwrap_or(0);
        if let Some(c) = self.metrics.serial_bad_frames.get(i) {
            c.inc();
        }
        self.unreported[i] += 1;
        debug!(port = %self.name, kind = %bad.kind, len = bad.len, sample = %hex(&bad.bytes), "bad serial frame");
        self.quarantine.push(bad);
        if self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.warn_bad_frames();
        }
    }

    /// One WARN with the bad frames counted since the last one, and the latest sample.
    fn warn_bad_frames(&mut self) {
        let counts: Vec<String> = ErrorKind::ALL
            .iter()
            .zip(self.unreported)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        if counts.is_empty() {
            return;
        }
        let latest = self
            .quarantine
            .iter()
            .last()
            .map(|b| hex(&b.bytes))
            .unwrap_or_default();
        warn!(port = %self.name, counts = %counts.join(" "), latest = %latest,
            "serial port {}: bad frames dropped (summary at most once a minute; each at debug)", self.name);
        self.unreported = [0; ErrorKind::ALL.len()];
        self.last_warn = Some(Instant::now());
    }

    /// The store settled a frame that wants an ack.
    fn ack(&self, wtx: &mpsc::Sender<Outgoing>, payload: Vec<u8>, outcome: Enqueued) {
        if let Enqueued::Duplicate = outcome {
            debug!(port = %self.name, "retransmitted frame: acknowledged, not queued again");
        }
        match codec::encode(self.port.framing(), &payload) {
            Ok(bytes) => {
                if wtx.try_send(Outgoing { bytes, ack: true }).is_err() {
                    debug!(port = %self.name, "ack skipped: write queue full (the device will retransmit)");
                }
            }
            // E.g. a JSON string sequence number containing a line break on a lines port.
            Err(e) => debug!(port = %self.name, error = %e, "ack cannot be framed; not sent"),
        }
    }

    fn downlink(&self, wtx: &mpsc::Sender<Outgoing>, msg: Vec<u8>) {
        match codec::encode(self.port.framing(), &msg) {
            Ok(bytes) => {
                if wtx.try_send(Outgoing { bytes, ack: false }).is_err() {
                    self.metrics.downlink_dropped.inc();
                    warn!(port = %self.name, "downlink message dropped: serial write queue full");
                }
            }
            Err(e) => {
                self.metrics.downlink_dropped.inc();
                warn!(port = %self.name, error = %e, len = msg.len(),
                    "downlink message dropped: it cannot be framed as {}", self.port.framing);
            }
        }
    }
}

/// The outcome of the oldest pending frame (None if the store dropped it, which happens only
/// when it is closing); never resolves while nothing is pending.
async fn next_outcome(
    pending: &mut VecDeque<(Vec<u8>, oneshot::Receiver<Enqueued>)>,
) -> Option<(Vec<u8>, Enqueued)> {
    let Some((_, rx)) = pending.front_mut() else {
        return std::future::pending().await;
    };
    let outcome = rx.await;
    let (ack, _) = pending.pop_front()?;
    outcome.ok().map(|o| (ack, o))
}

/// One read; EOF is an error here: a hung-up tty (unplugged, or its pty master closed) reads 0.
async fn read_some(rd: &mut ReadHalf<SerialStream>, buf: &mut [u8]) -> io::Result<usize> {
    match rd.read(buf).await {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "end of file (device hung up)",
        )),
        other => other,
    }
}

async fn finish_writer(writer: JoinHandle<()>) {
    let _ = writer.await;
}

/// Write each queued frame with a deadline, counting acks written and downlink frames lost.
async fn write_loop(
    name: Arc<str>,
    mut wr: WriteHalf<SerialStream>,
    mut rx: mpsc::Receiver<Outgoing>,
    metrics: Arc<Metrics>,
) {
    let mut failed = false;
    while let Some(out) = rx.recv().await {
        if failed {
            // The port is failing; the reader notices and reopens. Count what is lost.
            if !out.ack {
                metrics.downlink_dropped.inc();
            }
            continue;
        }
        let result = tokio::time::timeout(WRITE_TIMEOUT, async {
            wr.write_all(&out.bytes).await?;
            wr.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => {
                if out.ack {
                    metrics.serial_acks.inc();
                }
            }
            Ok(Err(e)) => {
                failed = true;
                if !out.ack {
                    metrics.downlink_dropped.inc();
                }
                debug!(port = %name, error = %e, "serial write failed");
            }
            Err(_) => {
                if !out.ack {
                    metrics.downlink_dropped.inc();
                    warn!(port = %name, "downlink message dropped: the device did not take it within {WRITE_TIMEOUT:?}");
                } else {
                    debug!(port = %name, "ack write timed out");
                }
            }
        }
    }
}

/// At most the first 64 bytes as hex, for logs.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len().min(codec::SAMPLE_LEN) * 2);
    for b in bytes.iter().take(codec::SAMPLE_LEN) {
        let _ = write!(s, "{b:02x}");
    }
    s
}
