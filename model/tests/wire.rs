//! Wire codec: byte layouts (snapshots), round trips, and rejection of malformed input.

use rdmig_model::wire::*;

fn hexdump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, row) in bytes.chunks(16).enumerate() {
        s += &format!("{:04x}:", i * 16);
        for b in row {
            s += &format!(" {b:02x}");
        }
        s.push('\n');
    }
    s
}

/// spec: WIRE-3: one snapshot per message type; any change to a layout is a reviewable diff.
#[test]
fn wire_3_every_message_layout_snapshot() {
    let frames = sample_frames();
    let mut codes: Vec<u8> = frames.iter().map(|f| f.msg.code()).collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), 21, "sample set must cover every message type");
    for f in frames {
        let bytes = encode_to_vec(&f).unwrap();
        insta::assert_snapshot!(f.msg.name(), hexdump(&bytes));
    }
}

/// spec: WIRE-5: whatever encodes decodes to the same frame.
#[test]
fn wire_5_roundtrip_every_sample() {
    for f in sample_frames() {
        let bytes = encode_to_vec(&f).unwrap();
        assert!(bytes.len() <= MAX_FRAME_LEN);
        assert_eq!(decode(&bytes).unwrap(), f);
        let h = decode_header(&bytes).unwrap();
        assert_eq!(h.payload_len + HEADER_LEN, bytes.len());
    }
}

/// spec: WIRE-4: every truncation of every valid frame is a typed error.
#[test]
fn wire_4_truncated_frames_are_rejected() {
    for f in sample_frames() {
        let bytes = encode_to_vec(&f).unwrap();
        for n in 0..bytes.len() {
            match decode(&bytes[..n]) {
                Err(WireError::Truncated { .. }) | Err(WireError::LengthMismatch { .. }) => {}
                other => panic!("{} truncated to {n}: {other:?}", f.msg.name()),
            }
        }
        // A shorter declared length with the same bytes is a mismatch inside the payload or
        // trailing bytes, never a panic.
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(WireError::TrailingBytes(1)));
    }
}

/// spec: WIRE-4, WIRE-5: corrupting any byte to any value gives Ok or a typed error; on Ok the
/// encoding is canonical (re-encoding yields the same bytes).
#[test]
fn wire_4_corrupted_frames_decode_or_fail_cleanly() {
    for f in sample_frames() {
        let bytes = encode_to_vec(&f).unwrap();
        for i in 0..bytes.len() {
            for v in [
                0x00,
                0x01,
                0x7f,
                0x80,
                0xff,
                bytes[i] ^ 0x01,
                bytes[i].wrapping_add(1),
            ] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Ok(g) = decode(&b) {
                    assert_eq!(
                        encode_to_vec(&g).unwrap(),
                        b,
                        "non-canonical decode of {}",
                        f.msg.name()
                    );
                }
            }
        }
    }
}

/// spec: WIRE-3: unknown type codes are rejected by the header check.
#[test]
fn wire_3_unknown_type_rejected() {
    for code in [0x00, 0x16, 0x7f, 0xff] {
        assert_eq!(
            decode(&[code, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownType(code))
        );
    }
}

/// spec: WIRE-7: reserved header byte, parameter byte and flags must be zero.
#[test]
fn wire_7_reserved_bytes_must_be_zero() {
    let bytes = encode_to_vec(&Frame {
        credits: 0,
        msg: Message::Nop,
    })
    .unwrap();
    let mut b = bytes.clone();
    b[1] = 1;
    assert_eq!(decode(&b), Err(WireError::Reserved("header")));
    let hello = encode_to_vec(&sample_frames()[0]).unwrap();
    let mut b = hello.clone();
    b[HEADER_LEN + 12 + 2] = 0x80; // unknown flag bit
    assert_eq!(decode(&b), Err(WireError::Reserved("flags")));
    let mut b = hello;
    b[HEADER_LEN + 12 + 7] = 1; // params reserved byte
    assert_eq!(decode(&b), Err(WireError::Reserved("params")));
}

/// spec: WIRE-2: a header declaring more than the maximum payload is rejected before reading it.
#[test]
fn wire_2_oversized_length_rejected_from_header() {
    let mut b = vec![code::DEVICE_STATE, 0, 0, 0];
    b.extend_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
    assert_eq!(
        decode_header(&b),
        Err(WireError::TooLong(MAX_PAYLOAD_LEN + 1))
    );
}

/// spec: WIRE-6: a count beyond its bound, or beyond the bytes present, fails before allocation.
#[test]
fn wire_6_counts_checked_before_allocation() {
    let mut b = vec![code::REG_REQUEST, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0];
    b.extend_from_slice(&(MAX_REG_BATCH as u16 + 1).to_le_bytes());
    assert_eq!(
        decode(&b),
        Err(WireError::OutOfRange {
            field: "chunk_count",
            value: 1025
        })
    );
    let mut b = vec![code::REG_REQUEST, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0];
    b.extend_from_slice(&1000u16.to_le_bytes());
    assert!(matches!(decode(&b), Err(WireError::LengthMismatch { .. })));
    let mut b = vec![code::BLOCK_TABLE, 0, 0, 0, 2, 0, 0, 0];
    b.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        decode(&b),
        Err(WireError::OutOfRange {
            field: "block_count",
            value: 0
        })
    );
}

/// spec: BLK-1: names, lengths and page sizes are bounded on the wire.
#[test]
fn blk_1_block_table_bounds() {
    let enc = |blocks: Vec<BlockDesc>| {
        encode_to_vec(&Frame {
            credits: 0,
            msg: Message::BlockTable { blocks },
        })
    };
    let ok = BlockDesc {
        name: b"ram".to_vec(),
        length: 4096,
        page_log2: 12,
    };
    assert!(enc(vec![ok.clone()]).is_ok());
    assert_eq!(
        enc(vec![BlockDesc {
            name: b"bad name".to_vec(),
            ..ok.clone()
        }]),
        Err(WireError::BadName)
    );
    assert_eq!(
        enc(vec![BlockDesc {
            name: vec![b'a'; 65],
            ..ok.clone()
        }]),
        Err(WireError::BadName)
    );
    assert!(enc(vec![BlockDesc {
        length: 4097,
        ..ok.clone()
    }])
    .is_err());
    assert!(enc(vec![BlockDesc {
        length: MAX_BLOCK_LEN + 4096,
        ..ok.clone()
    }])
    .is_err());
    assert!(enc(vec![BlockDesc {
        page_log2: 11,
        ..ok.clone()
    }])
    .is_err());
    assert!(enc(vec![ok; MAX_BLOCKS + 1]).is_err());
}

/// spec: DATA-3, SW-3, SW-4: ranges and offsets cannot overflow their fields.
#[test]
fn data_3_ranges_and_offsets_bounded() {
    let zero = |first_page, page_count| Message::Zero {
        round: 1,
        ranges: vec![PageRange {
            block: 0,
            first_page,
            page_count,
        }],
    };
    assert!(zero(0, 1).validate().is_ok());
    assert!(zero(0, 0).validate().is_err());
    assert!(zero(u32::MAX, 2).validate().is_err());
    let st = |offset, total_len, n| Message::DeviceState {
        offset,
        total_len,
        data: vec![0; n],
    };
    assert!(st(0, 10, 10).validate().is_ok());
    assert!(st(5, 10, 6).validate().is_err());
    assert!(st(0, MAX_DEVICE_STATE + 1, 1).validate().is_err());
    assert!(st(0, 100_000, MAX_STATE_CHUNK + 1).validate().is_err());
    let dg = Message::Digests {
        first_chunk: u32::MAX,
        digests: vec![1],
    };
    assert!(dg.validate().is_err());
}
