//! Running the daemon: open the store, start the local broker, ingest and forwarder, wait for a
//! shutdown signal, then stop in order (ingest, commit, in-flight grace, close the store).

pub mod systemd;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::forward::client::Settings;
use crate::forward::{Downlink, Forwarder};
use crate::ingest::broker::LocalBroker;
use crate::ingest::mqtt::{IngestError, Ingress};
use crate::ingest::serial::{self, SerialContext};
use crate::queue::{Store, StoreError};
use crate::route::TopicFilter;
use crate::telemetry::{self, Metrics};

/// Downlink messages buffered per serial port while it is slow or absent.
const DOWNLINK_QUEUE: usize = 64;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The store could not be opened (or was refused).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local broker could not start.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// Upstream settings unusable (TLS files).
    #[error("{0}")]
    Upstream(String),
    /// The metrics endpoint could not listen.
    #[error("telemetry.metrics_listen {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl ServiceError {
    /// The process exit status for this failure: [`crate::cli::EXIT_CONFIG`] when only the
    /// operator can fix it (the store file is not a usable edgeferry store), otherwise
    /// [`crate::cli::EXIT_FAILURE`].
    pub fn exit_code(&self) -> i32 {
        match self {
            ServiceError::Store(
                StoreError::NotADatabase { .. }
                | StoreError::Foreign { .. }
                | StoreError::TooNew { .. }
                | StoreError::Corrupt { .. },
            ) => crate::cli::EXIT_CONFIG,
            _ => crate::cli::EXIT_FAILURE,
        }
    }
}

/// Run until `shutdown` resolves, then stop cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let metrics = Arc::new(Metrics::default());
    let settings = Settings::from_config(&config).map_err(ServiceError::Upstream)?;
    let store = Store::open(&config.store.path, config.store_options(), metrics.clone())?;
    let broker = LocalBroker::new(&config)?;
    // Bind the device listeners before anything starts: "address in use" is a start-up error.
    let ingress = Ingress::bind(
        &config,
        broker.v4,
        broker.v5,
        store.handle(),
        metrics.clone(),
    )?;
    // SIGHUP reloads the password and ACL files (a bad file keeps the old one; see
    // ingest::security). Installed now: SIGHUP's default action would end the daemon.
    let security = ingress.security();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading local.password_file and local.acl_file");
                    security.reload();
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; security files will not reload")
        }
    }
    let metrics_task = match config.telemetry.metrics_listen {
        Some(addr) => {
            let listener = telemetry::bind_metrics(addr)
                .await
                .map_err(|source| ServiceError::Metrics { addr, source })?;
            Some(tokio::spawn(telemetry::serve_metrics(
                listener,
                metrics.clone(),
            )))
        }
        None => None,
    };

    let ingest_stop = CancellationToken::new();
    let forward_stop = CancellationToken::new();
    let mut probes = Vec::new();
    // Devices are served only once the embedded broker answers (their CONNECT is relayed to it).
    broker.start().await?;
    let (ingress_probe, ingress_probes) = systemd::probe("ingress");
    probes.push(ingress_probe);
    let ingest = tokio::spawn(ingress.run(ingress_probes, ingest_stop.clone()));
    // Serial ports: one task each, stopped with ingest; downlink channels for those that want one.
    let mut downlinks = Vec::new();
    let mut serial_tasks = Vec::new();
    for port in config.serial.clone() {
        let downlink = match port.downlink.as_deref().map(TopicFilter::parse) {
            Some(Ok(filter)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(DOWNLINK_QUEUE);
                downlinks.push(Downlink { filter, tx });
                Some(rx)
            }
            _ => None,
        };
        let ctx = SerialContext {
            gateway: config.gateway.id.clone(),
            store: store.handle(),
            metrics: metrics.clone(),
            downlink,
        };
        serial_tasks.push(tokio::spawn(serial::run_port(
            port,
            ctx,
            ingest_stop.clone(),
        )));
    }
    let (forwarder_probe, forwarder_probes) = systemd::probe("forwarder");
    probes.push(forwarder_probe);
    let forwarder = Forwarder {
        settings,
        gateway: config.gateway.id.clone(),
        grace: config.shutdown.grace.0,
        store: store.handle(),
        metrics: metrics.clone(),
        downlinks,
        probes: forwarder_probes,
    };
    let forward = tokio::spawn(forwarder.run(forward_stop.clone()));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        local = %config.local.listen,
        store = %config.store.path.display(),
        upstream = %config.upstream.address,
        backlog = metrics.queue_depth.get(),
        "edgeferry running"
    );

    systemd::ready(&systemd::summary(&metrics));
    let watchdog_stop = CancellationToken::new();
    let watchdog = tokio::spawn(systemd::watchdog(
        probes,
        store.handle(),
        metrics.clone(),
        watchdog_stop.clone(),
    ));

    shutdown.await;
    systemd::stopping();
    watchdog_stop.cancel();
    let _ = watchdog.await;
    info!("shutting down: stopping ingest");
    ingest_stop.cancel();
    // Sessions stop reading, wait for the commits their devices are owed PUBACKs for, and close.
    // Bounded: with a store that cannot commit (full disk), nothing more is acknowledged anyway.
    match tokio::time::timeout(config.shutdown.grace.0 + Duration::from_secs(5), ingest).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "ingest task failed"),
        Err(_) => warn!("device sessions did not finish within the grace period; unacknowledged publishes stay with the devices"),
    }
    for t in serial_tasks {
        let _ = t.await;
    }
    if let Err(e) = store.handle().flush().await {
        warn!(error = %e, "final commit of ingested messages failed");
    }
    forward_stop.cancel();
    // The forwarder bounds its own wait by the grace period; this is a backstop.
    let backstop = config.shutdown.grace.0 + Duration::from_secs(3);
    if tokio::time::timeout(backstop, forward).await.is_err() {
        warn!("forwarder did not stop within the grace period");
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    let depth = metrics.queue_depth.get();
    tokio::task::spawn_blocking(move || store.close())
        .await
        .ok();
    info!(
        queued = depth,
        committed = metrics.committed.get(),
        forwarded = metrics.acked.get(),
        commit_p99_us = metrics.commit_latency.quantile_us(0.99).unwrap_or(0),
        "stopped; queued messages are kept for the next start"
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (inside the
/// runtime), not when the future is first polled, so a SIGTERM during start-up is a clean stop
/// rather than the default action (death by signal).
pub fn signals() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = int.recv() => info!("SIGINT received"),
                }
            }
            _ => {
                // Without signal handlers only ctrl-c remains; better than never stopping cleanly.
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
