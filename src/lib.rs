//! edgeferry: a store-and-forward MQTT gateway daemon for small edge gateways.
//!
//! # Layout
//!
//! Data flows top to bottom:
//!
//! - [`config`]: the TOML file, its defaults and validation (checked before anything starts).
//! - [`ingest`]: sources. [`ingest::mqtt`] is the device-facing MQTT ingress: it decodes with
//!   rumqttd's codec, validates, routes and queues every publish and sends the PUBACK after the
//!   commit; [`ingest::frame`] is its pure framing; [`ingest::broker`] the embedded rumqttd for
//!   local subscriptions, retained messages and wills; [`ingest::serial`] reads framed serial
//!   ports.
//! - [`codec`]: serial framings (lines, COBS, SLIP, length+CRC, CBOR): pure, fuzzed decoders.
//! - [`route`]: topic filters and upstream topic templates (pure).
//! - [`dedup`]: ingest dedup keys (pure); the window itself is a table in the queue.
//! - [`queue`]: the SQLite store on its own thread: group commit, stable ids, rows deleted only
//!   on PUBACK. Its module docs state the invariants.
//! - [`forward`]: the upstream rumqttc session: bounded window, pkid -> row map, backoff.
//! - [`telemetry`]: counters, histograms, the Prometheus endpoint, logging.
//! - [`backoff`]: reconnect and reopen timing with full jitter (pure; the forwarder and serial
//!   ports use it).
//! - [`health`]: liveness probes every stage answers (a leaf, used from below the service).
//! - [`service`]: wiring, signals, orderly shutdown. [`cli`]: the command line.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod codec;
pub mod config;
pub mod dedup;
pub mod forward;
pub mod health;
pub mod ingest;
pub mod queue;
pub mod route;
pub mod service;
pub mod telemetry;
