//! Limits on what one device can make edgeferry or the embedded broker hold: client-id length,
//! topic length and levels, subscriptions per connection, QoS 2 publishes awaiting PUBREL.
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
}

impl Limits {
    pub fn from_config(l: &Local) -> Limits {
        Limits {
            max_client_id_len: l.max_client_id_len,
            max_topic_len: l.max_topic_len,
            max_topic_levels: l.max_topic_levels,
            max_subscriptions: l.max_subscriptions,
            max_qos2_inflight: l.max_qos2_inflight,
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
}
