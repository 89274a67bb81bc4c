//! Local security at the ingress, as one object the sessions consult: the password check
//! ([`super::auth`]), the ACL ([`super::acl`]), their reload on SIGHUP, and the rate-limited
//! logging of refusals. The MQTT session ([`super::mqtt`]) calls [`Security::admit`] on CONNECT
//! and asks the returned [`Grant`] before it queues a publish or relays a subscription.
//!
//! Logging: a refused CONNECT is logged at most once per client id per minute; ACL denials at
//! most once per client id per minute as well (one line per episode for a device that keeps
//! trying); every one is counted (`edgeferry_security_refused_total`, and denied publishes per
//! client in `edgeferry_acl_denied_publishes_total`). Passwords and hashes are never logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttd::protocol::{ConnectReturnCode, SubscribeReasonCode};
use tracing::{error, info, warn};

use crate::config::Local;
use crate::telemetry::{Metrics, SecurityRefusal};

use super::acl::{AclError, AclFile, Acls, ClientAcl};
use super::auth::{loose_permissions, AuthError, Authenticator, PasswordFile, Verdict};

/// One log line per client id and reason per this period.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Client ids the log limiter remembers; beyond, entries older than [`LOG_EVERY`] are dropped.
const LOG_KEYS: usize = 1024;

/// Why the security files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The password file is unreadable or has a bad line.
    #[error("local.password_file: {0}")]
    Password(#[from] AuthError),
    /// The ACL file is unreadable or has a bad line.
    #[error("local.acl_file: {0}")]
    Acl(#[from] AclError),
}

/// Read and check the files `[local]` names (used by `check` and at start-up).
pub fn check_files(local: &Local) -> Result<(), SecurityError> {
    if let Some(p) = &local.password_file {
        PasswordFile::load(p)?;
    }
    if let Some(p) = &local.acl_file {
        AclFile::load(p)?;
    }
    Ok(())
}

fn warn_if_readable(path: &Path) {
    if let Some(mode) = loose_permissions(path) {
        warn!(file = %path.display(), mode = format_args!("{mode:o}"),
            "local.password_file is readable by group or others; chmod 600 it (or 640 with group edgeferry)");
    }
}

/// Authentication and authorisation for every device connection.
pub struct Security {
    auth: Authenticator,
    acls: Acls,
    password_file: Option<PathBuf>,
    acl_file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    logs: ClientLogs,
}

/// What a device was granted at CONNECT: its user name and its compiled ACL.
pub struct Grant {
    pub user: Option<String>,
    acl: Option<ClientAcl>,
    generation: u64,
    client_id: String,
}

impl Security {
    pub fn load(local: &Local, metrics: Arc<Metrics>) -> Result<Security, SecurityError> {
        let passwords = match &local.password_file {
            Some(p) => {
                warn_if_readable(p);
                Some(PasswordFile::load(p)?)
            }
            None => None,
        };
        let acl = local.acl_file.as_deref().map(AclFile::load).transpose()?;
        Ok(Security {
            auth: Authenticator::new(passwords, local.allow_anonymous.unwrap_or(true)),
            acls: Acls::new(acl),
            password_file: local.password_file.clone(),
            acl_file: local.acl_file.clone(),
            metrics,
            logs: ClientLogs::default(),
        })
    }

    /// SIGHUP: read both files again. A file that does not load keeps the one in force, with an
    /// ERROR naming the line (the operator must fix it). Each file is decided on its own.
    pub fn reload(&self) {
        let mut ok = true;
        if let Some(p) = &self.password_file {
            match PasswordFile::load(p) {
                Ok(f) => {
                    warn_if_readable(p);
                    info!(file = %p.display(), users = f.len(), "password file reloaded");
                    self.auth.replace(f);
                }
                Err(e) => {
                    ok = false;
                    error!(error = %e, "local.password_file not reloaded; the previous one stays in force");
                }
            }
        }
        if let Some(p) = &self.acl_file {
            match AclFile::load(p) {
                Ok(f) => {
                    info!(file = %p.display(), "ACL file reloaded");
                    self.acls.replace(f);
                }
                Err(e) => {
                    ok = false;
                    error!(error = %e, "local.acl_file not reloaded; the previous one stays in force");
                }
            }
        }
        if ok {
            self.metrics.security_reloads.inc();
        } else {
            self.metrics.security_reload_errors.inc();
        }
    }

    /// Count a refusal and log it at most once per client id and reason per minute.
    pub fn refuse(&self, why: SecurityRefusal, client: &str, peer: &str, detail: &str) {
        self.metrics.security_refused[why as usize].inc();
        if let Some(n) = self.logs.due(why, client) {
            warn!(reason = why.as_str(), client, peer, detail, occurrences = n,
                "device refused by local security (logged at most once per client per minute; counted in edgeferry_security_refused_total)");
        }
    }

    /// CONNECT: check the credentials (and that the will may be published). Err is the CONNACK
    /// code to answer with; the CONNECT is then not relayed to the broker.
    pub async fn admit(
        &self,
        client_id: &str,
        peer: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        will_topic: Option<&str>,
    ) -> Result<Grant, ConnectReturnCode> {
        let user = match self.auth.check(username, password).await {
            Verdict::Allowed(u) => u,
            Verdict::BadCredentials => {
                self.refuse(
                    SecurityRefusal::BadCredentials,
                    client_id,
                    peer,
                    &format!(
                        "unknown user or wrong password for user {:?}",
                        username.unwrap_or("")
                    ),
                );
                return Err(ConnectReturnCode::BadUserNamePassword);
            }
            Verdict::NotAuthorized => {
                self.refuse(
                    SecurityRefusal::Anonymous,
                    client_id,
                    peer,
                    "no user name and local.allow_anonymous = false",
                );
                return Err(ConnectReturnCode::NotAuthorized);
            }
        };
        let mut grant = Grant {
            acl: self.acls.for_client(user.as_deref(), client_id),
            generation: self.acls.generation(),
            user,
            client_id: client_id.to_string(),
        };
        if let Some(topic) = will_topic {
            if !grant.may_publish(self, topic) {
                self.refuse(
                    SecurityRefusal::AclWill,
                    client_id,
                    peer,
                    &format!("will topic {topic:?} outside the device's write rights"),
                );
                return Err(ConnectReturnCode::NotAuthorized);
            }
        }
        Ok(grant)
    }
}

impl Grant {
    /// Recompile the rules when the ACL file was reloaded since.
    fn refresh(&mut self, s: &Security) {
        let g = s.acls.generation();
        if g != self.generation {
            self.acl = s.acls.for_client(self.user.as_deref(), &self.client_id);
            self.generation = g;
        }
    }

    /// May the device publish to `topic`? (Counting and logging is the caller's, who knows how
    /// the publish is answered.)
    pub fn may_publish(&mut self, s: &Security, topic: &str) -> bool {
        self.refresh(s);
        self.acl.as_mut().is_none_or(|a| a.may_publish(topic))
    }

    /// May the device subscribe to `filter`?
    pub fn may_subscribe(&mut self, s: &Security, filter: &str) -> bool {
        self.refresh(s);
        self.acl.as_mut().is_none_or(|a| a.may_subscribe(filter))
    }

    /// A denied publish: counted by client, logged at most once per minute per client.
    pub fn denied_publish(&self, s: &Security, peer: &str, topic: &str) {
        s.metrics.acl_denied_publishes.inc(&self.client_id);
        s.refuse(
            SecurityRefusal::AclPublish,
            &self.client_id,
            peer,
            &format!("publish to {topic:?} outside the device's write rights; not queued"),
        );
    }
}

/// At most one line per (reason, client id) per [`LOG_EVERY`], with the count it covers.
#[derive(Default)]
struct ClientLogs {
    last: Mutex<HashMap<(SecurityRefusal, String), (Instant, u64)>>,
}

impl ClientLogs {
    fn due(&self, why: SecurityRefusal, client: &str) -> Option<u64> {
        let mut m = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if m.len() >= LOG_KEYS {
            m.retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
            if m.len() >= LOG_KEYS {
                // A storm of distinct ids: keep one line per reason per period regardless.
                m.clear();
            }
        }
        match m.get_mut(&(why, client.to_string())) {
            Some((at, n)) if now.duration_since(*at) < LOG_EVERY => {
                *n += 1;
                None
            }
            Some((at, n)) => {
                let covered = *n + 1;
                *at = now;
                *n = 0;
                Some(covered)
            }
            None => {
                m.insert((why, client.to_string()), (now, 0));
                Some(1)
            }
        }
    }
}

/// The SUBACK code for a refused filter: v5 "not authorized"; v3.1.1 knows only "failure".
pub fn refused_code(v5: bool) -> SubscribeReasonCode {
    if v5 {
        SubscribeReasonCode::NotAuthorized
    } else {
        SubscribeReasonCode::Failure
    }
}

/// Put refused filters' codes back at their positions (ascending) among the broker's codes.
pub fn splice_codes(
    codes: &mut Vec<SubscribeReasonCode>,
    refused: Vec<(usize, SubscribeReasonCode)>,
) {
    for (i, c) in refused {
        codes.insert(i.min(codes.len()), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_codes_go_back_in_place() {
        let ok = SubscribeReasonCode::Success(rumqttd::protocol::QoS::AtLeastOnce);
        let mut codes = vec![ok, ok];
        splice_codes(
            &mut codes,
            vec![(0, refused_code(false)), (2, refused_code(false))],
        );
        assert_eq!(
            codes,
            vec![refused_code(false), ok, refused_code(false), ok]
        );
    }
}
