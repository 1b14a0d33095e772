//! Writes the seed corpora under `fuzz/corpus/<target>/`: every message type encoded, a
//! recorded full migration's control streams, and session inputs that replay them.
//! Run: `cargo run -p rdmig-check --example fuzz_seeds`.

use std::path::PathBuf;

use rdmig_check::fuzzing;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn main() {
    for (i, f) in fuzzing::seed_frames().iter().enumerate() {
        write("wire_decode", &format!("frame-{i:03}"), f);
    }
    let rec = fuzzing::recording();
    for start in 0..rec.dst_snapshots.len() as u8 {
        for n in [8, 64] {
            write(
                "destination_session",
                &format!("replay-{start}-{n}"),
                &fuzzing::session_seed(true, start, n),
            );
            write(
                "source_session",
                &format!("replay-{start}-{n}"),
                &fuzzing::session_seed(false, start, n),
            );
        }
    }
    let stream: Vec<u8> = rec.source_stream.concat();
    write("wire_decode", "source-stream-first", &rec.source_stream[0]);
    write("handshake_auth", "replay", &[1, 2, 2, 2, 2, 2, 2, 2, 2]);
    write(
        "handshake_auth",
        "stream",
        &stream[..stream.len().min(4096)],
    );
    println!("seed corpora written");
}
