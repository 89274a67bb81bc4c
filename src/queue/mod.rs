//! The durable store-and-forward queue: one SQLite file, owned by one thread.
//!
//! # Invariants
//!
//! - **Durable = committed.** A message is *committed* when the SQLite transaction that inserted
//!   it returned from COMMIT. With `sync = "full"` (the default) that COMMIT fsynced the WAL, so
//!   the row survives kill -9 and power loss; with `sync = "normal"` it survives kill -9 but the
//!   last commits may be lost on power loss. Only committed rows are ever handed to the
//!   forwarder, and an ingest caller's completion (`Enqueued::Committed`) fires only after COMMIT.
//! - **Deleted only on acknowledgement, or by a counted policy.** A row leaves `messages` through
//!   [`StoreHandle::ack`] (the upstream's PUBACK for it), [`StoreHandle::dead_letter`] (the
//!   upstream refused it, or the forwarder quarantined it: see `forward`; the row moves to
//!   `dead_letters` with a reason in the same transaction), or a policy the operator configured:
//!   overflow of a bound (`drop-oldest`, in the transaction of the insert that needed the room),
//!   a route's `ttl` (to `dead_letters` as `expired`, or dropped), or `edgeferry queue purge`
//!   ([`admin`]). Every policy removal is counted in `stats` (`drop.<reason>`) in the same
//!   transaction. Nothing else deletes.
//! - **Ids are stable and never reused.** `seq` is allocated by the store thread, strictly
//!   increasing. `meta.seq_reserved` is always at least every seq handed out: the commit that
//!   would pass it advances it by [`SEQ_BLOCK`] in the same transaction, and a start continues
//!   above it, so even a crash after the queue drained cannot hand out an id again (a crash skips
//!   at most one block; a clean stop gives the unused part back). No AUTOINCREMENT: its
//!   `sqlite_sequence` page was written by every commit. The message id sent upstream is
//!   `{gateway}-{epoch}-{seq}`, where `epoch` is random per store file, so a recreated store
//!   cannot collide with ids a consumer has already seen. A resend carries the same id, and so
//!   does a dead letter replayed by `edgeferry queue` (it gets its original seq back; no live row
//!   can hold it).
//! - **Order.** Rows are returned in `seq` order, i.e. commit order; replayed dead letters below
//!   the reader's position come first.
//! - **Counters.** `stats` holds, per route, depth, bytes, drops and dead letters by reason,
//!   changed by deltas in the transaction that changes the rows, by this thread or by
//!   `edgeferry queue`; this thread reloads them when `PRAGMA data_version` says another
//!   connection committed. Nothing at open reads in proportion to the backlog.
//! - **Bounds.** Accounted bytes (topic + payload + [`ROW_OVERHEAD`]) stay within
//!   `max_bytes`, lowered so that `min_free` stays free on the filesystem, after every commit;
//!   `reject-new` inserts that do not fit are never committed (held uncommitted, without
//!   completion, so their devices get no PUBACK).
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

pub mod admin;
mod ledger;
mod schema;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{OnExpiry, Overflow, SyncMode};
use crate::dedup::{SuppressedLog, WindowClock};
use crate::telemetry::Metrics;
use ledger::{Delta, Ledger};

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
    /// `edgeferry queue --route` names a route the store has never seen.
    #[error("store.path {path}: no route named {route:?} in this store (`edgeferry queue stats` lists them)")]
    NoSuchRoute { path: PathBuf, route: String },
    /// `edgeferry queue` was pointed at a file that does not exist.
    #[error("store.path {path}: no such file (has the daemon run with this configuration?)")]
    Missing { path: PathBuf },
    /// `edgeferry queue` was pointed at a store the daemon has not upgraded yet.
    #[error("store.path {path}: schema version {found} is older than this edgeferry's ({known}); start the daemon of this version once to upgrade it")]
    TooOld {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

/// Settings of an open store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub sync: SyncMode,
    pub commit_interval: Duration,
    pub commit_batch: usize,
    pub dedup_window: Duration,
    pub dedup_max_keys: u64,
    /// Most bytes the queued messages may take (topic + payload + [`ROW_OVERHEAD`] each).
    pub max_bytes: u64,
    /// Free space to leave on the store's filesystem: the larger of a share of its size and a
    /// number of bytes.
    pub min_free_percent: f64,
    pub min_free_bytes: u64,
    /// Bounds, overflow and expiry per route name; a route not listed has the defaults.
    pub routes: HashMap<String, RoutePolicy>,
    /// How long dead letters are kept.
    pub dead_retain: Duration,
}

/// What the store does with one route's messages when bounds are reached or they grow old.
#[derive(Debug, Clone, Default)]
pub struct RoutePolicy {
    pub max_bytes: Option<u64>,
    pub max_messages: Option<u64>,
    pub overflow: Overflow,
    pub ttl: Option<Duration>,
    pub on_expiry: OnExpiry,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sync: SyncMode::Full,
            commit_interval: Duration::from_millis(5),
            commit_batch: 1024,
            dedup_window: Duration::from_secs(3600),
            dedup_max_keys: 100_000,
            max_bytes: 512 << 20,
            min_free_percent: 5.0,
            min_free_bytes: 100 << 20,
            routes: HashMap::new(),
            dead_retain: Duration::from_secs(30 * 86_400),
        }
    }
}

/// A message to commit.
#[derive(Debug)]
pub struct NewMessage {
    /// The route (or serial port) that produced it: its bounds, TTL and counters apply.
    pub route: Arc<str>,
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
    /// Bytes queued (topic + payload).
    pub bytes: u64,
    /// Inserts of `reject-new` routes waiting for space (their devices have no PUBACK yet).
    pub held: usize,
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

pub fn now_ms() -> i64 {
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
        let mut conn = schema::open(path, options.sync)?;
        let epoch: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .map_err(|e| schema::classify(path, e))?;
        // Nothing here reads in proportion to the backlog: counters come from `stats`, the
        // highest seq from the end of the rowid b-tree, so READY does not wait for a scan.
        let mut ledger = Ledger::load(&conn).map_err(|e| schema::classify(path, e))?;
        // Configured routes are listed (by `edgeferry queue stats`, --route) before their first
        // message.
        let mut names: Vec<&String> = options.routes.keys().collect();
        names.sort();
        let mut d = Delta::default();
        for name in names {
            d.route(&ledger, &Arc::from(name.as_str()));
        }
        if d.has_new_routes() {
            let tx = conn.transaction().map_err(|e| schema::classify(path, e))?;
            d.write(&tx).map_err(|e| schema::classify(path, e))?;
            tx.commit().map_err(|e| schema::classify(path, e))?;
            ledger.apply(&d);
        }
        let depth = ledger.total(ledger::DEPTH).max(0) as u64;
        let dead = dead_total(&ledger);
        let (last_seq, reserved): (i64, i64) = conn
            .query_row(
                "SELECT coalesce((SELECT max(seq) FROM messages), 0),
                        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'seq_reserved'), 0)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| schema::classify(path, e))?;
        // An upper estimate (see `maintenance`), read from the ends of the index.
        let dedup_keys: i64 = conn
            .query_row(
                "SELECT coalesce(max(ord) - min(ord) + 1, 0) FROM dedup",
                [],
                |r| r.get(0),
            )
            .map_err(|e| schema::classify(path, e))?;
        let data_version: i64 = conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| schema::classify(path, e))?;
        let clock = WindowClock::start(now_ms());
        restamp_future_keys(&conn, clock.now_ms(), &metrics)
            .map_err(|e| schema::classify(path, e))?;
        metrics.queue_depth.set(depth);
        metrics.dead_letters.set(dead);
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
            dead_letters: dead,
            dedup_keys: dedup_keys as u64,
            // Above everything that may have been handed out, even by a run that crashed.
            next_seq: last_seq.max(reserved) + 1,
            seq_reserved: reserved,
            ledger,
            held: VecDeque::new(),
            attempts: HashMap::new(),
            data_version,
            replayed: BTreeSet::new(),
            free: None,
            below_min_free: false,
            episodes: HashMap::new(),
            last_tick: Instant::now(),
            last_metrics: None,
            rejected: HashMap::new(),
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
    /// The next seq to hand out, and the highest one `meta.seq_reserved` covers (see
    /// [`SEQ_BLOCK`]).
    next_seq: i64,
    seq_reserved: i64,
    /// Committed counters per route.
    ledger: Ledger,
    /// Inserts of `reject-new` routes that did not fit: not committed, so their devices have no
    /// PUBACK and are held back. Admitted, in order, as space frees. At most [`HELD_MAX`].
    held: VecDeque<NewMessage>,
    /// First and last time each row was handed to the forwarder (for its dead letter).
    attempts: HashMap<i64, (i64, i64)>,
    /// `PRAGMA data_version`: changes when another connection (`edgeferry queue`) commits.
    data_version: i64,
    /// Seqs `edgeferry queue dead-letters replay` put back, not yet handed to the forwarder.
    replayed: BTreeSet<i64>,
    /// The limit `min_free` sets (accounted bytes), and when the filesystem was read for it.
    free: Option<(i64, Instant)>,
    /// The filesystem was below `min_free` at the last reading (logged once per episode).
    below_min_free: bool,
    /// Drop episodes per (route, reason): count so far and when the last one happened.
    episodes: HashMap<(i64, &'static str), (u64, Instant)>,
    last_tick: Instant,
    last_metrics: Option<Instant>,
    /// `reject-new` messages dropped because [`HELD_MAX`] were already held, per route; counted
    /// in `stats` by the next commit.
    rejected: HashMap<Arc<str>, u64>,
}

/// What [`Worker::fs_headroom`] found: room for the queue to grow (accounted bytes), and the
/// filesystem's free bytes and the `min_free` in force, for the log.
struct Headroom {
    room: i64,
    avail: i64,
    min_free: i64,
}

/// Seqs are reserved in `meta` this many at a time: the reservation is written only by the
/// commit that crosses it (about once per 65536 messages), never by every commit.
const SEQ_BLOCK: i64 = 65_536;

/// Accounted per row on top of topic and payload: the row header, its key, the route index entry
/// and b-tree slack, so `max_bytes` tracks the file's size rather than just the payloads.
pub const ROW_OVERHEAD: i64 = 64;

/// Most `reject-new` inserts held back at once. Each has a device waiting for its PUBACK, and a
/// device stops sending after `local.max_inflight` of them, so this is reached only by a large
/// fleet; beyond it, further rejected messages are dropped and counted (`rejected`).
const HELD_MAX: usize = 16_384;

/// How often the store thread looks for expired messages, space, and changes made by
/// `edgeferry queue`: every TICK while inserts are held back (reject-new) or acknowledgements
/// wait, otherwise every IDLE_TICK, so an idle gateway wakes the store at most once a second.
const TICK: Duration = Duration::from_millis(250);
const IDLE_TICK: Duration = Duration::from_secs(1);

/// What the queue may always hold (accounted bytes), however little the filesystem has beyond
/// `min_free`: enough for the forwarder's window and read-ahead, so a connected gateway keeps
/// forwarding on a tight disk instead of dropping every message it commits. `store.max_bytes`
/// still applies below it; a disk that is really full fails commits, which holds devices back.
const SPACE_FLOOR: i64 = 4 << 20;

/// A drop episode ends after this long without a drop of its kind; its summary is logged then.
const EPISODE_QUIET: Duration = Duration::from_secs(60);

/// Rows removed per transaction by expiry and retention: bounds how long a commit waits.
const SWEEP_CHUNK: usize = 2000;

fn dead_total(ledger: &Ledger) -> u64 {
    ledger
        .iter()
        .filter(|(_, n, _)| n.starts_with("dead."))
        .map(|(_, _, v)| v.max(0) as u64)
        .sum()
}

/// What one transaction did.
#[derive(Default)]
struct Committed {
    /// The next seq after this transaction's inserts.
    next_seq: i64,
    /// A new `meta.seq_reserved`, when the transaction advanced it.
    reserved: Option<i64>,
    /// Counter changes, folded into the ledger once committed.
    delta: Delta,
    /// Messages dropped by bounds: (route, reason, count).
    dropped: Vec<(i64, &'static str, u64)>,
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
                .unwrap_or(IDLE_TICK)
                .min(self.tick_every());
            let first = self.next(wait);
            self.acks
                .sleeping
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let first = match first {
                Ok(cmd) => cmd,
                Err(flume::RecvTimeoutError::Timeout) => {
                    if acks_due.take().is_some() {
                        self.commit();
                    }
                    if self.last_tick.elapsed() >= self.tick_every() {
                        self.tick();
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
            if self.last_tick.elapsed() >= TICK {
                self.tick();
            }
        }
        self.commit();
        self.release_reservation();
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
                let bytes = self.ledger.total(ledger::BYTES).max(0) as u64;
                let held = self.held.len();
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
                    bytes,
                    held,
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

    fn fetch(&mut self, after: i64, limit: usize) -> Result<Vec<Row>, String> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut bytes = 0;
        // Dead letters replayed below the reader's position first: the reader would never come
        // back for them (it only moves forward within a session).
        let below: Vec<i64> = self.replayed.range(..=after).copied().collect();
        for seq in below {
            if out.len() == limit || bytes >= FETCH_MAX_BYTES {
                break;
            }
            self.replayed.remove(&seq);
            if self.pending_acks.contains(&seq) {
                continue;
            }
            let row = self
                .conn
                .prepare_cached(
                    "SELECT seq, topic, payload, enqueued_ms FROM messages WHERE seq = ?1",
                )
                .and_then(|mut st| st.query_row([seq], read_row).optional())
                .map_err(|e| e.to_string())?;
            if let Some(row) = row {
                bytes += row.payload.len() + row.topic.len();
                out.push(row);
            }
        }
        if out.len() < limit && bytes < FETCH_MAX_BYTES {
            // No LIMIT: rows are stepped lazily and the loop stops when it has enough, however
            // many rows with buffered acks it skips on the way.
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT seq, topic, payload, enqueued_ms FROM messages WHERE seq > ?1 ORDER BY seq",
                )
                .map_err(|e| e.to_string())?;
            let rows = st
                .query_map(params![after], read_row)
                .map_err(|e| e.to_string())?;
            let mut last = after;
            for row in rows {
                let row = row.map_err(|e| e.to_string())?;
                last = row.seq;
                if self.pending_acks.contains(&row.seq) {
                    continue;
                }
                bytes += row.payload.len() + row.topic.len();
                out.push(row);
                if out.len() == limit || bytes >= FETCH_MAX_BYTES {
                    break;
                }
            }
            // Replayed rows the forward scan has now passed were returned by it.
            if !self.replayed.is_empty() {
                self.replayed = self.replayed.split_off(&(last + 1));
            }
        }
        let now = now_ms();
        if self.attempts.len() > ATTEMPTS_MAX {
            // Rows fetched but then removed behind the forwarder's back; forget the oldest
            // knowledge rather than grow (it only feeds the dead letters' attempt times).
            self.attempts.clear();
        }
        for row in &out {
            self.attempts
                .entry(row.seq)
                .and_modify(|a| a.1 = now)
                .or_insert((now, now));
        }
        Ok(out)
    }

    /// Execute the buffered writes in one transaction. On failure (disk full, I/O error) the
    /// buffer is kept and retried with backoff: ingest stalls rather than dropping anything.
    fn commit(&mut self) {
        self.take_acks();
        self.admit();
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
    /// Bounds are enforced in the same transaction (see [`evict_overflow`]), so the counters,
    /// the rows and the drops are committed together.
    fn try_commit(&mut self) -> rusqlite::Result<Committed> {
        let now = now_ms();
        // Dedup stamps come from the window's clock, not the wall clock (see `WindowClock`).
        let seen = self.clock.now_ms();
        let limit = self.space_limit();
        let tx = self.conn.transaction()?;
        let mut done = Committed::default();
        let mut d = Delta::default();
        let mut next = self.next_seq;
        for (route, n) in &self.rejected {
            let id = d.route(&self.ledger, route);
            d.add(id, &ledger::drop_stat(DROP_REJECTED), *n as i64);
        }
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (seq, route, enqueued_ms, expires_ms, size, topic, payload)
                 VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6)",
            )?;
            let mut remember =
                tx.prepare_cached("INSERT OR REPLACE INTO dedup (key, seen_ms) VALUES (?1, ?2)")?;
            let mut delete =
                tx.prepare_cached("DELETE FROM messages WHERE seq = ?1 RETURNING route, size")?;
            let mut bury = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead_letters (seq, route, enqueued_ms, first_attempt_ms,
                     last_attempt_ms, failed_ms, size, reason, detail, topic, payload)
                 SELECT seq, route, enqueued_ms, ?2, ?3, ?4, size, ?5, ?6, topic, payload
                 FROM messages WHERE seq = ?1",
            )?;
            for w in &self.pending {
                match w {
                    Write::Insert(m) => {
                        let route = d.route(&self.ledger, &m.route);
                        let size = (m.topic.len() + m.payload.len()) as i64;
                        insert.execute(params![next, route, now, size, m.topic, &m.payload[..]])?;
                        done.seqs.push(next);
                        done.stamp = now;
                        next += 1;
                        d.add(route, ledger::DEPTH, 1);
                        d.add(route, ledger::BYTES, size);
                        if let Some(k) = &m.dedup_key {
                            remember.execute(params![k, seen])?;
                        }
                    }
                    Write::Ack(seq) => {
                        // None when the row is already gone (acked twice after a resend, or
                        // dropped by a bound while in flight).
                        if let Some((route, size)) = delete
                            .query_row([seq], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                            .optional()?
                        {
                            done.removed += 1;
                            d.add(route, ledger::DEPTH, -1);
                            d.add(route, ledger::BYTES, -size);
                        }
                    }
                    Write::DeadLetter(seq, reason) => {
                        let (kind, detail) = split_reason(reason);
                        let (first, last) = match self.attempts.get(seq) {
                            Some((f, l)) => (Some(*f), Some(*l)),
                            None => (None, None),
                        };
                        let n = bury.execute(params![seq, first, last, now, kind, detail])?;
                        if let Some((route, size)) = delete
                            .query_row([seq], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                            .optional()?
                        {
                            done.removed += 1;
                            d.add(route, ledger::DEPTH, -1);
                            d.add(route, ledger::BYTES, -size);
                            if n > 0 {
                                done.buried += 1;
                                d.add(route, &ledger::dead_stat(kind), 1);
                            }
                        }
                    }
                }
            }
        }
        if next - 1 > self.seq_reserved {
            let reserved = next - 1 + SEQ_BLOCK;
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_reserved', ?1)",
                [reserved.to_string()],
            )?;
            done.reserved = Some(reserved);
        }
        done.dropped = evict_overflow(&tx, &self.ledger, &mut d, &self.options, limit)?;
        d.write(&tx)?;
        tx.commit()?;
        done.next_seq = next;
        done.delta = d;
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
                Write::Ack(seq) | Write::DeadLetter(seq, _) => {
                    self.attempts.remove(&seq);
                }
            }
        }
        self.rejected.clear();
        self.pending_keys.clear();
        self.pending_acks.clear();
        self.next_seq = done.next_seq;
        if let Some(r) = done.reserved {
            self.seq_reserved = r;
        }
        self.ledger.apply(&done.delta);
        self.depth = self.ledger.total(ledger::DEPTH).max(0) as u64;
        self.dead_letters = dead_total(&self.ledger);
        self.metrics
            .acked
            .add(done.removed - done.buried.min(done.removed));
        self.metrics.committed.add(inserted);
        self.metrics.queue_depth.set(self.depth);
        self.metrics.dead_letters.set(self.dead_letters);
        self.metrics.store_commits.inc();
        for (route, reason, n) in done.dropped {
            self.count_drops(route, reason, n);
        }
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

    /// Bound `reject-new` routes at the door: an insert that does not fit (its route's bounds, or
    /// the store's once every droppable message is counted) is moved from the buffer to `held`,
    /// uncommitted, so its device gets no PUBACK. Held inserts are admitted first, in order, as
    /// soon as acks, expiry or a purge make room; a route's newer inserts wait behind its held
    /// ones so its order is kept.
    fn admit(&mut self) {
        let rejecting = |o: &StoreOptions, route: &str| {
            o.routes
                .get(route)
                .is_some_and(|p| p.overflow == Overflow::RejectNew)
        };
        if self.held.is_empty()
            && !self
                .pending
                .iter()
                .any(|w| matches!(w, Write::Insert(m) if rejecting(&self.options, &m.route)))
        {
            return;
        }
        let limit = self.space_limit();
        let mut total = accounted(
            self.ledger.total(ledger::BYTES),
            self.ledger.total(ledger::DEPTH),
        );
        let mut droppable = 0i64;
        let mut per_route: HashMap<Arc<str>, (i64, i64)> = HashMap::new();
        for (id, name) in self.ledger.routes() {
            let (depth, bytes) = (
                self.ledger.get(id, ledger::DEPTH),
                self.ledger.get(id, ledger::BYTES),
            );
            per_route.insert(name.clone(), (depth, bytes));
            if !rejecting(&self.options, name) {
                droppable += accounted(bytes, depth);
            }
        }
        let mut admitted = Vec::new();
        let mut still_held: VecDeque<NewMessage> = VecDeque::new();
        let mut waiting: HashSet<Arc<str>> = HashSet::new();
        let held = std::mem::take(&mut self.held);
        let pending = std::mem::take(&mut self.pending);
        let mut fits = |m: &NewMessage, waiting: &HashSet<Arc<str>>| -> bool {
            let size = (m.topic.len() + m.payload.len()) as i64;
            let e = per_route.entry(m.route.clone()).or_insert((0, 0));
            if !rejecting(&self.options, &m.route) {
                *e = (e.0 + 1, e.1 + size);
                total += accounted(size, 1);
                droppable += accounted(size, 1);
                return true;
            }
            if waiting.contains(&m.route) {
                return false;
            }
            let p = &self.options.routes[&*m.route];
            let (depth, bytes) = (e.0 + 1, e.1 + size);
            let ok = p.max_messages.is_none_or(|max| depth <= max as i64)
                && p.max_bytes
                    .is_none_or(|max| accounted(bytes, depth) <= max as i64)
                && total + accounted(size, 1) <= limit + droppable;
            if ok {
                *e = (depth, bytes);
                total += accounted(size, 1);
            }
            ok
        };
        for m in held {
            if fits(&m, &waiting) {
                admitted.push(Write::Insert(m));
            } else {
                waiting.insert(m.route.clone());
                still_held.push_back(m);
            }
        }
        let mut newly_held = 0u64;
        for w in pending {
            match w {
                Write::Insert(m) if !fits(&m, &waiting) => {
                    waiting.insert(m.route.clone());
                    if still_held.len() >= HELD_MAX {
                        *self.rejected.entry(m.route.clone()).or_default() += 1;
                        self.metrics.count_queue_drop(DROP_REJECTED, 1);
                        continue;
                    }
                    newly_held += 1;
                    still_held.push_back(m);
                }
                other => admitted.push(other),
            }
        }
        if newly_held > 0 && self.held.is_empty() && still_held.len() as u64 == newly_held {
            warn!(held = newly_held, "store: a reject-new route is full; its devices get no PUBACK and are held back until the upstream takes messages (or a purge makes room)");
        }
        if still_held.is_empty() && !self.held.is_empty() {
            info!("store: room again for reject-new routes; held messages committed");
        }
        self.metrics.queue_held.set(still_held.len() as u64);
        self.held = still_held;
        self.pending = admitted;
    }

    /// The most the store may hold now, in accounted bytes: `store.max_bytes`, lowered when
    /// growing further would leave less than `min_free` on the filesystem. Pages on SQLite's
    /// freelist are room too: reusing them does not grow the file. Read at most once a second.
    fn space_limit(&mut self) -> i64 {
        let max = i64::try_from(self.options.max_bytes).unwrap_or(i64::MAX);
        let fresh = self
            .free
            .is_some_and(|(_, at)| at.elapsed() < Duration::from_secs(1));
        if !fresh {
            // Anchored to the usage it was measured at: growth since is counted against it.
            let used = accounted(
                self.ledger.total(ledger::BYTES),
                self.ledger.total(ledger::DEPTH),
            );
            let headroom = self.fs_headroom();
            let below = headroom.as_ref().filter(|h| h.avail <= h.min_free);
            if let (Some(h), false) = (below, self.below_min_free) {
                warn!(
                    free_bytes = h.avail,
                    min_free_bytes = h.min_free,
                    queued_bytes = used,
                    "store: the filesystem is below store.min_free; the queue does not grow \
                     beyond what it holds (at least {} MiB), and its overflow policy applies",
                    SPACE_FLOOR >> 20
                );
            } else if below.is_none() && self.below_min_free {
                info!("store: the filesystem is above store.min_free again");
            }
            self.below_min_free = below.is_some();
            let limit = headroom.map_or(i64::MAX, |h| used.saturating_add(h.room));
            self.free = Some((limit.max(SPACE_FLOOR), Instant::now()));
        }
        max.min(self.free.map_or(i64::MAX, |(l, _)| l))
    }

    /// Free bytes on the store's filesystem beyond `min_free`, plus the file's free pages.
    fn fs_headroom(&self) -> Option<Headroom> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let st = rustix::fs::statvfs(&dir).ok()?;
        let frsize = st.f_frsize.max(1) as i64;
        let avail = (st.f_bavail as i64).saturating_mul(frsize);
        let size = (st.f_blocks as i64).saturating_mul(frsize);
        let min_free = ((size as f64) * self.options.min_free_percent / 100.0) as i64;
        // At most half the filesystem: on a small one, the 100MiB default would leave the queue
        // no room at all.
        let min_free = min_free
            .max(self.options.min_free_bytes as i64)
            .min(size / 2);
        if min_free <= 0 {
            // Turned off: a full disk fails commits, which holds devices back (no drops).
            return None;
        }
        let pragma = |name: &str| -> i64 {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .unwrap_or(0)
        };
        let page = pragma("page_size");
        let free_pages = pragma("freelist_count") * page;
        // The WAL grows to about 1000 pages (the auto-checkpoint) before it is reused from its
        // start; what it has yet to grow is not free for rows.
        let wal = std::fs::metadata(wal_path(&self.path)).map_or(0, |m| m.len() as i64);
        let avail = avail - (1000 * page - wal).max(0);
        // Below min_free (something else filled the disk) the queue stops growing but keeps what
        // it has: dropping rows would not give the filesystem anything back.
        Some(Headroom {
            room: (avail - min_free).max(0) + free_pages,
            avail,
            min_free,
        })
    }

    /// Count dropped messages and log once per episode (see [`EPISODE_QUIET`]).
    fn count_drops(&mut self, route: i64, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.metrics.count_queue_drop(reason, n);
        let now = Instant::now();
        let name = self
            .ledger
            .route_name(route)
            .map(|n| n.to_string())
            .unwrap_or_default();
        match self.episodes.get_mut(&(route, reason)) {
            Some((count, last)) => {
                *count += n;
                *last = now;
            }
            None => {
                warn!(route = %name, reason, dropped = n,
                    "store: dropping messages ({reason}); counted in edgeferry_queue_dropped_total, see `edgeferry queue stats` (logged again when the episode ends)");
                self.episodes.insert((route, reason), (n, now));
            }
        }
    }

    /// Log the end of drop episodes that have been quiet for [`EPISODE_QUIET`].
    fn end_episodes(&mut self) {
        let over: Vec<_> = self
            .episodes
            .iter()
            .filter(|(_, (_, last))| last.elapsed() >= EPISODE_QUIET)
            .map(|(k, (n, _))| (*k, *n))
            .collect();
        for ((route, reason), n) in over {
            self.episodes.remove(&(route, reason));
            let name = self
                .ledger
                .route_name(route)
                .map(|n| n.to_string())
                .unwrap_or_default();
            warn!(route = %name, reason, dropped = n, "store: drop episode over");
        }
    }

    fn tick_every(&self) -> Duration {
        if self.held.is_empty() {
            IDLE_TICK
        } else {
            TICK
        }
    }

    /// Periodic work between command groups: admit held inserts, expire, notice `edgeferry
    /// queue`'s changes, refresh per-route metrics; maintenance every [`MAINTENANCE_EVERY`].
    fn tick(&mut self) {
        self.last_tick = Instant::now();
        self.check_external();
        if !self.held.is_empty() {
            self.commit();
        }
        if let Err(e) = self.expire() {
            warn!(error = %e, "store: expiring messages failed; will retry");
        }
        self.end_episodes();
        if self
            .last_metrics
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.publish_metrics();
        }
        if self.last_maintenance.elapsed() >= MAINTENANCE_EVERY {
            self.maintenance();
        }
    }

    /// Another connection (`edgeferry queue`) committed: reload the counters, and pick up
    /// replayed dead letters and wake the forwarder for them.
    fn check_external(&mut self) {
        let Ok(v) = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
        else {
            return;
        };
        if v == self.data_version {
            return;
        }
        self.data_version = v;
        match Ledger::load(&self.conn) {
            Ok(l) => {
                self.ledger = l;
                self.depth = self.ledger.total(ledger::DEPTH).max(0) as u64;
                self.dead_letters = dead_total(&self.ledger);
                self.metrics.queue_depth.set(self.depth);
                self.metrics.dead_letters.set(self.dead_letters);
            }
            Err(e) => warn!(error = %e, "store: cannot reload counters"),
        }
        let replayed: rusqlite::Result<Vec<i64>> = (|| {
            let tx = self.conn.transaction()?;
            let seqs = tx
                .prepare("SELECT seq FROM replayed")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            if !seqs.is_empty() {
                tx.execute("DELETE FROM replayed", [])?;
            }
            tx.commit()?;
            Ok(seqs)
        })();
        match replayed {
            Ok(seqs) if !seqs.is_empty() => {
                info!(
                    messages = seqs.len(),
                    "store: dead letters replayed into the queue; forwarding them"
                );
                self.replayed.extend(seqs);
                // Wake a forwarder that is waiting for commits: it reads again (and a fetch
                // returns replayed rows whatever the cursor).
                self.tail = None;
                let last = *self.committed.borrow();
                self.committed.send_replace(last);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "store: cannot read replayed dead letters; will retry"),
        }
        // Our own transaction changed nothing another connection needs; take its version.
        if let Ok(v) = self.conn.query_row("PRAGMA data_version", [], |r| r.get(0)) {
            self.data_version = v;
        }
    }

    /// Move or drop messages older than their route's `ttl`, oldest first, a chunk per
    /// transaction; and forget dead letters older than `dead_letters.retain`.
    fn expire(&mut self) -> rusqlite::Result<()> {
        let now = now_ms();
        let routes: Vec<(i64, RoutePolicy)> = self
            .ledger
            .routes()
            .filter_map(|(id, name)| {
                let p = self.options.routes.get(&**name)?;
                p.ttl.map(|_| (id, p.clone()))
            })
            .collect();
        for (id, p) in routes {
            let Some(ttl) = p.ttl else { continue };
            let horizon = now - ttl.as_millis() as i64;
            let tx = self.conn.transaction()?;
            let rows: Vec<(i64, i64, i64)> = tx
                .prepare_cached(
                    "SELECT seq, size, enqueued_ms FROM messages WHERE route = ?1 ORDER BY seq LIMIT ?2",
                )?
                .query_map(params![id, SWEEP_CHUNK as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut d = Delta::default();
            let mut n = 0u64;
            for (seq, size, enq) in rows {
                if enq >= horizon {
                    break;
                }
                if self.pending_acks.contains(&seq) {
                    continue;
                }
                if p.on_expiry == OnExpiry::DeadLetter {
                    let (first, last) = match self.attempts.get(&seq) {
                        Some((f, l)) => (Some(*f), Some(*l)),
                        None => (None, None),
                    };
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO dead_letters (seq, route, enqueued_ms, first_attempt_ms,
                             last_attempt_ms, failed_ms, size, reason, detail, topic, payload)
                         SELECT seq, route, enqueued_ms, ?2, ?3, ?4, size, 'expired', ?5, topic, payload
                         FROM messages WHERE seq = ?1",
                    )?
                    .execute(params![seq, first, last, now, format!("older than the route's ttl ({ttl:?})")])?;
                    d.add(id, &ledger::dead_stat(DROP_EXPIRED), 1);
                }
                tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
                    .execute([seq])?;
                d.dropped(id, DROP_EXPIRED, size, enq);
                n += 1;
                self.attempts.remove(&seq);
            }
            if n == 0 {
                continue;
            }
            d.write(&tx)?;
            tx.commit()?;
            self.ledger.apply(&d);
            if p.on_expiry == OnExpiry::DeadLetter {
                self.metrics.dead_lettered_expired.add(n);
            }
            self.count_drops(id, DROP_EXPIRED, n);
        }
        // Dead letters past their retention.
        let horizon = now - self.options.dead_retain.as_millis() as i64;
        let tx = self.conn.transaction()?;
        let gone: Vec<(i64, String)> = tx
            .prepare_cached(
                "DELETE FROM dead_letters WHERE seq IN
                     (SELECT seq FROM dead_letters WHERE failed_ms < ?1 LIMIT ?2)
                 RETURNING route, reason",
            )?
            .query_map(params![horizon, SWEEP_CHUNK as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        if gone.is_empty() {
            return Ok(());
        }
        let mut d = Delta::default();
        for (route, reason) in &gone {
            d.add(*route, &ledger::dead_stat(reason), -1);
            d.add(*route, &ledger::drop_stat(DROP_DEAD_RETAINED), 1);
        }
        d.write(&tx)?;
        tx.commit()?;
        self.ledger.apply(&d);
        self.depth = self.ledger.total(ledger::DEPTH).max(0) as u64;
        self.dead_letters = dead_total(&self.ledger);
        self.metrics.queue_depth.set(self.depth);
        self.metrics.dead_letters.set(self.dead_letters);
        self.metrics
            .count_queue_drop(DROP_DEAD_RETAINED, gone.len() as u64);
        info!(
            removed = gone.len(),
            retain = ?self.options.dead_retain,
            "store: dead letters older than dead_letters.retain removed"
        );
        Ok(())
    }

    /// Per-route gauges for the metrics endpoint: depth, bytes, oldest age (one indexed read
    /// per route), dead letters by reason.
    fn publish_metrics(&mut self) {
        self.last_metrics = Some(Instant::now());
        let now = now_ms();
        let mut routes = Vec::new();
        for (id, name) in self.ledger.routes() {
            let depth = self.ledger.get(id, ledger::DEPTH).max(0) as u64;
            let oldest: Option<i64> = if depth == 0 {
                None
            } else {
                self.conn
                    .prepare_cached(
                        "SELECT enqueued_ms FROM messages WHERE route = ?1 ORDER BY seq LIMIT 1",
                    )
                    .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
                    .unwrap_or(None)
            };
            routes.push(crate::telemetry::RouteGauges {
                route: name.to_string(),
                depth,
                bytes: self.ledger.get(id, ledger::BYTES).max(0) as u64,
                oldest_age_seconds: oldest.map_or(0.0, |o| (now - o).max(0) as f64 / 1000.0),
            });
        }
        let mut dead: std::collections::BTreeMap<String, u64> = Default::default();
        for (_, name, v) in self.ledger.iter() {
            if let Some(reason) = name.strip_prefix("dead.") {
                *dead.entry(reason.to_string()).or_default() += v.max(0) as u64;
            }
        }
        self.metrics
            .set_queue_routes(routes, dead.into_iter().collect());
        self.metrics
            .queue_bytes
            .set(self.ledger.total(ledger::BYTES).max(0) as u64);
    }

    /// On a clean stop, give back the unused part of the seq reservation, so a restart does
    /// not skip a block.
    fn release_reservation(&mut self) {
        if self.seq_reserved >= self.next_seq {
            let used = self.next_seq - 1;
            if let Err(e) = self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('seq_reserved', ?1)",
                [used.to_string()],
            ) {
                debug!(error = %e, "store: keeping the seq reservation");
            }
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

/// Read a `messages` row (seq, topic, payload, enqueued_ms). Column types are checked here, not
/// trusted: a row this version cannot read is returned with a defect instead of failing the
/// whole fetch.
fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
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
}

/// SQLite's write-ahead log beside the store file.
pub fn wal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Most rows whose fetch times are remembered (see `Worker::attempts`).
const ATTEMPTS_MAX: usize = 100_000;

/// Drop reasons (`drop.<reason>` in `stats`, `reason` label of edgeferry_queue_dropped_total).
pub const DROP_OVERFLOW: &str = "overflow";
pub const DROP_EXPIRED: &str = "expired";
pub const DROP_PURGED: &str = "purged";
pub const DROP_REJECTED: &str = "rejected";
/// Dead letters removed after `dead_letters.retain`.
pub const DROP_DEAD_RETAINED: &str = "dead-letter-expired";
pub const DROP_REASONS: [&str; 5] = [
    DROP_OVERFLOW,
    DROP_EXPIRED,
    DROP_PURGED,
    DROP_REJECTED,
    DROP_DEAD_RETAINED,
];

/// Split a forwarder's reason ("refused: not authorised") into its kind and the detail.
fn split_reason(reason: &str) -> (&str, &str) {
    match reason.split_once(':') {
        Some((kind, detail)) => (kind.trim(), detail.trim()),
        None => (reason.trim(), ""),
    }
}

/// Accounted size of a route's (or all) rows: payload and topic bytes plus [`ROW_OVERHEAD`] each.
fn accounted(bytes: i64, depth: i64) -> i64 {
    bytes + depth * ROW_OVERHEAD
}

/// Drop the oldest messages of `drop-oldest` routes until every route is within its own bounds
/// and the store within `limit` (accounted bytes). Runs inside the commit's transaction: the
/// rows' pages go to SQLite's freelist and are reused by the next inserts, so a store at its
/// bound neither grows the file nor rewrites it; each drop costs what an ack costs.
fn evict_overflow(
    tx: &rusqlite::Transaction<'_>,
    ledger: &Ledger,
    d: &mut Delta,
    options: &StoreOptions,
    limit: i64,
) -> rusqlite::Result<Vec<(i64, &'static str, u64)>> {
    let mut dropped: HashMap<i64, u64> = HashMap::new();
    let policy = |id: i64, d: &Delta| -> Option<RoutePolicy> {
        let name = ledger
            .route_name(id)
            .cloned()
            .or_else(|| d.new_route_name(id))?;
        options.routes.get(&*name).cloned()
    };
    let mut ids: Vec<i64> = ledger.routes().map(|(i, _)| i).collect();
    ids.extend(d.new_route_ids());
    // Per route.
    for &id in &ids {
        let Some(p) = policy(id, d) else { continue };
        if p.overflow != Overflow::DropOldest || (p.max_bytes.is_none() && p.max_messages.is_none())
        {
            continue;
        }
        let max_bytes = p.max_bytes.map_or(i64::MAX, |b| b as i64);
        let max_msgs = p.max_messages.map_or(i64::MAX, |m| m as i64);
        loop {
            let depth = ledger.get(id, ledger::DEPTH) + d.added(id, ledger::DEPTH);
            let bytes = ledger.get(id, ledger::BYTES) + d.added(id, ledger::BYTES);
            if depth <= max_msgs && accounted(bytes, depth) <= max_bytes || depth <= 0 {
                break;
            }
            let victims: Vec<(i64, i64, i64)> = tx
                .prepare_cached(
                    "SELECT seq, size, enqueued_ms FROM messages WHERE route = ?1 ORDER BY seq LIMIT 256",
                )?
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            if victims.is_empty() {
                break;
            }
            let mut freed_enough = false;
            for (seq, size, enq) in victims {
                tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
                    .execute([seq])?;
                d.dropped(id, DROP_OVERFLOW, size, enq);
                *dropped.entry(id).or_default() += 1;
                let depth = ledger.get(id, ledger::DEPTH) + d.added(id, ledger::DEPTH);
                let bytes = ledger.get(id, ledger::BYTES) + d.added(id, ledger::BYTES);
                if depth <= max_msgs && accounted(bytes, depth) <= max_bytes {
                    freed_enough = true;
                    break;
                }
            }
            if freed_enough {
                break;
            }
        }
    }
    // The whole store: the oldest messages of any route that may drop.
    let total = |d: &Delta| {
        accounted(
            ledger.total(ledger::BYTES) + d.added_total(ledger::BYTES),
            ledger.total(ledger::DEPTH) + d.added_total(ledger::DEPTH),
        )
    };
    let mut after = 0i64;
    while total(d) > limit {
        let victims: Vec<(i64, i64, i64, i64)> = tx
            .prepare_cached(
                "SELECT seq, route, size, enqueued_ms FROM messages WHERE seq > ?1 ORDER BY seq LIMIT 256",
            )?
            .query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if victims.is_empty() {
            break;
        }
        for (seq, route, size, enq) in victims {
            after = seq;
            if policy(route, d).is_some_and(|p| p.overflow == Overflow::RejectNew) {
                continue;
            }
            tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
                .execute([seq])?;
            d.dropped(route, DROP_OVERFLOW, size, enq);
            *dropped.entry(route).or_default() += 1;
            if total(d) <= limit {
                break;
            }
        }
    }
    Ok(dropped
        .into_iter()
        .map(|(r, n)| (r, DROP_OVERFLOW, n))
        .collect())
}

/// Free space worth giving back (see `Worker::reclaim`).
const RECLAIM_MIN_BYTES: i64 = 16 << 20;

#[cfg(test)]
mod tests;
