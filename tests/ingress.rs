//! The MQTT ingress end to end: the real daemon, raw-socket and library devices on loopback,
//! a real SQLite store and real upstream brokers. What a device relies on: a PUBACK means the
//! message is committed; bad topics are refused without blocking anyone; local subscribers,
//! retained messages, QoS 2 and topic aliases still work.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::raw::{ack_pkid, publish_frame, Got, RawDevice};
use common::*;

/// The queue rows (topic, payload) in commit order.
fn queued_rows(db: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT topic, payload FROM messages ORDER BY seq")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

const SHORT: Duration = Duration::from_secs(10);

/// Wildcards, NUL, invalid UTF-8 and empty topics can never be published upstream. From a raw
/// v3.1.1 device they close that connection (as MQTT 3.1.1 requires) and are counted; a v5 device
/// gets PUBACK 0x90 and keeps its connection. Nothing invalid is queued; every valid message
/// around them arrives upstream, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_topics_are_refused_and_valid_messages_keep_flowing() {
    for kind in broker_kinds() {
        let up = Upstream::start(kind);
        let collector = Collector::start(up.v5, "up/#").await;
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", up.v5));
        let (local, local_v5) = (d.local, d.local_v5);
        tokio::task::spawn_blocking(move || {
            let bad: [&[u8]; 4] = [b"devices/+/x", b"devices/a\0b", b"devices/\xff\xfe", b""];
            for (i, topic) in bad.iter().enumerate() {
                let mut dev = RawDevice::connect(local, &format!("poison-v4-{i}"), false);
                dev.publish(b"devices/ok", format!("v4-before-{i}").as_bytes(), 1, 1);
                assert!(matches!(dev.read(SHORT), Got::Packet(p) if p[0] == 0x40));
                dev.publish(topic, b"poison", 1, 2);
                assert!(
                    dev.closed_within(SHORT),
                    "v3.1.1: an invalid topic closes the connection"
                );
            }
            let mut dev = RawDevice::connect(local_v5, "poison-v5", true);
            for (i, topic) in bad.iter().enumerate() {
                let pkid = 10 + i as u16;
                dev.publish(topic, b"poison", 1, pkid);
                match dev.read(SHORT) {
                    // PUBACK, remaining length 3 or more: pkid, reason 0x90.
                    Got::Packet(p) => {
                        assert_eq!((p[0], ack_pkid(&p), p[4]), (0x40, pkid, 0x90), "{p:02x?}")
                    }
                    other => panic!("v5 device: expected PUBACK 0x90, got {other:?}"),
                }
                dev.publish(
                    b"devices/ok",
                    format!("v5-after-{i}").as_bytes(),
                    1,
                    100 + i as u16,
                );
                match dev.read(SHORT) {
                    Got::Packet(p) => assert_eq!((p[0], ack_pkid(&p)), (0x40, 100 + i as u16)),
                    other => panic!("v5 device: expected PUBACK, got {other:?}"),
                }
            }
        })
        .await
        .unwrap();
        let want: Vec<Vec<u8>> = (0..4)
            .map(|i| format!("v4-before-{i}").into_bytes())
            .chain((0..4).map(|i| format!("v5-after-{i}").into_bytes()))
            .collect();
        let got = collector.wait_all(&want, WAIT).await;
        let order: Vec<Vec<u8>> = got
            .iter()
            .map(|r| r.payload.clone())
            .filter(|p| want.contains(p))
            .collect();
        assert_eq!(order, want, "{kind:?}: valid messages in order");
        assert!(got.iter().all(|r| r.payload != b"poison"));
        let m = scrape(d.metrics).unwrap();
        assert_eq!(m["edgeferry_committed_total"], 8);
        assert_eq!(m["edgeferry_dead_letters"], 0);
        let text = reqwest_metrics(d.metrics);
        for (kind_label, n) in [("wildcard", 2), ("nul", 2), ("not-utf8", 2), ("empty", 2)] {
            let line =
                format!("edgeferry_ingress_invalid_topics_total{{kind=\"{kind_label}\"}} {n}");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}

/// The raw Prometheus text (labelled series included).
fn reqwest_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// QoS 2: PUBREC only after the commit, a resent PUBLISH with the same packet id is not queued
/// again, and PUBREL completes the flow with PUBCOMP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_is_committed_once_and_the_flow_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", free_port()));
    let local = d.local;
    tokio::task::spawn_blocking(move || {
        let mut dev = RawDevice::connect(local, "qos2-dev", false);
        dev.publish(b"devices/q2", b"exactly-once", 2, 7);
        match dev.read(SHORT) {
            Got::Packet(p) => assert_eq!((p[0], ack_pkid(&p)), (0x50, 7), "PUBREC"),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        // The device lost the PUBREC and resends with DUP set.
        let mut dup = publish_frame(b"devices/q2", b"exactly-once", 2, 7, false, &[]);
        dup[0] |= 0x08;
        dev.send(&dup);
        match dev.read(SHORT) {
            Got::Packet(p) => assert_eq!((p[0], ack_pkid(&p)), (0x50, 7), "PUBREC again"),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        dev.send(&[0x62, 0x02, 0x00, 0x07]); // PUBREL 7
        match dev.read(SHORT) {
            Got::Packet(p) => assert_eq!((p[0], ack_pkid(&p)), (0x70, 7), "PUBCOMP"),
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(
        queued_rows(&d.db_path()),
        vec![("up/devices/q2".to_string(), b"exactly-once".to_vec())]
    );
}

/// An MQTT 5 device that registers a topic alias and then publishes by alias alone is routed to
/// the aliased topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_topic_aliases_are_routed_to_the_right_topic() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", free_port()));
    let local_v5 = d.local_v5;
    tokio::task::spawn_blocking(move || {
        let mut dev = RawDevice::connect(local_v5, "alias-dev", true);
        let alias1 = [0x23, 0x00, 0x01];
        let alias2 = [0x23, 0x00, 0x02];
        let frames = [
            publish_frame(b"devices/a/temp", b"1", 1, 1, true, &alias1),
            publish_frame(b"devices/b/hum", b"2", 1, 2, true, &alias2),
            publish_frame(b"", b"3", 1, 3, true, &alias1),
            publish_frame(b"", b"4", 1, 4, true, &alias2),
        ];
        for f in frames {
            dev.send(&f);
        }
        for pkid in 1..=4 {
            match dev.read(SHORT) {
                Got::Packet(p) => assert_eq!((p[0], ack_pkid(&p)), (0x40, pkid)),
                other => panic!("expected PUBACK {pkid}, got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    let rows = queued_rows(&d.db_path());
    let want: Vec<(String, Vec<u8>)> = [
        ("up/devices/a/temp", "1"),
        ("up/devices/b/hum", "2"),
        ("up/devices/a/temp", "3"),
        ("up/devices/b/hum", "4"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.as_bytes().to_vec()))
    .collect();
    assert_eq!(rows, want);
}

/// The embedded broker still serves local devices: a subscriber receives device publishes on
/// its filter (telemetry is queued for upstream as well), and a retained publish reaches a
/// subscriber that arrives later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_subscribers_get_device_publishes_and_retained_messages() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let upstream = Collector::start(up.v5, "up/#").await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", up.v5));
    let local_sub = Collector::start(d.local_v5, "devices/+/temp").await;
    let all = payloads("dev", 20);
    publish_all(d.local, "dev-local", "devices/x/temp", all.clone()).await;
    local_sub.wait_all(&all, WAIT).await;
    upstream.wait_all(&all, WAIT).await;

    // Retained: published with no subscriber on its topic, received by one that comes later.
    let local = d.local;
    tokio::task::spawn_blocking(move || {
        let mut dev = RawDevice::connect(local, "retainer", false);
        let mut f = publish_frame(b"status/door", b"open", 1, 1, false, &[]);
        f[0] |= 0x01; // retain
        dev.send(&f);
        assert!(matches!(dev.read(SHORT), Got::Packet(p) if p[0] == 0x40));
    })
    .await
    .unwrap();
    let late = Collector::start(d.local_v5, "status/#").await;
    late.wait_all(&[b"open".to_vec()], WAIT).await;
}

/// A QoS 0 flooder and a QoS 1 device share a routed topic while the store is held by another
/// process: the QoS 1 device holds PUBACKs only for committed messages (every one of them is in
/// the queue afterwards), and the flooder is held back by TCP instead of growing memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flooder_cannot_cost_a_qos1_device_an_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", free_port()));
    let local = d.local;
    let metrics = d.metrics;
    let db = d.db_path();
    let acked = tokio::task::spawn_blocking(move || {
        let lock = rusqlite::Connection::open(&db).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        // Flooder: QoS 0 as fast as the socket takes it, from its own thread, bounded in time.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let flooder = std::thread::spawn(move || {
            let mut f = RawDevice::connect(local, "flooder", false);
            f.stream
                .set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let frame = publish_frame(b"devices/flood", &[b'x'; 200], 0, 0, false, &[]);
            let mut batch = Vec::new();
            for _ in 0..64 {
                batch.extend_from_slice(&frame);
            }
            let mut blocked = 0u32;
            let mut sent = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                use std::io::Write;
                match f.stream.write(&batch) {
                    Ok(n) => sent += n as u64,
                    Err(_) => blocked += 1,
                }
            }
            (sent, blocked)
        });
        let mut dev = RawDevice::connect(local, "honest", false);
        for i in 1..=50u16 {
            dev.publish(b"devices/honest", format!("h{i}").as_bytes(), 1, i);
        }
        wait_for("a failed commit", WAIT, || {
            (scrape(metrics)?["edgeferry_store_commit_errors_total"] >= 1).then_some(())
        });
        assert_eq!(dev.read(Duration::from_millis(200)), Got::Nothing);
        lock.execute_batch("ROLLBACK").unwrap();
        drop(lock);
        let mut acked = HashSet::new();
        while acked.len() < 50 {
            match dev.read(WAIT) {
                Got::Packet(p) if p[0] == 0x40 => {
                    acked.insert(format!("h{}", ack_pkid(&p)).into_bytes());
                }
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (_, blocked) = flooder.join().unwrap();
        assert!(blocked > 0, "the flooder's writes must have been held back");
        acked
    })
    .await
    .unwrap();
    let queued: HashSet<Vec<u8>> = queued_payloads(&d.db_path()).into_iter().collect();
    assert!(
        acked.iter().all(|p| queued.contains(p)),
        "every PUBACKed message is committed"
    );
}

/// SIGTERM while 20 devices publish on two routes: every message a device holds a PUBACK for is
/// committed on both routes. (Before the ingress, rumqttd acknowledged messages whose route's
/// drain had already stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_with_two_routes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.routes = "[[route]]\nfrom = \"devices/#\"\nto = \"a/{topic}\"\n\
                  [[route]]\nfrom = \"devices/+/t\"\nto = \"b/{topic}\"\n"
        .into();
    let mut d = Daemon::start(dir.path(), &cfg);
    let local = d.local;
    let devices: Vec<_> = (0..20)
        .map(|n| {
            std::thread::spawn(move || {
                let mut dev = RawDevice::connect(local, &format!("term-{n}"), false);
                let mut acked = Vec::new();
                // Until the daemon closes the connection; bounded by the test's own deadline.
                for i in 1..=60_000u16 {
                    let payload = format!("d{n}-{i}");
                    let topic = format!("devices/d{n}/t");
                    dev.publish(topic.as_bytes(), payload.as_bytes(), 1, i);
                    match dev.read(SHORT) {
                        Got::Packet(p) if p[0] == 0x40 && ack_pkid(&p) == i => {
                            acked.push(payload.into_bytes())
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    d.wait_metric("edgeferry_committed_total", 2000);
    assert_eq!(d.terminate(), Some(0));
    let mut acked = Vec::new();
    for t in devices {
        acked.extend(t.join().unwrap());
    }
    let rows = queued_rows(&d.db_path());
    let a: HashSet<&[u8]> = rows
        .iter()
        .filter(|(t, _)| t.starts_with("a/"))
        .map(|(_, p)| p.as_slice())
        .collect();
    let b: HashSet<&[u8]> = rows
        .iter()
        .filter(|(t, _)| t.starts_with("b/"))
        .map(|(_, p)| p.as_slice())
        .collect();
    assert!(acked.len() >= 1000, "only {} acknowledged", acked.len());
    let lost_a = acked.iter().filter(|p| !a.contains(p.as_slice())).count();
    let lost_b = acked.iter().filter(|p| !b.contains(p.as_slice())).count();
    assert_eq!(
        (lost_a, lost_b),
        (0, 0),
        "acknowledged but not committed, per route"
    );
}

/// kill -9 under continuous load, several rounds: every message a device holds a PUBACK for is
/// in the store when the daemon comes back. No loss window before commit remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &DaemonConfig::new("v5", free_port()));
    let mut acked_total = 0usize;
    for round in 0..5u32 {
        let local = d.local;
        let devices: Vec<_> = (0..4)
            .map(|n| {
                std::thread::spawn(move || {
                    let mut dev = RawDevice::connect(local, &format!("k-{round}-{n}"), false);
                    let mut acked = Vec::new();
                    for i in 1..=60_000u16 {
                        let payload = format!("r{round}-d{n}-{i}");
                        dev.publish(b"devices/k/t", payload.as_bytes(), 1, i);
                        match dev.read(SHORT) {
                            Got::Packet(p) if p[0] == 0x40 && ack_pkid(&p) == i => {
                                acked.push(payload.into_bytes())
                            }
                            _ => break,
                        }
                    }
                    acked
                })
            })
            .collect();
        // A different moment each round: after a growing number of commits.
        d.wait_metric("edgeferry_committed_total", 300 + 200 * u64::from(round));
        d.kill9();
        let mut acked = Vec::new();
        for t in devices {
            acked.extend(t.join().unwrap());
        }
        let queued: HashSet<Vec<u8>> = queued_payloads(&d.db_path()).into_iter().collect();
        let lost = acked.iter().filter(|p| !queued.contains(*p)).count();
        assert_eq!(
            lost,
            0,
            "round {round}: {lost} of {} acknowledged messages lost",
            acked.len()
        );
        acked_total += acked.len();
        d.restart();
    }
    assert!(acked_total > 1000);
}

/// File-descriptor exhaustion attempt: the daemon runs with a 1024-descriptor limit while a
/// hostile client churns through thousands of sockets that never send CONNECT. Connections
/// beyond `local.max_handshakes` (default 256) are closed at accept, silent ones after
/// `local.connect_timeout`, so descriptors never run out; a good device connects and gets its
/// messages committed every time, and the log stays short. Connect times are printed (a figure,
/// not an assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_by_silent_sockets_leaves_good_devices_served() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.local_extra =
        "connect_timeout = \"1s\"\nmax_connections_per_address = 4000\nmax_connections = 4000\n"
            .into();
    let d = Daemon::start(dir.path(), &cfg);
    let pid = d.pid().unwrap();
    let ok = std::process::Command::new("prlimit")
        .args([format!("--pid={pid}"), "--nofile=1024:1024".into()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: prlimit is not available");
        return;
    }
    let local = d.local;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hostile: Vec<_> = (0..2)
        .map(|_| {
            let stop2 = stop.clone();
            std::thread::spawn(move || {
                let mut open = std::collections::VecDeque::new();
                let mut opened = 0u64;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", local)) {
                        open.push_back(s);
                        opened += 1;
                    }
                    if open.len() > 1500 {
                        open.pop_front();
                    }
                }
                opened
            })
        })
        .collect();
    let good = tokio::task::spawn_blocking(move || {
        let mut times = Vec::new();
        for i in 0..40u16 {
            let t = std::time::Instant::now();
            let mut dev = RawDevice::connect(local, &format!("good-{i}"), false);
            dev.publish(b"devices/good", format!("good-{i}").as_bytes(), 1, 1);
            match dev.read(WAIT) {
                Got::Packet(p) if p[0] == 0x40 => {}
                other => panic!("good device {i}: expected PUBACK, got {other:?}"),
            }
            times.push(t.elapsed());
            let _ = dev.stream.write_all(&[0xe0, 0x00]);
            std::thread::sleep(Duration::from_millis(100));
        }
        times
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened: u64 = hostile.into_iter().map(|h| h.join().unwrap()).sum();
    let mut sorted = good.clone();
    sorted.sort();
    eprintln!(
        "fd churn: {opened} hostile sockets; good device connect+PUBACK p50 {:?}, max {:?}",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    assert!(
        opened > 1024,
        "the attack must outnumber the descriptors: {opened}"
    );
    let m = scrape(d.metrics).unwrap();
    assert_eq!(m["edgeferry_committed_total"], 40);
    let text = reqwest_metrics(d.metrics);
    assert!(
        !text.contains("edgeferry_ingress_refused_total{reason=\"handshake-limit\"} 0"),
        "the handshake cap never applied:\n{text}"
    );
    let log = d.log_text();
    let loud = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    assert!(loud <= 30, "{loud} WARN/ERROR lines:\n{log}");
}

/// A payload over `local.max_payload` closes that device's connection, is counted, and is
/// logged once with the client id and the size; other devices are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_refused_counted_and_logged_with_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.local_extra = "max_payload = \"1KiB\"\n".into();
    let d = Daemon::start(dir.path(), &cfg);
    let local = d.local;
    tokio::task::spawn_blocking(move || {
        let mut big = RawDevice::connect(local, "big-sender", false);
        big.publish(b"devices/big", &vec![b'x'; 200 * 1024], 1, 1);
        assert!(
            big.closed_within(SHORT),
            "the oversized sender is disconnected"
        );
        let mut ok = RawDevice::connect(local, "small-sender", false);
        ok.publish(b"devices/small", b"fits", 1, 1);
        assert!(matches!(ok.read(SHORT), Got::Packet(p) if p[0] == 0x40));
    })
    .await
    .unwrap();
    let text = reqwest_metrics(d.metrics);
    assert!(
        text.contains("edgeferry_ingress_refused_total{reason=\"oversized\"} 1"),
        "{text}"
    );
    let log = d.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("oversized"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("big-sender") && lines[0].contains("bytes"),
        "{}",
        lines[0]
    );
    assert_eq!(queued_rows(&d.db_path()).len(), 1);
}
