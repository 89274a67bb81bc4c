//! Checks of the `[local]` security keys that need no file access. The files themselves
//! (password, ACL, certificates) are read and checked by `ingest::auth::check_files` at
//! `check` and start-up, so a bad file is a one-line error naming its key before anything runs.

use super::{ConfigError, Local};

pub(super) fn validate(
    local: &Local,
    bad: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let protected = local.password_file.is_some() || local.acl_file.is_some();
    if protected && local.allow_anonymous.is_none() {
        return Err(bad(
            "local.allow_anonymous",
            "must be set explicitly (true or false) when local.password_file or local.acl_file is set".into(),
        ));
    }
    if local.allow_anonymous == Some(false) && local.password_file.is_none() {
        return Err(bad(
            "local.allow_anonymous",
            "false needs local.password_file: otherwise no device could connect".into(),
        ));
    }
    for (key, v) in [
        ("local.max_client_id_len", local.max_client_id_len),
        ("local.max_topic_len", local.max_topic_len),
        ("local.max_topic_levels", local.max_topic_levels),
        ("local.max_subscriptions", local.max_subscriptions),
        ("local.max_qos2_inflight", local.max_qos2_inflight),
    ] {
        if v == 0 || v > 65535 {
            return Err(bad(key, "must be between 1 and 65535".into()));
        }
    }
    let ka = local.max_keepalive.0;
    if ka < std::time::Duration::from_secs(1) || ka > std::time::Duration::from_secs(65535) {
        return Err(bad(
            "local.max_keepalive",
            "must be between 1s and 65535s (MQTT keepalives are whole seconds in 16 bits)".into(),
        ));
    }
    if local.max_retained == 0 {
        return Err(bad(
            "local.max_retained",
            "must be at least 1 (retained messages cannot be switched off)".into(),
        ));
    }
    if local.max_retained_bytes.0 < local.max_payload.0 {
        return Err(bad(
            "local.max_retained_bytes",
            "must be at least local.max_payload".into(),
        ));
    }
    if local.max_rate == 0 && local.rate_burst != 0 {
        return Err(bad(
            "local.rate_burst",
            "needs local.max_rate (the burst is of a rate limit)".into(),
        ));
    }
    Ok(())
}
