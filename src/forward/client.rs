//! One upstream connection attempt, for MQTT 3.1.1 or MQTT 5, behind one small interface.
//!
//! Each session gets a fresh rumqttc event loop with a clean session, and the loop is dropped
//! when the session ends: rumqttc would otherwise replay its own in-memory pending list after a
//! reconnect, and the queue, not that list, must be the only thing that replays.

use std::io::BufReader;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rumqttc::Outgoing;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backoff::Reconnect;
use crate::config::{split_host_port, Config, Protocol};
use crate::telemetry::DeadLetterReason;

/// What the session learns from the connection, in order.
#[derive(Debug)]
pub enum UpEvent {
    /// CONNACK accepted. `max_packet` is the broker's packet size limit and `receive_max` its
    /// limit on unacknowledged publishes, if it announced them (MQTT 5).
    Connected {
        max_packet: Option<u32>,
        receive_max: Option<u16>,
    },
    /// The next publish handed to the client went out with this packet id.
    Sent(u16),
    /// PUBACK for a packet id; `refusal` is set when the broker refused the message (MQTT 5).
    Acked { pkid: u16, refusal: Option<Refusal> },
    /// A message on a subscribed (downlink) topic.
    Message { topic: String, payload: Vec<u8> },
    /// rumqttc parked a publish behind an unacknowledged one with the same packet id. The
    /// forwarder never hands it such a publish; should it happen anyway, the session is
    /// restarted rather than left waiting for rumqttc to release it (which, after a refused
    /// PUBACK, it never does).
    Collision(u16),
    /// Another packet from the upstream (PINGRESP, SUBACK): the link carries traffic both ways.
    Heard,
}

/// An MQTT 5 PUBACK with a failure reason code.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: String,
    /// Worth sending again later (quota, transient broker trouble) rather than dead-lettering.
    pub retry: bool,
    /// The dead-letter label when final.
    pub label: DeadLetterReason,
}

/// Decide whether a refused publish is worth a retry. Refusals about the message itself
/// (authorisation, topic, payload format) will never succeed and go to the dead-letter table;
/// anything that may be transient is retried after a reconnect.
pub fn classify_refusal(reason: PubAckReason) -> Option<Refusal> {
    use PubAckReason::*;
    let (retry, label) = match reason {
        Success | NoMatchingSubscribers => return None,
        TopicNameInvalid => (false, DeadLetterReason::InvalidTopic),
        NotAuthorized | PayloadFormatInvalid => (false, DeadLetterReason::Refused),
        UnspecifiedError | ImplementationSpecificError | PacketIdentifierInUse | QuotaExceeded => {
            (true, DeadLetterReason::Refused)
        }
    };
    Some(Refusal {
        reason: format!("upstream PUBACK reason {reason:?}"),
        retry,
        label,
    })
}

/// Why a session ended. The variant decides whether a message in flight is blamed: only
/// [`SessionError::Lost`] and [`SessionError::Unacked`] count towards quarantining a message as
/// poison, and only [`SessionError::Message`] names a message outright.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No session was established (TCP, TLS, timeout before CONNACK): an outage or a
    /// configuration problem, never blamed on a message.
    #[error("{0}")]
    Unreachable(String),
    /// The upstream answered CONNECT with a refusal (credentials, authorisation, client id).
    #[error("upstream refused the connection: {0}")]
    Refused(String),
    /// The connection was lost after CONNACK without a reason that clears the messages in
    /// flight (closed, reset, or a DISCONNECT for a malformed packet or protocol error): the
    /// message in flight may be the cause.
    #[error("{0}")]
    Lost(String),
    /// The session ended for a reason that is about no message: the broker shutting down or
    /// taking the session over, a silent link (no PINGRESP), a client-side failure.
    #[error("{0}")]
    Ended(String),
    /// The upstream, or the codec, named a message as the cause (packet too large, topic name
    /// invalid, payload format invalid): final for the message that was in flight.
    #[error("{detail}")]
    Message {
        reason: DeadLetterReason,
        detail: String,
    },
    /// A message stayed unacknowledged while the upstream kept answering other packets.
    #[error("{0}")]
    Unacked(String),
}

/// Connection settings derived once from the config.
#[derive(Clone)]
pub struct Settings {
    pub protocol: Protocol,
    /// The address the next session connects to (one of `addresses`).
    pub host: String,
    pub port: u16,
    /// `upstream.address`, in order of preference.
    pub addresses: Vec<(String, u16)>,
    pub reconnect: Reconnect,
    pub failback_after: Duration,
    /// What the server certificate is checked against, for error messages.
    pub trust: String,
    /// The client certificate file, for error messages.
    pub client_cert: Option<std::path::PathBuf>,
    /// How the current session's connection attempt went (replaced for every session).
    pub report: Arc<Report>,
    pub client_id: String,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
    pub tls: Option<Arc<ClientConfig>>,
    pub window: u16,
    pub max_packet: usize,
    pub id_property: String,
    /// Strikes before a message is quarantined as poison (`upstream.poison_after`).
    pub poison_after: u32,
}

impl Settings {
    pub fn from_config(config: &Config) -> Result<Settings, String> {
        let up = &config.upstream;
        let addresses = up
            .address
            .0
            .iter()
            .map(|a| split_host_port(a).map_err(|e| format!("upstream.address: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let (host, port) = addresses
            .first()
            .cloned()
            .ok_or("upstream.address: no address")?;
        let tls = if up.tls {
            Some(tls_config(config)?)
        } else {
            None
        };
        Ok(Settings {
            protocol: up.protocol,
            host,
            port,
            addresses,
            reconnect: Reconnect {
                initial: up.backoff_initial.0,
                max: up.backoff_max.0,
                stable_after: up.stable_after.0,
                spread: up.reconnect_spread.0,
            },
            failback_after: up.failback_after.0,
            trust: match &up.ca_file {
                Some(f) => format!("upstream.ca_file {}", f.display()),
                None => "the system CA store".into(),
            },
            client_cert: up.cert_file.clone(),
            report: Arc::default(),
            client_id: config.client_id(),
            keepalive: up.keepalive.0,
            connect_timeout: up.connect_timeout.0,
            username: up.username.clone(),
            password: up.password.clone(),
            password_file: up.password_file.clone(),
            tls,
            window: up.inflight,
            // Room for the largest local payload plus a maximal topic and properties.
            max_packet: config.local.max_payload.0 as usize + 70 * 1024,
            id_property: up.id_property.clone(),
            poison_after: up.poison_after,
        })
    }

    /// Password, read from `password_file` at each connect so a rotated secret is picked up.
    fn password(&self) -> Result<Option<String>, String> {
        if let Some(f) = &self.password_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("upstream.password_file {}: {e}", f.display()))?;
            return Ok(Some(text.lines().next().unwrap_or("").to_string()));
        }
        Ok(self.password.clone())
    }
}

/// rustls client configuration (ring provider): the CA file or the system roots, and an
/// optional client certificate. Errors name the key and file.
pub fn tls_config(config: &Config) -> Result<Arc<ClientConfig>, String> {
    let up = &config.upstream;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream.tls: {e}"))?;
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &up.ca_file {
        let certs = read_certs(ca).map_err(|e| format!("upstream.ca_file: {e}"))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("upstream.ca_file {}: {e}", ca.display()))?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err("upstream.tls: no system CA certificates found; install ca-certificates or set upstream.ca_file".into());
        }
    }
    let builder = builder.with_root_certificates(roots);
    let cfg = match (&up.cert_file, &up.key_file) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert).map_err(|e| format!("upstream.cert_file: {e}"))?;
            let key = read_key(key).map_err(|e| format!("upstream.key_file: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("upstream.key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut BufReader::new(f)).collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no PEM private key found", path.display()))
}

/// A connected (or connecting) client; publishes go out in call order.
pub enum UpClient {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient, String),
}

pub type Events = mpsc::Receiver<Result<UpEvent, SessionError>>;

impl UpClient {
    /// Start a session: the event loop runs on its own task and reports through `Events`; the
    /// first report is `Connected` or an error. When the loop fails, the acknowledgements it had
    /// already read are reported before the error, so those messages are not resent.
    pub fn connect(s: &Settings) -> Result<(UpClient, Events, JoinHandle<()>), SessionError> {
        let password = s.password().map_err(SessionError::Unreachable)?;
        // The forwarder never has more than `window` publishes outstanding; the channel needs
        // no more room than that plus the subscriptions and the disconnect.
        let cap = s.window as usize + 8;
        let (tx, rx) = mpsc::channel(256);
        let report = s.report.clone();
        let ctx = Context::of(s);
        match s.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.host, s.port);
                o.set_keep_alive(s.keepalive)
                    .set_clean_session(true)
                    .set_inflight(s.window)
                    .set_max_packet_size(64 * 1024, s.max_packet);
                if let Some(u) = &s.username {
                    o.set_credentials(u, password.unwrap_or_default());
                }
                if let Some(tls) = &s.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.clone()),
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, cap);
                el.network_options
                    .set_connection_timeout(s.connect_timeout.as_secs().max(1));
                let task = tokio::spawn(async move {
                    let mut connected = false;
                    loop {
                        let ev = match el.poll().await {
                            Ok(ev) => ev,
                            Err(e) => {
                                for ev in el.state.events.drain(..) {
                                    if let Some(ev) = convert_v4(ev) {
                                        let _ = tx.send(Ok(ev)).await;
                                    }
                                }
                                report.failed(link_error_v4(&e, &ctx));
                                let _ = tx.send(Err(classify_v4(&e, connected))).await;
                                return;
                            }
                        };
                        let Some(ev) = convert_v4(ev) else { continue };
                        if matches!(ev, UpEvent::Connected { .. }) {
                            connected = true;
                            report.connected.send_replace(true);
                        }
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok((UpClient::V4(client), rx, task))
            }
            Protocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(&s.client_id, &s.host, s.port);
                o.set_keep_alive(s.keepalive)
                    .set_clean_start(true)
                    .set_outgoing_inflight_upper_limit(s.window)
                    .set_max_packet_size(Some(64 * 1024))
                    .set_connection_timeout(s.connect_timeout.as_secs().max(1));
                if let Some(u) = &s.username {
                    o.set_credentials(u, password.unwrap_or_default());
                }
                if let Some(tls) = &s.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.clone()),
                    ));
                }
                let (client, mut el) = rumqttc::v5::AsyncClient::new(o, cap);
                let task = tokio::spawn(async move {
                    let mut connected = false;
                    loop {
                        let ev = match el.poll().await {
                            Ok(ev) => ev,
                            Err(e) => {
                                for ev in el.state.events.drain(..) {
                                    if let Some(ev) = convert_v5(ev) {
                                        let _ = tx.send(Ok(ev)).await;
                                    }
                                }
                                report.failed(link_error_v5(&e, &ctx));
                                let _ = tx.send(Err(classify_v5(&e, connected))).await;
                                return;
                            }
                        };
                        let Some(ev) = convert_v5(ev) else { continue };
                        if matches!(ev, UpEvent::Connected { .. }) {
                            connected = true;
                            report.connected.send_replace(true);
                        }
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok((UpClient::V5(client, s.id_property.clone()), rx, task))
            }
        }
    }

    /// Queue a QoS 1 publish carrying `id` (as a user property on MQTT 5). An error means the
    /// event loop has ended (its reason arrives on `Events`): the topic was checked beforehand
    /// with [`topic_name_problem`], which includes rumqttc's own check.
    pub async fn publish(&self, topic: &str, payload: Bytes, id: String) -> Result<(), String> {
        match self {
            UpClient::V4(c) => c
                .publish_bytes(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string()),
            UpClient::V5(c, prop) => c
                .publish_bytes_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    id_properties(prop, id),
                )
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Subscribe to a downlink topic filter with QoS 1. Takes a packet id, like a publish.
    pub async fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            UpClient::V4(c) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
            UpClient::V5(c, _) => c
                .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn disconnect(&self) {
        let _ = match self {
            UpClient::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            UpClient::V5(c, _) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

fn id_properties(prop: &str, id: String) -> rumqttc::v5::mqttbytes::v5::PublishProperties {
    rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![(prop.to_string(), id)],
        ..Default::default()
    }
}

/// The exact size on the wire of the QoS 1 PUBLISH this client sends for a message, computed
/// by rumqttc's own encoder (with the packet id and, on MQTT 5, the id property): the size a
/// broker's maximum packet size applies to.
pub fn publish_size(
    protocol: Protocol,
    topic: &str,
    payload: &Bytes,
    id_property: &str,
    id: &str,
) -> usize {
    match protocol {
        Protocol::V311 => {
            let mut p =
                rumqttc::Publish::from_bytes(topic, rumqttc::QoS::AtLeastOnce, payload.clone());
            // Every QoS 1 publish carries a packet id; rumqttc counts it only once one is set.
            p.pkid = 1;
            p.size()
        }
        Protocol::V5 => {
            let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                payload.clone(),
                Some(id_properties(id_property, id.to_string())),
            );
            p.pkid = 1;
            p.size()
        }
    }
}

/// Why `topic` cannot be sent as an MQTT topic name, if it cannot. Rows are checked before they
/// are published because a row may have been written by an older version or rendered by a
/// template that has since changed, and a broker disconnects a client that sends such a name
/// (which would otherwise stop the queue at that row).
///
/// The rules ingest applies ([`crate::route::check_topic_str`]: empty, wildcards, NUL, over
/// 65535 bytes), then two that MQTT only discourages but Mosquitto enforces with a disconnect:
/// control characters (U+0001-U+001F, U+007F-U+009F) and Unicode noncharacters.
pub fn topic_name_problem(topic: &str) -> Option<String> {
    if let Err(e) = crate::route::check_topic_str(topic) {
        return Some(e.to_string());
    }
    if !rumqttc::valid_topic(topic) {
        return Some("refused by the MQTT client as a topic name".into());
    }
    if topic.chars().any(char::is_control) {
        return Some("control character in the topic".into());
    }
    let noncharacter = |c: char| {
        let c = u32::from(c);
        (0xFDD0..=0xFDEF).contains(&c) || c & 0xFFFE == 0xFFFE
    };
    if topic.chars().any(noncharacter) {
        return Some("Unicode noncharacter in the topic".into());
    }
    None
}

fn convert_v4(ev: rumqttc::Event) -> Option<UpEvent> {
    use rumqttc::{Event, Packet};
    Some(match ev {
        Event::Incoming(Packet::ConnAck(_)) => UpEvent::Connected {
            max_packet: None,
            receive_max: None,
        },
        Event::Incoming(Packet::PubAck(p)) => UpEvent::Acked {
            pkid: p.pkid,
            refusal: None,
        },
        Event::Incoming(Packet::Publish(p)) => UpEvent::Message {
            topic: p.topic,
            payload: p.payload.to_vec(),
        },
        Event::Incoming(Packet::PingResp | Packet::SubAck(_)) => UpEvent::Heard,
        Event::Outgoing(Outgoing::Publish(pkid)) => UpEvent::Sent(pkid),
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => UpEvent::Collision(pkid),
        _ => return None,
    })
}

fn convert_v5(ev: rumqttc::v5::Event) -> Option<UpEvent> {
    use rumqttc::v5::{Event, Incoming};
    Some(match ev {
        Event::Incoming(Incoming::ConnAck(ack)) => {
            let props = ack.properties.as_ref();
            UpEvent::Connected {
                max_packet: props.and_then(|p| p.max_packet_size),
                receive_max: props.and_then(|p| p.receive_max),
            }
        }
        Event::Incoming(Incoming::PubAck(p)) => UpEvent::Acked {
            pkid: p.pkid,
            refusal: classify_refusal(p.reason),
        },
        Event::Incoming(Incoming::Publish(p)) => UpEvent::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
        },
        Event::Incoming(Incoming::PingResp(_) | Incoming::SubAck(_)) => UpEvent::Heard,
        Event::Outgoing(Outgoing::Publish(pkid)) => UpEvent::Sent(pkid),
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => UpEvent::Collision(pkid),
        _ => return None,
    })
}

/// Sort an MQTT 3.1.1 session failure by what it says about the messages in flight.
fn classify_v4(e: &rumqttc::ConnectionError, connected: bool) -> SessionError {
    use rumqttc::{ConnectionError as C, StateError as S};
    match e {
        C::ConnectionRefused(code) => SessionError::Refused(format!("{code:?}")),
        _ if !connected => SessionError::Unreachable(e.to_string()),
        C::MqttState(S::Deserialization(rumqttc::Error::OutgoingPacketTooLarge {
            pkt_size,
            max,
        })) => SessionError::Message {
            reason: DeadLetterReason::TooLarge,
            detail: format!("a {pkt_size}-byte packet exceeds the client's limit of {max} bytes"),
        },
        C::MqttState(
            S::AwaitPingResp
            | S::CollisionTimeout
            | S::Unsolicited(_)
            | S::WrongPacket
            | S::InvalidState
            | S::EmptySubscription,
        )
        | C::RequestsDone => SessionError::Ended(e.to_string()),
        _ => SessionError::Lost(e.to_string()),
    }
}

/// Sort an MQTT 5 session failure by what it says about the messages in flight.
fn classify_v5(e: &rumqttc::v5::ConnectionError, connected: bool) -> SessionError {
    use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode as D;
    use rumqttc::v5::mqttbytes::Error as M;
    use rumqttc::v5::{ConnectionError as C, StateError as S};
    match e {
        C::ConnectionRefused(code) => SessionError::Refused(format!("{code:?}")),
        _ if !connected => SessionError::Unreachable(e.to_string()),
        C::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let detail = format!(
                "upstream sent DISCONNECT with reason {reason_code:?} (0x{:02X}){}",
                *reason_code as u8,
                reason_string
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            );
            let reason = match reason_code {
                D::PacketTooLarge => DeadLetterReason::TooLarge,
                D::TopicNameInvalid => DeadLetterReason::InvalidTopic,
                D::PayloadFormatInvalid => DeadLetterReason::Refused,
                // Perhaps a message the broker could not parse: worth a strike, not a verdict.
                D::MalformedPacket
                | D::ProtocolError
                | D::UnspecifiedError
                | D::ImplementationSpecificError => return SessionError::Lost(detail),
                // About the connection, the broker or the client, never one message.
                _ => return SessionError::Ended(detail),
            };
            SessionError::Message { reason, detail }
        }
        // Mosquitto answers a message over its `message_size_limit` with PUBACK reason 0x95,
        // which rumqttc 0.25 cannot decode (0x95 is not a PUBACK reason in MQTT 5) and reports
        // as an invalid return code. No other packet a publishing client receives can carry
        // 0x95 as an unknown code: it is a known code in CONNACK and DISCONNECT.
        C::MqttState(S::Deserialization(M::InvalidConnectReturnCode(0x95))) => {
            SessionError::Message {
                reason: DeadLetterReason::TooLarge,
                detail: "upstream answered PUBACK reason 0x95 (packet too large)".into(),
            }
        }
        C::MqttState(S::OutgoingPacketTooLarge { pkt_size, max }) => SessionError::Message {
            reason: DeadLetterReason::TooLarge,
            detail: format!(
                "a {pkt_size}-byte packet exceeds the upstream's maximum packet size {max}"
            ),
        },
        C::MqttState(
            S::AwaitPingResp
            | S::CollisionTimeout
            | S::Unsolicited(_)
            | S::WrongPacket
            | S::InvalidState
            | S::EmptySubscription
            | S::InvalidAlias { .. }
            | S::IncomingPacketTooLarge { .. }
            | S::ConnFail { .. },
        )
        | C::RequestsDone => SessionError::Ended(e.to_string()),
        _ => SessionError::Lost(e.to_string()),
    }
}

/// How a session's connection went, shared between its event loop task and the forwarder's
/// reconnect loop: whether CONNACK arrived, and the classified failure that ended it.
#[derive(Debug)]
pub struct Report {
    connected: watch::Sender<bool>,
    failure: Mutex<Option<LinkError>>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            connected: watch::channel(false).0,
            failure: Mutex::new(None),
        }
    }
}

impl Report {
    /// Becomes true when the broker accepted the connection.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// The failure that ended the session, if the client reported one.
    pub fn take_failure(&self) -> Option<LinkError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn failed(&self, error: LinkError) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// Why an upstream session failed, as far as the reconnect policy is concerned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The network: nothing answered, or the connection broke or timed out. Retried on the
    /// outage schedule.
    #[error("{0}")]
    Network(String),
    /// The broker refused the CONNECT with a reason code.
    #[error("upstream refused the connection: {code}, {}", reason.describe())]
    Refused {
        reason: ConnectRefusal,
        /// The code as the broker sent it, e.g. "BadUserNamePassword (reason code 0x86)".
        code: String,
    },
    /// The TLS handshake failed; `detail` says which certificate and why.
    #[error("TLS: {detail} [{}]", reason.label())]
    Tls { reason: TlsFailure, detail: String },
}

impl LinkError {
    /// Whether an operator (or the upstream's operator) must act before a retry can succeed:
    /// the circuit breaker opens instead of retrying on the outage schedule.
    pub fn needs_operator(&self) -> bool {
        match self {
            LinkError::Network(_) => false,
            LinkError::Refused { reason, .. } => reason.needs_operator(),
            LinkError::Tls { reason, .. } => *reason != TlsFailure::Other,
        }
    }
}

/// A CONNACK refusal, grouped by what it asks of the operator. `label()` names it in
/// `edgeferry_upstream_refusals_total{reason=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Bad user name or password, or a bad authentication method.
    BadCredentials,
    /// Not authorised.
    NotAuthorized,
    /// Banned.
    Banned,
    /// The client id was rejected.
    ClientId,
    /// Protocol version or packet refused: a configuration mismatch.
    Protocol,
    /// Busy, unavailable, quota or connection rate exceeded, moved: come back later, or try
    /// another address.
    Busy,
    /// Any other reason code.
    Other,
}

impl ConnectRefusal {
    pub fn label(self) -> &'static str {
        match self {
            ConnectRefusal::BadCredentials => "bad_credentials",
            ConnectRefusal::NotAuthorized => "not_authorized",
            ConnectRefusal::Banned => "banned",
            ConnectRefusal::ClientId => "client_id",
            ConnectRefusal::Protocol => "protocol",
            ConnectRefusal::Busy => "busy",
            ConnectRefusal::Other => "other",
        }
    }

    /// What the operator should look at.
    pub fn describe(self) -> &'static str {
        match self {
            ConnectRefusal::BadCredentials => {
                "check upstream.username and upstream.password_file (or password)"
            }
            ConnectRefusal::NotAuthorized => {
                "the upstream does not authorise this gateway; check its account or policy"
            }
            ConnectRefusal::Banned => "the upstream has banned this gateway",
            ConnectRefusal::ClientId => "the upstream rejects upstream.client_id",
            ConnectRefusal::Protocol => "the upstream rejects upstream.protocol",
            ConnectRefusal::Busy => "the upstream is busy or unavailable",
            ConnectRefusal::Other => "see the upstream's logs",
        }
    }

    /// Everything but "busy" needs someone to change something.
    pub fn needs_operator(self) -> bool {
        self != ConnectRefusal::Busy
    }

    fn from_v4(code: rumqttc::ConnectReturnCode) -> ConnectRefusal {
        use rumqttc::ConnectReturnCode::*;
        match code {
            Success => ConnectRefusal::Other,
            RefusedProtocolVersion => ConnectRefusal::Protocol,
            BadClientId => ConnectRefusal::ClientId,
            ServiceUnavailable => ConnectRefusal::Busy,
            BadUserNamePassword => ConnectRefusal::BadCredentials,
            NotAuthorized => ConnectRefusal::NotAuthorized,
        }
    }

    fn from_v5(code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> ConnectRefusal {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode::*;
        match code {
            BadUserNamePassword | BadAuthenticationMethod => ConnectRefusal::BadCredentials,
            NotAuthorized => ConnectRefusal::NotAuthorized,
            Banned => ConnectRefusal::Banned,
            ClientIdentifierNotValid | BadClientId => ConnectRefusal::ClientId,
            RefusedProtocolVersion
            | UnsupportedProtocolVersion
            | MalformedPacket
            | ProtocolError => ConnectRefusal::Protocol,
            ServerUnavailable
            | ServerBusy
            | ServiceUnavailable
            | QuotaExceeded
            | ConnectionRateExceeded
            | UseAnotherServer
            | ServerMoved => ConnectRefusal::Busy,
            _ => ConnectRefusal::Other,
        }
    }
}

/// Which TLS failure it was. `label()` names it in
/// `edgeferry_upstream_tls_failures_total{reason=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server certificate is not signed by a trusted CA.
    UnknownCa,
    /// The server certificate is not valid for the address's host name or IP.
    NameMismatch,
    /// The server certificate has expired or is not valid yet.
    Expired,
    /// The server refused (or required and did not get) a client certificate.
    ClientCertRefused,
    /// Any other TLS error.
    Other,
}

impl TlsFailure {
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::UnknownCa => "unknown_ca",
            TlsFailure::NameMismatch => "name_mismatch",
            TlsFailure::Expired => "expired",
            TlsFailure::ClientCertRefused => "client_cert_refused",
            TlsFailure::Other => "other",
        }
    }
}

/// What an error message needs to know about the session's settings.
#[derive(Debug, Clone)]
struct Context {
    host: String,
    trust: String,
    client_cert: Option<std::path::PathBuf>,
}

impl Context {
    fn of(s: &Settings) -> Context {
        Context {
            host: s.host.clone(),
            trust: s.trust.clone(),
            client_cert: s.client_cert.clone(),
        }
    }
}

fn link_error_v4(e: &rumqttc::ConnectionError, ctx: &Context) -> LinkError {
    if let rumqttc::ConnectionError::ConnectionRefused(code) = e {
        return LinkError::Refused {
            reason: ConnectRefusal::from_v4(*code),
            code: format!("{code:?} (return code {})", *code as u8),
        };
    }
    classify_tls(e, ctx).unwrap_or_else(|| LinkError::Network(e.to_string()))
}

fn link_error_v5(e: &rumqttc::v5::ConnectionError, ctx: &Context) -> LinkError {
    if let rumqttc::v5::ConnectionError::ConnectionRefused(code) = e {
        return LinkError::Refused {
            reason: ConnectRefusal::from_v5(*code),
            code: format!("{code:?} (reason code 0x{:02X})", v5_code(*code)),
        };
    }
    // rumqttc's MQTT 5 state error does not expose its cause as a source; a TLS alert read
    // while waiting for CONNACK (how TLS 1.3 servers refuse a client certificate) is in it.
    let hidden: Option<&(dyn std::error::Error + 'static)> = match e {
        rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::Deserialization(m)) => {
            Some(m)
        }
        _ => None,
    };
    classify_tls(e, ctx)
        .or_else(|| hidden.and_then(|m| classify_tls(m, ctx)))
        .unwrap_or_else(|| LinkError::Network(e.to_string()))
}

/// The MQTT 5 reason code number of a CONNACK refusal.
fn v5_code(code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode::*;
    match code {
        Success => 0x00,
        UnspecifiedError => 0x80,
        MalformedPacket => 0x81,
        ProtocolError => 0x82,
        ImplementationSpecificError => 0x83,
        UnsupportedProtocolVersion | RefusedProtocolVersion => 0x84,
        ClientIdentifierNotValid | BadClientId => 0x85,
        BadUserNamePassword => 0x86,
        NotAuthorized => 0x87,
        ServerUnavailable | ServiceUnavailable => 0x88,
        ServerBusy => 0x89,
        Banned => 0x8A,
        BadAuthenticationMethod => 0x8C,
        TopicNameInvalid => 0x90,
        PacketTooLarge => 0x95,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
        RetainNotSupported => 0x9A,
        QoSNotSupported => 0x9B,
        UseAnotherServer => 0x9C,
        ServerMoved => 0x9D,
        ConnectionRateExceeded => 0x9F,
    }
}

/// A TLS failure anywhere in the error's chain (rumqttc wraps rustls errors in I/O errors, whose
/// `source()` skips the wrapped error itself), named by kind.
fn classify_tls(e: &(dyn std::error::Error + 'static), ctx: &Context) -> Option<LinkError> {
    let tls = find_rustls(e)?;
    let (reason, detail) = describe_tls(tls, ctx);
    Some(LinkError::Tls {
        reason,
        detail: format!("{detail} ({tls})"),
    })
}

fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = find_rustls(inner) {
                return Some(tls);
            }
        }
        current = err.source();
    }
    None
}

fn describe_tls(e: &rustls::Error, ctx: &Context) -> (TlsFailure, String) {
    use rustls::{AlertDescription as A, CertificateError as C};
    let host = &ctx.host;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => (
                TlsFailure::UnknownCa,
                format!(
                    "unknown CA: the certificate of {host} is not signed by a CA in {}",
                    ctx.trust
                ),
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => (
                TlsFailure::NameMismatch,
                format!("name mismatch: the certificate presented is not valid for {host}"),
            ),
            C::Expired | C::ExpiredContext { .. } => (
                TlsFailure::Expired,
                format!("expired: the certificate of {host} has expired"),
            ),
            C::NotValidYet | C::NotValidYetContext { .. } => (
                TlsFailure::Expired,
                format!(
                    "not valid yet: the certificate of {host} is not valid yet; check the gateway's clock"
                ),
            ),
            _ => (
                TlsFailure::Other,
                format!("the certificate of {host} was rejected"),
            ),
        },
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired,
        ) => (
            TlsFailure::ClientCertRefused,
            match &ctx.client_cert {
                Some(f) => format!(
                    "client certificate refused: {host} does not accept upstream.cert_file {}",
                    f.display()
                ),
                None => format!(
                    "client certificate refused: {host} requires one; set upstream.cert_file and upstream.key_file"
                ),
            },
        ),
        _ => (TlsFailure::Other, format!("handshake with {host} failed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_about_the_message_are_final_others_retried() {
        assert!(classify_refusal(PubAckReason::Success).is_none());
        assert!(classify_refusal(PubAckReason::NoMatchingSubscribers).is_none());
        assert!(!classify_refusal(PubAckReason::NotAuthorized).unwrap().retry);
        assert!(
            !classify_refusal(PubAckReason::TopicNameInvalid)
                .unwrap()
                .retry
        );
        assert!(classify_refusal(PubAckReason::QuotaExceeded).unwrap().retry);
        assert_eq!(
            classify_refusal(PubAckReason::TopicNameInvalid)
                .unwrap()
                .label,
            DeadLetterReason::InvalidTopic
        );
    }

    /// The size check uses rumqttc's encoder: compare it with the bytes actually written, at
    /// the remaining-length boundaries and around a 2000-byte broker limit.
    #[test]
    fn publish_size_is_the_encoded_size() {
        let topic = "up/devices/meter-7/temp";
        let id = "gw-0001-1a2b3c4d-123456";
        for len in [
            0, 1, 100, 127, 128, 1900, 1957, 2000, 16_383, 16_384, 70_000,
        ] {
            let payload = Bytes::from(vec![b'x'; len]);
            let mut p4 =
                rumqttc::Publish::from_bytes(topic, rumqttc::QoS::AtLeastOnce, payload.clone());
            p4.pkid = 65535;
            let mut buf = bytes::BytesMut::new();
            let written = rumqttc::Packet::Publish(p4)
                .write(&mut buf, usize::MAX)
                .unwrap();
            assert_eq!(buf.len(), written);
            let size = publish_size(Protocol::V311, topic, &payload, "edgeferry-id", id);
            assert_eq!(size, buf.len(), "v3.1.1, payload {len}");

            let mut p5 = rumqttc::v5::mqttbytes::v5::Publish::new(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                payload.clone(),
                Some(id_properties("edgeferry-id", id.to_string())),
            );
            p5.pkid = 65535;
            let mut buf = bytes::BytesMut::new();
            rumqttc::v5::mqttbytes::v5::Packet::Publish(p5)
                .write(&mut buf, None)
                .unwrap();
            let size = publish_size(Protocol::V5, topic, &payload, "edgeferry-id", id);
            assert_eq!(size, buf.len(), "v5, payload {len}");
        }
    }

    #[test]
    fn topic_names_brokers_refuse_are_caught() {
        for ok in ["a", "up/devices/x/temp", "/", "a//b", "caf\u{e9}/\u{1F600}"] {
            assert_eq!(topic_name_problem(ok), None, "{ok:?}");
        }
        let long = "a".repeat(65_536);
        for bad in [
            "",
            "devices/+/x",
            "devices/#",
            "a\0b",
            "a\u{1}b",
            "a\u{7f}b",
            "a\u{85}b",
            "a\u{fffe}b",
            "a\u{1ffff}b",
            "a\u{fdd0}b",
            long.as_str(),
        ] {
            assert!(topic_name_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_reasons_about_a_message_blame_one() {
        use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode as D;
        use rumqttc::v5::{ConnectionError as C, StateError as S};
        let disconnect = |reason_code| {
            classify_v5(
                &C::MqttState(S::ServerDisconnect {
                    reason_code,
                    reason_string: None,
                }),
                true,
            )
        };
        assert!(matches!(
            disconnect(D::PacketTooLarge),
            SessionError::Message {
                reason: DeadLetterReason::TooLarge,
                ..
            }
        ));
        assert!(matches!(
            disconnect(D::TopicNameInvalid),
            SessionError::Message {
                reason: DeadLetterReason::InvalidTopic,
                ..
            }
        ));
        assert!(matches!(
            disconnect(D::PayloadFormatInvalid),
            SessionError::Message { .. }
        ));
        assert!(matches!(
            disconnect(D::MalformedPacket),
            SessionError::Lost(_)
        ));
        for d in [
            D::ServerShuttingDown,
            D::SessionTakenOver,
            D::KeepAliveTimeout,
            D::QuotaExceeded,
        ] {
            assert!(matches!(disconnect(d), SessionError::Ended(_)), "{d:?}");
        }
        // Mosquitto's PUBACK 0x95, which rumqttc cannot decode.
        let e = C::MqttState(S::Deserialization(
            rumqttc::v5::mqttbytes::Error::InvalidConnectReturnCode(0x95),
        ));
        assert!(matches!(
            classify_v5(&e, true),
            SessionError::Message {
                reason: DeadLetterReason::TooLarge,
                ..
            }
        ));
        // Before CONNACK nothing is blamed, whatever the error.
        assert!(matches!(
            classify_v5(&e, false),
            SessionError::Unreachable(_)
        ));
        let silent = C::MqttState(S::AwaitPingResp);
        assert!(matches!(classify_v5(&silent, true), SessionError::Ended(_)));
        let closed = rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted);
        assert!(matches!(classify_v4(&closed, true), SessionError::Lost(_)));
        assert!(matches!(
            classify_v4(&closed, false),
            SessionError::Unreachable(_)
        ));
    }

    fn ctx() -> Context {
        Context {
            host: "broker.example".into(),
            trust: "upstream.ca_file /etc/edgeferry/ca.pem".into(),
            client_cert: None,
        }
    }

    /// rumqttc reports TLS failures as rustls errors wrapped in I/O errors, at handshake time
    /// (server certificate) or at the first read (TLS 1.3 client certificate alerts).
    #[test]
    fn tls_failures_are_named_through_the_error_chain() {
        use rustls::{AlertDescription, CertificateError};
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let handshake = |e| {
            rumqttc::ConnectionError::Tls(rumqttc::TlsError::Io(wrap(
                rustls::Error::InvalidCertificate(e),
            )))
        };
        let cases = [
            (
                CertificateError::UnknownIssuer,
                TlsFailure::UnknownCa,
                "unknown CA",
            ),
            (
                CertificateError::NotValidForName,
                TlsFailure::NameMismatch,
                "name mismatch",
            ),
            (CertificateError::Expired, TlsFailure::Expired, "expired"),
            (CertificateError::NotValidYet, TlsFailure::Expired, "clock"),
        ];
        for (cert, want, words) in cases {
            let e = link_error_v4(&handshake(cert), &ctx());
            let LinkError::Tls { reason, .. } = &e else {
                panic!("not a TLS failure: {e}")
            };
            assert_eq!(*reason, want);
            assert!(e.to_string().contains(words), "{e}");
            assert!(e.needs_operator());
        }
        let e = link_error_v4(&handshake(CertificateError::UnknownIssuer), &ctx());
        assert!(e.to_string().contains("/etc/edgeferry/ca.pem"), "{e}");
        let alert = rumqttc::v5::ConnectionError::MqttState(
            rumqttc::v5::StateError::Deserialization(rumqttc::v5::mqttbytes::Error::Io(wrap(
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            ))),
        );
        let e = link_error_v5(&alert, &ctx());
        assert!(
            matches!(
                e,
                LinkError::Tls {
                    reason: TlsFailure::ClientCertRefused,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("upstream.cert_file"), "{e}");
        let v4_alert = rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(wrap(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA,
            ))),
        ));
        assert!(matches!(
            link_error_v4(&v4_alert, &ctx()),
            LinkError::Tls {
                reason: TlsFailure::ClientCertRefused,
                ..
            }
        ));
        let plain = rumqttc::ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(
            link_error_v4(&plain, &ctx()),
            LinkError::Network(_)
        ));
    }

    #[test]
    fn connack_refusals_open_the_breaker_unless_the_broker_is_busy() {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5;
        let refused =
            |c| link_error_v5(&rumqttc::v5::ConnectionError::ConnectionRefused(c), &ctx());
        let e = refused(V5::BadUserNamePassword);
        assert!(e.needs_operator());
        assert!(e.to_string().contains("0x86"), "{e}");
        assert!(refused(V5::Banned).needs_operator());
        assert!(refused(V5::NotAuthorized).needs_operator());
        assert!(!refused(V5::ServerBusy).needs_operator());
        assert!(!refused(V5::ConnectionRateExceeded).needs_operator());
        let v4 = link_error_v4(
            &rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::BadUserNamePassword,
            ),
            &ctx(),
        );
        assert!(v4.needs_operator());
        assert!(v4.to_string().contains("return code 4"), "{v4}");
    }

    #[test]
    fn every_label_has_a_metric() {
        use crate::telemetry::{UPSTREAM_REFUSAL_REASONS, UPSTREAM_TLS_FAILURES};
        for r in [
            ConnectRefusal::BadCredentials,
            ConnectRefusal::NotAuthorized,
            ConnectRefusal::Banned,
            ConnectRefusal::ClientId,
            ConnectRefusal::Protocol,
            ConnectRefusal::Busy,
            ConnectRefusal::Other,
        ] {
            assert!(UPSTREAM_REFUSAL_REASONS.contains(&r.label()));
        }
        for t in [
            TlsFailure::UnknownCa,
            TlsFailure::NameMismatch,
            TlsFailure::Expired,
            TlsFailure::ClientCertRefused,
            TlsFailure::Other,
        ] {
            assert!(UPSTREAM_TLS_FAILURES.contains(&t.label()));
        }
    }
}
