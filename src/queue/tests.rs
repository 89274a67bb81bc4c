//! Store tests: invariants on a real SQLite file, and random operation sequences with crashes and
//! reopens checked against a simple in-memory model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tokio::sync::oneshot;

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The defaults, with `min_free` off: these tests are about the queue, not about how full the
/// filesystem the tests run on happens to be (`tests/queue_ops.rs` checks `min_free` on a
/// filesystem of its own).
fn options() -> StoreOptions {
    StoreOptions {
        min_free_percent: 0.0,
        min_free_bytes: 0,
        ..StoreOptions::default()
    }
}

fn open(path: &Path) -> Store {
    Store::open(path, options(), Arc::new(Metrics::default())).unwrap()
}

fn msg(
    topic: &str,
    payload: &[u8],
    key: Option<&[u8]>,
) -> (NewMessage, oneshot::Receiver<Enqueued>) {
    let (tx, rx) = oneshot::channel();
    (
        NewMessage {
            route: "r".into(),
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            dedup_key: key.map(|k| k.to_vec()),
            received: Instant::now(),
            done: Some(tx),
        },
        rx,
    )
}

async fn put(h: &StoreHandle, payload: &[u8], key: Option<&[u8]>) -> Enqueued {
    let (m, rx) = msg("t", payload, key);
    h.enqueue(m).await.unwrap();
    rx.await.unwrap()
}

#[test]
fn committed_rows_survive_reopen_in_order_and_acked_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    let seqs: Vec<i64> = rt.block_on(async {
        let mut seqs = vec![];
        for i in 0..10u8 {
            match put(&h, &[i], None).await {
                Enqueued::Committed(s) => seqs.push(s),
                other => panic!("{other:?}"),
            }
        }
        h.ack(seqs[0]).await.unwrap();
        h.ack(seqs[3]).await.unwrap();
        h.flush().await.unwrap();
        seqs
    });
    drop(h);
    store.close();

    let store = open(&path);
    let h = store.handle();
    let rows = rt.block_on(h.fetch(0, 100)).unwrap();
    let got: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let want: Vec<i64> = seqs
        .iter()
        .copied()
        .filter(|s| *s != seqs[0] && *s != seqs[3])
        .collect();
    assert_eq!(got, want);
    assert_eq!(rows[0].payload, vec![1u8]);
    drop(h);
    store.close();
}

#[test]
fn sequence_numbers_are_never_reused_after_the_queue_empties() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    let first = rt.block_on(async {
        let Enqueued::Committed(s) = put(&h, b"a", None).await else {
            panic!()
        };
        h.ack(s).await.unwrap();
        h.flush().await.unwrap();
        s
    });
    drop(h);
    store.close();
    let store = open(&path);
    let h = store.handle();
    let Enqueued::Committed(second) = rt.block_on(put(&h, b"b", None)) else {
        panic!()
    };
    assert!(second > first, "seq {second} reused after {first}");
    drop(h);
    store.close();
}

#[test]
fn dedup_keys_suppress_repeats_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    rt.block_on(async {
        assert!(matches!(
            put(&h, b"x", Some(b"k1")).await,
            Enqueued::Committed(_)
        ));
        assert_eq!(put(&h, b"x", Some(b"k1")).await, Enqueued::Duplicate);
        // Same batch: two sends before any commit.
        let (a, ra) = msg("t", b"y", Some(b"k2"));
        let (b, rb) = msg("t", b"y", Some(b"k2"));
        h.enqueue(a).await.unwrap();
        h.enqueue(b).await.unwrap();
        assert!(matches!(ra.await.unwrap(), Enqueued::Committed(_)));
        assert_eq!(rb.await.unwrap(), Enqueued::Duplicate);
    });
    drop(h);
    store.close();
    let store = open(&path);
    let h = store.handle();
    rt.block_on(async {
        assert_eq!(put(&h, b"x", Some(b"k1")).await, Enqueued::Duplicate);
        assert_eq!(h.fetch(0, 10).await.unwrap().len(), 2);
    });
    drop(h);
    store.close();
}

#[test]
fn dedup_window_expires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let options = StoreOptions {
        dedup_window: Duration::from_millis(50),
        ..options()
    };
    let store = Store::open(&path, options, Arc::new(Metrics::default())).unwrap();
    let h = store.handle();
    rt.block_on(async {
        assert!(matches!(
            put(&h, b"x", Some(b"k")).await,
            Enqueued::Committed(_)
        ));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(matches!(
            put(&h, b"x", Some(b"k")).await,
            Enqueued::Committed(_)
        ));
    });
    drop(h);
    store.close();
}

#[test]
fn dead_letters_leave_the_queue_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    rt.block_on(async {
        let Enqueued::Committed(s) = put(&h, b"bad", None).await else {
            panic!()
        };
        h.dead_letter(s, "NotAuthorized".into()).await.unwrap();
        h.flush().await.unwrap();
        assert!(h.fetch(0, 10).await.unwrap().is_empty());
        let st = h.stats().await.unwrap();
        assert_eq!((st.depth, st.dead_letters), (0, 1));
    });
    drop(h);
    store.close();
    let conn = Connection::open(&path).unwrap();
    let reason: String = conn
        .query_row("SELECT reason FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(reason, "NotAuthorized");
}

/// Rows this version cannot read (written by something else: a topic that is not UTF-8 text, a
/// payload stored as a number) come back with a defect instead of failing every fetch, and can
/// be dead-lettered like any other row.
#[test]
fn unreadable_rows_are_returned_with_a_defect_and_can_be_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    open(&path).close();
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO messages (route, size, topic, payload, enqueued_ms) VALUES (0, 1, 'ok', x'01', 1);
             INSERT INTO messages (route, size, topic, payload, enqueued_ms) VALUES (0, 1, CAST(x'ff00' AS BLOB), x'02', 1);
             INSERT INTO messages (route, size, topic, payload, enqueued_ms) VALUES (0, 1, 't', 42, 1);
             INSERT INTO messages (route, size, topic, payload, enqueued_ms) VALUES (0, 1, 'ok', 'text payload', 1);",
        )
        .unwrap();
    }
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    rt.block_on(async {
        let rows = h.fetch(0, 10).await.unwrap();
        let defects: Vec<bool> = rows.iter().map(|r| r.defect.is_some()).collect();
        assert_eq!(defects, [false, true, true, false]);
        assert_eq!(rows[3].payload, b"text payload");
        h.dead_letter(rows[1].seq, "undecodable".into())
            .await
            .unwrap();
        h.flush().await.unwrap();
        assert_eq!(h.fetch(0, 10).await.unwrap().len(), 3);
    });
    drop(h);
    store.close();
    let conn = Connection::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn buffered_ack_hides_the_row_from_a_reread() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let options = StoreOptions {
        commit_interval: Duration::from_secs(1),
        commit_batch: 1_000_000,
        ..options()
    };
    let store = Store::open(
        &dir.path().join("q.db"),
        options,
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let h = store.handle();
    rt.block_on(async {
        let (m, rx) = msg("t", b"a", None);
        h.enqueue(m).await.unwrap();
        h.flush().await.unwrap();
        let Enqueued::Committed(s) = rx.await.unwrap() else {
            panic!()
        };
        h.ack(s).await.unwrap();
        // The ack waits for its group commit; a re-read in the meantime must not return the row.
        assert!(h.fetch(0, 10).await.unwrap().is_empty());
    });
    drop(h);
    store.close();
}

/// Files that are not ours are refused and left byte-for-byte untouched.
#[test]
fn foreign_corrupt_and_future_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, setup: &dyn Fn(&Path), expect: &str| {
        let path = dir.path().join(name);
        setup(&path);
        let before = std::fs::read(&path).unwrap();
        let err = Store::open(&path, options(), Arc::new(Metrics::default()))
            .err()
            .unwrap_or_else(|| panic!("{name}: opened"));
        assert!(err.to_string().contains(expect), "{name}: {err}");
        assert!(
            err.to_string().contains(name),
            "{name}: error must name the file: {err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{name}: file was modified"
        );
    };
    check(
        "text.db",
        &|p| std::fs::write(p, b"hello, I am a text file, not SQLite at all....").unwrap(),
        "not an SQLite database",
    );
    check(
        "foreign.db",
        &|p| {
            let c = Connection::open(p).unwrap();
            c.execute_batch("CREATE TABLE customers (id INTEGER)")
                .unwrap();
        },
        "not an edgeferry store",
    );
    check(
        "future.db",
        &|p| {
            let c = Connection::open(p).unwrap();
            c.execute_batch(&format!(
                "PRAGMA application_id = {}; PRAGMA user_version = 99; CREATE TABLE x (y)",
                schema::APPLICATION_ID
            ))
            .unwrap();
        },
        "newer than this edgeferry",
    );
    check(
        "corrupt.db",
        &|p| {
            {
                let store = open(p);
                let rt = rt();
                let h = store.handle();
                rt.block_on(async {
                    for i in 0..2000u32 {
                        let (m, _rx) = msg("t", &i.to_le_bytes().repeat(64), None);
                        h.enqueue(m).await.unwrap();
                    }
                    h.flush().await.unwrap();
                });
                drop(h);
                store.close();
            }
            // Scribble over the first b-tree pages after the header. Open no longer reads the
            // whole file (start-up must not scan the backlog), so a page in the middle of the
            // payloads is found when it is read, not at open; the schema's own pages are read
            // at open.
            let mut bytes = std::fs::read(p).unwrap();
            let mid = 4096;
            for b in &mut bytes[mid..mid + 8192] {
                *b = 0x5a;
            }
            std::fs::write(p, bytes).unwrap();
        },
        "corrupt",
    );
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let err = Store::open(
        Path::new("/nonexistent-dir/q.db"),
        options(),
        Arc::new(Metrics::default()),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("/nonexistent-dir does not exist"),
        "{err}"
    );
}

// ---- model test -------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Insert(u8),
    /// Ack the n-th oldest row the store currently returns (if any).
    Ack(usize),
    Flush,
    /// Stop the store thread abruptly (buffer discarded, as with kill -9), then reopen.
    Crash,
    /// Clean close and reopen.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(Op::Insert),
        3 => (0usize..4).prop_map(Op::Ack),
        1 => Just(Op::Flush),
        1 => Just(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After any sequence of inserts, acks, flushes, crashes and reopens:
    /// - every insert confirmed committed, and not acked-and-flushed, is in the store;
    /// - nothing acked-and-flushed is;
    /// - nothing is in the store that was never inserted;
    /// - rows come back in seq order, and seqs are never reused.
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let rt = rt();
        // Long commit interval so buffered, uncommitted writes exist when a crash hits.
        let options = StoreOptions { commit_interval: Duration::from_millis(20), commit_batch: 7, ..options() };
        let mut store = Store::open(&path, options.clone(), Arc::new(Metrics::default())).unwrap();
        // seq -> payload for confirmed commits that were not acked durably.
        let mut must: BTreeMap<i64, u8> = BTreeMap::new();
        // seq -> payload: everything ever inserted (committed or not).
        let mut ever: BTreeMap<i64, u8> = BTreeMap::new();
        let mut gone: Vec<i64> = Vec::new();
        let mut unconfirmed: Vec<(u8, oneshot::Receiver<Enqueued>)> = Vec::new();
        let mut acked_unflushed: Vec<i64> = Vec::new();
        let mut max_seq = 0i64;

        let collect = |unconfirmed: &mut Vec<(u8, oneshot::Receiver<Enqueued>)>, must: &mut BTreeMap<i64, u8>, ever: &mut BTreeMap<i64, u8>, max_seq: &mut i64| {
            for (p, mut rx) in unconfirmed.drain(..) {
                if let Ok(Enqueued::Committed(s)) = rx.try_recv() {
                    assert!(s > *max_seq, "seq {s} not above {max_seq}");
                    *max_seq = s;
                    must.insert(s, p);
                    ever.insert(s, p);
                }
            }
        };

        for op in ops {
            let h = store.handle();
            match op {
                Op::Insert(p) => {
                    let (m, rx) = msg("t", &[p], None);
                    rt.block_on(h.enqueue(m)).unwrap();
                    unconfirmed.push((p, rx));
                }
                Op::Ack(n) => {
                    rt.block_on(h.flush()).unwrap();
                    collect(&mut unconfirmed, &mut must, &mut ever, &mut max_seq);
                    for s in acked_unflushed.drain(..) { must.remove(&s); gone.push(s); }
                    let rows = rt.block_on(h.fetch(0, 8)).unwrap();
                    if let Some(r) = rows.get(n) {
                        rt.block_on(h.ack(r.seq)).unwrap();
                        acked_unflushed.push(r.seq);
                    }
                }
                Op::Flush => {
                    rt.block_on(h.flush()).unwrap();
                    collect(&mut unconfirmed, &mut must, &mut ever, &mut max_seq);
                    for s in acked_unflushed.drain(..) { must.remove(&s); gone.push(s); }
                }
                Op::Crash | Op::Reopen => {
                    drop(h);
                    if matches!(op, Op::Crash) { store.crash(); } else {
                        store.close();
                        for s in acked_unflushed.drain(..) { must.remove(&s); gone.push(s); }
                    }
                    // What was confirmed is committed; an unconfirmed insert may or may not be.
                    collect(&mut unconfirmed, &mut must, &mut ever, &mut max_seq);
                    let mut candidates: Vec<u8> = unconfirmed.drain(..).map(|(p, _)| p).collect();
                    store = Store::open(&path, options.clone(), Arc::new(Metrics::default())).unwrap();
                    let h = store.handle();
                    let rows = rt.block_on(h.fetch(0, 100_000)).unwrap();
                    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                    prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]), "not in order: {seqs:?}");
                    // An ack not yet flushed may have been committed by a group commit, or not.
                    for s in acked_unflushed.drain(..) {
                        if !seqs.contains(&s) {
                            must.remove(&s);
                            gone.push(s);
                        }
                    }
                    for (s, p) in &must {
                        let row = rows.iter().find(|r| r.seq == *s);
                        prop_assert!(row.is_some(), "committed seq {s} lost; have {seqs:?}");
                        prop_assert_eq!(&row.unwrap().payload, &vec![*p]);
                    }
                    for s in &gone {
                        prop_assert!(!seqs.contains(s), "acked seq {s} came back");
                    }
                    for r in &rows {
                        if let std::collections::btree_map::Entry::Vacant(slot) = ever.entry(r.seq) {
                            // Committed without confirmation: it must be one of the unconfirmed
                            // inserts, and from now on it is a real row.
                            let at = candidates.iter().position(|p| *p == r.payload[0]);
                            prop_assert!(at.is_some(), "row {} was never inserted", r.seq);
                            candidates.remove(at.unwrap());
                            slot.insert(r.payload[0]);
                            must.insert(r.seq, r.payload[0]);
                        }
                    }
                    for s in seqs { max_seq = max_seq.max(s); }
                }
            }
        }
        drop(unconfirmed);
        store.close();
    }
}

/// After a large backlog is acknowledged, maintenance gives the space back: the file shrinks,
/// and what is still queued is intact (a 25k x 1 KiB backlog acknowledged down to 100 rows).
#[test]
fn a_drained_backlog_gives_its_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    let pages = |p: &Path| -> i64 {
        let c = rusqlite::Connection::open(p).unwrap();
        c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap()
    };
    rt.block_on(async {
        let payload = vec![7u8; 1024];
        for _ in 0..25_000 {
            let (m, _) = msg("t", &payload, None);
            h.enqueue(m).await.unwrap();
        }
        h.flush().await.unwrap();
        let mut rows = Vec::new();
        loop {
            let after = rows.last().map_or(0, |r: &Row| r.seq);
            let batch = h.fetch(after, 100_000).await.unwrap();
            if batch.is_empty() {
                break;
            }
            rows.extend(batch);
        }
        assert_eq!(rows.len(), 25_000);
        // Keep the newest 100 queued.
        for r in &rows[..rows.len() - 100] {
            h.ack(r.seq).await.unwrap();
        }
        h.flush().await.unwrap();
    });
    let full = pages(&path);
    assert!(full > 6_000, "the backlog took {full} pages");
    let (tx, rx) = oneshot::channel();
    h.tx.send(Cmd::Maintain(tx)).unwrap();
    rt.block_on(rx).unwrap();
    let after = pages(&path);
    assert!(after * 4 < full, "{full} pages before, {after} after");
    let left = rt.block_on(h.fetch(0, 100)).unwrap();
    assert_eq!(left.len(), 100);
    assert!(left.iter().all(|r| r.payload == vec![7u8; 1024]));
    drop(h);
    store.close();
}

// ---- dedup across clock steps -----------------------------------------------------------

fn open_with(path: &Path, window: Duration, max_keys: u64, metrics: Arc<Metrics>) -> Store {
    let options = StoreOptions {
        dedup_window: window,
        dedup_max_keys: max_keys,
        ..options()
    };
    Store::open(path, options, metrics).unwrap()
}

/// Move every persisted dedup stamp by `shift_ms`, as if the clock had been that far ahead
/// (positive) or behind (negative) when the keys were stored. The store must be closed.
fn shift_dedup_stamps(path: &Path, shift_ms: i64) {
    let c = Connection::open(path).unwrap();
    c.execute("UPDATE dedup SET seen_ms = seen_ms + ?1", [shift_ms])
        .unwrap();
}

fn maintain(h: &StoreHandle, rt: &tokio::runtime::Runtime) {
    let (tx, rx) = oneshot::channel();
    h.tx.send(Cmd::Maintain(tx)).unwrap();
    rt.block_on(rx).unwrap();
}

const DAY_MS: i64 = 86_400_000;

/// Keys stored while the clock was a day ahead (a gateway without an RTC that booted with a
/// future time, then NTP stepped it back) are suppressed for at most one window after the next
/// start, not for a day.
#[test]
fn keys_stamped_in_the_future_expire_within_one_window_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let window = Duration::from_millis(300);
    let store = open_with(&path, window, 1000, Arc::new(Metrics::default()));
    let h = store.handle();
    rt.block_on(async {
        assert!(matches!(
            put(&h, b"x", Some(b"k")).await,
            Enqueued::Committed(_)
        ));
    });
    drop(h);
    store.close();
    shift_dedup_stamps(&path, DAY_MS);

    let metrics = Arc::new(Metrics::default());
    let store = open_with(&path, window, 1000, metrics.clone());
    let h = store.handle();
    assert_eq!(metrics.ingest_dedup_restamped.get(), 1);
    rt.block_on(async {
        // Still inside the window that restarted at open: a device retry is suppressed...
        assert_eq!(put(&h, b"x", Some(b"k")).await, Enqueued::Duplicate);
        // ...but once one window has passed since the start, the key is admitted again.
        tokio::time::sleep(window + Duration::from_millis(100)).await;
        assert!(
            matches!(put(&h, b"x", Some(b"k")).await, Enqueued::Committed(_)),
            "a key stamped a day ahead suppressed its messages for longer than the window"
        );
    });
    drop(h);
    store.close();
}

/// Beyond max_keys, keys are forgotten in the order they were admitted, whatever their stamps
/// say: stamps planted in reverse order (a clock stepping back between admissions) must not
/// make the newest keys look oldest.
#[test]
fn max_keys_evicts_in_admission_order_not_stamp_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let window = Duration::from_secs(3600);
    let store = open_with(&path, window, 1000, Arc::new(Metrics::default()));
    let h = store.handle();
    rt.block_on(async {
        for k in [b"a", b"b", b"c", b"d"] {
            assert!(matches!(
                put(&h, b"x", Some(k)).await,
                Enqueued::Committed(_)
            ));
        }
    });
    drop(h);
    store.close();
    {
        // a is stamped newest, d oldest: the reverse of their admission; all within the window.
        let c = Connection::open(&path).unwrap();
        for (i, k) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
            c.execute(
                "UPDATE dedup SET seen_ms = seen_ms - ?1 WHERE key = ?2",
                params![60_000 * (i as i64 + 1), &k[..]],
            )
            .unwrap();
        }
    }
    let store = open_with(&path, window, 2, Arc::new(Metrics::default()));
    let h = store.handle();
    maintain(&h, &rt);
    rt.block_on(async {
        for k in [b"c", b"d"] {
            assert_eq!(
                put(&h, b"x", Some(k)).await,
                Enqueued::Duplicate,
                "{k:?} was evicted"
            );
        }
        for k in [b"a", b"b"] {
            assert!(
                matches!(put(&h, b"x", Some(k)).await, Enqueued::Committed(_)),
                "{k:?} survived"
            );
        }
    });
    drop(h);
    store.close();
}

/// The scenario from the field: keys stored with the clock a day ahead, then fresh keys after
/// the step back, then max_keys pruning. The fresh keys survive; the stale ones go.
#[test]
fn fresh_keys_survive_pruning_after_a_clock_step_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let window = Duration::from_secs(3600);
    let stale: Vec<Vec<u8>> = (0..20).map(|i| format!("stale{i}").into_bytes()).collect();
    let fresh: Vec<Vec<u8>> = (0..20).map(|i| format!("fresh{i}").into_bytes()).collect();
    let store = open_with(&path, window, 20, Arc::new(Metrics::default()));
    let h = store.handle();
    rt.block_on(async {
        for k in &stale {
            assert!(matches!(
                put(&h, b"x", Some(k)).await,
                Enqueued::Committed(_)
            ));
        }
    });
    drop(h);
    store.close();
    shift_dedup_stamps(&path, DAY_MS);
    let store = open_with(&path, window, 20, Arc::new(Metrics::default()));
    let h = store.handle();
    rt.block_on(async {
        for k in &fresh {
            assert!(matches!(
                put(&h, b"x", Some(k)).await,
                Enqueued::Committed(_)
            ));
        }
    });
    maintain(&h, &rt);
    rt.block_on(async {
        for k in &fresh {
            assert_eq!(
                put(&h, b"x", Some(k)).await,
                Enqueued::Duplicate,
                "fresh key evicted"
            );
        }
        for k in &stale {
            assert!(
                matches!(put(&h, b"x", Some(k)).await, Enqueued::Committed(_)),
                "stale key kept"
            );
        }
    });
    drop(h);
    store.close();
}

/// A store written by schema version 1 keeps its dedup keys through the migration, in the order
/// of their stamps.
#[test]
fn dedup_keys_survive_the_schema_2_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(schema::MIGRATIONS[0]).unwrap();
        let now = now_ms();
        c.execute_batch(&format!(
            "PRAGMA application_id = {};
             PRAGMA user_version = 1;
             INSERT INTO meta (key, value) VALUES ('epoch', '0000abcd');
             INSERT INTO dedup (key, seen_ms) VALUES (x'6e6577', {}), (x'6f6c64', {});",
            schema::APPLICATION_ID,
            now - 1000,
            now - 2000,
        ))
        .unwrap();
    }
    let rt = rt();
    let store = open_with(
        &path,
        Duration::from_secs(3600),
        1,
        Arc::new(Metrics::default()),
    );
    let h = store.handle();
    rt.block_on(async {
        // max_keys = 1 and the open prunes: the key with the older stamp goes.
        assert_eq!(put(&h, b"x", Some(b"new")).await, Enqueued::Duplicate);
        assert!(matches!(
            put(&h, b"x", Some(b"old")).await,
            Enqueued::Committed(_)
        ));
    });
    drop(h);
    store.close();
    let c = Connection::open(&path).unwrap();
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}

#[derive(Debug, Clone)]
enum DedupOp {
    Put(u8),
    /// Close, move every stamp by this many minutes (the clock stepped between the runs), reopen.
    Reopen(i64),
    Maintain,
}

fn dedup_op() -> impl Strategy<Value = DedupOp> {
    prop_oneof![
        8 => (0u8..12).prop_map(DedupOp::Put),
        2 => prop_oneof![Just(-90i64), Just(-25), Just(0), Just(25), Just(1440)].prop_map(DedupOp::Reopen),
        1 => Just(DedupOp::Maintain),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Dedup against a model across clock steps between runs (window 60 min, max_keys 5):
    /// - a key is a duplicate iff it was admitted and is still within its window, where a key
    ///   stamped in the future at a start counts from that start (never more than one window);
    /// - a step forward expires keys whose age passes the window, and nothing else;
    /// - beyond max_keys, the earliest admitted keys are forgotten, whatever their stamps.
    ///
    /// Stamps are shifted by multiples of 25 and 90 minutes, so no age lands near the window's
    /// edge and the milliseconds the test itself takes never matter.
    #[test]
    fn dedup_matches_model_across_clock_steps(ops in proptest::collection::vec(dedup_op(), 1..50)) {
        const WINDOW_MIN: i64 = 60;
        const MAX_KEYS: usize = 5;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let rt = rt();
        let window = Duration::from_secs(WINDOW_MIN as u64 * 60);
        let mut store = open_with(&path, window, MAX_KEYS as u64, Arc::new(Metrics::default()));
        // (key, age in minutes), in admission order.
        let mut model: Vec<(u8, i64)> = Vec::new();
        let prune = |model: &mut Vec<(u8, i64)>| {
            model.retain(|(_, age)| *age <= WINDOW_MIN);
            let excess = model.len().saturating_sub(MAX_KEYS);
            model.drain(..excess);
        };
        for op in ops {
            match op {
                DedupOp::Put(k) => {
                    let h = store.handle();
                    let got = rt.block_on(put(&h, b"x", Some(&[k])));
                    let live = model.iter().any(|(m, age)| *m == k && *age <= WINDOW_MIN);
                    if live {
                        prop_assert_eq!(got, Enqueued::Duplicate, "key {} should be suppressed; model {:?}", k, model);
                    } else {
                        prop_assert!(matches!(got, Enqueued::Committed(_)), "key {} should be admitted; model {:?}", k, model);
                        model.retain(|(m, _)| *m != k);
                        model.push((k, 0));
                    }
                }
                DedupOp::Reopen(shift_min) => {
                    store.close();
                    shift_dedup_stamps(&path, shift_min * 60_000);
                    for (_, age) in model.iter_mut() {
                        *age = (*age - shift_min).max(0);
                    }
                    store = open_with(&path, window, MAX_KEYS as u64, Arc::new(Metrics::default()));
                    prune(&mut model);
                }
                DedupOp::Maintain => {
                    let h = store.handle();
                    maintain(&h, &rt);
                    prune(&mut model);
                }
            }
        }
        store.close();
    }
}

#[test]
fn sequence_numbers_are_never_reused_after_a_crash_with_an_empty_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = rt();
    let store = open(&path);
    let h = store.handle();
    let last = rt.block_on(async {
        let mut last = 0;
        for i in 0..5u8 {
            let Enqueued::Committed(s) = put(&h, &[i], None).await else {
                panic!()
            };
            h.ack(s).await.unwrap();
            last = s;
        }
        h.flush().await.unwrap();
        last
    });
    drop(h);
    store.crash();
    let store = open(&path);
    let h = store.handle();
    let Enqueued::Committed(next) = rt.block_on(put(&h, b"b", None)) else {
        panic!()
    };
    assert!(
        next > last,
        "seq {next} reused after {last} (crash, empty queue)"
    );
    drop(h);
    store.close();
    // No AUTOINCREMENT: nothing writes sqlite_sequence.
    let c = Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM sqlite_sequence", [], |r| r.get(0))
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[test]
fn the_schema_3_migration_keeps_seqs_counts_and_dead_letters_and_never_reuses_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(schema::MIGRATIONS[0]).unwrap();
        c.execute_batch(schema::MIGRATIONS[1]).unwrap();
        c.execute_batch(&format!(
            "PRAGMA application_id = {};
             PRAGMA user_version = 2;
             INSERT INTO meta (key, value) VALUES ('epoch', '0000abcd');
             INSERT INTO messages (seq, topic, payload, enqueued_ms) VALUES (7, 'a', x'0102', 1), (9, 'b', x'03', 2);
             INSERT INTO dead_letters (seq, topic, payload, enqueued_ms, failed_ms, reason)
                 VALUES (8, 't', x'04', 1, 5, 'refused: not authorised');
             UPDATE sqlite_sequence SET seq = 100 WHERE name = 'messages';",
            schema::APPLICATION_ID,
        ))
        .unwrap();
    }
    let rt = rt();
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(&path, options(), metrics.clone()).unwrap();
    assert_eq!(metrics.queue_depth.get(), 2);
    assert_eq!(metrics.dead_letters.get(), 1);
    let h = store.handle();
    let rows = rt.block_on(h.fetch(0, 10)).unwrap();
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [7, 9]);
    let Enqueued::Committed(next) = rt.block_on(put(&h, b"n", None)) else {
        panic!()
    };
    assert!(next > 100, "seq {next} at or below the old sqlite_sequence");
    drop(h);
    store.close();
    let admin = admin::Admin::open(&path, false).unwrap();
    let s = admin.stats().unwrap();
    let before = s.routes.iter().find(|r| r.route == "(before v3)").unwrap();
    assert_eq!((before.depth, before.bytes), (2, 5));
    assert_eq!(before.dead_letters.get("refused"), Some(&1));
    let dead = admin.dead_letter(8).unwrap().unwrap();
    let info = dead.dead.unwrap();
    assert_eq!(
        (info.reason.as_str(), info.detail.as_str()),
        ("refused", "not authorised")
    );
}
