//! Serial ingestion end to end: the real daemon reading pseudo-terminals that stand in for
//! devices, a real upstream broker (rumqttd in-process) and a collector on it.
//!
//! Each "device" is a socat pty pair: the daemon opens `DIR/<name>` (as it would /dev/ttyUSB0),
//! the test writes and reads `DIR/<name>-peer`. Killing socat hangs up the daemon's side and
//! removes the link, which is what unplugging a USB adapter looks like; starting it again on the
//! same link path is the replug. Every socat is stopped by PID; every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use edgeferry::codec::{encode, Decoded, Decoder, Framing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

// ---- devices ------------------------------------------------------------------------------

/// A socat pty pair: `dev` for the daemon, `peer` for the test's device.
struct Pty {
    child: Option<Child>,
    dev: PathBuf,
    peer: PathBuf,
}

impl Pty {
    fn start(dir: &Path, name: &str) -> Pty {
        let dev = dir.join(name);
        let peer = dir.join(format!("{name}-peer"));
        let mut pty = Pty {
            child: None,
            dev,
            peer,
        };
        pty.restart();
        pty
    }

    /// Start socat (again) on the same link paths; returns once both links resolve.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the pty first");
        let child = Command::new("socat")
            .arg("pty,raw,echo=0,link=".to_string() + &self.dev.to_string_lossy())
            .arg("pty,raw,echo=0,link=".to_string() + &self.peer.to_string_lossy())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat (apt-get install socat)");
        self.child = Some(child);
        let (dev, peer) = (self.dev.clone(), self.peer.clone());
        wait_for("socat pty links", WAIT, || {
            (dev.exists() && peer.exists()).then_some(())
        });
    }

    /// Unplug: SIGTERM (socat then removes its links), bounded wait, SIGKILL as a fallback.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !matches!(c.try_wait(), Ok(Some(_))) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.dev);
        let _ = std::fs::remove_file(&self.peer);
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The device end of a pty, with a decoder for what the daemon writes back.
struct Device {
    stream: SerialStream,
    decoder: Decoder,
    frames: std::collections::VecDeque<Bytes>,
}

impl Device {
    fn open(pty: &Pty, framing: Framing) -> Device {
        let stream = tokio_serial::new(pty.peer.to_string_lossy(), 115_200)
            .open_native_async()
            .expect("open the device side of the pty");
        Device {
            stream,
            decoder: Decoder::new(framing, 4096).unwrap(),
            frames: Default::default(),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("device write timed out")
            .expect("device write");
    }

    async fn send(&mut self, payload: &[u8]) {
        let bytes = encode(self.decoder.framing(), payload).unwrap();
        self.send_raw(&bytes).await;
    }

    /// The next frame the daemon wrote, or None after `limit`.
    async fn recv(&mut self, limit: Duration) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = [0u8; 512];
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Some(f);
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    for d in self.decoder.feed(&buf[..n]) {
                        match d {
                            Decoded::Frame(f) => self.frames.push_back(f),
                            Decoded::Bad(b) => panic!("daemon wrote a bad frame: {b:?}"),
                        }
                    }
                }
                Ok(Ok(_)) => panic!("device side hung up"),
                Ok(Err(e)) => panic!("device read: {e}"),
                Err(_) => return None,
            }
        }
    }
}

// ---- daemon configuration -----------------------------------------------------------------

/// A `[[serial]]` table for `pty` with `extra` lines.
fn serial_table(name: &str, pty: &Pty, framing: &str, extra: &str) -> String {
    format!(
        "[[serial]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"{framing}\"\ntopic = \"serial/{{topic}}\"\n{extra}\n",
        pty.dev.display()
    )
}

/// A daemon with only serial ports (no MQTT route) unless `routes` is given.
fn start_daemon(dir: &Path, up: &Upstream, tables: &[String], routes: &str) -> Daemon {
    let mut cfg = DaemonConfig::new("v5", up.v5);
    cfg.routes = routes.to_string();
    cfg.extra = tables.concat();
    Daemon::start(dir, &cfg)
}

fn bad_frames(d: &Daemon, kind: &str) -> u64 {
    d.metric(&format!(
        "edgeferry_serial_bad_frames_total{{kind=\"{kind}\"}}"
    ))
}

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// A CBOR text string item.
fn cbor_text(s: &str) -> Vec<u8> {
    assert!(s.len() < 24);
    let mut v = vec![0x60 | s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

/// Publish one QoS 1 message on the upstream broker (as the cloud side would).
async fn publish_upstream(port: u16, topic: &str, payload: &[u8]) {
    let mut o = rumqttc::MqttOptions::new(format!("cloud-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 8);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("cloud client: {e}"),
            Err(_) => panic!("cloud client: no PUBACK"),
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// Payloads received on `topic`, in arrival order.
fn on_topic(got: &[Received], topic: &str) -> Vec<Vec<u8>> {
    got.iter()
        .filter(|r| r.topic == topic)
        .map(|r| r.payload.clone())
        .collect()
}

// ---- tests ---------------------------------------------------------------------------------

/// Every framing, one port each, into the queue and upstream, in order, with the topic template
/// applied; frames split across writes at odd places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_reaches_the_queue_and_upstream_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "serial/#").await;
    let framings = [
        ("lines", Framing::Lines),
        ("cobs", Framing::Cobs),
        ("slip", Framing::Slip),
        ("length", Framing::Length { crc: true }),
        ("length-nocrc", Framing::Length { crc: false }),
        ("cbor", Framing::Cbor),
    ];
    let ptys: Vec<Pty> = framings
        .iter()
        .map(|(name, _)| Pty::start(dir.path(), &format!("tty-{name}")))
        .collect();
    let tables: Vec<String> = framings
        .iter()
        .zip(&ptys)
        .map(|((name, _), pty)| serial_table(&format!("p-{name}"), pty, name, ""))
        .collect();
    let d = start_daemon(dir.path(), &up, &tables, "");
    d.wait_metric("edgeferry_serial_opens_total", framings.len() as u64);

    let mut want_all = Vec::new();
    for ((name, framing), pty) in framings.iter().zip(&ptys) {
        let payloads: Vec<Vec<u8>> = (0..25)
            .map(|i| {
                let text = format!("{name}/{i:04}");
                if *framing == Framing::Cbor {
                    cbor_text(&format!("c{i:04}"))
                } else {
                    text.into_bytes()
                }
            })
            .collect();
        let mut wire = Vec::new();
        for p in &payloads {
            wire.extend(encode(*framing, p).unwrap());
        }
        let mut dev = Device::open(pty, *framing);
        // Uneven chunks: a frame boundary must not depend on how the driver's reads split.
        for chunk in wire.chunks(7) {
            dev.send_raw(chunk).await;
        }
        want_all.push((format!("serial/p-{name}"), payloads));
    }
    let every: Vec<Vec<u8>> = want_all.iter().flat_map(|(_, p)| p.clone()).collect();
    let got = collector.wait_all(&every, WAIT).await;
    for (topic, payloads) in &want_all {
        assert_eq!(
            &on_topic(&got, topic),
            payloads,
            "{topic}: wrong frames or order"
        );
    }
    assert_eq!(d.metric("edgeferry_serial_frames_total"), 150);
    for kind in [
        "oversized",
        "bad_crc",
        "bad_escape",
        "truncated",
        "malformed",
    ] {
        assert_eq!(bad_frames(&d, kind), 0, "{kind}: no bad frames were sent");
    }
}

/// Garbage, oversized frames, bad CRCs, bad escapes and truncated frames between good frames:
/// the good ones all arrive, nothing spurious does, each fault is counted by kind, and the log
/// gets one WARN summary per port, not one per bad frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_oversized_and_corrupt_frames_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "serial/#").await;
    let (len_pty, txt_pty, slip_pty, cobs_pty) = (
        Pty::start(dir.path(), "tty-len"),
        Pty::start(dir.path(), "tty-txt"),
        Pty::start(dir.path(), "tty-slip"),
        Pty::start(dir.path(), "tty-cobs"),
    );
    let tables = [
        serial_table("len", &len_pty, "length", "max_frame = \"256\""),
        serial_table("txt", &txt_pty, "lines", "max_frame = \"32\""),
        serial_table("slip", &slip_pty, "slip", ""),
        serial_table("cobs", &cobs_pty, "cobs", ""),
    ];
    let d = start_daemon(dir.path(), &up, &tables, "");
    d.wait_metric("edgeferry_serial_opens_total", 4);

    let good = |port: &str, i: usize| format!("{port}-good-{i}").into_bytes();
    let length = Framing::Length { crc: true };

    // length: line noise between frames (no sync pair: malformed), a bad CRC, an oversized one.
    let mut dev = Device::open(&len_pty, length);
    let mut wire = encode(length, &good("len", 0)).unwrap();
    wire.extend_from_slice(b"\x13\x37 line noise \xff\x00\xa5 more noise");
    wire.extend(encode(length, &good("len", 1)).unwrap());
    let mut corrupt = encode(length, b"flipped bit").unwrap();
    corrupt[6] ^= 0x04;
    wire.extend(corrupt);
    wire.extend(encode(length, &good("len", 2)).unwrap());
    wire.extend(encode(length, &[0x55; 300]).unwrap());
    wire.extend(encode(length, &good("len", 3)).unwrap());
    dev.send_raw(&wire).await;

    // lines: a line longer than max_frame, then binary noise on its own line is still a line
    // (lines cannot tell noise from data), so only the oversized one is an error.
    let mut dev = Device::open(&txt_pty, Framing::Lines);
    let mut wire = Vec::new();
    wire.extend(encode(Framing::Lines, &good("txt", 0)).unwrap());
    wire.extend(vec![b'x'; 100]);
    wire.push(b'\n');
    wire.extend(encode(Framing::Lines, &good("txt", 1)).unwrap());
    dev.send_raw(&wire).await;

    // slip: an escape followed by a byte that is not ESC_END/ESC_ESC.
    let mut dev = Device::open(&slip_pty, Framing::Slip);
    let mut wire = encode(Framing::Slip, &good("slip", 0)).unwrap();
    wire.extend_from_slice(&[0xC0, b'a', 0xDB, b'z', b'b', 0xC0]);
    wire.extend(encode(Framing::Slip, &good("slip", 1)).unwrap());
    dev.send_raw(&wire).await;

    // cobs: a 0x00 inside a block (the device rebooted mid-frame).
    let mut dev = Device::open(&cobs_pty, Framing::Cobs);
    let mut wire = encode(Framing::Cobs, &good("cobs", 0)).unwrap();
    wire.extend_from_slice(&[0x09, b'c', b'u', b't', 0x00]);
    wire.extend(encode(Framing::Cobs, &good("cobs", 1)).unwrap());
    // A partial frame and then silence: flushed after idle_flush, counted as truncated.
    wire.extend_from_slice(&[0x05, b'h', b'a']);
    dev.send_raw(&wire).await;

    let mut want = Vec::new();
    for (port, n) in [("len", 4), ("txt", 2), ("slip", 2), ("cobs", 2)] {
        want.extend((0..n).map(|i| good(port, i)));
    }
    let got = collector.wait_all(&want, WAIT).await;
    // Nothing spurious: every frame upstream is one of the good ones.
    let metric_wait = |name: String, at_least: u64| d.wait_metric(&name, at_least);
    metric_wait(
        "edgeferry_serial_bad_frames_total{kind=\"truncated\"}".into(),
        2,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_now = collector.snapshot();
    assert!(got_now.len() >= got.len());
    for r in &got_now {
        assert!(
            want.contains(&r.payload),
            "spurious frame upstream on {}: {:?}",
            r.topic,
            String::from_utf8_lossy(&r.payload)
        );
    }
    assert_eq!(got_now.len(), want.len(), "each good frame exactly once");
    assert_eq!(
        bad_frames(&d, "malformed"),
        1,
        "one run of noise is one error"
    );
    assert_eq!(bad_frames(&d, "bad_crc"), 1);
    assert_eq!(bad_frames(&d, "oversized"), 2, "one length frame, one line");
    assert_eq!(bad_frames(&d, "bad_escape"), 1);
    assert_eq!(bad_frames(&d, "truncated"), 2, "cobs cut + idle flush");
    let log = d.log_text();
    for port in ["len", "txt", "slip", "cobs"] {
        let warns = log
            .lines()
            .filter(|l| {
                l.contains("WARN") && l.contains(&format!("serial port {port}: bad frames"))
            })
            .count();
        assert_eq!(
            warns, 1,
            "{port}: one WARN summary per minute, not one per bad frame"
        );
    }
}

/// With seq + ack, the device gets its ack after the commit, retransmits of the same sequence
/// number are acknowledged again but forwarded once, and the dedup window survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_follow_commit_and_retransmits_are_forwarded_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "serial/#").await;
    let bin_pty = Pty::start(dir.path(), "tty-bin");
    let txt_pty = Pty::start(dir.path(), "tty-json");
    let tables = [
        serial_table("bin", &bin_pty, "cobs", "seq = \"be32\"\nack = true"),
        serial_table("json", &txt_pty, "lines", "seq = \"json:/seq\"\nack = true"),
    ];
    let mut d = start_daemon(dir.path(), &up, &tables, "");
    d.wait_metric("edgeferry_serial_opens_total", 2);

    let mut bin = Device::open(&bin_pty, Framing::Cobs);
    let mut txt = Device::open(&txt_pty, Framing::Lines);
    let frame = |seq: u32, body: &str| {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(body.as_bytes());
        v
    };
    // Binary: the ack is the 4 sequence bytes, COBS-framed.
    for (seq, body) in [(1, "first"), (1, "first"), (2, "second"), (1, "first")] {
        bin.send(&frame(seq, body)).await;
        let ack = bin.recv(WAIT).await.expect("binary ack");
        assert_eq!(ack.as_ref(), seq.to_be_bytes(), "ack carries the seq bytes");
    }
    // JSON lines: the ack is "ACK <seq>".
    for seq in [7, 7, 8] {
        txt.send(format!("{{\"seq\":{seq},\"v\":\"x{seq}\"}}").as_bytes())
            .await;
        let ack = txt.recv(WAIT).await.expect("json ack");
        assert_eq!(ack.as_ref(), format!("ACK {seq}").as_bytes());
    }
    // A frame without a sequence number is queued (without dedup) but not acknowledged.
    txt.send(b"{\"v\":\"no-seq\"}").await;
    assert_eq!(txt.recv(Duration::from_millis(500)).await, None);

    let want = vec![
        frame(1, "first"),
        frame(2, "second"),
        b"{\"seq\":7,\"v\":\"x7\"}".to_vec(),
        b"{\"seq\":8,\"v\":\"x8\"}".to_vec(),
        b"{\"v\":\"no-seq\"}".to_vec(),
    ];
    collector.wait_all(&want, WAIT).await;
    assert!(d.metric("edgeferry_ingest_duplicates_total") >= 3);
    assert_eq!(d.metric("edgeferry_serial_acks_total"), 7);

    // Restart the daemon: the dedup window is persisted, so a retransmit of a committed frame
    // after the restart is still acknowledged and still not forwarded again.
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    d.wait_metric("edgeferry_serial_opens_total", 2);
    bin.send(&frame(2, "second")).await;
    let ack = bin.recv(WAIT).await.expect("ack after restart");
    assert_eq!(ack.as_ref(), 2u32.to_be_bytes());
    bin.send(&frame(3, "third")).await;
    assert_eq!(
        bin.recv(WAIT).await.expect("ack").as_ref(),
        3u32.to_be_bytes()
    );
    let mut want_after = want.clone();
    want_after.push(frame(3, "third"));
    let got = collector.wait_all(&want_after, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = collector.snapshot().len().max(got.len());
    assert_eq!(got, want_after.len(), "every frame forwarded exactly once");
}

/// Unplug (socat killed: the daemon's tty hangs up and the path disappears) and replug on the
/// same path: the port is reported lost once and open again once, MQTT ingest is unaffected
/// meanwhile, and frames after the replug are committed. Prints replug-to-first-commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_and_replug_recovers_and_logs_each_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "#").await;
    let mut pty = Pty::start(dir.path(), "ttyUSB-plug");
    let tables = [serial_table(
        "plug",
        &pty,
        "lines",
        "seq = \"json:/seq\"\nack = true\nreopen_initial = \"200ms\"\nreopen_max = \"2s\"",
    )];
    let d = start_daemon(
        dir.path(),
        &up,
        &tables,
        "[[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\n",
    );
    d.wait_metric("edgeferry_serial_opens_total", 1);
    let mut dev = Device::open(&pty, Framing::Lines);
    dev.send(b"{\"seq\":1}").await;
    assert_eq!(dev.recv(WAIT).await.expect("ack 1").as_ref(), b"ACK 1");
    drop(dev);

    pty.stop();
    assert!(!pty.dev.exists(), "unplugged: the path is gone");
    // Other sources keep working while the port is gone.
    publish_all(
        d.local,
        "mqtt-dev",
        "devices/m/t",
        vec![b"mqtt-during-unplug".to_vec()],
    )
    .await;
    collector
        .wait_all(&[b"mqtt-during-unplug".to_vec()], WAIT)
        .await;
    // Several failed reopen attempts (backoff 200ms..2s) happen meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = d.metric("edgeferry_serial_opens_total");
    assert_eq!(before, 1, "the port cannot open while unplugged");

    pty.restart();
    let replugged = Instant::now();
    let mut dev = Device::open(&pty, Framing::Lines);
    // Like a real device: retransmit every 100 ms until acknowledged.
    let mut acked = None;
    while replugged.elapsed() < WAIT {
        dev.send(b"{\"seq\":2}").await;
        if let Some(ack) = dev.recv(Duration::from_millis(100)).await {
            acked = Some((ack, replugged.elapsed()));
            break;
        }
    }
    let (ack, took) = acked.expect("no ack after replug");
    assert_eq!(ack.as_ref(), b"ACK 2");
    println!("replug to first commit (ack received): {took:?}");
    collector.wait_all(&[b"{\"seq\":2}".to_vec()], WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copies = on_topic(&collector.snapshot(), "serial/plug")
        .iter()
        .filter(|p| p.as_slice() == b"{\"seq\":2}")
        .count();
    assert_eq!(copies, 1, "retransmits before the ack are deduplicated");

    let log = d.log_text();
    assert_eq!(count_lines(&log, "serial port plug lost"), 1, "log:\n{log}");
    assert_eq!(count_lines(&log, "serial port plug open"), 2, "log:\n{log}");
    assert_eq!(
        count_lines(&log, "serial port plug absent"),
        0,
        "log:\n{log}"
    );
    assert!(pty.pid().is_some());
}

/// A port whose device is missing at start-up is reported absent once and opened when it
/// appears; the daemon runs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_absent_at_startup_is_opened_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "serial/#").await;
    let mut pty = Pty::start(dir.path(), "ttyACM-late");
    pty.stop();
    let tables = [serial_table("late", &pty, "slip", "reopen_max = \"5s\"")];
    let d = start_daemon(dir.path(), &up, &tables, "");
    wait_for("absent WARN", WAIT, || {
        d.log_text()
            .contains("serial port late absent")
            .then_some(())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    pty.restart();
    d.wait_metric("edgeferry_serial_opens_total", 1);
    let mut dev = Device::open(&pty, Framing::Slip);
    dev.send(b"hello from late").await;
    collector
        .wait_all(&[b"hello from late".to_vec()], WAIT)
        .await;
    let log = d.log_text();
    assert_eq!(
        count_lines(&log, "serial port late absent"),
        1,
        "log:\n{log}"
    );
}

/// Upstream messages on a port's downlink topic are framed with the port's framing and written
/// to the device; one the framing cannot carry (a line break on a lines port) is dropped and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_messages_are_framed_and_written_to_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let slip_pty = Pty::start(dir.path(), "tty-dl-slip");
    let txt_pty = Pty::start(dir.path(), "tty-dl-txt");
    let tables = [
        serial_table("dlslip", &slip_pty, "slip", "downlink = \"cmd/slip\""),
        serial_table("dltxt", &txt_pty, "lines", "downlink = \"cmd/txt\""),
    ];
    let d = start_daemon(dir.path(), &up, &tables, "");
    d.wait_metric("edgeferry_serial_opens_total", 2);
    d.wait_metric("edgeferry_upstream_connected", 1);
    let mut slip = Device::open(&slip_pty, Framing::Slip);
    let mut txt = Device::open(&txt_pty, Framing::Lines);

    // The daemon subscribes right after connecting; publish until the first one gets through.
    let payload = [0xC0u8, 0xDB, b'r', b'e', b'b', b'o', b'o', b't'];
    let mut first = None;
    for _ in 0..50 {
        publish_upstream(up.v4, "cmd/slip", &payload).await;
        if let Some(f) = slip.recv(Duration::from_millis(300)).await {
            first = Some(f);
            break;
        }
    }
    assert_eq!(
        first
            .expect("downlink never reached the slip device")
            .as_ref(),
        payload,
        "SLIP escapes END and ESC and the device decodes the exact payload"
    );

    let dropped = d.metric("edgeferry_downlink_dropped_total");
    publish_upstream(up.v4, "cmd/txt", b"two\nlines").await;
    wait_for("downlink drop counted", WAIT, || {
        (d.metric("edgeferry_downlink_dropped_total") > dropped).then_some(())
    });
    publish_upstream(up.v4, "cmd/txt", b"set rate 5").await;
    let got = txt.recv(WAIT).await.expect("lines downlink");
    assert_eq!(
        got.as_ref(),
        b"set rate 5",
        "the unframeable message was never written"
    );
    assert!(d.log_text().contains("cannot be framed as lines"));
}

// ---- measurement ----------------------------------------------------------------------------

/// CPU time (utime + stime, in clock ticks) of a process, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12)
}

/// The daemon's PID, found by its (unique) config path on the command line.
fn daemon_pid(d: &Daemon) -> u32 {
    let needle = d.config_path.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("edgeferry") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("daemon process not found");
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Throughput and CPU per frame with 64-byte lines frames, per configured baud rate, and the
/// replug-to-first-commit time. A pty ignores the baud rate, so "unpaced" is the pty's (and the
/// daemon's) ceiling, and "paced" sends at the configured line rate (10 bits per byte, 8N1).
/// Run: cargo test --release --test serial -- --ignored --nocapture measure
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_serial_throughput_cpu_and_replug() {
    let ticks = clock_ticks_per_sec();
    for baud in [115_200u32, 921_600] {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::start(BrokerKind::Rumqttd);
        let collector = Collector::start(up.v5, "serial/#").await;
        let pty = Pty::start(dir.path(), "tty-bench");
        let tables = [serial_table(
            "bench",
            &pty,
            "lines",
            &format!("baud = {baud}"),
        )];
        let d = start_daemon(dir.path(), &up, &tables, "");
        d.wait_metric("edgeferry_serial_opens_total", 1);
        let pid = daemon_pid(&d);
        let mut dev = Device::open(&pty, Framing::Lines);
        // 63 payload bytes + '\n' = 64 bytes on the wire per frame.
        let frame = |i: u64| {
            let mut p = format!("{i:012}-").into_bytes();
            p.resize(63, b'x');
            p.push(b'\n');
            p
        };
        let wire_per_sec = f64::from(baud) / 10.0;
        let ceiling = wire_per_sec / 64.0;
        let mut sent = 0u64;
        // Paced first, on a fresh daemon, so no backlog skews its CPU figure; then a fixed burst
        // as fast as the pty takes it. Each phase's CPU is counted until the upstream
        // acknowledged every frame, so it covers decode, commit and forwarding.
        for (mode, paced) in [("paced at line rate", true), ("unpaced burst", false)] {
            let frames0 = d.metric("edgeferry_serial_frames_total");
            let committed0 = d.metric("edgeferry_committed_total");
            let acked0 = d.metric("edgeferry_acked_total");
            let cpu0 = cpu_ticks(pid);
            let start = Instant::now();
            let mut n = 0u64;
            loop {
                if paced && start.elapsed() >= Duration::from_secs(5) {
                    break;
                }
                if !paced && n >= 100_000 {
                    break;
                }
                let mut batch = Vec::with_capacity(64 * 16);
                for _ in 0..16 {
                    batch.extend(frame(sent));
                    sent += 1;
                    n += 1;
                }
                dev.send_raw(&batch).await;
                if paced {
                    let due = Duration::from_secs_f64(n as f64 / ceiling);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            d.wait_metric("edgeferry_committed_total", committed0 + n);
            let to_commit = start.elapsed().as_secs_f64();
            let cpu_commit = (cpu_ticks(pid) - cpu0) as f64 / ticks;
            d.wait_metric("edgeferry_acked_total", acked0 + n);
            let to_ack = start.elapsed().as_secs_f64();
            let cpu = (cpu_ticks(pid) - cpu0) as f64 / ticks;
            let frames = d.metric("edgeferry_serial_frames_total") - frames0;
            println!(
                "baud {baud} {mode}: {frames} frames committed in {to_commit:.2}s = {:.0} frames/s \
                 (line-rate ceiling {ceiling:.0} frames/s); daemon CPU to commit {:.1} us/frame; \
                 all forwarded after {to_ack:.2}s: CPU {cpu:.2}s = {:.1} us/frame end to end, {:.1}% of one core",
                frames as f64 / to_commit,
                cpu_commit * 1e6 / frames.max(1) as f64,
                cpu * 1e6 / frames.max(1) as f64,
                cpu * 100.0 / to_ack
            );
        }
        drop(collector);
        drop(dev);
        drop(d);
    }

    // Replug to first commit, several times.
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let mut pty = Pty::start(dir.path(), "tty-replug");
    let tables = [serial_table(
        "replug",
        &pty,
        "lines",
        "seq = \"json:/seq\"\nack = true",
    )];
    let d = start_daemon(dir.path(), &up, &tables, "");
    d.wait_metric("edgeferry_serial_opens_total", 1);
    let mut times = Vec::new();
    for round in 0..5u32 {
        pty.stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        pty.restart();
        let t0 = Instant::now();
        let mut dev = Device::open(&pty, Framing::Lines);
        loop {
            assert!(t0.elapsed() < WAIT, "no ack after replug");
            dev.send(format!("{{\"seq\":{round}}}").as_bytes()).await;
            if dev.recv(Duration::from_millis(20)).await.is_some() {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    println!("replug to first commit (ack at the device), 5 replugs after 2s unplugged: {times:?}");
}
