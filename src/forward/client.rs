//! One upstream connection attempt, for MQTT 3.1.1 or MQTT 5, behind one small interface.
//!
//! Each session gets a fresh rumqttc event loop with a clean session, and the loop is dropped
//! when the session ends: rumqttc would otherwise replay its own in-memory pending list after a
//! reconnect, and the queue, not that list, must be the only thing that replays.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rumqttc::Outgoing;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    pub host: String,
    pub port: u16,
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
        let (host, port) = split_host_port(&up.address)?;
        let tls = if up.tls {
            Some(tls_config(config)?)
        } else {
            None
        };
        Ok(Settings {
            protocol: up.protocol,
            host,
            port,
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
                                let _ = tx.send(Err(classify_v4(&e, connected))).await;
                                return;
                            }
                        };
                        let Some(ev) = convert_v4(ev) else { continue };
                        connected |= matches!(ev, UpEvent::Connected { .. });
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
                                let _ = tx.send(Err(classify_v5(&e, connected))).await;
                                return;
                            }
                        };
                        let Some(ev) = convert_v5(ev) else { continue };
                        connected |= matches!(ev, UpEvent::Connected { .. });
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

/// Whether a session error means the operator must act (credentials, authorisation) rather
/// than wait for the network.
pub fn needs_operator(error: &SessionError) -> bool {
    let SessionError::Refused(error) = error else {
        return false;
    };
    error.contains("NotAuthorized")
        || error.contains("BadUserNamePassword")
        || error.contains("BadUserNameOrPassword")
        || error.contains("Banned")
        || error.contains("BadClientId")
        || error.contains("ClientIdentifierNotValid")
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
}
