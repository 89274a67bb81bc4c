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
async fn ready_watchdog_fed_while_the_store_waits_on_a_lock_and_stopping() {
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

    // The store cannot commit: another process holds the database's write lock (as an operator's
    // sqlite3 shell in a write transaction would) while a device publishes. That is waiting on
    // something outside, not a hang a restart would cure: STATUS says so, the device gets no
    // PUBACK, and the watchdog keeps being fed.
    let lock = rusqlite::Connection::open(d.db_path()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let local = d.local;
    let mut dev = tokio::task::spawn_blocking(move || {
        let mut dev = common::raw::RawDevice::connect(local, "dev-stall", false);
        dev.publish(b"devices/stall", b"stall", 1, 1);
        dev
    })
    .await
    .unwrap();
    let failing = notes.wait_for("store commits failing", Duration::from_secs(15));
    assert!(failing.contains("devices held back"), "{failing}");
    notes.wait_for("WATCHDOG=1", Duration::from_secs(10));
    notes.wait_for("WATCHDOG=1", Duration::from_secs(10));
    assert_eq!(
        dev.read(Duration::from_millis(100)),
        common::raw::Got::Nothing,
        "no PUBACK before the commit"
    );

    // Released: the commit goes through, the device gets its PUBACK, STATUS is back to normal.
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let dev = tokio::task::spawn_blocking(move || {
        assert!(matches!(dev.read(WAIT), common::raw::Got::Packet(p) if p[0] == 0x40));
        dev
    })
    .await
    .unwrap();
    drop(dev);
    d.wait_metric("edgeferry_committed_total", 1);
    notes.wait_for("STATUS=queue", Duration::from_secs(15));

    assert_eq!(d.terminate(), Some(0));
    let all = notes.seen.join("\n") + &notes.collect(Duration::from_millis(200)).join("\n");
    assert!(all.contains("STOPPING=1"), "{all}");
}
