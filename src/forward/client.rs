//! One upstream connection attempt, for MQTT 3.1.1 or MQTT 5, behind one small interface.
//!
//! Each session gets a fresh rumqttc event loop with a clean session, and the loop is dropped
//! when the session ends: rumqttc would otherwise replay its own in-memory pending list after a
//! reconnect, and the queue, not that list, must be the only thing that replays.

use std::io::BufReader;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{split_host_port, Config, Protocol};
use crate::forward::backoff::Reconnect;

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
                    use rumqttc::{Event, Outgoing, Packet};
                    loop {
                        let ev = match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                report.connected.send_replace(true);
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
                                let error = classify_v4(&e, &ctx);
                                let text = error.to_string();
                                report.failed(error);
                                let _ = tx.send(Err(text)).await;
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
                            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                                report.connected.send_replace(true);
                                UpEvent::Connected {
                                    max_packet: ack.properties.and_then(|p| p.max_packet_size),
                                }
                            }
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
                                let error = classify_v5(&e, &ctx);
                                let text = error.to_string();
                                report.failed(error);
                                let _ = tx.send(Err(text)).await;
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

fn classify_v4(e: &rumqttc::ConnectionError, ctx: &Context) -> LinkError {
    if let rumqttc::ConnectionError::ConnectionRefused(code) = e {
        return LinkError::Refused {
            reason: ConnectRefusal::from_v4(*code),
            code: format!("{code:?} (return code {})", *code as u8),
        };
    }
    classify_tls(e, ctx).unwrap_or_else(|| LinkError::Network(e.to_string()))
}

fn classify_v5(e: &rumqttc::v5::ConnectionError, ctx: &Context) -> LinkError {
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
            let e = classify_v4(&handshake(cert), &ctx());
            let LinkError::Tls { reason, .. } = &e else {
                panic!("not a TLS failure: {e}")
            };
            assert_eq!(*reason, want);
            assert!(e.to_string().contains(words), "{e}");
            assert!(e.needs_operator());
        }
        let e = classify_v4(&handshake(CertificateError::UnknownIssuer), &ctx());
        assert!(e.to_string().contains("/etc/edgeferry/ca.pem"), "{e}");
        let alert = rumqttc::v5::ConnectionError::MqttState(
            rumqttc::v5::StateError::Deserialization(rumqttc::v5::mqttbytes::Error::Io(wrap(
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            ))),
        );
        let e = classify_v5(&alert, &ctx());
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
            classify_v4(&v4_alert, &ctx()),
            LinkError::Tls {
                reason: TlsFailure::ClientCertRefused,
                ..
            }
        ));
        let plain = rumqttc::ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(classify_v4(&plain, &ctx()), LinkError::Network(_)));
    }

    #[test]
    fn connack_refusals_open_the_breaker_unless_the_broker_is_busy() {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5;
        let refused = |c| classify_v5(&rumqttc::v5::ConnectionError::ConnectionRefused(c), &ctx());
        let e = refused(V5::BadUserNamePassword);
        assert!(e.needs_operator());
        assert!(e.to_string().contains("0x86"), "{e}");
        assert!(refused(V5::Banned).needs_operator());
        assert!(refused(V5::NotAuthorized).needs_operator());
        assert!(!refused(V5::ServerBusy).needs_operator());
        assert!(!refused(V5::ConnectionRateExceeded).needs_operator());
        let v4 = classify_v4(
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
