//! The sd_notify protocol as systemd sees it: a datagram socket owned by the test stands in for
//! systemd's NOTIFY_SOCKET.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

struct Notifications {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(dir: &std::path::Path) -> (Notifications, String) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        (
            Notifications {
                sock,
                seen: Vec::new(),
            },
            path.to_string_lossy().into_owned(),
        )
    }

    /// Receive until a message contains `needle` (returns it), bounded by `limit`.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.contains(needle) {
                    return msg;
                }
            }
        }
        panic!(
            "no notification containing {needle:?} within {limit:?}; got {:?}",
            self.seen
        );
    }

    /// Everything received during `window`.
    fn collect(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_only_while_healthy_and_stopping() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let dir = tempfile::tempdir().unwrap();
    let (mut notes, sock) = Notifications::bind(dir.path());
    let mut cfg = DaemonConfig::new("v5", up.v5);
    cfg.env = vec![
        ("NOTIFY_SOCKET".into(), sock),
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ];
    let mut d = Daemon::start(dir.path(), &cfg);

    let ready = notes.wait_for("READY=1", WAIT);
    assert!(ready.contains("STATUS=queue 0 messages"), "{ready}");
    // Healthy: the watchdog is fed (every half period).
    notes.wait_for("WATCHDOG=1", Duration::from_secs(5));
    notes.wait_for("WATCHDOG=1", Duration::from_secs(5));

    // Stall the store for real: another process holds the database's write lock (as an
    // operator's sqlite3 shell in a write transaction would), and a device publishes, so the
    // store thread blocks in its commit.
    let lock = rusqlite::Connection::open(d.db_path()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    publish_all(d.local, "dev-stall", "devices/stall", payloads("stall", 1)).await;
    let stalled = notes.wait_for("STATUS=stalled", Duration::from_secs(10));
    assert!(stalled.contains("store"), "{stalled}");
    assert!(!stalled.contains("WATCHDOG=1"), "{stalled}");
    let during = notes.collect(Duration::from_secs(2));
    assert!(
        during.iter().all(|m| !m.contains("WATCHDOG=1")),
        "watchdog fed while the store was stuck: {during:?}"
    );

    // Released: commits resume, the message is committed, the watchdog is fed again.
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    notes.wait_for("WATCHDOG=1", Duration::from_secs(15));
    d.wait_metric("edgeferry_committed_total", 1);

    assert_eq!(d.terminate(), Some(0));
    let all = notes.seen.join("\n") + &notes.collect(Duration::from_millis(200)).join("\n");
    assert!(all.contains("STOPPING=1"), "{all}");
}
