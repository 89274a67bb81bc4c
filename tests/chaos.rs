//! Chaos, short form (CI): the real daemon under kill -9 loops, a flapping and a half-open
//! upstream link, a full disk, and damaged store files. Each test checks what an operator relies
//! on: nothing committed is lost, every device-acknowledged message arrives (or, across a
//! kill -9, is lost only inside the documented pre-commit window), drops are counted, and a store
//! file is never destroyed. The long form, with many more cycles and Mosquitto's bridge side by
//! side, is `cargo bench --bench chaos -- --docs` (docs/RELIABILITY.md).
//!
//! Randomised tests print their seed; `CHAOS_SEED=<n> cargo test --test chaos` replays one.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::device::{
    lost_after_ack, spawn_device, Consumer, DeviceOptions, DeviceReport, DeviceShared,
};
use common::*;

fn seed() -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("chaos seed: {seed} (replay with CHAOS_SEED={seed})");
    seed
}

/// The payloads in a store file, read without changing it: read-only, so closing the connection
/// does not checkpoint the WAL a killed daemon left behind (the daemon must recover that itself).
fn committed_rows(db: &Path) -> Vec<Vec<u8>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut st = conn.prepare("SELECT payload FROM messages").unwrap();
    let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

fn devices(
    port: u16,
    n: usize,
    tag: &str,
    pause: Duration,
    shared: &Arc<DeviceShared>,
) -> Vec<std::thread::JoinHandle<DeviceReport>> {
    (0..n)
        .map(|i| {
            spawn_device(
                DeviceOptions {
                    port,
                    client_id: format!("{tag}-dev-{i}"),
                    topic: format!("devices/{tag}{i}/t"),
                    prefix: format!("{tag}{i}"),
                    window: 5,
                    pause,
                    max_messages: 200_000,
                    give_up_after: Duration::from_secs(30),
                },
                shared.clone(),
            )
        })
        .collect()
}

/// Tell the devices to stop, wait for them, and return their reports and every payload they
/// hold a PUBACK for.
fn stop_devices(
    shared: &DeviceShared,
    devs: Vec<std::thread::JoinHandle<DeviceReport>>,
) -> (Vec<DeviceReport>, Vec<Vec<u8>>) {
    shared.stop.store(true, Ordering::SeqCst);
    let reports: Vec<DeviceReport> = devs.into_iter().map(|h| h.join().unwrap()).collect();
    let acked = reports
        .iter()
        .flat_map(|r| r.acked.iter().map(|a| a.payload.clone()))
        .collect();
    (reports, acked)
}

/// Wait until the devices got `more` further PUBACKs (bounded).
fn wait_acks(shared: &DeviceShared, more: u64) {
    let target = shared.acks.load(Ordering::SeqCst) + more;
    wait_for(&format!("{target} device PUBACKs"), WAIT, || {
        (shared.acks.load(Ordering::SeqCst) >= target).then_some(())
    });
}

// ---- a. kill -9 loop under continuous load ----------------------------------------------------

/// Devices keep publishing while the daemon is killed -9 at random moments and restarted, with
/// the upstream link up in some cycles and down in others. Every row ever seen committed in the
/// store, and every message a device holds a PUBACK for, must arrive upstream: a PUBACK is sent
/// only after the commit, so no pre-commit loss window remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_under_load_loses_nothing_acknowledged() {
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let link = LinkProxy::start(up.v5, true);
    let dir = tempfile::tempdir().unwrap();
    let shared = Arc::new(DeviceShared::default());
    shared.life.store(1, Ordering::SeqCst);
    let mut d = Daemon::start(dir.path(), &DaemonConfig::new("v5", link.port));
    let devs = devices(d.local, 3, "k", Duration::from_millis(5), &shared);

    // Link state per cycle: half up, half down, in a seeded order.
    let mut plan = vec![
        true, true, true, true, true, false, false, false, false, false,
    ];
    rng.shuffle(&mut plan);
    let mut committed: HashSet<Vec<u8>> = HashSet::new();
    let mut killed_lives = Vec::new();
    let mut kills: Vec<Instant> = Vec::new();
    for (cycle, link_up) in plan.iter().enumerate() {
        link.set_up(*link_up);
        // A random moment, defined by progress rather than by time: after this many more
        // device PUBACKs in this life.
        wait_acks(&shared, rng.u64(100..800));
        let life = shared.life.load(Ordering::SeqCst);
        d.kill9();
        kills.push(Instant::now());
        let rows = committed_rows(&d.db_path());
        eprintln!(
            "cycle {cycle}: link {}, kill -9 in life {life}: {} rows in the store",
            if *link_up { "up" } else { "down" },
            rows.len()
        );
        committed.extend(rows);
        killed_lives.push(life);
        shared.life.store(life + 1, Ordering::SeqCst);
        d.restart();
    }
    link.set_up(true);
    shared.stop.store(true, Ordering::SeqCst);
    let reports: Vec<_> = devs.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &reports {
        assert!(
            r.unacked.is_empty(),
            "a device could not get {} messages acknowledged",
            r.unacked.len()
        );
    }
    let final_life = shared.life.load(Ordering::SeqCst);
    let mut want: Vec<Vec<u8>> = committed.iter().cloned().collect();
    want.extend(
        reports
            .iter()
            .flat_map(|r| &r.acked)
            .filter(|a| a.life == final_life)
            .map(|a| a.payload.clone()),
    );
    // The assertion that matters: every committed row (and everything acknowledged since the
    // last restart) arrives.
    let got = collector.wait_all(&want, WAIT).await;
    // Then nothing is left to arrive: the queue is empty.
    wait_for("an empty queue", WAIT, || {
        (d.metric("edgeferry_queue_depth") == 0).then_some(())
    });
    let got = {
        // Anything still in flight at that moment has arrived by now or is a duplicate.
        let _ = got;
        collector.snapshot()
    };
    let arrived: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
    let dups = duplicates_with_stable_ids_unless_resent(&got, &reports);
    let (lost, violations) = lost_after_ack(&reports, &|p| arrived.contains(p), &killed_lives);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    let acked: usize = reports.iter().map(|r| r.acked.len()).sum();
    let resends: u64 = reports.iter().map(|r| r.resends).sum();
    eprintln!(
        "kill -9 x{}: {acked} device-acked, {} committed rows seen, {} arrived, {} lost, \
         {dups} duplicates, {resends} device resends",
        kills.len(),
        committed.len(),
        arrived.len(),
        lost.len()
    );
    assert!(acked > 1000, "too little load to mean anything: {acked}");
    assert!(
        lost.is_empty(),
        "{} messages were PUBACKed to devices and never arrived, e.g. {:?}",
        lost.len(),
        lost.iter()
            .take(5)
            .map(|l| String::from_utf8_lossy(&l.payload).into_owned())
            .collect::<Vec<_>>()
    );
}

// ---- b. upstream flapping --------------------------------------------------------------------

/// A Mosquitto upstream that can be stopped and started again on the same port, with
/// persistence, so that the consumer's persistent session (and what it queued) survives.
struct RestartableMosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RestartableMosquitto {
    fn start() -> RestartableMosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("m.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut m = RestartableMosquitto {
            port,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("m.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_until_listening(self.port);
    }

    /// SIGTERM (Mosquitto saves its sessions), bounded wait, then SIGKILL.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RestartableMosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The upstream goes away and comes back repeatedly while devices publish (the link cut at the
/// proxy, and for Mosquitto also the broker itself stopped and restarted on the same port):
/// every device-acknowledged message arrives; duplicates are counted and bounded.
#[test]
fn upstream_flapping_every_device_acked_message_arrives() {
    for kind in broker_kinds() {
        let seed = seed();
        let mut rng = fastrand::Rng::with_seed(seed);
        // rumqttd runs in-process for the whole test; Mosquitto is a process we can restart.
        let (rumqttd, mut mosq) = match kind {
            BrokerKind::Rumqttd => (Some(Upstream::start(kind)), None),
            BrokerKind::Mosquitto => (None, Some(RestartableMosquitto::start())),
        };
        // The consumer speaks MQTT 3.1.1 (persistent session); rumqttd cannot hand an MQTT 5
        // publish with properties to a 3.1.1 subscriber, so against rumqttd the daemon speaks
        // 3.1.1 too, and MQTT 5 against Mosquitto.
        let (protocol, daemon_port, consumer_port) = match (&rumqttd, &mosq) {
            (Some(u), _) => ("v3.1.1", u.v4, u.v4),
            (_, Some(m)) => ("v5", m.port, m.port),
            _ => unreachable!(),
        };
        let consumer = Consumer::start(consumer_port, "flap-consumer", "up/#");
        let link = LinkProxy::start(daemon_port, true);
        let dir = tempfile::tempdir().unwrap();
        let cfg = DaemonConfig::new(protocol, link.port);
        let d = Daemon::start(dir.path(), &cfg);
        let shared = Arc::new(DeviceShared::default());
        let devs = devices(d.local, 2, "f", Duration::from_millis(5), &shared);
        let flaps = 6u64;
        for i in 0..flaps {
            wait_acks(&shared, rng.u64(100..500));
            let errors = d.metric("edgeferry_upstream_errors_total");
            let connects = d.metric("edgeferry_upstream_connects_total");
            // Mosquitto: every other flap restarts the broker itself.
            let restart_broker = mosq.is_some() && i % 2 == 1;
            if restart_broker {
                mosq.as_mut().unwrap().stop();
            } else {
                link.set_up(false);
            }
            d.wait_metric("edgeferry_upstream_errors_total", errors + 1);
            // Devices keep publishing into the outage.
            wait_acks(&shared, rng.u64(50..300));
            if restart_broker {
                mosq.as_mut().unwrap().spawn();
            } else {
                link.set_up(true);
            }
            d.wait_metric("edgeferry_upstream_connects_total", connects + 1);
        }
        let (reports, acked) = stop_devices(&shared, devs);
        assert!(reports.iter().all(|r| r.unacked.is_empty()));
        let missing = consumer.wait_for_all(&acked, WAIT);
        assert_eq!(
            missing,
            0,
            "{kind:?}: {missing} of {} device-acked messages never arrived",
            acked.len()
        );
        let dups = consumer.duplicates();
        // Per disconnect: the in-flight window plus one commit group of acks (README).
        let bound = flaps * (cfg.inflight as u64 + 1024);
        eprintln!(
            "{kind:?} ({protocol}): {flaps} flaps, {} device-acked, all arrived, {dups} duplicates",
            acked.len()
        );
        assert!(dups <= bound, "{dups} duplicates exceed {bound}");
        drop(d);
    }
}

// ---- c. half-open link -----------------------------------------------------------------------

/// The link goes silent without closing (a NAT or modem dropped its state): with keepalive 2s,
/// edgeferry must notice within 3x keepalive, reconnect once bytes flow again, and deliver
/// everything published meanwhile. The bound: rumqttc ticks every keepalive from the connect,
/// sends PINGREQ at the first tick after the link went silent and fails at the next one if no
/// PINGRESP came, so at most 2x keepalive; one more keepalive of slack for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_link_is_noticed_within_keepalive_bound_and_recovered() {
    let keepalive = Duration::from_secs(2);
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    // MQTT 3.1.1: with MQTT 5 a keepalive under 5s stops the forwarder (see the ignored test
    // below), and a short keepalive is the point here.
    let link = LinkProxy::start(up.v4, true);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v3.1.1", link.port);
    cfg.keepalive = "2s".into();
    let d = Daemon::start(dir.path(), &cfg);
    let shared = Arc::new(DeviceShared::default());
    let devs = devices(d.local, 1, "h", Duration::from_millis(10), &shared);
    let deadline = Instant::now() + WAIT;
    while d.metric("edgeferry_acked_total") < 200 {
        assert!(
            Instant::now() < deadline,
            "no forwarding; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.metric("edgeferry_upstream_connected"), 1);
    let accepted = link.accepted.load(Ordering::SeqCst);

    link.set_stalled(true);
    let stalled_at = Instant::now();
    let bound = keepalive * 3;
    wait_for(
        "edgeferry_upstream_connected to drop to 0",
        bound * 2,
        || (d.metric("edgeferry_upstream_connected") == 0).then_some(()),
    );
    let noticed = stalled_at.elapsed();
    eprintln!("half-open link noticed after {noticed:?} (keepalive {keepalive:?})");
    assert!(
        noticed <= bound,
        "a silent link took {noticed:?} to notice, more than 3x keepalive ({bound:?})"
    );
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("upstream connection lost"))
        .expect("the log must say the link was lost");
    eprintln!("{line}");
    // It keeps trying (new connections reach the proxy) while devices keep publishing.
    wait_for("a reconnect attempt", WAIT, || {
        (link.accepted.load(Ordering::SeqCst) > accepted).then_some(())
    });
    wait_acks(&shared, 100);
    let acked_before = d.metric("edgeferry_acked_total");

    link.set_stalled(false);
    let resumed = Instant::now();
    d.wait_metric("edgeferry_acked_total", acked_before + 50);
    eprintln!(
        "forwarding again {:?} after the link resumed",
        resumed.elapsed()
    );
    let (_, acked) = stop_devices(&shared, devs);
    let got = collector.wait_all(&acked, WAIT).await;
    eprintln!(
        "half-open: {} device-acked, all arrived, {} duplicates",
        acked.len(),
        duplicates_with_stable_ids(&got)
    );
}

/// Duplicates upstream, checking that the copies of a message share its id. The one exception is
/// a payload its device sent again (it had no PUBACK when the daemon was killed): if the first
/// copy had been committed, the resend is a new message with a new id, as for any device retry
/// (ingest dedup, off here, is what merges those).
fn duplicates_with_stable_ids_unless_resent(got: &[Received], reports: &[DeviceReport]) -> usize {
    let resent: HashSet<&[u8]> = reports
        .iter()
        .flat_map(|r| &r.acked)
        .filter(|a| a.resent)
        .map(|a| a.payload.as_slice())
        .collect();
    let mut ids: HashMap<&[u8], HashSet<&Option<String>>> = HashMap::new();
    for r in got {
        ids.entry(r.payload.as_slice()).or_default().insert(&r.id);
    }
    for (payload, ids) in &ids {
        assert!(
            ids.len() == 1 || resent.contains(payload),
            "{:?} arrived with {} different ids but its device sent it once",
            String::from_utf8_lossy(payload),
            ids.len()
        );
    }
    got.len() - ids.len()
}

// ---- d. full disk ----------------------------------------------------------------------------

/// A size-limited tmpfs, unmounted (lazily if still busy) when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// None when this machine does not let us mount (not root, or a restricted container).
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Fill the filesystem holding `path` with one file, leaving about `leave` bytes free.
fn fill(path: &Path, leave: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 16 << 10];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    let _ = f.flush();
    f.set_len(written.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
}

/// The store's filesystem fills up while the upstream is down and systemd's watchdog is armed:
/// commits fail and are retried, the daemon stays up, keeps feeding the watchdog (a full disk is
/// waiting, not a hang a restart would cure) and says so once in the log and in STATUS=; devices
/// get no PUBACK meanwhile; once space is back, commits resume and every message a device holds
/// a PUBACK for arrives upstream, and the file is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_holds_devices_back_feeds_the_watchdog_and_loses_nothing() {
    use common::raw::{ack_pkid, Got, RawDevice};
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "4m") else {
        return;
    };
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let link = LinkProxy::start(up.v5, false);
    let mut cfg = DaemonConfig::new("v5", link.port);
    cfg.store_path = Some(disk.dir.join("queue.db"));
    // What this test is about: a disk filled by something else, with no space kept free by
    // the queue (min_free would make drop-oldest routes drop instead of holding devices back).
    cfg.store_extra = "min_free = \"0%\"\n".into();
    cfg.env = vec![
        (
            "NOTIFY_SOCKET".into(),
            notify_path.to_string_lossy().into_owned(),
        ),
        ("WATCHDOG_USEC".into(), "2000000".into()),
    ];
    let mut d = Daemon::start(dir.path(), &cfg);
    let filler = disk.dir.join("filler");
    fill(&filler, 48 << 10);

    // One device publishing QoS 1 in a window of 10 until it gets no PUBACK for a while (the
    // disk is full), recording exactly what it was acknowledged.
    let local = d.local;
    let metrics = d.metrics;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let device = std::thread::spawn(move || {
        let mut dev = RawDevice::connect(local, "dev-disk", false);
        let mut acked: Vec<Vec<u8>> = Vec::new();
        let mut sent: std::collections::HashMap<u16, Vec<u8>> = Default::default();
        let mut next: u32 = 0;
        while !stop2.load(Ordering::Relaxed) {
            while sent.len() < 10 && next < 60_000 {
                next += 1;
                let pkid = next as u16;
                let p = format!("disk/{next:05}/{}", "x".repeat(140)).into_bytes();
                dev.publish(b"devices/disk", &p, 1, pkid);
                sent.insert(pkid, p);
            }
            if let Got::Packet(p) = dev.read(Duration::from_millis(100)) {
                if p[0] == 0x40 {
                    acked.extend(sent.remove(&ack_pkid(&p)));
                }
            }
        }
        // Drain what is still owed (space is back by now).
        let deadline = std::time::Instant::now() + WAIT;
        while !sent.is_empty() && std::time::Instant::now() < deadline {
            if let Got::Packet(p) = dev.read(Duration::from_millis(500)) {
                if p[0] == 0x40 {
                    acked.extend(sent.remove(&ack_pkid(&p)));
                }
            }
        }
        (acked, sent.len())
    });
    d.wait_metric("edgeferry_store_commit_errors_total", 3);
    assert!(d.exited().is_none(), "the daemon died on a full disk");
    // The watchdog is still fed, and STATUS says why devices wait.
    let mut buf = [0u8; 4096];
    let (mut fed, mut status) = (0, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && (fed < 2 || !status) {
        if let Ok(n) = notify.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]);
            fed += usize::from(m.contains("WATCHDOG=1"));
            status |= m.contains("store commits failing");
        }
    }
    assert!(
        fed >= 2 && status,
        "watchdog fed {fed} times, STATUS said disk full: {status}"
    );
    // No PUBACK leaves while nothing commits.
    let committed = scrape(metrics).unwrap()["edgeferry_committed_total"];
    let errors = d.metric("edgeferry_store_commit_errors_total");
    let log = d.log_text();
    assert_eq!(
        log.matches("store: commit failed").count(),
        1,
        "after {errors} failed commits the log should say it once:\n{log}"
    );
    eprintln!("full disk: {committed} committed before space ran out, {errors} failed commits");

    std::fs::remove_file(&filler).unwrap();
    wait_for("commits to succeed again", WAIT, || {
        d.log_text()
            .contains("store: commits succeed again")
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let (acked, owed) = device.join().unwrap();
    assert_eq!(
        owed, 0,
        "every publish was acknowledged once space returned"
    );
    assert!(
        acked.len() as u64 > committed,
        "the device was acknowledged again after the stall"
    );
    link.set_up(true);
    collector.wait_all(&acked, WAIT).await;
    assert_eq!(d.metric("edgeferry_store_lost_uncommitted_total"), 0);
    assert_eq!(d.terminate(), Some(0), "log:\n{}", d.log_text());
    let conn = rusqlite::Connection::open(d.db_path()).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    drop(d);
    drop(disk);
}

// ---- e. damaged store files ----------------------------------------------------------------------

/// What `edgeferry run` did with a store file.
#[derive(Debug)]
enum Outcome {
    /// Exited by itself: code and stderr.
    Exited(Option<i32>, String),
    /// Started and accepted devices (stopped by the test).
    Ran,
}

fn run_on_store(dir: &Path, db: &Path) -> Outcome {
    let local = free_port();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\n[local]\nlisten = \"127.0.0.1:{local}\"\n[store]\npath = \"{}\"\n\
             [upstream]\naddress = \"127.0.0.1:{}\"\n[[route]]\nfrom = \"devices/#\"\n",
            db.display(),
            free_port()
        ),
    )
    .unwrap();
    let log = dir.join("run.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let outcome = wait_for("edgeferry run to exit or accept devices", WAIT, || {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(Outcome::Exited(
                st.code(),
                std::fs::read_to_string(&log).unwrap_or_default(),
            ));
        }
        std::net::TcpStream::connect(("127.0.0.1", local))
            .is_ok()
            .then_some(Outcome::Ran)
    });
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// A real store with a backlog, written by the daemon and closed cleanly.
async fn make_store(dir: &Path) -> Vec<u8> {
    let link = LinkProxy::start(free_port(), false);
    let d = Daemon::start(dir, &DaemonConfig::new("v5", link.port));
    let p: Vec<Vec<u8>> = (0..1500)
        .map(|i| format!("{i:05}/{}", "y".repeat(200)).into_bytes())
        .collect();
    publish_all(d.local, "dev-store", "devices/store", p).await;
    d.wait_metric("edgeferry_committed_total", 1500);
    let mut d = d;
    assert_eq!(d.terminate(), Some(0));
    std::fs::read(d.db_path()).unwrap()
}

fn files_next_to(db: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    ["", "-wal", "-shm", "-journal"]
        .iter()
        .filter_map(|s| {
            let p = PathBuf::from(format!("{}{s}", db.display()));
            std::fs::read(&p).ok().map(|b| (p, b))
        })
        .collect()
}

/// Damaged store files that tests/cli.rs (a non-SQLite file) does not cover: each must be
/// refused with one clear line and a non-zero exit, and left byte for byte as it was (the WAL
/// next to it included). A zero-length file is the one exception: see the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_files_are_refused_and_left_byte_identical() {
    let base = tempfile::tempdir().unwrap();
    let good = make_store(&base.path().join("good").tap_mkdir()).await;
    // The page size from the file header (bytes 16-17; 1 means 65536).
    let page = match u16::from_be_bytes([good[16], good[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    assert!(good.len() > 16 * page, "store too small: {}", good.len());
    assert_eq!(good.len() % page, 0);

    let half = good[..good.len() / 2 / page * page].to_vec();
    let mut garbage_header = good.clone();
    for (i, b) in garbage_header[..100].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let mut bad_page_size = good.clone();
    bad_page_size[16..18].copy_from_slice(&[0x12, 0x34]); // not a power of two

    let mut cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("truncated to half", half, &["corrupt", "left untouched"]),
        (
            "garbage header",
            garbage_header,
            &["not an SQLite database", "left untouched"],
        ),
        ("invalid page size", bad_page_size, &["left untouched"]),
    ];
    // A store from a future schema version.
    let newer = {
        let p = base.path().join("newer.db");
        std::fs::write(&p, &good).unwrap();
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(&format!(
            "PRAGMA journal_mode = DELETE; PRAGMA user_version = {};",
            edgeferry::queue::SCHEMA_VERSION + 1
        ))
        .unwrap();
        drop(c);
        std::fs::read(&p).unwrap()
    };
    cases.push(("future schema version", newer, &["newer", "left untouched"]));

    let mut failures = Vec::new();
    for (i, (name, bytes, want)) in cases.iter().enumerate() {
        let dir = base.path().join(format!("case{i}")).tap_mkdir();
        let db = dir.join("queue.db");
        std::fs::write(&db, bytes).unwrap();
        let before = files_next_to(&db);
        let outcome = run_on_store(&dir, &db);
        let after = files_next_to(&db);
        match &outcome {
            Outcome::Exited(code, err) if *code != Some(0) && code.is_some() => {
                let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
                let last = lines.last().copied().unwrap_or("");
                if lines.len() != 1 || !last.contains(db.to_str().unwrap()) {
                    failures.push(format!(
                        "{name}: expected one line naming the file, got:\n{err}"
                    ));
                }
                for w in want.iter() {
                    if !last.contains(w) {
                        failures.push(format!("{name}: error lacks {w:?}: {last}"));
                    }
                }
                eprintln!("{name}: exit {code:?}: {last}");
            }
            other => failures.push(format!("{name}: not refused: {other:?}")),
        }
        if before.iter().map(|(_, b)| b).ne(after
            .iter()
            .filter(|(p, _)| before.iter().any(|(q, _)| q == p))
            .map(|(_, b)| b))
        {
            failures.push(format!("{name}: the store file was modified"));
        }
        let left: Vec<_> = after.iter().map(|(p, _)| p.display().to_string()).collect();
        if left.len() != before.len() {
            eprintln!("{name}: files next to it afterwards: {left:?}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A zero-length file is what `touch` or an interrupted copy leaves: it holds no data, and
    // SQLite treats it as an empty database, so edgeferry initialises it as a new store (nothing
    // can be lost by doing so) and runs.
    let dir = base.path().join("empty").tap_mkdir();
    let db = dir.join("queue.db");
    std::fs::write(&db, b"").unwrap();
    match run_on_store(&dir, &db) {
        Outcome::Ran => {}
        other => panic!("zero-length store: expected a fresh store, got {other:?}"),
    }
    let c = rusqlite::Connection::open(&db).unwrap();
    let app: i64 = c
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    assert_eq!(app, 0x4546_5259, "initialised as an edgeferry store");
}

/// A store whose last page was cut short (a copy or a disk that stopped mid-page). SQLite reads
/// the missing tail as zeros, so `count(*)` at open still succeeds and the daemon starts on it;
/// rows on that page then read back with rowid 0 and NULL topic and payload
/// (`PRAGMA quick_check` reports "Rowid 0 out of order", "NULL value in messages.payload").

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_truncated_mid_page_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let good = make_store(&base.path().join("good").tap_mkdir()).await;
    let dir = base.path().join("case").tap_mkdir();
    let db = dir.join("queue.db");
    let ragged = good[..good.len() - 1000].to_vec();
    std::fs::write(&db, &ragged).unwrap();
    match run_on_store(&dir, &db) {
        Outcome::Exited(Some(code), err) if code != 0 => {
            assert!(
                err.contains("corrupt") && err.contains("left untouched"),
                "{err}"
            );
        }
        other => panic!("a store truncated mid-page was not refused: {other:?}"),
    }
    assert_eq!(std::fs::read(&db).unwrap(), ragged, "the file was modified");
}

/// A store refused for its schema version while a WAL with committed transactions sits next to
/// it (the newer edgeferry was killed, then the package downgraded): the refusal must not
/// checkpoint that WAL into the file or delete it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_store_with_a_wal_next_to_it_is_left_byte_identical() {
    let base = tempfile::tempdir().unwrap();
    let good = make_store(&base.path().join("good").tap_mkdir()).await;
    let work = base.path().join("work").tap_mkdir();
    let src = work.join("queue.db");
    std::fs::write(&src, &good).unwrap();
    let dir = base.path().join("case").tap_mkdir();
    let db = dir.join("queue.db");
    {
        // Write a few transactions into the WAL and copy the files while the writer still has
        // them open: exactly what a kill -9 leaves.
        let c = rusqlite::Connection::open(&src).unwrap();
        c.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = 0; PRAGMA user_version = {};
             INSERT INTO messages (route, size, topic, payload, enqueued_ms) VALUES (0, 2, 't', x'00', 0);",
            edgeferry::queue::SCHEMA_VERSION + 1
        ))
        .unwrap();
        for s in ["", "-wal", "-shm"] {
            std::fs::copy(
                format!("{}{s}", src.display()),
                format!("{}{s}", db.display()),
            )
            .unwrap();
        }
    }
    let before = files_next_to(&db);
    assert!(before
        .iter()
        .any(|(p, b)| p.to_string_lossy().ends_with("-wal") && !b.is_empty()));
    let outcome = run_on_store(&dir, &db);
    let after = files_next_to(&db);
    match &outcome {
        Outcome::Exited(Some(code), err) if *code != 0 => {
            assert!(
                err.contains("newer") && err.contains("left untouched"),
                "{err}"
            );
        }
        other => panic!("not refused: {other:?}"),
    }
    for (p, b) in &before {
        if p.to_string_lossy().ends_with("-shm") {
            continue; // shared-memory index, rebuilt from the WAL by any reader
        }
        let now = after.iter().find(|(q, _)| q == p).map(|(_, b)| b);
        assert!(
            now == Some(b),
            "{} was {} (the refusal checkpointed or removed the WAL)",
            p.display(),
            if now.is_none() {
                "deleted"
            } else {
                "rewritten"
            }
        );
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
