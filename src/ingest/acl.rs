//! Device authorisation: Mosquitto ACL files, read as they are.
//!
//! ```text
//! # before the first `user` line: rules for anonymous devices
//! topic read public/#
//! user alice
//! topic readwrite devices/alice/#
//! topic deny devices/alice/secret
//! pattern write devices/%c/telemetry     # every device, %c = client id, %u = user name
//! ```
//!
//! `topic` and `pattern` take an optional access (`read`, `write`, `readwrite` (the default) or
//! `deny`) and a topic filter (the rest of the line, so it may hold spaces). A device gets its
//! own user's `topic` rules (or the anonymous ones) plus every `pattern`. As in Mosquitto, a
//! `deny` rule that matches wins over any grant, and anything not granted is denied. A pattern
//! whose `%u`/`%c` would be filled with a value holding `+`, `#` or `/` never matches (a client
//! id must not widen its own rights), and `%u` never matches anonymous devices.
//!
//! Subscriptions are decided when they are made, since the embedded broker delivers without
//! asking: a filter is granted when one readable rule covers every topic it can match and no
//! `deny` rule can match any of them. This is stricter than Mosquitto, which checks each
//! delivered message: subscribing to `#` with read rights on `sensors/#` only is refused here.
//!
//! The rules for one connection are compiled once ([`ClientAcl`]) and its decisions are
//! remembered per topic in a small bounded map, so the publish path costs a hash lookup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Decisions one connection remembers before its cache is cleared.
const CACHE_CAP: usize = 256;

/// Why an ACL file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is not a rule edgeferry understands.
    #[error("{path}:{line}: {detail}")]
    Line {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

const READ: u8 = 1;
const WRITE: u8 = 2;

#[derive(Debug, Clone)]
struct Rule {
    /// READ | WRITE bits; 0 = deny.
    access: u8,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl AclFile {
    pub fn load(path: &Path) -> Result<AclFile, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AclFile::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<AclFile, AclError> {
        let mut f = AclFile::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r').trim_start();
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |detail: String| AclError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                detail,
            };
            let (word, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match word {
                "user" => {
                    let name = rest.trim_end();
                    if name.is_empty() {
                        return Err(bad("`user` needs a user name".into()));
                    }
                    user = Some(name.to_string());
                    f.users.entry(name.to_string()).or_default();
                }
                "topic" | "pattern" => {
                    let (access, filter) = match rest.split_once([' ', '\t']) {
                        Some((a, t)) if access_word(a).is_some() => {
                            (access_word(a).unwrap_or(0), t.trim_start().trim_end())
                        }
                        _ => (READ | WRITE, rest.trim_end()),
                    };
                    if filter.is_empty() {
                        return Err(bad(format!("`{word}` needs a topic")));
                    }
                    check_filter(filter).map_err(|e| bad(format!("topic {filter:?}: {e}")))?;
                    let rule = Rule {
                        access,
                        filter: filter.to_string(),
                    };
                    match (word, &user) {
                        ("pattern", _) => f.patterns.push(rule),
                        (_, Some(u)) => f.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => f.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown keyword {other:?} (expected user, topic or pattern)"
                    )))
                }
            }
        }
        Ok(f)
    }

    /// The rules that apply to one connection, with patterns filled in.
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        let own = match user {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or(&[]),
            None => &self.anonymous,
        };
        let mut rules: Vec<Rule> = own.to_vec();
        let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
        for p in &self.patterns {
            if p.filter.contains("%u") && user.is_none_or(unsafe_value) {
                continue;
            }
            if p.filter.contains("%c") && unsafe_value(client_id) {
                continue;
            }
            let filter = p
                .filter
                .replace("%u", user.unwrap_or(""))
                .replace("%c", client_id);
            rules.push(Rule {
                access: p.access,
                filter,
            });
        }
        ClientAcl {
            deny: rules
                .iter()
                .filter(|r| r.access == 0)
                .map(|r| r.filter.clone())
                .collect(),
            grant: rules
                .into_iter()
                .filter(|r| r.access != 0)
                .map(|r| (r.access, r.filter))
                .collect(),
            cache: HashMap::new(),
        }
    }
}

fn access_word(w: &str) -> Option<u8> {
    match w {
        "read" => Some(READ),
        "write" => Some(WRITE),
        "readwrite" => Some(READ | WRITE),
        "deny" => Some(0),
        _ => None,
    }
}

fn check_filter(f: &str) -> Result<(), &'static str> {
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole last level");
        }
        if l.contains('+') && *l != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

/// Whether filter `f` matches topic name `t` (MQTT rules; `$` topics need a literal first level).
fn matches(f: &str, t: &str) -> bool {
    if t.starts_with('$') && (f.starts_with('+') || f.starts_with('#')) {
        return false;
    }
    let mut fl = f.split('/');
    let mut tl = t.split('/');
    loop {
        match (fl.next(), tl.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic filter `s` can match is matched by rule `r`.
fn covers(r: &str, s: &str) -> bool {
    let mut rl = r.split('/');
    let mut sl = s.split('/');
    loop {
        match (rl.next(), sl.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic is matched by both filters.
fn overlaps(a: &str, b: &str) -> bool {
    let mut al = a.split('/');
    let mut bl = b.split('/');
    loop {
        match (al.next(), bl.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One connection's compiled rules and its remembered decisions.
#[derive(Debug)]
pub struct ClientAcl {
    deny: Vec<String>,
    grant: Vec<(u8, String)>,
    /// (topic, write?) -> allowed. Bounded by [`CACHE_CAP`].
    cache: HashMap<(String, bool), bool>,
}

impl ClientAcl {
    /// May this connection publish to `topic`?
    pub fn may_publish(&mut self, topic: &str) -> bool {
        self.cached(topic, true, |a| {
            !a.deny.iter().any(|d| matches(d, topic))
                && a.grant
                    .iter()
                    .any(|(bits, f)| bits & WRITE != 0 && matches(f, topic))
        })
    }

    /// May this connection subscribe to `filter` (see the module notes)?
    pub fn may_subscribe(&mut self, filter: &str) -> bool {
        // A shared subscription "$share/group/f" reads what "f" matches.
        let plain = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_, f)) => f,
                None => return false,
            },
            None => filter,
        };
        self.cached(plain, false, |a| {
            !a.deny.iter().any(|d| overlaps(d, plain))
                && a.grant
                    .iter()
                    .any(|(bits, f)| bits & READ != 0 && covers(f, plain))
        })
    }

    fn cached(&mut self, topic: &str, write: bool, decide: impl Fn(&Self) -> bool) -> bool {
        if let Some(&v) = self.cache.get(&(topic.to_string(), write)) {
            return v;
        }
        let v = decide(self);
        if self.cache.len() >= CACHE_CAP {
            self.cache.clear();
        }
        self.cache.insert((topic.to_string(), write), v);
        v
    }
}

/// The ACL every connection consults; swapped on reload.
#[derive(Default)]
pub struct Acls {
    file: RwLock<Option<Arc<AclFile>>>,
    generation: AtomicU64,
}

impl Acls {
    pub fn new(file: Option<AclFile>) -> Acls {
        Acls {
            file: RwLock::new(file.map(Arc::new)),
            generation: AtomicU64::new(0),
        }
    }

    /// Replace the file (SIGHUP); connections recompile their rules at their next check.
    pub fn replace(&self, file: AclFile) {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// This connection's rules, or None when no ACL file is configured (everything allowed).
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> Option<ClientAcl> {
        let f = self
            .file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        Some(f.for_client(user, client_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read public/#
user alice
topic readwrite devices/alice/#
topic deny devices/alice/secret
topic write   spaced topic/x
user bob
topic read devices/#
pattern write devices/%c/telemetry
pattern readwrite users/%u/#
";

    fn acl(user: Option<&str>, client: &str) -> ClientAcl {
        AclFile::parse(FILE, Path::new("acl"))
            .unwrap()
            .for_client(user, client)
    }

    #[test]
    fn users_anonymous_and_patterns() {
        let mut a = acl(Some("alice"), "dev1");
        assert!(a.may_publish("devices/alice/t"));
        assert!(!a.may_publish("devices/alice/secret"), "deny wins");
        assert!(a.may_publish("spaced topic/x"));
        assert!(a.may_publish("devices/dev1/telemetry"), "pattern %c");
        assert!(a.may_publish("users/alice/x"), "pattern %u");
        assert!(!a.may_publish("devices/bob/t"));
        assert!(
            !a.may_publish("public/x"),
            "anonymous rules are not alice's"
        );
        let mut anon = acl(None, "dev2");
        assert!(!anon.may_publish("public/x"), "read only");
        assert!(anon.may_subscribe("public/#"));
        assert!(anon.may_subscribe("public/+/x"));
        assert!(!anon.may_subscribe("#"));
        assert!(!anon.may_publish("users//x"), "%u never matches anonymous");
        assert!(anon.may_publish("devices/dev2/telemetry"));
        // A client id that would widen a pattern never matches.
        assert!(!acl(None, "+").may_publish("devices/x/telemetry"));
        assert!(!acl(None, "#").may_publish("devices/#/telemetry"));
    }

    #[test]
    fn subscriptions_must_be_covered_and_clear_of_denials() {
        let mut a = acl(Some("alice"), "dev1");
        assert!(a.may_subscribe("devices/alice/t/+"));
        assert!(!a.may_subscribe("devices/alice/+"), "overlaps the deny");
        assert!(!a.may_subscribe("devices/alice/#"), "overlaps the deny");
        assert!(!a.may_subscribe("devices/+/t"));
        let mut b = acl(Some("bob"), "b");
        assert!(b.may_subscribe("devices/#"));
        assert!(b.may_subscribe("$share/g/devices/x"));
        assert!(!b.may_subscribe("#"));
        assert!(!b.may_publish("devices/x"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = AclFile::parse("user a\ntopic read a/#/b\n", Path::new("/a")).unwrap_err();
        assert!(e.to_string().starts_with("/a:2: "), "{e}");
        let e = AclFile::parse("topics a\n", Path::new("/a")).unwrap_err();
        assert!(e.to_string().starts_with("/a:1: "), "{e}");
    }

    #[test]
    fn filter_algebra() {
        assert!(matches("a/#", "a"));
        assert!(!matches("#", "$SYS/x"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("a/#", "a/+/c"));
        assert!(overlaps("a/+/c", "a/b/#"));
        assert!(!overlaps("a/b", "a/c"));
    }
}
