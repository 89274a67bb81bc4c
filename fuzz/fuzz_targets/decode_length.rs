#![no_main]

use edgeferry::codec::Framing;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|input: &[u8]| {
    // The first byte also picks the max frame size; its top bit picks CRC on or off.
    let crc = input.first().is_none_or(|b| b & 0x80 == 0);
    common::check(Framing::Length { crc }, input);
});
