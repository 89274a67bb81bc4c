//! The property every MQTT codec target checks, shared by the cargo-fuzz target `decode_mqtt`,
//! the proptest in tests/mqtt_codec.rs and its long-running form (tests/mqtt_codec.rs,
//! `--ignored`). Device bytes are decoded with rumqttd's codec (`V4`/`V5` `read_mut`) the way a
//! connection decodes them: the stream arrives in chunks, each chunk is appended to a buffer,
//! packets are taken from its front until the codec asks for more bytes, and any other error
//! ends the connection.
//!
//! Whatever the bytes, the split and the max packet size:
//!
//! - decoding never panics;
//! - `InsufficientBytes` leaves the buffer exactly as it was (the caller reads more and
//!   retries); a decoded packet consumed at least its 2-byte fixed header;
//! - a decoded packet re-encodes (`write`) without panicking, and the encoding decodes back to
//!   the same packet;
//! - a decoded PUBLISH also encodes for the other protocol version, properties dropped or
//!   absent, and decodes there to the same publish: the broker forwards publishes between
//!   v3.1.1 and v5 clients.
//!
//! The first 4 input bytes choose the protocol (bit 0), the max packet size and the chunk size.
//! The returned signature (which packets decoded, which error ended the stream) lets a
//! coverage-blind driver keep inputs that did something new.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use bytes::BytesMut;
use rumqttd::protocol::{v4::V4, v5::V5, Error, Packet, Protocol};

/// Larger than any remaining length (2^28 - 1): re-decoding an encoding is never refused for size.
const NO_LIMIT: usize = 1 << 28;

/// Check one input; returns a signature of what happened.
pub fn check(input: &[u8]) -> u64 {
    let [mode, max_hi, max_lo, chunk, data @ ..] = input else {
        return 0;
    };
    let max = usize::from(u16::from_be_bytes([*max_hi, *max_lo])) + 1;
    let chunk = usize::from(*chunk % 128) + 1;
    let mut trace = Trace::default();
    if mode & 1 == 0 {
        stream(V4, V5, data, max, chunk, &mut trace);
    } else {
        stream(V5, V4, data, max, chunk, &mut trace);
    }
    let mut sig = DefaultHasher::new();
    (mode & 1, trace.first, trace.kinds, trace.end).hash(&mut sig);
    sig.finish()
}

/// What a stream did, coarsely: enough to tell new behaviour from old, few enough distinct
/// values that a corpus keyed by it stays small.
#[derive(Default)]
struct Trace {
    /// The first three packets' kinds, in order.
    first: Vec<String>,
    /// Every packet kind (and whether it had properties) seen.
    kinds: std::collections::BTreeSet<String>,
    /// The error that ended the stream.
    end: Option<String>,
}

impl Trace {
    fn packet(&mut self, packet: &Packet) {
        // "Publish(Publish { ..": the variant name, plus whether properties came with it.
        let debug = format!("{packet:?}");
        let name = debug.split('(').next().unwrap_or_default().to_string();
        let kind = format!("{name}{}", if debug.ends_with("None)") { "" } else { "+p" });
        if self.first.len() < 3 {
            self.first.push(kind.clone());
        }
        self.kinds.insert(kind);
    }

    fn error(&mut self, e: &Error) {
        let debug = format!("{e:?}");
        self.end = Some(debug.split('(').next().unwrap_or_default().to_string());
    }
}

/// Decode `data` as one connection would, fed `chunk` bytes at a time.
fn stream<P: Protocol + Clone, Q: Protocol + Clone>(
    mut proto: P,
    other: Q,
    data: &[u8],
    max: usize,
    chunk: usize,
    trace: &mut Trace,
) {
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.clone();
            match proto.read_mut(&mut buf, max) {
                Ok(packet) => {
                    trace.packet(&packet);
                    assert!(
                        buf.len() + 2 <= before.len(),
                        "{packet:?} decoded from fewer than 2 bytes"
                    );
                    roundtrip(&mut proto.clone(), &packet);
                    if let Packet::Publish(..) = packet {
                        crossover(&mut other.clone(), &packet);
                    }
                }
                Err(Error::InsufficientBytes(n)) => {
                    assert!(n > 0, "InsufficientBytes(0)");
                    assert_eq!(
                        buf, before,
                        "InsufficientBytes consumed bytes: the next read would start mid-packet"
                    );
                    break;
                }
                Err(e) => {
                    // The connection is closed: nothing after this is read.
                    trace.error(&e);
                    return;
                }
            }
        }
    }
}

/// `packet` encodes with `proto` and decodes back to itself.
fn roundtrip<P: Protocol>(proto: &mut P, packet: &Packet) {
    let mut out = BytesMut::new();
    let written = match proto.write(packet.clone(), &mut out) {
        Ok(n) => n,
        Err(e) => panic!("{packet:?} decoded but does not encode: {e:?}"),
    };
    assert_eq!(
        written,
        out.len(),
        "write reported {written} bytes for {packet:?}"
    );
    let encoded = out.clone();
    match proto.read_mut(&mut out, NO_LIMIT) {
        Ok(again) => assert_eq!(
            &again, packet,
            "encoding {encoded:02x?} decodes to something else"
        ),
        Err(e) => panic!("{packet:?} encodes as {encoded:02x?}, which does not decode: {e:?}"),
    }
    assert!(out.is_empty(), "encoding of {packet:?} has trailing bytes");
}

/// A publish decoded with one protocol, written with the other (what the broker does when a
/// v5 client publishes to a v3.1.1 subscriber or the other way round).
fn crossover<Q: Protocol>(other: &mut Q, packet: &Packet) {
    let Packet::Publish(publish, properties) = packet else {
        return;
    };
    let mut out = BytesMut::new();
    // Either protocol's properties or none: V4 drops them, V5 writes them.
    if let Err(e) = other.write(
        Packet::Publish(publish.clone(), properties.clone()),
        &mut out,
    ) {
        panic!("{packet:?} does not encode for the other protocol: {e:?}");
    }
    match other.read_mut(&mut out, NO_LIMIT) {
        Ok(Packet::Publish(again, _)) => assert_eq!(&again, publish),
        other => panic!("{packet:?} re-encoded for the other protocol decodes as {other:?}"),
    }
}

// ---- seeds: one valid packet of every kind, per protocol ------------------------------------

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return [out, body.to_vec()].concat();
        }
    }
}

fn s(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// An MQTT 5 properties block: a variable-length size, then the properties.
fn props(body: &[u8]) -> Vec<u8> {
    let mut framed = frame(0, body);
    framed.remove(0);
    framed
}

/// Valid MQTT 3.1.1 packets, one of each kind a client or server sends.
pub fn seeds_v4() -> Vec<Vec<u8>> {
    let connect = [
        s("MQTT"),
        vec![4, 0b1110_1110, 0, 60], // user, password, will retain, will QoS 1, will, clean
        s("dev-1"),
        s("will/topic"),
        s("gone"),
        s("user"),
        s("secret"),
    ]
    .concat();
    vec![
        frame(0x10, &connect),
        frame(0x10, &[s("MQTT"), vec![4, 0x02, 0, 30], s("")].concat()),
        frame(0x20, &[0, 0]),
        frame(0x30, &[s("a/b"), b"hello".to_vec()].concat()),
        frame(
            0x33,
            &[s("é/x"), vec![0, 7], b"q1 retained".to_vec()].concat(),
        ),
        frame(
            0x3c,
            &[s("$SYS/x"), vec![0x12, 0x34], b"q2 dup".to_vec()].concat(),
        ),
        frame(0x40, &[0, 7]),
        frame(0x50, &[0, 7]),
        frame(0x62, &[0, 7]),
        frame(0x70, &[0, 7]),
        frame(
            0x82,
            &[vec![0, 9], s("a/+/c"), vec![1], s("#"), vec![2]].concat(),
        ),
        frame(0x90, &[0, 9, 0, 1, 0x80]),
        frame(0xa2, &[vec![0, 10], s("a/+/c"), s("#")].concat()),
        frame(0xb0, &[0, 10]),
        vec![0xc0, 0],
        vec![0xd0, 0],
        vec![0xe0, 0],
    ]
}

/// Valid MQTT 5 packets, one of each kind, with properties of every type where allowed.
pub fn seeds_v5() -> Vec<Vec<u8>> {
    let user = [vec![0x26], s("k"), s("v")].concat();
    let connect_props = props(
        &[
            vec![0x11, 0, 0, 0, 10], // session expiry
            vec![0x21, 0, 20],       // receive maximum
            vec![0x27, 0, 1, 0, 0],  // maximum packet size
            vec![0x22, 0, 5],        // topic alias maximum
            vec![0x19, 1],           // request response information
            vec![0x17, 1],           // request problem information
            user.clone(),
            [vec![0x15], s("m")].concat(), // authentication method
            [vec![0x16], s("d")].concat(), // authentication data
        ]
        .concat(),
    );
    let will_props = props(
        &[
            vec![0x18, 0, 0, 0, 2],  // will delay
            vec![0x01, 1],           // payload format
            vec![0x02, 0, 0, 0, 60], // message expiry
            [vec![0x03], s("text/plain")].concat(),
            [vec![0x08], s("reply/to")].concat(),
            [vec![0x09], s("corr")].concat(),
            user.clone(),
        ]
        .concat(),
    );
    let connect = [
        s("MQTT"),
        vec![5, 0b1110_1110, 0, 60],
        connect_props,
        s("dev-5"),
        will_props,
        s("é/will"),
        s("bye"),
        s("user"),
        s("secret"),
    ]
    .concat();
    let publish_props = props(
        &[
            vec![0x01, 1],
            vec![0x02, 0, 0, 0, 60],
            vec![0x23, 0, 1], // topic alias
            [vec![0x08], s("reply/to")].concat(),
            [vec![0x09], s("corr")].concat(),
            user.clone(),
            vec![0x0b, 0x81, 0x01], // subscription identifier 129
            [vec![0x03], s("text/plain")].concat(),
        ]
        .concat(),
    );
    let reason = props(&[[vec![0x1f], s("why")].concat(), user.clone()].concat());
    vec![
        frame(0x10, &connect),
        frame(0x10, &[s("MQTT"), vec![5, 0x02, 0, 30, 0], s("")].concat()),
        frame(
            0x20,
            &[
                vec![0, 0],
                props(
                    &[
                        vec![0x11, 0, 0, 0, 10],
                        vec![0x21, 0, 20],
                        vec![0x24, 1], // maximum QoS
                        vec![0x25, 1], // retain available
                        vec![0x27, 0, 1, 0, 0],
                        [vec![0x12], s("assigned")].concat(),
                        vec![0x22, 0, 5],
                        [vec![0x1f], s("why")].concat(),
                        user.clone(),
                        vec![0x28, 1],     // wildcard subscriptions available
                        vec![0x29, 1],     // subscription identifiers available
                        vec![0x2a, 1],     // shared subscriptions available
                        vec![0x13, 0, 30], // server keep alive
                        [vec![0x1a], s("info")].concat(),
                        [vec![0x1c], s("elsewhere")].concat(),
                        [vec![0x15], s("m")].concat(),
                        [vec![0x16], s("d")].concat(),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        ),
        frame(0x30, &[s("a/b"), vec![0], b"hello".to_vec()].concat()),
        frame(
            0x33,
            &[s("é/x"), vec![0, 7], publish_props, b"q1".to_vec()].concat(),
        ),
        frame(
            0x34,
            &[s(""), vec![0, 8], props(&[0x23, 0, 1]), b"alias".to_vec()].concat(),
        ),
        frame(0x40, &[vec![0, 7, 0x10], reason.clone()].concat()),
        frame(0x40, &[0, 7]),
        frame(0x50, &[vec![0, 7, 0x80], reason.clone()].concat()),
        frame(0x62, &[vec![0, 7, 0x92], reason.clone()].concat()),
        frame(0x70, &[vec![0, 7, 0], reason.clone()].concat()),
        frame(
            0x82,
            &[
                vec![0, 9],
                props(&[vec![0x0b, 5], user.clone()].concat()),
                s("a/+/c"),
                vec![0b0010_1110], // retain handling 2, retain as published, no local, QoS 2
                s("$share/g/x"),
                vec![1],
            ]
            .concat(),
        ),
        frame(
            0x90,
            &[vec![0, 9], reason.clone(), vec![0, 1, 2, 0x80]].concat(),
        ),
        frame(
            0xa2,
            &[vec![0, 10], props(&user), s("a/+/c"), s("#")].concat(),
        ),
        frame(0xb0, &[vec![0, 10], reason.clone(), vec![0, 0x11]].concat()),
        vec![0xc0, 0],
        vec![0xd0, 0],
        vec![0xe0, 0],
        frame(
            0xe0,
            &[
                vec![0x04],
                props(
                    &[
                        vec![0x11, 0, 0, 0, 0],
                        [vec![0x1f], s("bye")].concat(),
                        user,
                        [vec![0x1c], s("elsewhere")].concat(),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        ),
        // The bytes that used to panic the broker (issue 10).
        vec![0x20, 0x02, 0x00, 0x00],
        vec![0xb0, 0x02, 0x00, 0x01],
    ]
}

/// Decode `data` in one piece: the packets, and the error that ended the stream if any.
pub fn decode(v5: bool, data: &[u8]) -> (Vec<Packet>, Option<Error>) {
    let mut buf = BytesMut::from(data);
    let mut packets = Vec::new();
    loop {
        let read = if v5 {
            V5.read_mut(&mut buf, NO_LIMIT)
        } else {
            V4.read_mut(&mut buf, NO_LIMIT)
        };
        match read {
            Ok(p) => packets.push(p),
            Err(Error::InsufficientBytes(_)) if buf.is_empty() => return (packets, None),
            Err(e) => return (packets, Some(e)),
        }
    }
}

/// A check input: header (`mode`, max size, chunk size) followed by `data`.
pub fn input(v5: bool, max: u16, chunk: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(v5)];
    out.extend_from_slice(&max.to_be_bytes());
    out.push(chunk);
    out.extend_from_slice(data);
    out
}

/// Every seed alone, and each protocol's seeds back to back as one stream, as check inputs.
pub fn seed_inputs() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (v5, seeds) in [(false, seeds_v4()), (true, seeds_v5())] {
        for seed in &seeds {
            out.push(input(v5, u16::MAX, 127, seed));
        }
        out.push(input(v5, u16::MAX, 7, &seeds.concat()));
    }
    out
}
