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
    Ok(())
}
