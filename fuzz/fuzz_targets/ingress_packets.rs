#![no_main]

//! CONNECT, PUBLISH and whatever follows, as the MQTT ingress decodes device bytes
//! (`edgeferry::ingest::decode`): no input panics, and the result does not depend on how the
//! bytes were split. The first byte chooses the protocol (bit 0) and the chunk size.

use edgeferry::ingest::decode::decode_all;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let [first, data @ ..] = input else {
        return;
    };
    let v5 = first & 1 == 1;
    let chunk = usize::from(first >> 1) + 1;
    let (whole, e1) = decode_all(v5, 64 * 1024, data, usize::MAX);
    let (pieces, e2) = decode_all(v5, 64 * 1024, data, chunk);
    assert_eq!(whole, pieces);
    assert_eq!(e1.is_some(), e2.is_some());
});
