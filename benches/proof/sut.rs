//! The processes a run starts: the upstream Mosquitto (the fixture), and the system under test,
//! either edgeferry or a local Mosquitto bridging to the upstream.
//!
//! Every process is a [`Proc`]: started on 127.0.0.1 with a port that was free a moment before,
//! in a private directory, its stderr/stdout copied to a log file by a harness thread (so the
//! child's own `write_bytes` counts only its store, not its logging), and stopped by PID with
//! SIGTERM, then SIGKILL after a bounded wait, when stopped explicitly or dropped (also on error
//! and on panic unwinding).

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free when asked.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_listening(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on 127.0.0.1:{port} after {timeout:?}")
}

/// A child process the harness owns.
pub struct Proc {
    /// For messages: which process this is.
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

fn pump(mut from: impl Read + Send + 'static, to: PathBuf) {
    thread::spawn(move || {
        let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&to) else {
            return;
        };
        let mut buf = [0u8; 8192];
        // Ends on EOF, i.e. when the child exits.
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || f.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        pump(child.stdout.take().expect("piped"), log.clone());
        pump(child.stderr.take().expect("piped"), log.clone());
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Some(status)` if the process has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status and whether it had to
    /// be killed.
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        let Some(mut child) = self.child.take() else {
            return (None, false);
        };
        if let Ok(Some(st)) = child.try_wait() {
            return (Some(st), false);
        }
        // std has no SIGTERM; kill(1) by PID keeps us off libc.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return (Some(st), false);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let st = wait_bounded(&mut child, Duration::from_secs(5));
        (st, true)
    }

    /// Last `n` lines of the process log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Mosquitto settings the bridge side is run with (recorded in the results).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MosqSettings {
    /// `autosave_interval`, seconds (Mosquitto's default is 1800).
    pub autosave_interval: u64,
    /// `max_queued_messages` (Mosquitto's default is 1000; 0 = unlimited).
    pub max_queued_messages: u64,
}

/// The upstream broker: a plain Mosquitto with persistence so that the upstream subscriber's
/// session (and its queued messages) survives an upstream restart in the outage scenario. It is
/// the fixture, not a system under test: its limits are lifted (no queue cap, a wide in-flight
/// window towards the subscriber) so it never is the bottleneck by configuration.
pub struct Upstream {
    pub port: u16,
    pub dir: PathBuf,
    pub proc: Option<Proc>,
}

impl Upstream {
    pub fn new(dir: &Path) -> Result<Upstream> {
        let dir = dir.join("upstream");
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let conf = format!(
            "# generated by benches/proof: the upstream fixture\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             # running as root: stay root so the private temp dir is writable\n\
             user root\n\
             persistence true\n\
             persistence_location {d}/\n\
             max_queued_messages 0\n\
             max_inflight_messages 1000\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\n",
            d = dir.display()
        );
        fs::write(dir.join("mosquitto.conf"), conf)?;
        Ok(Upstream {
            port,
            dir,
            proc: None,
        })
    }

    pub fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(self.dir.join("mosquitto.conf"));
        let p = Proc::spawn("upstream-mosquitto", cmd, self.dir.join("mosquitto.log"))?;
        self.proc = Some(p);
        wait_listening(self.port, Duration::from_secs(10)).with_context(|| {
            format!(
                "upstream mosquitto: {}",
                self.proc.as_ref().unwrap().log_tail(10)
            )
        })
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Edgeferry,
    Mosquitto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Edgeferry => "edgeferry",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// A system under test, listening for devices on `port`.
pub struct Sut {
    pub kind: Kind,
    pub port: u16,
    pub proc: Proc,
    /// The file the system persists its queue to (SQLite db or mosquitto.db).
    pub store: PathBuf,
}

impl Sut {
    /// `store_extra`: extra lines for the `[store]` table (e.g. `sync = "normal"`).
    pub fn start_edgeferry(
        binary: &Path,
        dir: &Path,
        upstream_port: u16,
        store_extra: &str,
    ) -> Result<Sut> {
        let dir = dir.join("edgeferry");
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let store = dir.join("queue.db");
        let conf = format!(
            "# generated by benches/proof\n\
             [gateway]\nid = \"bench-gw\"\n\n\
             [local]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [store]\npath = \"{s}\"\n{store_extra}\n\n\
             [upstream]\naddress = \"127.0.0.1:{upstream_port}\"\nprotocol = \"v3.1.1\"\n\
             client_id = \"bench-gw\"\ntls = false\n\n\
             [[route]]\nfrom = \"bench/#\"\nto = \"{{topic}}\"\nqos = 1\n",
            s = store.display()
        );
        let cfg = dir.join("edgeferry.toml");
        fs::write(&cfg, conf)?;
        let mut cmd = Command::new(binary);
        cmd.arg("run").arg("--config").arg(&cfg).current_dir(&dir);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut proc = Proc::spawn("edgeferry", cmd, dir.join("edgeferry.log"))?;
        if let Err(e) = wait_listening(port, Duration::from_secs(15)) {
            let st = proc.exited();
            bail!(
                "{} did not listen ({e}); exit={st:?}; log:\n{}",
                proc.name,
                proc.log_tail(20)
            );
        }
        Ok(Sut {
            kind: Kind::Edgeferry,
            port,
            proc,
            store,
        })
    }

    pub fn start_mosquitto_bridge(dir: &Path, upstream_port: u16, s: &MosqSettings) -> Result<Sut> {
        let dir = dir.join("mosquitto-bridge");
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let conf = format!(
            "# generated by benches/proof: a local broker bridging bench/# upstream\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             # mosquitto drops to user 'mosquitto' when started as root, which cannot write a\n\
             # private temp dir: stay root.\n\
             user root\n\
             persistence true\n\
             persistence_location {d}/\n\
             autosave_interval {autosave}\n\
             max_queued_messages {maxq}\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\n\n\
             connection bench-bridge\n\
             address 127.0.0.1:{upstream_port}\n\
             bridge_protocol_version mqttv311\n\
             cleansession false\n\
             clientid bench-bridge\n\
             topic bench/# out 1\n",
            d = dir.display(),
            autosave = s.autosave_interval,
            maxq = s.max_queued_messages,
        );
        fs::write(dir.join("mosquitto.conf"), conf)?;
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(dir.join("mosquitto.conf"));
        let mut proc = Proc::spawn("bridge-mosquitto", cmd, dir.join("mosquitto.log"))?;
        if let Err(e) = wait_listening(port, Duration::from_secs(10)) {
            let st = proc.exited();
            bail!(
                "mosquitto bridge did not listen ({e}); exit={st:?}; log:\n{}",
                proc.log_tail(20)
            );
        }
        let store = dir.join("mosquitto.db");
        Ok(Sut {
            kind: Kind::Mosquitto,
            port,
            proc,
            store,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Total size of the store's files (db plus SQLite's -wal/-shm).
    pub fn store_bytes(&self) -> u64 {
        let mut total = 0;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.store.clone().into_os_string();
            p.push(suffix);
            total += fs::metadata(PathBuf::from(p)).map(|m| m.len()).unwrap_or(0);
        }
        total
    }
}
