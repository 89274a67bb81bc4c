//! edgeferry: store-and-forward MQTT gateway daemon.
#![forbid(unsafe_code)]
