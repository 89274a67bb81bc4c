//! Helpers shared by the framings' tests: feeding a stream in arbitrary chunks while checking
//! the invariants every decoder promises.

use proptest::prelude::*;

use crate::codec::{Decoded, Decoder, ErrorKind, Framing, BUFFER_SLACK, SAMPLE_LEN};

/// Chunk sizes to split a stream by (cycled): serial reads return anywhere from 1 byte to a
/// driver buffer's worth.
pub fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..40, 1..8)
}

/// Feeds `data` split by `cuts` (cycled), then [`Decoder::finish`]; checks after every call
/// that the buffer bound holds and that every output respects its limits and is counted.
pub fn feed_chunked(dec: &mut Decoder, data: &[u8], cuts: &[usize]) -> Vec<Decoded> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut sizes = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).min(rest.len());
        out.extend(dec.feed(&rest[..n]));
        rest = &rest[n..];
        assert!(
            dec.buffered() <= dec.max_frame() + BUFFER_SLACK,
            "buffered {} > max {} + slack",
            dec.buffered(),
            dec.max_frame()
        );
    }
    out.extend(dec.finish());
    assert_eq!(dec.buffered(), 0, "finish must reset");
    for d in &out {
        match d {
            Decoded::Frame(f) => assert!(f.len() <= dec.max_frame()),
            Decoded::Bad(b) => {
                assert!(b.bytes.len() <= SAMPLE_LEN);
                assert!(
                    b.bytes.len() <= b.len,
                    "sample longer than the error: {b:?}"
                );
            }
        }
    }
    assert_eq!(dec.counts().frames(), frames(&out).len() as u64);
    for kind in ErrorKind::ALL {
        let n = errors(&out).iter().filter(|&&k| k == kind).count();
        assert_eq!(dec.counts().errors(kind), n as u64, "{kind} count");
    }
    out
}

/// Decodes `data` in one piece and in `cuts`-sized pieces with fresh decoders; asserts both
/// give the same result (the split must not matter) and returns it.
pub fn decode_both_ways(framing: Framing, max: usize, data: &[u8], cuts: &[usize]) -> Vec<Decoded> {
    let whole = feed_chunked(
        &mut Decoder::new(framing, max).unwrap(),
        data,
        &[data.len().max(1)],
    );
    let split = feed_chunked(&mut Decoder::new(framing, max).unwrap(), data, cuts);
    assert_eq!(whole, split, "output depends on how the stream was split");
    split
}

pub fn frames(out: &[Decoded]) -> Vec<Vec<u8>> {
    out.iter()
        .filter_map(|d| match d {
            Decoded::Frame(f) => Some(f.to_vec()),
            Decoded::Bad(_) => None,
        })
        .collect()
}

pub fn errors(out: &[Decoded]) -> Vec<ErrorKind> {
    out.iter()
        .filter_map(|d| match d {
            Decoded::Bad(b) => Some(b.kind),
            Decoded::Frame(_) => None,
        })
        .collect()
}

/// Whether `needle` occurs in `hay` in order, possibly with other items between.
pub fn is_subsequence(needle: &[Vec<u8>], hay: &[Vec<u8>]) -> bool {
    let mut hay = hay.iter();
    needle.iter().all(|n| hay.any(|h| h == n))
}

/// Encodes each payload and concatenates the frames.
pub fn encode_all(framing: Framing, payloads: &[Vec<u8>]) -> Vec<u8> {
    payloads
        .iter()
        .flat_map(|p| crate::codec::encode(framing, p).unwrap())
        .collect()
}
