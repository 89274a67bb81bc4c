//! MQTT framing facts the ingress needs before (or besides) the full decode: the fixed header of
//! the next packet in a byte stream, and the packet id and topic bounds of a PUBLISH. Pure code,
//! no I/O, fuzzed and property-tested: every device byte passes through here first.
//!
//! The full decode is rumqttd's codec (`rumqttd::protocol`); this module only answers "how long is
//! the next frame, what type is it, and which packet id does it carry", which the codec's public
//! types do not expose (`Publish`'s QoS and packet id are crate-private).

/// MQTT control packet types (the high nibble of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    PingReq,
    PingResp,
    Disconnect,
    Auth,
}

/// The fixed header of a complete frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The low nibble of the first byte (PUBLISH: dup, QoS, retain).
    pub flags: u8,
    /// Bytes of the fixed header (1 + the remaining-length varint).
    pub header_len: usize,
    /// Fixed header plus remaining length: the whole frame.
    pub frame_len: usize,
}

impl Header {
    /// PUBLISH QoS (0, 1, 2; 3 is malformed and refused by the codec).
    pub fn qos(&self) -> u8 {
        (self.flags >> 1) & 0b11
    }

    pub fn retain(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Why the bytes at the start of a buffer are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Packet type 0 (reserved).
    #[error("reserved packet type 0")]
    BadType,
    /// The remaining-length varint runs past four bytes.
    #[error("malformed remaining length")]
    BadLength,
    /// The frame is larger than the limit for this connection.
    #[error("packet of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

/// The header of the first frame in `buf`: `Ok(None)` while more bytes are needed. A frame larger
/// than `limit` bytes is refused as soon as its length is known, before it is buffered.
pub fn header(buf: &[u8], limit: usize) -> Result<Option<Header>, FrameError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let kind = match byte1 >> 4 {
        1 => Kind::Connect,
        2 => Kind::ConnAck,
        3 => Kind::Publish,
        4 => Kind::PubAck,
        5 => Kind::PubRec,
        6 => Kind::PubRel,
        7 => Kind::PubComp,
        8 => Kind::Subscribe,
        9 => Kind::SubAck,
        10 => Kind::Unsubscribe,
        11 => Kind::UnsubAck,
        12 => Kind::PingReq,
        13 => Kind::PingResp,
        14 => Kind::Disconnect,
        15 => Kind::Auth,
        _ => return Err(FrameError::BadType),
    };
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if i > 4 {
            return Err(FrameError::BadLength);
        }
    }
    let frame_len = i + remaining;
    if frame_len > limit {
        return Err(FrameError::TooLarge {
            size: frame_len,
            limit,
        });
    }
    if buf.len() < frame_len {
        return Ok(None);
    }
    Ok(Some(Header {
        kind,
        flags: byte1 & 0x0f,
        header_len: i,
        frame_len,
    }))
}

/// The packet id of a complete PUBLISH frame with QoS 1 or 2 (None for QoS 0 or when the frame
/// is too short; the codec then refuses it).
pub fn publish_pkid(frame: &[u8], h: &Header) -> Option<u16> {
    if h.qos() == 0 {
        return None;
    }
    let at = h.header_len;
    let topic_len = usize::from(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    let p = at + 2 + topic_len;
    Some(u16::from_be_bytes([*frame.get(p)?, *frame.get(p + 1)?]))
}

/// The packet id of a PUBREL (or any ack-shaped packet: PUBACK, PUBREC, PUBCOMP).
pub fn ack_pkid(frame: &[u8], h: &Header) -> Option<u16> {
    let at = h.header_len;
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// An MQTT variable byte integer starting at `at`: (value, index just past it). None when it
/// runs past the buffer or past four bytes.
fn varint_at(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (n, i) in (at..at + 4).enumerate() {
        let b = *buf.get(i)?;
        value |= usize::from(b & 0x7f) << (7 * n);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The return (v3.1.1) or reason (v5) code of a complete CONNACK frame: 0 is success.
pub fn connack_code(frame: &[u8], h: &Header) -> Option<u8> {
    frame.get(h.header_len + 1).copied()
}

/// In a complete MQTT 5 CONNACK frame, lower the announced Topic Alias Maximum (property 0x22)
/// to at most `max`, in place (same length). Returns whether the property was found. Walks only
/// properties whose layout it knows; stops quietly at anything else.
pub fn cap_topic_alias_max(frame: &mut [u8], h: &Header, max: u16) -> bool {
    // Property length varint.
    let Some((len, mut i)) = varint_at(frame, h.header_len + 2) else {
        return false;
    };
    let end = (i + len).min(frame.len());
    while i < end {
        let id = frame[i];
        i += 1;
        let size = match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x12 | 0x1A | 0x1C | 0x1F | 0x15 | 0x16 => {
                let (Some(&a), Some(&b)) = (frame.get(i), frame.get(i + 1)) else {
                    return false;
                };
                2 + usize::from(u16::from_be_bytes([a, b]))
            }
            0x26 => {
                let (Some(&a), Some(&b)) = (frame.get(i), frame.get(i + 1)) else {
                    return false;
                };
                let k = 2 + usize::from(u16::from_be_bytes([a, b]));
                let (Some(&c), Some(&d)) = (frame.get(i + k), frame.get(i + k + 1)) else {
                    return false;
                };
                k + 2 + usize::from(u16::from_be_bytes([c, d]))
            }
            _ => return false,
        };
        if id == 0x22 && i + 2 <= end {
            let current = u16::from_be_bytes([frame[i], frame[i + 1]]);
            frame[i..i + 2].copy_from_slice(&current.min(max).to_be_bytes());
            return true;
        }
        i += size;
    }
    false
}

/// A complete QoS 0 PUBLISH frame re-framed as QoS 1 with packet id `pkid` (the id goes right
/// after the topic; the rest, v5 properties included, is unchanged). None if `frame` is not a
/// well-formed QoS 0 PUBLISH.
pub fn qos0_to_qos1(frame: &[u8], pkid: u16) -> Option<Vec<u8>> {
    let h = header(frame, usize::MAX).ok()??;
    if h.kind != Kind::Publish || h.qos() != 0 || h.frame_len != frame.len() {
        return None;
    }
    let at = h.header_len;
    let topic_len = usize::from(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    let split = at + 2 + topic_len;
    if split > frame.len() {
        return None;
    }
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.push((frame[0] & !0b0110) | 0b0010);
    put_remaining_length(&mut out, frame.len() - at + 2);
    out.extend_from_slice(&frame[at..split]);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(&frame[split..]);
    Some(out)
}

/// A complete MQTT 5 CONNACK frame with a Server Keep Alive property (0x13) set to `secs`,
/// re-encoded (the lengths grow by three bytes). None when the frame is not a CONNACK with a
/// readable property block; the caller then sends it unchanged.
pub fn with_server_keep_alive(frame: &[u8], h: &Header, secs: u16) -> Option<Vec<u8>> {
    if h.kind != Kind::ConnAck {
        return None;
    }
    let body = frame.get(h.header_len..h.frame_len)?;
    // Flags and reason code, then the property length varint.
    let fixed = body.get(..2)?;
    let (len, i) = varint_at(body, 2)?;
    let props = body.get(i..i + len)?;
    let mut new_props = vec![0x13];
    new_props.extend_from_slice(&secs.to_be_bytes());
    new_props.extend_from_slice(props);
    let mut new_body = fixed.to_vec();
    put_remaining_length(&mut new_body, new_props.len());
    new_body.extend_from_slice(&new_props);
    new_body.extend_from_slice(body.get(i + len..)?);
    let mut out = vec![frame[0]];
    put_remaining_length(&mut out, new_body.len());
    out.extend_from_slice(&new_body);
    Some(out)
}

/// Encode a remaining length (for frames the ingress writes itself).
pub fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn headers_of_common_packets() {
        // PINGREQ
        let h = header(&[0xc0, 0x00], 100).unwrap().unwrap();
        assert_eq!((h.kind, h.frame_len, h.header_len), (Kind::PingReq, 2, 2));
        // QoS 1 PUBLISH to "a/b", pkid 7, payload "x"
        let p = [0x32, 8, 0, 3, b'a', b'/', b'b', 0, 7, b'x'];
        let h = header(&p, 100).unwrap().unwrap();
        assert_eq!(h.kind, Kind::Publish);
        assert_eq!(h.qos(), 1);
        assert_eq!(publish_pkid(&p, &h), Some(7));
        // Incomplete
        assert_eq!(header(&p[..5], 100), Ok(None));
        assert_eq!(header(&[0x30], 100), Ok(None));
        assert_eq!(header(&[0x30, 0x80], 100), Ok(None));
    }

    #[test]
    fn connack_topic_alias_maximum_is_capped_in_place() {
        // CONNACK v5: flags 0, reason 0, properties: session expiry (0x11, u32), topic alias max
        // 4096 (0x22), reason string "ok" (0x1F).
        let mut f = vec![
            0x20, 14, 0, 0, 11, 0x11, 0, 0, 0, 5, 0x22, 0x10, 0x00, 0x1F, 0, 2, b'o', b'k',
        ];
        f[1] = (f.len() - 2) as u8;
        f[4] = (f.len() - 5) as u8;
        let h = header(&f, 100).unwrap().unwrap();
        assert_eq!(connack_code(&f, &h), Some(0));
        assert!(cap_topic_alias_max(&mut f, &h, 64));
        assert_eq!(&f[11..13], &64u16.to_be_bytes());
        // v3.1.1 CONNACK: no properties.
        let mut v4 = vec![0x20, 2, 0, 0];
        let h = header(&v4, 100).unwrap().unwrap();
        assert!(!cap_topic_alias_max(&mut v4, &h, 64));
    }

    #[test]
    fn a_qos0_publish_reframed_as_qos1_carries_the_packet_id() {
        // Retained QoS 0 PUBLISH to "a/b", payload "xy".
        let f = [0x31, 7, 0, 3, b'a', b'/', b'b', b'x', b'y'];
        let q1 = qos0_to_qos1(&f, 0x1234).unwrap();
        assert_eq!(
            q1,
            vec![0x33, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'x', b'y']
        );
        let h = header(&q1, 100).unwrap().unwrap();
        assert_eq!(
            (h.qos(), h.retain(), publish_pkid(&q1, &h)),
            (1, true, Some(0x1234))
        );
        assert!(qos0_to_qos1(&q1, 1).is_none(), "already QoS 1");
        assert!(
            qos0_to_qos1(&[0x30, 1, 0], 1).is_none(),
            "truncated topic length"
        );
    }

    #[test]
    fn connack_gets_server_keep_alive() {
        use bytes::BytesMut;
        use rumqttd::protocol::{v5::V5, ConnAck, ConnAckProperties, ConnectReturnCode, Protocol};
        let props = ConnAckProperties {
            topic_alias_max: Some(64),
            ..ConnAckProperties::default()
        };
        let mut f = BytesMut::new();
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        };
        V5.write(rumqttd::protocol::Packet::ConnAck(ack, Some(props)), &mut f)
            .unwrap();
        let h = header(&f, usize::MAX).unwrap().unwrap();
        let out = with_server_keep_alive(&f, &h, 90).unwrap();
        // Decode it as a client would (rumqttd only decodes client packets: read the property).
        let h2 = header(&out, usize::MAX).unwrap().unwrap();
        assert_eq!(h2.frame_len, out.len());
        assert_eq!(connack_code(&out, &h2), Some(0));
        let props_at = h2.header_len + 3;
        assert_eq!(&out[props_at..props_at + 3], &[0x13, 0, 90]);
        let mut capped = out.clone();
        assert!(cap_topic_alias_max(&mut capped, &h2, 64));
        // v3.1.1 CONNACK has no property block: None.
        let v4 = [0x20, 2, 0, 0];
        let h = header(&v4, 100).unwrap().unwrap();
        assert_eq!(with_server_keep_alive(&v4, &h, 90), None);
    }

    #[test]
    fn malformed_and_oversized_are_refused() {
        assert_eq!(header(&[0x00, 0x00], 100), Err(FrameError::BadType));
        assert_eq!(
            header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
            Err(FrameError::BadLength)
        );
        // 200 bytes announced, limit 100: refused before the bytes arrive.
        assert!(matches!(
            header(&[0x30, 0xc8, 0x01], 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn remaining_length_round_trips() {
        for len in [
            0usize,
            1,
            127,
            128,
            16383,
            16384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut out = vec![0x30];
            put_remaining_length(&mut out, len);
            let header_len = out.len();
            out.resize(header_len + len, 0);
            let h = header(&out, usize::MAX).unwrap().unwrap();
            assert_eq!((h.header_len, h.frame_len), (header_len, header_len + len));
        }
    }

    proptest! {
        /// Arbitrary bytes never panic, and a frame, when found, fits in the buffer and the limit.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), limit in 0usize..128) {
            if let Ok(Some(h)) = header(&bytes, limit) {
                prop_assert!(h.frame_len <= bytes.len() && h.frame_len <= limit);
                let _ = publish_pkid(&bytes[..h.frame_len], &h);
                let _ = ack_pkid(&bytes[..h.frame_len], &h);
                let mut f = bytes[..h.frame_len].to_vec();
                let _ = cap_topic_alias_max(&mut f, &h, 64);
                let _ = connack_code(&f, &h);
                let _ = with_server_keep_alive(&f, &h, 60);
            }
        }
    }
}
