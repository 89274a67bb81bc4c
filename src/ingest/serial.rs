//! Serial ports as sources. (Interface stub: filled in by serial ingestion.)

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::serial::SerialPort;
use crate::queue::StoreHandle;
use crate::telemetry::Metrics;

/// What a port task needs from the daemon.
pub struct SerialContext {
    pub gateway: String,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    /// Upstream messages to frame and write to the port (when `downlink` is configured).
    pub downlink: Option<mpsc::Receiver<Vec<u8>>>,
}

/// Run one port until `shutdown`: open (and reopen) it, decode frames, queue them.
pub async fn run_port(port: SerialPort, ctx: SerialContext, shutdown: CancellationToken) {
    let _ = (port, ctx);
    shutdown.cancelled().await;
}
