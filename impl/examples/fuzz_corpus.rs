//! Runs every fuzz target's checked-in corpus through its body, outside any fuzzer: the
//! program `make fuzz-coverage` builds with coverage instrumentation to show what the corpora
//! reach. Usage: `fuzz_corpus [FUZZ_DIR [TARGET ...]]` (default: `../fuzz`, every target).

use std::path::PathBuf;

type Body = fn(&[u8]);

const TARGETS: [(&str, Body); 12] = [
    ("wire_decode", rdmig_check::fuzzing::wire_decode),
    ("wire_roundtrip", rdmig_check::fuzzing::wire_roundtrip_bytes),
    (
        "destination_session",
        rdmig_check::fuzzing::destination_session,
    ),
    ("source_session", rdmig_check::fuzzing::source_session),
    ("handshake_auth", rdmig_check::fuzzing::handshake_auth),
    ("listener_session", rdmig_check::fuzzing::listener_session),
    ("data_hello", rdmig_check::fuzzing::data_hello),
    ("tcp_data_frame", rdmig::transport::tcp::fuzz_data_frames),
    (
        "tls_data_frame",
        rdmig::transport::tcp::fuzz_tls_data_frames,
    ),
    ("verbs_bootstrap", rdmig::fuzzing::verbs_bootstrap),
    ("qmp_reply", rdmig::fuzzing::qmp_reply),
    ("save_file", rdmig::fuzzing::save_file),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let fuzz = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz"));
    let only: Vec<String> = args.collect();
    let mut failed = 0;
    for (target, body) in TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == target) {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(fuzz.join("corpus").join(target)) else {
            println!("{target}: no corpus");
            continue;
        };
        let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        let mut n = 0;
        for p in paths.iter().filter(|p| p.is_file()) {
            let data = std::fs::read(p).expect("readable corpus input");
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                eprintln!("{target}: {} fails", p.display());
                failed += 1;
            }
            n += 1;
        }
        println!("{target}: {n} inputs");
    }
    if failed > 0 {
        eprintln!("{failed} corpus inputs fail");
        std::process::exit(1);
    }
}
