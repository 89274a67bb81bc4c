#![no_main]

use libfuzzer_sys::fuzz_target;

mod mqtt_stream;

fuzz_target!(|input: &[u8]| {
    mqtt_stream::check(input);
});
