//! End to end: the real daemon between device clients and a real upstream broker (rumqttd
//! in-process, and Debian's mosquitto when installed), over loopback TCP.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

/// Per topic, the first copies of each message must arrive in publish order.
fn assert_order_per_topic(got: &[Received]) {
    let mut seen: HashMap<&str, std::collections::HashSet<&[u8]>> = HashMap::new();
    let mut last: HashMap<&str, &[u8]> = HashMap::new();
    for r in got {
        let firsts = seen.entry(&r.topic).or_default();
        if !firsts.insert(&r.payload) {
            continue; // a resend after a reconnect may repeat older messages
        }
        if let Some(prev) = last.get(r.topic.as_str()) {
            assert!(
                *prev < r.payload.as_slice(),
                "on {}: {:?} arrived after {:?}",
                r.topic,
                String::from_utf8_lossy(&r.payload),
                String::from_utf8_lossy(prev)
            );
        }
        last.insert(&r.topic, &r.payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_forwarding_delivers_everything_in_order_per_topic() {
    for kind in broker_kinds() {
        for protocol in ["v5", "v3.1.1"] {
            let up = Upstream::start(kind);
            let collector = Collector::start(up.v5, "up/#").await;
            let dir = tempfile::tempdir().unwrap();
            let d = Daemon::start(
                dir.path(),
                &DaemonConfig::new(protocol, up.port_for(protocol)),
            );
            let mut all = Vec::new();
            let mut devices = Vec::new();
            for dev in 0..3 {
                let p = payloads(&format!("d{dev}"), 300);
                all.extend(p.clone());
                devices.push(tokio::spawn(publish_all(
                    d.local,
                    format!("dev-{dev}"),
                    format!("devices/d{dev}/t"),
                    p,
                )));
            }
            for t in devices {
                t.await.unwrap();
            }
            let got = collector.wait_all(&all, WAIT).await;
            assert_order_per_topic(&got);
            assert_eq!(
                duplicates_with_stable_ids(&got),
                0,
                "{kind:?} {protocol}: duplicates without any disconnect"
            );
            for r in &got {
                let dev = String::from_utf8_lossy(&r.payload)
                    .split('/')
                    .next()
                    .unwrap()
                    .to_string();
                assert_eq!(
                    r.topic,
                    format!("up/devices/{dev}/t"),
                    "topic template not applied"
                );
                if protocol == "v5" {
                    let id = r.id.as_deref().expect("MQTT 5 messages carry their id");
                    assert!(id.starts_with("gw-test-"), "{id}");
                }
            }
            if protocol == "v5" {
                let ids: std::collections::HashSet<_> = got.iter().map(|r| r.id.clone()).collect();
                assert_eq!(ids.len(), all.len(), "message ids must be unique");
            }
            // Deleted only after PUBACK, and all of them were.
            d.wait_metric("edgeferry_acked_total", all.len() as u64);
            assert_eq!(d.metric("edgeferry_queue_depth"), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_messages_wait_on_disk_then_drain_and_the_log_says_so_once() {
    for kind in broker_kinds() {
        let up = Upstream::start(kind);
        let collector = Collector::start(up.v5, "up/#").await;
        let link = LinkProxy::start(up.v5, false);
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", link.port));
        let all = payloads("out", 800);
        publish_all(d.local, "dev-out", "devices/out", all.clone()).await;
        d.wait_metric("edgeferry_committed_total", all.len() as u64);
        // Several failed attempts, one log line.
        d.wait_metric("edgeferry_upstream_errors_total", 4);
        assert!(
            collector.snapshot().is_empty(),
            "nothing can arrive while the link is down"
        );
        assert_eq!(d.metric("edgeferry_queue_depth"), all.len() as u64);
        link.set_up(true);
        let got = collector.wait_all(&all, WAIT).await;
        assert_order_per_topic(&got);
        assert_eq!(duplicates_with_stable_ids(&got), 0);
        let log = d.log_text();
        assert_eq!(
            log.matches("upstream unreachable").count(),
            1,
            "log:\n{log}"
        );
        assert_eq!(
            log.matches("upstream connected again").count(),
            1,
            "log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_upstream_down_loses_nothing_committed() {
    for kind in broker_kinds() {
        let up = Upstream::start(kind);
        let collector = Collector::start(up.v5, "up/#").await;
        let link = LinkProxy::start(up.v5, false);
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon::start(dir.path(), &DaemonConfig::new("v5", link.port));
        let all = payloads("crash", 1000);
        publish_all(d.local, "dev-crash", "devices/crash", all.clone()).await;
        d.wait_metric("edgeferry_committed_total", all.len() as u64);
        d.kill9();
        let on_disk = queued_payloads(&d.db_path());
        assert_eq!(
            on_disk, all,
            "the queue must hold every committed message, in order, after kill -9"
        );
        d.restart();
        link.set_up(true);
        let got = collector.wait_all(&all, WAIT).await;
        assert_order_per_topic(&got);
        assert_eq!(
            duplicates_with_stable_ids(&got),
            0,
            "nothing was in flight, so no duplicates"
        );
    }
}

/// kill -9 while the backlog drains: every committed message still arrives; duplicates are
/// limited to what was in flight (the window) plus acks not yet committed (one commit group),
/// and each duplicate carries its first copy's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_draining_duplicates_are_bounded_and_keep_their_id() {
    for kind in broker_kinds() {
        let up = Upstream::start(kind);
        let collector = Collector::start(up.v5, "up/#").await;
        let link = LinkProxy::start(up.v5, false);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DaemonConfig::new("v5", link.port);
        cfg.inflight = 16;
        let mut d = Daemon::start(dir.path(), &cfg);
        let all = payloads("drain", 3000);
        publish_all(d.local, "dev-drain", "devices/drain", all.clone()).await;
        d.wait_metric("edgeferry_committed_total", all.len() as u64);
        link.set_up(true);
        let mut kills = 0;
        for at in [300u64, 1200] {
            d.wait_metric("edgeferry_acked_total", at);
            d.kill9();
            kills += 1;
            d.restart();
            // Restarted counters start from zero; wait until this run forwards again.
            d.wait_metric("edgeferry_upstream_connects_total", 1);
        }
        let got = collector.wait_all(&all, WAIT).await;
        let dups = duplicates_with_stable_ids(&got);
        // Bound per crash: the in-flight window plus one commit group of acks (default 1024).
        let bound = kills * (cfg.inflight as usize + 1024);
        assert!(dups <= bound, "{dups} duplicates exceed the bound {bound}");
        assert_order_per_topic(&got);
        eprintln!(
            "{kind:?}: {dups} duplicates after {kills} kill -9 while draining {} messages",
            all.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_flapping_while_devices_publish_loses_nothing() {
    for kind in broker_kinds() {
        for protocol in ["v5", "v3.1.1"] {
            let up = Upstream::start(kind);
            let collector = Collector::start(up.v5, "up/#").await;
            let link = LinkProxy::start(up.port_for(protocol), true);
            let dir = tempfile::tempdir().unwrap();
            let d = Daemon::start(dir.path(), &DaemonConfig::new(protocol, link.port));
            let all = payloads("flap", 4000);
            let publisher = tokio::spawn(publish_all(
                d.local,
                "dev-flap",
                "devices/flap",
                all.clone(),
            ));
            // Cut the link five times, each time after more messages went through, and restore
            // it once the daemon noticed.
            for i in 1..=5u64 {
                d.wait_metric("edgeferry_acked_total", i * 400);
                link.set_up(false);
                d.wait_metric("edgeferry_upstream_errors_total", i);
                link.set_up(true);
            }
            publisher.await.unwrap();
            let got = collector.wait_all(&all, WAIT).await;
            assert_order_per_topic(&got);
            if protocol == "v5" {
                duplicates_with_stable_ids(&got);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_dedup_forwards_a_retried_message_once_even_across_restarts() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", up.v5);
    cfg.routes = "[[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\ndedup = \"json:/id\"\n\
                  [[route]]\nfrom = \"props/#\"\nto = \"up/{topic}\"\ndedup = \"property:msg-id\"\n"
        .into();
    let mut d = Daemon::start(dir.path(), &cfg);
    let json = |id: u32, note: &str| format!("{{\"id\":{id},\"note\":\"{note}\"}}").into_bytes();
    // A device retrying message 1 (e.g. its PUBACK was lost), then message 2, then a sentinel.
    publish_all(
        d.local,
        "dev-j",
        "devices/j",
        vec![
            json(1, "a"),
            json(1, "a"),
            json(2, "b"),
            json(3, "sentinel"),
        ],
    )
    .await;
    // An MQTT 5 device retrying with the same msg-id property.
    let prop = |v: &str| vec![("msg-id".to_string(), v.to_string())];
    publish_v5(d.local_v5, "dev-p", "props/p", b"p1", prop("7")).await;
    publish_v5(d.local_v5, "dev-p", "props/p", b"p1-retry", prop("7")).await;
    publish_v5(d.local_v5, "dev-p", "props/p", b"p2", prop("8")).await;
    d.wait_metric("edgeferry_ingest_duplicates_total", 2);
    let got = collector
        .wait_all(&[json(3, "sentinel"), b"p2".to_vec()], WAIT)
        .await;
    let count = |p: &[u8]| got.iter().filter(|r| r.payload == p).count();
    assert_eq!(count(&json(1, "a")), 1);
    assert_eq!(count(&json(2, "b")), 1);
    assert_eq!(count(b"p1"), 1);
    assert_eq!(count(b"p1-retry"), 0);
    assert_eq!(d.metric("edgeferry_committed_total"), 5);

    // The window survives a restart: the same key is still a duplicate.
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    publish_all(
        d.local,
        "dev-j",
        "devices/j",
        vec![json(1, "a"), json(4, "sentinel2")],
    )
    .await;
    d.wait_metric("edgeferry_ingest_duplicates_total", 1);
    let got = collector.wait_all(&[json(4, "sentinel2")], WAIT).await;
    assert_eq!(got.iter().filter(|r| r.payload == json(1, "a")).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_keeps_the_backlog_for_the_next_start() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let link = LinkProxy::start(up.v5, false);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &DaemonConfig::new("v5", link.port));
    let all = payloads("term", 50);
    publish_all(d.local, "dev-term", "devices/term", all.clone()).await;
    d.wait_metric("edgeferry_committed_total", 50);
    assert_eq!(d.terminate(), Some(0), "log:\n{}", d.log_text());
    assert_eq!(queued_payloads(&d.db_path()), all);
    link.set_up(true);
    d.restart();
    collector.wait_all(&all, WAIT).await;
    d.wait_metric("edgeferry_acked_total", 50);
    // Bounded: the shutdown grace is 2s in these tests.
    let started = std::time::Instant::now();
    assert_eq!(d.terminate(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A stalled store (another process holds its write lock): a device publishing QoS 1 gets no
/// PUBACK while nothing can be committed, then every one of them, in order, and each message is
/// committed exactly once. A PUBACK means committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_withholds_pubacks_until_commit_and_loses_nothing() {
    use common::raw::{ack_pkid, Got, RawDevice};
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", free_port()));
    let metrics = d.metrics;
    let local = d.local;
    let db = d.db_path();
    let n: u16 = 300;
    // local.max_inflight's default: the most publishes one connection may have waiting.
    let inflight = 100;
    let result = tokio::task::spawn_blocking(move || {
        let lock = rusqlite::Connection::open(&db).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let mut dev = RawDevice::connect(local, "stalled-dev", false);
        for i in 1..=n {
            dev.publish(b"devices/dev/t", format!("m{i}").as_bytes(), 1, i);
        }
        // A window of publishes reached the store and a commit was tried and failed on the lock.
        wait_for(
            "ingest of a window of publishes and a failed commit",
            WAIT,
            || {
                let m = scrape(metrics)?;
                (m["edgeferry_ingested_total"] >= inflight
                    && m["edgeferry_store_commit_errors_total"] >= 1)
                    .then_some(())
            },
        );
        assert_eq!(
            scrape(metrics).unwrap()["edgeferry_ingested_total"],
            inflight,
            "the device is held back at its in-flight window, its other messages wait on it"
        );
        assert_eq!(
            dev.read(Duration::from_millis(200)),
            Got::Nothing,
            "no PUBACK may leave before the commit"
        );
        lock.execute_batch("ROLLBACK").unwrap();
        drop(lock);
        let mut acked = Vec::new();
        while acked.len() < usize::from(n) {
            match dev.read(WAIT) {
                Got::Packet(p) if p[0] == 0x40 => acked.push(ack_pkid(&p)),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        acked
    })
    .await
    .unwrap();
    assert_eq!(
        result,
        (1..=n).collect::<Vec<_>>(),
        "PUBACKs in publish order"
    );
    let m = scrape(metrics).unwrap();
    assert_eq!(m["edgeferry_committed_total"], u64::from(n));
    let mut queued = queued_payloads(&d.db_path());
    queued.sort();
    let mut want: Vec<Vec<u8>> = (1..=n).map(|i| format!("m{i}").into_bytes()).collect();
    want.sort();
    assert_eq!(
        queued, want,
        "every acknowledged message is in the queue, once"
    );
}
