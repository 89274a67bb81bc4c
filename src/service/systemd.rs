//! systemd integration (sd_notify): READY=1 once the store is open and the local listener
//! accepts; WATCHDOG=1 only while the pipeline answers liveness probes; STATUS= with a one-line
//! summary; STOPPING=1 on shutdown. Without NOTIFY_SOCKET every call is a no-op.
//!
//! Liveness is probed, not assumed: a timer that keeps ticking while the store thread or the
//! forwarder is wedged would hide exactly the failures the watchdog exists for. Each probe is a
//! round trip through the component's own loop: the store thread answers a stats request; the
//! forwarder and every ingest link answer from their select loops, which they only reach when
//! not stuck in an await elsewhere (a store that stopped committing, for instance).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::oneshot;

pub use crate::health::{answer, probe, Probe, ProbeRx};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::queue::StoreHandle;
use crate::telemetry::Metrics;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// One-line summary for STATUS= and logs.
pub fn summary(metrics: &Metrics) -> String {
    format!(
        "{}queue {} messages, upstream {}, {} forwarded, {} dead letters",
        if metrics.store_commit_failing.get() == 1 {
            "store commits failing (disk full?), devices held back; "
        } else {
            ""
        },
        metrics.queue_depth.get(),
        if metrics.upstream_connected.get() == 1 {
            "connected"
        } else {
            "down"
        },
        metrics.acked.get(),
        metrics.dead_letters.get(),
    )
}

/// Probe everything every half watchdog period; send WATCHDOG=1 only when all answered.
/// Runs until `stop`. Without a watchdog configured, refreshes STATUS every 30 s.
pub async fn watchdog(
    probes: Vec<Probe>,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let period = sd_notify::watchdog_enabled();
    let every = period.map(|p| p / 2).unwrap_or(Duration::from_secs(30));
    let answer_within = every / 2;
    let mut stalled: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let mut failed = Vec::new();
        if !matches!(
            tokio::time::timeout(answer_within, store.alive()).await,
            Ok(Ok(_))
        ) {
            failed.push("store".to_string());
        }
        for p in &probes {
            let (reply, rx) = oneshot::channel();
            let ok = p.tx.try_send(reply).is_ok()
                && matches!(tokio::time::timeout(answer_within, rx).await, Ok(Ok(())));
            if !ok {
                failed.push(p.name.clone());
            }
        }
        let status = summary(&metrics);
        if failed.is_empty() {
            if let Some(what) = stalled.take() {
                info!(was = %what, "pipeline answers again; watchdog resumed");
            }
            let _ = sd_notify::notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
        } else {
            let what = failed.join(", ");
            if stalled.as_deref() != Some(what.as_str()) {
                warn!(stalled = %what, "pipeline not answering; withholding the systemd watchdog so the service is restarted if it stays stuck");
            }
            let line = format!("stalled: {what}; {status}");
            let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
            stalled = Some(what);
        }
    }
}
