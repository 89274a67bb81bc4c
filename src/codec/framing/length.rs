//! `length`: length-prefixed binary frames for devices that send raw structs.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! +------+------+-----------+-----------------+------------------+
//! | 0xA5 | 0x5A | len (u16) | payload (len B) | crc16 (u16)      |
//! +------+------+-----------+-----------------+------------------+
//!   sync pair                                   only if crc = true
//! ```
//!
//! The CRC is CRC-16/CCITT-FALSE (see `crc.rs`) over the two length bytes and the payload, so a
//! corrupted length is caught too. Payloads are 0..=65535 bytes (the decoder's limit is the
//! smaller of that and its max frame size).
//!
//! A length prefix alone cannot be resynchronised: after one lost byte every later length is
//! read from the wrong place. The sync pair marks where a frame may start. The decoder drops
//! bytes until it sees the pair (a run of them is one [`ErrorKind::Malformed`]), reads the
//! header, and rejects the candidate if its length exceeds the limit (Oversized) or its CRC
//! fails (BadCrc). A rejected header's length is not trusted: the decoder hunts again from the
//! byte after the rejected sync, so a frame swallowed by a corrupted length is still found, once
//! enough bytes arrived to complete the bogus candidate or [`Decoder::finish`] is called (the
//! caller's inter-frame timeout).
//! Bytes inside a rejected frame's claimed extent are not reported again, so one corrupted
//! frame counts as one error. Work per input byte is bounded by the max frame size (each byte
//! starts at most one candidate, checked once).
//!
//! Without a CRC a corrupted or truncated frame is indistinguishable from a good one and may
//! swallow the frame after it: use `crc: false` only on links that do not lose bytes.

use crate::codec::framing::crc::crc16;
use crate::codec::framing::{Sink, SkipRun};
#[cfg(doc)]
use crate::codec::Decoder;
use crate::codec::{CodecError, ErrorKind, Framing};

const SYNC: [u8; 2] = [0xA5, 0x5A];
const HEADER: usize = 4;
const CRC_LEN: usize = 2;

#[derive(Debug)]
pub(super) struct LengthDecoder {
    /// Bytes from a possible sync pair on: at most one frame (`limit()` bytes).
    buf: Vec<u8>,
    /// Max payload length: the configured max frame size, capped by the u16 length field.
    max: usize,
    crc: bool,
    /// Bytes dropped while hunting for a sync pair, not yet reported.
    skipped: SkipRun,
    /// How many bytes from the front of `buf` on (possibly beyond its end) belong to an already
    /// reported bad frame.
    covered: usize,
}

impl LengthDecoder {
    pub(super) fn new(max: usize, crc: bool) -> Self {
        let max = max.min(usize::from(u16::MAX));
        let mut dec = LengthDecoder {
            buf: Vec::new(),
            max,
            crc,
            skipped: SkipRun::default(),
            covered: 0,
        };
        dec.buf.reserve_exact(dec.limit());
        dec
    }

    fn limit(&self) -> usize {
        self.frame_len(self.max)
    }

    fn frame_len(&self, payload: usize) -> usize {
        HEADER + payload + if self.crc { CRC_LEN } else { 0 }
    }

    pub(super) fn feed(&mut self, chunk: &[u8], sink: &mut Sink<'_>) {
        let mut rest = chunk;
        loop {
            let take = rest.len().min(self.limit() - self.buf.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            // Leaves less than a full frame buffered, so the next round always takes bytes.
            self.parse(sink);
            if rest.is_empty() {
                break;
            }
        }
    }

    fn parse(&mut self, sink: &mut Sink<'_>) {
        loop {
            let start = find_sync(&self.buf);
            if start > 0 {
                let fresh = self.covered.min(start);
                self.skipped.push(&self.buf[fresh..start]);
                self.consume(start);
            }
            if self.buf.len() < HEADER {
                return;
            }
            let len = usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]]));
            let total = self.frame_len(len);
            if len > self.max {
                self.reject(ErrorKind::Oversized, total, HEADER, sink);
                continue;
            }
            if self.buf.len() < total {
                return;
            }
            if self.crc {
                let (body, crc) = self.buf[2..total].split_at(2 + len);
                if crc16(body) != u16::from_be_bytes([crc[0], crc[1]]) {
                    self.reject(ErrorKind::BadCrc, total, total, sink);
                    continue;
                }
            }
            self.skipped.flush(ErrorKind::Malformed, sink);
            sink.frame(&self.buf[HEADER..HEADER + len]);
            self.consume(total);
        }
    }

    /// Rejects the candidate frame at the front of `buf`, claiming `total` bytes, reporting the
    /// first `sample` of them unless they are part of a frame already reported; then resumes
    /// the hunt one byte later.
    fn reject(&mut self, kind: ErrorKind, total: usize, sample: usize, sink: &mut Sink<'_>) {
        if self.covered == 0 {
            self.skipped.flush(ErrorKind::Malformed, sink);
            sink.bad(kind, total, &self.buf[..sample]);
        }
        self.covered = self.covered.max(total);
        self.consume(1);
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.covered = self.covered.saturating_sub(n);
    }

    pub(super) fn finish(&mut self, sink: &mut Sink<'_>) {
        // No more bytes will complete the pending candidate: it is truncated. Its claimed
        // length may have been a corrupted one, swallowing whole frames, so hunt through the
        // rest of it as after any rejected candidate.
        while !self.buf.is_empty() {
            if self.covered == 0 {
                self.skipped.flush(ErrorKind::Malformed, sink);
                sink.bad(ErrorKind::Truncated, self.buf.len(), &self.buf);
                self.covered = self.buf.len();
            }
            self.consume(1);
            self.parse(sink);
        }
        self.skipped.flush(ErrorKind::Malformed, sink);
        self.covered = 0;
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len() + self.skipped.buffered()
    }
}

/// Where the first possible frame starts: at a sync pair, or at a final lone first sync byte
/// whose partner may be in the next chunk.
fn find_sync(buf: &[u8]) -> usize {
    match buf.windows(2).position(|w| w == SYNC) {
        Some(i) => i,
        None if buf.last() == Some(&SYNC[0]) => buf.len() - 1,
        None => buf.len(),
    }
}

pub(super) fn encode(payload: &[u8], crc: bool) -> Result<Vec<u8>, CodecError> {
    let len = u16::try_from(payload.len()).map_err(|_| CodecError::TooLong {
        framing: Framing::Length { crc },
        len: payload.len(),
        max: usize::from(u16::MAX),
    })?;
    let mut out = Vec::with_capacity(HEADER + payload.len() + CRC_LEN);
    out.extend_from_slice(&SYNC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    if crc {
        let crc = crc16(&out[2..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::framing::testutil::*;
    use crate::codec::{Decoded, Decoder};

    const CRC: Framing = Framing::Length { crc: true };
    const NO_CRC: Framing = Framing::Length { crc: false };

    #[test]
    fn wire_format_is_sync_length_payload_crc() {
        let crc = crc16(&[0x00, 0x03, b'a', b'b', b'c']).to_be_bytes();
        assert_eq!(
            encode(b"abc", true).unwrap(),
            [0xA5, 0x5A, 0x00, 0x03, b'a', b'b', b'c', crc[0], crc[1]]
        );
        assert_eq!(encode(b"", false).unwrap(), [0xA5, 0x5A, 0x00, 0x00]);
        assert_eq!(
            encode(&vec![0; 65536], true),
            Err(CodecError::TooLong {
                framing: CRC,
                len: 65536,
                max: 65535
            })
        );
        assert_eq!(encode(&vec![0; 65535], false).unwrap().len(), 65539);
    }

    #[test]
    fn without_crc_frames_end_after_the_payload_and_may_be_empty() {
        let wire = [0xA5, 0x5A, 0, 0, 0xA5, 0x5A, 0, 1, 7];
        let out = decode_both_ways(NO_CRC, 8, &wire, &[1]);
        assert_eq!(frames(&out), vec![vec![], vec![7]]);
    }

    #[test]
    fn garbage_before_a_frame_is_one_malformed_error() {
        let mut wire = b"\xA5xyz\x5A".to_vec();
        wire.extend(encode(b"hi", true).unwrap());
        let out = decode_both_ways(CRC, 16, &wire, &[1]);
        assert_eq!(out.len(), 2);
        assert!(
            matches!(&out[0], Decoded::Bad(b) if b.kind == ErrorKind::Malformed && b.len == 5 && b.bytes[..] == wire[..5])
        );
        assert_eq!(out[1], Decoded::Frame("hi".into()));
    }

    #[test]
    fn bad_crc_is_counted_once_and_the_next_frame_decodes() {
        let mut wire = encode(b"hello", true).unwrap();
        *wire.last_mut().unwrap() ^= 1;
        wire.extend(encode(b"next", true).unwrap());
        let out = decode_both_ways(CRC, 16, &wire, &[1]);
        assert_eq!(errors(&out), vec![ErrorKind::BadCrc]);
        assert_eq!(frames(&out), vec![b"next".to_vec()]);
    }

    #[test]
    fn frame_swallowed_by_a_corrupted_length_is_recovered() {
        // A truncated frame (its device rebooted mid-send) claims 9 bytes; the next frame's
        // bytes complete it, the CRC fails, and the hunt resumes inside it.
        let mut wire = encode(b"123456789", true).unwrap()[..6].to_vec();
        wire.extend(encode(b"ok", true).unwrap());
        wire.extend(encode(b"more", true).unwrap());
        let out = decode_both_ways(CRC, 16, &wire, &[1]);
        assert_eq!(errors(&out), vec![ErrorKind::BadCrc]);
        assert_eq!(frames(&out), vec![b"ok".to_vec(), b"more".to_vec()]);
    }

    #[test]
    fn oversized_length_is_rejected_without_waiting_for_the_payload() {
        let mut dec = Decoder::new(CRC, 8).unwrap();
        let out = dec.feed(&[0xA5, 0x5A, 0x00, 0x09]);
        assert_eq!(
            out,
            vec![Decoded::Bad(crate::codec::BadFrame {
                kind: ErrorKind::Oversized,
                len: 15,
                bytes: vec![0xA5, 0x5A, 0x00, 0x09].into(),
            })]
        );
        // Its payload (no sync pair in it) is not reported again; the next frame decodes.
        let out = dec.feed(&[b'x'; 11]);
        assert!(out.is_empty());
        let out = dec.feed(&encode(b"12345678", true).unwrap());
        assert_eq!(out, vec![Decoded::Frame("12345678".into())]);
        assert_eq!(dec.counts().total_errors(), 1);
    }

    #[test]
    fn partial_frame_at_finish_is_truncated() {
        let mut dec = Decoder::new(CRC, 8).unwrap();
        assert!(dec.feed(&encode(b"abc", true).unwrap()[..5]).is_empty());
        assert_eq!(errors(&dec.finish()), vec![ErrorKind::Truncated]);
    }

    #[test]
    fn finish_recovers_frames_inside_a_truncated_candidate() {
        // The cut frame claims 60 bytes; the next frame waits inside it until finish.
        let mut dec = Decoder::new(CRC, 64).unwrap();
        let mut wire = encode(&[1; 60], true).unwrap()[..10].to_vec();
        wire.extend(encode(b"late", true).unwrap());
        assert!(dec.feed(&wire).is_empty());
        let out = dec.finish();
        assert_eq!(errors(&out), vec![ErrorKind::Truncated]);
        assert_eq!(frames(&out), vec![b"late".to_vec()]);
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..80)
    }

    /// Bytes that never contain the sync pair, even when concatenated with each other or with a
    /// frame (which starts with the pair's first byte, never its second).
    fn no_sync(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..max_len)
            .prop_map(|v| v.into_iter().filter(|&b| b != SYNC[0]).collect())
    }

    proptest! {
        #[test]
        fn arbitrary_input_is_safe(data in prop::collection::vec(any::<u8>(), 0..400), max in 1usize..50, crc: bool, cuts in cuts()) {
            decode_both_ways(Framing::Length { crc }, max, &data, &cuts);
        }

        // Arbitrary bytes rarely contain a sync pair; these streams are made of many, with
        // arbitrary lengths behind them, to exercise the reject-and-rehunt paths.
        #[test]
        fn sync_dense_input_is_safe(parts in prop::collection::vec((any::<bool>(), 0u8..20, no_sync(6)), 0..60), max in 1usize..30, crc: bool, cuts in cuts()) {
            let mut data = Vec::new();
            for (sync, len, junk) in parts {
                if sync {
                    data.extend([SYNC[0], SYNC[1], 0, len]);
                }
                data.extend(junk);
            }
            decode_both_ways(Framing::Length { crc }, max, &data, &cuts);
        }

        #[test]
        fn round_trips(payloads in prop::collection::vec(payload(), 0..8), crc: bool, cuts in cuts()) {
            let framing = Framing::Length { crc };
            let out = decode_both_ways(framing, 80, &encode_all(framing, &payloads), &cuts);
            prop_assert_eq!(frames(&out), payloads);
            prop_assert!(errors(&out).is_empty());
        }

        // Noise is bytes without the sync pair: it is the only thing marking a frame start, so
        // a pair in the noise would start a candidate that can swallow the real frame (with a
        // CRC it is rejected and the hunt recovers, see `fake_candidates_...`). Each run of
        // noise is exactly one Malformed error.
        #[test]
        fn frames_after_noise_are_recovered(parts in prop::collection::vec((no_sync(40), payload()), 1..6), crc: bool, cuts in cuts()) {
            let framing = Framing::Length { crc };
            let mut data = Vec::new();
            let mut want_errors = Vec::new();
            for (noise, p) in &parts {
                data.extend(noise);
                data.extend(encode(p, crc).unwrap());
                if !noise.is_empty() {
                    want_errors.push(ErrorKind::Malformed);
                }
            }
            let out = decode_both_ways(framing, 80, &data, &cuts);
            let want: Vec<_> = parts.iter().map(|(_, p)| p.clone()).collect();
            prop_assert_eq!(frames(&out), want);
            prop_assert_eq!(errors(&out), want_errors);
        }

        // A fake header (a sync pair with an arbitrary length, e.g. a frame cut short) before a
        // real frame: with a CRC the real frame is always recovered (by finish, if the stream
        // ends inside the fake candidate), unless the fake candidate happens to pass its CRC
        // (a 1 in 65536 chance the test excludes).
        #[test]
        fn fake_candidates_do_not_swallow_frames(fake_len: u16, junk in no_sync(10), p in payload(), cuts in cuts()) {
            let mut data = vec![SYNC[0], SYNC[1]];
            data.extend(fake_len.to_be_bytes());
            data.extend(&junk);
            data.extend(encode(&p, true).unwrap());
            let fake_total = HEADER + usize::from(fake_len) + CRC_LEN;
            if usize::from(fake_len) <= 80 && fake_total <= data.len() {
                let crc = u16::from_be_bytes([data[fake_total - 2], data[fake_total - 1]]);
                prop_assume!(crc16(&data[2..fake_total - 2]) != crc);
            }
            let out = decode_both_ways(CRC, 80, &data, &cuts);
            prop_assert_eq!(frames(&out), vec![p]);
            prop_assert!(!errors(&out).is_empty());
        }

        // Corrupting a payload or CRC byte gives exactly one BadCrc per corrupted frame. Payloads
        // have no sync byte (nor, by assumption, the corrupted frame's CRC), so the re-hunt
        // inside a rejected frame cannot start a fake frame.
        #[test]
        fn each_corrupted_frame_is_one_bad_crc(parts in prop::collection::vec((no_sync(40), prop::option::of((any::<prop::sample::Index>(), 1u8..=255))), 1..10), cuts in cuts()) {
            let mut data = Vec::new();
            let (mut want, mut bad) = (Vec::new(), 0);
            for (p, fault) in &parts {
                let mut wire = encode(p, true).unwrap();
                match fault {
                    Some((at, flip)) => {
                        let at = HEADER + at.index(wire.len() - HEADER);
                        wire[at] ^= flip;
                        // The re-hunt inside a rejected frame restarts at any sync byte: one
                        // made by the flip or present in the CRC could begin a second candidate
                        // that swallows the next frame, which is correct but not "one error".
                        prop_assume!(!wire[1..].contains(&SYNC[0]));
                        bad += 1;
                    }
                    None => want.push(p.clone()),
                }
                data.extend(wire);
            }
            let out = decode_both_ways(CRC, 40, &data, &cuts);
            prop_assert_eq!(frames(&out), want);
            prop_assert_eq!(errors(&out), vec![ErrorKind::BadCrc; bad]);
        }

        #[test]
        fn each_oversized_frame_is_one_error(parts in prop::collection::vec(no_sync(60), 1..10), crc: bool, cuts in cuts()) {
            let framing = Framing::Length { crc };
            let max = 30;
            let mut data = Vec::new();
            let mut want = Vec::new();
            let mut want_errors = Vec::new();
            for p in &parts {
                data.extend(encode(p, crc).unwrap());
                if p.len() > max {
                    want_errors.push(ErrorKind::Oversized);
                } else {
                    want.push(p.clone());
                }
            }
            let out = decode_both_ways(framing, max, &data, &cuts);
            prop_assert_eq!(frames(&out), want);
            prop_assert_eq!(errors(&out), want_errors);
        }
    }
}
