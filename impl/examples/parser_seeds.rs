//! Writes the seed corpora of the fuzz targets whose bodies live in this crate and read bytes
//! from another process: `qmp_reply` (QEMU's side of a QMP session), `verbs_bootstrap`
//! (the RDMA bootstrap stream) and `save_file` (a save file's header). Run: `make fuzz-seeds`.

use std::path::PathBuf;

use rdmig::transport::verbs::{connect_msg, join_msg, Endpoint};
use rdmig_model::wire::DataHello;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

fn qmp(name: &str, lines: &[&str]) {
    let mut s = String::new();
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    write("qmp_reply", name, s.as_bytes());
}

fn endpoint(qpn: u32, mtu: u8) -> Endpoint {
    let mut gid = [0u8; 16];
    gid[10] = 0xff;
    gid[11] = 0xff;
    gid[12..].copy_from_slice(&[10, 0, 2, 15]);
    Endpoint {
        qpn,
        psn: 0x12_3456,
        lid: 0,
        mtu,
        gid,
    }
}

fn main() {
    let caps = r#"{"return": {}, "id": 1}"#;
    qmp(
        "session",
        &[
            GREETING,
            caps,
            r#"{"return": {"status": "running", "running": true}, "id": 2}"#,
            r#"{"return": {}, "id": 3}"#,
            r#"{"return": {"status": "completed"}, "id": 4}"#,
            r#"{"return": {}, "id": 5}"#,
            r#"{"return": {}, "id": 6}"#,
            r#"{"return": {}, "id": 7}"#,
        ],
    );
    qmp(
        "events",
        &[
            GREETING,
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#,
            caps,
            r#"{"event": "STOP", "data": {}}"#,
            r#"{"return": {"status": "paused", "running": false}, "id": 2}"#,
        ],
    );
    qmp(
        "command-error",
        &[
            GREETING,
            caps,
            r#"{"error": {"class": "GenericError", "desc": "not now"}, "id": 2}"#,
            r#"{"error": {"class": "CommandNotFound"}, "id": 3}"#,
        ],
    );
    qmp("wrong-id", &[GREETING, caps, r#"{"return": {}, "id": 9}"#]);
    qmp("neither", &[GREETING, caps, r#"{"id": 2}"#]);
    qmp("not-object", &[GREETING, caps, "[1, 2, 3]"]);
    qmp("not-json", &[GREETING, caps, "{\"return\": "]);
    qmp("no-version", &[r#"{"QMP": {"capabilities": []}}"#]);
    qmp(
        "refused",
        &[
            GREETING,
            r#"{"error": {"class": "GenericError", "desc": "no"}, "id": 1}"#,
        ],
    );
    write(
        "qmp_reply",
        "unfinished-line",
        format!("{GREETING}\n{caps}\n{{\"return\": {{}}, \"id\": 2}}").as_bytes(),
    );

    let ep = endpoint(0x11, 3);
    let hello = DataHello {
        session_id: 0x0102_0304_0506_0708,
        channel: 1,
        token: [0xab; 32],
    };
    let connect = connect_msg(&ep);
    write("verbs_bootstrap", "connect", &connect);
    let mut joins = connect.to_vec();
    for ch in 0..3u8 {
        let h = DataHello {
            channel: ch,
            ..hello
        };
        joins.extend_from_slice(&join_msg(&h, &endpoint(0x20 + u32::from(ch), 1 + ch)));
    }
    write("verbs_bootstrap", "connect-joins", &joins);
    let mut bad = connect;
    bad[0] = b'X';
    write("verbs_bootstrap", "bad-magic", &bad);
    let mut bad = connect;
    bad[8 + 7] = 1;
    write("verbs_bootstrap", "psn-too-wide", &bad);
    let mut bad = connect;
    bad[8 + 10] = 6;
    write("verbs_bootstrap", "bad-mtu", &bad);
    let mut bad = connect;
    bad[8 + 11] = 1;
    write("verbs_bootstrap", "reserved", &bad);
    let mut bad_join = connect.to_vec();
    let mut j = join_msg(&hello, &ep);
    j[20] = 1; // a reserved byte of DATA_HELLO
    bad_join.extend_from_slice(&j);
    write("verbs_bootstrap", "join-reserved", &bad_join);
    save_file_seeds();
    println!("seed corpora of qmp_reply, verbs_bootstrap and save_file written");
}

/// Save-file headers as a file's first bytes followed by the file's length, and structure
/// bytes for the built file with and without edits.
fn save_file_seeds() {
    use rdmig::savefile::format::Header;
    use rdmig_model::wire::DigestAlg;
    let h = Header::layout(
        &[("pc.ram".into(), 1 << 30), ("vga.vram".into(), 16 << 20)],
        12,
        22,
        DigestAlg::Xxh3PageTree,
    );
    let mut one = h.encode();
    one.extend_from_slice(&(h.trailer_offset() + 4096).to_le_bytes());
    write("save_file", "header-two-blocks", &one);
    let h = Header::layout(&[("ram".into(), 64 << 12)], 12, 12, DigestAlg::Xxh3_64);
    let mut cut = h.encode();
    cut.extend_from_slice(&4096u64.to_le_bytes());
    write("save_file", "header-file-cut", &cut);
    write("save_file", "built-unedited", &[2, 0, 3, 1, 7, 9, 4, 0]);
    write(
        "save_file",
        "built-edited",
        &[
            1, 1, 2, 0, 5, 6, 7, 8, 3, 3, 0, 10, 0, 1, 2, 4, 0, 2, 2, 9, 0, 4,
        ],
    );
}
