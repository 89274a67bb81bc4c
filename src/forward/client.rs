//! One upstream connection attempt, for MQTT 3.1.1 or MQTT 5, behind one small interface.
//!
//! Each session gets a fresh rumqttc event loop with a clean session, and the loop is dropped
//! when the session ends: rumqttc would otherwise replay its own in-memory pending list after a
//! reconnect, and the queue, not that list, must be the only thing that replays.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{split_host_port, Config, Protocol};

/// What the session learns from the connection, in order.
#[derive(Debug)]
pub enum UpEvent {
    /// CONNACK accepted; `max_packet` is the broker's limit if it announced one (MQTT 5).
    Connected { max_packet: Option<u32> },
    /// The next publish handed to the client went out with this packet id.
    Sent(u16),
    /// PUBACK for a packet id; `refusal` is set when the broker refused the message (MQTT 5).
    Acked { pkid: u16, refusal: Option<Refusal> },
    /// A message on a subscribed (downlink) topic.
    Message { topic: String, payload: Vec<u8> },
}

/// An MQTT 5 PUBACK with a failure reason code.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: String,
    /// Worth sending again later (quota, transient broker trouble) rather than dead-lettering.
    pub retry: bool,
}

/// Decide whether a refused publish is worth a retry. Refusals about the message itself
/// (authorisation, topic, payload format) will never succeed and go to the dead-letter table;
/// anything that may be transient is retried after a reconnect.
pub fn classify_refusal(reason: PubAckReason) -> Option<Refusal> {
    use PubAckReason::*;
    let retry = match reason {
        Success | NoMatchingSubscribers => return None,
        NotAuthorized | TopicNameInvalid | PayloadFormatInvalid => false,
        UnspecifiedError | ImplementationSpecificError | PacketIdentifierInUse | QuotaExceeded => {
            true
        }
    };
    Some(Refusal {
        reason: format!("upstream PUBACK reason {reason:?}"),
        retry,
    })
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

pub type Events = mpsc::Receiver<Result<UpEvent, String>>;

impl UpClient {
    /// Start a session: the event loop runs on its own task and reports through `Events`; the
    /// first report is `Connected` or an error.
    pub fn connect(s: &Settings) -> Result<(UpClient, Events, JoinHandle<()>), String> {
        let password = s.password()?;
        // The forwarder never has more than `window` publishes outstanding; the channel needs
        // no more room than that plus the disconnect.
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
                    use rumqttc::{Event, Outgoing, Packet};
                    loop {
                        let ev = match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                UpEvent::Connected { max_packet: None }
                            }
                            Ok(Event::Incoming(Packet::PubAck(p))) => UpEvent::Acked {
                                pkid: p.pkid,
                                refusal: None,
                            },
                            Ok(Event::Incoming(Packet::Publish(p))) => UpEvent::Message {
                                topic: p.topic,
                                payload: p.payload.to_vec(),
                            },
                            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => UpEvent::Sent(pkid),
                            Ok(_) => continue,
                            Err(e) => {
                                let _ = tx.send(Err(describe_v4(&e))).await;
                                return;
                            }
                        };
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
                    use rumqttc::v5::{Event, Incoming};
                    use rumqttc::Outgoing;
                    loop {
                        let ev = match el.poll().await {
                            Ok(Event::Incoming(Incoming::ConnAck(ack))) => UpEvent::Connected {
                                max_packet: ack.properties.and_then(|p| p.max_packet_size),
                            },
                            Ok(Event::Incoming(Incoming::PubAck(p))) => UpEvent::Acked {
                                pkid: p.pkid,
                                refusal: classify_refusal(p.reason),
                            },
                            Ok(Event::Incoming(Incoming::Publish(p))) => UpEvent::Message {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.to_vec(),
                            },
                            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => UpEvent::Sent(pkid),
                            Ok(_) => continue,
                            Err(e) => {
                                let _ = tx.send(Err(describe_v5(&e))).await;
                                return;
                            }
                        };
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok((UpClient::V5(client, s.id_property.clone()), rx, task))
            }
        }
    }

    /// Queue a QoS 1 publish carrying `id` (as a user property on MQTT 5).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, id: String) -> Result<(), String> {
        match self {
            UpClient::V4(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string()),
            UpClient::V5(c, prop) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: vec![(prop.clone(), id)],
                    ..Default::default()
                };
                c.publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    props,
                )
                .await
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribe to a downlink topic filter with QoS 1.
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

fn describe_v4(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            format!("upstream refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

fn describe_v5(e: &rumqttc::v5::ConnectionError) -> String {
    match e {
        rumqttc::v5::ConnectionError::ConnectionRefused(code) => {
            format!("upstream refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

/// Whether an error string from a session means the operator must act (credentials,
/// authorisation) rather than wait for the network.
pub fn needs_operator(error: &str) -> bool {
    error.contains("refused the connection")
        && (error.contains("NotAuthorized")
            || error.contains("BadUserNamePassword")
            || error.contains("BadUserNameOrPassword")
            || error.contains("Banned")
            || error.contains("BadClientId")
            || error.contains("ClientIdentifierNotValid"))
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
    }
}
