//! Quarantine: no row can stop the queue. Rows planted in the store as an older version could
//! have written them, upstreams that refuse a message by disconnecting or by reason code, and
//! an upstream that acknowledges out of order while refusing some messages. The real daemon,
//! real Mosquitto, real SQLite files; a scripted MQTT 5 upstream only for what no broker does on
//! demand.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::scripted::{Script, Scripted};
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    Disconnect, DisconnectProperties, DisconnectReasonCode, PubAckReason,
};

// ---- helpers --------------------------------------------------------------------------------

/// Debian's mosquitto with extra configuration lines, on a free loopback port.
struct Mosquitto {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start(extra: &str) -> Option<Mosquitto> {
        if !mosquitto_available() {
            eprintln!("mosquitto not installed: skipping");
            return None;
        }
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        wait_until_listening(port);
        Some(Mosquitto {
            port,
            child,
            _dir: dir,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A row as an older version (or another program) could have left it in the store.
struct Planted {
    /// Raw topic bytes, stored as TEXT even when they are not UTF-8.
    topic: Vec<u8>,
    payload: Vec<u8>,
}

fn row(topic: &str, payload: impl Into<Vec<u8>>) -> Planted {
    Planted {
        topic: topic.as_bytes().to_vec(),
        payload: payload.into(),
    }
}

/// Insert rows into a stopped daemon's store; returns their seqs.
fn plant(db: &Path, rows: &[Planted]) -> Vec<i64> {
    let mut conn = rusqlite::Connection::open(db).unwrap();
    let tx = conn.transaction().unwrap();
    let mut seqs = Vec::new();
    for r in rows {
        tx.execute(
            "INSERT INTO messages (route, size, topic, payload, enqueued_ms)
             VALUES (0, length(?1) + length(?2), CAST(?1 AS TEXT), ?2, 0)",
            rusqlite::params![r.topic, r.payload],
        )
        .unwrap();
        seqs.push(tx.last_insert_rowid());
        // The store's kept counters, as its own inserts keep them.
        tx.execute(
            "INSERT INTO stats (route, name, value)
             VALUES (0, 'depth', 1), (0, 'bytes', length(?1) + length(?2))
             ON CONFLICT (route, name) DO UPDATE SET value = value + excluded.value",
            rusqlite::params![r.topic, r.payload],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    seqs
}

fn epoch(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
        r.get(0)
    })
    .unwrap()
}

/// (seq, reason) of every dead letter.
fn dead_letters(db: &Path) -> Vec<(i64, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn
        .prepare(
            "SELECT seq, CASE WHEN detail = '' THEN reason ELSE reason || ': ' || detail END
             FROM dead_letters ORDER BY seq",
        )
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}

/// Wait until metric `name` satisfies `ok`; on timeout, fail with the daemon's log.
fn wait_until(d: &Daemon, name: &str, what: &str, ok: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if scrape(d.metrics)
            .and_then(|m| m.get(name).copied())
            .is_some_and(&ok)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "timed out waiting for {name} {what}; log:\n{}",
        d.log_text()
    );
}

fn wait_metric(d: &Daemon, name: &str, at_least: u64) {
    wait_until(d, name, &format!(">= {at_least}"), |v| v >= at_least);
}

fn wait_drained(d: &Daemon) {
    wait_until(d, "edgeferry_queue_depth", "== 0", |v| v == 0);
}

fn dead_lettered(d: &Daemon, reason: &str) -> u64 {
    d.metric(&format!(
        "edgeferry_dead_lettered_total{{reason=\"{reason}\"}}"
    ))
}

/// A daemon whose store holds `rows`, planted while it was stopped, then started against
/// `upstream`. The link starts down so nothing leaves before the rows are in place.
fn daemon_with_rows(
    dir: &Path,
    protocol: &'static str,
    upstream: u16,
    inflight: u16,
    rows: &[Planted],
) -> (Daemon, LinkProxy, Vec<i64>) {
    let link = LinkProxy::start(upstream, false);
    let mut cfg = DaemonConfig::new(protocol, link.port);
    cfg.inflight = inflight;
    let mut d = Daemon::start(dir, &cfg);
    assert_eq!(d.terminate(), Some(0));
    let seqs = plant(&d.db_path(), rows);
    link.set_up(true);
    d.restart();
    (d, link, seqs)
}

/// The first copy of each payload arrives in the order given.
fn assert_first_copies_in_order(got: &[Vec<u8>], want: &[Vec<u8>]) {
    let wanted: HashSet<&Vec<u8>> = want.iter().collect();
    let mut seen = HashSet::new();
    let firsts: Vec<&Vec<u8>> = got
        .iter()
        .filter(|p| wanted.contains(p) && seen.insert(*p))
        .collect();
    let want: Vec<&Vec<u8>> = want.iter().collect();
    assert_eq!(firsts, want, "valid messages out of order or missing");
}

/// Each quarantined message is logged once at ERROR with its id.
fn assert_one_error_line_each(d: &Daemon, epoch: &str, seqs: &[i64]) {
    let log = d.log_text();
    for seq in seqs {
        let id = format!("id=gw-test-{epoch}-{seq} ");
        let n = log
            .lines()
            .filter(|l| l.contains(" ERROR ") && l.contains(&id))
            .count();
        assert_eq!(n, 1, "ERROR lines for {id}:\n{log}");
    }
}

fn valid(i: usize) -> Vec<u8> {
    format!("valid/{i:03}").into_bytes()
}

// ---- poison in the store --------------------------------------------------------------------

/// Rows in the store that no upstream accepts: a wildcard and a NUL in the topic (caught by the
/// forwarder's own check), a topic that is not UTF-8 (cannot even be read), and a message
/// larger than the upstream's `max_packet_size`. Over MQTT 3.1.1 Mosquitto cannot announce
/// that limit and disconnects whenever the message is sent: only the strike logic can find it
/// (reason `poison`); over MQTT 5 the limit is announced and the exact size check catches it
/// (reason `too-large`). The valid rows behind every one of them arrive, in order.
///
/// Then an ordinary outage as long as the quarantine took, beginning with messages in flight,
/// dead-letters nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_in_the_store_are_quarantined_and_an_outage_is_not() {
    let Some(m) = Mosquitto::start("max_packet_size 2000") else {
        return;
    };
    for (protocol, big_reason) in [("v3.1.1", "poison"), ("v5", "too-large")] {
        let collector = Collector::start(m.port, "up/#").await;
        let mut rows = Vec::new();
        let mut want = Vec::new();
        for i in 0..20 {
            match i {
                5 => rows.push(row("up/devices/+/x", "wildcard")),
                10 => rows.push(row("up/a\0b", "nul")),
                12 => rows.push(Planted {
                    topic: b"up/\xff\xfe".to_vec(),
                    payload: b"not-utf8".to_vec(),
                }),
                15 => rows.push(row("up/store/big", vec![b'B'; 3000])),
                _ => {}
            }
            rows.push(row("up/store/valid", valid(i)));
            want.push(valid(i));
        }
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let (mut d, _link, seqs) = daemon_with_rows(dir.path(), protocol, m.port, 32, &rows);
        let epoch = epoch(&d.db_path());
        let got = collector.wait_all(&want, WAIT).await;
        wait_metric(
            &d,
            &format!("edgeferry_dead_lettered_total{{reason=\"{big_reason}\"}}"),
            1,
        );
        let took = started.elapsed();
        eprintln!(
            "{protocol}: all valid rows delivered and the big one quarantined after {took:?}"
        );
        let payloads: Vec<Vec<u8>> = got
            .iter()
            .filter(|r| r.topic == "up/store/valid")
            .map(|r| r.payload.clone())
            .collect();
        assert_first_copies_in_order(&payloads, &want);
        assert_eq!(dead_lettered(&d, "invalid-topic"), 2);
        assert_eq!(dead_lettered(&d, "undecodable"), 1);
        let strikes = d.metric("edgeferry_upstream_poison_strikes_total");
        if big_reason == "poison" {
            assert_eq!(strikes, 3, "default upstream.poison_after");
        }
        assert_eq!(d.terminate(), Some(0));
        let db = d.db_path();
        assert!(queued_payloads(&db).is_empty(), "rows left in the queue");
        let by_seq = |i: usize| seqs[i];
        // Planted order: 0-4, wildcard (5), 5-9, nul (11), 10, 11, not-utf8 (14), 12-14,
        // big (18), 15-19.
        let expected = [
            (by_seq(5), "invalid-topic: wildcard"),
            (by_seq(11), "invalid-topic: NUL"),
            (by_seq(14), "undecodable: topic is not UTF-8"),
            (by_seq(18), big_reason),
        ];
        let dead = dead_letters(&db);
        assert_eq!(dead.len(), expected.len(), "{dead:?}");
        for ((seq, reason), (want_seq, prefix)) in dead.iter().zip(expected) {
            assert_eq!(*seq, want_seq);
            assert!(reason.starts_with(prefix), "seq {seq}: {reason:?}");
        }
        assert_one_error_line_each(&d, &epoch, &expected.map(|(s, _)| s));

        ordinary_outage_dead_letters_nothing(&m, protocol, took.max(Duration::from_secs(3))).await;
    }
}

/// Messages in flight when the link is cut, then the link down for `length`: the oldest of them
/// is sent alone first when the link returns, and is acknowledged. Nothing is dead-lettered and
/// nothing is struck against.
async fn ordinary_outage_dead_letters_nothing(
    m: &Mosquitto,
    protocol: &'static str,
    length: Duration,
) {
    let collector = Collector::start(m.port, "up/#").await;
    let link = LinkProxy::start(m.port, true);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new(protocol, link.port));
    wait_metric(&d, "edgeferry_upstream_connects_total", 1);
    // A silent link: what the daemon sends now stays unacknowledged, in flight.
    link.set_stalled(true);
    let want = payloads("outage", 100);
    publish_all(d.local, "dev-outage", "devices/outage", want.clone()).await;
    // Mosquitto's Receive Maximum (20) caps the MQTT 5 window: wait for less than that.
    wait_metric(&d, "edgeferry_published_total", 16);
    link.set_up(false);
    link.set_stalled(false);
    wait_metric(&d, "edgeferry_upstream_errors_total", 1);
    let cut = Instant::now();
    while cut.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    link.set_up(true);
    let got = collector.wait_all(&want, WAIT).await;
    let firsts: Vec<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
    assert_first_copies_in_order(&firsts, &want);
    for reason in [
        "poison",
        "refused",
        "too-large",
        "invalid-topic",
        "undecodable",
    ] {
        assert_eq!(
            dead_lettered(&d, reason),
            0,
            "{protocol}: outage dead-lettered ({reason})"
        );
    }
    assert_eq!(d.metric("edgeferry_upstream_poison_strikes_total"), 0);
    assert_eq!(d.metric("edgeferry_dead_letters"), 0);
    eprintln!(
        "{protocol}: outage of {length:?} with messages in flight: nothing dead-lettered, {} connections",
        d.metric("edgeferry_upstream_connects_total")
    );
}

// ---- refusing upstreams ---------------------------------------------------------------------

/// The reproduction from the issue: one small message, one of 3 KB, then 20 small ones, to a
/// Mosquitto that refuses messages over 2000 bytes. Over MQTT 5 (`message_size_limit`) it
/// answers PUBACK 0x95, which rumqttc cannot decode: the session fails, the big message is sent
/// alone, fails again, and is dead-lettered as too large. Over MQTT 3.1.1 `message_size_limit`
/// acknowledges and discards (nothing a client can see), so `max_packet_size`, which
/// disconnects, stands in: the message strikes out as poison. Either way the 20 small ones
/// arrive, resends are bounded by one window, and reconnects stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_upstreams_dead_letter_the_big_message_and_deliver_the_rest() {
    for (protocol, conf, reason) in [
        ("v5", "message_size_limit 2000", "too-large"),
        ("v3.1.1", "max_packet_size 2000", "poison"),
    ] {
        let Some(m) = Mosquitto::start(conf) else {
            return;
        };
        let collector = Collector::start(m.port, "up/#").await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = DaemonConfig::new(protocol, m.port);
        let d = Daemon::start(dir.path(), &cfg);
        let mut sent = vec![b"small/00".to_vec(), vec![b'B'; 3000]];
        let small: Vec<Vec<u8>> = (0..=20)
            .map(|i| format!("small/{i:02}").into_bytes())
            .collect();
        sent.extend(small[1..].iter().cloned());
        publish_all(d.local, "dev-refused", "devices/refused", sent).await;
        let got = collector.wait_all(&small, WAIT).await;
        wait_metric(
            &d,
            &format!("edgeferry_dead_lettered_total{{reason=\"{reason}\"}}"),
            1,
        );
        wait_drained(&d);
        let payloads: Vec<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
        assert_first_copies_in_order(&payloads, &small);
        let dups = payloads.len() - small.len();
        assert!(
            dups <= cfg.inflight as usize,
            "{protocol}: {dups} duplicates, more than one window"
        );
        // At most: the first connection, one more if the message that failed it was not the
        // only one in flight (or the first in flight was another), one per strike, the last.
        let connects = d.metric("edgeferry_upstream_connects_total");
        assert!(
            connects <= 3 + 3,
            "{protocol}: {connects} connections for one refused message"
        );
        eprintln!("{protocol} ({conf}): big message dead-lettered as {reason}; {dups} duplicates, {connects} connections");
    }
}

/// The size check is exact: with `max_packet_size 2000` announced in CONNACK, PUBLISH packets
/// of 1957 and 2000 bytes (id property included) are sent, one of 2001 is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_check_is_exact() {
    let Some(m) = Mosquitto::start("max_packet_size 2000") else {
        return;
    };
    let collector = Collector::start(m.port, "up/#").await;
    let dir = tempfile::tempdir().unwrap();
    let link = LinkProxy::start(m.port, false);
    let mut d = Daemon::start(dir.path(), &DaemonConfig::new("v5", link.port));
    assert_eq!(d.terminate(), Some(0));
    let db = d.db_path();
    let epoch = epoch(&db);
    let topic = "up/size";
    let targets = [1957usize, 2000, 2001];
    let seqs = plant(&db, &targets.map(|t| row(topic, format!("size-{t}"))));
    // Now that the ids are known, make each packet exactly its target size.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut want = Vec::new();
    for (t, seq) in targets.iter().zip(&seqs) {
        let id = format!("gw-test-{epoch}-{seq}");
        let size = |len: usize| {
            let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                vec![b'x'; len],
                Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: vec![("edgeferry-id".into(), id.clone())],
                    ..Default::default()
                }),
            );
            p.pkid = 1;
            p.size()
        };
        let len = (0..*t).find(|l| size(*l) == *t).unwrap();
        let mut payload = format!("size-{t}-").into_bytes();
        payload.resize(len, b'x');
        conn.execute(
            "UPDATE messages SET payload = ?1 WHERE seq = ?2",
            rusqlite::params![payload, seq],
        )
        .unwrap();
        if *t <= 2000 {
            want.push(payload);
        }
    }
    drop(conn);
    link.set_up(true);
    d.restart();
    collector.wait_all(&want, WAIT).await;
    wait_metric(&d, "edgeferry_dead_lettered_total{reason=\"too-large\"}", 1);
    assert_eq!(d.terminate(), Some(0));
    let dead = dead_letters(&db);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, seqs[2]);
    assert!(dead[0].1.contains("2001-byte"), "{:?}", dead[0].1);
}

// ---- a scripted MQTT 5 upstream -------------------------------------------------------------

fn number(payload: &[u8]) -> Option<u32> {
    std::str::from_utf8(payload)
        .ok()?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

/// The stall: an MQTT 5 upstream that acknowledges out of order (reversed batches of 8)
/// and refuses some messages (PUBACK 0x87). rumqttc parks a publish whose packet id is still
/// unacknowledged and, when that acknowledgement is a refusal, never releases it. The forwarder
/// never hands it such a publish: 20,000 rows drain without a single session restart, the
/// refused ones are dead-lettered, every other one is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_and_refusals_never_stall_the_queue() {
    const N: u32 = 20_000;
    fn refused(p: &[u8]) -> bool {
        number(p).is_some_and(|n| n % 997 == 3)
    }
    let up = Scripted::start(Script {
        ack_batch: 8,
        refuse: |p| refused(p).then_some(PubAckReason::NotAuthorized),
        ..Script::default()
    })
    .await;
    let rows: Vec<Planted> = (0..N)
        .map(|i| row("up/scripted", format!("s/{i:05}")))
        .collect();
    let expected_refused = rows.iter().filter(|r| refused(&r.payload)).count() as u64;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (mut d, _link, _) = daemon_with_rows(dir.path(), "v5", up.port, 64, &rows);
    let metrics = d.metrics;
    wait_for("20,000 rows to drain", WAIT, || {
        let m = scrape(metrics)?;
        let depth = *m.get("edgeferry_queue_depth")?;
        let refused = *m.get("edgeferry_dead_lettered_total{reason=\"refused\"}")?;
        (depth == 0 && refused == expected_refused).then_some(())
    });
    let took = started.elapsed();
    eprintln!(
        "20,000 rows with out-of-order acks and {expected_refused} refusals drained in {took:?}"
    );
    let log = d.log_text();
    assert!(
        !log.to_lowercase().contains("collision"),
        "collision in the log:\n{log}"
    );
    assert_eq!(
        d.metric("edgeferry_upstream_errors_total"),
        0,
        "a session was restarted:\n{log}"
    );
    {
        let seen = up.seen();
        let accepted: HashSet<&Vec<u8>> = seen.accepted.iter().collect();
        assert_eq!(accepted.len() as u64, N as u64 - expected_refused);
        assert_eq!(seen.refused.len() as u64, expected_refused);
    }
    assert_eq!(d.terminate(), Some(0));
    let dead = dead_letters(&d.db_path());
    assert_eq!(dead.len() as u64, expected_refused);
    assert!(dead
        .iter()
        .all(|(_, r)| r.starts_with("refused: upstream PUBACK reason NotAuthorized")));
}

/// An MQTT 5 DISCONNECT whose reason names the message (0x99 payload format invalid) is final:
/// the message is dead-lettered as soon as it is shown to be the one (at once when alone on
/// the wire), without strikes, and the rest arrive in order.
///
/// rumqttc 0.25 cannot decode a DISCONNECT that carries a reason code but no properties
/// (remaining length 1, as Mosquitto sends it): the reason is lost and the session looks merely
/// lost. Such a message is still quarantined, by strikes, as poison.
///
/// The upstream announces a Receive Maximum of 4, below the window, so the packet id cycle is
/// the broker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_reason_naming_the_message_is_final() {
    let up = Scripted::start(Script {
        disconnect: |p| match p {
            b"bad-format" => Some(Disconnect {
                reason_code: DisconnectReasonCode::PayloadFormatInvalid,
                properties: Some(DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some("payload is not UTF-8".into()),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            }),
            b"bad-bare" => Some(Disconnect::new(DisconnectReasonCode::PayloadFormatInvalid)),
            _ => None,
        },
        receive_max: Some(4),
        ..Script::default()
    })
    .await;
    let mut rows = Vec::new();
    let mut want = Vec::new();
    for i in 0..30 {
        match i {
            10 => rows.push(row("up/scripted", "bad-format")),
            20 => rows.push(row("up/scripted", "bad-bare")),
            _ => {}
        }
        rows.push(row("up/scripted", valid(i)));
        want.push(valid(i));
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut d, _link, seqs) = daemon_with_rows(dir.path(), "v5", up.port, 32, &rows);
    wait_metric(&d, "edgeferry_dead_lettered_total{reason=\"refused\"}", 1);
    wait_metric(&d, "edgeferry_dead_lettered_total{reason=\"poison\"}", 1);
    wait_drained(&d);
    // All three strikes are the bare DISCONNECT's; the one with a readable reason had none.
    assert_eq!(d.metric("edgeferry_upstream_poison_strikes_total"), 3);
    {
        let seen = up.seen();
        assert_first_copies_in_order(&seen.accepted, &want);
        assert!(!seen.accepted.iter().any(|p| p.starts_with(b"bad-")));
    }
    assert_eq!(d.terminate(), Some(0));
    let dead = dead_letters(&d.db_path());
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, seqs[10]);
    assert!(
        dead[0].1.starts_with(
            "refused: upstream sent DISCONNECT with reason PayloadFormatInvalid (0x99)"
        ),
        "{:?}",
        dead[0].1
    );
    assert_eq!(dead[1].0, seqs[21]);
    assert!(dead[1].1.starts_with("poison: "), "{:?}", dead[1].1);
}
