//! Replays every checked-in fuzz corpus and crash input through the target bodies, and runs a
//! short deterministic random smoke of each target, so `cargo test` catches regressions
//! without a fuzzer installed.

use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use rdmig_check::fuzzing;
use rdmig_check::rng::Rng;
use rdmig_model::wire::Frame;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut v = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_file() {
                v.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    v.sort();
    v
}

fn replay(target: &str, f: impl Fn(&[u8])) -> usize {
    let all = inputs(target);
    for (path, data) in &all {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(data)));
        assert!(r.is_ok(), "{target}: {} fails", path.display());
    }
    all.len()
}

fn smoke(seed: u64, count: usize, max_len: usize, f: impl Fn(&[u8])) {
    let mut rng = Rng::new(seed);
    for _ in 0..count {
        let mut data = vec![0u8; rng.below(max_len as u64) as usize];
        rng.fill(&mut data);
        f(&data);
    }
}

#[test]
fn fuzz_replay_wire_decode() {
    let n = replay("wire_decode", fuzzing::wire_decode);
    assert!(
        n >= 20,
        "seed corpus for wire_decode is missing ({n} inputs)"
    );
    smoke(1, 20_000, 96, fuzzing::wire_decode);
}

#[test]
fn fuzz_replay_wire_roundtrip() {
    replay("wire_roundtrip", fuzzing::wire_roundtrip_bytes);
    smoke(2, 20_000, 256, fuzzing::wire_roundtrip_bytes);
    // Frames drawn the other way too (`arbitrary` rather than `arbitrary_take_rest`).
    smoke(6, 20_000, 256, |data| {
        if let Ok(f) = Frame::arbitrary(&mut Unstructured::new(data)) {
            fuzzing::wire_roundtrip(&f);
        }
    });
}

#[test]
fn fuzz_replay_destination_session() {
    let n = replay("destination_session", fuzzing::destination_session);
    assert!(n >= 5, "seed corpus for destination_session is missing");
    smoke(3, 2_000, 512, fuzzing::destination_session);
}

#[test]
fn fuzz_replay_source_session() {
    let n = replay("source_session", fuzzing::source_session);
    assert!(n >= 5, "seed corpus for source_session is missing");
    smoke(4, 2_000, 512, fuzzing::source_session);
}

#[test]
fn fuzz_replay_handshake_auth() {
    replay("handshake_auth", fuzzing::handshake_auth);
    smoke(5, 5_000, 256, fuzzing::handshake_auth);
}

/// The seeds reach deep states: replaying a recorded stream from the start completes the
/// handshake and registration at the destination (the corpus is not vacuous).
#[test]
fn session_seeds_reach_deep_states() {
    let seed = fuzzing::session_seed(true, 0, 24);
    assert!(seed.len() > 24, "seed construction failed");
    fuzzing::destination_session(&seed);
}
