//! The framings, the per-port [`Decoder`] that dispatches to them, and [`encode`].

pub mod cbor;
pub mod cobs;
pub mod crc;
pub mod length;
pub mod lines;
pub mod slip;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::codec::{BadFrame, CodecError, Counts, Decoded, ErrorKind, SAMPLE_LEN};

/// How frames are delimited on a serial port. Names as in the `framing` configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// `lines`: newline-terminated text (see `framing::lines`).
    Lines,
    /// `cobs`: consistent-overhead byte stuffing, 0x00-terminated (see `framing::cobs`).
    Cobs,
    /// `slip`: RFC 1055 (see `framing::slip`).
    Slip,
    /// `length`: sync pair, u16 length, payload, optional CRC-16 (see `framing::length`).
    /// The name `length` parses with `crc: true`: without a CRC a corrupted frame cannot be told
    /// from a good one, so turning it off must be a deliberate choice.
    Length { crc: bool },
    /// `cbor`: a stream of self-delimiting CBOR data items (see `framing::cbor`).
    Cbor,
}

impl Framing {
    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Lines => "lines",
            Framing::Cobs => "cobs",
            Framing::Slip => "slip",
            Framing::Length { .. } => "length",
            Framing::Cbor => "cbor",
        }
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Framing {
    type Err = CodecError;

    fn from_str(name: &str) -> Result<Self, CodecError> {
        match name {
            "lines" => Ok(Framing::Lines),
            "cobs" => Ok(Framing::Cobs),
            "slip" => Ok(Framing::Slip),
            "length" => Ok(Framing::Length { crc: true }),
            "cbor" => Ok(Framing::Cbor),
            _ => Err(CodecError::UnknownFraming {
                name: name.to_owned(),
            }),
        }
    }
}

/// Frames `payload` for the wire.
///
/// Fails for payloads the framing cannot carry, so that whatever is written can be decoded back
/// to exactly `payload` by a [`Decoder`] with a large enough max frame size.
pub fn encode(framing: Framing, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    match framing {
        Framing::Lines => lines::encode(payload),
        Framing::Cobs => Ok(cobs::encode(payload)),
        Framing::Slip => slip::encode(payload),
        Framing::Length { crc } => length::encode(payload, crc),
        Framing::Cbor => cbor::encode(payload),
    }
}

/// Streaming decoder for one serial port.
///
/// Feed it the bytes of each read as they come, split anywhere; it returns the frames and bad
/// frames completed by those bytes, in stream order. The result does not depend on how the
/// stream was split. Memory is allocated once, in [`Decoder::new`].
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    max_frame: usize,
    state: State,
    counts: Counts,
}

#[derive(Debug)]
enum State {
    Lines(lines::LineDecoder),
    Cobs(cobs::CobsDecoder),
    Slip(slip::SlipDecoder),
    Length(length::LengthDecoder),
    Cbor(cbor::CborDecoder),
}

impl Decoder {
    /// Largest accepted max frame size. Serial devices send small frames; a limit keeps a typo in
    /// the configuration from reserving gigabytes per port.
    pub const MAX_FRAME_LIMIT: usize = 1 << 20;

    /// A decoder whose frames' payloads are at most `max_frame` bytes; longer frames are
    /// reported as [`ErrorKind::Oversized`]. For `length` framing the limit is also capped by
    /// the u16 length field.
    pub fn new(framing: Framing, max_frame: usize) -> Result<Self, CodecError> {
        if !(1..=Self::MAX_FRAME_LIMIT).contains(&max_frame) {
            return Err(CodecError::InvalidMaxFrame {
                max: max_frame,
                limit: Self::MAX_FRAME_LIMIT,
            });
        }
        let state = match framing {
            Framing::Lines => State::Lines(lines::LineDecoder::new(max_frame)),
            Framing::Cobs => State::Cobs(cobs::CobsDecoder::new(max_frame)),
            Framing::Slip => State::Slip(slip::SlipDecoder::new(max_frame)),
            Framing::Length { crc } => State::Length(length::LengthDecoder::new(max_frame, crc)),
            Framing::Cbor => State::Cbor(cbor::CborDecoder::new(max_frame)),
        };
        Ok(Decoder {
            framing,
            max_frame,
            state,
            counts: Counts::default(),
        })
    }

    /// The framing this decoder was created with.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The max frame size this decoder was created with.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Consumes `chunk` and returns what it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        let mut sink = Sink {
            out: &mut out,
            counts: &mut self.counts,
        };
        match &mut self.state {
            State::Lines(d) => d.feed(chunk, &mut sink),
            State::Cobs(d) => d.feed(chunk, &mut sink),
            State::Slip(d) => d.feed(chunk, &mut sink),
            State::Length(d) => d.feed(chunk, &mut sink),
            State::Cbor(d) => d.feed(chunk, &mut sink),
        }
        out
    }

    /// Ends the stream: reports a partial frame as [`ErrorKind::Truncated`], returns any frames
    /// still recoverable from the buffered bytes, and resets, so the decoder can be fed a fresh
    /// stream. Call it when the port closes, and after the line has been idle mid-frame for a
    /// while (an inter-frame timeout): a length-prefixed frame swallowed by a corrupted length
    /// otherwise waits until enough later bytes arrive.
    pub fn finish(&mut self) -> Vec<Decoded> {
        let mut out = Vec::new();
        let mut sink = Sink {
            out: &mut out,
            counts: &mut self.counts,
        };
        match &mut self.state {
            State::Lines(d) => d.finish(&mut sink),
            State::Cobs(d) => d.finish(&mut sink),
            State::Slip(d) => d.finish(&mut sink),
            State::Length(d) => d.finish(&mut sink),
            State::Cbor(d) => d.finish(&mut sink),
        }
        out
    }

    /// Frames and errors decoded so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Bytes currently held: never more than `max_frame + BUFFER_SLACK`.
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Lines(d) => d.buffered(),
            State::Cobs(d) => d.buffered(),
            State::Slip(d) => d.buffered(),
            State::Length(d) => d.buffered(),
            State::Cbor(d) => d.buffered(),
        }
    }
}

/// Where the framing decoders put their results; keeps the counts in step with the output.
struct Sink<'a> {
    out: &'a mut Vec<Decoded>,
    counts: &'a mut Counts,
}

impl Sink<'_> {
    fn frame(&mut self, payload: &[u8]) {
        self.counts.frames += 1;
        self.out
            .push(Decoded::Frame(Bytes::copy_from_slice(payload)));
    }

    /// Reports a bad frame covering `len` bytes of the stream, beginning with `bytes`.
    fn bad(&mut self, kind: ErrorKind, len: usize, bytes: &[u8]) {
        self.counts.errors[kind.index()] += 1;
        let sample = &bytes[..bytes.len().min(SAMPLE_LEN)];
        self.out.push(Decoded::Bad(BadFrame {
            kind,
            len,
            bytes: Bytes::copy_from_slice(sample),
        }));
    }
}

/// A run of skipped bytes not yet reported: reported as one error when the run ends, so that a
/// burst of noise costs one error (and one quarantine slot), not one per byte.
#[derive(Debug, Default)]
struct SkipRun {
    len: usize,
    sample: Vec<u8>,
}

impl SkipRun {
    fn push(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        let room = SAMPLE_LEN - self.sample.len();
        self.sample
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn flush(&mut self, kind: ErrorKind, sink: &mut Sink<'_>) {
        if self.len > 0 {
            sink.bad(kind, self.len, &self.sample);
            self.len = 0;
            self.sample.clear();
        }
    }

    fn buffered(&self) -> usize {
        self.sample.len()
    }
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_framing_name_and_round_trips_display() {
        for name in ["lines", "cobs", "slip", "length", "cbor"] {
            let framing: Framing = name.parse().unwrap();
            assert_eq!(framing.to_string(), name);
        }
        assert_eq!("length".parse(), Ok(Framing::Length { crc: true }));
    }

    #[test]
    fn unknown_framing_error_lists_valid_names() {
        let err = "Lines".parse::<Framing>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown framing \"Lines\": expected one of lines, cobs, slip, length, cbor"
        );
    }

    #[test]
    fn max_frame_must_be_in_range() {
        for max in [0, Decoder::MAX_FRAME_LIMIT + 1] {
            assert!(matches!(
                Decoder::new(Framing::Lines, max),
                Err(CodecError::InvalidMaxFrame { .. })
            ));
        }
        assert!(Decoder::new(Framing::Cbor, Decoder::MAX_FRAME_LIMIT).is_ok());
    }
}
