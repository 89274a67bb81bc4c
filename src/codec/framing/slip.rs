//! `slip`: Serial Line IP framing, RFC 1055.
//!
//! Wire format: `END payload END`, with END (0xC0) in the payload sent as ESC ESC_END
//! (0xDB 0xDC) and ESC (0xDB) as ESC ESC_ESC (0xDB 0xDD). The encoder sends the leading END
//! the RFC recommends: it ends whatever noise preceded the frame on the line, so the frame
//! decodes even after garbage. Empty frames (END END) are skipped, as the RFC intends.
//!
//! An ESC followed by anything but ESC_END or ESC_ESC is a bad escape: the frame is dropped up
//! to the next END (or ends at once, if that byte is END). Decoding is streaming; the buffer
//! holds the unescaped payload, at most the max frame size.

use crate::codec::framing::Sink;
use crate::codec::{CodecError, ErrorKind, Framing};

const END: u8 = 0xC0;
const ESC: u8 = 0xDB;
const ESC_END: u8 = 0xDC;
const ESC_ESC: u8 = 0xDD;

#[derive(Debug)]
pub(super) struct SlipDecoder {
    /// Unescaped payload so far, at most `max` bytes.
    buf: Vec<u8>,
    max: usize,
    /// The previous byte was ESC.
    escaped: bool,
    /// Dropping a bad frame up to the next END.
    discarding: bool,
}

impl SlipDecoder {
    pub(super) fn new(max: usize) -> Self {
        SlipDecoder {
            buf: Vec::with_capacity(max),
            max,
            escaped: false,
            discarding: false,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8], sink: &mut Sink<'_>) {
        for &b in chunk {
            self.step(b, sink);
        }
    }

    fn step(&mut self, b: u8, sink: &mut Sink<'_>) {
        if b == END {
            if self.escaped {
                sink.bad(ErrorKind::BadEscape, self.buf.len() + 1, &self.buf);
            } else if !self.discarding && !self.buf.is_empty() {
                sink.frame(&self.buf);
            }
            self.reset();
        } else if self.discarding {
        } else if self.escaped {
            self.escaped = false;
            match b {
                ESC_END => self.push(END, sink),
                ESC_ESC => self.push(ESC, sink),
                _ => {
                    sink.bad(ErrorKind::BadEscape, self.buf.len() + 2, &self.buf);
                    self.buf.clear();
                    self.discarding = true;
                }
            }
        } else if b == ESC {
            self.escaped = true;
        } else {
            self.push(b, sink);
        }
    }

    fn push(&mut self, b: u8, sink: &mut Sink<'_>) {
        if self.buf.len() == self.max {
            sink.bad(ErrorKind::Oversized, self.max + 1, &self.buf);
            self.buf.clear();
            self.discarding = true;
        } else {
            self.buf.push(b);
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.escaped = false;
        self.discarding = false;
    }

    pub(super) fn finish(&mut self, sink: &mut Sink<'_>) {
        if !self.discarding && (self.escaped || !self.buf.is_empty()) {
            sink.bad(
                ErrorKind::Truncated,
                self.buf.len() + usize::from(self.escaped),
                &self.buf,
            );
        }
        self.reset();
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }
}

pub(super) fn encode(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    if payload.is_empty() {
        return Err(CodecError::EmptyPayload {
            framing: Framing::Slip,
        });
    }
    let mut out = Vec::with_capacity(payload.len() + 2);
    out.push(END);
    for &b in payload {
        match b {
            END => out.extend_from_slice(&[ESC, ESC_END]),
            ESC => out.extend_from_slice(&[ESC, ESC_ESC]),
            _ => out.push(b),
        }
    }
    out.push(END);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::framing::testutil::*;
    use crate::codec::{Decoded, Decoder};

    #[test]
    fn escapes_end_and_esc() {
        assert_eq!(
            encode(&[0x01, END, 0x02, ESC, 0x03]).unwrap(),
            vec![END, 0x01, ESC, ESC_END, 0x02, ESC, ESC_ESC, 0x03, END]
        );
        assert!(matches!(encode(&[]), Err(CodecError::EmptyPayload { .. })));
    }

    #[test]
    fn decodes_with_and_without_leading_end_and_skips_empty_frames() {
        let wire = [0x01, ESC, ESC_END, END, END, END, ESC, ESC_ESC, 0x02, END];
        let out = decode_both_ways(Framing::Slip, 8, &wire, &[1]);
        assert_eq!(
            out,
            vec![
                Decoded::Frame(vec![0x01, END].into()),
                Decoded::Frame(vec![ESC, 0x02].into())
            ]
        );
    }

    #[test]
    fn bad_escape_drops_the_frame_up_to_the_next_end() {
        let wire = [
            END, 0x01, ESC, 0x41, 0x02, END, 0x03, END, 0x04, ESC, END, 0x05, END,
        ];
        let out = decode_both_ways(Framing::Slip, 8, &wire, &[1]);
        assert_eq!(
            errors(&out),
            vec![ErrorKind::BadEscape, ErrorKind::BadEscape]
        );
        assert_eq!(frames(&out), vec![vec![0x03], vec![0x05]]);
    }

    #[test]
    fn oversized_frame_is_dropped_and_exact_max_is_accepted() {
        let mut wire = encode(&[END; 3]).unwrap();
        wire.extend(encode(&[END; 4]).unwrap());
        wire.extend(encode(&[7]).unwrap());
        let out = decode_both_ways(Framing::Slip, 3, &wire, &[1]);
        assert_eq!(errors(&out), vec![ErrorKind::Oversized]);
        assert_eq!(frames(&out), vec![vec![END; 3], vec![7]]);
    }

    #[test]
    fn partial_frame_at_finish_is_truncated() {
        let mut dec = Decoder::new(Framing::Slip, 8).unwrap();
        assert!(dec.feed(&[END, 0x01, ESC]).is_empty());
        assert_eq!(errors(&dec.finish()), vec![ErrorKind::Truncated]);
    }

    proptest! {
        #[test]
        fn arbitrary_input_is_safe(data in prop::collection::vec(any::<u8>(), 0..400), max in 1usize..50, cuts in cuts()) {
            decode_both_ways(Framing::Slip, max, &data, &cuts);
        }

        #[test]
        fn round_trips(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..60), 0..8), cuts in cuts()) {
            let out = decode_both_ways(Framing::Slip, 60, &encode_all(Framing::Slip, &payloads), &cuts);
            prop_assert_eq!(frames(&out), payloads);
            prop_assert!(errors(&out).is_empty());
        }

        // Noise is any bytes at all: the encoder's leading END ends it (as a spurious frame or
        // an error: SLIP has no checksum), and an ESC at the end of the noise turns that END
        // into a bad escape, which still resets the decoder at the END.
        #[test]
        fn frames_after_noise_are_recovered(
            parts in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..80), prop::collection::vec(any::<u8>(), 1..40)), 1..6),
            cuts in cuts(),
        ) {
            let mut data = Vec::new();
            for (noise, p) in &parts {
                data.extend(noise);
                data.extend(encode(p).unwrap());
            }
            let out = decode_both_ways(Framing::Slip, 40, &data, &cuts);
            let want: Vec<_> = parts.iter().map(|(_, p)| p.clone()).collect();
            prop_assert!(is_subsequence(&want, &frames(&out)));
        }

        #[test]
        fn bad_escapes_are_counted(
            parts in prop::collection::vec((prop::collection::vec(any::<u8>(), 1..40), prop::option::of((any::<prop::sample::Index>(), any::<u8>()))), 1..8),
            cuts in cuts(),
        ) {
            let mut data = Vec::new();
            let mut want = Vec::new();
            let mut bad = 0;
            for (p, fault) in &parts {
                let mut wire = encode(p).unwrap();
                match fault {
                    // Not ESC END: that ends the frame at once, and the rest of it would decode
                    // as a (spurious) frame of its own; `bad_escape_drops_...` covers it.
                    Some((at, next)) if ![ESC_END, ESC_ESC, END].contains(next) => {
                        // Inject ESC + an invalid byte between two escape sequences.
                        let at = 1 + at.index(wire.len() - 1);
                        let at = if wire[at - 1] == ESC { at + 1 } else { at };
                        wire.splice(at..at, [ESC, *next]);
                        bad += 1;
                    }
                    _ => want.push(p.clone()),
                }
                data.extend(wire);
            }
            let out = decode_both_ways(Framing::Slip, 40, &data, &cuts);
            prop_assert_eq!(frames(&out), want);
            prop_assert_eq!(errors(&out), vec![ErrorKind::BadEscape; bad]);
        }
    }
}
