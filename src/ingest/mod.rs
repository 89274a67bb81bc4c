//! Ingest: sources that feed the queue. `mqtt` is the embedded broker devices publish to;
//! `serial` reads framed messages from serial ports.

pub mod mqtt;
pub mod serial;
