//! Ingest dedup keys: where a message's key comes from and how it is scoped. Pure code; the
//! window itself (persisted, surviving restarts) lives in the queue's `dedup` table, written in
//! the same transaction as the message it admitted.

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
