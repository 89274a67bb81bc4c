//! Ingest: sources that feed the queue. `mqtt` is the embedded broker devices publish to.

pub mod mqtt;
