//! Fuzz target bodies for the parsers of this crate that read bytes written by another
//! process and have no other harness: QEMU's QMP replies and the RDMA bootstrap messages. The
//! cargo-fuzz targets in `fuzz/` are one-line calls into these, and `cargo test` replays the
//! checked-in corpora through the same functions (`tests/fuzz_replay.rs`). Also the targets'
//! libFuzzer dictionaries, generated from the parsers' constants ([`dictionaries`]).
//!
//! Each function panics when the parser misbehaves: a panic inside it, an error of a kind the
//! input cannot cause, or an answer that differs from the protocol's definition.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rdmig_model::wire::DataHello;
use serde_json::{Map, Value};

use crate::transport::verbs::{
    connect_msg, decode_connect, decode_endpoint, encode_endpoint, join_msg, split_join, Endpoint,
    BOOT_MAGIC, CONNECT_LEN, ENDPOINT_LEN, JOIN_LEN,
};
use crate::vmm::qmp::{Qmp, QmpError};

/// Input bytes a QMP input may use: far below a socket's send buffer, so writing them all
/// before the client reads cannot block (libFuzzer's inputs stay within 4 KiB by default).
const QMP_INPUT_MAX: usize = 16 << 10;

/// The commands the QMP harness runs after negotiation (rdmig's own).
const QMP_COMMANDS: [&str; 6] = [
    "query-status",
    "stop",
    "query-migrate",
    "cont",
    "migrate",
    "quit",
];

/// What a QMP exchange must produce, by the protocol's definition.
#[derive(Debug, PartialEq)]
enum Expect {
    Return(Value),
    Closed,
    Protocol,
    Command { class: String, desc: String },
}

impl Expect {
    fn of(r: Result<Value, QmpError>) -> Expect {
        match r {
            Ok(v) => Expect::Return(v),
            Err(QmpError::Closed) => Expect::Closed,
            Err(QmpError::Protocol(_)) => Expect::Protocol,
            Err(QmpError::Command { class, desc, .. }) => Expect::Command { class, desc },
            Err(e) => panic!("QMP error the input cannot cause: {e}"),
        }
    }
}

/// QEMU's side of the socket read as the protocol defines it: one JSON object per line,
/// events skipped, each reply matched to its command by id.
struct Peer<'a> {
    rest: &'a [u8],
}

impl Peer<'_> {
    fn message(&mut self) -> Result<Map<String, Value>, Expect> {
        let Some(end) = self.rest.iter().position(|&b| b == b'\n') else {
            // Nothing more, or a last line the peer never finished.
            self.rest = &[];
            return Err(Expect::Closed);
        };
        let line = &self.rest[..=end];
        self.rest = &self.rest[end + 1..];
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(Expect::Protocol),
        }
    }

    fn reply(&mut self, id: u64) -> Expect {
        loop {
            let m = match self.message() {
                Ok(m) => m,
                Err(e) => return e,
            };
            if m.contains_key("event") {
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                return Expect::Protocol;
            }
            if let Some(r) = m.get("return") {
                return Expect::Return(r.clone());
            }
            let Some(e) = m.get("error") else {
                return Expect::Protocol;
            };
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Expect::Command {
                class: s("class"),
                desc: s("desc"),
            };
        }
    }

    /// The greeting and the answer to `qmp_capabilities`: QEMU's version, or the error.
    fn negotiate(&mut self) -> Result<(u64, u64, u64), Expect> {
        let greeting = self.message()?;
        let Some(v) = greeting
            .get("QMP")
            .and_then(|g| g.get("version"))
            .and_then(|v| v.get("qemu"))
        else {
            return Err(Expect::Protocol);
        };
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let version = (num("major"), num("minor"), num("micro"));
        match self.reply(1) {
            Expect::Return(_) => Ok(version),
            e => Err(e),
        }
    }
}

/// `qmp_reply`: the bytes QEMU writes on the QMP socket (greeting, replies, events), read by
/// rdmig's QMP client through a real socket while it negotiates and runs a few commands.
/// Every outcome is a value or a typed error (closed, malformed, or the command's error with
/// its class and description), and each is the one the protocol defines for those bytes.
pub fn qmp_reply(data: &[u8]) {
    let data = &data[..data.len().min(QMP_INPUT_MAX)];
    let (client, mut qemu) = UnixStream::pair().expect("socket pair");
    qemu.write_all(data)
        .expect("the input fits the socket buffer");
    qemu.shutdown(Shutdown::Write).expect("half-close");
    let mut peer = Peer { rest: data };
    let expected = peer.negotiate();
    let mut q = match Qmp::from_stream(client, Duration::from_secs(10)) {
        Ok(q) => {
            assert_eq!(Ok(q.version), expected, "negotiation differs");
            q
        }
        Err(e) => {
            let got: Result<(u64, u64, u64), Expect> = Err(Expect::of(Err(e)));
            assert_eq!(got, expected, "negotiation error differs");
            return;
        }
    };
    for (i, command) in QMP_COMMANDS.iter().enumerate() {
        let got = Expect::of(q.execute(command, None));
        let want = peer.reply(i as u64 + 2);
        assert_eq!(got, want, "reply to {command} differs");
        if got == Expect::Closed {
            break;
        }
    }
    // `qemu` stays open until here: the client's commands must not meet a closed socket.
    drop(qemu);
}

/// Panics unless `e` is an endpoint the bootstrap may carry: a 24-bit PSN and an `ibv_mtu`.
fn check_endpoint(e: &Endpoint) {
    assert!(e.psn <= 0xff_ffff, "PSN wider than 24 bits accepted");
    assert!((1..=5).contains(&e.mtu), "MTU code {} accepted", e.mtu);
}

/// Whether the 32 bytes follow the endpoint layout: reserved bytes zero, a 24-bit PSN, an MTU
/// code of `ibv_mtu` (256 .. 4096 bytes: 1 ..= 5).
fn endpoint_well_formed(b: &[u8; ENDPOINT_LEN]) -> bool {
    b[11] == 0 && b[28..] == [0; 4] && b[7] == 0 && (1..=5).contains(&b[10])
}

/// `verbs_bootstrap`: the RDMA bootstrap connection as the destination reads it from the
/// network: CONNECT, then JOINs (DATA_HELLO and an endpoint). A message is accepted exactly
/// when it follows the documented layout, and what is accepted encodes back to the same bytes.
pub fn verbs_bootstrap(data: &[u8]) {
    let Some(c) = data.get(..CONNECT_LEN) else {
        return;
    };
    let c: &[u8; CONNECT_LEN] = c.try_into().expect("CONNECT_LEN bytes");
    let ep: &[u8; ENDPOINT_LEN] = c[8..].try_into().expect("ENDPOINT_LEN bytes");
    let well_formed = c[..8] == BOOT_MAGIC[..] && endpoint_well_formed(ep);
    match decode_connect(c) {
        Some(e) => {
            assert!(well_formed, "a malformed CONNECT accepted");
            check_endpoint(&e);
            assert_eq!(connect_msg(&e), *c, "CONNECT decoding is not canonical");
        }
        None => assert!(!well_formed, "a well-formed CONNECT refused"),
    }
    for m in data[CONNECT_LEN..].chunks_exact(JOIN_LEN) {
        let m: &[u8; JOIN_LEN] = m.try_into().expect("JOIN_LEN bytes");
        let (hello, ep) = split_join(m);
        let e = decode_endpoint(&ep);
        assert_eq!(
            e.is_some(),
            endpoint_well_formed(&ep),
            "endpoint acceptance differs from its layout"
        );
        if let Some(e) = &e {
            check_endpoint(e);
            assert_eq!(encode_endpoint(e), ep, "endpoint decoding is not canonical");
        }
        let h = DataHello::decode(&hello);
        if let Ok(h) = &h {
            assert_eq!(h.encode(), hello, "DATA_HELLO decoding is not canonical");
        }
        if let (Ok(h), Some(e)) = (h, e) {
            assert_eq!(join_msg(&h, &e), *m, "JOIN decoding is not canonical");
        }
    }
}

/// One libFuzzer dictionary line: `name="value"` with every byte outside printable ASCII,
/// and `"` and `\`, escaped.
fn dict_entry(out: &mut String, name: &str, value: &[u8]) {
    out.push_str(name);
    out.push_str("=\"");
    for &b in value {
        match b {
            b'"' | b'\\' => out.push_str(&format!("\\{}", b as char)),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push_str("\"\n");
}

/// A limit as the wire carries it at every width a field may have, and one past it.
fn dict_limit(out: &mut String, name: &str, v: u64) {
    for (w, n) in [(2usize, "u16"), (4, "u32"), (8, "u64")] {
        for (value, suffix) in [(v, ""), (v + 1, "_plus_1")] {
            if w == 8 || value < 1 << (8 * w) {
                dict_entry(
                    out,
                    &format!("{name}_{n}{suffix}"),
                    &value.to_le_bytes()[..w],
                );
            }
        }
    }
}

/// The keys rdmig's QMP client looks up in QEMU's messages, read from its source so the
/// dictionary follows the client: every `f("key")` argument before its tests, but for the
/// `Debug` output's names.
fn qmp_keys() -> Vec<String> {
    let src = include_str!("vmm/qmp.rs");
    let src = src.split("#[cfg(test)]").next().unwrap_or(src);
    let pieces: Vec<&str> = src.split("(\"").collect();
    let mut keys: Vec<String> = pieces
        .windows(2)
        .filter(|w| !w[0].ends_with("debug_struct") && !w[0].ends_with("field"))
        .filter_map(|w| w[1].split_once("\")").map(|(k, _)| k))
        .filter(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .map(str::to_string)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The libFuzzer dictionaries of the targets where they pay, as `(target, contents)`: frame
/// type codes, magic values and limits, taken from the constants the parsers use. `make
/// fuzz-dicts` writes them to `fuzz/dict/<target>.dict`; a test checks they are current.
pub fn dictionaries() -> Vec<(&'static str, String)> {
    use crate::transport::tcp::{encode_data_header, DataHeader, MAX_DATA_FRAME};
    use rdmig_model::wire;

    let mut w = String::from("# Control frames (model/src/wire.rs), generated: make fuzz-dicts\n");
    for c in 0..=u8::MAX {
        if let Some(name) = wire::code_name(c) {
            // A header's first bytes: the type code, then the reserved byte.
            dict_entry(&mut w, &format!("type_{name}"), &[c, 0]);
        }
    }
    dict_entry(
        &mut w,
        "protocol_version",
        &wire::PROTOCOL_VERSION.to_le_bytes(),
    );
    dict_entry(&mut w, "flags_all", &[wire::flag::ALL]);
    for (name, v) in [
        ("max_payload_len", wire::MAX_PAYLOAD_LEN as u64),
        ("max_blocks", wire::MAX_BLOCKS as u64),
        ("max_name_len", wire::MAX_NAME_LEN as u64),
        ("max_reg_batch", wire::MAX_REG_BATCH as u64),
        ("max_zero_ranges", wire::MAX_ZERO_RANGES as u64),
        ("max_state_chunk", wire::MAX_STATE_CHUNK as u64),
        ("max_device_state", u64::from(wire::MAX_DEVICE_STATE)),
        ("max_digest_batch", wire::MAX_DIGEST_BATCH as u64),
        ("max_block_len", wire::MAX_BLOCK_LEN),
        ("min_credit_window", u64::from(wire::MIN_CREDIT_WINDOW)),
        ("max_credit_window", u64::from(wire::MAX_CREDIT_WINDOW)),
    ] {
        dict_limit(&mut w, name, v);
    }
    for (name, v) in [
        ("min_chunk_log2", wire::MIN_CHUNK_LOG2),
        ("max_chunk_log2", wire::MAX_CHUNK_LOG2),
        ("min_page_log2", wire::MIN_PAGE_LOG2),
        ("max_page_log2", wire::MAX_PAGE_LOG2),
        ("max_channels", wire::MAX_CHANNELS),
        ("max_reg_inflight", wire::MAX_REG_INFLIGHT),
    ] {
        dict_entry(&mut w, name, &[v]);
        dict_entry(&mut w, &format!("{name}_plus_1"), &[v.wrapping_add(1)]);
    }
    dict_entry(&mut w, "data_hello_magic", &wire::DATA_HELLO_MAGIC);
    dict_entry(&mut w, "data_join_ack", &wire::DATA_JOIN_ACK);

    let mut hello = String::from("# DATA_HELLO (model/src/wire.rs), generated: make fuzz-dicts\n");
    dict_entry(&mut hello, "data_hello_magic", &wire::DATA_HELLO_MAGIC);
    dict_entry(&mut hello, "reserved", &[0; 7]);
    dict_entry(&mut hello, "max_channels", &[wire::MAX_CHANNELS]);

    let mut tcp = String::from(
        "# TCP data frames (impl/src/transport/tcp/frames.rs), generated: make fuzz-dicts\n",
    );
    let header = encode_data_header(&DataHeader {
        rkey: 0,
        remote_offset: 0,
        len: 0,
    });
    dict_entry(&mut tcp, "data_magic", &header[..4]);
    dict_entry(&mut tcp, "header_zero", &header);
    dict_limit(&mut tcp, "max_data_frame", u64::from(MAX_DATA_FRAME));
    dict_limit(&mut tcp, "page", 4096);

    let mut verbs = String::from(
        "# RDMA bootstrap (impl/src/transport/verbs/mod.rs), generated: make fuzz-dicts\n",
    );
    dict_entry(&mut verbs, "boot_magic", BOOT_MAGIC);
    dict_entry(&mut verbs, "data_hello_magic", &wire::DATA_HELLO_MAGIC);
    dict_entry(&mut verbs, "psn_max", &0xff_ffffu32.to_le_bytes());
    dict_entry(&mut verbs, "psn_too_wide", &0x100_0000u32.to_le_bytes());
    dict_entry(&mut verbs, "reserved", &[0; 4]);

    let mut qmp = String::from("# QMP replies (impl/src/vmm/qmp.rs), generated: make fuzz-dicts\n");
    for k in qmp_keys() {
        dict_entry(
            &mut qmp,
            &format!("key_{}", k.replace('-', "_")),
            format!("\"{k}\":").as_bytes(),
        );
    }
    for (name, tok) in [
        ("open", "{\""),
        ("close_line", "}\n"),
        ("empty_object", "{}"),
        ("newline", "\n"),
    ] {
        dict_entry(&mut qmp, name, tok.as_bytes());
    }
    for id in 1..=QMP_COMMANDS.len() as u64 + 1 {
        dict_entry(
            &mut qmp,
            &format!("id_{id}"),
            format!("\"id\": {id}").as_bytes(),
        );
    }

    let mut save =
        String::from("# Save files (impl/src/savefile/format.rs), generated: make fuzz-dicts\n");
    {
        use crate::savefile::format::{FOOTER_MAGIC, MAGIC, MAX_STATE_LEN, VERSION};
        dict_entry(&mut save, "magic", MAGIC);
        dict_entry(&mut save, "footer_magic", FOOTER_MAGIC);
        dict_entry(&mut save, "version", &VERSION.to_le_bytes());
        dict_limit(&mut save, "max_state_len", MAX_STATE_LEN);
        dict_limit(&mut save, "max_block_len", wire::MAX_BLOCK_LEN);
        dict_entry(
            &mut save,
            "max_blocks",
            &(wire::MAX_BLOCKS as u16).to_le_bytes(),
        );
        dict_entry(&mut save, "align_1mib", &[20]);
    }

    vec![
        ("save_file", save),
        ("wire_decode", w.clone()),
        ("destination_session", w.clone()),
        ("source_session", w.clone()),
        ("handshake_auth", w.clone()),
        ("listener_session", w),
        ("data_hello", hello),
        ("tcp_data_frame", tcp.clone()),
        ("tls_data_frame", tcp),
        ("verbs_bootstrap", verbs),
        ("qmp_reply", qmp),
    ]
}

/// The save file's parsers (spec: SAVE-2) on bytes that may be anything: the header as a
/// file's first bytes (the file's length taken from the input's last 8 bytes), and a valid
/// header, footer and trailer built from the input and then edited by it, so that inputs get
/// past the hashes to the checks behind them. Nothing may panic; whatever parses must encode
/// back to exactly the bytes it came from (the format has one encoding); an unedited file
/// must parse.
pub fn save_file(data: &[u8]) {
    use crate::savefile::format::{Footer, Header, Trailer, FOOTER_LEN, MAX_HEADER_LEN};
    use rdmig_model::wire::DigestAlg;
    use xxhash_rust::xxh3::xxh3_64;

    // Raw bytes.
    let (body, file_len) = match data.len().checked_sub(8) {
        Some(n) => (
            &data[..n],
            u64::from_le_bytes(data[n..].try_into().expect("8 bytes")),
        ),
        None => (data, data.len() as u64),
    };
    if let Ok((h, n)) = Header::decode(&body[..body.len().min(MAX_HEADER_LEN)], file_len) {
        assert_eq!(h.encode(), &body[..n], "a header has one encoding");
        assert!(h.data_end() <= file_len, "block data inside the file");
    }

    // A valid file's header, trailer and footer from the input, then edits.
    let mut it = data.iter().copied();
    let mut next = || it.next().unwrap_or(0);
    let count = 1 + next() as usize % 3;
    let page_log2 = 12 + next() % 2;
    let chunk_log2 = page_log2 + next() % 4;
    let digest = if next() % 2 == 0 {
        DigestAlg::Xxh3_64
    } else {
        DigestAlg::Xxh3PageTree
    };
    let blocks: Vec<(String, u64)> = (0..count)
        .map(|i| (format!("b{i}"), (1 + next() as u64 % 64) << page_log2))
        .collect();
    let h = Header::layout(&blocks, page_log2, chunk_log2, digest);
    let present = (0..count)
        .map(|i| {
            (0..h.pages(i).div_ceil(64))
                .map(|_| u64::from(next()) * 0x0101_0101_0101_0101)
                .collect()
        })
        .collect();
    let digests = (0..h.chunk_count()).map(|_| u64::from(next())).collect();
    let state: Vec<u8> = (0..next() % 32).map(|_| next()).collect();
    let tr = Trailer {
        present,
        digests,
        state,
    };
    let mut t = tr.encode();
    let ft = Footer {
        trailer_offset: h.trailer_offset(),
        bitmap_len: h.bitmap_len(),
        digests_len: h.chunk_count() * 8,
        state_len: tr.state.len() as u64,
        trailer_hash: xxh3_64(&t),
    };
    let mut f = ft.encode(h.hash());
    let mut e = h.encode();
    let file_len = h.trailer_offset() + t.len() as u64 + FOOTER_LEN as u64;
    // Unedited, it parses back to what was built.
    let (h2, _) = Header::decode(&e, file_len).expect("a valid header parses");
    assert_eq!(h2, h);
    let ft2 = Footer::decode(&f, &h, file_len).expect("a valid footer parses");
    assert_eq!(ft2, ft);
    assert_eq!(
        Trailer::decode(&t, &h, &ft).expect("a valid trailer parses"),
        tr
    );
    // Edits: (part, position, xor) from the rest of the input.
    let mut edited = false;
    for _ in 0..next() % 4 {
        let (part, at, x) = (next() % 3, u16::from_le_bytes([next(), next()]), next());
        let buf: &mut [u8] = match part {
            0 => &mut e,
            1 => &mut f,
            _ => &mut t,
        };
        if !buf.is_empty() && x != 0 {
            let i = at as usize % buf.len();
            buf[i] ^= x;
            edited = true;
        }
    }
    let Ok((h3, n)) = Header::decode(&e, file_len) else {
        return;
    };
    assert_eq!(h3.encode(), &e[..n]);
    let Ok(ft3) = Footer::decode(&f, &h3, file_len) else {
        return;
    };
    assert_eq!(ft3.encode(h3.hash()), f);
    if let Ok(tr3) = Trailer::decode(&t, &h3, &ft3) {
        assert_eq!(tr3.encode(), t);
        if edited {
            // Every part parsed although one was edited: the edit must have been undone by
            // another, since each part is covered by a hash.
            assert_eq!((&h3, &tr3), (&h, &tr), "an edited file parsed as another");
        }
    }
}
