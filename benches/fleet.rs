//! The fleet measurement: many edgeferry instances on this machine against one upstream
//! Mosquitto, which is stopped for a while and started again. How fast does the fleet come
//! back, and how hard does it hit the broker when it does? (docs/LINK.md)
//!
//! ```sh
//! cargo bench --bench fleet                                   # 200 instances, 30 s outage, 3 runs
//! cargo bench --bench fleet -- --instances 1 --outage 10,30,55 --runs 9   # one gateway
//! cargo bench --bench fleet -- --binary /path/to/edgeferry --spread 10s
//! ```
//!
//! Topology: instances -> counting proxy (in this process) -> Mosquitto. The proxy is the
//! broker's front door: it timestamps every accepted TCP connection, every CONNECT packet (with
//! its client id) and every CONNACK, so the counts are what the broker sees. "Stopping the
//! upstream" closes the proxy's listener and its connections and stops Mosquitto (SIGTERM by
//! PID); "starting" starts Mosquitto, waits until it listens, then opens the proxy's port
//! again: that instant is t0, the upstream's return, from which everything is measured.
//!
//! Instances run tiny configs: one route and no traffic, `sync = "normal"`, no metrics
//! endpoint, logs at WARN into their own files, `stable_after = "5s"` so that each run starts
//! a fresh outage after the 8 s pause between runs (a fleet that was stable for a long time);
//! every other upstream setting is the default unless `--spread` is given. Every process is
//! stopped by PID (SIGTERM to all, a bounded wait, SIGKILL for any left), also on error and on
//! panic.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    instances: usize,
    outages: Vec<u64>,
    runs: usize,
    binary: PathBuf,
    spread: Option<String>,
    protocol: String,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        instances: 200,
        outages: vec![30],
        runs: 3,
        binary: PathBuf::from(env!("CARGO_BIN_EXE_edgeferry")),
        spread: None,
        protocol: "v3.1.1".into(),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--instances" => a.instances = value()?.parse()?,
            "--outage" => {
                a.outages = value()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--runs" => a.runs = value()?.parse()?,
            "--binary" => a.binary = value()?.into(),
            "--spread" => a.spread = Some(value()?),
            "--protocol" => a.protocol = value()?,
            "--keep" => a.keep = true,
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            "--help" | "-h" => {
                println!(
                    "cargo bench --bench fleet -- [--instances N (200)] [--outage S[,S..] (30)] \
                     [--runs N (3)] [--binary PATH] [--spread DURATION] [--protocol v3.1.1|v5] [--keep]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if a.instances == 0 || a.runs == 0 || a.outages.is_empty() {
        bail!("--instances, --runs and --outage must be positive");
    }
    Ok(a)
}

/// A loopback port free right now and not handed out before by this process.
fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

fn wait_listening(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {limit:?}")
}

// ---- processes ------------------------------------------------------------------------------

/// Children stopped by PID when dropped: SIGTERM to all at once, a bounded wait, SIGKILL.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn stop_all(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let pids: Vec<String> = self.0.iter().map(|c| c.id().to_string()).collect();
        for chunk in pids.chunks(500) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .args(chunk)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.0
                .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
            if self.0.is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Mosquitto {
    port: u16,
    conf: PathBuf,
    proc: Procs,
}

impl Mosquitto {
    fn new(dir: &Path) -> Result<Mosquitto> {
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_connections -1\nuser root\nlog_dest none\n"
            ),
        )?;
        let mut m = Mosquitto {
            port,
            conf,
            proc: Procs::default(),
        };
        m.start()?;
        Ok(m)
    }

    fn start(&mut self) -> Result<()> {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting /usr/sbin/mosquitto (apt-get install mosquitto)")?;
        self.proc.0.push(child);
        wait_listening(self.port, Duration::from_secs(10))
    }

    fn stop(&mut self) {
        self.proc.stop_all();
    }
}

// ---- the counting proxy ------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Seen {
    /// A TCP connection accepted (a probe or a connection attempt).
    Accept,
    /// A CONNECT packet with this client id.
    Connect(String),
    /// A CONNACK to this client id; true when accepted.
    ConnAck(String, bool),
}

#[derive(Default)]
struct Log {
    events: Vec<(Instant, Seen)>,
}

/// A TCP proxy in front of the broker that records what passes through its door.
struct Proxy {
    port: u16,
    target: u16,
    log: Arc<Mutex<Log>>,
    rt: tokio::runtime::Runtime,
    /// The accept loop and the connections of the current "up" period.
    up: Option<tokio_util::sync::CancellationToken>,
}

impl Proxy {
    fn new(target: u16) -> Result<Proxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        Ok(Proxy {
            port: free_port()?,
            target,
            log: Arc::default(),
            rt,
            up: None,
        })
    }

    /// Open the port; returns the instant it listens (t0).
    fn open(&mut self) -> Result<Instant> {
        let token = tokio_util::sync::CancellationToken::new();
        let addr = ("127.0.0.1", self.port);
        // std sets SO_REUSEADDR on Unix listeners, so the port is free again at once.
        let listener = self.rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => return Ok(l),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })?;
        let t0 = Instant::now();
        let (log, target, stop) = (self.log.clone(), self.target, token.clone());
        self.rt.spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                record(&log, Seen::Accept);
                let (log, stop) = (log.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = relay(inbound, target, log) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        self.up = Some(token);
        Ok(t0)
    }

    /// Close the port and every connection through it.
    fn close(&mut self) {
        if let Some(t) = self.up.take() {
            t.cancel();
        }
        // Let the tasks see it before the broker goes.
        std::thread::sleep(Duration::from_millis(50));
    }

    fn events_since(&self, t0: Instant) -> Vec<(Duration, Seen)> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.events
            .iter()
            .filter(|(t, _)| *t >= t0)
            .map(|(t, s)| (t.duration_since(t0), s.clone()))
            .collect()
    }
}

fn record(log: &Mutex<Log>, seen: Seen) {
    let now = Instant::now();
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .events
        .push((now, seen));
}

/// Relay one connection, noting its CONNECT and CONNACK (each the first packet of its
/// direction; on loopback a CONNECT arrives in one read).
async fn relay(inbound: tokio::net::TcpStream, target: u16, log: Arc<Mutex<Log>>) {
    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut ir, mut iw) = inbound.into_split();
    let (mut or, mut ow) = outbound.into_split();
    let client = Arc::new(Mutex::new(String::from("?")));
    let up = {
        let (log, client) = (log.clone(), client.clone());
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut first = true;
            loop {
                let n = match ir.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if first {
                    first = false;
                    if let Some(id) = connect_client_id(&buf[..n]) {
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = id.clone();
                        record(&log, Seen::Connect(id));
                    }
                }
                if ow.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut first = true;
        loop {
            let n = match or.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if first {
                first = false;
                if let Some(ok) = connack_ok(&buf[..n]) {
                    let id = client.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    record(&log, Seen::ConnAck(id, ok));
                }
            }
            if iw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! { _ = up => {}, _ = down => {} }
}

/// MQTT variable byte integer at `b[i..]`: (value, bytes used).
fn varint(b: &[u8], mut i: usize) -> Option<(usize, usize)> {
    let start = i;
    let (mut value, mut shift) = (0usize, 0);
    loop {
        let byte = *b.get(i)?;
        value |= ((byte & 0x7f) as usize) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            return Some((value, i - start));
        }
        shift += 7;
        if shift > 21 {
            return None;
        }
    }
}

/// The client id of a CONNECT packet (3.1.1 or 5).
fn connect_client_id(b: &[u8]) -> Option<String> {
    if b.first()? >> 4 != 1 {
        return None;
    }
    let (_, used) = varint(b, 1)?;
    let mut i = 1 + used;
    let name_len = u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize;
    i += 2 + name_len;
    let level = *b.get(i)?;
    i += 1 + 1 + 2; // level, flags, keepalive
    if level == 5 {
        let (props, used) = varint(b, i)?;
        i += used + props;
    }
    let id_len = u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize;
    let id = b.get(i + 2..i + 2 + id_len)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

/// Whether a CONNACK accepts the connection (None if `b` is not a CONNACK).
fn connack_ok(b: &[u8]) -> Option<bool> {
    if *b.first()? != 0x20 {
        return None;
    }
    let (_, used) = varint(b, 1)?;
    Some(*b.get(1 + used + 1)? == 0)
}

// ---- the fleet ------------------------------------------------------------------------------

fn write_config(dir: &Path, i: usize, upstream: u16, a: &Args) -> Result<PathBuf> {
    let id = format!("fleet-{i:04}");
    let path = dir.join(format!("{id}.toml"));
    let spread = a
        .spread
        .as_ref()
        .map(|s| format!("reconnect_spread = \"{s}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{id}\"\n\
             [local]\nlisten = \"127.0.0.1:{}\"\nmax_connections = 4\n\
             [store]\npath = \"{}\"\nsync = \"normal\"\n\
             [upstream]\naddress = \"127.0.0.1:{upstream}\"\nprotocol = \"{}\"\nkeepalive = \"60s\"\nstable_after = \"5s\"\n{spread}\
             [[route]]\nfrom = \"devices/#\"\n\
             [telemetry]\nlog_level = \"warn\"\n",
            free_port()?,
            dir.join(format!("{id}.db")).display(),
            a.protocol,
        ),
    )?;
    Ok(path)
}

fn spawn_instance(dir: &Path, i: usize, upstream: u16, a: &Args) -> Result<Child> {
    let config = write_config(dir, i, upstream, a)?;
    let log = std::fs::File::create(dir.join(format!("fleet-{i:04}.log")))?;
    Command::new(&a.binary)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", a.binary.display()))
}

/// Start the fleet and wait until every instance is connected. An instance whose local port
/// was taken in the meantime (the port was free when chosen) is started again on another.
fn start_fleet(dir: &Path, proxy: &Proxy, t0: Instant, a: &Args) -> Result<Procs> {
    let mut fleet = Procs::default();
    for i in 0..a.instances {
        fleet.0.push(spawn_instance(dir, i, proxy.port, a)?);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut retries = 0;
    loop {
        let connected = proxy
            .events_since(t0)
            .into_iter()
            .filter_map(|(_, s)| match s {
                Seen::ConnAck(id, true) => Some(id),
                _ => None,
            })
            .collect::<std::collections::HashSet<_>>()
            .len();
        if connected >= a.instances {
            return Ok(fleet);
        }
        for i in 0..fleet.0.len() {
            if let Ok(Some(status)) = fleet.0[i].try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("fleet-{i:04}.log")))
                    .unwrap_or_default();
                if log.contains("Address already in use") && retries < 20 {
                    retries += 1;
                    fleet.0[i] = spawn_instance(dir, i, proxy.port, a)?;
                    continue;
                }
                bail!("instance {i} exited with {status}: {log}");
            }
        }
        if Instant::now() > deadline {
            bail!(
                "only {connected}/{} instances connected at start",
                a.instances
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until every instance has an accepted connection after `t0`; returns when each did.
fn wait_connected(
    dir: &Path,
    proxy: &Proxy,
    fleet: &mut Procs,
    t0: Instant,
    n: usize,
    limit: Duration,
) -> Result<HashMap<String, Duration>> {
    let deadline = Instant::now() + limit;
    loop {
        let mut first: HashMap<String, Duration> = HashMap::new();
        for (t, s) in proxy.events_since(t0) {
            if let Seen::ConnAck(id, true) = s {
                first.entry(id).or_insert(t);
            }
        }
        if first.len() >= n {
            return Ok(first);
        }
        for (i, c) in fleet.0.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("fleet-{i:04}.log")))
                    .unwrap_or_default();
                bail!("instance {i} (pid {}) exited with {status}: {log}", c.id());
            }
        }
        if Instant::now() > deadline {
            eprintln!("fleet: only {}/{n} connected after {limit:?}", first.len());
            return Ok(first);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One outage's figures.
struct Run {
    outage: u64,
    /// CONNECT packets per 100 ms bin, first 10 s after t0.
    bins: Vec<usize>,
    /// TCP connections accepted in the first 10 s (probes and connection attempts).
    accepts: usize,
    /// Instances that sent a CONNECT in the first 10 s.
    senders: usize,
    /// Per instance: from t0 to its accepted CONNACK.
    delays: Vec<Duration>,
    instances: usize,
}

impl Run {
    fn connects(&self) -> usize {
        self.bins.iter().sum()
    }
    fn mean(&self) -> f64 {
        self.connects() as f64 / self.bins.len() as f64
    }
    fn peak(&self) -> usize {
        self.bins.iter().copied().max().unwrap_or(0)
    }
    fn peak_over_mean(&self) -> f64 {
        if self.connects() == 0 {
            return f64::NAN;
        }
        self.peak() as f64 / self.mean()
    }
    fn quantile(&self, q: f64) -> Option<Duration> {
        if self.delays.is_empty() {
            return None;
        }
        let mut d = self.delays.clone();
        d.sort();
        let rank = ((q * d.len() as f64).ceil() as usize).clamp(1, d.len());
        Some(d[rank - 1])
    }
    fn all_connected(&self) -> Option<Duration> {
        (self.delays.len() >= self.instances)
            .then(|| self.delays.iter().max().copied())
            .flatten()
    }
    fn connected_by(&self, secs: u64) -> usize {
        self.delays
            .iter()
            .filter(|d| **d <= Duration::from_secs(secs))
            .count()
    }
}

fn measure(
    dir: &Path,
    a: &Args,
    proxy: &mut Proxy,
    mosquitto: &mut Mosquitto,
    fleet: &mut Procs,
    outage: u64,
) -> Result<Run> {
    proxy.close();
    mosquitto.stop();
    std::thread::sleep(Duration::from_secs(outage));
    mosquitto.start()?;
    let t0 = proxy.open()?;
    let limit = Duration::from_secs(180);
    let firsts = wait_connected(dir, proxy, fleet, t0, a.instances, limit)?;
    // Anything still arriving in the first 10 s is counted too.
    let ten = Duration::from_secs(10);
    let since = t0.elapsed();
    if since < ten + Duration::from_millis(200) {
        std::thread::sleep(ten + Duration::from_millis(200) - since);
    }
    let mut bins = vec![0usize; 100];
    let mut accepts = 0;
    let mut senders = std::collections::HashSet::new();
    for (t, s) in proxy.events_since(t0) {
        if t >= ten {
            continue;
        }
        match s {
            Seen::Connect(id) => {
                bins[(t.as_millis() / 100) as usize] += 1;
                senders.insert(id);
            }
            Seen::Accept => accepts += 1,
            Seen::ConnAck(..) => {}
        }
    }
    Ok(Run {
        outage,
        bins,
        accepts,
        senders: senders.len(),
        delays: firsts.into_values().collect(),
        instances: a.instances,
    })
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "—".into())
}

fn report(a: &Args, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Instances: {}, protocol {}, reconnect_spread {}, binary {}",
        a.instances,
        a.protocol,
        a.spread.as_deref().unwrap_or("default"),
        a.binary.display()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | outage | CONNECTs in 10 s (instances) | peak / 100 ms | mean / 100 ms | peak/mean | TCP accepts in 10 s | median | p90 | all connected | by 1/2/5/10 s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} s | {} ({}) | {} | {:.2} | {:.2} | {} | {} | {} | {} | {}/{}/{}/{} |",
            i + 1,
            r.outage,
            r.connects(),
            r.senders,
            r.peak(),
            r.mean(),
            r.peak_over_mean(),
            r.accepts,
            secs(r.quantile(0.5)),
            secs(r.quantile(0.9)),
            secs(r.all_connected()),
            r.connected_by(1),
            r.connected_by(2),
            r.connected_by(5),
            r.connected_by(10),
        );
    }
    let med = |mut v: Vec<f64>| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    };
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Medians over {} runs: peak/mean {:.2}, median reconnect {:.2} s, all connected {:.2} s",
        runs.len(),
        med(runs.iter().map(|r| r.peak_over_mean()).collect()),
        med(runs
            .iter()
            .filter_map(|r| r.quantile(0.5))
            .map(|d| d.as_secs_f64())
            .collect()),
        med(runs
            .iter()
            .map(|r| r.all_connected().map_or(f64::INFINITY, |d| d.as_secs_f64()))
            .collect()),
    );
    if a.instances > 1 {
        for (i, r) in runs.iter().enumerate() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "Run {}: CONNECTs per 100 ms after the upstream's return (one row per second):",
                i + 1
            );
            let _ = writeln!(out, "```");
            for s in 0..10 {
                let row: Vec<String> = r.bins[s * 10..s * 10 + 10]
                    .iter()
                    .map(|c| format!("{c:3}"))
                    .collect();
                let _ = writeln!(out, "{s:2}s {}", row.join(""));
            }
            let _ = writeln!(out, "```");
        }
    }
    out
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let tmp = tempfile::Builder::new()
        .prefix("edgeferry-fleet-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let mut mosquitto = Mosquitto::new(&dir)?;
    let mut proxy = Proxy::new(mosquitto.port)?;
    let t0 = proxy.open()?;
    eprintln!(
        "fleet: starting {} instances in {}",
        a.instances,
        dir.display()
    );
    let mut fleet = start_fleet(&dir, &proxy, t0, &a)?;
    let mut runs = Vec::new();
    for run in 0..a.runs {
        // Longer than stable_after: every outage starts from a stable fleet.
        std::thread::sleep(Duration::from_secs(8));
        let outage = a.outages[run % a.outages.len()];
        eprintln!("fleet: run {}: upstream down for {outage} s", run + 1);
        let r = measure(&dir, &a, &mut proxy, &mut mosquitto, &mut fleet, outage)?;
        eprintln!(
            "fleet: run {}: peak/mean {:.2}, median {}, all connected {}",
            run + 1,
            r.peak_over_mean(),
            secs(r.quantile(0.5)),
            secs(r.all_connected())
        );
        runs.push(r);
    }
    fleet.stop_all();
    proxy.close();
    mosquitto.stop();
    println!("{}", report(&a, &runs));
    if a.keep {
        let kept = tmp.keep();
        eprintln!("fleet: kept {}", kept.display());
    }
    Ok(())
}
