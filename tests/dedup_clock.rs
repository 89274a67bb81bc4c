//! Ingest dedup on the real daemon while its wall clock steps, as on a gateway without a
//! real-time clock that boots with a stale time and steps it when NTP answers.
//!
//! The daemon runs under libfaketime (Debian package `faketime`) with its offset in a file the
//! test rewrites (`FAKETIME_TIMESTAMP_FILE`, re-read on every call), so the clock can step while
//! the daemon runs and between runs. Only the wall clock is faked
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`): a real step leaves CLOCK_MONOTONIC alone too. Each test
//! first checks that the fake time reaches the daemon (the `enqueued_ms` it writes), so a
//! libfaketime that does not take effect fails the test instead of passing it vacuously.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const HOUR_MS: i64 = 3_600_000;

/// libfaketime's thread-safe build (the daemon is multi-threaded), if installed.
fn libfaketime() -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    dirs.filter_map(|d| d.ok())
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

/// The faked clock: a file holding the offset libfaketime applies, e.g. "+1d" or "-1d".
struct FakeClock {
    file: PathBuf,
    lib: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path, offset: &str) -> Option<FakeClock> {
        let Some(lib) = libfaketime() else {
            eprintln!("libfaketime not installed (apt-get install faketime): skipping");
            return None;
        };
        let clock = FakeClock {
            file: dir.join("faketime.rc"),
            lib,
        };
        clock.set(offset);
        Some(clock)
    }

    /// Step the daemon's wall clock to real time + `offset` (takes effect at its next reading).
    fn set(&self, offset: &str) {
        // Written whole and renamed, so the daemon never reads a half-written offset.
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", self.lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

fn real_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One value from the running daemon's store (read-only; WAL lets it read beside the writer).
fn query(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Assert that the newest queued row was stamped about `offset_ms` away from the real clock:
/// the fake time reached the daemon.
fn assert_daemon_clock(d: &Daemon, offset_ms: i64) {
    let stamped = query(
        &d.db_path(),
        "SELECT enqueued_ms FROM messages ORDER BY seq DESC",
    );
    let off = stamped - real_now_ms();
    assert!(
        (off - offset_ms).abs() < HOUR_MS,
        "the daemon's clock is {off} ms off real time, expected about {offset_ms}: libfaketime did not take effect"
    );
}

fn route() -> String {
    "[[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\ndedup = \"json:/id\"\n".into()
}

fn ids(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("{{\"id\":{i},\"t\":21.5}}").into_bytes())
        .collect()
}

/// Publish `payloads` from one device and wait until the store decided on each; returns how
/// many were committed and how many were suppressed as duplicates.
async fn publish_and_count(d: &Daemon, device: &str, payloads: Vec<Vec<u8>>) -> (u64, u64) {
    let counts = || {
        (
            d.metric("edgeferry_committed_total"),
            d.metric("edgeferry_ingest_duplicates_total"),
        )
    };
    let (c0, d0) = counts();
    let n = payloads.len() as u64;
    publish_all(d.local, device, "devices/a/temp", payloads).await;
    wait_for_async("the store to decide on every message", WAIT, || {
        let (c, dup) = counts();
        (c + dup - c0 - d0 >= n).then_some(())
    })
    .await;
    let (c, dup) = counts();
    (c - c0, dup - d0)
}

/// The clock steps back between two runs (the daemon ran with it a day ahead): the keys stored
/// then are suppressed for at most one window after the restart, not for a day. Then, while
/// running, the clock steps back a day again: a key admitted just before the step is admitted
/// again once one window has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_back_suppresses_keys_for_at_most_one_window() {
    let dir = tempfile::tempdir().unwrap();
    let Some(clock) = FakeClock::new(dir.path(), "+1d") else {
        return;
    };
    let window = Duration::from_secs(3);
    let mut cfg = DaemonConfig::new("v5", free_port()); // no upstream: messages stay queued
    cfg.routes = route();
    cfg.extra = format!("[dedup]\nwindow = \"{}s\"\n", window.as_secs());
    cfg.env = clock.env();
    let mut d = Daemon::start(dir.path(), &cfg);

    assert_eq!(publish_and_count(&d, "dev1", ids(0..20)).await, (20, 0));
    assert_daemon_clock(&d, 24 * HOUR_MS);
    assert_eq!(d.terminate(), Some(0));

    // NTP stepped the clock back to real time before the next start.
    clock.set("+0");
    d.restart();
    let started = Instant::now();
    assert_eq!(d.metric("edgeferry_ingest_dedup_restamped_total"), 20);
    assert!(
        d.log_text().contains("re-stamped to now"),
        "{}",
        d.log_text()
    );
    tokio::time::sleep_until((started + window + Duration::from_millis(500)).into()).await;
    assert_eq!(
        publish_and_count(&d, "dev1", ids(0..20)).await,
        (20, 0),
        "keys stored with the clock a day ahead were still suppressed one window after the restart"
    );

    // While running: admit a key, step the clock back a day, wait out one window.
    assert_eq!(publish_and_count(&d, "dev2", ids(100..101)).await, (1, 0));
    clock.set("-1d");
    let stepped = Instant::now();
    tokio::time::sleep_until((stepped + window + Duration::from_millis(500)).into()).await;
    assert_eq!(
        publish_and_count(&d, "dev2", ids(100..101)).await,
        (1, 0),
        "a step back while running extended the window"
    );
    assert_daemon_clock(&d, -24 * HOUR_MS);
    assert_eq!(d.terminate(), Some(0));
}

/// Keys stored with the clock a day ahead, then fresh keys after the step back, then
/// `max_keys` pruning: the fresh keys are kept and the stale ones forgotten. Then, while
/// running, the clock steps forward three days: the window does not expire early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_neither_evict_fresh_keys_nor_expire_the_window_early() {
    let dir = tempfile::tempdir().unwrap();
    let Some(clock) = FakeClock::new(dir.path(), "+1d") else {
        return;
    };
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.routes = route();
    cfg.extra = "[dedup]\nwindow = \"1h\"\nmax_keys = 20\n".into();
    cfg.env = clock.env();
    let mut d = Daemon::start(dir.path(), &cfg);

    assert_eq!(publish_and_count(&d, "dev1", ids(0..20)).await, (20, 0));
    assert_daemon_clock(&d, 24 * HOUR_MS);
    assert_eq!(d.terminate(), Some(0));

    clock.set("+0");
    d.restart();
    assert_eq!(publish_and_count(&d, "dev1", ids(100..120)).await, (20, 0));
    // 40 keys, max_keys 20: the store's periodic maintenance forgets 20 of them.
    let db = d.db_path();
    wait_for("max_keys pruning", WAIT, || {
        (query(&db, "SELECT count(*) FROM dedup") <= 20).then_some(())
    });
    assert_eq!(
        publish_and_count(&d, "dev1", ids(100..120)).await,
        (0, 20),
        "fresh keys were evicted"
    );
    assert_eq!(
        publish_and_count(&d, "dev1", ids(0..20)).await,
        (20, 0),
        "stale keys outlived fresh ones"
    );

    // While running: admit a key, step the clock forward three days (far past the 1h window).
    assert_eq!(publish_and_count(&d, "dev2", ids(200..201)).await, (1, 0));
    clock.set("+3d");
    assert_eq!(
        publish_and_count(&d, "dev2", ids(200..201)).await,
        (0, 1),
        "a step forward while running expired the window early"
    );
    assert_eq!(publish_and_count(&d, "dev2", ids(201..202)).await, (1, 0));
    assert_daemon_clock(&d, 72 * HOUR_MS);
    assert_eq!(d.terminate(), Some(0));
}

/// The README's "Try it" sends the same `{"id":1,...}` twice: the second is acknowledged, not
/// queued, counted, and explained in the log at INFO (each one at debug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppressed_duplicate_is_explained_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.routes = route();
    let mut d = Daemon::start(dir.path(), &cfg);
    let example = br#"{"id":1,"t":21.5}"#.to_vec();
    assert_eq!(
        publish_and_count(&d, "dev", vec![example.clone()]).await,
        (1, 0)
    );
    assert_eq!(publish_and_count(&d, "dev", vec![example]).await, (0, 1));
    let log = d.log_text();
    let info = log
        .lines()
        .find(|l| l.contains("INFO") && l.contains("not queued again"))
        .unwrap_or_else(|| panic!("no INFO line explains the duplicate:\n{log}"));
    assert!(
        info.contains("suppressed=1") && info.contains("devices/a/temp"),
        "{info}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("duplicate acknowledged")),
        "{log}"
    );
    assert_eq!(d.terminate(), Some(0));
}
