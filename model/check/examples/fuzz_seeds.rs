//! Writes the seed corpora under `fuzz/corpus/<target>/`: every message type encoded, a
//! recorded full migration's control streams, and session inputs that replay them.
//! Run: `cargo run -p rdmig-check --example fuzz_seeds`.

use std::path::PathBuf;

use rdmig_check::fuzzing;
use rdmig_model::wire;

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
    // Every start: the dynamic recording's snapshots, then the pin-all one's.
    for (target, destination) in [("destination_session", true), ("source_session", false)] {
        for start in 0..fuzzing::session_starts(destination) as u8 {
            for n in [8, 64] {
                write(
                    target,
                    &format!("replay-{start}-{n}"),
                    &fuzzing::session_seed(destination, start, n),
                );
            }
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
    // data_hello: one file per destination snapshot, each a sequence of joins: channels 0
    // and 1 with the session id and token filled in (selector 3), channel 0 again, a wrong
    // token (selector 1), reserved bytes set, and a wrong magic.
    let hello = |channel: u8| {
        wire::DataHello {
            session_id: 0,
            channel,
            token: [0; wire::MAC_LEN],
        }
        .encode()
    };
    for start in 0..rec.dst_snapshots.len() as u8 {
        let mut v = vec![start];
        for (sel, mut b) in [
            (3u8, hello(0)),
            (3, hello(1)),
            (3, hello(0)),
            (1, hello(1)),
            (3, hello(5)),
        ] {
            if sel == 3 && b[16] == 5 {
                b[20] = 1; // a reserved byte
            }
            v.push(sel);
            v.extend_from_slice(&b);
        }
        let mut bad = hello(0);
        bad[0] = b'X';
        v.push(0);
        v.extend_from_slice(&bad);
        write("data_hello", &format!("joins-{start}"), &v);
    }
    // listener_session: the recorded source on one connection, then a keyed data channel.
    for n in [8, 32, 96] {
        write(
            "listener_session",
            &format!("replay-{n}"),
            &fuzzing::listener_seed(n),
        );
    }
    println!("seed corpora written");
}
