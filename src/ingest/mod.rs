//! Ingest: sources that feed the queue. `mqtt` is the embedded broker devices publish to;
//! `gate` holds MQTT devices back while the store is behind; `serial` reads framed messages from
//! serial ports.

pub mod gate;
pub mod mqtt;
pub mod serial;
