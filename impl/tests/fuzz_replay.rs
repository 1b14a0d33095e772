//! Replays the fuzz corpora and crash inputs of the targets whose bodies live in this crate
//! (`tcp_data_frame`, `tls_data_frame`, `qmp_reply`, `verbs_bootstrap`, `save_file`) and of the targets
//! added with them (`data_hello`, `listener_session`) without a fuzzer, each with a
//! deterministic random smoke on top, and checks that the checked-in dictionaries are the ones
//! the code generates.

use std::path::PathBuf;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs every corpus and crash input of `target` through `f`; returns how many there were.
fn replay(target: &str, f: impl Fn(&[u8])) -> usize {
    let mut n = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(rd) = std::fs::read_dir(fuzz_dir().join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths.iter().filter(|p| p.is_file()) {
            let data = std::fs::read(p).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
            assert!(r.is_ok(), "{target}: {} fails", p.display());
            n += 1;
        }
    }
    n
}

/// `count` random inputs of up to `max_len` bytes, optionally starting with `prefix`.
fn smoke(seed: u64, count: usize, max_len: u64, prefix: &[u8], f: impl Fn(&[u8])) {
    let mut rng = rdmig_check::rng::Rng::new(seed);
    for _ in 0..count {
        let mut data = vec![0u8; rng.below(max_len) as usize];
        rng.fill(&mut data);
        let n = prefix.len().min(data.len());
        data[..n].copy_from_slice(&prefix[..n]);
        f(&data);
    }
}

#[test]
fn fuzz_replay_tcp_data_frame() {
    let n = replay("tcp_data_frame", rdmig::transport::tcp::fuzz_data_frames);
    assert!(n >= 5, "tcp_data_frame seed corpus missing");
    smoke(
        0x1234_5678_9abc_def1,
        2000,
        300,
        &[],
        rdmig::transport::tcp::fuzz_data_frames,
    );
}

#[test]
fn fuzz_replay_tls_data_frame() {
    let n = replay(
        "tls_data_frame",
        rdmig::transport::tcp::fuzz_tls_data_frames,
    );
    assert!(n >= 5, "tls_data_frame seed corpus missing");
    // Every tamper mode, at random positions.
    smoke(0x0ddb_a11c_0ffe_e123, 60, 303, &[], |d| {
        if d.len() >= 3 {
            rdmig::transport::tcp::fuzz_tls_data_frames(d)
        }
    });
}

#[test]
fn fuzz_replay_data_hello() {
    let n = replay("data_hello", rdmig_check::fuzzing::data_hello);
    assert!(n >= 5, "data_hello seed corpus missing");
    smoke(
        0xda7a_4e11_0000_0001,
        3000,
        400,
        &[],
        rdmig_check::fuzzing::data_hello,
    );
    // Records that start with the magic reach the reserved-byte and admission checks.
    let mut rng = rdmig_check::rng::Rng::new(7);
    for _ in 0..2000 {
        let mut data = vec![rng.below(5) as u8];
        for _ in 0..1 + rng.below(4) {
            let mut b = [0u8; 57];
            rng.fill(&mut b);
            b[1..9].copy_from_slice(&rdmig_model::wire::DATA_HELLO_MAGIC);
            if rng.below(2) == 0 {
                b[18..25].fill(0);
            }
            data.extend_from_slice(&b);
        }
        rdmig_check::fuzzing::data_hello(&data);
    }
}

#[test]
fn fuzz_replay_listener_session() {
    let n = replay("listener_session", rdmig_check::fuzzing::listener_session);
    assert!(n >= 3, "listener_session seed corpus missing");
    smoke(
        0x1157_e4e4_0000_0005,
        2000,
        600,
        &[],
        rdmig_check::fuzzing::listener_session,
    );
    // The seeds reach a bound session and admit a data channel: the corpus is not vacuous.
    let seed = rdmig_check::fuzzing::listener_seed(32);
    assert!(seed.len() > 32 * 4, "listener seed construction failed");
    rdmig_check::fuzzing::listener_session(&seed);
}

#[test]
fn fuzz_replay_qmp_reply() {
    let n = replay("qmp_reply", rdmig::fuzzing::qmp_reply);
    assert!(n >= 5, "qmp_reply seed corpus missing");
    smoke(
        0x0e3a_9000_0000_0002,
        500,
        200,
        &[],
        rdmig::fuzzing::qmp_reply,
    );
    // A valid greeting followed by random replies.
    let greeting = br#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}}}}
{"return": {}, "id": 1}
"#;
    smoke(
        0x0e3a_9000_0000_0003,
        500,
        300,
        greeting,
        rdmig::fuzzing::qmp_reply,
    );
}

#[test]
fn fuzz_replay_verbs_bootstrap() {
    let n = replay("verbs_bootstrap", rdmig::fuzzing::verbs_bootstrap);
    assert!(n >= 5, "verbs_bootstrap seed corpus missing");
    smoke(0xb007_0000_0000_0004, 3000, 300, b"RDMGRDMA", |d| {
        rdmig::fuzzing::verbs_bootstrap(d)
    });
}

/// spec: SAVE-2: the save file's header, footer and trailer parsers.
#[test]
fn fuzz_replay_save_file() {
    let n = replay("save_file", rdmig::fuzzing::save_file);
    assert!(n >= 4, "save_file seed corpus missing");
    smoke(0x5a7e_0000_0000_0005, 3000, 600, b"RDMIGSAV", |d| {
        rdmig::fuzzing::save_file(d)
    });
}

/// The dictionaries in `fuzz/dict/` are what `make fuzz-dicts` generates from the code today.
#[test]
fn fuzz_dictionaries_are_current() {
    for (target, contents) in rdmig::fuzzing::dictionaries() {
        let path = fuzz_dir().join("dict").join(format!("{target}.dict"));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == contents,
            "{} is stale: run `make fuzz-dicts`",
            path.display()
        );
    }
}
