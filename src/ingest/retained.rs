//! What the embedded broker holds in retained messages, tracked at the ingress so it can be
//! bounded (`local.max_retained`, `local.max_retained_bytes`). Every retained message a device
//! sends passes through the ingress before it reaches the broker, so the ingress knows each
//! retained topic's size without asking the broker. rumqttd itself has no such limit.
//!
//! The map mirrors the broker's retained store: a retained publish sets its topic's entry, an
//! empty retained payload removes it (MQTT 3.3.1.3). Both live in memory and start empty at each
//! start, so they cannot drift apart across a restart.

use std::collections::HashMap;
use std::sync::Mutex;

/// Retained topics and their sizes, with the limits they are held to.
pub struct RetainedBudget {
    max_count: usize,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sizes: HashMap<String, u64>,
    bytes: u64,
}

impl RetainedBudget {
    pub fn new(max_count: usize, max_bytes: u64) -> RetainedBudget {
        RetainedBudget {
            max_count,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A retained publish of `payload_len` bytes to `topic`: record it, or refuse it (nothing
    /// changes then) with the limit it would break. Clearing a topic is always allowed.
    pub fn admit(&self, topic: &str, payload_len: usize) -> Result<(), String> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        if payload_len == 0 {
            if let Some(old) = inner.sizes.remove(topic) {
                inner.bytes -= old;
            }
            return Ok(());
        }
        let size = (topic.len() + payload_len) as u64;
        let old = inner.sizes.get(topic).copied();
        if old.is_none() && inner.sizes.len() >= self.max_count {
            return Err(format!(
                "{} retained messages held; local.max_retained is {}",
                inner.sizes.len(),
                self.max_count
            ));
        }
        let bytes = inner.bytes - old.unwrap_or(0) + size;
        if bytes > self.max_bytes {
            return Err(format!(
                "retained messages would hold {bytes} bytes; local.max_retained_bytes is {}",
                self.max_bytes
            ));
        }
        inner.bytes = bytes;
        inner.sizes.insert(topic.to_string(), size);
        Ok(())
    }

    /// (messages, bytes) held now.
    pub fn held(&self) -> (usize, u64) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.sizes.len(), g.bytes)
    }
}

/// Bytes of user properties (names and values) in a publish.
pub fn user_property_bytes(props: &[(String, String)]) -> usize {
    props.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_and_bytes_are_bounded_and_clearing_frees() {
        let b = RetainedBudget::new(2, 100);
        assert!(b.admit("a", 10).is_ok());
        assert!(b.admit("b", 10).is_ok());
        assert!(b.admit("c", 1).is_err(), "third topic");
        assert!(b.admit("a", 20).is_ok(), "replacing is not a new topic");
        assert_eq!(b.held(), (2, 21 + 11));
        assert!(b.admit("b", 99).is_err(), "bytes");
        assert_eq!(b.held(), (2, 32), "a refusal changes nothing");
        assert!(b.admit("b", 0).is_ok());
        assert!(b.admit("c", 1).is_ok());
        assert!(b.admit("never-held", 0).is_ok());
        assert_eq!(b.held(), (2, 21 + 2));
    }
}
