//! The embedded rumqttd broker: what devices do with each other (subscriptions, retained
//! messages, wills). It listens only on an internal loopback port; devices reach it through the
//! ingress ([`super::mqtt`]), which terminates their publishes (PUBACK after commit) and hands
//! the broker a QoS 0 copy only when a local subscription or the retain flag needs one. The
//! telemetry path never waits on it.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tracing::{debug, error, warn};

use crate::config::Config;

use super::mqtt::IngestError;

/// The configured broker, not yet started.
pub struct LocalBroker {
    broker: rumqttd::Broker,
    /// Internal listeners: MQTT 3.1.1, and MQTT 5 when `local.listen_v5` is set.
    pub v4: SocketAddr,
    pub v5: Option<SocketAddr>,
}

impl LocalBroker {
    pub fn new(config: &Config) -> Result<LocalBroker, IngestError> {
        let v4 = free_loopback_port()
            .map_err(|e| IngestError::Broker(format!("no internal port: {e}")))?;
        let v5 = match config.local.listen_v5 {
            Some(_) => Some(
                free_loopback_port()
                    .map_err(|e| IngestError::Broker(format!("no internal port: {e}")))?,
            ),
            None => None,
        };
        let broker = rumqttd::Broker::new(broker_config(config, v4, v5)?);
        Ok(LocalBroker { broker, v4, v5 })
    }

    /// Start the broker on its own threads and wait until it serves MQTT on its internal port.
    pub async fn start(self) -> Result<(), IngestError> {
        let LocalBroker { mut broker, v4, .. } = self;
        let alerts = broker
            .alerts()
            .map_err(|e| IngestError::Broker(e.to_string()))?;
        std::thread::Builder::new()
            .name("edgeferry-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    error!(error = %e, "local broker stopped");
                }
            })
            .map_err(|e| IngestError::Broker(format!("cannot start thread: {e}")))?;
        tokio::spawn(async move {
            while let Ok(batch) = alerts.next().await {
                for alert in batch {
                    // rumqttd does not export AlertKind; its name() is the stable handle.
                    if alert.kind.name() == "cursor_jump" {
                        debug!(client = %alert.client_id, kind = ?alert.kind, "local broker alert");
                    } else {
                        warn!(client = %alert.client_id, kind = ?alert.kind, "local broker alert");
                    }
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if mqtt_handshake(v4).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(IngestError::Broker(
                    "the embedded broker did not start serving within 10s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A loopback port free right now, for rumqttd's internal listener. 127.0.0.2 (also loopback on
/// Linux) keeps it out of the way of whatever else on the box picks ports on 127.0.0.1; the port
/// is free when picked and rumqttd binds it moments later.
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.2:0")
        .or_else(|_| TcpListener::bind("127.0.0.1:0"))?
        .local_addr()
}

/// rumqttd's configuration, written as its own TOML (several of its fields are private and
/// settable only through deserialisation). Alerts are pushed every 5 s; rumqttd's timer unwraps
/// both intervals, so meters must be configured too (daily, unused). Its log holds only what
/// local subscribers have not read yet: telemetry no longer passes through it.
fn broker_config(
    config: &Config,
    v4: SocketAddr,
    v5: Option<SocketAddr>,
) -> Result<rumqttd::Config, IngestError> {
    let l = &config.local;
    // The ingress already refused anything larger; room for topic and properties on top.
    let max_payload = l.max_payload.0 + 70 * 1024;
    let segment = (4 * max_payload).max(1 << 20);
    let connections = format!(
        "connection_timeout_ms = 10000\nmax_payload_size = {max_payload}\nmax_inflight_count = 100\ndynamic_filters = true\n",
    );
    let mut text = format!(
        "id = 0\n\
         [router]\nid = 0\nmax_connections = {}\nmax_outgoing_packet_count = 1024\nmax_segment_size = {segment}\nmax_segment_count = 4\n\
         [metrics.alerts]\npush_interval = 5\n[metrics.meters]\npush_interval = 86400\n\
         [v4.1]\nname = \"local-v4\"\nlisten = \"{v4}\"\nnext_connection_delay_ms = 0\n[v4.1.connections]\n{connections}",
        // The ingress enforces local.max_connections; the probes need a little room on top.
        l.max_connections + 8,
    );
    if let Some(v5) = v5 {
        text += &format!(
            "[v5.1]\nname = \"local-v5\"\nlisten = \"{v5}\"\nnext_connection_delay_ms = 0\n[v5.1.connections]\n{connections}"
        );
    }
    toml::from_str(&text).map_err(|e| IngestError::Broker(format!("internal config: {e}")))
}

/// One MQTT 3.1.1 session (CONNECT, CONNACK, DISCONNECT): proves a broker serves devices, and
/// unlike a bare TCP connect it does not make rumqttd log an aborted connection at ERROR.
pub async fn mqtt_handshake(addr: SocketAddr) -> std::io::Result<()> {
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
