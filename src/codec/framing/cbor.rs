//! `cbor`: a stream of CBOR data items (RFC 8949), back to back with nothing between them.
//!
//! Wire format: each frame is the encoding of one complete, well-formed top-level data item;
//! the frame's payload is exactly those bytes (not re-encoded). CBOR items carry their own
//! lengths, so no delimiter is needed, but for the same reason there is nothing to resync on:
//!
//! - bytes that cannot start a well-formed item (e.g. 0xFF, a break outside an indefinite
//!   item; reserved additional-information values; invalid UTF-8 in a text string; nesting
//!   deeper than [`MAX_DEPTH`]) are dropped one at a time and decoding retries at the next byte;
//!   a run of them is one [`ErrorKind::Malformed`];
//! - an item still incomplete when the max frame size is buffered is [`ErrorKind::Oversized`];
//!   those bytes are dropped and decoding continues with the rest of the stream, which (being
//!   the middle of an item) may decode as spurious items or errors.
//!
//! Most single bytes are complete items (small integers, simple values), so noise on a CBOR
//! line tends to decode as spurious frames rather than errors. On noisy links, wrap CBOR in
//! `cobs` or `slip` instead. Work per input byte is bounded by the max frame size: each byte
//! starts at most one parse attempt per fed chunk, and an attempt reads at most the buffer.

use crate::codec::framing::{Sink, SkipRun};
use crate::codec::{CodecError, ErrorKind};

/// Nesting depth accepted: deep enough for any real payload, shallow enough that the recursive
/// parser stays well within a small thread stack.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug)]
pub(super) struct CborDecoder {
    /// Bytes from the start of the next item on, at most `max`.
    buf: Vec<u8>,
    max: usize,
    /// Bytes dropped because no well-formed item starts at them, not yet reported.
    skipped: SkipRun,
}

enum Parse {
    /// A well-formed item of this many bytes starts the buffer.
    Item(usize),
    /// The buffer holds the beginning of an item, possibly well-formed.
    Incomplete,
    /// No well-formed item starts the buffer.
    Malformed,
}

fn parse(buf: &[u8]) -> Parse {
    let mut rest = buf;
    match ciborium::de::from_reader_with_recursion_limit::<ciborium::Value, _>(&mut rest, MAX_DEPTH)
    {
        Ok(_) => Parse::Item(buf.len() - rest.len()),
        Err(ciborium::de::Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Parse::Incomplete
        }
        Err(_) => Parse::Malformed,
    }
}

impl CborDecoder {
    pub(super) fn new(max: usize) -> Self {
        CborDecoder {
            buf: Vec::with_capacity(max),
            max,
            skipped: SkipRun::default(),
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8], sink: &mut Sink<'_>) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let take = rest.len().min(self.max - self.buf.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            // Leaves the buffer less than full, so the next round always takes bytes.
            self.decode(sink);
        }
    }

    fn decode(&mut self, sink: &mut Sink<'_>) {
        while !self.buf.is_empty() {
            match parse(&self.buf) {
                Parse::Item(n) => {
                    self.skipped.flush(ErrorKind::Malformed, sink);
                    sink.frame(&self.buf[..n]);
                    self.buf.drain(..n);
                }
                Parse::Incomplete if self.buf.len() == self.max => {
                    self.skipped.flush(ErrorKind::Malformed, sink);
                    sink.bad(ErrorKind::Oversized, self.buf.len(), &self.buf);
                    self.buf.clear();
                }
                Parse::Incomplete => return,
                Parse::Malformed => {
                    self.skipped.push(&self.buf[..1]);
                    self.buf.drain(..1);
                }
            }
        }
    }

    pub(super) fn finish(&mut self, sink: &mut Sink<'_>) {
        self.skipped.flush(ErrorKind::Malformed, sink);
        if !self.buf.is_empty() {
            sink.bad(ErrorKind::Truncated, self.buf.len(), &self.buf);
            self.buf.clear();
        }
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len() + self.skipped.buffered()
    }
}

/// CBOR payloads go on the wire as they are; they must be exactly one well-formed item, or
/// the receiver would split or merge them.
pub(super) fn encode(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    match parse(payload) {
        Parse::Item(n) if n == payload.len() => Ok(payload.to_vec()),
        Parse::Item(_) => Err(CodecError::NotCbor {
            reason: "bytes after the first item",
        }),
        Parse::Incomplete if payload.is_empty() => Err(CodecError::NotCbor { reason: "empty" }),
        Parse::Incomplete => Err(CodecError::NotCbor {
            reason: "incomplete item",
        }),
        Parse::Malformed => Err(CodecError::NotCbor {
            reason: "not well-formed",
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::framing::testutil::*;
    use crate::codec::{Decoded, Decoder, Framing};

    fn to_cbor(value: &ciborium::Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(value, &mut out).unwrap();
        out
    }

    /// Single bytes that can never start a well-formed item: reserved additional information
    /// (28..=30) in every major type, and a break (0xFF) outside an indefinite-length item.
    fn noise_bytes() -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..8u8)
            .flat_map(|major| (28..=30).map(move |ai| major << 5 | ai))
            .collect();
        bytes.push(0xFF);
        bytes
    }

    #[test]
    fn noise_bytes_are_malformed_at_any_point() {
        for b in noise_bytes() {
            assert!(matches!(parse(&[b]), Parse::Malformed), "{b:#04x}");
            assert!(matches!(parse(&[b, 0x01]), Parse::Malformed), "{b:#04x}");
        }
    }

    #[test]
    fn splits_back_to_back_items_exactly() {
        // RFC 8949 appendix A examples: 1, [1, [2, 3]], {"a": 1}, indefinite (_ h'0102', h'03'),
        // "\u{00fc}", 1.5 (half float), tag 1 (epoch time).
        let items: Vec<&[u8]> = vec![
            &[0x01],
            &[0x82, 0x01, 0x82, 0x02, 0x03],
            &[0xA1, 0x61, 0x61, 0x01],
            &[0x5F, 0x42, 0x01, 0x02, 0x41, 0x03, 0xFF],
            &[0x62, 0xC3, 0xBC],
            &[0xF9, 0x3E, 0x00],
            &[0xC1, 0x1A, 0x51, 0x4B, 0x67, 0xB0],
        ];
        let out = decode_both_ways(Framing::Cbor, 16, &items.concat(), &[1]);
        let want: Vec<Vec<u8>> = items.iter().map(|i| i.to_vec()).collect();
        assert_eq!(frames(&out), want);
        assert!(errors(&out).is_empty());
    }

    #[test]
    fn garbage_is_skipped_as_one_malformed_run() {
        let wire = [0xFF, 0x1C, 0xFF, 0x01, 0xFF, 0x62, 0xFF, 0xFE, 0x02];
        let out = decode_both_ways(Framing::Cbor, 16, &wire, &[1]);
        assert_eq!(
            out.iter()
                .map(|d| match d {
                    Decoded::Frame(f) => format!("frame {:02x?}", &f[..]),
                    Decoded::Bad(b) => format!("{} {:02x?}", b.kind, &b.bytes[..]),
                })
                .collect::<Vec<_>>(),
            [
                "malformed [ff, 1c, ff]",
                "frame [01]",
                // 0x62 starts a 2-byte text string, but 0xFF 0xFE is not UTF-8.
                "malformed [ff, 62, ff, fe]",
                "frame [02]",
            ]
        );
    }

    #[test]
    fn oversized_item_is_dropped_at_the_limit() {
        // A 20-byte byte string with noise bytes as contents, then an item.
        let mut wire = vec![0x54];
        wire.extend([0xFF; 20]);
        wire.push(0x07);
        let mut dec = Decoder::new(Framing::Cbor, 8).unwrap();
        let out = dec.feed(&wire);
        assert_eq!(
            errors(&out),
            vec![ErrorKind::Oversized, ErrorKind::Malformed]
        );
        assert_eq!(frames(&out), vec![vec![0x07]]);
    }

    #[test]
    fn nesting_beyond_the_depth_limit_is_malformed() {
        let deep = |n: usize| [vec![0x81; n], vec![0x00]].concat();
        assert!(matches!(parse(&deep(MAX_DEPTH - 1)), Parse::Item(_)));
        // Far past the limit (a stack-overflow attempt): rejected byte by byte, never recursing
        // deeper than the limit.
        let out = decode_both_ways(Framing::Cbor, 20_000, &deep(10_000), &[4096]);
        assert_eq!(errors(&out)[0], ErrorKind::Malformed);
    }

    #[test]
    fn huge_declared_lengths_wait_for_bytes_then_are_oversized() {
        // A byte string claiming 2^64-1 bytes must not allocate or stall beyond the limit.
        let mut wire = vec![0x5B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        wire.extend([0x00; 60]);
        let mut dec = Decoder::new(Framing::Cbor, 64).unwrap();
        let out = dec.feed(&wire);
        assert_eq!(errors(&out), vec![ErrorKind::Oversized]);
        assert_eq!(frames(&out), vec![vec![0x00]; 5]);
    }

    #[test]
    fn encode_accepts_exactly_one_item() {
        assert_eq!(encode(&[0x82, 0x01, 0x02]).unwrap(), [0x82, 0x01, 0x02]);
        for bad in [&[][..], &[0x82, 0x01], &[0x01, 0x02], &[0xFF]] {
            assert!(
                matches!(encode(bad), Err(CodecError::NotCbor { .. })),
                "{bad:02x?}"
            );
        }
    }

    #[test]
    fn partial_item_at_finish_is_truncated() {
        let mut dec = Decoder::new(Framing::Cbor, 8).unwrap();
        assert!(dec.feed(&[0x82, 0x01]).is_empty());
        assert_eq!(errors(&dec.finish()), vec![ErrorKind::Truncated]);
    }

    fn value() -> impl Strategy<Value = ciborium::Value> {
        use ciborium::Value;
        let leaf = prop_oneof![
            any::<i64>().prop_map(|i| Value::Integer(i.into())),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
            any::<f64>().prop_map(Value::Float),
            ".{0,12}".prop_map(Value::Text),
            prop::collection::vec(any::<u8>(), 0..12).prop_map(Value::Bytes),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_input_is_safe(data in prop::collection::vec(any::<u8>(), 0..400), max in 1usize..50, cuts in cuts()) {
            decode_both_ways(Framing::Cbor, max, &data, &cuts);
        }

        #[test]
        fn round_trips(values in prop::collection::vec(value(), 0..6), cuts in cuts()) {
            let items: Vec<Vec<u8>> = values.iter().map(to_cbor).collect();
            let max = items.iter().map(Vec::len).max().unwrap_or(1);
            let out = decode_both_ways(Framing::Cbor, max, &encode_all(Framing::Cbor, &items), &cuts);
            prop_assert_eq!(frames(&out), items);
            prop_assert!(errors(&out).is_empty());
        }

        // Noise is drawn from bytes that cannot start an item (`noise_bytes`): CBOR has no
        // delimiter and nearly every other byte is itself a complete item, so arbitrary noise
        // would decode as spurious items or swallow the next one. Each run is one error.
        #[test]
        fn items_after_noise_are_recovered(
            parts in prop::collection::vec((prop::collection::vec(prop::sample::select(noise_bytes()), 0..20), value()), 1..6),
            cuts in cuts(),
        ) {
            let mut data = Vec::new();
            let mut want = Vec::new();
            let mut want_errors = Vec::new();
            for (noise, v) in &parts {
                data.extend(noise);
                want.push(to_cbor(v));
                data.extend(to_cbor(v));
                if !noise.is_empty() {
                    want_errors.push(ErrorKind::Malformed);
                }
            }
            let out = decode_both_ways(Framing::Cbor, 400, &data, &cuts);
            prop_assert_eq!(frames(&out), want);
            prop_assert_eq!(errors(&out), want_errors);
        }
    }
}
