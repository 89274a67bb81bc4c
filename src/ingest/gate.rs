//! Back-pressure for MQTT devices: the embedded broker acknowledges a publish as soon as it is
//! in its in-memory log and never slows a device down by itself, so a store that falls behind
//! would end in the broker evicting acknowledged messages. With `local.backpressure` (the
//! default) edgeferry owns the device-facing listeners and relays each connection to rumqttd on
//! an internal loopback port. While the store's input channel is more than half full, the relay
//! stops reading from devices: their bytes wait in the kernel, TCP flow control holds them back,
//! and a QoS 1 device waits for PUBACKs with its own messages still on the device. Reading
//! resumes when the channel is down to an eighth.
//!
//! After the gate closes, only what devices had already sent can still reach the broker: at most
//! one relay buffer per connection, and for a QoS 1 device no more than its in-flight window.
//! `local.buffer` needs to cover that, not a whole stall.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::queue::StoreHandle;
use crate::telemetry::Metrics;

/// Bytes read from a device per relay step (and the most one connection can add to the broker's
/// log after the gate closes).
const RELAY_BUFFER: usize = 4096;

/// How often a closed gate looks at the store again.
const REOPEN_POLL: Duration = Duration::from_millis(2);

/// Pause log lines, at most one per this period.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Open while devices may send; shared by every relay and every ingest link.
#[derive(Clone)]
pub struct Gate {
    open: Arc<watch::Sender<bool>>,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    log: Arc<std::sync::Mutex<PauseLog>>,
    /// Set at shutdown: the gate stays closed.
    halted: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct PauseLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl Gate {
    /// A gate that stays closed until [`Gate::broker_ready`]: a device that connects while the
    /// broker is still starting waits (its bytes queue in the kernel) instead of being refused.
    pub fn new(store: StoreHandle, metrics: Arc<Metrics>) -> Gate {
        let (open, _) = watch::channel(false);
        Gate {
            open: Arc::new(open),
            store,
            metrics,
            log: Arc::default(),
            halted: Arc::default(),
        }
    }

    /// Open for the first time: the broker serves MQTT at `broker` (checked here, retrying until
    /// it does or `shutdown`).
    pub async fn broker_ready(&self, broker: SocketAddr, shutdown: CancellationToken) {
        while mqtt_handshake(broker).await.is_err() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        self.reopen();
    }

    /// Open, unless halted. Under the watch's lock, so a concurrent [`Gate::halt`] wins.
    fn reopen(&self) {
        let halted = &self.halted;
        self.open.send_if_modified(|open| {
            if halted.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            *open = true;
            true
        });
    }

    /// Close for good (shutdown): devices get no more PUBACKs for messages ingest would not
    /// take, so whatever they were acknowledged is drained and committed before exit.
    pub fn halt(&self) {
        self.open.send_modify(|open| {
            self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
            *open = false;
        });
    }

    /// Called by ingest after each message it hands to the store: close the gate if the store is
    /// falling behind, and reopen it (from a task of its own) once it has caught up.
    pub fn check(&self) {
        let (len, capacity) = self.store.backlog();
        if len < capacity / 2 {
            return;
        }
        // Only the caller that actually closes it starts the reopen task.
        if !self
            .open
            .send_if_modified(|open| std::mem::replace(open, false))
        {
            return;
        }
        self.metrics.local_paused.inc();
        self.metrics.local_paused_now.set(1);
        self.log_pause(len, capacity);
        let gate = self.clone();
        tokio::spawn(async move {
            let since = Instant::now();
            loop {
                tokio::time::sleep(REOPEN_POLL).await;
                let (len, capacity) = gate.store.backlog();
                if len <= capacity / 8 || gate.store.is_closed() {
                    break;
                }
            }
            gate.metrics
                .local_paused_ms
                .add(since.elapsed().as_millis() as u64);
            gate.metrics.local_paused_now.set(0);
            gate.reopen();
            debug!(paused = ?since.elapsed(), "local devices resumed");
        });
    }

    fn log_pause(&self, len: usize, capacity: usize) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.unlogged += 1;
        if log.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            warn!(pauses = log.unlogged, store_backlog = len, capacity,
                "the store is behind: reading from local devices is paused until it catches up (TCP holds devices back; nothing is dropped; see edgeferry_local_paused_total)");
            log.unlogged = 0;
            log.last = Some(Instant::now());
        }
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.open.subscribe()
    }
}

/// One MQTT 3.1.1 session (CONNECT, CONNACK, DISCONNECT): proves the broker serves devices, and
/// unlike a bare TCP connect it does not make rumqttd log an aborted connection at ERROR.
pub async fn mqtt_handshake(addr: std::net::SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Unique per probe: two probes with one client id would take each other's session over.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("edgeferry-ready-probe-{n}");
    let client_id = id.as_bytes();
    let mut connect = vec![0x10, (12 + client_id.len()) as u8];
    // Protocol "MQTT" level 4, clean session, keepalive 60 s, client id.
    connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id);
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(&connect).await?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).await?;
        if connack != [0x20, 0x02, 0x00, 0x00] {
            return Err(std::io::Error::other(format!(
                "unexpected CONNACK {connack:02x?}"
            )));
        }
        // DISCONNECT and close at once, as a device would (waiting for the broker to close
        // first makes rumqttd log a "router-drop" ERROR).
        s.write_all(&[0xE0, 0x00]).await?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Accept device connections on `listener` and relay each to the broker at `broker`, reading
/// from devices only while the gate is open. Returns when `shutdown` fires.
pub async fn relay(
    name: &'static str,
    listener: TcpListener,
    broker: SocketAddr,
    gate: Gate,
    shutdown: CancellationToken,
) {
    loop {
        let (device, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    warn!(listener = name, error = %e, "accepting a device connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let open = gate.subscribe();
        tokio::spawn(async move {
            if let Err(e) = relay_one(device, broker, open).await {
                debug!(listener = name, %peer, error = %e, "device connection ended");
            }
        });
    }
    info!(listener = name, "local listener closed");
}

async fn relay_one(
    device: TcpStream,
    broker: SocketAddr,
    mut open: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Not before the broker is ready (nor while devices are held back).
    if open.wait_for(|open| *open).await.is_err() {
        return Ok(());
    }
    let upstream = TcpStream::connect(broker).await?;
    device.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (mut device_rx, mut device_tx) = device.into_split();
    let (mut broker_rx, mut broker_tx) = upstream.into_split();
    let inbound = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        loop {
            if open.wait_for(|open| *open).await.is_err() {
                return Ok::<(), std::io::Error>(());
            }
            let n = device_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            broker_tx.write_all(&buf[..n]).await?;
        }
    };
    let outbound = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        loop {
            let n = broker_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            device_tx.write_all(&buf[..n]).await?;
        }
    };
    // Either side closing ends the connection: both sockets are dropped (closed) here.
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
    }
}
