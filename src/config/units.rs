//! Human-readable durations ("500ms", "30s", "2m", "1h", "7d") and sizes ("512KiB", "8MiB",
//! "1GB", "4096"), and listen addresses ("127.0.0.1:1883"). Pure parsing, shared by every config
//! key that takes one.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as a number and a unit: ms, s, m, h, d. A bare number is refused: a
/// timeout of "30" is ambiguous and such mistakes are how gateways end up retrying every 30 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// A size in bytes, written with an optional unit: B, KB, MB, GB (powers of 1000) or KiB, MiB,
/// GiB (powers of 1024). A bare number means bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A listen address: an IP address and a port. Host names are refused rather than resolved: which
/// of a name's addresses (127.0.0.1 or ::1 for "localhost") a listener binds would depend on the
/// resolver at start-up, and devices would find it on one family only.
pub fn parse_ip_port(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address and port; host names are not resolved: use e.g. \"127.0.0.1:1883\", \"0.0.0.0:1883\" (all interfaces) or \"[::1]:1883\""
        )
    })
}

/// `deserialize_with` for a listen address (see [`parse_ip_port`]).
pub fn ip_port<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_ip_port(&text).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for an optional listen address (see [`parse_ip_port`]).
pub fn opt_ip_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    ip_port(d).map(Some)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| {
            format!("duration {t:?} has no unit (use ms, s, m, h or d, e.g. \"30s\")")
        })?;
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {t:?} does not start with a number"))?;
    let secs_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => {
            return Err(format!(
                "duration {t:?} has unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    let secs = value * secs_per_unit;
    if !secs.is_finite() || secs > 10.0 * 365.0 * 86400.0 {
        return Err(format!("duration {t:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("size {t:?} does not start with a whole number"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "size {t:?} has unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("size {t:?} is out of range"))
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size(&s)
            .map(ByteSize)
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn durations_without_unit_or_with_a_bad_one_are_refused() {
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3 weeks")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999d").is_err());
    }

    #[test]
    fn sizes_binary_and_decimal() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,24}") {
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
        }
    }
}
