//! A raw-socket MQTT device: writes exactly the bytes a test gives it (no client library in the
//! way, so it can send what libraries refuse: wildcard topics, NUL, invalid UTF-8, broken
//! frames) and reads whole packets back with a bounded wait.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Packet(Vec<u8>),
    /// Nothing arrived within the wait.
    Nothing,
    /// The peer closed the connection.
    Closed,
}

pub struct RawDevice {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub v5: bool,
}

fn varint(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![byte1];
    varint(&mut f, body.len());
    f.extend_from_slice(body);
    f
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A CONNECT frame (clean session, keepalive 60 s).
pub fn connect_frame(client_id: &str, v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(if v5 { 5 } else { 4 });
    body.push(0x02);
    body.extend_from_slice(&60u16.to_be_bytes());
    if v5 {
        body.push(0); // no properties
    }
    string(&mut body, client_id.as_bytes());
    frame(0x10, &body)
}

/// A PUBLISH frame; `props` is the raw v5 property block (without its length), ignored for v4.
pub fn publish_frame(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    pkid: u16,
    v5: bool,
    props: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        varint(&mut body, props.len());
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

impl RawDevice {
    /// Connect and complete CONNECT/CONNACK; panics if the broker refuses.
    pub fn connect(port: u16, client_id: &str, v5: bool) -> RawDevice {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).unwrap();
        let mut d = RawDevice {
            stream,
            buf: Vec::new(),
            v5,
        };
        d.send(&connect_frame(client_id, v5));
        match d.read(Duration::from_secs(10)) {
            Got::Packet(p) => assert_eq!(p[0], 0x20, "expected CONNACK, got {p:02x?}"),
            other => panic!("no CONNACK: {other:?}"),
        }
        d
    }

    /// A TCP connection that has sent nothing yet.
    pub fn open(port: u16) -> RawDevice {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        RawDevice {
            stream,
            buf: Vec::new(),
            v5: false,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // A closed peer is the test's business (it reads Closed next), not a panic here.
        let _ = self.stream.write_all(bytes);
    }

    pub fn publish(&mut self, topic: &[u8], payload: &[u8], qos: u8, pkid: u16) {
        let f = publish_frame(topic, payload, qos, pkid, self.v5, &[]);
        self.send(&f);
    }

    /// The next whole packet, waiting at most `wait`.
    pub fn read(&mut self, wait: Duration) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(len) = whole(&self.buf) {
                return Got::Packet(self.buf.drain(..len).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Nothing;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Got::Nothing
                }
                Err(_) => return Got::Closed,
            }
        }
    }

    /// Wait until the connection is closed by the peer (packets before that are skipped).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Got::Closed => return true,
                Got::Packet(_) => continue,
                Got::Nothing => return false,
            }
        }
        false
    }
}

/// Length of the first whole frame in `buf`, if any.
fn whole(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    (buf.len() >= i + len).then_some(i + len)
}

/// The packet id of an acknowledgement packet (PUBACK, PUBREC, PUBCOMP).
pub fn ack_pkid(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[2], p[3]])
}
