//! `cobs`: Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999), 0x00-delimited.
//!
//! Wire format: the payload is split at its zero bytes into blocks; each block is sent as a code
//! byte `n` (1..=255) followed by `n - 1` non-zero data bytes. A code below 0xFF implies a zero
//! after its block (except for the last block); 0xFF means a full 254-byte block with no zero.
//! The frame ends with 0x00, which therefore never occurs inside it. Overhead is at most one
//! byte per 254 plus the delimiter. An empty payload is `01 00`; a lone `00` (a sender may
//! prefix frames with one to flush noise) is no frame at all.
//!
//! Decoding is streaming (the buffer holds unstuffed payload, at most the max frame size).
//! A 0x00 inside a block is a truncated frame; any other fault is detected only as far as COBS
//! allows: it has no checksum, so noise ending in 0x00 may decode as a spurious frame. Either
//! way the 0x00 ends it and decoding resumes with the next frame.

use crate::codec::framing::Sink;
use crate::codec::ErrorKind;

#[derive(Debug)]
pub(super) struct CobsDecoder {
    /// Unstuffed payload so far, at most `max` bytes.
    buf: Vec<u8>,
    max: usize,
    /// Data bytes left in the current block; 0 means the next byte is a code byte.
    remaining: u8,
    /// The previous block implied a zero, to be added if another block follows.
    zero_pending: bool,
    /// A code byte was seen since the last delimiter.
    in_frame: bool,
    /// Dropping an oversized frame up to the next 0x00.
    discarding: bool,
}

impl CobsDecoder {
    pub(super) fn new(max: usize) -> Self {
        CobsDecoder {
            buf: Vec::with_capacity(max),
            max,
            remaining: 0,
            zero_pending: false,
            in_frame: false,
            discarding: false,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8], sink: &mut Sink<'_>) {
        for &b in chunk {
            self.step(b, sink);
        }
    }

    fn step(&mut self, b: u8, sink: &mut Sink<'_>) {
        if b == 0 {
            if self.discarding {
                // Already reported as oversized.
            } else if self.remaining > 0 {
                sink.bad(ErrorKind::Truncated, self.buf.len(), &self.buf);
            } else if self.in_frame {
                sink.frame(&self.buf);
            }
            self.reset();
        } else if self.discarding {
        } else if self.remaining == 0 {
            let zero = self.zero_pending;
            self.in_frame = true;
            self.remaining = b - 1;
            self.zero_pending = b != 0xFF;
            if zero {
                self.push(0, sink);
            }
        } else {
            // Before the push: an oversized push resets the block state.
            self.remaining -= 1;
            self.push(b, sink);
        }
    }

    fn push(&mut self, b: u8, sink: &mut Sink<'_>) {
        if self.buf.len() == self.max {
            sink.bad(ErrorKind::Oversized, self.max + 1, &self.buf);
            self.reset();
            self.discarding = true;
        } else {
            self.buf.push(b);
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.remaining = 0;
        self.zero_pending = false;
        self.in_frame = false;
        self.discarding = false;
    }

    pub(super) fn finish(&mut self, sink: &mut Sink<'_>) {
        if self.in_frame && !self.discarding {
            sink.bad(ErrorKind::Truncated, self.buf.len(), &self.buf);
        }
        self.reset();
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }
}

pub(super) fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 254 + 2);
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for (i, &b) in payload.iter().enumerate() {
        if b != 0 {
            out.push(b);
            code += 1;
            // A full block ends without an implied zero; open another only if data follows, so
            // a 254-byte payload is FF + data, as in the paper.
            if code < 0xFF || i + 1 == payload.len() {
                continue;
            }
        }
        out[code_at] = code;
        code_at = out.len();
        out.push(0);
        code = 1;
    }
    out[code_at] = code;
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::framing::testutil::*;
    use crate::codec::{Decoded, Decoder, Framing};

    /// Wikipedia's COBS examples (payload, encoding with delimiter).
    fn vectors() -> Vec<(Vec<u8>, Vec<u8>)> {
        let seq = |from: u8, to: u8| (from..=to).collect::<Vec<u8>>();
        let cat = |parts: &[&[u8]]| parts.concat();
        vec![
            (vec![], vec![0x01, 0x00]),
            (vec![0x00], vec![0x01, 0x01, 0x00]),
            (vec![0x00, 0x00], vec![0x01, 0x01, 0x01, 0x00]),
            (vec![0x00, 0x11, 0x00], vec![0x01, 0x02, 0x11, 0x01, 0x00]),
            (
                vec![0x11, 0x22, 0x00, 0x33],
                vec![0x03, 0x11, 0x22, 0x02, 0x33, 0x00],
            ),
            (
                vec![0x11, 0x22, 0x33, 0x44],
                vec![0x05, 0x11, 0x22, 0x33, 0x44, 0x00],
            ),
            (
                vec![0x11, 0x00, 0x00, 0x00],
                vec![0x02, 0x11, 0x01, 0x01, 0x01, 0x00],
            ),
            (seq(0x01, 0xFE), cat(&[&[0xFF], &seq(0x01, 0xFE), &[0x00]])),
            (
                cat(&[&[0x00], &seq(0x01, 0xFE)]),
                cat(&[&[0x01, 0xFF], &seq(0x01, 0xFE), &[0x00]]),
            ),
            (
                seq(0x01, 0xFF),
                cat(&[&[0xFF], &seq(0x01, 0xFE), &[0x02, 0xFF, 0x00]]),
            ),
            (
                cat(&[&seq(0x02, 0xFF), &[0x00]]),
                cat(&[&[0xFF], &seq(0x02, 0xFF), &[0x01, 0x01, 0x00]]),
            ),
            (
                cat(&[&seq(0x03, 0xFF), &[0x00, 0x01]]),
                cat(&[&[0xFE], &seq(0x03, 0xFF), &[0x02, 0x01, 0x00]]),
            ),
        ]
    }

    #[test]
    fn encodes_and_decodes_the_reference_vectors() {
        for (payload, wire) in vectors() {
            assert_eq!(encode(&payload), wire, "encode {payload:02x?}");
            let out = decode_both_ways(Framing::Cobs, 300, &wire, &[1]);
            assert_eq!(out, vec![Decoded::Frame(payload.into())]);
        }
    }

    #[test]
    fn accepts_a_redundant_trailing_block_after_a_full_one() {
        // Some encoders close a full block with 01; it means the same payload.
        let mut wire = encode(&[7; 254]);
        wire.insert(wire.len() - 1, 0x01);
        let out = decode_both_ways(Framing::Cobs, 300, &wire, &[1]);
        assert_eq!(frames(&out), vec![vec![7; 254]]);
    }

    #[test]
    fn delimiter_inside_a_block_is_truncated_and_next_frame_decodes() {
        let out = decode_both_ways(
            Framing::Cobs,
            16,
            &[0x00, 0x05, 0x11, 0x22, 0x00, 0x02, 0x33, 0x00],
            &[1],
        );
        assert_eq!(errors(&out), vec![ErrorKind::Truncated]);
        assert_eq!(frames(&out), vec![vec![0x33]]);
    }

    #[test]
    fn oversized_frame_is_dropped_to_its_delimiter() {
        let mut wire = encode(&[1, 2, 3, 0, 4]);
        wire.extend(encode(&[9]));
        let out = decode_both_ways(Framing::Cobs, 4, &wire, &[1]);
        assert_eq!(errors(&out), vec![ErrorKind::Oversized]);
        assert_eq!(frames(&out), vec![vec![9]]);
        // A payload of exactly the max frame size is fine.
        let out = decode_both_ways(Framing::Cobs, 4, &encode(&[1, 0, 0, 2]), &[1]);
        assert_eq!(frames(&out), vec![vec![1, 0, 0, 2]]);
    }

    #[test]
    fn partial_frame_at_finish_is_truncated() {
        let mut dec = Decoder::new(Framing::Cobs, 8).unwrap();
        assert!(dec.feed(&[0x03, 0x11]).is_empty());
        assert_eq!(errors(&dec.finish()), vec![ErrorKind::Truncated]);
    }

    proptest! {
        #[test]
        fn arbitrary_input_is_safe(data in prop::collection::vec(any::<u8>(), 0..600), max in 1usize..300, cuts in cuts()) {
            decode_both_ways(Framing::Cobs, max, &data, &cuts);
        }

        #[test]
        fn round_trips(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..6), cuts in cuts()) {
            let out = decode_both_ways(Framing::Cobs, 600, &encode_all(Framing::Cobs, &payloads), &cuts);
            prop_assert_eq!(frames(&out), payloads);
            prop_assert!(errors(&out).is_empty());
        }

        // Noise is any bytes followed by 0x00: COBS has no checksum, so without the delimiter
        // the noise would merge with the next frame; the 0x00 (which a sender can prefix to each
        // frame for this reason) ends it.
        #[test]
        fn frames_after_noise_are_recovered(
            parts in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..80), prop::collection::vec(any::<u8>(), 0..80)), 1..6),
            cuts in cuts(),
        ) {
            let mut data = Vec::new();
            for (noise, p) in &parts {
                data.extend(noise);
                data.push(0);
                data.extend(encode(p));
            }
            let out = decode_both_ways(Framing::Cobs, 100, &data, &cuts);
            let want: Vec<_> = parts.iter().map(|(_, p)| p.clone()).collect();
            prop_assert!(is_subsequence(&want, &frames(&out)));
        }

        #[test]
        fn truncated_and_oversized_frames_are_counted(
            parts in prop::collection::vec((prop::collection::vec(1u8..=255, 2..60), 0u8..3), 1..8),
            cuts in cuts(),
        ) {
            // Payloads of non-zero bytes under 254 bytes are one block: cutting the encoding
            // anywhere after the code byte leaves that block short.
            let max = 40;
            let mut data = Vec::new();
            let (mut want, mut want_errors) = (Vec::new(), Vec::new());
            for (p, fault) in &parts {
                let wire = encode(p);
                match fault {
                    0 if p.len() <= max => {
                        data.extend(&wire);
                        want.push(p.clone());
                    }
                    0 => {
                        data.extend(&wire);
                        want_errors.push(ErrorKind::Oversized);
                    }
                    1 => {
                        data.extend(&wire[..p.len().min(max)]);
                        data.push(0);
                        want_errors.push(ErrorKind::Truncated);
                    }
                    _ => {
                        data.extend(encode(&vec![7; max + 1]));
                        want_errors.push(ErrorKind::Oversized);
                    }
                }
            }
            let out = decode_both_ways(Framing::Cobs, max, &data, &cuts);
            prop_assert_eq!(frames(&out), want);
            let mut got = errors(&out);
            got.sort_by_key(|k| k.as_str());
            want_errors.sort_by_key(|k| k.as_str());
            prop_assert_eq!(got, want_errors);
        }
    }
}
