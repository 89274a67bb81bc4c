//! Device bytes as the ingress decodes them, without a socket: [`frame::header`] to find the
//! next frame, rumqttd's codec to decode it, CONNECT first and client packets only, then the
//! topic checks a PUBLISH meets first. The session ([`super::mqtt`]) runs the same steps on its
//! buffers; this is the pure face of them that the proptests here and the `ingress_packets` fuzz
//! target drive with hostile bytes. The property: no input panics, and a bad frame is an error
//! (the session closes that one connection), never a wrong packet.

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol as _};

use super::frame::{self, FrameError, Kind};
use crate::route;

/// Why device bytes do not decode (the session closes the connection on each).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// No frame: reserved type, bad remaining length, over the size limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The codec refused the frame's contents.
    #[error("{0:?}: {1}")]
    Codec(Kind, String),
    /// The first packet was not CONNECT, or a second CONNECT came.
    #[error("{0:?} out of order")]
    Order(Kind),
    /// A packet only a server sends.
    #[error("{0:?} from a client")]
    ServerOnly(Kind),
}

/// One connection's decoder state.
#[derive(Debug)]
pub struct DeviceDecoder {
    v5: bool,
    limit: usize,
    connected: bool,
}

impl DeviceDecoder {
    pub fn new(v5: bool, limit: usize) -> DeviceDecoder {
        DeviceDecoder {
            v5,
            limit,
            connected: false,
        }
    }

    /// The next packet in `buf` (consumed from it), `Ok(None)` while more bytes are needed.
    /// PUBLISH topics are checked as the session checks them first (a topic the ingress refuses
    /// decodes fine: refusing it is the session's answer, not a decode error).
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(h) = frame::header(buf, self.limit)? else {
            return Ok(None);
        };
        match (self.connected, h.kind) {
            (false, Kind::Connect) => self.connected = true,
            (false, k) | (true, k @ Kind::Connect) => return Err(DecodeError::Order(k)),
            (true, k @ (Kind::ConnAck | Kind::SubAck | Kind::UnsubAck | Kind::PingResp)) => {
                return Err(DecodeError::ServerOnly(k))
            }
            _ => {}
        }
        if h.kind == Kind::Publish {
            let _ = frame::publish_pkid(buf, &h);
        }
        let packet = if self.v5 {
            V5.read_mut(buf, self.limit)
        } else {
            V4.read_mut(buf, self.limit)
        }
        .map_err(|e| DecodeError::Codec(h.kind, format!("{e:?}")))?;
        if let Packet::Publish(p, _) = &packet {
            let _ = route::topic_name(&p.topic);
        }
        Ok(Some(packet))
    }
}

/// Decode everything in `bytes` fed in pieces of `chunk` bytes: the packets, and the error that
/// would close the connection, if any.
pub fn decode_all(
    v5: bool,
    limit: usize,
    bytes: &[u8],
    chunk: usize,
) -> (Vec<Packet>, Option<String>) {
    let mut dec = DeviceDecoder::new(v5, limit);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.next(&mut buf) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn connect(v5: bool) -> Vec<u8> {
        let mut body = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            if v5 { 5 } else { 4 },
            0xC2,
            0,
            60,
        ];
        if v5 {
            body.push(0);
        }
        for s in [&b"dev"[..], b"user", b"pass"] {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s);
        }
        let mut f = vec![0x10];
        frame::put_remaining_length(&mut f, body.len());
        f.extend_from_slice(&body);
        f
    }

    fn publish(v5: bool, topic: &[u8], qos: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic);
        if qos > 0 {
            body.extend_from_slice(&[0, 7]);
        }
        if v5 {
            frame::put_remaining_length(&mut body, props.len());
            body.extend_from_slice(props);
        }
        body.extend_from_slice(payload);
        let mut f = vec![0x30 | (qos << 1)];
        frame::put_remaining_length(&mut f, body.len());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn valid_session_decodes_and_order_is_enforced() {
        for v5 in [false, true] {
            let mut bytes = connect(v5);
            bytes.extend(publish(v5, b"devices/a", 1, &[], b"hi"));
            bytes.extend([0xC0, 0]);
            let (packets, err) = decode_all(v5, 1 << 16, &bytes, 3);
            assert_eq!((packets.len(), err), (3, None));
            let (packets, err) = decode_all(v5, 1 << 16, &publish(v5, b"a", 0, &[], b""), 64);
            assert!(
                packets.is_empty() && err.is_some(),
                "PUBLISH before CONNECT"
            );
            let mut twice = connect(v5);
            twice.extend(connect(v5));
            assert!(decode_all(v5, 1 << 16, &twice, 64).1.is_some());
        }
        // QoS 3 is malformed.
        let mut bytes = connect(false);
        bytes.extend(publish(false, b"a", 3, &[], b"x"));
        assert!(decode_all(false, 1 << 16, &bytes, 64).1.is_some());
    }

    fn session() -> impl Strategy<Value = (bool, Vec<u8>)> {
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..40),
            0u8..3,
            proptest::collection::vec(any::<u8>(), 0..24),
            proptest::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(|(v5, topic, qos, props, payload)| {
                let mut b = connect(v5);
                b.extend(publish(v5, &topic, qos, &props, &payload));
                (v5, b)
            })
    }

    proptest! {
        /// Arbitrary bytes after a valid CONNECT never panic, whatever the chunking.
        #[test]
        fn arbitrary_bytes_never_panic(v5 in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..512),
                chunk in 1usize..64, limit in 2usize..4096) {
            let mut bytes = connect(v5);
            bytes.extend(tail);
            let _ = decode_all(v5, limit, &bytes, chunk);
        }

        /// A valid CONNECT + PUBLISH with random topic, properties and payload, then with bytes
        /// flipped, overwritten or cut: no panic, and the same result whatever the chunking
        /// (the decode never depends on how TCP split the bytes).
        #[test]
        fn mutated_connect_and_publish_never_panic((v5, mut bytes) in session(),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                cut in any::<usize>(), chunk in 1usize..32) {
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let cut = bytes.len() - cut % (bytes.len() / 2 + 1);
            bytes.truncate(cut);
            let (whole, e1) = decode_all(v5, 1 << 16, &bytes, usize::MAX);
            let (pieces, e2) = decode_all(v5, 1 << 16, &bytes, chunk);
            prop_assert_eq!(whole, pieces);
            prop_assert_eq!(e1.is_some(), e2.is_some());
        }
    }
}
