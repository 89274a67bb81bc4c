//! Test harness: the real edgeferry binary, real brokers on loopback (an in-process rumqttd, and
//! Debian's mosquitto when installed), a link proxy that can cut the upstream connection, device
//! publishers and an upstream collector. Every wait is bounded; every process is stopped by PID.
#![allow(dead_code)]

pub mod device;
pub mod raw;
pub mod scripted;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

pub const WAIT: Duration = Duration::from_secs(60);

/// A loopback port free right now, and never handed out before in this test process: the
/// kernel may return a port it just freed, and two tests (or two roles in one test) must not
/// end up with the same one.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Poll `f` until it returns Some, or panic after `limit` with `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn wait_for_async<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- upstream brokers ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Rumqttd,
    Mosquitto,
}

pub fn mosquitto_available() -> bool {
    Path::new("/usr/sbin/mosquitto").exists()
}

/// The broker kinds to run each end-to-end test against: rumqttd always, mosquitto when
/// installed (CI installs it, so CI covers both).
pub fn broker_kinds() -> Vec<BrokerKind> {
    let mut v = vec![BrokerKind::Rumqttd];
    if mosquitto_available() {
        v.push(BrokerKind::Mosquitto);
    } else {
        eprintln!("mosquitto not installed: covering the rumqttd upstream only");
    }
    v
}

/// An upstream broker. rumqttd has separate v4 and v5 listeners; mosquitto serves both on one.
pub struct Upstream {
    pub kind: BrokerKind,
    pub v4: u16,
    pub v5: u16,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Upstream {
    pub fn start(kind: BrokerKind) -> Upstream {
        match kind {
            BrokerKind::Rumqttd => {
                let (v4, v5) = (free_port(), free_port());
                let text = format!(
                    "id = 0\n[router]\nid = 0\nmax_connections = 100\nmax_outgoing_packet_count = 1000\nmax_segment_size = 10485760\nmax_segment_count = 10\n\
                     [v4.1]\nname = \"up-v4\"\nlisten = \"127.0.0.1:{v4}\"\nnext_connection_delay_ms = 0\n[v4.1.connections]\nconnection_timeout_ms = 5000\nmax_payload_size = 1048576\nmax_inflight_count = 500\ndynamic_filters = true\n\
                     [v5.1]\nname = \"up-v5\"\nlisten = \"127.0.0.1:{v5}\"\nnext_connection_delay_ms = 0\n[v5.1.connections]\nconnection_timeout_ms = 5000\nmax_payload_size = 1048576\nmax_inflight_count = 500\ndynamic_filters = true\n"
                );
                let config: rumqttd::Config = toml::from_str(&text).unwrap();
                let mut broker = rumqttd::Broker::new(config);
                // rumqttd has no stop; the thread ends with the test process.
                std::thread::spawn(move || {
                    let _ = broker.start();
                });
                wait_until_listening(v4);
                wait_until_listening(v5);
                Upstream {
                    kind,
                    v4,
                    v5,
                    child: None,
                    _dir: None,
                }
            }
            BrokerKind::Mosquitto => {
                let port = free_port();
                let dir = tempfile::tempdir().unwrap();
                let conf = dir.path().join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 0\n"),
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
                Upstream {
                    kind,
                    v4: port,
                    v5: port,
                    child: Some(child),
                    _dir: Some(dir),
                }
            }
        }
    }

    /// The port the daemon should use for `protocol`.
    pub fn port_for(&self, protocol: &str) -> u16 {
        if protocol == "v5" {
            self.v5
        } else {
            self.v4
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_until_listening(port: u16) {
    wait_for(&format!("127.0.0.1:{port} to listen"), WAIT, || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
}

// ---- link proxy ---------------------------------------------------------------------------

/// A TCP forwarder between the daemon and its upstream that the test can cut: while down, it
/// closes existing connections and accepts-then-drops new ones, like a flaky cellular link.
pub struct LinkProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Half-open link: connections stay open (and new ones are accepted) but no byte is relayed.
    stalled: Arc<AtomicBool>,
    /// Connections accepted and relayed so far (a client that noticed a dead link reconnects).
    pub accepted: Arc<std::sync::atomic::AtomicU64>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl LinkProxy {
    pub fn start(target: u16, initially_up: bool) -> LinkProxy {
        let up = Arc::new(AtomicBool::new(initially_up));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (u, g, st) = (up.clone(), generation.clone(), stop.clone());
        let (sl, acc) = (stalled.clone(), accepted.clone());
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        // Its own thread and runtime, so it works from sync and async tests alike.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                while !st.load(Ordering::SeqCst) {
                    let Ok(Ok((mut inbound, _))) =
                        tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
                    else {
                        continue;
                    };
                    if !u.load(Ordering::SeqCst) {
                        let _ = inbound.shutdown().await;
                        continue;
                    }
                    acc.fetch_add(1, Ordering::SeqCst);
                    let my_gen = g.load(Ordering::SeqCst);
                    let (u, g, st, sl) = (u.clone(), g.clone(), st.clone(), sl.clone());
                    tokio::spawn(async move {
                        let Ok(outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                        else {
                            return;
                        };
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = outbound.into_split();
                        let copy = async {
                            tokio::select! {
                                _ = relay(ir, ow, sl.clone()) => {},
                                _ = relay(or, iw, sl.clone()) => {},
                            }
                        };
                        let cut = async {
                            loop {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                if !u.load(Ordering::SeqCst)
                                    || g.load(Ordering::SeqCst) != my_gen
                                    || st.load(Ordering::SeqCst)
                                {
                                    return;
                                }
                            }
                        };
                        tokio::select! { _ = copy => {}, _ = cut => {} }
                    });
                }
            });
        });
        let port = port_rx.recv_timeout(WAIT).expect("proxy did not start");
        LinkProxy {
            port,
            up,
            stalled,
            accepted,
            generation,
            stop,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.up.store(up, Ordering::SeqCst);
    }

    /// Stall (true) or resume (false) relaying, keeping every connection open: a half-open link
    /// (a NAT or a cellular modem that silently dropped its state).
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}

/// Copy one direction; while stalled, bytes are neither read nor written (they pile up in the
/// kernel buffers, as on a link that went silent). Ends on EOF or error.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let read = from.read(&mut buf).await;
        // A read that completed as the stall began is held until it ends, an end of stream
        // too: on a silent link the other side's FIN (e.g. the broker giving up on its own
        // keepalive) never arrives either.
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---- the daemon ---------------------------------------------------------------------------

pub struct DaemonConfig {
    pub protocol: &'static str,
    pub upstream_port: u16,
    pub routes: String,
    pub extra: String,
    pub inflight: u16,
    /// Extra environment for the daemon process (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    /// `[upstream] keepalive`.
    pub keepalive: String,
    /// Where the store lives, if not `queue.db` in the daemon's directory (e.g. a small tmpfs).
    pub store_path: Option<PathBuf>,
    /// Extra lines for the `[store]` and `[local]` tables.
    pub store_extra: String,
    pub local_extra: String,
    /// `[upstream] address` as a TOML value, if not "127.0.0.1:{upstream_port}" (e.g. a list).
    pub address: Option<String>,
    /// `[upstream] backoff_initial` and `backoff_max`.
    pub backoff: (String, String),
    /// Extra lines for the `[upstream]` table.
    pub upstream_extra: String,
}

/// The test's `[store]` lines, with `min_free` off unless the test sets it: a test is about
/// what it checks, not about how full the disk it runs on happens to be (the default, 5% of the
/// filesystem, would make a shared CI disk turn routes to drop-oldest).
fn store_extra(extra: &str) -> String {
    if extra.contains("min_free") {
        extra.to_string()
    } else {
        format!("min_free = \"0%\"\n{extra}")
    }
}

impl DaemonConfig {
    pub fn new(protocol: &'static str, upstream_port: u16) -> DaemonConfig {
        DaemonConfig {
            protocol,
            upstream_port,
            routes: "[[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\n".into(),
            extra: String::new(),
            inflight: 32,
            env: Vec::new(),
            keepalive: "5s".into(),
            store_path: None,
            store_extra: String::new(),
            local_extra: String::new(),
            address: None,
            backoff: ("50ms".into(), "300ms".into()),
            upstream_extra: String::new(),
        }
    }
}

pub struct Daemon {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub local: u16,
    pub local_v5: u16,
    pub metrics: u16,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    env: Vec<(String, String)>,
    store: PathBuf,
}

impl Daemon {
    /// Write the config into `dir` and start the daemon; returns once it accepts devices.
    pub fn start(dir: &Path, cfg: &DaemonConfig) -> Daemon {
        let (local, local_v5, metrics) = (free_port(), free_port(), free_port());
        let config_path = dir.join("edgeferry.toml");
        let store = cfg
            .store_path
            .clone()
            .unwrap_or_else(|| dir.join("queue.db"));
        let text = format!(
            "[gateway]\nid = \"gw-test\"\n\
             [local]\nlisten = \"127.0.0.1:{local}\"\nlisten_v5 = \"127.0.0.1:{local_v5}\"\n{}\n\
             [store]\npath = \"{}\"\n{}\n\
             [upstream]\naddress = {}\nprotocol = \"{}\"\nclient_id = \"gw-test-{}\"\ninflight = {}\nbackoff_initial = \"{}\"\nbackoff_max = \"{}\"\nkeepalive = \"{}\"\nconnect_timeout = \"2s\"\n{}\n\
             [telemetry]\nmetrics_listen = \"127.0.0.1:{metrics}\"\nlog_level = \"debug\"\n\
             [shutdown]\ngrace = \"2s\"\n{}\n{}",
            cfg.local_extra,
            store.display(),
            store_extra(&cfg.store_extra),
            cfg.address
                .clone()
                .unwrap_or_else(|| format!("\"127.0.0.1:{}\"", cfg.upstream_port)),
            cfg.protocol,
            std::process::id(),
            cfg.inflight,
            cfg.backoff.0,
            cfg.backoff.1,
            cfg.keepalive,
            cfg.upstream_extra,
            cfg.routes,
            cfg.extra,
        );
        std::fs::write(&config_path, text).unwrap();
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            config_path,
            local,
            local_v5,
            metrics,
            child: None,
            log: dir.join("daemon.log"),
            starts: 0,
            env: cfg.env.clone(),
            store,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "edgeferry=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start edgeferry");
        self.child = Some(child);
        let metrics = self.metrics;
        let local = self.local;
        wait_for("daemon to accept devices", WAIT, || {
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "daemon exited early with {status}; log:\n{}",
                        self.log_text()
                    );
                }
            }
            (TcpStream::connect(("127.0.0.1", local)).is_ok() && scrape(metrics).is_some())
                .then_some(())
        });
    }

    /// kill -9, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("daemon did not stop on SIGTERM; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    pub fn metric(&self, name: &str) -> u64 {
        scrape(self.metrics)
            .and_then(|m| m.get(name).copied())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    pub fn wait_metric(&self, name: &str, at_least: u64) {
        let metrics = self.metrics;
        wait_for(&format!("{name} >= {at_least}"), WAIT, || {
            scrape(metrics)
                .and_then(|m| m.get(name).copied())
                .filter(|v| *v >= at_least)
                .map(|_| ())
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn db_path(&self) -> PathBuf {
        self.store.clone()
    }

    /// `Some(status)` once the daemon process has exited (it is reaped then).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The payloads of the rows in a (stopped daemon's) queue file.
pub fn queued_payloads(db: &Path) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn
        .prepare("SELECT payload FROM messages ORDER BY seq")
        .unwrap();
    let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// GET the Prometheus text and parse `name value` lines (labels kept in the name).
pub fn scrape(port: u16) -> Option<HashMap<String, u64>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split("\r\n\r\n").nth(1)?;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse::<f64>().ok()? as u64))
            })
            .collect(),
    )
}

// ---- devices and the upstream consumer -----------------------------------------------------

/// Publish `payloads` on `topic` with QoS 1 as one MQTT 3.1.1 device; returns once every PUBACK
/// arrived (the broker has taken responsibility for each).
pub async fn publish_all(
    port: u16,
    client_id: impl Into<String>,
    topic: impl Into<String>,
    payloads: Vec<Vec<u8>>,
) {
    let client_id: String = client_id.into();
    let mut o = rumqttc::MqttOptions::new(&client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10)).set_inflight(50);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
    let n = payloads.len();
    let topic: String = topic.into();
    let pub_task = tokio::spawn(async move {
        for p in payloads {
            client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, p)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked < n {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {client_id}: {e}"),
            Err(_) => panic!("device {client_id}: only {acked}/{n} PUBACKs"),
        }
    }
    let client = pub_task.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// Publish with MQTT 5 user properties from one device (for dedup by property).
pub async fn publish_v5(
    port: u16,
    client_id: &str,
    topic: &str,
    payload: &[u8],
    props: Vec<(String, String)>,
) {
    let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 8);
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: props,
        ..Default::default()
    };
    client
        .publish_with_properties(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload.to_vec(),
            properties,
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("v5 device: {e}"),
            Err(_) => panic!("v5 device: no PUBACK"),
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// One message as the upstream consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub id: Option<String>,
}

/// An MQTT 5 subscriber on the upstream broker collecting everything under `filter`.
pub struct Collector {
    pub got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(port: u16, filter: &str) -> Collector {
        let mut o =
            rumqttc::v5::MqttOptions::new(format!("collector-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 8);
        client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        // Wait for the SUBACK so nothing published afterwards is missed.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("collector: {e}"),
                Err(_) => panic!("collector: no SUBACK"),
            }
        }
        let g = got.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(p))) => {
                        let id = p.properties.as_ref().and_then(|pr| {
                            pr.user_properties
                                .iter()
                                .find(|(k, _)| k == "edgeferry-id")
                                .map(|(_, v)| v.clone())
                        });
                        g.lock().unwrap().push(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            id,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => panic!("collector lost its connection: {e}"),
                }
            }
        });
        Collector { got, task }
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Wait until every payload in `want` has arrived at least once; returns everything seen.
    pub async fn wait_all(&self, want: &[Vec<u8>], limit: Duration) -> Vec<Received> {
        let want: std::collections::HashSet<&Vec<u8>> = want.iter().collect();
        let deadline = Instant::now() + limit;
        loop {
            let got = self.snapshot();
            let have: std::collections::HashSet<&Vec<u8>> =
                got.iter().map(|r| &r.payload).collect();
            let missing = want.iter().filter(|w| !have.contains(**w)).count();
            if missing == 0 {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "{missing} of {} messages never arrived upstream (got {} messages)",
                    want.len(),
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Payloads "device/seq" so order and identity are checkable.
pub fn payloads(device: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{device}/{i:06}").into_bytes())
        .collect()
}

/// Number of messages received more than once (by payload), and a check that every copy of a
/// payload carried the same message id.
pub fn duplicates_with_stable_ids(got: &[Received]) -> usize {
    let mut first: HashMap<&[u8], &Option<String>> = HashMap::new();
    let mut dups = 0;
    for r in got {
        match first.get(r.payload.as_slice()) {
            Some(id) => {
                dups += 1;
                assert_eq!(
                    *id,
                    &r.id,
                    "a resend of {:?} carried a different id",
                    String::from_utf8_lossy(&r.payload)
                );
            }
            None => {
                first.insert(&r.payload, &r.id);
            }
        }
    }
    dups
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
