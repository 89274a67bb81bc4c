//! No device can crash edgeferry: one end-to-end test per input that used to panic the embedded
//! broker (rumqttd 0.20.0; vendor/rumqttd/PATCHES.md), with the exact bytes and the real clients
//! that triggered it, against the real binary.
//!
//! Each test asserts that the daemon is still up and logged no panic (every panic aborts it, in
//! debug builds too: `telemetry::install_panic_hook`), that the devices connected before the
//! attack still work, that their messages and a new device's arrive upstream, and that only the
//! offending connection was closed; where the input was valid MQTT, that it was served instead.
//! The tests speak MQTT over sockets only, so they hold for whatever decodes device bytes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

// ---- a device that controls every byte -----------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// One packet from `s`: (first byte, body).
fn read_packet(s: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).map_err(|e| format!("read: {e}"))?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
        len |= ((b[0] & 0x7f) as usize) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("malformed remaining length".into());
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("read: {e}"))?;
    Ok((first[0], body))
}

fn try_open(port: u16) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr(port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    Ok(s)
}

fn open(port: u16) -> TcpStream {
    try_open(port).expect("connect to the daemon")
}

/// An MQTT 3.1.1 or 5 device over a plain socket.
struct Raw {
    s: TcpStream,
    v5: bool,
    pkid: u16,
}

impl Raw {
    /// CONNECT as `client_id` with a clean session; Ok once a successful CONNACK arrived,
    /// Err(why) if refused.
    fn connect(port: u16, client_id: &str, v5: bool) -> Result<Raw, String> {
        Raw::connect_session(port, client_id, v5, true)
    }

    /// CONNECT, with `clean` false asking the broker to keep the session.
    fn connect_session(port: u16, client_id: &str, v5: bool, clean: bool) -> Result<Raw, String> {
        let mut s = try_open(port)?;
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        body.push(if clean { 0x02 } else { 0x00 });
        body.extend_from_slice(&30u16.to_be_bytes());
        if v5 && clean {
            body.push(0); // no properties
        } else if v5 {
            body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]); // session expiry 60 s
        }
        put_str(&mut body, client_id.as_bytes());
        s.write_all(&frame(0x10, &body))
            .map_err(|e| format!("write: {e}"))?;
        let (first, body) = read_packet(&mut s)?;
        if first != 0x20 {
            return Err(format!("expected CONNACK, got {first:#04x}"));
        }
        match body.get(1) {
            Some(0) => Ok(Raw { s, v5, pkid: 0 }),
            code => Err(format!("CONNACK code {code:?}")),
        }
    }

    /// SUBSCRIBE to `filter` with QoS 1; Ok once the SUBACK granted it.
    fn subscribe_qos1(&mut self, filter: &str) -> Result<(), String> {
        let mut body = vec![0, 1];
        if self.v5 {
            body.push(0);
        }
        put_str(&mut body, filter.as_bytes());
        body.push(1);
        self.s
            .write_all(&frame(0x82, &body))
            .map_err(|e| format!("write: {e}"))?;
        loop {
            let (first, body) = read_packet(&mut self.s)?;
            if first == 0x90 {
                return match body.last() {
                    Some(1) => Ok(()),
                    code => Err(format!("SUBACK code {code:?}")),
                };
            }
        }
    }

    fn ping(&mut self) -> Result<(), String> {
        self.s
            .write_all(&[0xc0, 0x00])
            .map_err(|e| format!("write: {e}"))?;
        loop {
            if read_packet(&mut self.s)?.0 == 0xd0 {
                return Ok(());
            }
        }
    }

    /// Publish with QoS 1 and wait for the PUBACK.
    fn publish_qos1(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        self.pkid = self.pkid.wrapping_add(1).max(1);
        let mut body = Vec::new();
        put_str(&mut body, topic.as_bytes());
        body.extend_from_slice(&self.pkid.to_be_bytes());
        if self.v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        self.s
            .write_all(&frame(0x32, &body))
            .map_err(|e| format!("write: {e}"))?;
        loop {
            let (first, body) = read_packet(&mut self.s)?;
            if first >> 4 == 4 && body.get(..2) == Some(&self.pkid.to_be_bytes()[..]) {
                return Ok(());
            }
        }
    }
}

/// Whether the peer closes `s` (end of stream or reset) within `limit`; whatever it sends first
/// is discarded.
fn closed_by_peer(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

// ---- mosquitto's clients -------------------------------------------------------------------

/// A mosquitto_sub or mosquitto_pub process with its output lines collected; killed on drop.
struct Mosq {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Mosq {
    /// `bin` with `args`, split on whitespace (no argument in these tests has a space).
    fn spawn(bin: &str, args: &str) -> Mosq {
        // stdbuf: line-buffered stdout, so each line is seen when printed, not at exit.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(bin)
            .args(args.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (apt-get install mosquitto-clients): {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Mosq { child, lines }
    }

    /// A subscriber (`-d` prints its SUBACK), returned once it is subscribed. Messages are
    /// printed as "MSG_<topic>_<payload>".
    fn subscriber(port: u16, args: &str) -> Mosq {
        let args = format!("-h 127.0.0.1 -p {port} -d -F MSG_%t_%p {args}");
        let m = Mosq::spawn("mosquitto_sub", &args);
        m.wait_line("its SUBACK", |l| l.contains("received SUBACK"));
        m
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn has_line(&self, line: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == line)
    }

    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let lines = self.lines.clone();
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(what, WAIT, || {
                lines.lock().unwrap().iter().find(|l| pred(l)).cloned()
            })
        }));
        found.unwrap_or_else(|_| panic!("no line with {what}; output:\n{}", self.text()))
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        wait_for("mosquitto client to exit", WAIT, || {
            child.try_wait().ok().flatten()
        })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosq {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---- the scene: a daemon, its upstream, and devices that must not notice the attack ----------

struct Scene {
    daemon: Daemon,
    collector: Collector,
    /// Connected before the attack, one per listener; they must still work after it.
    bystanders: Vec<Raw>,
    _up: Upstream,
    _dir: tempfile::TempDir,
}

impl Scene {
    /// A daemon forwarding `devices/#` (plus `routes`) to an upstream rumqttd, with
    /// `local_extra` in its `[local]` table, and one v3.1.1 and one v5 device connected.
    async fn start(routes: &str, local_extra: &str) -> Scene {
        let up = Upstream::start(BrokerKind::Rumqttd);
        let collector = Collector::start(up.v5, "up/#").await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DaemonConfig::new("v5", up.v5);
        cfg.routes += routes;
        cfg.local_extra = local_extra.into();
        let daemon = Daemon::start(dir.path(), &cfg);
        let bystanders = vec![
            Raw::connect(daemon.local, "bystander-v4", false).expect("v3.1.1 bystander"),
            Raw::connect(daemon.local_v5, "bystander-v5", true).expect("v5 bystander"),
        ];
        Scene {
            daemon,
            collector,
            bystanders,
            _up: up,
            _dir: dir,
        }
    }

    fn assert_up(&mut self, what: &str) {
        if let Some(status) = self.daemon.exited() {
            panic!(
                "{what}: the daemon exited ({status}); log:\n{}",
                self.daemon.log_text()
            );
        }
        let log = self.daemon.log_text();
        assert!(
            !log.contains("panicked") && !log.contains("panic:"),
            "{what}: the daemon panicked; log:\n{log}"
        );
    }

    /// Wait for `sub` to print `line`, failing early (with the daemon's log) if the daemon dies.
    fn expect_line(&mut self, sub: &Mosq, line: &str) {
        let deadline = Instant::now() + WAIT;
        while !sub.has_line(line) {
            self.assert_up(&format!("waiting for {line:?}"));
            assert!(
                Instant::now() < deadline,
                "subscriber never printed {line:?}; output:\n{}\nlog:\n{}",
                sub.text(),
                self.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon is up and logged no panic; the devices connected before the attack kept their
    /// connections; their messages and a new device's arrive upstream.
    async fn assert_survived(&mut self, what: &str) {
        self.assert_up(what);
        let mut want = Vec::new();
        for (i, b) in self.bystanders.iter_mut().enumerate() {
            b.ping().unwrap_or_else(|e| {
                panic!("{what}: bystander {i} lost its connection to the attack: {e}")
            });
            let payload = format!("{what}/bystander-{i}").into_bytes();
            b.publish_qos1("devices/bystander", &payload)
                .unwrap_or_else(|e| panic!("{what}: bystander {i} cannot publish: {e}"));
            want.push(payload);
        }
        let fresh = format!("{what}/fresh").into_bytes();
        publish_all(
            self.daemon.local,
            format!("fresh-{what}"),
            "devices/fresh",
            vec![fresh.clone()],
        )
        .await;
        want.push(fresh);
        self.collector.wait_all(&want, WAIT).await;
        self.assert_up(what);
    }
}

/// Route for topics that start with a multi-byte character, so those reach upstream too.
const ROUTE_E: &str = "[[route]]\nfrom = \"é/#\"\nto = \"up/{topic}\"\n";

// ---- one test per crash trigger ------------------------------------------------------------

/// rumqttd's topic matcher sliced `topic[..1]`, which panics when the topic starts with a
/// multi-byte character. "é/x" is a valid topic: it must be delivered, locally and upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_on_topic_starting_with_multibyte_char_is_delivered() {
    let mut scene = Scene::start(ROUTE_E, "").await;
    let sub = Mosq::subscriber(scene.daemon.local, "-V mqttv311 -t é/#");
    for (port, version, payload) in [
        (scene.daemon.local, "mqttv311", "hi-v4"),
        (scene.daemon.local_v5, "mqttv5", "hi-v5"),
    ] {
        let mut publisher = Mosq::spawn(
            "mosquitto_pub",
            &format!("-h 127.0.0.1 -p {port} -V {version} -q 1 -t é/x -m {payload}"),
        );
        let status = publisher.wait_exit();
        assert!(
            status.success(),
            "mosquitto_pub {version} on é/x: {status}; output:\n{}\nlog:\n{}",
            publisher.text(),
            scene.daemon.log_text()
        );
        scene.expect_line(&sub, &format!("MSG_é/x_{payload}"));
    }
    scene
        .collector
        .wait_all(&[b"hi-v4".to_vec(), b"hi-v5".to_vec()], WAIT)
        .await;
    scene.assert_survived("multibyte_topic").await;
}

/// The same matcher, reached through an MQTT 5 will on "é/will" with a will delay: the will is
/// published (and used to crash the daemon) after the delay, when its sender is long gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_will_on_topic_starting_with_multibyte_char_is_delivered() {
    let mut scene = Scene::start(ROUTE_E, "").await;
    let sub = Mosq::subscriber(scene.daemon.local, "-V mqttv311 -t é/#");
    // The broker waits min(session expiry, will delay) = 1 s after the connection drops.
    let mut sender = Mosq::subscriber(
        scene.daemon.local_v5,
        "-V mqttv5 -i will-sender -x 10 -D will will-delay-interval 1 \
         --will-topic é/will --will-payload bye -t nothing/here",
    );
    // kill -9: the connection ends without DISCONNECT, so the will is due.
    sender.kill9();
    scene.expect_line(&sub, "MSG_é/will_bye");
    scene.collector.wait_all(&[b"bye".to_vec()], WAIT).await;
    scene.assert_survived("delayed_will").await;
}

/// A v3.1.1 subscriber, then a v5 publish carrying a property: rumqttd's v3.1.1 encoder hit
/// `unreachable!` on any packet with properties. The subscriber must get the message, without
/// the property its protocol cannot carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_with_property_reaches_v311_subscriber() {
    let mut scene = Scene::start("", "").await;
    let sub = Mosq::subscriber(scene.daemon.local, "-V mqttv311 -t devices/props/#");
    let mut publisher = Mosq::spawn(
        "mosquitto_pub",
        &format!(
            "-h 127.0.0.1 -p {} -V mqttv5 -q 1 -t devices/props/x -m withprops \
             -D publish user-property a b",
            scene.daemon.local_v5
        ),
    );
    let status = publisher.wait_exit();
    assert!(
        status.success(),
        "mosquitto_pub: {status}: {}",
        publisher.text()
    );
    scene.expect_line(&sub, "MSG_devices/props/x_withprops");
    scene
        .collector
        .wait_all(&[b"withprops".to_vec()], WAIT)
        .await;
    scene.assert_survived("v5_properties_to_v311").await;
}

/// Four bytes before any CONNECT: a CONNACK (20 02 00 00) or an UNSUBACK (b0 02 00 01). The
/// v5 decoder hit `unreachable!` on both (upstream rumqtt#812). The sender is disconnected;
/// nobody else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_packets_before_connect_close_only_that_connection() {
    let mut scene = Scene::start("", "").await;
    for (listener, port) in [
        ("listen_v5", scene.daemon.local_v5),
        ("listen", scene.daemon.local),
    ] {
        for bytes in [[0x20u8, 0x02, 0x00, 0x00], [0xb0, 0x02, 0x00, 0x01]] {
            let mut s = open(port);
            s.write_all(&bytes).unwrap();
            assert!(
                closed_by_peer(&mut s, WAIT),
                "local.{listener}: {bytes:02x?} before CONNECT: connection left open"
            );
            scene.assert_up(&format!("{listener} {bytes:02x?}"));
        }
    }
    scene.assert_survived("server_packets_before_connect").await;
}

/// A CONNECT refused at the connection limit, then the same client id again: rumqttd unwrapped a
/// send to the refused connection's will handler (upstream rumqtt#1062). The refused id must
/// be refused again while the broker is full and accepted once a slot is free; the devices
/// holding the slots keep their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_refused_at_max_connections_can_connect_again() {
    let mut scene = Scene::start("", "max_connections = 4\n").await;
    let port = scene.daemon.local;
    let mut holders = Vec::new();
    let refused = loop {
        let id = format!("holder-{}", holders.len());
        match Raw::connect(port, &id, false) {
            Ok(raw) => holders.push(raw),
            Err(_) => break id,
        }
        assert!(
            holders.len() < 64,
            "64 connections accepted with local.max_connections = 2"
        );
    };
    // While full, the same id again (several times: each used to find the stale handler).
    for _ in 0..3 {
        assert!(
            Raw::connect(port, &refused, false).is_err(),
            "{refused} accepted while the broker is full"
        );
        scene.assert_up("same client id while full");
    }
    for (i, h) in holders.iter_mut().enumerate() {
        h.ping()
            .unwrap_or_else(|e| panic!("holder-{i} lost its connection: {e}"));
    }
    // Free one slot: the refused id connects now.
    holders.pop();
    let mut again = wait_for(&format!("{refused} to be accepted"), WAIT, || {
        Raw::connect(port, &refused, false).ok()
    });
    again.ping().unwrap();
    // Make room for the fresh device of assert_survived.
    drop(again);
    holders.clear();
    wait_for("a free slot", WAIT, || {
        Raw::connect(port, "probe", false).ok()
    });
    scene.assert_survived("refused_client_id").await;
}

/// A persistent session (clean session off) in a shared subscription group of its own, holding
/// an unacknowledged QoS 1 message when it disconnects: rumqttd removed the emptied group, then
/// `expect`ed it when saving the session. The session must be kept and the message redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_shared_subscriber_leaving_with_unacked_message() {
    let mut scene = Scene::start("", "").await;
    for (v5, port) in [(false, scene.daemon.local), (true, scene.daemon.local_v5)] {
        let id = format!("shared-sub-v5-{v5}");
        let filter = format!("$share/g{v5}/devices/shared{v5}/#");
        let topic = format!("devices/shared{v5}/x");
        let mut sub = Raw::connect_session(port, &id, v5, false).expect("persistent subscriber");
        sub.subscribe_qos1(&filter).expect("shared subscription");
        let payload = format!("unacked-{v5}").into_bytes();
        scene.bystanders[0]
            .publish_qos1(&topic, &payload)
            .expect("publish to the shared subscription");
        // The message arrives, QoS 1; the subscriber leaves without acknowledging it.
        let (first, _) = read_packet(&mut sub.s).expect("the shared subscription's message");
        assert_eq!(
            first & 0xf6,
            0x32,
            "expected a QoS 1 PUBLISH, got {first:#04x}"
        );
        drop(sub);
        scene.assert_up(&format!("v5={v5}: shared subscriber gone"));
        // The session was kept: back with clean session off, the subscriber gets it again.
        let mut back = wait_for(&format!("{id} to reconnect"), WAIT, || {
            scene.assert_up(&format!("v5={v5}: {id} reconnecting"));
            Raw::connect_session(port, &id, v5, false).ok()
        });
        let (first, body) = read_packet(&mut back.s).expect("redelivery");
        assert_eq!(
            first >> 4,
            3,
            "expected the message again, got {first:#04x}"
        );
        assert!(
            body.ends_with(&payload),
            "redelivered {body:02x?}, not {payload:02x?}"
        );
    }
    scene.assert_survived("persistent_shared_subscriber").await;
}

/// One client subscribed to a filter both plainly and through a shared group: rumqttd's
/// duplicate-request check (a debug assertion, so debug builds only) took the two subscriptions
/// for one. The client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_shared_subscription_on_one_filter() {
    let mut scene = Scene::start("", "").await;
    let sub = Mosq::subscriber(
        scene.daemon.local,
        "-V mqttv311 -t devices/both/x -t $share/g/devices/both/x",
    );
    scene.bystanders[0]
        .publish_qos1("devices/both/x", b"both")
        .expect("publish");
    scene.expect_line(&sub, "MSG_devices/both/x_both");
    scene.assert_survived("plain_and_shared").await;
}
