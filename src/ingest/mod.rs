//! Ingest: sources that feed the queue. [`mqtt`] is the device-facing MQTT ingress (PUBACK
//! after commit), [`frame`] its pure framing helpers, [`broker`] the embedded rumqttd for what
//! devices do with each other; [`serial`] reads framed messages from serial ports.

pub mod acl;
pub mod auth;
pub mod broker;
pub mod frame;
pub mod limits;
pub mod mqtt;
pub mod security;
pub mod serial;
