//! The device-facing MQTT codec (rumqttd's `V4`/`V5`, vendor/rumqttd) on hostile input: the
//! property of `fuzz/fuzz_targets/mqtt_stream.rs` (no panic; `InsufficientBytes` consumes
//! nothing; what decodes re-encodes and decodes back, for its own and the other protocol) on
//! arbitrary bytes, truncated valid packets and mutated valid packets, on every build.
//!
//! The same body runs under cargo-fuzz (`cargo +nightly fuzz run decode_mqtt`, fuzz/) and, on a
//! stable toolchain, as a mutation fuzzer for a chosen number of executions:
//!
//! ```sh
//! MQTT_FUZZ_EXECS=2000000 cargo test --release --test mqtt_codec -- --ignored --nocapture
//! ```

#[path = "../fuzz/fuzz_targets/mqtt_stream.rs"]
mod mqtt_stream;

use std::collections::HashSet;
use std::time::Instant;

use mqtt_stream::{check, decode, input, seed_inputs, seeds_v4, seeds_v5};
use proptest::prelude::*;

/// A seed packet stream: one packet, or all of a protocol's packets back to back.
fn seed_stream() -> impl Strategy<Value = (bool, Vec<u8>)> {
    (any::<bool>(), any::<prop::sample::Index>(), any::<bool>()).prop_map(|(v5, i, all)| {
        let seeds = if v5 { seeds_v5() } else { seeds_v4() };
        let data = if all {
            seeds.concat()
        } else {
            i.get(&seeds).clone()
        };
        (v5, data)
    })
}

/// One edit of a byte string: overwrite, flip a bit, insert, delete, or set a length byte to
/// an interesting value.
#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Interesting(prop::sample::Index, prop::sample::Index),
}

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x02, 0x7f, 0x80, 0xfe, 0xff, 0x26];

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(i, v)| Edit::Interesting(i, v)),
    ]
}

fn apply(data: &mut Vec<u8>, edit: &Edit) {
    if data.is_empty() {
        return;
    }
    match edit {
        Edit::Set(i, b) => {
            let i = i.index(data.len());
            data[i] = *b;
        }
        Edit::Flip(i, bit) => {
            let i = i.index(data.len());
            data[i] ^= 1 << bit;
        }
        Edit::Insert(i, b) => {
            let i = i.index(data.len() + 1);
            data.insert(i, *b);
        }
        Edit::Delete(i) => {
            let i = i.index(data.len());
            data.remove(i);
        }
        Edit::Interesting(i, v) => {
            let i = i.index(data.len());
            data[i] = *v.get(&INTERESTING);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        failure_persistence: Some(Box::new(
            prop::test_runner::FileFailurePersistence::Direct("proptest-regressions/mqtt_codec.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
        check(&data);
    }

    #[test]
    fn truncated_packets_never_panic(
        (v5, data) in seed_stream(),
        cut in any::<prop::sample::Index>(),
        max in any::<u16>(),
        chunk in any::<u8>(),
    ) {
        let cut = cut.index(data.len() + 1);
        check(&input(v5, max, chunk, &data[..cut]));
    }

    #[test]
    fn mutated_packets_never_panic(
        (v5, mut data) in seed_stream(),
        edits in prop::collection::vec(edit(), 1..6),
        max in any::<u16>(),
        chunk in any::<u8>(),
    ) {
        for e in &edits {
            apply(&mut data, e);
        }
        check(&input(v5, max, chunk, &data));
    }
}

#[test]
fn every_seed_decodes_and_round_trips() {
    for (v5, seeds) in [(false, seeds_v4()), (true, seeds_v5())] {
        // The last two v5 seeds are the bytes that used to panic the broker: malformed.
        let valid = if v5 { seeds.len() - 2 } else { seeds.len() };
        for seed in &seeds[..valid] {
            let (packets, error) = decode(v5, seed);
            assert!(
                packets.len() == 1 && error.is_none(),
                "v5={v5}: seed {seed:02x?} decodes as {packets:?}, {error:?}"
            );
        }
        let (packets, error) = decode(v5, &seeds[..valid].concat());
        assert_eq!(
            (packets.len(), error),
            (valid, None),
            "v5={v5}: seed stream"
        );
    }
    for seed in seed_inputs() {
        check(&seed);
    }
}

/// Inputs the fuzzers found, as `check` inputs in hex: each failed before its rumqttd patch
/// (vendor/rumqttd/PATCHES.md).
const FOUND: &[(&str, &str)] = &[
    (
        "v5 CONNACK without property length, then more bytes (patch 5)",
        "01ffff7f20020000c000",
    ),
    (
        "v5 DISCONNECT with a reason code and no properties re-encoded short (patch 6)",
        "01ffff7fe0028100",
    ),
    (
        "v5 PUBLISH whose subscription identifiers overrun the property length (patch 10)",
        "01ffff7f333e000401000075000b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b\
         0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b88010800087265706c79507562ffffffffffffffffffff\
         ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\
         ffffffffffffffffffffffffffffffffffffff26ffffffffffffffffffffffffffffffffffffffffffffffffff\
         ffffffffffffffff52656c0001270800087265709b86d08b00000079722600016b0001760b810103000a7465\
         78742f706c61696e7132",
    ),
];

#[test]
fn inputs_the_fuzzers_found() {
    for (what, hex) in FOUND {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let result = std::panic::catch_unwind(|| check(&bytes));
        assert!(result.is_ok(), "{what}: {hex}");
    }
}

// ---- the long-running form: a mutation fuzzer on stable Rust --------------------------------

/// Mutate `data` in place with 1-8 random edits, sometimes splicing in part of `other`.
fn mutate(rng: &mut fastrand::Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..rng.usize(1..=8) {
        let len = data.len();
        match rng.u8(0..9) {
            0 if len > 0 => {
                let i = rng.usize(0..len);
                data[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(0..len);
                data[i] = rng.u8(..);
            }
            2 => data.insert(rng.usize(0..=len), rng.u8(..)),
            3 if len > 0 => {
                let a = rng.usize(0..len);
                let b = rng.usize(a..=len.min(a + 16));
                data.drain(a..b);
            }
            4 if len > 0 => {
                // Duplicate a range (repeated properties, filters, packets).
                let a = rng.usize(0..len);
                let b = rng.usize(a..=len.min(a + 32));
                let piece = data[a..b].to_vec();
                let at = rng.usize(0..=data.len());
                data.splice(at..at, piece);
            }
            5 if len > 0 => {
                let i = rng.usize(0..len);
                data[i] = INTERESTING[rng.usize(0..INTERESTING.len())];
            }
            6 if !other.is_empty() => {
                let a = rng.usize(0..other.len());
                let b = rng.usize(a..=other.len());
                let at = rng.usize(0..=data.len());
                data.splice(at..at, other[a..b].iter().copied());
            }
            7 if len > 4 => data.truncate(rng.usize(4..len)),
            // The header: protocol, max size, chunk size.
            _ if len >= 4 => {
                let i = rng.usize(0..4);
                data[i] = rng.u8(..);
            }
            _ => data.push(rng.u8(..)),
        }
    }
    data.truncate(4096);
}

/// Most inputs the long-running fuzzer keeps.
const CORPUS_CAP: usize = 100_000;

/// Runs `check` on random and mutated inputs `MQTT_FUZZ_EXECS` times (default 200,000),
/// keeping inputs whose signature is new as the corpus to mutate further. Prints executions,
/// corpus size and rate; on a panic, prints the input first.
#[test]
#[ignore = "long: run with --release -- --ignored --nocapture"]
fn fuzz_mqtt_codec() {
    let execs: u64 = std::env::var("MQTT_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let seed = std::env::var("MQTT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut corpus = seed_inputs();
    let mut seen: HashSet<u64> = corpus.iter().map(|i| check(i)).collect();
    let started = Instant::now();
    for n in 0..execs {
        let case = if rng.u8(0..10) == 0 {
            let len = rng.usize(0..512);
            std::iter::repeat_with(|| rng.u8(..)).take(len).collect()
        } else {
            let mut case = corpus[rng.usize(0..corpus.len())].clone();
            let other = corpus[rng.usize(0..corpus.len())].clone();
            mutate(&mut rng, &mut case, &other[other.len().min(4)..]);
            case
        };
        let result = std::panic::catch_unwind(|| check(&case));
        match result {
            Ok(sig) => {
                if seen.insert(sig) {
                    // Bounded: past the cap a new input replaces a random old one.
                    if corpus.len() < CORPUS_CAP {
                        corpus.push(case);
                    } else {
                        let i = rng.usize(0..corpus.len());
                        corpus[i] = case;
                    }
                }
            }
            Err(panic) => {
                eprintln!(
                    "fuzz_mqtt_codec: panic after {n} executions (MQTT_FUZZ_SEED={seed}) on input {case:02x?}"
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz_mqtt_codec: {execs} executions in {secs:.1} s ({:.0}/s), corpus {} inputs ({} seeds), MQTT_FUZZ_SEED={seed}",
        execs as f64 / secs.max(1e-9),
        corpus.len(),
        seed_inputs().len(),
    );
}

/// Writes the seeds as the cargo-fuzz seed corpus (`fuzz/corpus/decode_mqtt`, or
/// `MQTT_SEED_DIR`): `cargo test --test mqtt_codec write_fuzz_seed_corpus -- --ignored`.
#[test]
#[ignore = "writes files: run on demand before cargo fuzz"]
fn write_fuzz_seed_corpus() {
    let dir = std::env::var("MQTT_SEED_DIR").unwrap_or_else(|_| "fuzz/corpus/decode_mqtt".into());
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {dir}: {e}"));
    for (i, seed) in seed_inputs().iter().enumerate() {
        let path = format!("{dir}/seed-{i:03}");
        std::fs::write(&path, seed).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}
