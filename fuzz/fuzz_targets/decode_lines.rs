#![no_main]

use edgeferry::codec::Framing;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|input: &[u8]| common::check(Framing::Lines, input));
