//! Ingest dedup keys: where a message's key comes from and how it is scoped, the clock the
//! window is measured on, and the throttle for the log line about suppressed duplicates. Pure
//! code; the window itself (persisted, surviving restarts) lives in the queue's `dedup` table,
//! written in the same transaction as the message it admitted.

use std::time::{Duration, Instant};

use crate::config::DedupKey;

/// The dedup key of a message, scoped by its source topic so two devices using the same
/// counter never suppress each other: `topic NUL value`. None when the message carries no
/// usable key (it is then queued normally and counted).
pub fn extract(
    rule: &DedupKey,
    topic: &str,
    payload: &[u8],
    user_properties: &[(String, String)],
) -> Option<Vec<u8>> {
    let value: Vec<u8> = match rule {
        DedupKey::Property(name) => user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes().to_vec())?,
        DedupKey::JsonPointer(ptr) => {
            let doc: serde_json::Value = serde_json::from_slice(payload).ok()?;
            match doc.pointer(ptr)? {
                serde_json::Value::String(s) => s.as_bytes().to_vec(),
                serde_json::Value::Null => return None,
                other @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                    other.to_string().into_bytes()
                }
                // An object or array as an id is almost certainly a misconfigured pointer.
                _ => return None,
            }
        }
    };
    if value.is_empty() {
        return None;
    }
    Some(scoped(topic.as_bytes(), &value))
}

/// Serial ports scope sequence numbers by port name the same way.
pub fn scoped(scope: &[u8], value: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(scope.len() + 1 + value.len());
    key.extend_from_slice(scope);
    key.push(0);
    key.extend_from_slice(value);
    key
}

/// The clock the dedup window is measured on: the wall clock read once, when the store opens,
/// then advanced by the monotonic clock.
///
/// Gateways without a real-time clock boot with a stale time and step it when NTP answers. On
/// the wall clock, a step back would make every key seen before it look fresh for as long as the
/// step (devices get PUBACKs, nothing is forwarded), and a step forward would expire the whole
/// window at once (a device's retry is queued again). On this clock neither happens while the
/// daemon runs. The stamps stay close to wall-clock time so that the window persisted in the
/// store still means something after a restart; keys stamped in the future relative to the next
/// start are re-stamped to that start (see the queue), so a clock that stepped back between two
/// runs suppresses a key for at most one window.
#[derive(Debug, Clone, Copy)]
pub struct WindowClock {
    anchor_ms: i64,
    started: Instant,
}

impl WindowClock {
    /// A clock that reads `wall_ms` (milliseconds since the Unix epoch) now.
    pub fn start(wall_ms: i64) -> WindowClock {
        WindowClock {
            anchor_ms: wall_ms,
            started: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch as this clock tells them: never decreasing, unaffected
    /// by steps of the wall clock since `start`.
    pub fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.anchor_ms.saturating_add(elapsed)
    }
}

/// Throttles the INFO line about suppressed duplicates, so that a new user learns why a message
/// was not forwarded without one line per duplicate: the first duplicate after a quiet minute is
/// reported at once, later ones in a summary at most once per `every`, with the count since the
/// previous line. Each duplicate is also logged at debug and counted by the caller.
#[derive(Debug)]
pub struct SuppressedLog {
    every: Duration,
    last_line: Option<Instant>,
    pending: u64,
    last_topic: String,
}

/// What a summary line reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// Duplicates suppressed since the previous line.
    pub count: u64,
    /// The topic of the most recent one.
    pub last_topic: String,
}

impl SuppressedLog {
    pub fn new(every: Duration) -> SuppressedLog {
        SuppressedLog {
            every,
            last_line: None,
            pending: 0,
            last_topic: String::new(),
        }
    }

    /// Count one suppressed duplicate on `topic`; returns the line to log if one is due now.
    pub fn record(&mut self, now: Instant, topic: &str) -> Option<Suppressed> {
        self.pending += 1;
        topic.clone_into(&mut self.last_topic);
        self.due(now)
    }

    /// The summary to log now, if duplicates are waiting and the last line is `every` old.
    pub fn due(&mut self, now: Instant) -> Option<Suppressed> {
        if self.pending == 0
            || self
                .last_line
                .is_some_and(|t| now.saturating_duration_since(t) < self.every)
        {
            return None;
        }
        self.last_line = Some(now);
        Some(Suppressed {
            count: std::mem::take(&mut self.pending),
            last_topic: std::mem::take(&mut self.last_topic),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_window_clock_starts_at_its_anchor_and_never_goes_back() {
        let c = WindowClock::start(1_000);
        let a = c.now_ms();
        let b = c.now_ms();
        assert!(a >= 1_000 && b >= a, "{a} {b}");
        assert!(a < 61_000, "{a}");
    }

    #[test]
    fn suppressed_duplicates_are_reported_at_once_then_summarised_once_a_minute() {
        let minute = Duration::from_secs(60);
        let mut log = SuppressedLog::new(minute);
        let t0 = Instant::now();
        assert_eq!(log.due(t0), None, "nothing suppressed yet");
        let first = log
            .record(t0, "devices/a")
            .expect("the first is reported at once");
        assert_eq!(first.count, 1);
        assert_eq!(first.last_topic, "devices/a");
        for i in 1..=10 {
            assert_eq!(log.record(t0 + Duration::from_secs(i), "devices/b"), None);
        }
        assert_eq!(log.due(t0 + Duration::from_secs(59)), None);
        let summary = log.due(t0 + minute).expect("summary after a minute");
        assert_eq!(
            (summary.count, summary.last_topic.as_str()),
            (10, "devices/b")
        );
        assert_eq!(
            log.due(t0 + 3 * minute),
            None,
            "nothing new, nothing logged"
        );
        // After a quiet period the next duplicate is reported at once again.
        assert_eq!(
            log.record(t0 + 3 * minute, "devices/c").map(|s| s.count),
            Some(1)
        );
    }

    #[test]
    fn json_pointer_keys() {
        let rule = DedupKey::JsonPointer("/id".into());
        assert_eq!(
            extract(&rule, "t", br#"{"id":"abc"}"#, &[]),
            Some(b"t\0abc".to_vec())
        );
        assert_eq!(
            extract(&rule, "t", br#"{"id":42}"#, &[]),
            Some(b"t\x0042".to_vec())
        );
        assert_eq!(extract(&rule, "t", br#"{"other":1}"#, &[]), None);
        assert_eq!(extract(&rule, "t", b"not json", &[]), None);
        assert_eq!(extract(&rule, "t", br#"{"id":{"a":1}}"#, &[]), None);
        let nested = DedupKey::JsonPointer("/meta/seq".into());
        assert_eq!(
            extract(&nested, "t", br#"{"meta":{"seq":7}}"#, &[]),
            Some(b"t\x007".to_vec())
        );
    }

    #[test]
    fn property_keys() {
        let rule = DedupKey::Property("msg-id".into());
        let props = vec![
            ("other".to_string(), "x".to_string()),
            ("msg-id".to_string(), "17".to_string()),
        ];
        assert_eq!(
            extract(&rule, "a/b", b"", &props),
            Some(b"a/b\x0017".to_vec())
        );
        assert_eq!(extract(&rule, "a/b", b"", &[]), None);
    }

    #[test]
    fn same_value_on_different_topics_differs() {
        let rule = DedupKey::JsonPointer("/id".into());
        assert_ne!(
            extract(&rule, "a", br#"{"id":1}"#, &[]),
            extract(&rule, "b", br#"{"id":1}"#, &[])
        );
    }

    proptest! {
        #[test]
        fn never_panics(payload in proptest::collection::vec(any::<u8>(), 0..200), ptr in "/[a-z/]{0,8}") {
            let _ = extract(&DedupKey::JsonPointer(ptr), "t", &payload, &[]);
        }
    }
}
