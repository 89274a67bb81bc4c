//! `[[serial]]`: serial ports feeding the queue. (Interface stub: filled in by serial ingestion.)

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// Names the port in logs, metrics and dedup keys. Required, unique.
    pub name: String,
    /// Device path. Required.
    pub path: PathBuf,
    /// Upstream topic template. Required.
    pub topic: String,
    /// Upstream topic filter whose messages are written to this port. Default: none.
    pub downlink: Option<String>,
}

impl SerialPort {
    /// Validate; on error returns (key within this `[[serial]]` table, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
