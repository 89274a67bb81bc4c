//! `[[serial]]`: serial ports (RS-232, RS-485, USB-serial) feeding the queue.
//!
//! Each port is a source with the same delivery contract as an MQTT device: a decoded frame is
//! queued, and (with `ack`) acknowledged to the device only once it is committed. The wire formats
//! of the sequence number (`seq`) and the acknowledgement frame (`ack`) are defined on
//! [`SeqSource`] and [`SerialPort::ack_payload`]; `config/edgeferry.toml` shows every key.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::codec::{Decoder, Framing};
use crate::config::units::{ByteSize, HumanDuration};
use crate::route::Template;

/// Every framing name the `framing` key accepts, in the order error messages list them.
pub const FRAMING_NAMES: [&str; 6] = ["lines", "cobs", "slip", "length", "length-nocrc", "cbor"];

/// Baud rates accepted: anything in this range. The standard rates (9600 ... 921600, 1000000 ...
/// 4000000) all are; Linux drivers also take non-standard ones (31250 for MIDI, 250000 for DMX)
/// through termios2, and a rate the UART cannot produce is refused when the port is opened.
pub const BAUD_RANGE: std::ops::RangeInclusive<u32> = 50..=4_000_000;

/// One `[[serial]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// Names the port in logs, metrics and dedup keys, and is `{topic}` in the topic template.
    /// Required, unique, 1-64 characters without control characters, '+' or '#'.
    pub name: String,
    /// Device path, e.g. "/dev/ttyUSB0" or a stable "/dev/serial/by-id/..." link. Required. The
    /// device may be absent at start-up or unplugged later: it is reported and reopened.
    pub path: PathBuf,
    /// Line speed in bits/s. Default 115200; accepted range 50..=4000000.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits per character, 5-8. Default 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// "none", "even" or "odd". Default "none".
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits, 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// "none", "software" (XON/XOFF) or "hardware" (RTS/CTS). Default "none".
    #[serde(default)]
    pub flow_control: FlowControl,
    /// How frames are delimited: "lines", "cobs", "slip", "length" (sync + u16 length + CRC-16),
    /// "length-nocrc" (the same without the CRC) or "cbor". Default "lines". Wire formats are
    /// documented in `codec::framing`.
    #[serde(default = "default_framing")]
    pub framing: FramingName,
    /// Largest frame payload; longer frames are dropped and counted as oversized. Size string.
    /// Default "4KiB"; at most 1MiB (64KiB - 1 for the length framings).
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    /// Upstream topic template: `{topic}` is the port name, `{gateway}` the gateway id.
    /// Required.
    pub topic: String,
    /// Where a frame's sequence number is, for dedup of device retransmits and for `ack`:
    /// "json:/pointer" (an RFC 6901 pointer into a JSON payload; a number or a string),
    /// "be16" or "be32" (the first 2 or 4 bytes of a binary frame, big-endian; they stay in the
    /// forwarded payload). Default: none (no dedup, no acks). See [`SeqSource`].
    pub seq: Option<String>,
    /// Write an acknowledgement frame back to the device once a frame with a sequence number is
    /// committed (or recognised as a retransmit of a committed one). Needs `seq`. Default false.
    /// The payload is defined by [`SerialPort::ack_payload`].
    #[serde(default)]
    pub ack: bool,
    /// Upstream topic filter whose messages are framed and written to this port. Default: none.
    pub downlink: Option<String>,
    /// First delay before reopening a failed port; each further failure doubles it, with full
    /// jitter. A device path that reappears is opened at once. Default "500ms".
    #[serde(default = "default_reopen_initial")]
    pub reopen_initial: HumanDuration,
    /// Longest delay between reopen attempts. Default "30s".
    #[serde(default = "default_reopen_max")]
    pub reopen_max: HumanDuration,
    /// After the line has been idle this long in the middle of a frame, the partial frame is
    /// dropped (counted as truncated) and decoding restarts. Default "200ms".
    #[serde(default = "default_idle_flush")]
    pub idle_flush: HumanDuration,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_framing() -> FramingName {
    FramingName(Framing::Lines)
}
fn default_max_frame() -> ByteSize {
    ByteSize(4 << 10)
}
fn default_reopen_initial() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_reopen_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_idle_flush() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}

/// `parity`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// `flow_control`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// A `framing` value: [`Framing`] plus the configuration-only name "length-nocrc".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramingName(pub Framing);

impl FromStr for FramingName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        if name == "length-nocrc" {
            return Ok(FramingName(Framing::Length { crc: false }));
        }
        // The codec's own error lists only its names; this one adds "length-nocrc".
        Framing::from_str(name).map(FramingName).map_err(|_| {
            format!(
                "unknown framing {name:?}: expected one of {}",
                FRAMING_NAMES.join(", ")
            )
        })
    }
}

impl std::fmt::Display for FramingName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Framing::Length { crc: false } => f.write_str("length-nocrc"),
            other => f.write_str(other.name()),
        }
    }
}

impl<'de> Deserialize<'de> for FramingName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a frame's sequence number comes from (the `seq` key).
///
/// The sequence number is the frame's identity on this port: a frame whose number was committed
/// within the `[dedup]` window is a retransmit, and is acknowledged but not queued again. The
/// dedup key is `dedup::scoped(NUL "serial/" port name, value)` (the NUL keeps it apart from
/// MQTT keys, which are scoped by topic), where `value` is the raw 2 or 4 bytes for
/// `be16`/`be32`, and for `json:` the string's bytes or a number's JSON text ("42").
///
/// It must therefore not repeat within the window (default 1h): `be16` wraps after 65536 frames,
/// and a device that restarts its counter at 0 on every boot has its first frames after a reboot
/// taken for retransmits (counted in `edgeferry_ingest_duplicates_total`). Such devices should
/// mix a per-boot random value into the number (e.g. the high 16 bits of a `be32`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqSource {
    /// `json:/pointer`: a JSON number or non-empty string at this pointer of a JSON payload.
    Json(String),
    /// `be16`: the first 2 bytes of the payload.
    Be16,
    /// `be32`: the first 4 bytes of the payload.
    Be32,
}

impl SeqSource {
    pub fn parse(text: &str) -> Result<SeqSource, String> {
        match text {
            "be16" => Ok(SeqSource::Be16),
            "be32" => Ok(SeqSource::Be32),
            _ => match text.strip_prefix("json:") {
                Some(ptr) if ptr.starts_with('/') => Ok(SeqSource::Json(ptr.to_string())),
                Some(ptr) => Err(format!(
                    "JSON pointer {ptr:?} must start with '/', e.g. \"json:/seq\""
                )),
                None => Err(format!(
                    "{text:?} is not a sequence number source; use \"json:/pointer\", \"be16\" or \"be32\""
                )),
            },
        }
    }

    /// The sequence number of `payload`, as the raw bytes the dedup key and the ack are made
    /// of; None when the frame carries none (too short, not JSON, field missing or empty).
    pub fn extract(&self, payload: &[u8]) -> Option<Vec<u8>> {
        match self {
            SeqSource::Be16 => payload.get(..2).map(<[u8]>::to_vec),
            SeqSource::Be32 => payload.get(..4).map(<[u8]>::to_vec),
            SeqSource::Json(ptr) => {
                let doc: serde_json::Value = serde_json::from_slice(payload).ok()?;
                let value = match doc.pointer(ptr)? {
                    serde_json::Value::String(s) => s.as_bytes().to_vec(),
                    n @ serde_json::Value::Number(_) => n.to_string().into_bytes(),
                    _ => return None,
                };
                (!value.is_empty()).then_some(value)
            }
        }
    }
}

impl SerialPort {
    /// The framing (validated at parse time).
    pub fn framing(&self) -> Framing {
        self.framing.0
    }

    /// The sequence number source; None when `seq` is unset (or invalid, which `validate`
    /// refuses).
    pub fn seq_source(&self) -> Option<SeqSource> {
        self.seq.as_deref().and_then(|s| SeqSource::parse(s).ok())
    }

    /// The payload of the acknowledgement frame for sequence number `seq` (as returned by
    /// [`SeqSource::extract`]), before framing with the port's framing:
    ///
    /// - `be16`/`be32`: the 2 or 4 sequence number bytes exactly as the device sent them;
    /// - `json:`: the ASCII text `ACK <seq>`, `<seq>` being the number as written in the JSON
    ///   (e.g. `ACK 42`) or the string's contents (e.g. `ACK a7f3`).
    ///
    /// A lines device thus reads `ACK 42\n`; a cobs device with `be32` reads the COBS encoding
    /// of its 4 bytes followed by 0x00.
    pub fn ack_payload(source: &SeqSource, seq: &[u8]) -> Vec<u8> {
        match source {
            SeqSource::Be16 | SeqSource::Be32 => seq.to_vec(),
            SeqSource::Json(_) => {
                let mut p = b"ACK ".to_vec();
                p.extend_from_slice(seq);
                p
            }
        }
    }

    /// Validate; on error returns (key within this `[[serial]]` table, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        let name = &self.name;
        if name.is_empty()
            || name.len() > 64
            || name.chars().any(|c| c.is_control() || c == '+' || c == '#')
        {
            return bad(
                "name",
                format!("{name:?} must be 1-64 characters without control characters, '+' or '#'"),
            );
        }
        if self.path.as_os_str().is_empty() {
            return bad("path", "must name a device, e.g. \"/dev/ttyUSB0\"".into());
        }
        if self.path.to_str().is_none() {
            return bad("path", "must be valid UTF-8".into());
        }
        if !BAUD_RANGE.contains(&self.baud) {
            return bad(
                "baud",
                format!(
                    "{} is not a usable baud rate: expected {}..={} (e.g. 9600, 115200, 921600)",
                    self.baud,
                    BAUD_RANGE.start(),
                    BAUD_RANGE.end()
                ),
            );
        }
        if !(5..=8).contains(&self.data_bits) {
            return bad(
                "data_bits",
                format!("{} is not 5, 6, 7 or 8", self.data_bits),
            );
        }
        if !(1..=2).contains(&self.stop_bits) {
            return bad("stop_bits", format!("{} is not 1 or 2", self.stop_bits));
        }
        let max = self.max_frame.0;
        let limit = match self.framing() {
            Framing::Length { .. } => u64::from(u16::MAX),
            _ => Decoder::MAX_FRAME_LIMIT as u64,
        };
        if max == 0 || max > limit {
            return bad(
                "max_frame",
                format!(
                    "{max} bytes is out of range: {} framing takes 1..={limit} bytes",
                    self.framing
                ),
            );
        }
        Template::parse(&self.topic).map_err(|p| ("topic".to_string(), p))?;
        let seq = self
            .seq
            .as_deref()
            .map(SeqSource::parse)
            .transpose()
            .map_err(|p| ("seq".to_string(), p))?;
        match (&seq, self.framing()) {
            (Some(SeqSource::Json(_)), Framing::Cbor) => {
                return bad(
                    "seq",
                    "a JSON sequence number needs JSON frames; cbor framing carries CBOR".into(),
                )
            }
            (Some(SeqSource::Be16 | SeqSource::Be32), Framing::Lines | Framing::Cbor) => {
                return bad(
                    "seq",
                    format!(
                        "{:?} reads binary bytes; use it with cobs, slip, length or length-nocrc framing",
                        self.seq.as_deref().unwrap_or_default()
                    ),
                )
            }
            _ => {}
        }
        if self.ack && seq.is_none() {
            return bad(
                "ack",
                "acknowledgements carry the frame's sequence number: set seq too".into(),
            );
        }
        if self.reopen_initial.0.is_zero() || self.reopen_initial.0 > self.reopen_max.0 {
            return bad(
                "reopen_initial",
                "must be above 0 and not above reopen_max".into(),
            );
        }
        if self.idle_flush.0 < Duration::from_millis(1)
            || self.idle_flush.0 > Duration::from_secs(60)
        {
            return bad("idle_flush", "must be between 1ms and 60s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str = r#"
[gateway]
id = "gw-1"
[store]
path = "/tmp/q.db"
[upstream]
address = "127.0.0.1:1883"
"#;

    fn parse(serial: &str) -> Result<Config, String> {
        let text = format!("{BASE}[[serial]]\n{serial}\n");
        Config::parse(Path::new("test.toml"), &text).map_err(|e| e.to_string())
    }

    const MIN: &str = "name = \"meter\"\npath = \"/dev/ttyUSB0\"\ntopic = \"serial/{topic}\"";

    #[test]
    fn minimal_port_gets_documented_defaults() {
        let c = parse(MIN).unwrap();
        let p = &c.serial[0];
        assert_eq!(p.baud, 115_200);
        assert_eq!(p.data_bits, 8);
        assert_eq!(p.parity, Parity::None);
        assert_eq!(p.stop_bits, 1);
        assert_eq!(p.flow_control, FlowControl::None);
        assert_eq!(p.framing(), Framing::Lines);
        assert_eq!(p.max_frame.0, 4096);
        assert_eq!(p.seq_source(), None);
        assert!(!p.ack);
        assert_eq!(p.reopen_initial.0, Duration::from_millis(500));
        assert_eq!(p.reopen_max.0, Duration::from_secs(30));
        assert_eq!(p.idle_flush.0, Duration::from_millis(200));
    }

    #[test]
    fn every_key_parses() {
        let c = parse(&format!(
            "{MIN}\nbaud = 921600\ndata_bits = 7\nparity = \"even\"\nstop_bits = 2\n\
             flow_control = \"hardware\"\nframing = \"length-nocrc\"\nmax_frame = \"1KiB\"\n\
             seq = \"be32\"\nack = true\ndownlink = \"cmd/meter\"\nreopen_initial = \"1s\"\n\
             reopen_max = \"1m\"\nidle_flush = \"50ms\""
        ))
        .unwrap();
        let p = &c.serial[0];
        assert_eq!(p.framing(), Framing::Length { crc: false });
        assert_eq!(p.framing.to_string(), "length-nocrc");
        assert_eq!(p.seq_source(), Some(SeqSource::Be32));
        assert_eq!(p.parity, Parity::Even);
        assert_eq!(p.flow_control, FlowControl::Hardware);
        assert_eq!(p.max_frame.0, 1024);
        for name in FRAMING_NAMES {
            let c = parse(&format!("{MIN}\nframing = \"{name}\"")).unwrap();
            assert_eq!(c.serial[0].framing.to_string(), name);
        }
    }

    /// Each broken port is refused with one line naming `serial[0].<key>` and the problem.
    #[test]
    fn broken_ports_name_the_key_and_problem() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                format!("{MIN}\nframing = \"hdlc\""),
                "serial[0].framing",
                "unknown framing \"hdlc\": expected one of lines, cobs, slip, length, length-nocrc, cbor",
            ),
            (format!("{MIN}\nbaud = 0"), "serial[0].baud", "0 is not a usable baud rate"),
            (format!("{MIN}\nbaud = 7"), "serial[0].baud", "7 is not a usable baud rate"),
            (format!("{MIN}\nbaud = 5000000"), "serial[0].baud", "expected 50..=4000000"),
            (format!("{MIN}\nbaud = -1"), "serial[0].baud", "invalid value"),
            (
                "name = \"meter\"\ntopic = \"serial/{topic}\"".into(),
                "serial[0]",
                "missing field `path`",
            ),
            (
                "name = \"meter\"\npath = \"\"\ntopic = \"t\"".into(),
                "serial[0].path",
                "must name a device",
            ),
            (
                "path = \"/dev/ttyUSB0\"\ntopic = \"t\"".into(),
                "serial[0]",
                "missing field `name`",
            ),
            (
                "name = \"m\"\npath = \"/dev/ttyUSB0\"".into(),
                "serial[0]",
                "missing field `topic`",
            ),
            (
                "name = \"a+b\"\npath = \"/dev/ttyUSB0\"\ntopic = \"t\"".into(),
                "serial[0].name",
                "without control characters",
            ),
            (format!("{MIN}\ndata_bits = 9"), "serial[0].data_bits", "9 is not 5, 6, 7 or 8"),
            (format!("{MIN}\nstop_bits = 3"), "serial[0].stop_bits", "3 is not 1 or 2"),
            (format!("{MIN}\nparity = \"mark\""), "serial[0].parity", "unknown variant `mark`"),
            (
                format!("{MIN}\nflow_control = \"rts\""),
                "serial[0].flow_control",
                "unknown variant `rts`",
            ),
            (format!("{MIN}\nmax_frame = \"0\""), "serial[0].max_frame", "out of range"),
            (format!("{MIN}\nmax_frame = \"2MiB\""), "serial[0].max_frame", "1..=1048576"),
            (
                format!("{MIN}\nframing = \"length\"\nmax_frame = \"64KiB\""),
                "serial[0].max_frame",
                "length framing takes 1..=65535",
            ),
            (format!("{MIN}\nmax_frame = \"4 furlongs\""), "serial[0].max_frame", "unknown unit"),
            (
                "name = \"m\"\npath = \"/dev/ttyUSB0\"\ntopic = \"x/{port}\"".into(),
                "serial[0].topic",
                "unknown placeholder",
            ),
            (format!("{MIN}\nseq = \"seq\""), "serial[0].seq", "not a sequence number source"),
            (format!("{MIN}\nseq = \"json:seq\""), "serial[0].seq", "must start with '/'"),
            (format!("{MIN}\nseq = \"be32\""), "serial[0].seq", "use it with cobs"),
            (
                format!("{MIN}\nframing = \"cbor\"\nseq = \"json:/seq\""),
                "serial[0].seq",
                "needs JSON frames",
            ),
            (format!("{MIN}\nack = true"), "serial[0].ack", "set seq too"),
            (format!("{MIN}\nack = \"yes\""), "serial[0].ack", "invalid type"),
            (
                format!("{MIN}\nreopen_initial = \"1m\""),
                "serial[0].reopen_initial",
                "not above reopen_max",
            ),
            (format!("{MIN}\nreopen_initial = \"0ms\""), "serial[0].reopen_initial", "above 0"),
            (format!("{MIN}\nreopen_max = \"30\""), "serial[0].reopen_max", "has no unit"),
            (format!("{MIN}\nidle_flush = \"0ms\""), "serial[0].idle_flush", "between 1ms"),
            (format!("{MIN}\nbogus = 1"), "serial[0]", "unknown field `bogus`"),
            (format!("{MIN}\ndownlink = \"a/#/b\""), "serial[0].downlink", "'#'"),
        ];
        for (port, key, problem) in cases {
            let msg = parse(&port).expect_err(&format!("expected an error for:\n{port}"));
            assert!(msg.starts_with("test.toml: "), "{msg}");
            assert!(msg.contains(key), "expected key {key} in: {msg}");
            assert!(msg.contains(problem), "expected {problem:?} in: {msg}");
            assert!(!msg.contains('\n'), "error must be one line: {msg:?}");
        }
    }

    /// The commented-out `[[serial]]` example in config/edgeferry.toml, uncommented, is valid and
    /// shows the defaults.
    #[test]
    fn commented_example_port_parses_when_uncommented() {
        let text = include_str!("../../config/edgeferry.toml");
        let start = text
            .find("#[[serial]]")
            .expect("example has a [[serial]] section");
        let port: String = text[start..]
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| !l.starts_with(' ') && !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(Path::new("example"), &format!("{BASE}{port}"))
            .unwrap_or_else(|e| panic!("uncommented example: {e}\n{port}"));
        let p = &c.serial[0];
        assert_eq!(p.baud, default_baud());
        assert_eq!(p.max_frame, default_max_frame());
        assert_eq!(p.reopen_max, default_reopen_max());
        assert_eq!(p.seq_source(), Some(SeqSource::Json("/seq".into())));
    }

    #[test]
    fn duplicate_port_names_are_refused() {
        let text = format!("{BASE}[[serial]]\n{MIN}\n[[serial]]\n{MIN}\n");
        let err = Config::parse(Path::new("test.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("serial[1].name"), "{err}");
    }

    #[test]
    fn serial_port_alone_is_enough_to_run() {
        assert!(
            parse(MIN).is_ok(),
            "a config with only [[serial]] must be valid"
        );
    }

    #[test]
    fn sequence_numbers_and_ack_payloads() {
        let be32 = SeqSource::Be32;
        assert_eq!(be32.extract(&[0, 0, 1, 2, 9]), Some(vec![0, 0, 1, 2]));
        assert_eq!(be32.extract(&[1, 2, 3]), None);
        assert_eq!(SeqSource::Be16.extract(&[7, 8, 9]), Some(vec![7, 8]));
        assert_eq!(
            SerialPort::ack_payload(&be32, &[0, 0, 1, 2]),
            vec![0, 0, 1, 2]
        );
        let json = SeqSource::parse("json:/meta/seq").unwrap();
        assert_eq!(
            json.extract(br#"{"meta":{"seq":42},"v":1}"#),
            Some(b"42".to_vec())
        );
        assert_eq!(
            json.extract(br#"{"meta":{"seq":"a7"}}"#),
            Some(b"a7".to_vec())
        );
        for missing in [
            &br#"{"meta":{}}"#[..],
            b"not json",
            br#"{"meta":{"seq":""}}"#,
            br#"{"meta":{"seq":[1]}}"#,
        ] {
            assert_eq!(json.extract(missing), None);
        }
        assert_eq!(SerialPort::ack_payload(&json, b"42"), b"ACK 42".to_vec());
    }
}
