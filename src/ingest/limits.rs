//! Limits on what one device can make edgeferry or the embedded broker hold: client-id length,
//! topic length and levels, subscriptions per connection, QoS 2 publishes awaiting PUBREL, the
//! keepalive ceiling (the publish rate is [`super::rate`]).
//! Pure checks; the session ([`super::mqtt`]) applies them and answers with the reason code.
//!
//! Why these: each is memory the embedded broker (or the ingress) keeps per device without a
//! bound of its own: client ids are kept for the broker's lifetime, every distinct subscription
//! is a filter the router matches, long topics with many levels make matching slow, and QoS 2
//! packet ids are held until the device releases them.

use crate::config::Local;

/// The configured limits (`[local]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_client_id_len: usize,
    pub max_topic_len: usize,
    pub max_topic_levels: usize,
    pub max_subscriptions: usize,
    pub max_qos2_inflight: usize,
    /// Seconds; 1..=65535 (checked by the config).
    pub max_keepalive: u16,
    pub max_rate: u32,
    pub rate_burst: u32,
    pub max_user_property_bytes: usize,
}

/// What the ingress does with the keepalive a device asked for in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Within the ceiling: used as asked.
    Accept(u16),
    /// MQTT 5, above the ceiling or 0 ("never"): the ceiling is used, and the device is told so
    /// in CONNACK (server keep alive), which MQTT 5 obliges it to follow.
    Cap(u16),
    /// MQTT 3.1.1, above the ceiling or 0: it cannot be told, so it is refused (CONNACK 0x02),
    /// as Mosquitto's `max_keepalive` does. Silently timing it out sooner than it pings would
    /// disconnect a healthy device over and over.
    Refuse,
}

impl Limits {
    pub fn from_config(l: &Local) -> Limits {
        Limits {
            max_client_id_len: l.max_client_id_len,
            max_topic_len: l.max_topic_len,
            max_topic_levels: l.max_topic_levels,
            max_subscriptions: l.max_subscriptions,
            max_qos2_inflight: l.max_qos2_inflight,
            max_keepalive: u16::try_from(l.max_keepalive.0.as_secs())
                .unwrap_or(u16::MAX)
                .max(1),
            max_rate: l.max_rate,
            rate_burst: l.rate_burst,
            max_user_property_bytes: usize::try_from(l.max_user_property_bytes.0)
                .unwrap_or(usize::MAX),
        }
    }

    /// The keepalive ceiling applied to what a device asked for. Keepalive 0 would let a
    /// half-open connection hold its slots forever, so it counts as above any ceiling.
    pub fn keepalive(&self, asked: u16, v5: bool) -> KeepAlive {
        if asked != 0 && asked <= self.max_keepalive {
            KeepAlive::Accept(asked)
        } else if v5 {
            KeepAlive::Cap(self.max_keepalive)
        } else {
            KeepAlive::Refuse
        }
    }

    /// A topic name or filter within `max_topic_len` bytes and `max_topic_levels` levels.
    pub fn check_topic(&self, topic: &str) -> Result<(), String> {
        if topic.len() > self.max_topic_len {
            return Err(format!(
                "topic of {} bytes; local.max_topic_len is {}",
                topic.len(),
                self.max_topic_len
            ));
        }
        let levels = topic.split('/').count();
        if levels > self.max_topic_levels {
            return Err(format!(
                "topic of {levels} levels; local.max_topic_levels is {}",
                self.max_topic_levels
            ));
        }
        Ok(())
    }

    pub fn check_client_id(&self, id: &str) -> Result<(), String> {
        if id.len() > self.max_client_id_len {
            return Err(format!(
                "client id of {} bytes; local.max_client_id_len is {}",
                id.len(),
                self.max_client_id_len
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_ids_are_bounded() {
        let l = Limits::from_config(&Local {
            max_topic_len: 10,
            max_topic_levels: 3,
            max_client_id_len: 4,
            ..Local::default()
        });
        assert!(l.check_topic("a/b/c").is_ok());
        assert!(l.check_topic("a/b/c/d").is_err());
        assert!(l.check_topic("abcdefghijk").is_err());
        assert!(l.check_client_id("abcd").is_ok());
        assert!(l.check_client_id("abcde").is_err());
    }

    #[test]
    fn keepalive_ceiling_caps_v5_and_refuses_v311() {
        let l = Limits::from_config(&Local {
            max_keepalive: crate::config::units::HumanDuration(std::time::Duration::from_secs(120)),
            ..Local::default()
        });
        assert_eq!(l.keepalive(60, false), KeepAlive::Accept(60));
        assert_eq!(l.keepalive(120, true), KeepAlive::Accept(120));
        assert_eq!(l.keepalive(121, true), KeepAlive::Cap(120));
        assert_eq!(l.keepalive(0, true), KeepAlive::Cap(120));
        assert_eq!(l.keepalive(121, false), KeepAlive::Refuse);
        assert_eq!(l.keepalive(0, false), KeepAlive::Refuse);
    }
}
