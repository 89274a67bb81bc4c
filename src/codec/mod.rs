//! Serial framing codecs: pure, synchronous and free of I/O, so they can be unit-tested,
//! property-tested and fuzzed without a serial port.
//!
//! A serial port delivers an unstructured byte stream, cut wherever the driver's reads happen to
//! end. One [`Decoder`] per port turns it back into frames with the port's [`Framing`];
//! [`encode`] does the reverse for downlink writes and acks. The wire format of each framing is
//! documented in its module under [`framing`].
//!
//! # Robustness contract
//!
//! Serial lines are noisy (devices reboot mid-frame, cables pick up noise, baud rates get
//! misconfigured), and a gateway must keep ingesting whatever it can. Every decoder therefore:
//!
//! - never panics, whatever the input and however it is split;
//! - holds at most `max_frame + BUFFER_SLACK` bytes ([`Decoder::buffered`]), allocated once;
//! - after garbage, a truncated, oversized or corrupted frame, resynchronises at the next frame
//!   boundary the framing can recognise, and decodes the frames after it;
//! - reports every bad frame as a [`BadFrame`] (with a sample of its bytes for the
//!   [`Quarantine`]) and counts it by [`ErrorKind`] in [`Counts`]; bytes already reported as part
//!   of one bad frame are not reported again.
//!
//! How strong "the next frame boundary" is depends on the framing: delimiter framings (lines,
//! COBS, SLIP) resynchronise at the next delimiter; length-prefixed frames at the next sync pair
//! whose frame checks out; CBOR has no delimiter at all and resynchronises by skipping bytes
//! that cannot start a data item (see `framing::cbor`).

pub mod framing;
mod quarantine;

pub use framing::{encode, Decoder, Framing};
pub use quarantine::Quarantine;

use bytes::Bytes;

/// How many bytes of a bad frame a [`BadFrame`] keeps: enough to recognise a device's output
/// in a log or quarantine, small enough that a flood of errors costs little memory.
pub const SAMPLE_LEN: usize = 64;

/// Bytes a [`Decoder`] may hold beyond its max frame size: a length-prefixed frame's header and
/// CRC (6), a line's trailing `\r` (1) and the sample of a pending garbage run.
pub const BUFFER_SLACK: usize = 8 + SAMPLE_LEN;

/// Errors from configuring a decoder or encoding a payload. Bad frames on the wire are not
/// errors of this kind: they are data, reported as [`BadFrame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A framing name in the configuration is not one we know.
    #[error("unknown framing {name:?}: expected one of lines, cobs, slip, length, cbor")]
    UnknownFraming { name: String },
    /// The max frame size is zero or larger than [`Decoder::MAX_FRAME_LIMIT`].
    #[error("max frame size {max} is out of range: expected 1..={limit} bytes")]
    InvalidMaxFrame { max: usize, limit: usize },
    /// The framing cannot express an empty payload (the decoder would skip it).
    #[error("{framing} framing cannot carry an empty payload")]
    EmptyPayload { framing: Framing },
    /// A line payload contains `\n`, or ends in `\r` (which the decoder strips).
    #[error("line payload has a line break at byte {offset}")]
    LineBreak { offset: usize },
    /// The payload is longer than the framing's length field can express.
    #[error("{framing} framing carries at most {max} bytes, payload has {len}")]
    TooLong {
        framing: Framing,
        len: usize,
        max: usize,
    },
    /// A CBOR-framed payload must be exactly one well-formed CBOR data item.
    #[error("payload is not exactly one CBOR data item: {reason}")]
    NotCbor { reason: &'static str },
}

/// Why bytes from the wire were rejected. Each kind is counted separately because each points
/// at a different fault: a misconfigured size limit, line noise, a buggy device, a cut cable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The frame is longer than the decoder's max frame size; it is dropped up to its end.
    Oversized,
    /// A length-prefixed frame whose CRC-16 does not match its contents.
    BadCrc,
    /// A SLIP escape byte followed by anything but ESC_END or ESC_ESC.
    BadEscape,
    /// A frame cut short: a COBS delimiter inside a block, or a partial frame at
    /// [`Decoder::finish`].
    Truncated,
    /// Bytes that cannot start a frame: bytes before a length-prefixed sync pair, or bytes that
    /// do not begin a well-formed CBOR data item. A run of them is one error.
    Malformed,
}

impl ErrorKind {
    /// Every kind, in the order [`Counts`] stores them.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Oversized,
        ErrorKind::BadCrc,
        ErrorKind::BadEscape,
        ErrorKind::Truncated,
        ErrorKind::Malformed,
    ];

    /// Stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Oversized => "oversized",
            ErrorKind::BadCrc => "bad_crc",
            ErrorKind::BadEscape => "bad_escape",
            ErrorKind::Truncated => "truncated",
            ErrorKind::Malformed => "malformed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected frame, as reported by a [`Decoder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame {
    /// Why it was rejected.
    pub kind: ErrorKind,
    /// How many bytes of the stream this error covers, as far as known when it was reported.
    /// An oversized frame is reported as soon as it crosses the limit (so a device that never
    /// sends a delimiter is still noticed); its remaining bytes are then dropped silently.
    pub len: usize,
    /// The first (at most [`SAMPLE_LEN`]) bytes of the frame. For COBS and SLIP these are the
    /// unstuffed payload bytes decoded so far; for the other framings the raw wire bytes.
    pub bytes: Bytes,
}

/// What a [`Decoder`] produces, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A complete, valid frame's payload (at most the max frame size).
    Frame(Bytes),
    /// A rejected frame; already counted in [`Decoder::counts`].
    Bad(BadFrame),
}

/// Running totals of a decoder, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    frames: u64,
    errors: [u64; ErrorKind::ALL.len()],
}

impl Counts {
    /// Valid frames decoded.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Bad frames of one kind.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }

    /// Bad frames of all kinds.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}
