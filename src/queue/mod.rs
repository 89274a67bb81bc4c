//! The durable store-and-forward queue: one SQLite file, owned by one thread.
//!
//! # Invariants
//!
//! - **Durable = committed.** A message is *committed* when the SQLite transaction that inserted
//!   it returned from COMMIT. With `sync = "full"` (the default) that COMMIT fsynced the WAL, so
//!   the row survives kill -9 and power loss; with `sync = "normal"` it survives kill -9 but the
//!   last commits may be lost on power loss. Only committed rows are ever handed to the
//!   forwarder, and an ingest caller's completion (`Enqueued::Committed`) fires only after COMMIT.
//! - **Deleted only on acknowledgement.** A row leaves `messages` only through [`StoreHandle::ack`]
//!   (the upstream's PUBACK for it) or [`StoreHandle::dead_letter`] (the upstream refused it, or
//!   the forwarder quarantined it: see `forward`; the row moves to `dead_letters` with a reason
//!   in the same transaction). Nothing else deletes.
//! - **Ids are stable and never reused.** `seq` is an `AUTOINCREMENT` rowid: strictly increasing,
//!   never reused even after the table empties. The message id sent upstream is
//!   `{gateway}-{epoch}-{seq}`, where `epoch` is random per store file, so a recreated store
//!   cannot collide with ids a consumer has already seen. A resend carries the same id.
//! - **Order.** Rows are returned in `seq` order, i.e. commit order.
//! - **Crash.** Writes are buffered for at most `commit_interval` (or `commit_batch` messages)
//!   and executed in one transaction. A crash loses only the uncommitted buffer: inserts whose
//!   completion never fired, and acks whose delete was not yet committed (those rows are resent:
//!   a bounded duplicate, see README "Delivery contract").
//! - **Never destroy an operator's file.** A file that is not SQLite, is SQLite but not ours, is
//!   corrupt, or comes from a newer schema is refused with an error naming it; it is never
//!   truncated, deleted or "repaired" here.
//! - **Dedup.** Ingest dedup keys live in `dedup` and are written in the same transaction as the
//!   message they admitted, so after a crash a key is remembered iff its message was committed.
//!   The window is measured on [`WindowClock`] (wall clock at open, advanced monotonically), so a
//!   wall-clock step while running neither extends nor shortens it. At open, keys stamped after
//!   the start-up time (the clock was ahead when they were stored) are re-stamped to it: a key
//!   outlives its window by at most one window. Beyond `dedup_max_keys`, keys are forgotten in
//!   the order they were admitted (`ord`), never by stamp.

mod schema;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::SyncMode;
use crate::dedup::{SuppressedLog, WindowClock};
use crate::telemetry::Metrics;

pub use schema::SCHEMA_VERSION;

/// Why the store cannot be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory for the file is missing or not writable, or the file cannot be opened.
    #[error("store.path {path}: cannot open: {detail}")]
    Open { path: PathBuf, detail: String },
    /// The file exists but is not an SQLite database.
    #[error("store.path {path}: not an edgeferry store (not an SQLite database); refusing to use it, the file is left untouched")]
    NotADatabase { path: PathBuf },
    /// An SQLite database that belongs to something else.
    #[error("store.path {path}: an SQLite database that is not an edgeferry store (application_id {app_id:#x}); refusing to use it, the file is left untouched")]
    Foreign { path: PathBuf, app_id: i64 },
    /// Written by a newer edgeferry whose schema this build does not know.
    #[error("store.path {path}: schema version {found} is newer than this edgeferry supports ({known}); upgrade edgeferry, the file is left untouched")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// SQLite reports corruption.
    #[error("store.path {path}: database is corrupt ({detail}); refusing to start, the file is left untouched (move it aside to start empty, or try `sqlite3 FILE .recover`)")]
    Corrupt { path: PathBuf, detail: String },
    /// Any other SQLite error.
    #[error("store.path {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The store thread has stopped.
    #[error("store is closed")]
    Closed,
}

/// Settings of an open store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub sync: SyncMode,
    pub commit_interval: Duration,
    pub commit_batch: usize,
    pub dedup_window: Duration,
    pub dedup_max_keys: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sync: SyncMode::Full,
            commit_interval: Duration::from_millis(5),
            commit_batch: 1024,
            dedup_window: Duration::from_secs(3600),
            dedup_max_keys: 100_000,
        }
    }
}

/// A message to commit.
#[derive(Debug)]
pub struct NewMessage {
    /// Upstream topic (already rendered from the route's template).
    pub topic: String,
    pub payload: Bytes,
    /// Ingest dedup key (already scoped to its source), if the route has one and it was found.
    pub dedup_key: Option<Vec<u8>>,
    /// When ingest received it: the start of the ack-to-commit window.
    pub received: Instant,
    /// Told the outcome once known (serial ports use it to acknowledge frames to the device).
    pub done: Option<oneshot::Sender<Enqueued>>,
}

/// What became of a [`NewMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Committed under this sequence number.
    Committed(i64),
    /// Its dedup key was seen within the window; not queued again.
    Duplicate,
}

/// A committed message as the forwarder sees it.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: i64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub enqueued_ms: i64,
    /// Set when the stored row cannot be read as a message (a topic that is not UTF-8 text, a
    /// payload that is not bytes: written by something other than this version). The forwarder
    /// moves such a row to the dead-letter table rather than let it stop the queue.
    pub defect: Option<String>,
}

/// A point-in-time view of the queue.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub depth: u64,
    pub oldest_enqueued_ms: Option<i64>,
    pub dead_letters: u64,
}

enum Cmd {
    Insert(NewMessage),
    DeadLetter(i64, String),
    Fetch {
        after: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Row>, String>>,
        /// When the fetch finds nothing: where to push rows as they are committed (see `Tail`).
        tail: Option<Tail>,
    },
    /// Acknowledgements are waiting in the inbox and the store thread was idle.
    AcksWaiting,
    Stats(oneshot::Sender<Stats>),
    /// Commit everything buffered, then reply.
    Flush(oneshot::Sender<()>),
    /// Test hook: stop at once, discarding the buffer, as kill -9 would.
    #[cfg(test)]
    Crash,
    /// Test hook: run maintenance now, then reply.
    #[cfg(test)]
    Maintain(oneshot::Sender<()>),
}

/// Cheap, cloneable access to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    // Bounded: when full, `enqueue` waits, which stops ingest reading from the local broker; the
    // broker keeps acknowledging devices into its in-memory log (sized by local.buffer), and if
    // that overflows it drops the oldest part, counted as edgeferry_local_dropped_total.
    tx: flume::Sender<Cmd>,
    /// Liveness probes, answered by the store thread wherever it waits, including between the
    /// retries of a failing commit (a full disk is waiting, not hung).
    probe: flume::Sender<oneshot::Sender<()>>,
    acks: Arc<AckInbox>,
    committed: watch::Receiver<i64>,
    epoch: Arc<str>,
}

/// Upstream acknowledgements waiting for the store thread's next commit.
#[derive(Default)]
struct AckInbox {
    inbox: std::sync::Mutex<Vec<i64>>,
    /// Set by the store thread before a long idle wait (it then needs a wake for acks).
    sleeping: std::sync::atomic::AtomicBool,
}

/// Where the store pushes freshly committed rows for a caught-up reader. Bounded: when full, the
/// store stops pushing (drops its end) and the reader fetches again.
pub type Tail = tokio::sync::mpsc::Sender<Vec<Row>>;

/// The open store: the handle plus the thread, joined by [`Store::close`].
pub struct Store {
    handle: StoreHandle,
    thread: Option<JoinHandle<()>>,
}

/// Channel capacity between the async side and the store thread: about 30 ms of ingest at full
/// speed, four default commit groups. Messages here are acknowledged but not yet committed, so a
/// larger channel would only widen the crash-loss window and the memory held.
const CHANNEL_CAPACITY: usize = 4 * 1024;

/// A fetch stops after the row that takes it past this many payload and topic bytes (it always
/// returns at least one row), so reading ahead holds little memory with large payloads.
const FETCH_MAX_BYTES: usize = 1 << 20;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open (or create) the store file and start its thread.
    pub fn open(
        path: &Path,
        options: StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let conn = schema::open(path, options.sync)?;
        let epoch: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .map_err(|e| schema::classify(path, e))?;
        let (depth, last_seq): (u64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(max(seq), 0) FROM messages",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .map_err(|e| schema::classify(path, e))?;
        let dead: i64 = conn
            .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))
            .map_err(|e| schema::classify(path, e))?;
        let dedup_keys: i64 = conn
            .query_row("SELECT count(*) FROM dedup", [], |r| r.get(0))
            .map_err(|e| schema::classify(path, e))?;
        let clock = WindowClock::start(now_ms());
        restamp_future_keys(&conn, clock.now_ms(), &metrics)
            .map_err(|e| schema::classify(path, e))?;
        metrics.queue_depth.set(depth);
        metrics.dead_letters.set(dead as u64);
        if depth > 0 {
            info!(depth, "store opened with a backlog; it will be forwarded");
        }
        let (tx, rx) = flume::bounded(CHANNEL_CAPACITY);
        let (probe, probe_rx) = flume::bounded(4);
        let acks = Arc::new(AckInbox::default());
        let (committed_tx, committed_rx) = watch::channel(last_seq);
        let mut worker = Worker {
            conn,
            path: path.to_path_buf(),
            options,
            metrics,
            rx,
            probe_rx,
            acks: acks.clone(),
            tail: None,
            committed: committed_tx,
            pending: Vec::new(),
            pending_keys: HashSet::new(),
            pending_acks: HashSet::new(),
            depth,
            dead_letters: dead as u64,
            dedup_keys: dedup_keys as u64,
            clock,
            suppressed: SuppressedLog::new(SUPPRESSED_LOG_EVERY),
            last_maintenance: Instant::now(),
        };
        // A store opened after a step of the clock may hold more than max_keys, or keys whose
        // window ended while it was closed: forget them before the first lookup, not 10 s later.
        if let Err(e) = worker.prune_dedup() {
            warn!(error = %e, "store: dedup pruning failed; will retry");
        }
        let thread = std::thread::Builder::new()
            .name("edgeferry-store".into())
            .spawn(move || worker.run())
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                detail: format!("cannot start store thread: {e}"),
            })?;
        Ok(Store {
            handle: StoreHandle {
                tx,
                probe,
                acks,
                committed: committed_rx,
                epoch: epoch.into(),
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Commit what is buffered and stop the thread. Other handles must be dropped first or the
    /// thread keeps serving them; this waits for that.
    pub fn close(mut self) {
        let Store { handle, thread } = &mut self;
        let (reply, wait) = oneshot::channel();
        if handle.tx.send(Cmd::Flush(reply)).is_ok() {
            let _ = wait.blocking_recv();
        }
        // Drop our sender; the thread exits when every handle is gone.
        let (dummy, _) = flume::bounded(1);
        handle.tx = dummy;
        if let Some(t) = thread.take() {
            let _ = t.join();
        }
    }

    #[cfg(test)]
    fn crash(mut self) {
        let _ = self.handle.tx.send(Cmd::Crash);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl StoreHandle {
    /// Queue a message for the next commit. Waits while the store's channel is full.
    pub async fn enqueue(&self, msg: NewMessage) -> Result<(), StoreError> {
        self.tx
            .send_async(Cmd::Insert(msg))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// The upstream acknowledged `seq`: delete it (at the next commit).
    pub async fn ack(&self, seq: i64) -> Result<(), StoreError> {
        // Into the inbox, without waking the store thread: acknowledgements wait for the next
        // commit anyway (ACK_LINGER). Only a store thread asleep for long is woken, once.
        let was_empty = {
            let mut inbox = self.acks.inbox.lock().unwrap_or_else(|e| e.into_inner());
            inbox.push(seq);
            inbox.len() == 1
        };
        if was_empty && self.acks.sleeping.load(std::sync::atomic::Ordering::SeqCst) {
            self.tx
                .send_async(Cmd::AcksWaiting)
                .await
                .map_err(|_| StoreError::Closed)?;
        }
        if self.tx.is_disconnected() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// The upstream refused `seq` for good: move it to the dead-letter table with `reason`.
    pub async fn dead_letter(&self, seq: i64, reason: String) -> Result<(), StoreError> {
        self.tx
            .send_async(Cmd::DeadLetter(seq, reason))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Up to `limit` committed rows with `seq > after`, oldest first, skipping rows whose ack is
    /// buffered but not yet committed; fewer once about 1 MiB is gathered. Empty only when no
    /// such row exists.
    pub async fn fetch(&self, after: i64, limit: usize) -> Result<Vec<Row>, StoreError> {
        self.fetch_or_tail(after, limit, None).await
    }

    /// [`StoreHandle::fetch`]; when it finds nothing and `tail` is given, the store instead
    /// pushes each later commit's new rows (seq > `after`, in order) into `tail` until the
    /// channel is full or closed, then drops its end: the caller sees the channel close and
    /// fetches again from the last row it got. The forwarder is told about fresh rows instead of
    /// asking for them (one store round trip less per commit).
    pub async fn fetch_or_tail(
        &self,
        after: i64,
        limit: usize,
        tail: Option<Tail>,
    ) -> Result<Vec<Row>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Fetch {
                after,
                limit,
                reply,
                tail,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(detail)) => Err(StoreError::Corrupt {
                path: PathBuf::from("(open store)"),
                detail,
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Stats(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Liveness: a round trip through the store thread's own wait, answered even while a failing
    /// commit is being retried.
    pub async fn alive(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.probe
            .send_async(reply)
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Commit everything buffered so far.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Flush(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Commands waiting for the store thread, and the most that can wait (ingest back-pressure).
    pub fn backlog(&self) -> (usize, usize) {
        (self.tx.len(), CHANNEL_CAPACITY)
    }

    /// The store thread has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_disconnected()
    }

    /// Watch the highest committed seq (changes after every commit that inserted rows).
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    /// The random per-file epoch that makes message ids unique across store files.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }
}

/// A buffered write waiting for the next commit.
enum Write {
    Insert(NewMessage),
    Ack(i64),
    DeadLetter(i64, String),
}

struct Worker {
    conn: Connection,
    path: PathBuf,
    options: StoreOptions,
    metrics: Arc<Metrics>,
    rx: flume::Receiver<Cmd>,
    probe_rx: flume::Receiver<oneshot::Sender<()>>,
    acks: Arc<AckInbox>,
    /// A caught-up reader's channel and the last seq it has.
    tail: Option<(i64, Tail)>,
    committed: watch::Sender<i64>,
    pending: Vec<Write>,
    /// Dedup keys of buffered inserts (the table only knows committed ones).
    pending_keys: HashSet<Vec<u8>>,
    /// Seqs with a buffered ack or dead-letter: hidden from fetch so a reconnect's re-read does
    /// not resend what the upstream already acknowledged.
    pending_acks: HashSet<i64>,
    depth: u64,
    dead_letters: u64,
    dedup_keys: u64,
    /// What the dedup window is measured on (never the wall clock directly).
    clock: WindowClock,
    /// Throttles the INFO line about suppressed duplicates.
    suppressed: SuppressedLog,
    last_maintenance: Instant,
}

/// What one transaction did.
#[derive(Default)]
struct Committed {
    /// Seq of each insert, in buffer order.
    seqs: Vec<i64>,
    /// `enqueued_ms` written for the inserts.
    stamp: i64,
    /// Rows deleted from `messages` (acked or dead-lettered).
    removed: u64,
    /// Rows moved to `dead_letters`.
    buried: u64,
}

/// Longest an upstream acknowledgement waits for a commit that inserts (see `Worker::run`). A
/// crash inside it only resends those messages: duplicates, bounded by this and `commit_batch`.
const ACK_LINGER: Duration = Duration::from_millis(250);

/// How often idle maintenance (dedup window pruning) runs.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

/// At most one INFO summary of suppressed duplicates per this long (each is logged at debug).
const SUPPRESSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Re-stamp dedup keys stamped after `now_ms` to `now_ms`. Such keys were stored while the clock
/// was ahead of today's (a gateway without a real-time clock that booted with a time in the
/// future, then stepped back): left alone, they would suppress their keys until the clock caught
/// up, for as long as the step. Re-stamped, they expire one window from now.
fn restamp_future_keys(conn: &Connection, now_ms: i64, metrics: &Metrics) -> rusqlite::Result<()> {
    let n = conn.execute("UPDATE dedup SET seen_ms = ?1 WHERE seen_ms > ?1", [now_ms])?;
    if n > 0 {
        metrics.ingest_dedup_restamped.add(n as u64);
        warn!(
            keys = n,
            "store: dedup keys were stamped later than the clock says it is now (the clock was ahead when they were stored, or is behind now); they are re-stamped to now and expire within one [dedup] window"
        );
    }
    Ok(())
}

impl Worker {
    /// The next command, answering liveness probes while waiting for it.
    fn next(&self, timeout: Duration) -> Result<Cmd, flume::RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = flume::Selector::new()
                .recv(&self.rx, |r| {
                    Some(r.map_err(|_| flume::RecvTimeoutError::Disconnected))
                })
                .recv(&self.probe_rx, |r| {
                    if let Ok(reply) = r {
                        let _ = reply.send(());
                    }
                    None
                })
                .wait_deadline(deadline);
            match got {
                Ok(Some(cmd)) => return cmd,
                Ok(None) => continue,
                Err(flume::select::SelectError::Timeout) => {
                    return Err(flume::RecvTimeoutError::Timeout)
                }
            }
        }
    }

    /// Sleep `delay` between commit retries, answering liveness probes meanwhile.
    fn wait_answering_probes(&self, delay: Duration) {
        let deadline = Instant::now() + delay;
        while let Ok(reply) = self.probe_rx.recv_deadline(deadline) {
            let _ = reply.send(());
        }
    }

    fn run(&mut self) {
        // Acknowledgements alone do not start a commit: they ride in the next one that inserts,
        // or commit after ACK_LINGER (or once a whole group is waiting). One commit per message
        // instead of two at low rates: half the fsyncs and WAL pages on the flash.
        let mut acks_due: Option<Instant> = None;
        loop {
            // Announce a long sleep before looking at the inbox, so an ack pushed meanwhile
            // either is seen here or wakes us (see `StoreHandle::ack`).
            self.acks
                .sleeping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.take_acks();
            if !self.pending.is_empty() && acks_due.is_none() {
                acks_due = Some(Instant::now() + ACK_LINGER);
            }
            if acks_due.is_some() {
                self.acks
                    .sleeping
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
            let wait = acks_due
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(MAINTENANCE_EVERY)
                .min(MAINTENANCE_EVERY);
            let first = self.next(wait);
            self.acks
                .sleeping
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let first = match first {
                Ok(cmd) => cmd,
                Err(flume::RecvTimeoutError::Timeout) => {
                    if acks_due.take().is_some() {
                        self.commit();
                    } else {
                        self.maintenance();
                    }
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            let mut deadline = None;
            let mut next = Some(first);
            let mut closing = false;
            // Gather a group: commands are applied as they come; writes are buffered until the
            // group is full or the first buffered write has waited commit_interval.
            while let Some(cmd) = next.take() {
                match cmd {
                    #[cfg(test)]
                    Cmd::Crash => return,
                    #[cfg(test)]
                    Cmd::Maintain(reply) => {
                        self.commit();
                        self.maintenance();
                        let _ = reply.send(());
                    }
                    Cmd::Flush(reply) => {
                        self.commit();
                        let _ = reply.send(());
                    }
                    other => self.apply(other),
                }
                if self.pending.is_empty() {
                    break;
                }
                let d =
                    *deadline.get_or_insert_with(|| Instant::now() + self.options.commit_interval);
                if self.pending.len() >= self.options.commit_batch {
                    break;
                }
                match self.rx.recv_deadline(d) {
                    Ok(cmd) => next = Some(cmd),
                    Err(flume::RecvTimeoutError::Timeout) => break,
                    Err(flume::RecvTimeoutError::Disconnected) => {
                        closing = true;
                        break;
                    }
                }
            }
            let acks_only = self.pending.iter().all(|w| !matches!(w, Write::Insert(_)));
            if !closing && acks_only && self.pending.len() < self.options.commit_batch {
                let due = *acks_due.get_or_insert_with(|| Instant::now() + ACK_LINGER);
                if Instant::now() < due {
                    continue;
                }
            }
            acks_due = None;
            self.commit();
            if closing {
                break;
            }
            if self.last_maintenance.elapsed() >= MAINTENANCE_EVERY {
                self.maintenance();
            }
        }
        self.commit();
        // Fold the WAL back into the main file so a clean stop leaves one file behind.
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            warn!(error = %e, "store: final checkpoint failed (harmless; redone at next open)");
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Insert(msg) => {
                if let Some(key) = &msg.dedup_key {
                    if self.is_duplicate(key) {
                        self.metrics.ingest_duplicates.inc();
                        debug!(topic = ?msg.topic, key = %key.escape_ascii(),
                            "ingest dedup: duplicate acknowledged, not queued again (its key was committed within [dedup] window)");
                        if let Some(s) = self.suppressed.record(Instant::now(), &msg.topic) {
                            self.log_suppressed(s);
                        }
                        if let Some(done) = msg.done {
                            let _ = done.send(Enqueued::Duplicate);
                        }
                        return;
                    }
                    self.pending_keys.insert(key.clone());
                }
                self.pending.push(Write::Insert(msg));
            }
            Cmd::DeadLetter(seq, reason) => {
                self.pending_acks.insert(seq);
                self.pending.push(Write::DeadLetter(seq, reason));
            }
            Cmd::Fetch {
                after,
                limit,
                reply,
                tail,
            } => {
                // Rows acknowledged but still in the inbox must not be read again.
                self.take_acks();
                let rows = self.fetch(after, limit);
                if let (Ok(r), Some(t)) = (&rows, tail) {
                    if r.is_empty() {
                        self.tail = Some((after, t));
                    }
                }
                let _ = reply.send(rows);
            }
            Cmd::AcksWaiting => self.take_acks(),
            Cmd::Stats(reply) => {
                let oldest = self
                    .conn
                    .query_row(
                        "SELECT enqueued_ms FROM messages ORDER BY seq LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()
                    .unwrap_or(None);
                let _ = reply.send(Stats {
                    depth: self.depth,
                    oldest_enqueued_ms: oldest,
                    dead_letters: self.dead_letters,
                });
            }
            Cmd::Flush(reply) => {
                self.commit();
                let _ = reply.send(());
            }
            #[cfg(test)]
            Cmd::Crash | Cmd::Maintain(_) => {}
        }
    }

    fn is_duplicate(&self, key: &[u8]) -> bool {
        if self.pending_keys.contains(key) {
            return true;
        }
        let horizon = self.clock.now_ms() - self.options.dedup_window.as_millis() as i64;
        match self
            .conn
            .prepare_cached("SELECT seen_ms FROM dedup WHERE key = ?1")
            .and_then(|mut st| st.query_row([key], |r| r.get::<_, i64>(0)).optional())
        {
            Ok(Some(seen)) => seen >= horizon,
            Ok(None) => false,
            Err(e) => {
                // Fail open: a lookup error must not drop data; a duplicate is the lesser harm.
                warn!(error = %e, "store: dedup lookup failed; admitting the message");
                false
            }
        }
    }

    fn fetch(&self, after: i64, limit: usize) -> Result<Vec<Row>, String> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // No LIMIT: rows are stepped lazily and the loop stops when it has enough, however many
        // rows with buffered acks it skips on the way.
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq, topic, payload, enqueued_ms FROM messages WHERE seq > ?1 ORDER BY seq",
            )
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map(params![after], |r| {
                use rusqlite::types::ValueRef;
                // Column types are checked here, not trusted: a row this version cannot read is
                // returned with a defect instead of failing the whole fetch.
                let mut defect = None;
                let topic = match r.get_ref(1)? {
                    ValueRef::Text(t) | ValueRef::Blob(t) => match std::str::from_utf8(t) {
                        Ok(t) => t.to_string(),
                        Err(_) => {
                            defect = Some("topic is not UTF-8 text".to_string());
                            String::from_utf8_lossy(t).into_owned()
                        }
                    },
                    other => {
                        defect = Some(format!("topic is stored as {:?}", other.data_type()));
                        String::new()
                    }
                };
                let payload = match r.get_ref(2)? {
                    ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
                    other => {
                        defect = Some(format!("payload is stored as {:?}", other.data_type()));
                        Vec::new()
                    }
                };
                Ok(Row {
                    seq: r.get(0)?,
                    topic,
                    payload,
                    enqueued_ms: r.get::<_, Option<i64>>(3).ok().flatten().unwrap_or(0),
                    defect,
                })
            })
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut bytes = 0;
        for row in rows {
            let row = row.map_err(|e| e.to_string())?;
            if self.pending_acks.contains(&row.seq) {
                continue;
            }
            bytes += row.payload.len() + row.topic.len();
            out.push(row);
            if out.len() == limit || bytes >= FETCH_MAX_BYTES {
                break;
            }
        }
        Ok(out)
    }

    /// Execute the buffered writes in one transaction. On failure (disk full, I/O error) the
    /// buffer is kept and retried with backoff: ingest stalls rather than dropping anything.
    fn commit(&mut self) {
        self.take_acks();
        if self.pending.is_empty() {
            return;
        }
        let mut delay = Duration::from_millis(50);
        let mut failing_since: Option<Instant> = None;
        loop {
            match self.try_commit() {
                Ok(results) => {
                    if let Some(since) = failing_since {
                        self.metrics.store_commit_failing.set(0);
                        info!(after = ?since.elapsed(), "store: commits succeed again");
                    }
                    self.finish(results);
                    return;
                }
                Err(e) => {
                    self.metrics.store_commit_errors.inc();
                    if failing_since.is_none() {
                        error!(error = %e, path = %self.path.display(), buffered = self.pending.len(),
                            "store: commit failed; devices get no PUBACK and are held back while the commit is retried until it succeeds (is the disk full?)");
                        failing_since = Some(Instant::now());
                        self.metrics.store_commit_failing.set(1);
                    }
                    if self.rx.is_disconnected()
                        && failing_since.is_some_and(|s| s.elapsed() > Duration::from_secs(10))
                    {
                        let lost = self
                            .pending
                            .iter()
                            .filter(|w| matches!(w, Write::Insert(_)))
                            .count();
                        error!(lost, "store: shutting down while commits fail; the buffered, never-committed messages are lost");
                        self.metrics.store_lost_uncommitted.add(lost as u64);
                        self.pending.clear();
                        return;
                    }
                    self.wait_answering_probes(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One transaction for the whole buffer; returns the seq of each insert, in buffer order.
    fn try_commit(&mut self) -> rusqlite::Result<Committed> {
        let now = now_ms();
        // Dedup stamps come from the window's clock, not the wall clock (see `WindowClock`).
        let seen = self.clock.now_ms();
        let tx = self.conn.transaction()?;
        let mut done = Committed::default();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (topic, payload, enqueued_ms) VALUES (?1, ?2, ?3)",
            )?;
            let mut remember =
                tx.prepare_cached("INSERT OR REPLACE INTO dedup (key, seen_ms) VALUES (?1, ?2)")?;
            let mut delete = tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?;
            let mut bury = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead_letters (seq, topic, payload, enqueued_ms, failed_ms, reason)
                 SELECT seq, topic, payload, enqueued_ms, ?2, ?3 FROM messages WHERE seq = ?1",
            )?;
            for w in &self.pending {
                match w {
                    Write::Insert(m) => {
                        insert.execute(params![m.topic, &m.payload[..], now])?;
                        done.stamp = now;
                        done.seqs.push(tx.last_insert_rowid());
                        if let Some(k) = &m.dedup_key {
                            remember.execute(params![k, seen])?;
                        }
                    }
                    Write::Ack(seq) => {
                        // 0 rows when the row is already gone (acked twice after a resend).
                        done.removed += delete.execute([seq])? as u64;
                    }
                    Write::DeadLetter(seq, reason) => {
                        done.buried += bury.execute(params![seq, now, reason])? as u64;
                        done.removed += delete.execute([seq])? as u64;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(done)
    }

    fn finish(&mut self, done: Committed) {
        let mut seqs = done.seqs.into_iter();
        let mut last = None;
        let mut inserted = 0u64;
        let mut fresh = self.tail.as_ref().map(|_| Vec::new());
        for w in self.pending.drain(..) {
            match w {
                Write::Insert(m) => {
                    let seq = seqs.next().unwrap_or_default();
                    last = Some(seq);
                    if let Some(rows) = &mut fresh {
                        rows.push(Row {
                            seq,
                            topic: m.topic.clone(),
                            payload: m.payload.to_vec(),
                            enqueued_ms: done.stamp,
                            defect: None,
                        });
                    }
                    inserted += 1;
                    self.metrics.commit_latency.record(m.received.elapsed());
                    if m.dedup_key.is_some() {
                        self.dedup_keys += 1;
                    }
                    if let Some(done) = m.done {
                        let _ = done.send(Enqueued::Committed(seq));
                    }
                }
                Write::Ack(_) | Write::DeadLetter(..) => {}
            }
        }
        self.pending_keys.clear();
        self.pending_acks.clear();
        self.depth = (self.depth + inserted).saturating_sub(done.removed);
        self.dead_letters += done.buried;
        self.metrics
            .acked
            .add(done.removed - done.buried.min(done.removed));
        self.metrics.committed.add(inserted);
        self.metrics.queue_depth.set(self.depth);
        self.metrics.dead_letters.set(self.dead_letters);
        self.metrics.store_commits.inc();
        if let Some(seq) = last {
            self.committed.send_replace(seq);
        }
        if let (Some(rows), Some((cursor, tx))) = (fresh.filter(|r| !r.is_empty()), &mut self.tail)
        {
            // Every row above the reader's cursor is in this commit (it found none before, and
            // every later insert passes here), so pushing them keeps order without a query.
            let end = rows.last().map(|r| r.seq).unwrap_or(*cursor);
            if rows.first().is_some_and(|r| r.seq > *cursor) && tx.try_send(rows).is_ok() {
                *cursor = end;
            } else {
                self.tail = None;
            }
        }
    }

    /// Move acknowledgements from the inbox into the pending writes.
    fn take_acks(&mut self) {
        let acks = std::mem::take(&mut *self.acks.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for seq in acks {
            self.pending_acks.insert(seq);
            self.pending.push(Write::Ack(seq));
        }
    }

    /// Forget dedup keys outside the window: by age, then the earliest admitted beyond
    /// `dedup_max_keys`; and log the summary of suppressed duplicates when one is due.
    /// `dedup_keys` is an upper estimate (a replaced key counts twice), so the exact count, a
    /// scan, is taken only when the estimate says the limit may be exceeded.
    fn maintenance(&mut self) {
        self.last_maintenance = Instant::now();
        if let Some(s) = self.suppressed.due(self.last_maintenance) {
            self.log_suppressed(s);
        }
        if let Err(e) = self.prune_dedup() {
            warn!(error = %e, "store: dedup pruning failed; will retry");
        }
        if let Err(e) = self.reclaim() {
            warn!(error = %e, "store: reclaiming free space failed; will retry");
        }
    }

    fn log_suppressed(&self, s: crate::dedup::Suppressed) {
        info!(
            suppressed = s.count,
            last_topic = ?s.last_topic,
            window = ?self.options.dedup_window,
            "ingest dedup: messages acknowledged but not queued again, because their dedup key was committed within [dedup] window (at most one such line a minute)"
        );
    }

    fn prune_dedup(&mut self) -> rusqlite::Result<()> {
        if self.dedup_keys == 0 {
            return Ok(());
        }
        let horizon = self.clock.now_ms() - self.options.dedup_window.as_millis() as i64;
        let aged = self
            .conn
            .execute("DELETE FROM dedup WHERE seen_ms < ?1", [horizon])?;
        self.dedup_keys = self.dedup_keys.saturating_sub(aged as u64);
        if self.dedup_keys > self.options.dedup_max_keys {
            let n: i64 = self
                .conn
                .query_row("SELECT count(*) FROM dedup", [], |r| r.get(0))?;
            let excess = n - self.options.dedup_max_keys as i64;
            if excess > 0 {
                self.conn.execute(
                    // Admission order, not stamp order: see `WindowClock`.
                    "DELETE FROM dedup WHERE ord IN (SELECT ord FROM dedup ORDER BY ord LIMIT ?1)",
                    [excess],
                )?;
            }
            self.dedup_keys = n.min(self.options.dedup_max_keys as i64).max(0) as u64;
        }
        Ok(())
    }

    /// Give space back to the filesystem after a large backlog drained, so one long outage does
    /// not leave the file at its peak size for ever: `VACUUM` once at least
    /// [`RECLAIM_MIN_BYTES`] and nine tenths of the file are free. VACUUM rewrites only the live
    /// rows, which are then few, so it is short and writes little; SQLite's auto-vacuum would
    /// instead add a pointer-map page write to every commit, for the whole life of the flash.
    fn reclaim(&mut self) -> rusqlite::Result<()> {
        let pragma = |name: &str| -> rusqlite::Result<i64> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
        };
        let (free, pages, page_size) = (
            pragma("freelist_count")?,
            pragma("page_count")?,
            pragma("page_size")?,
        );
        if free * page_size < RECLAIM_MIN_BYTES || free * 10 < pages * 9 {
            return Ok(());
        }
        let started = Instant::now();
        self.conn.execute_batch("VACUUM")?;
        let after = pragma("page_count")?;
        info!(
            before_mib = (pages * page_size) >> 20,
            after_mib = (after * page_size) >> 20,
            took = ?started.elapsed(),
            "store: compacted after the backlog drained"
        );
        Ok(())
    }
}

/// Free space worth giving back (see `Worker::reclaim`).
const RECLAIM_MIN_BYTES: i64 = 16 << 20;

#[cfg(test)]
mod tests;
