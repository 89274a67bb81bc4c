//! A scripted MQTT 5 upstream, for behaviour real brokers do not produce on demand:
//! acknowledging out of order, refusing chosen messages with a PUBACK reason, or ending the
//! connection with a DISCONNECT reason when a chosen message arrives. It speaks just enough
//! MQTT 5 (CONNECT, PUBLISH QoS 1, SUBSCRIBE, PINGREQ, DISCONNECT) with rumqttc's own codec.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, Packet, PingResp, PubAck,
    PubAckReason, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream does with each message, by payload.
#[derive(Clone, Copy)]
pub struct Script {
    /// PUBACKs are held and released in reverse order once this many are held, or when the
    /// client pauses (nothing more to read for a moment). 1 acknowledges in order.
    pub ack_batch: usize,
    /// PUBACK reason for a message; `None` acknowledges it.
    pub refuse: fn(&[u8]) -> Option<PubAckReason>,
    /// End the connection with this DISCONNECT when the message arrives (it is neither
    /// acknowledged nor recorded as accepted).
    pub disconnect: fn(&[u8]) -> Option<Disconnect>,
    /// Receive Maximum announced in CONNACK.
    pub receive_max: Option<u16>,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            ack_batch: 1,
            refuse: |_| None,
            disconnect: |_| None,
            receive_max: None,
        }
    }
}

/// What the upstream saw, across connections.
#[derive(Debug, Default)]
pub struct Seen {
    /// Payloads acknowledged with success, in arrival order (resends included).
    pub accepted: Vec<Vec<u8>>,
    /// Payloads refused with a PUBACK reason.
    pub refused: Vec<Vec<u8>>,
    /// Payloads that made it end the connection.
    pub disconnected_on: Vec<Vec<u8>>,
    pub connections: u64,
}

pub struct Scripted {
    pub port: u16,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    /// Listen on a loopback port; must be called inside a tokio runtime.
    pub async fn start(script: Script) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                s.lock().unwrap().connections += 1;
                tokio::spawn(serve(sock, script, s.clone()));
            }
        });
        Scripted { port, seen, task }
    }

    pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write(out: &mut BytesMut, p: Packet) {
    p.write(out, None).expect("encode");
}

/// Release held PUBACKs, newest first.
fn release(out: &mut BytesMut, held: &mut Vec<(u16, PubAckReason)>) {
    while let Some((pkid, reason)) = held.pop() {
        let mut ack = PubAck::new(pkid, None);
        ack.reason = reason;
        write(out, Packet::PubAck(ack));
    }
}

async fn serve(mut sock: TcpStream, script: Script, seen: Arc<Mutex<Seen>>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut held: Vec<(u16, PubAckReason)> = Vec::new();
    loop {
        let packet = match Packet::read(&mut buf, Some(1 << 20)) {
            Ok(p) => p,
            Err(MqttError::InsufficientBytes(_)) => {
                // Nothing complete buffered: answer what is due, then read more. A short pause
                // from the client releases the held acknowledgements.
                if !out.is_empty() {
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
                match tokio::time::timeout(Duration::from_millis(2), sock.read_buf(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(_)) => {}
                    Err(_) => {
                        release(&mut out, &mut held);
                        if !out.is_empty() {
                            if sock.write_all(&out).await.is_err() {
                                return;
                            }
                            out.clear();
                        }
                        match sock.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                }
                continue;
            }
            Err(_) => return,
        };
        match packet {
            Packet::Connect(..) => write(
                &mut out,
                Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::Success,
                    properties: Some(ConnAckProperties {
                        session_expiry_interval: None,
                        receive_max: script.receive_max,
                        max_qos: None,
                        retain_available: None,
                        max_packet_size: None,
                        assigned_client_identifier: None,
                        topic_alias_max: None,
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: None,
                        subscription_identifiers_available: None,
                        shared_subscription_available: None,
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                }),
            ),
            Packet::Publish(p) => {
                let payload = p.payload.to_vec();
                if let Some(disconnect) = (script.disconnect)(&payload) {
                    seen.lock().unwrap().disconnected_on.push(payload);
                    release(&mut out, &mut held);
                    write(&mut out, Packet::Disconnect(disconnect));
                    let _ = sock.write_all(&out).await;
                    let _ = sock.shutdown().await;
                    return;
                }
                if p.qos == QoS::AtMostOnce {
                    continue;
                }
                let reason = (script.refuse)(&payload).unwrap_or(PubAckReason::Success);
                {
                    let mut s = seen.lock().unwrap();
                    if reason == PubAckReason::Success {
                        s.accepted.push(payload);
                    } else {
                        s.refused.push(payload);
                    }
                }
                held.push((p.pkid, reason));
                if held.len() >= script.ack_batch.max(1) {
                    release(&mut out, &mut held);
                }
            }
            Packet::PingReq(_) => write(&mut out, Packet::PingResp(PingResp)),
            Packet::Subscribe(s) => write(
                &mut out,
                Packet::SubAck(SubAck {
                    pkid: s.pkid,
                    return_codes: s
                        .filters
                        .iter()
                        .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
                        .collect(),
                    properties: None,
                }),
            ),
            Packet::Disconnect(_) => return,
            _ => {}
        }
    }
}
