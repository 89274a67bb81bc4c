//! The configuration file (TOML): its shape, defaults and validation.
//!
//! Every key is documented in `config/edgeferry.toml`, which a test parses so it never rots.
//! Loading never panics: any problem becomes a [`ConfigError`] whose one-line message names the
//! file, the key and the problem, e.g.
//! `/etc/edgeferry/edgeferry.toml: upstream.protocol: unknown variant "v4", expected "v5" or "v3.1.1" (line 14)`.

mod security;
pub mod serial;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::route::{Template, TopicFilter};
use units::{ByteSize, HumanDuration};

/// Why a configuration could not be used. The `Display` form is the one line operators see.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key, wrong type or unparseable value.
    #[error("{file}: {key}: {problem}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Parse {
        file: PathBuf,
        key: String,
        problem: String,
        line: Option<usize>,
    },
    /// The file parsed but a value is unusable (out of range, inconsistent with another key).
    #[error("{file}: {key}: {problem}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: Gateway,
    #[serde(default)]
    pub local: Local,
    pub store: Store,
    pub upstream: Upstream,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default, rename = "serial")]
    pub serial: Vec<serial::SerialPort>,
    #[serde(default)]
    pub dedup: Dedup,
    #[serde(default)]
    pub telemetry: Telemetry,
    #[serde(default)]
    pub shutdown: Shutdown,
    #[serde(default)]
    pub dead_letters: DeadLetters,
}

/// `[dead_letters]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetters {
    /// Dead letters older than this are removed (counted). Default 30d.
    pub retain: HumanDuration,
}

impl Default for DeadLetters {
    fn default() -> Self {
        DeadLetters {
            retain: HumanDuration(Duration::from_secs(30 * 86_400)),
        }
    }
}

/// What a route does when its bound, or the store's, is reached.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Drop the route's oldest messages (counted). For telemetry, where the newest matters.
    #[default]
    DropOldest,
    /// Commit nothing more for the route: devices get no PUBACK (serial ports no ack) and are
    /// held back until room frees.
    RejectNew,
    /// Drop from the lowest-priority routes first. Needs route priorities, which this version
    /// does not have yet; refused by validation.
    DropLowestPriority,
}

/// What happens to a message whose route's `ttl` passed.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnExpiry {
    /// Move it to the dead letters with reason "expired".
    #[default]
    DeadLetter,
    /// Delete it (counted as dropped, reason "expired").
    Drop,
}

/// `store.min_free`: "5%" of the filesystem, or a size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Percent(f64),
    Bytes(u64),
}

impl<'de> Deserialize<'de> for MinFree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MinFree, D::Error> {
        let text = String::deserialize(d)?;
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| {
                serde::de::Error::custom(format!("{text:?} is not a percentage like \"5%\""))
            })?;
            if !(0.0..=90.0).contains(&v) {
                return Err(serde::de::Error::custom(format!(
                    "{text:?}: a percentage from 0% to 90%"
                )));
            }
            return Ok(MinFree::Percent(v));
        }
        units::parse_size(t)
            .map(MinFree::Bytes)
            .map_err(serde::de::Error::custom)
    }
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// Names this gateway upstream and is part of every message id. Required.
    pub id: String,
}

/// `[local]`: the embedded broker devices publish to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Local {
    /// MQTT 3.1.1 listener, an IP address and port. Default 127.0.0.1:1883.
    #[serde(deserialize_with = "units::ip_port")]
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener (needed for devices that send user properties). Default: none.
    #[serde(deserialize_with = "units::opt_ip_port")]
    pub listen_v5: Option<SocketAddr>,
    /// Largest publish payload a device may send; a larger one is refused by the broker, which
    /// disconnects that device. Default 256KiB.
    pub max_payload: ByteSize,
    /// Most device connections at once; more are refused at accept. Default 1000.
    pub max_connections: usize,
    /// Publishes one device connection may have waiting for their commit before edgeferry
    /// stops reading from it (its PUBACKs are sent after the commit). Default 100.
    pub max_inflight: u32,
    /// A device must send CONNECT within this long after its TCP connection. Default 10s.
    pub connect_timeout: HumanDuration,
    /// Most connections that have not sent CONNECT yet; when all are taken the longest silent is
    /// closed to make room, so sockets that never speak cannot use up file descriptors nor keep
    /// a device out. Default 256.
    pub max_handshakes: usize,
    /// Most connections from one source address. Default 64.
    pub max_connections_per_address: usize,
    /// Removed: devices are acknowledged only after commit, so there is no in-memory log to
    /// size. Present only to refuse the key with that explanation.
    pub buffer: Option<toml::Value>,
    /// Removed: back-pressure is how the ingress always works. Refused with an explanation.
    pub backpressure: Option<toml::Value>,
    /// Mosquitto password file (`$7$` and `$6$` lines; `edgeferry passwd` writes one). Reloaded
    /// on SIGHUP. Default: none (user names are not verified).
    pub password_file: Option<PathBuf>,
    /// Whether devices without a user name may connect. Must be set explicitly when
    /// `password_file` or `acl_file` is set; otherwise defaults to true.
    pub allow_anonymous: Option<bool>,
    /// Mosquitto ACL file (`user`, `topic`, `pattern`). Reloaded on SIGHUP. Default: none
    /// (every device may publish and subscribe to everything).
    pub acl_file: Option<PathBuf>,
    /// Longest client id accepted; longer ones get CONNACK "identifier rejected". Default 128.
    pub max_client_id_len: usize,
    /// Longest topic name or filter, in bytes. Default 1024.
    pub max_topic_len: usize,
    /// Most levels in a topic name or filter. Default 16.
    pub max_topic_levels: usize,
    /// Most subscriptions one connection may add. Default 64.
    pub max_subscriptions: usize,
    /// Most QoS 2 publishes one connection may have awaiting PUBREL. Default 32.
    pub max_qos2_inflight: usize,
    /// Publishes per second one connection may sustain (token bucket); a device above it is
    /// slowed down (its socket is not read until a token is there), not disconnected.
    /// 0 = no limit. Default 0: the right figure depends on the fleet, and the in-flight window
    /// already bounds what a fast device makes edgeferry hold.
    pub max_rate: u32,
    /// Publishes a connection may send at once above `max_rate` (the bucket's size). Default 0:
    /// one second's worth of `max_rate`.
    pub rate_burst: u32,
    /// Longest keepalive a device may ask for (and keepalive 0, "never", counts as longer): MQTT 5
    /// devices are told this one in CONNACK (server keep alive); MQTT 3.1.1 devices, which
    /// cannot be told, get CONNACK 0x02 as Mosquitto's `max_keepalive` does. 1s-65535s.
    /// Default 65535s.
    pub max_keepalive: HumanDuration,
    /// Most bytes of user properties (names and values) in one MQTT 5 publish; more get PUBACK
    /// 0x97 (quota exceeded). Default 8KiB.
    pub max_user_property_bytes: ByteSize,
    /// Most retained messages the embedded broker holds (all devices together); a retained
    /// publish on a new topic beyond it gets PUBACK 0x97 (MQTT 3.1.1: disconnected). Default 1000.
    pub max_retained: usize,
    /// Most bytes (topic and payload) of retained messages the embedded broker holds.
    /// Default 16MiB.
    pub max_retained_bytes: ByteSize,
}

impl Default for Local {
    fn default() -> Self {
        Local {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            listen_v5: None,
            max_payload: ByteSize(256 << 10),
            max_connections: 1000,
            max_inflight: 100,
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            max_handshakes: 256,
            max_connections_per_address: 64,
            buffer: None,
            backpressure: None,
            password_file: None,
            allow_anonymous: None,
            acl_file: None,
            max_client_id_len: 128,
            max_topic_len: 1024,
            max_topic_levels: 16,
            max_subscriptions: 64,
            max_qos2_inflight: 32,
            max_rate: 0,
            rate_burst: 0,
            max_keepalive: HumanDuration(Duration::from_secs(65535)),
            max_user_property_bytes: ByteSize(8 << 10),
            max_retained: 1000,
            max_retained_bytes: ByteSize(16 << 20),
        }
    }
}

/// `[store]`: the durable queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// SQLite file. Its directory must exist and be writable. Required.
    pub path: PathBuf,
    /// "full": every commit is fsynced (survives power loss). "normal": commits survive a crash
    /// of edgeferry but the last ones may be lost on power loss; fewer flash writes. Default "full".
    #[serde(default)]
    pub sync: SyncMode,
    /// Linger: how long a commit may wait for more messages to group with. Default 0 (none: a
    /// commit starts as soon as the previous one ended and takes whatever queued meanwhile).
    /// A few milliseconds trade device PUBACK latency for fewer flash writes at low rates.
    #[serde(default = "default_commit_interval")]
    pub commit_interval: HumanDuration,
    /// Most messages per commit. Default 1024.
    #[serde(default = "default_commit_batch")]
    pub commit_batch: usize,
    /// Most bytes the queued messages may take (topic + payload + 64 bytes each, which tracks
    /// the file's size). Beyond it routes overflow per their policy. Default 512MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Free space the queue leaves on its filesystem. Default: the larger of 5% and 100MiB.
    pub min_free: Option<MinFree>,
}

fn default_max_bytes() -> ByteSize {
    ByteSize(512 << 20)
}

fn default_commit_interval() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}
fn default_commit_batch() -> usize {
    1024
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    #[default]
    Full,
    Normal,
}

/// `[upstream]`: the broker messages are forwarded to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// host:port, or a list of them tried in order (failover). Required.
    pub address: AddressList,
    /// "v5" (default) or "v3.1.1".
    #[serde(default)]
    pub protocol: Protocol,
    /// Client id upstream. Default: the gateway id.
    pub client_id: Option<String>,
    /// MQTT keepalive; a silent (half-open) link is noticed within about 1.5x this. Default 30s.
    #[serde(default = "default_keepalive")]
    pub keepalive: HumanDuration,
    /// Give up a connection attempt after this long. Default 10s.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    pub username: Option<String>,
    /// Inline password. Prefer `password_file`.
    pub password: Option<String>,
    /// File whose first line is the password (keeps secrets out of the config).
    pub password_file: Option<PathBuf>,
    /// Use TLS. Default false.
    #[serde(default)]
    pub tls: bool,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key for mutual TLS (with `cert_file`).
    pub key_file: Option<PathBuf>,
    /// Most publishes awaiting PUBACK at once. Default 64, at most 65535.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Shortest ceiling of the reconnect delay (full jitter below it). While the link is down
    /// the ceiling grows with the outage, 1/30 of its age, up to `backoff_max`. Default 1s.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial: HumanDuration,
    /// Largest reconnect delay; also how long a refused login (bad credentials, not
    /// authorised, banned) or a certificate failure waits before the next try. Default 2m.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// A connection that lasted this long ends the outage: the delays start small again.
    /// Default 60s.
    #[serde(default = "default_stable_after")]
    pub stable_after: HumanDuration,
    /// Once the upstream's port answers again, wait a random time up to this (and up to a
    /// third of the outage) before connecting, so a fleet that lost the same broker does not
    /// reconnect in one burst. Default 2s.
    #[serde(default = "default_reconnect_spread")]
    pub reconnect_spread: HumanDuration,
    /// With several addresses: go back to an earlier one once its port has answered every
    /// check for this long. Default 60s.
    #[serde(default = "default_failback_after")]
    pub failback_after: HumanDuration,
    /// MQTT 5 user property carrying the message id. Default "edgeferry-id".
    #[serde(default = "default_id_property")]
    pub id_property: String,
    /// Quarantine a message as poison once the upstream dropped the connection this many times
    /// in a row right after it was sent alone. At least 1. Default 3.
    #[serde(default = "default_poison_after")]
    pub poison_after: u32,
}

fn default_keepalive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_inflight() -> u16 {
    64
}
fn default_backoff_initial() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_stable_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_reconnect_spread() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_failback_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// `upstream.address`: one "host:port" string, or a list of them in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressList(pub Vec<String>);

impl AddressList {
    /// The first (preferred) address.
    pub fn primary(&self) -> &str {
        self.0.first().map(String::as_str).unwrap_or("")
    }
}

impl std::fmt::Display for AddressList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for AddressList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = AddressList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a \"host:port\" string or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AddressList, E> {
                Ok(AddressList(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AddressList, A::Error> {
                let mut out = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    out.push(a);
                }
                Ok(AddressList(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}
fn default_id_property() -> String {
    "edgeferry-id".into()
}
fn default_poison_after() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1")]
    V311,
}

/// `[[route]]`: which local topics are forwarded, and to which upstream topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// MQTT topic filter on the local broker. Required.
    pub from: String,
    /// Upstream topic template: `{topic}` (the device's topic), `{gateway}` (gateway id).
    /// Default "{topic}".
    #[serde(default = "default_to")]
    pub to: String,
    /// Upstream QoS. Only 1 is supported (at-least-once is the product). Default 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Ingest dedup key: "property:NAME" (MQTT 5 user property) or "json:/pointer" (RFC 6901
    /// pointer into a JSON payload). Default: none.
    pub dedup: Option<String>,
    /// Names the route in the queue (stats, metrics, `edgeferry queue --route`). Default: `from`.
    pub name: Option<String>,
    /// Most bytes (topic + payload + 64 each) of this route's queued messages. Default: none.
    pub max_bytes: Option<ByteSize>,
    /// Most messages of this route queued. Default: none.
    pub max_messages: Option<u64>,
    /// "drop-oldest" (default), "reject-new" or "drop-lowest-priority".
    #[serde(default)]
    pub overflow: Overflow,
    /// Messages older than this expire. Default: never.
    pub ttl: Option<HumanDuration>,
    /// "dead-letter" (default) or "drop".
    #[serde(default)]
    pub on_expiry: OnExpiry,
}

impl Route {
    /// The route's name in the queue.
    pub fn queue_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.from)
    }
}

fn default_to() -> String {
    "{topic}".into()
}
fn default_qos() -> u8 {
    1
}

/// `[dedup]`: the window ingest dedup keys are remembered for (survives restarts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dedup {
    /// Keys older than this are forgotten; measured on the monotonic clock while running (see
    /// `dedup::WindowClock`). Default 1h.
    pub window: HumanDuration,
    /// Most keys remembered; the earliest admitted go first. Default 100000.
    pub max_keys: u64,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup {
            window: HumanDuration(Duration::from_secs(3600)),
            max_keys: 100_000,
        }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Prometheus text endpoint, e.g. "127.0.0.1:9880". Default: off.
    #[serde(deserialize_with = "units::opt_ip_port")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter when RUST_LOG is unset: error, warn, info, debug, trace, or directives that
    /// each name a level ("info,edgeferry=debug"). Default "info".
    pub log_level: String,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            metrics_listen: None,
            log_level: "info".into(),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// How long in-flight publishes may wait for their PUBACK after SIGTERM. Default 5s.
    pub grace: HumanDuration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// Where an ingest dedup key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupKey {
    /// An MQTT 5 user property of the device's publish.
    Property(String),
    /// A JSON pointer into the payload.
    JsonPointer(String),
}

impl DedupKey {
    pub fn parse(text: &str) -> Result<DedupKey, String> {
        if let Some(name) = text.strip_prefix("property:") {
            if name.is_empty() {
                return Err("\"property:\" needs a property name".into());
            }
            Ok(DedupKey::Property(name.to_string()))
        } else if let Some(ptr) = text.strip_prefix("json:") {
            if !ptr.starts_with('/') {
                return Err(format!(
                    "JSON pointer {ptr:?} must start with '/', e.g. \"json:/id\""
                ));
            }
            Ok(DedupKey::JsonPointer(ptr.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a dedup key; use \"property:NAME\" or \"json:/pointer\""
            ))
        }
    }
}

/// A route after validation: parsed filter, template and dedup key.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub filter: TopicFilter,
    pub template: Template,
    pub dedup: Option<DedupKey>,
    /// The route's name in the queue (`name`, else `from`).
    pub name: std::sync::Arc<str>,
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parse and validate config text; `file` names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut key = e.path().to_string();
            let inner = e.into_inner();
            // The TOML parser reports some bad values (an integer too large for 64 bits) before
            // serde sees a key; find the key from where the value is.
            if key == "." {
                if let Some(k) = inner.span().and_then(|s| key_at(text, s.start)) {
                    key = k;
                }
            }
            let line = inner
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            // toml's message can span lines (it quotes the source); keep the first line only.
            let problem = inner.message().lines().next().unwrap_or("").to_string();
            ConfigError::Parse {
                file: file.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                problem,
                line,
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            problem,
        };
        let id = &self.gateway.id;
        if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control() || "+#/".contains(c))
        {
            return Err(bad(
                "gateway.id",
                format!(
                    "{id:?} must be 1-64 characters without control characters, '+', '#' or '/'"
                ),
            ));
        }
        if self.local.max_payload.0 == 0 || self.local.max_payload.0 > 256 << 20 {
            return Err(bad(
                "local.max_payload",
                "must be between 1 B and 256MiB".into(),
            ));
        }
        if self.local.buffer.is_some() {
            return Err(bad(
                "local.buffer",
                "no longer exists: devices get their PUBACK only after the commit, so no in-memory log needs sizing; delete the key".into(),
            ));
        }
        if self.local.backpressure.is_some() {
            return Err(bad(
                "local.backpressure",
                "no longer exists: a device is always held back while its publishes wait for the store; delete the key".into(),
            ));
        }
        if self.local.max_inflight == 0 || self.local.max_inflight > 65535 {
            return Err(bad(
                "local.max_inflight",
                "must be between 1 and 65535".into(),
            ));
        }
        if self.local.max_handshakes == 0 {
            return Err(bad("local.max_handshakes", "must be at least 1".into()));
        }
        if self.local.max_connections_per_address == 0 {
            return Err(bad(
                "local.max_connections_per_address",
                "must be at least 1".into(),
            ));
        }
        if self.local.connect_timeout.0.is_zero() {
            return Err(bad("local.connect_timeout", "must be above 0".into()));
        }
        if self.local.max_connections == 0 {
            return Err(bad("local.max_connections", "must be at least 1".into()));
        }
        security::validate(&self.local, &bad)?;
        if Some(self.local.listen) == self.local.listen_v5 {
            return Err(bad(
                "local.listen_v5",
                "must differ from local.listen".into(),
            ));
        }
        if self.store.commit_batch == 0 || self.store.commit_batch > 100_000 {
            return Err(bad(
                "store.commit_batch",
                "must be between 1 and 100000".into(),
            ));
        }
        if self.store.commit_interval.0 > Duration::from_secs(1) {
            return Err(bad(
                "store.commit_interval",
                "must be at most 1s: devices wait this long for their PUBACK".into(),
            ));
        }
        if self.store.path.as_os_str().is_empty() || self.store.path.is_dir() {
            return Err(bad(
                "store.path",
                "must name a file, not a directory".into(),
            ));
        }
        let up = &self.upstream;
        let list = &up.address.0;
        if list.is_empty() {
            return Err(bad(
                "upstream.address",
                "the list is empty; give at least one \"host:port\"".into(),
            ));
        }
        for (i, a) in list.iter().enumerate() {
            let key = if list.len() == 1 {
                "upstream.address".to_string()
            } else {
                format!("upstream.address[{i}]")
            };
            split_host_port(a).map_err(|p| bad(&key, p))?;
            if list[..i].contains(a) {
                return Err(bad(&key, format!("{a:?} is listed twice")));
            }
        }
        if up.reconnect_spread.0 > Duration::from_secs(600) {
            return Err(bad(
                "upstream.reconnect_spread",
                "must be at most 10m".into(),
            ));
        }
        if up.failback_after.0.is_zero() {
            return Err(bad("upstream.failback_after", "must be above 0".into()));
        }
        if up.inflight == 0 {
            return Err(bad(
                "upstream.inflight",
                "must be between 1 and 65535".into(),
            ));
        }
        // MQTT 5 (rumqttc) needs at least 5s; MQTT 3.1.1 at least 1s.
        let min_keepalive = match up.protocol {
            Protocol::V5 => 5,
            _ => 1,
        };
        if up.keepalive.0 < Duration::from_secs(min_keepalive)
            || up.keepalive.0 > Duration::from_secs(65535)
        {
            return Err(bad(
                "upstream.keepalive",
                format!(
                    "must be between {min_keepalive}s and 65535s with protocol \"{}\"",
                    match up.protocol {
                        Protocol::V5 => "v5",
                        Protocol::V311 => "v3.1.1",
                    }
                ),
            ));
        }
        if up.backoff_initial.0.is_zero() || up.backoff_initial.0 > up.backoff_max.0 {
            return Err(bad(
                "upstream.backoff_initial",
                "must be above 0 and not above upstream.backoff_max".into(),
            ));
        }
        if up.password.is_some() && up.password_file.is_some() {
            return Err(bad(
                "upstream.password_file",
                "set either upstream.password or upstream.password_file, not both".into(),
            ));
        }
        if (up.password.is_some() || up.password_file.is_some()) && up.username.is_none() {
            return Err(bad(
                "upstream.username",
                "a password needs a username".into(),
            ));
        }
        if let Some(f) = &up.password_file {
            std::fs::read_to_string(f)
                .map_err(|e| bad("upstream.password_file", format!("{}: {e}", f.display())))?;
        }
        if up.cert_file.is_some() != up.key_file.is_some() {
            return Err(bad(
                "upstream.cert_file",
                "mutual TLS needs both upstream.cert_file and upstream.key_file".into(),
            ));
        }
        if !up.tls && (up.ca_file.is_some() || up.cert_file.is_some()) {
            return Err(bad(
                "upstream.tls",
                "ca_file/cert_file/key_file are set but tls = false".into(),
            ));
        }
        for (key, f) in [
            ("upstream.ca_file", &up.ca_file),
            ("upstream.cert_file", &up.cert_file),
            ("upstream.key_file", &up.key_file),
        ] {
            if let Some(f) = f {
                std::fs::metadata(f).map_err(|e| bad(key, format!("{}: {e}", f.display())))?;
            }
        }
        if let Some(cid) = &up.client_id {
            if cid.is_empty() || cid.len() > 256 {
                return Err(bad("upstream.client_id", "must be 1-256 characters".into()));
            }
        }
        if up.id_property.is_empty() {
            return Err(bad("upstream.id_property", "must not be empty".into()));
        }
        if up.poison_after == 0 {
            return Err(bad(
                "upstream.poison_after",
                "must be at least 1 (the number of dropped connections before a message is quarantined)".into(),
            ));
        }
        if self.routes.is_empty() && self.serial.is_empty() {
            return Err(bad(
                "route",
                "no [[route]] or [[serial]] is configured, so nothing would be forwarded".into(),
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            self.route_spec(i, r)
                .map_err(|(k, p)| bad(&format!("route[{i}].{k}"), p))?;
        }
        let mut route_names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let name = r.queue_name();
            if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                return Err(bad(
                    &format!("route[{i}].name"),
                    "1-256 characters, no control characters".into(),
                ));
            }
            if !route_names.insert(name.to_string()) {
                return Err(bad(
                    &format!("route[{i}].name"),
                    format!("{name:?} names another route too; give each route its own name"),
                ));
            }
            if r.overflow == Overflow::DropLowestPriority {
                return Err(bad(
                    &format!("route[{i}].overflow"),
                    "\"drop-lowest-priority\" needs route priorities, which this version does not have; use \"drop-oldest\" or \"reject-new\"".into(),
                ));
            }
            if r.max_messages == Some(0) || r.max_bytes.is_some_and(|b| b.0 == 0) {
                return Err(bad(
                    &format!("route[{i}].max_messages"),
                    "bounds must be above 0".into(),
                ));
            }
            if r.ttl.is_some_and(|t| t.0.is_zero()) {
                return Err(bad(&format!("route[{i}].ttl"), "must be above 0".into()));
            }
        }
        if self.store.max_bytes.0 < 1 << 20 {
            return Err(bad("store.max_bytes", "must be at least 1MiB".into()));
        }
        if self.dead_letters.retain.0.is_zero() {
            return Err(bad("dead_letters.retain", "must be above 0".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, port) in self.serial.iter().enumerate() {
            port.validate()
                .map_err(|(k, p)| bad(&format!("serial[{i}].{k}"), p))?;
            if !names.insert(port.name.as_str()) {
                return Err(bad(
                    &format!("serial[{i}].name"),
                    format!("{:?} is used by another [[serial]] port", port.name),
                ));
            }
            if let Some(filter) = &port.downlink {
                TopicFilter::parse(filter).map_err(|p| bad(&format!("serial[{i}].downlink"), p))?;
            }
        }
        if self.dedup.max_keys == 0 {
            return Err(bad("dedup.max_keys", "must be at least 1".into()));
        }
        if self.dedup.window.0.is_zero() {
            return Err(bad("dedup.window", "must be above 0".into()));
        }
        crate::telemetry::log_filter(&self.telemetry.log_level)
            .map_err(|e| bad("telemetry.log_level", e.to_string()))?;
        Ok(())
    }

    fn route_spec(&self, _i: usize, r: &Route) -> Result<RouteSpec, (&'static str, String)> {
        let filter = TopicFilter::parse(&r.from).map_err(|e| ("from", e))?;
        let template = Template::parse(&r.to).map_err(|e| ("to", e))?;
        if r.qos != 1 {
            return Err((
                "qos",
                format!(
                    "{} is not supported; edgeferry forwards with QoS 1 (at-least-once)",
                    r.qos
                ),
            ));
        }
        let dedup = r
            .dedup
            .as_deref()
            .map(DedupKey::parse)
            .transpose()
            .map_err(|e| ("dedup", e))?;
        if matches!(dedup, Some(DedupKey::Property(_))) && self.local.listen_v5.is_none() {
            return Err((
                "dedup",
                "a user property key needs MQTT 5 devices: set local.listen_v5".into(),
            ));
        }
        Ok(RouteSpec {
            filter,
            template,
            dedup,
            name: r.queue_name().into(),
        })
    }

    /// The queue's bounds and expiry per route name (routes and serial ports).
    pub fn store_options(&self) -> crate::queue::StoreOptions {
        let (min_free_percent, min_free_bytes) = match self.store.min_free {
            None => (5.0, 100 << 20),
            Some(MinFree::Percent(p)) => (p, 0),
            Some(MinFree::Bytes(b)) => (0.0, b),
        };
        let routes = self
            .routes
            .iter()
            .map(|r| {
                (
                    r.queue_name().to_string(),
                    crate::queue::RoutePolicy {
                        max_bytes: r.max_bytes.map(|b| b.0),
                        max_messages: r.max_messages,
                        overflow: r.overflow,
                        ttl: r.ttl.map(|t| t.0),
                        on_expiry: r.on_expiry,
                    },
                )
            })
            .collect();
        crate::queue::StoreOptions {
            sync: self.store.sync,
            commit_interval: self.store.commit_interval.0,
            commit_batch: self.store.commit_batch,
            dedup_window: self.dedup.window.0,
            dedup_max_keys: self.dedup.max_keys,
            max_bytes: self.store.max_bytes.0,
            min_free_percent,
            min_free_bytes,
            routes,
            dead_retain: self.dead_letters.retain.0,
        }
    }

    /// The validated routes (call only on a config returned by `load`/`parse`).
    pub fn route_specs(&self) -> Vec<RouteSpec> {
        self.routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.route_spec(i, r).ok())
            .collect()
    }

    /// The upstream client id: `upstream.client_id`, else the gateway id.
    pub fn client_id(&self) -> String {
        self.upstream
            .client_id
            .clone()
            .unwrap_or_else(|| self.gateway.id.clone())
    }
}

/// The dotted key (`upstream.inflight`, `route[1].qos`) whose value starts at byte `offset` of
/// `text`: the last `key =` on that line, under the last table header above it. Best effort, for
/// error messages only.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        if offset < end {
            let before = text.get(start..offset)?;
            let (lhs, _) = before.rsplit_once('=')?;
            let key = lhs.rsplit(['{', ',']).next()?.trim().trim_matches('"');
            if key.is_empty() || key.starts_with('#') {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = arrays.entry(name.clone()).or_default();
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
        start = end;
    }
    None
}

/// Split "host:port" (or "[v6]:port"), validating the port.
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} must be host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{address:?} has an invalid port"))?;
    if port == 0 {
        return Err(format!("{address:?}: port 0 is not a valid upstream port"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
id = "gw-1"
[store]
path = "/tmp/q.db"
[upstream]
address = "127.0.0.1:1883"
[[route]]
from = "devices/#"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/edgeferry.toml");
        let c = parse(text).unwrap_or_else(|e| panic!("example config: {e}"));
        assert_eq!(c.routes.len(), c.route_specs().len());
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.local.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.upstream.protocol, Protocol::V5);
        assert_eq!(c.store.sync, SyncMode::Full);
        assert_eq!(c.upstream.inflight, 64);
        assert_eq!(c.upstream.poison_after, 3);
        assert_eq!(c.client_id(), "gw-1");
        assert_eq!(c.routes[0].to, "{topic}");
    }

    /// MINIMAL with extra lines in `[upstream]`.
    fn upstream_plus(extra: &str) -> String {
        MINIMAL.replace("[upstream]\n", &format!("[upstream]\n{extra}\n"))
    }

    /// Each broken config must fail with one line naming the file and the key at fault.
    #[test]
    fn broken_configs_name_the_key() {
        let cases: Vec<(String, &str)> = vec![
            (
                "[gateway]\nid=\"gw\"\n[upstream]\naddress=\"h:1\"\n[[route]]\nfrom=\"a\"\n".into(),
                "store",
            ),
            (
                MINIMAL.replace("id = \"gw-1\"", "id = \"gw-1\"\nbogus = 1"),
                "gateway",
            ),
            (
                MINIMAL.replace("id = \"gw-1\"", "id = \"a/b\""),
                "gateway.id",
            ),
            (
                MINIMAL.replace("address = \"127.0.0.1:1883\"", "address = \"nohost\""),
                "upstream.address",
            ),
            (
                MINIMAL.replace(
                    "address = \"127.0.0.1:1883\"",
                    "address = [\"127.0.0.1:1883\", \"nohost\"]",
                ),
                "upstream.address[1]",
            ),
            (
                MINIMAL.replace("address = \"127.0.0.1:1883\"", "address = []"),
                "upstream.address",
            ),
            (
                MINIMAL.replace(
                    "address = \"127.0.0.1:1883\"",
                    "address = [\"h:1\", \"h:1\"]",
                ),
                "upstream.address[1]",
            ),
            (
                MINIMAL.replace("address = \"127.0.0.1:1883\"", "address = 1883"),
                "upstream.address",
            ),
            (
                upstream_plus("reconnect_spread = \"1h\""),
                "upstream.reconnect_spread",
            ),
            (
                upstream_plus("failback_after = \"0s\""),
                "upstream.failback_after",
            ),
            (upstream_plus("protocol = \"v4\""), "upstream.protocol"),
            (upstream_plus("keepalive = \"30\""), "upstream.keepalive"),
            // rumqttc's MQTT 5 client refuses (panics on) keepalives under 5s.
            (upstream_plus("keepalive = \"4s\""), "upstream.keepalive"),
            (upstream_plus("inflight = 0"), "upstream.inflight"),
            (upstream_plus("poison_after = 0"), "upstream.poison_after"),
            (upstream_plus("inflight = 70000"), "upstream.inflight"),
            (upstream_plus("password = \"x\""), "upstream.username"),
            (
                upstream_plus("tls = true\ncert_file = \"/nonexistent\""),
                "upstream.cert_file",
            ),
            (
                upstream_plus("tls = true\nca_file = \"/nonexistent.pem\""),
                "upstream.ca_file",
            ),
            (
                upstream_plus("backoff_initial = \"5m\""),
                "upstream.backoff_initial",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a/#/b\"\n",
                "route[1].from",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a\"\nto = \"x/{nope}\"\n",
                "route[1].to",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a\"\nto = \"x/+\"\n",
                "route[1].to",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a\"\nqos = 2\n",
                "route[1].qos",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a\"\ndedup = \"id\"\n",
                "route[1].dedup",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a\"\ndedup = \"property:id\"\n",
                "route[1].dedup",
            ),
            (
                MINIMAL.to_string() + "[local]\nmax_payload = \"12 parsecs\"\n",
                "local.max_payload",
            ),
            (
                MINIMAL.to_string() + "[local]\nlisten = \"localhost\"\n",
                "local.listen",
            ),
            (
                MINIMAL.to_string() + "[local]\nlisten_v5 = \"localhost:1884\"\n",
                "local.listen_v5",
            ),
            (
                MINIMAL.to_string() + "[telemetry]\nmetrics_listen = \"gw.local:9880\"\n",
                "telemetry.metrics_listen",
            ),
            // Too large for any TOML integer: the parser reports it before serde knows the key.
            (
                upstream_plus("inflight = 99999999999999999999"),
                "upstream.inflight",
            ),
            (
                MINIMAL.to_string() + "[[route]]\nfrom = \"a\"\nqos = 99999999999999999999\n",
                "route[1].qos",
            ),
            (
                MINIMAL.to_string() + "[dedup]\nmax_keys = 99999999999999999999\n",
                "dedup.max_keys",
            ),
            (MINIMAL.to_string() + "[store2]\n", "store2"),
            (
                MINIMAL.to_string() + "[local]\nbuffer = \"2MiB\"\n",
                "local.buffer",
            ),
            (
                MINIMAL.to_string() + "[local]\nbackpressure = false\n",
                "local.backpressure",
            ),
            (
                MINIMAL.to_string() + "[local]\nmax_inflight = 0\n",
                "local.max_inflight",
            ),
            (
                MINIMAL.to_string() + "[dedup]\nwindow = \"0s\"\n",
                "dedup.window",
            ),
            (
                MINIMAL.to_string() + "[telemetry]\nlog_level = \"loud[\"\n",
                "telemetry.log_level",
            ),
            // Parses as a filter for a module named "verbose": the daemon would log nothing.
            (
                MINIMAL.to_string() + "[telemetry]\nlog_level = \"verbose\"\n",
                "telemetry.log_level",
            ),
            (
                MINIMAL.replace(
                    "path = \"/tmp/q.db\"",
                    "path = \"/tmp/q.db\"\ncommit_interval = \"5s\"",
                ),
                "store.commit_interval",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).expect_err(&format!("{key}: expected an error for:\n{text}"));
            let msg = err.to_string();
            assert!(msg.starts_with("test.toml: "), "{msg}");
            assert!(msg.contains(key), "expected key {key} in: {msg}");
            assert!(!msg.contains('\n'), "error must be one line: {msg:?}");
        }
    }

    #[test]
    fn upstream_address_is_a_string_or_an_ordered_list() {
        let one = parse(MINIMAL).unwrap();
        assert_eq!(one.upstream.address.0, ["127.0.0.1:1883"]);
        assert_eq!(one.upstream.address.primary(), "127.0.0.1:1883");
        let text = MINIMAL.replace(
            "address = \"127.0.0.1:1883\"",
            "address = [\"primary.example:8883\", \"[::1]:8883\"]",
        );
        let many = parse(&text).unwrap();
        assert_eq!(
            many.upstream.address.0,
            ["primary.example:8883", "[::1]:8883"]
        );
        assert_eq!(
            many.upstream.address.to_string(),
            "primary.example:8883, [::1]:8883"
        );
        assert_eq!(many.upstream.reconnect_spread.0, Duration::from_secs(2));
        assert_eq!(many.upstream.failback_after.0, Duration::from_secs(60));
    }

    #[test]
    fn durations_and_sizes_are_human_strings() {
        let text = MINIMAL.to_string()
            + "[local]\nmax_payload = \"16KiB\"\n[shutdown]\ngrace = \"2500ms\"\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.local.max_payload.0, 16 << 10);
        assert_eq!(c.shutdown.grace.0, Duration::from_millis(2500));
    }

    #[test]
    fn syntax_errors_report_the_line() {
        let err = parse("[gateway]\nid = \"gw\"\n[store\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
    }
}
