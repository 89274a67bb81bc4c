//! Device authentication: Mosquitto password files, read as they are.
//!
//! A line is `user:hash`. Two hash forms are understood:
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 (`mosquitto_passwd` 2.x; what
//!   `edgeferry passwd` writes, 101 iterations and a 12-byte salt like Mosquitto's default);
//! - `$6$SALT$HASH`: SHA-512 of the password followed by the salt (`mosquitto_passwd` 1.x).
//!
//! SALT and HASH are standard base64. Blank lines and lines starting with `#` are skipped; any
//! other line that is not one of these forms makes the whole file invalid (the error names the
//! line), so a typo never silently locks a device out or lets one in.
//!
//! # Cost and caching
//! PBKDF2 is deliberately slow. Verification runs on tokio's blocking pool, at most
//! [`PARALLEL_VERIFY`] at once, so a storm of connects cannot occupy the runtime or spawn a
//! blocking thread per attempt. Successful verifications are remembered in a small bounded set
//! keyed by a keyed hash of (user, password) and the password file's generation, so a fleet that
//! reconnects after an outage pays PBKDF2 once per device, not once per connect. Failures are
//! never cached. The key is random per process and the set lives only in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::rand::SecureRandom as _;
use tokio::sync::Semaphore;

/// Iterations `edgeferry passwd` uses for new `$7$` lines (Mosquitto's default).
pub const PBKDF2_ITERATIONS: u32 = 101;
/// Salt length for new lines, in bytes (Mosquitto's).
const SALT_LEN: usize = 12;
/// Most PBKDF2 verifications running at once (each occupies one blocking thread).
const PARALLEL_VERIFY: usize = 2;
/// Most remembered successful verifications; the set is cleared when it is full.
const VERIFIED_CAP: usize = 4096;
/// Iterations above this are refused when reading a file: one CONNECT must not cost seconds.
const MAX_ITERATIONS: u32 = 1_000_000;

/// Why a password file could not be used or written.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is not `user:hash` in a form edgeferry understands.
    #[error("{path}:{line}: {detail}")]
    Line {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    /// The file could not be written (passwd).
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No secure random bytes for a salt.
    #[error("no random bytes for a salt")]
    Random,
}

/// One user's stored hash.
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$6$`: SHA-512(password || salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

// Never print hashes, even in debug output.
impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Sha512 { .. } => f.write_str("$6$…"),
            Hash::Pbkdf2 { iterations, .. } => write!(f, "$7${iterations}$…"),
        }
    }
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let b64 = |s: &str, what: &str| {
            B64.decode(s)
                .map_err(|e| format!("{what} is not base64: {e}"))
        };
        if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(it), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash is $7$ITERATIONS$SALT$HASH".into());
            };
            let iterations: u32 = it
                .parse()
                .map_err(|_| format!("iterations {it:?} is not a number"))?;
            if iterations == 0 || iterations > MAX_ITERATIONS {
                return Err(format!(
                    "iterations {iterations} outside 1..={MAX_ITERATIONS}"
                ));
            }
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                return Err(format!(
                    "hash is {} bytes, PBKDF2-SHA512 gives 64",
                    hash.len()
                ));
            }
            Ok(Hash::Pbkdf2 {
                iterations,
                salt: b64(salt, "salt")?,
                hash,
            })
        } else if let Some(rest) = text.strip_prefix("$6$") {
            let Some((salt, hash)) = rest.split_once('$') else {
                return Err("a $6$ hash is $6$SALT$HASH".into());
            };
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                return Err(format!("hash is {} bytes, SHA-512 gives 64", hash.len()));
            }
            Ok(Hash::Sha512 {
                salt: b64(salt, "salt")?,
                hash,
            })
        } else {
            Err("not a $6$ or $7$ hash (a plain-text password file must be hashed with mosquitto_passwd -U or edgeferry passwd)".into())
        }
    }

    /// A fresh `$7$` hash of `password` with a random salt.
    pub fn new_pbkdf2(password: &[u8]) -> Result<Hash, AuthError> {
        let mut salt = vec![0u8; SALT_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| AuthError::Random)?;
        let mut hash = vec![0u8; 64];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA512,
            std::num::NonZeroU32::new(PBKDF2_ITERATIONS).unwrap_or(std::num::NonZeroU32::MIN),
            &salt,
            password,
            &mut hash,
        );
        Ok(Hash::Pbkdf2 {
            iterations: PBKDF2_ITERATIONS,
            salt,
            hash,
        })
    }

    /// The text after `user:`.
    pub fn to_text(&self) -> String {
        match self {
            Hash::Sha512 { salt, hash } => format!("$6${}${}", B64.encode(salt), B64.encode(hash)),
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash)),
        }
    }

    /// Constant-time check of `password` against this hash (slow for `$7$`: call off the runtime).
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let Some(n) = std::num::NonZeroU32::new(*iterations) else {
                    return false;
                };
                ring::pbkdf2::verify(ring::pbkdf2::PBKDF2_HMAC_SHA512, n, salt, password, hash)
                    .is_ok()
            }
            Hash::Sha512 { salt, hash } => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                let got = ctx.finish();
                constant_time_eq(got.as_ref(), hash)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A parsed password file: users in file order (kept so `passwd` rewrites it faithfully).
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: Vec<(String, Hash)>,
    index: HashMap<String, usize>,
}

impl PasswordFile {
    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PasswordFile::parse(&text, path)
    }

    /// Parse the text of a password file; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PasswordFile, AuthError> {
        let mut f = PasswordFile::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |detail: String| AuthError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                detail,
            };
            let Some((user, hash)) = line.split_once(':') else {
                return Err(bad("expected user:hash".into()));
            };
            if user.is_empty() {
                return Err(bad("empty user name".into()));
            }
            let hash = Hash::parse(hash).map_err(bad)?;
            // Mosquitto keeps the last line for a user; so do we.
            f.set(user, hash);
        }
        Ok(f)
    }

    pub fn get(&self, user: &str) -> Option<&Hash> {
        self.index.get(user).map(|&i| &self.users[i].1)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Add or replace a user.
    pub fn set(&mut self, user: &str, hash: Hash) {
        match self.index.get(user) {
            Some(&i) => self.users[i].1 = hash,
            None => {
                self.index.insert(user.to_string(), self.users.len());
                self.users.push((user.to_string(), hash));
            }
        }
    }

    /// Remove a user; false when there was none.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(i) = self.index.remove(user) else {
            return false;
        };
        self.users.remove(i);
        self.index = self
            .users
            .iter()
            .enumerate()
            .map(|(i, (u, _))| (u.clone(), i))
            .collect();
        true
    }

    /// The file's text, one `user:hash` line per user.
    pub fn to_text(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{}\n", h.to_text()))
            .collect()
    }
}

/// The permission bits of a file holding secrets when group or others may read it.
pub fn loose_permissions(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

/// The outcome of a CONNECT's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted; the user name the ACL sees (None: anonymous).
    Allowed(Option<String>),
    /// Unknown user or wrong password (v3.1.1 0x04, v5 0x86).
    BadCredentials,
    /// No user name and anonymous devices are not allowed (v3.1.1 0x05, v5 0x87).
    NotAuthorized,
}

/// The password check every device connection goes through; its file is swapped on reload.
pub struct Authenticator {
    file: RwLock<Option<Arc<PasswordFile>>>,
    allow_anonymous: bool,
    /// Bumped on every reload, so remembered verifications of the old file no longer count.
    generation: AtomicU64,
    verified: Mutex<std::collections::HashSet<(u64, [u8; 32])>>,
    key: [u8; 32],
    slots: Arc<Semaphore>,
}

impl Authenticator {
    pub fn new(file: Option<PasswordFile>, allow_anonymous: bool) -> Authenticator {
        let mut key = [0u8; 32];
        // Without randomness the cache key is still a SHA-512 of the password: acceptable in
        // memory only, and the failure is practically impossible on Linux.
        let _ = ring::rand::SystemRandom::new().fill(&mut key);
        Authenticator {
            file: RwLock::new(file.map(Arc::new)),
            allow_anonymous,
            generation: AtomicU64::new(0),
            verified: Mutex::new(std::collections::HashSet::new()),
            key,
            slots: Arc::new(Semaphore::new(PARALLEL_VERIFY)),
        }
    }

    /// Whether a password file is in force.
    pub fn has_file(&self) -> bool {
        self.file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Replace the password file (SIGHUP).
    pub fn replace(&self, file: PasswordFile) {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn cache_key(&self, user: &str, password: &[u8]) -> (u64, [u8; 32]) {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
        ctx.update(&self.key);
        ctx.update(&(user.len() as u64).to_be_bytes());
        ctx.update(user.as_bytes());
        ctx.update(password);
        let d = ctx.finish();
        let mut k = [0u8; 32];
        k.copy_from_slice(&d.as_ref()[..32]);
        (self.generation.load(Ordering::SeqCst), k)
    }

    /// Check a CONNECT's user name and password.
    pub async fn check(&self, username: Option<&str>, password: Option<&[u8]>) -> Verdict {
        let file = self.file.read().unwrap_or_else(|e| e.into_inner()).clone();
        let user = username.filter(|u| !u.is_empty());
        let Some(file) = file else {
            // No password file: user names are not verified (as Mosquitto without one).
            return if self.allow_anonymous {
                Verdict::Allowed(user.map(str::to_string))
            } else {
                Verdict::NotAuthorized
            };
        };
        let Some(user) = user else {
            return if self.allow_anonymous {
                Verdict::Allowed(None)
            } else {
                Verdict::NotAuthorized
            };
        };
        let Some(hash) = file.get(user).cloned() else {
            return Verdict::BadCredentials;
        };
        let password = password.unwrap_or_default().to_vec();
        let key = self.cache_key(user, &password);
        if self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return Verdict::Allowed(Some(user.to_string()));
        }
        let ok = match &hash {
            Hash::Sha512 { .. } => hash.verify(&password),
            Hash::Pbkdf2 { .. } => {
                let Ok(_slot) = self.slots.clone().acquire_owned().await else {
                    return Verdict::BadCredentials;
                };
                tokio::task::spawn_blocking(move || hash.verify(&password))
                    .await
                    .unwrap_or(false)
            }
        };
        if !ok {
            return Verdict::BadCredentials;
        }
        let mut v = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= VERIFIED_CAP {
            v.clear();
        }
        v.insert(key);
        Verdict::Allowed(Some(user.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by mosquitto_passwd 2.0.11 (alice / secret).
    const MOSQ7: &str = "alice:$7$101$dqsDZC5P8yJlkJCo$o6spq6zzhTMTvm6xidEfGeL5vN6v8CyexTG8bEqZkHxwnr6rhKD/8QDUpmeEcli+/83dgSiZg6FohaLUOvZ4Zw==\n";

    #[test]
    fn mosquitto_2_pbkdf2_lines_verify() {
        let f = PasswordFile::parse(MOSQ7, Path::new("p")).unwrap();
        let h = f.get("alice").unwrap();
        assert!(h.verify(b"secret"));
        assert!(!h.verify(b"secreT"));
        assert_eq!(format!("alice:{}\n", h.to_text()), MOSQ7);
    }

    #[test]
    fn sha512_lines_verify() {
        let salt = b"0123456789ab".to_vec();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
        ctx.update(b"pw");
        ctx.update(&salt);
        let line = format!(
            "bob:$6${}${}",
            B64.encode(&salt),
            B64.encode(ctx.finish().as_ref())
        );
        let f = PasswordFile::parse(&line, Path::new("p")).unwrap();
        assert!(f.get("bob").unwrap().verify(b"pw"));
        assert!(!f.get("bob").unwrap().verify(b"px"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = PasswordFile::parse("# c\n\nalice:plain\n", Path::new("/p")).unwrap_err();
        assert!(e.to_string().starts_with("/p:3: "), "{e}");
        let e = PasswordFile::parse("alice\n", Path::new("/p")).unwrap_err();
        assert!(e.to_string().starts_with("/p:1: "), "{e}");
        let e = PasswordFile::parse("a:$7$x$AA==$AA==\n", Path::new("/p")).unwrap_err();
        assert!(e.to_string().contains("iterations"), "{e}");
    }

    #[test]
    fn new_hashes_round_trip_and_debug_hides_them() {
        let h = Hash::new_pbkdf2(b"pw").unwrap();
        let f = PasswordFile::parse(&format!("u:{}\n", h.to_text()), Path::new("p")).unwrap();
        assert!(f.get("u").unwrap().verify(b"pw"));
        assert!(!format!("{h:?}").contains(&h.to_text()[8..]));
    }

    #[tokio::test]
    async fn verdicts() {
        let f = PasswordFile::parse(MOSQ7, Path::new("p")).unwrap();
        let a = Authenticator::new(Some(f.clone()), false);
        assert_eq!(a.check(None, None).await, Verdict::NotAuthorized);
        assert_eq!(
            a.check(Some("alice"), Some(b"secret")).await,
            Verdict::Allowed(Some("alice".into()))
        );
        // Cached now; still right, and a wrong password is still wrong.
        assert_eq!(
            a.check(Some("alice"), Some(b"secret")).await,
            Verdict::Allowed(Some("alice".into()))
        );
        assert_eq!(
            a.check(Some("alice"), Some(b"nope")).await,
            Verdict::BadCredentials
        );
        assert_eq!(
            a.check(Some("mallory"), Some(b"secret")).await,
            Verdict::BadCredentials
        );
        // A reload that drops alice forgets her cached success.
        a.replace(PasswordFile::default());
        assert_eq!(
            a.check(Some("alice"), Some(b"secret")).await,
            Verdict::BadCredentials
        );
        let open = Authenticator::new(Some(f), true);
        assert_eq!(open.check(None, None).await, Verdict::Allowed(None));
    }
}
