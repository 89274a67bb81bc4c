//! Routes: MQTT topic filters on the local side and upstream topic templates. Pure code.

/// Why bytes are not a publishable MQTT topic name (MQTT 3.1.1 and 5.0, section 4.7): no upstream
/// can accept such a name, so ingest refuses it before anything is acknowledged or committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A topic name must be at least one character long.
    #[error("empty topic")]
    Empty,
    /// Topic names are UTF-8.
    #[error("topic is not valid UTF-8")]
    NotUtf8,
    /// '+' and '#' are for filters only.
    #[error("wildcard in a topic name")]
    Wildcard,
    /// U+0000 is forbidden in MQTT strings.
    #[error("NUL character in the topic")]
    Nul,
    /// An MQTT string holds at most 65535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
}

impl TopicError {
    /// Stable label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            TopicError::Empty => "empty",
            TopicError::NotUtf8 => "not-utf8",
            TopicError::Wildcard => "wildcard",
            TopicError::Nul => "nul",
            TopicError::TooLong => "too-long",
        }
    }
}

/// Check a topic name as it arrives from a device, or as a template rendered it.
pub fn topic_name(bytes: &[u8]) -> Result<&str, TopicError> {
    if bytes.is_empty() {
        return Err(TopicError::Empty);
    }
    if bytes.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    let s = std::str::from_utf8(bytes).map_err(|_| TopicError::NotUtf8)?;
    check_topic_str(s)?;
    Ok(s)
}

/// The same checks for a string already known to be UTF-8.
pub fn check_topic_str(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    for b in s.bytes() {
        match b {
            b'+' | b'#' => return Err(TopicError::Wildcard),
            0 => return Err(TopicError::Nul),
            _ => {}
        }
    }
    Ok(())
}

/// A validated MQTT topic filter (`+` one level, `#` the rest, last only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("topic filter is empty".into());
        }
        if filter.len() > 65535 || filter.contains('\0') {
            return Err(format!(
                "topic filter {filter:?} is too long or contains NUL"
            ));
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(format!(
                    "topic filter {filter:?}: '#' must be a whole level and the last one"
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!(
                    "topic filter {filter:?}: '+' must be a whole level"
                ));
            }
        }
        Ok(TopicFilter(filter.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` (a topic name, no wildcards) matches this filter. Topics starting with
    /// '$' are not matched by a leading wildcard (MQTT 3.1.1 section 4.7.2).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut t = topic.split('/');
        for f in self.0.split('/') {
            match f {
                "#" => return true,
                "+" => {
                    if t.next().is_none() {
                        return false;
                    }
                }
                lit => {
                    if t.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        t.next().is_none()
    }
}

/// An upstream topic template: literal text with `{topic}` and `{gateway}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    Gateway,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("topic template is empty".into());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("topic template {text:?}: unclosed '{{'"))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "topic" => Part::Topic,
                "gateway" => Part::Gateway,
                other => {
                    return Err(format!(
                        "topic template {text:?}: unknown placeholder {{{other}}} (known: {{topic}}, {{gateway}})"
                    ))
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        for p in &parts {
            if let Part::Literal(l) = p {
                if l.contains('}') || l.contains('+') || l.contains('#') || l.contains('\0') {
                    return Err(format!(
                        "topic template {text:?}: an upstream topic cannot contain '+', '#', NUL or a stray '}}'"
                    ));
                }
            }
        }
        Ok(Template(parts))
    }

    /// Render for a device topic (already a valid topic name) and gateway id.
    pub fn render(&self, topic: &str, gateway: &str) -> String {
        let mut out = String::with_capacity(topic.len() + 16);
        for p in &self.0 {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Topic => out.push_str(topic),
                Part::Gateway => out.push_str(gateway),
            }
        }
        out
    }

    /// Whether rendering is the identity (saves a copy per message).
    pub fn is_identity(&self) -> bool {
        self.0 == [Part::Topic]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn filter_matching_follows_mqtt() {
        assert!(f("devices/#").matches("devices/a/temp"));
        assert!(f("devices/#").matches("devices"));
        assert!(f("devices/+/temp").matches("devices/a/temp"));
        assert!(!f("devices/+/temp").matches("devices/a/b/temp"));
        assert!(!f("devices/+").matches("devices"));
        assert!(f("#").matches("a/b"));
        assert!(!f("#").matches("$SYS/x"));
        assert!(!f("devices/a").matches("devices/a/b"));
        assert!(f("+/+").matches("/x"));
    }

    #[test]
    fn invalid_filters_are_refused() {
        for bad in ["", "a/#/b", "a#", "a/b+", "#/"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_render_placeholders() {
        let t = Template::parse("gw/{gateway}/{topic}").unwrap();
        assert_eq!(t.render("devices/a", "g1"), "gw/g1/devices/a");
        assert!(Template::parse("{topic}").unwrap().is_identity());
        assert!(Template::parse("x/{nope}").is_err());
        assert!(Template::parse("x/{topic").is_err());
        assert!(Template::parse("x/#").is_err());
    }

    #[test]
    fn topic_names_that_no_upstream_accepts_are_refused() {
        assert_eq!(topic_name(b"devices/a/temp"), Ok("devices/a/temp"));
        assert_eq!(topic_name("\u{e9}".as_bytes()), Ok("\u{e9}"));
        assert_eq!(topic_name(b""), Err(TopicError::Empty));
        assert_eq!(topic_name(b"devices/+/x"), Err(TopicError::Wildcard));
        assert_eq!(topic_name(b"devices/#"), Err(TopicError::Wildcard));
        assert_eq!(topic_name(b"a\0b"), Err(TopicError::Nul));
        assert_eq!(topic_name(b"a/\xff"), Err(TopicError::NotUtf8));
        assert_eq!(topic_name(&vec![b'a'; 65536]), Err(TopicError::TooLong));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,40}", topic in "[a-z/+#]{0,20}") {
            if let Ok(filter) = TopicFilter::parse(&s) { let _ = filter.matches(&topic); }
            if let Ok(t) = Template::parse(&s) { let _ = t.render(&topic, "gw"); }
        }

        /// A filter built by replacing levels of a topic with '+' (or a tail with '#') matches it.
        #[test]
        fn wildcard_generalisations_match(levels in proptest::collection::vec("[a-z0-9]{1,5}", 1..6), mask in any::<u8>(), hash in any::<bool>()) {
            let topic = levels.join("/");
            let mut parts: Vec<String> = levels.iter().enumerate()
                .map(|(i, l)| if mask & (1 << i) != 0 { "+".to_string() } else { l.clone() })
                .collect();
            if hash { parts.truncate(parts.len() - 1); parts.push("#".into()); }
            let filter = TopicFilter::parse(&parts.join("/")).unwrap();
            prop_assert!(filter.matches(&topic));
        }
    }
}
