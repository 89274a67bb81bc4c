//! The property every decoder target checks: whatever the input and however it is split, the
//! decoder does not panic, stays within its buffer bound, and gives the same result as when fed
//! in one piece. The first two input bytes choose the max frame size and the chunk size.

use edgeferry::codec::{Decoded, Decoder, Framing, BUFFER_SLACK, SAMPLE_LEN};

pub fn check(framing: Framing, input: &[u8]) {
    let [max, chunk, data @ ..] = input else {
        return;
    };
    let max = usize::from(*max) * 4 + 1;
    let chunk = usize::from(*chunk % 64) + 1;

    let run = |chunk: usize| {
        let mut dec = Decoder::new(framing, max).expect("max is in range");
        let mut out = Vec::new();
        for piece in data.chunks(chunk) {
            out.extend(dec.feed(piece));
            assert!(dec.buffered() <= max + BUFFER_SLACK);
        }
        out.extend(dec.finish());
        for d in &out {
            match d {
                Decoded::Frame(f) => assert!(f.len() <= max),
                Decoded::Bad(b) => assert!(b.bytes.len() <= SAMPLE_LEN.min(b.len)),
            }
        }
        assert_eq!(dec.counts().frames() + dec.counts().total_errors(), out.len() as u64);
        out
    };
    assert_eq!(run(chunk), run(data.len().max(1)));
}
