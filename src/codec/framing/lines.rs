//! `lines`: newline-delimited frames, the usual output of text-mode sensors and debug consoles.
//!
//! Wire format: `payload \n`, where the payload contains no `\n`. One trailing `\r` is stripped,
//! so CRLF devices work unchanged. Empty lines are skipped, not errors: devices print them as
//! separators. A line longer than the max frame size is reported as soon as it crosses the
//! limit and dropped up to the next `\n`, where decoding resumes.

use crate::codec::framing::Sink;
use crate::codec::{CodecError, ErrorKind, Framing, SAMPLE_LEN};

#[derive(Debug)]
pub(super) struct LineDecoder {
    /// The current line, including a possible trailing `\r`, so at most `max + 1` bytes.
    buf: Vec<u8>,
    max: usize,
    /// Dropping the rest of an oversized line, up to the next `\n`.
    discarding: bool,
}

impl LineDecoder {
    pub(super) fn new(max: usize) -> Self {
        LineDecoder {
            buf: Vec::with_capacity(max + 1),
            max,
            discarding: false,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8], sink: &mut Sink<'_>) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.extend(&rest[..i], sink);
            self.end_line(sink);
            rest = &rest[i + 1..];
        }
        self.extend(rest, sink);
    }

    fn extend(&mut self, bytes: &[u8], sink: &mut Sink<'_>) {
        if self.discarding {
            return;
        }
        let room = self.max + 1 - self.buf.len();
        if bytes.len() <= room {
            self.buf.extend_from_slice(bytes);
        } else {
            // Report the bytes up to the one that crossed the limit, so the report does not
            // depend on how the stream was split.
            let sample: Vec<u8> = (self.buf.iter().chain(&bytes[..=room]))
                .take(SAMPLE_LEN)
                .copied()
                .collect();
            sink.bad(ErrorKind::Oversized, self.max + 2, &sample);
            self.buf.clear();
            self.discarding = true;
        }
    }

    fn end_line(&mut self, sink: &mut Sink<'_>) {
        if std::mem::take(&mut self.discarding) {
            return;
        }
        let raw_len = self.buf.len();
        let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
        if line.len() > self.max {
            sink.bad(ErrorKind::Oversized, raw_len, line);
        } else if !line.is_empty() {
            sink.frame(line);
        }
        self.buf.clear();
    }

    pub(super) fn finish(&mut self, sink: &mut Sink<'_>) {
        // A lone "\r" left over is an empty CRLF line cut before its "\n": nothing lost.
        if !self.discarding && !self.buf.is_empty() && self.buf != b"\r" {
            sink.bad(ErrorKind::Truncated, self.buf.len(), &self.buf);
        }
        self.buf.clear();
        self.discarding = false;
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }
}

pub(super) fn encode(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    if payload.is_empty() {
        return Err(CodecError::EmptyPayload {
            framing: Framing::Lines,
        });
    }
    if let Some(offset) = payload.iter().position(|&b| b == b'\n') {
        return Err(CodecError::LineBreak { offset });
    }
    if payload.ends_with(b"\r") {
        return Err(CodecError::LineBreak {
            offset: payload.len() - 1,
        });
    }
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.extend_from_slice(payload);
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::framing::testutil::*;
    use crate::codec::{Decoded, Decoder};

    fn decode(max: usize, data: &[u8]) -> Vec<Decoded> {
        decode_both_ways(Framing::Lines, max, data, &[1])
    }

    #[test]
    fn splits_lines_strips_one_cr_and_skips_empty_lines() {
        let out = decode(16, b"temp=21\r\n\n\r\nhum=40\nraw\r\r\n");
        assert_eq!(
            frames(&out),
            vec![b"temp=21".to_vec(), b"hum=40".to_vec(), b"raw\r".to_vec()]
        );
        assert!(errors(&out).is_empty());
    }

    #[test]
    fn max_length_line_with_crlf_is_accepted_one_more_byte_is_not() {
        let out = decode(4, b"abcd\r\nabcde\r\nok\n");
        assert_eq!(frames(&out), vec![b"abcd".to_vec(), b"ok".to_vec()]);
        assert_eq!(errors(&out), vec![ErrorKind::Oversized]);
    }

    #[test]
    fn oversized_line_is_reported_before_its_newline_arrives() {
        let mut dec = Decoder::new(Framing::Lines, 4).unwrap();
        let out = dec.feed(b"0123456789");
        assert_eq!(errors(&out), vec![ErrorKind::Oversized]);
        // The rest of that line is dropped silently; the next line decodes.
        let out = dec.feed(b"more\nnext\n");
        assert_eq!(out, vec![Decoded::Frame("next".into())]);
    }

    #[test]
    fn partial_line_at_finish_is_truncated() {
        let mut dec = Decoder::new(Framing::Lines, 8).unwrap();
        assert!(dec.feed(b"a\nhalf").len() == 1);
        let out = dec.finish();
        assert_eq!(errors(&out), vec![ErrorKind::Truncated]);
        assert!(dec.finish().is_empty());
    }

    #[test]
    fn encode_rejects_what_the_decoder_would_alter() {
        assert_eq!(encode(b"a\nb"), Err(CodecError::LineBreak { offset: 1 }));
        assert_eq!(encode(b"ab\r"), Err(CodecError::LineBreak { offset: 2 }));
        assert!(matches!(encode(b""), Err(CodecError::EmptyPayload { .. })));
        assert_eq!(encode(b"a\rb").unwrap(), b"a\rb\n");
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>().prop_filter("newline", |&b| b != b'\n'), 1..40)
            .prop_filter("trailing CR", |p| !p.ends_with(b"\r"))
    }

    proptest! {
        #[test]
        fn arbitrary_input_is_safe(data in prop::collection::vec(any::<u8>(), 0..400), max in 1usize..50, cuts in cuts()) {
            decode_both_ways(Framing::Lines, max, &data, &cuts);
        }

        #[test]
        fn round_trips(payloads in prop::collection::vec(payload(), 0..10), cuts in cuts()) {
            let out = decode_both_ways(Framing::Lines, 40, &encode_all(Framing::Lines, &payloads), &cuts);
            prop_assert_eq!(frames(&out), payloads);
            prop_assert!(errors(&out).is_empty());
        }

        // Noise is any bytes followed by "\n": lines have no integrity check, so noise may decode
        // as a spurious line (or an oversized one); what must hold is that the newline ends it
        // and every real line after it is recovered.
        #[test]
        fn frames_after_noise_are_recovered(
            parts in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..60), payload()), 1..6),
            cuts in cuts(),
        ) {
            let mut data = Vec::new();
            for (noise, p) in &parts {
                data.extend(noise);
                data.push(b'\n');
                data.extend(encode(p).unwrap());
            }
            let out = decode_both_ways(Framing::Lines, 40, &data, &cuts);
            let want: Vec<_> = parts.iter().map(|(_, p)| p.clone()).collect();
            prop_assert!(is_subsequence(&want, &frames(&out)));
        }

        #[test]
        fn each_oversized_line_is_counted_once(
            lines in prop::collection::vec((payload(), any::<bool>()), 1..10),
            cuts in cuts(),
        ) {
            let max = 40;
            let mut data = Vec::new();
            let mut want = Vec::new();
            let mut oversized = 0;
            for (p, too_long) in &lines {
                if *too_long {
                    data.extend(vec![b'x'; max + 1 + p.len()]);
                    data.extend(p);
                    data.push(b'\n');
                    oversized += 1;
                } else {
                    data.extend(encode(p).unwrap());
                    want.push(p.clone());
                }
            }
            let out = decode_both_ways(Framing::Lines, max, &data, &cuts);
            prop_assert_eq!(frames(&out), want);
            prop_assert_eq!(errors(&out), vec![ErrorKind::Oversized; oversized]);
        }
    }
}
