//! Control-channel wire codec (spec: section "Wire format", WIRE-1 .. WIRE-7).
//!
//! Every control message is one frame: an 8-byte header followed by a payload whose layout
//! depends on the type code. All integers are little-endian, fields are packed with no
//! implicit padding, and explicit reserved bytes must be zero. Decoding is total: any byte
//! string yields either a message or a [`WireError`]; it never panics and never allocates
//! more than [`MAX_FRAME_LEN`] bytes' worth of entries, because every count is bounded before
//! anything is allocated.

use thiserror::Error;

/// Protocol version this build speaks (spec: HS-1).
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes in the frame header (spec: WIRE-1).
pub const HEADER_LEN: usize = 8;
/// Largest frame, header included; receive buffers are this size (spec: WIRE-2).
pub const MAX_FRAME_LEN: usize = 65_536;
/// Largest payload.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;
/// Blocks in one RAM block table (spec: BLK-1).
pub const MAX_BLOCKS: usize = 64;
/// Longest block name in bytes (spec: BLK-1).
pub const MAX_NAME_LEN: usize = 64;
/// Chunks in one REG_REQUEST or UNREG_REQUEST (spec: REG-2).
pub const MAX_REG_BATCH: usize = 1024;
/// Page ranges in one ZERO message (spec: DATA-3).
pub const MAX_ZERO_RANGES: usize = 2048;
/// Device-state bytes in one DEVICE_STATE message (spec: SW-3).
pub const MAX_STATE_CHUNK: usize = 32_768;
/// Largest device-state blob sent on the control channel (spec: SW-3).
pub const MAX_DEVICE_STATE: u32 = 64 << 20;
/// Largest state area: device state carried over the data channels (spec: STATE-1).
pub const MAX_STATE_AREA: u64 = 1 << 40;
/// The state area's page size, as log2 of bytes; its length is a multiple of it (spec: STATE-1).
pub const STATE_PAGE_LOG2: u8 = 12;
/// Digests in one DIGESTS message (spec: SW-4).
pub const MAX_DIGEST_BATCH: usize = 4096;
/// Smallest and largest chunk size, as log2 of bytes (spec: HS-3).
pub const MIN_CHUNK_LOG2: u8 = 12;
pub const MAX_CHUNK_LOG2: u8 = 30;
/// Smallest and largest page size, as log2 of bytes (spec: BLK-1).
pub const MIN_PAGE_LOG2: u8 = 12;
pub const MAX_PAGE_LOG2: u8 = 30;
/// Largest block: 16 TiB (spec: BLK-1).
pub const MAX_BLOCK_LEN: u64 = 1 << 44;
/// Most data channels (spec: HS-3).
pub const MAX_CHANNELS: u8 = 16;
/// Bounds on a side's control receive window (spec: FC-1).
pub const MIN_CREDIT_WINDOW: u16 = 4;
pub const MAX_CREDIT_WINDOW: u16 = 1024;
/// Bounds on registration requests in flight (spec: REG-2).
pub const MAX_REG_INFLIGHT: u8 = 16;
/// Length of nonces and MACs (spec: AUTH-1).
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;

/// Type codes (spec: WIRE-3).
pub mod code {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const AUTH: u8 = 0x03;
    pub const BLOCK_TABLE: u8 = 0x04;
    pub const BLOCK_TABLE_ACK: u8 = 0x05;
    pub const REG_REQUEST: u8 = 0x06;
    pub const REG_RESULT: u8 = 0x07;
    pub const UNREG_REQUEST: u8 = 0x08;
    pub const UNREG_DONE: u8 = 0x09;
    pub const ZERO: u8 = 0x0A;
    pub const ROUND_END: u8 = 0x0B;
    pub const ROUND_ACK: u8 = 0x0C;
    pub const DEVICE_STATE: u8 = 0x0D;
    pub const DIGESTS: u8 = 0x0E;
    pub const PREPARE: u8 = 0x0F;
    pub const PREPARED: u8 = 0x10;
    pub const COMMIT: u8 = 0x11;
    pub const STARTED: u8 = 0x12;
    pub const ABORT: u8 = 0x13;
    pub const NOP: u8 = 0x14;
    pub const STATE_PLACED: u8 = 0x15;
}

/// Why a byte string is not a valid frame. One variant per cause, so tests and fuzz oracles
/// can assert the exact rejection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("frame shorter than its header or declared length ({have} < {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("{0} bytes after the declared payload")]
    TrailingBytes(usize),
    #[error("declared payload length {0} exceeds the maximum")]
    TooLong(usize),
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("reserved field is not zero in {0}")]
    Reserved(&'static str),
    #[error("field {field} out of range: {value}")]
    OutOfRange { field: &'static str, value: u64 },
    #[error("payload length {have} does not match the {need} bytes its fields declare")]
    LengthMismatch { have: usize, need: usize },
    #[error("block name is not 1..=64 bytes of [A-Za-z0-9._:/-]")]
    BadName,
}

/// Registration mode (spec: REG-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum RegMode {
    /// Chunks are registered on demand, in batches, under the destination's pin budget.
    Dynamic = 0,
    /// Every block is registered whole at setup.
    PinAll = 1,
}

/// Digest algorithm for end-of-migration verification (spec: SW-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum DigestAlg {
    None = 0,
    /// xxh3-64 of each chunk's bytes.
    Xxh3_64 = 1,
    /// xxh3-64 of each chunk's pages' xxh3-64 hashes (little-endian, in page order): equal
    /// bytes give equal digests as with `Xxh3_64`, and a side that keeps page hashes current
    /// digests only the pages written since (spec: SW-4).
    Xxh3PageTree = 2,
}

/// Authentication mode (spec: AUTH-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AuthMode {
    /// No key: chosen explicitly by both operators, never a default (spec: AUTH-4).
    Insecure = 0,
    HmacSha256 = 1,
}

/// Capability flags (spec: HS-3).
pub mod flag {
    /// Pages that are entirely zero travel as ZERO ranges instead of data.
    pub const ZERO_ELISION: u8 = 0x01;
    pub const ALL: u8 = ZERO_ELISION;
}

/// Negotiable parameters, proposed in HELLO and echoed (possibly narrowed) in HELLO_ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Params {
    pub chunk_log2: u8,
    pub mode: RegMode,
    pub flags: u8,
    pub channels: u8,
    pub digest: DigestAlg,
    pub auth: AuthMode,
    pub max_reg_inflight: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub session_id: u64,
    pub params: Params,
    /// Control messages the source can receive at once (its posted receive buffers).
    pub credit_window: u16,
    pub nonce: [u8; NONCE_LEN],
    /// Largest device state the source may send over the data channels; 0 = none, the
    /// device state travels on the control channel (spec: STATE-1).
    pub state_max: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HelloAck {
    pub version: u16,
    pub session_id: u64,
    pub params: Params,
    pub credit_window: u16,
    /// Most bytes the destination will keep registered at once (spec: REG-4).
    pub pin_budget: u64,
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
    /// The state area the destination holds for this session, at most `state_max`; 0 = the
    /// device state travels on the control channel (spec: STATE-1).
    pub state_capacity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct BlockDesc {
    pub name: Vec<u8>,
    pub length: u64,
    pub page_log2: u8,
}

/// The index of the block called `name` in `blocks` (spec: BLK-2: tables match by name,
/// not by position).
pub fn block_index(blocks: &[BlockDesc], name: &[u8]) -> Option<usize> {
    blocks.iter().position(|b| b.name == name)
}

/// One chunk, named by block index and chunk index within the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChunkRef {
    pub block: u16,
    pub chunk: u32,
}

/// A run of pages in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PageRange {
    pub block: u16,
    pub first_page: u32,
    pub page_count: u32,
}

/// Typed reason carried by ABORT (spec: ERR-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AbortReason {
    Cancelled = 1,
    ProtocolViolation = 2,
    Incompatible = 3,
    AuthFailed = 4,
    BlockMismatch = 5,
    RegistrationFailed = 6,
    PinBudget = 7,
    Timeout = 8,
    TransportFailed = 9,
    DigestMismatch = 10,
    NotConverged = 11,
    LocalError = 12,
    WorkloadFailed = 13,
}

impl AbortReason {
    fn from_u16(v: u16) -> Option<Self> {
        use AbortReason::*;
        Some(match v {
            1 => Cancelled,
            2 => ProtocolViolation,
            3 => Incompatible,
            4 => AuthFailed,
            5 => BlockMismatch,
            6 => RegistrationFailed,
            7 => PinBudget,
            8 => Timeout,
            9 => TransportFailed,
            10 => DigestMismatch,
            11 => NotConverged,
            12 => LocalError,
            13 => WorkloadFailed,
            _ => return None,
        })
    }
}

/// Every control message (spec: WIRE-3 lists the codes and directions).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    Auth {
        mac: [u8; MAC_LEN],
    },
    BlockTable {
        blocks: Vec<BlockDesc>,
    },
    /// One remote key per block (then one for the state area, if any): the whole-block
    /// registration in pin-all mode, 0 in dynamic mode.
    BlockTableAck {
        rkeys: Vec<u32>,
    },
    RegRequest {
        req_id: u32,
        chunks: Vec<ChunkRef>,
    },
    /// One remote key per requested chunk, in request order.
    RegResult {
        req_id: u32,
        rkeys: Vec<u32>,
    },
    UnregRequest {
        req_id: u32,
        chunks: Vec<ChunkRef>,
    },
    UnregDone {
        req_id: u32,
        count: u16,
    },
    Zero {
        round: u32,
        ranges: Vec<PageRange>,
    },
    RoundEnd {
        round: u32,
        last: bool,
        data_bytes: u64,
        zero_pages: u64,
    },
    RoundAck {
        round: u32,
    },
    DeviceState {
        offset: u32,
        total_len: u32,
        data: Vec<u8>,
    },
    Digests {
        first_chunk: u32,
        digests: Vec<u64>,
    },
    Prepare {
        state_len: u64,
        digest_count: u32,
        /// XXH3-64 of the device state's bytes when digests are negotiated, else 0.
        state_digest: u64,
    },
    Prepared,
    Commit,
    Started,
    Abort {
        reason: AbortReason,
    },
    Nop,
    /// The first `placed` bytes of the device state are in the destination's state area
    /// (spec: STATE-3).
    StatePlaced {
        placed: u64,
    },
}

/// A message plus the credit grant every frame carries (spec: FC-2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Frame {
    pub credits: u16,
    pub msg: Message,
}

impl Message {
    pub fn code(&self) -> u8 {
        use Message::*;
        match self {
            Hello(_) => code::HELLO,
            HelloAck(_) => code::HELLO_ACK,
            Auth { .. } => code::AUTH,
            BlockTable { .. } => code::BLOCK_TABLE,
            BlockTableAck { .. } => code::BLOCK_TABLE_ACK,
            RegRequest { .. } => code::REG_REQUEST,
            RegResult { .. } => code::REG_RESULT,
            UnregRequest { .. } => code::UNREG_REQUEST,
            UnregDone { .. } => code::UNREG_DONE,
            Zero { .. } => code::ZERO,
            RoundEnd { .. } => code::ROUND_END,
            RoundAck { .. } => code::ROUND_ACK,
            DeviceState { .. } => code::DEVICE_STATE,
            Digests { .. } => code::DIGESTS,
            Prepare { .. } => code::PREPARE,
            Prepared => code::PREPARED,
            Commit => code::COMMIT,
            Started => code::STARTED,
            Abort { .. } => code::ABORT,
            Nop => code::NOP,
            StatePlaced { .. } => code::STATE_PLACED,
        }
    }

    /// Short upper-case name as used in the spec.
    pub fn name(&self) -> &'static str {
        code_name(self.code()).unwrap_or("?")
    }

    /// Checks every field against the spec's bounds; encoding and decoding both apply it, so
    /// anything that encodes also decodes (spec: WIRE-5). One arm per message type, in the
    /// order of spec section 2.4, so each arm reads against its layout table: its length is
    /// the number of messages, not nesting.
    pub fn validate(&self) -> Result<(), WireError> {
        use Message::*;
        match self {
            Hello(h) => {
                range("version_min", h.version_min as u64, 1, u16::MAX as u64)?;
                range(
                    "version_max",
                    h.version_max as u64,
                    h.version_min as u64,
                    u16::MAX as u64,
                )?;
                validate_params(&h.params)?;
                range(
                    "credit_window",
                    h.credit_window as u64,
                    MIN_CREDIT_WINDOW as u64,
                    MAX_CREDIT_WINDOW as u64,
                )?;
                state_area("state_max", h.state_max)
            }
            HelloAck(a) => {
                range("version", a.version as u64, 1, u16::MAX as u64)?;
                validate_params(&a.params)?;
                range(
                    "credit_window",
                    a.credit_window as u64,
                    MIN_CREDIT_WINDOW as u64,
                    MAX_CREDIT_WINDOW as u64,
                )?;
                state_area("state_capacity", a.state_capacity)
            }
            Auth { .. } | Prepared | Commit | Started | Nop | Abort { .. } => Ok(()),
            BlockTable { blocks } => {
                range("block_count", blocks.len() as u64, 1, MAX_BLOCKS as u64)?;
                for b in blocks {
                    if !valid_name(&b.name) {
                        return Err(WireError::BadName);
                    }
                    range(
                        "page_log2",
                        b.page_log2 as u64,
                        MIN_PAGE_LOG2 as u64,
                        MAX_PAGE_LOG2 as u64,
                    )?;
                    range("block_length", b.length, 1, MAX_BLOCK_LEN)?;
                    if b.length & ((1u64 << b.page_log2) - 1) != 0 {
                        return Err(WireError::OutOfRange {
                            field: "block_length",
                            value: b.length,
                        });
                    }
                }
                Ok(())
            }
            BlockTableAck { rkeys } => {
                range("block_count", rkeys.len() as u64, 1, MAX_BLOCKS as u64 + 1)
            }
            RegRequest { chunks, .. } | UnregRequest { chunks, .. } => {
                range("chunk_count", chunks.len() as u64, 1, MAX_REG_BATCH as u64)
            }
            RegResult { rkeys, .. } => {
                range("chunk_count", rkeys.len() as u64, 1, MAX_REG_BATCH as u64)
            }
            UnregDone { count, .. } => range("chunk_count", *count as u64, 1, MAX_REG_BATCH as u64),
            Zero { ranges, .. } => {
                range(
                    "range_count",
                    ranges.len() as u64,
                    1,
                    MAX_ZERO_RANGES as u64,
                )?;
                for r in ranges {
                    range("page_count", r.page_count as u64, 1, u32::MAX as u64)?;
                    range(
                        "first_page",
                        r.first_page as u64 + r.page_count as u64,
                        1,
                        u32::MAX as u64 + 1,
                    )?;
                }
                Ok(())
            }
            RoundEnd { .. } | RoundAck { .. } => Ok(()),
            DeviceState {
                offset,
                total_len,
                data,
            } => {
                range("total_len", *total_len as u64, 1, MAX_DEVICE_STATE as u64)?;
                range("data_len", data.len() as u64, 1, MAX_STATE_CHUNK as u64)?;
                range(
                    "offset",
                    *offset as u64 + data.len() as u64,
                    1,
                    *total_len as u64,
                )
            }
            Digests {
                digests,
                first_chunk,
            } => {
                range(
                    "digest_count",
                    digests.len() as u64,
                    1,
                    MAX_DIGEST_BATCH as u64,
                )?;
                range(
                    "first_chunk",
                    *first_chunk as u64 + digests.len() as u64,
                    1,
                    u32::MAX as u64,
                )
            }
            Prepare { state_len, .. } => range("state_len", *state_len, 0, MAX_STATE_AREA),
            StatePlaced { placed } => range("placed", *placed, 1, MAX_STATE_AREA),
        }
    }
}

/// Name of a type code, for traces and error messages.
pub fn code_name(c: u8) -> Option<&'static str> {
    Some(match c {
        code::HELLO => "HELLO",
        code::HELLO_ACK => "HELLO_ACK",
        code::AUTH => "AUTH",
        code::BLOCK_TABLE => "BLOCK_TABLE",
        code::BLOCK_TABLE_ACK => "BLOCK_TABLE_ACK",
        code::REG_REQUEST => "REG_REQUEST",
        code::REG_RESULT => "REG_RESULT",
        code::UNREG_REQUEST => "UNREG_REQUEST",
        code::UNREG_DONE => "UNREG_DONE",
        code::ZERO => "ZERO",
        code::ROUND_END => "ROUND_END",
        code::ROUND_ACK => "ROUND_ACK",
        code::DEVICE_STATE => "DEVICE_STATE",
        code::DIGESTS => "DIGESTS",
        code::PREPARE => "PREPARE",
        code::PREPARED => "PREPARED",
        code::COMMIT => "COMMIT",
        code::STARTED => "STARTED",
        code::ABORT => "ABORT",
        code::NOP => "NOP",
        code::STATE_PLACED => "STATE_PLACED",
        _ => return None,
    })
}

fn range(field: &'static str, value: u64, lo: u64, hi: u64) -> Result<(), WireError> {
    if value < lo || value > hi {
        Err(WireError::OutOfRange { field, value })
    } else {
        Ok(())
    }
}

/// A state area length: at most `MAX_STATE_AREA`, whole state pages (spec: STATE-1).
fn state_area(field: &'static str, len: u64) -> Result<(), WireError> {
    range(field, len, 0, MAX_STATE_AREA)?;
    if len & ((1u64 << STATE_PAGE_LOG2) - 1) != 0 {
        return Err(WireError::OutOfRange { field, value: len });
    }
    Ok(())
}

fn validate_params(p: &Params) -> Result<(), WireError> {
    range(
        "chunk_log2",
        p.chunk_log2 as u64,
        MIN_CHUNK_LOG2 as u64,
        MAX_CHUNK_LOG2 as u64,
    )?;
    if p.flags & !flag::ALL != 0 {
        return Err(WireError::Reserved("flags"));
    }
    range("channels", p.channels as u64, 1, MAX_CHANNELS as u64)?;
    range(
        "max_reg_inflight",
        p.max_reg_inflight as u64,
        1,
        MAX_REG_INFLIGHT as u64,
    )
}

/// Block names are short printable identifiers so they are safe to log and to match
/// (spec: BLK-1).
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'/' | b'-'))
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends the encoded frame to `out`. Fails only if the message violates a spec bound, which
/// is a bug in the caller.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    frame.msg.validate()?;
    let start = out.len();
    out.extend_from_slice(&[frame.msg.code(), 0]);
    out.extend_from_slice(&frame.credits.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // payload length, patched below
    encode_payload(&frame.msg, out);
    let payload = out.len() - start - HEADER_LEN;
    if payload > MAX_PAYLOAD_LEN {
        out.truncate(start);
        return Err(WireError::TooLong(payload));
    }
    out[start + 4..start + 8].copy_from_slice(&(payload as u32).to_le_bytes());
    Ok(())
}

/// Encodes a frame into a fresh buffer.
pub fn encode_to_vec(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut v = Vec::new();
    encode(frame, &mut v)?;
    Ok(v)
}

fn put_params(p: &Params, out: &mut Vec<u8>) {
    out.extend_from_slice(&[
        p.chunk_log2,
        p.mode as u8,
        p.flags,
        p.channels,
        p.digest as u8,
        p.auth as u8,
        p.max_reg_inflight,
        0,
    ]);
}

fn put_chunks(chunks: &[ChunkRef], out: &mut Vec<u8>) {
    out.extend_from_slice(&(chunks.len() as u16).to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&c.block.to_le_bytes());
        out.extend_from_slice(&c.chunk.to_le_bytes());
    }
}

/// Encodes a message's payload. One arm per message type, in the order of spec section 2.4
/// (the same order as `decode_payload`): its length is the number of messages, not nesting.
fn encode_payload(msg: &Message, out: &mut Vec<u8>) {
    use Message::*;
    match msg {
        Hello(h) => {
            out.extend_from_slice(&h.version_min.to_le_bytes());
            out.extend_from_slice(&h.version_max.to_le_bytes());
            out.extend_from_slice(&h.session_id.to_le_bytes());
            put_params(&h.params, out);
            out.extend_from_slice(&h.credit_window.to_le_bytes());
            out.extend_from_slice(&h.nonce);
            out.extend_from_slice(&h.state_max.to_le_bytes());
        }
        HelloAck(a) => {
            out.extend_from_slice(&a.version.to_le_bytes());
            out.extend_from_slice(&a.session_id.to_le_bytes());
            put_params(&a.params, out);
            out.extend_from_slice(&a.credit_window.to_le_bytes());
            out.extend_from_slice(&a.pin_budget.to_le_bytes());
            out.extend_from_slice(&a.nonce);
            out.extend_from_slice(&a.mac);
            out.extend_from_slice(&a.state_capacity.to_le_bytes());
        }
        Auth { mac } => out.extend_from_slice(mac),
        BlockTable { blocks } => {
            out.extend_from_slice(&(blocks.len() as u16).to_le_bytes());
            for b in blocks {
                out.push(b.name.len() as u8);
                out.extend_from_slice(&b.name);
                out.extend_from_slice(&b.length.to_le_bytes());
                out.push(b.page_log2);
            }
        }
        BlockTableAck { rkeys } | RegResult { rkeys, .. } => {
            if let RegResult { req_id, .. } = msg {
                out.extend_from_slice(&req_id.to_le_bytes());
            }
            out.extend_from_slice(&(rkeys.len() as u16).to_le_bytes());
            for k in rkeys {
                out.extend_from_slice(&k.to_le_bytes());
            }
        }
        RegRequest { req_id, chunks } | UnregRequest { req_id, chunks } => {
            out.extend_from_slice(&req_id.to_le_bytes());
            put_chunks(chunks, out);
        }
        UnregDone { req_id, count } => {
            out.extend_from_slice(&req_id.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Zero { round, ranges } => {
            out.extend_from_slice(&round.to_le_bytes());
            out.extend_from_slice(&(ranges.len() as u16).to_le_bytes());
            for r in ranges {
                out.extend_from_slice(&r.block.to_le_bytes());
                out.extend_from_slice(&r.first_page.to_le_bytes());
                out.extend_from_slice(&r.page_count.to_le_bytes());
            }
        }
        RoundEnd {
            round,
            last,
            data_bytes,
            zero_pages,
        } => {
            out.extend_from_slice(&round.to_le_bytes());
            out.extend_from_slice(&[*last as u8, 0, 0, 0]);
            out.extend_from_slice(&data_bytes.to_le_bytes());
            out.extend_from_slice(&zero_pages.to_le_bytes());
        }
        RoundAck { round } => out.extend_from_slice(&round.to_le_bytes()),
        DeviceState {
            offset,
            total_len,
            data,
        } => {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&total_len.to_le_bytes());
            out.extend_from_slice(data);
        }
        Digests {
            first_chunk,
            digests,
        } => {
            out.extend_from_slice(&first_chunk.to_le_bytes());
            out.extend_from_slice(&(digests.len() as u16).to_le_bytes());
            for d in digests {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        Prepare {
            state_len,
            digest_count,
            state_digest,
        } => {
            out.extend_from_slice(&state_len.to_le_bytes());
            out.extend_from_slice(&digest_count.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&state_digest.to_le_bytes());
        }
        StatePlaced { placed } => out.extend_from_slice(&placed.to_le_bytes()),
        Abort { reason } => out.extend_from_slice(&(*reason as u16).to_le_bytes()),
        Prepared | Commit | Started | Nop => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Data channels (spec: AUTH-6, "Transport")

/// Bytes of DATA_HELLO, the first thing a data channel sends (both bindings).
pub const DATA_HELLO_LEN: usize = 56;
/// Magic that opens DATA_HELLO; a connection whose first bytes are not a control frame header
/// starts with it.
pub const DATA_HELLO_MAGIC: [u8; 8] = *b"RDMGDATA";
/// What the destination answers on a data connection it admitted (TCP binding), before
/// anything else on that connection.
pub const DATA_JOIN_ACK: [u8; 8] = *b"RDMGJOIN";

/// A data channel's request to join a session: DATA_HELLO {magic, session id u64 LE, channel
/// u8, 7 reserved zero bytes, token (32)} (spec: AUTH-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DataHello {
    pub session_id: u64,
    pub channel: u8,
    pub token: [u8; MAC_LEN],
}

impl DataHello {
    pub fn encode(&self) -> [u8; DATA_HELLO_LEN] {
        let mut b = [0u8; DATA_HELLO_LEN];
        b[..8].copy_from_slice(&DATA_HELLO_MAGIC);
        b[8..16].copy_from_slice(&self.session_id.to_le_bytes());
        b[16] = self.channel;
        b[24..56].copy_from_slice(&self.token);
        b
    }

    /// Decodes DATA_HELLO; a wrong magic or non-zero reserved bytes are rejected.
    pub fn decode(b: &[u8; DATA_HELLO_LEN]) -> Result<DataHello, WireError> {
        if b[..8] != DATA_HELLO_MAGIC {
            return Err(WireError::OutOfRange {
                field: "data_hello_magic",
                value: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            });
        }
        if b[17..24] != [0; 7] {
            return Err(WireError::Reserved("data_hello"));
        }
        Ok(DataHello {
            session_id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            channel: b[16],
            token: b[24..56].try_into().expect("32 bytes"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// The fixed header, decoded on its own so stream transports know how much payload to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub code: u8,
    pub credits: u16,
    pub payload_len: usize,
}

/// Decodes and checks a frame header (spec: WIRE-1, WIRE-2).
pub fn decode_header(buf: &[u8]) -> Result<Header, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            have: buf.len(),
            need: HEADER_LEN,
        });
    }
    let code = buf[0];
    if code_name(code).is_none() {
        return Err(WireError::UnknownType(code));
    }
    if buf[1] != 0 {
        return Err(WireError::Reserved("header"));
    }
    let credits = u16::from_le_bytes([buf[2], buf[3]]);
    let payload_len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(WireError::TooLong(payload_len));
    }
    Ok(Header {
        code,
        credits,
        payload_len,
    })
}

/// Decodes exactly one frame occupying all of `buf` (spec: WIRE-4).
pub fn decode(buf: &[u8]) -> Result<Frame, WireError> {
    let h = decode_header(buf)?;
    let need = HEADER_LEN + h.payload_len;
    if buf.len() < need {
        return Err(WireError::Truncated {
            have: buf.len(),
            need,
        });
    }
    if buf.len() > need {
        return Err(WireError::TrailingBytes(buf.len() - need));
    }
    let msg = decode_payload(h.code, &buf[HEADER_LEN..])?;
    msg.validate()?;
    Ok(Frame {
        credits: h.credits,
        msg,
    })
}

/// Bounds-checked cursor over a payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(WireError::LengthMismatch {
                have: self.buf.len(),
                need: self.pos + n,
            }),
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// A count field, checked against its bound and against the bytes left before anything
    /// is allocated (spec: WIRE-6).
    fn count(
        &mut self,
        field: &'static str,
        max: usize,
        entry_len: usize,
    ) -> Result<usize, WireError> {
        let n = self.u16()? as usize;
        range(field, n as u64, 1, max as u64)?;
        let need = self.pos + n * entry_len;
        if need > self.buf.len() {
            return Err(WireError::LengthMismatch {
                have: self.buf.len(),
                need,
            });
        }
        Ok(n)
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.pos != self.buf.len() {
            return Err(WireError::LengthMismatch {
                have: self.buf.len(),
                need: self.pos,
            });
        }
        Ok(())
    }
}

fn get_params(r: &mut Reader) -> Result<Params, WireError> {
    let chunk_log2 = r.u8()?;
    let mode = match r.u8()? {
        0 => RegMode::Dynamic,
        1 => RegMode::PinAll,
        v => {
            return Err(WireError::OutOfRange {
                field: "mode",
                value: v as u64,
            })
        }
    };
    let flags = r.u8()?;
    let channels = r.u8()?;
    let digest = match r.u8()? {
        0 => DigestAlg::None,
        1 => DigestAlg::Xxh3_64,
        2 => DigestAlg::Xxh3PageTree,
        v => {
            return Err(WireError::OutOfRange {
                field: "digest",
                value: v as u64,
            })
        }
    };
    let auth = match r.u8()? {
        0 => AuthMode::Insecure,
        1 => AuthMode::HmacSha256,
        v => {
            return Err(WireError::OutOfRange {
                field: "auth",
                value: v as u64,
            })
        }
    };
    let max_reg_inflight = r.u8()?;
    if r.u8()? != 0 {
        return Err(WireError::Reserved("params"));
    }
    Ok(Params {
        chunk_log2,
        mode,
        flags,
        channels,
        digest,
        auth,
        max_reg_inflight,
    })
}

fn get_chunks(r: &mut Reader) -> Result<Vec<ChunkRef>, WireError> {
    let n = r.count("chunk_count", MAX_REG_BATCH, 6)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(ChunkRef {
            block: r.u16()?,
            chunk: r.u32()?,
        });
    }
    Ok(v)
}

fn get_rkeys(r: &mut Reader, max: usize) -> Result<Vec<u32>, WireError> {
    let n = r.count("count", max, 4)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(r.u32()?);
    }
    Ok(v)
}

/// Decodes the payload of a frame of type `code`. One arm per message type, in the order of
/// spec section 2.4 (the same order as `encode_payload`), so each arm reads against its layout
/// table: its length is the number of messages, not nesting.
fn decode_payload(code: u8, payload: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let msg = match code {
        code::HELLO => Message::Hello(Hello {
            version_min: r.u16()?,
            version_max: r.u16()?,
            session_id: r.u64()?,
            params: get_params(&mut r)?,
            credit_window: r.u16()?,
            nonce: r.array()?,
            state_max: r.u64()?,
        }),
        code::HELLO_ACK => Message::HelloAck(HelloAck {
            version: r.u16()?,
            session_id: r.u64()?,
            params: get_params(&mut r)?,
            credit_window: r.u16()?,
            pin_budget: r.u64()?,
            nonce: r.array()?,
            mac: r.array()?,
            state_capacity: r.u64()?,
        }),
        code::AUTH => Message::Auth { mac: r.array()? },
        code::BLOCK_TABLE => {
            let n = r.count("block_count", MAX_BLOCKS, 10)?;
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.u8()? as usize;
                let name = r.take(len)?;
                if !valid_name(name) {
                    return Err(WireError::BadName);
                }
                blocks.push(BlockDesc {
                    name: name.to_vec(),
                    length: r.u64()?,
                    page_log2: r.u8()?,
                });
            }
            Message::BlockTable { blocks }
        }
        code::BLOCK_TABLE_ACK => Message::BlockTableAck {
            rkeys: get_rkeys(&mut r, MAX_BLOCKS + 1)?,
        },
        code::REG_REQUEST => Message::RegRequest {
            req_id: r.u32()?,
            chunks: get_chunks(&mut r)?,
        },
        code::REG_RESULT => Message::RegResult {
            req_id: r.u32()?,
            rkeys: get_rkeys(&mut r, MAX_REG_BATCH)?,
        },
        code::UNREG_REQUEST => Message::UnregRequest {
            req_id: r.u32()?,
            chunks: get_chunks(&mut r)?,
        },
        code::UNREG_DONE => Message::UnregDone {
            req_id: r.u32()?,
            count: r.u16()?,
        },
        code::ZERO => {
            let round = r.u32()?;
            let n = r.count("range_count", MAX_ZERO_RANGES, 10)?;
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                ranges.push(PageRange {
                    block: r.u16()?,
                    first_page: r.u32()?,
                    page_count: r.u32()?,
                });
            }
            Message::Zero { round, ranges }
        }
        code::ROUND_END => {
            let round = r.u32()?;
            let last = match r.u8()? {
                0 => false,
                1 => true,
                v => {
                    return Err(WireError::OutOfRange {
                        field: "last",
                        value: v as u64,
                    })
                }
            };
            if r.take(3)? != [0, 0, 0] {
                return Err(WireError::Reserved("ROUND_END"));
            }
            Message::RoundEnd {
                round,
                last,
                data_bytes: r.u64()?,
                zero_pages: r.u64()?,
            }
        }
        code::ROUND_ACK => Message::RoundAck { round: r.u32()? },
        code::DEVICE_STATE => {
            let offset = r.u32()?;
            let total_len = r.u32()?;
            let rest = payload.len() - r.pos;
            range("data_len", rest as u64, 1, MAX_STATE_CHUNK as u64)?;
            let data = r.take(rest)?.to_vec();
            Message::DeviceState {
                offset,
                total_len,
                data,
            }
        }
        code::DIGESTS => {
            let first_chunk = r.u32()?;
            let n = r.count("digest_count", MAX_DIGEST_BATCH, 8)?;
            let mut digests = Vec::with_capacity(n);
            for _ in 0..n {
                digests.push(r.u64()?);
            }
            Message::Digests {
                first_chunk,
                digests,
            }
        }
        code::PREPARE => {
            let state_len = r.u64()?;
            let digest_count = r.u32()?;
            if r.take(4)? != [0; 4] {
                return Err(WireError::Reserved("PREPARE"));
            }
            Message::Prepare {
                state_len,
                digest_count,
                state_digest: r.u64()?,
            }
        }
        code::PREPARED => Message::Prepared,
        code::COMMIT => Message::Commit,
        code::STARTED => Message::Started,
        code::ABORT => {
            let v = r.u16()?;
            let reason = AbortReason::from_u16(v).ok_or(WireError::OutOfRange {
                field: "reason",
                value: v as u64,
            })?;
            Message::Abort { reason }
        }
        code::NOP => Message::Nop,
        code::STATE_PLACED => Message::StatePlaced { placed: r.u64()? },
        other => return Err(WireError::UnknownType(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// One frame of every message type with representative field values: the reference set for
/// the byte-layout snapshots in tests and for fuzzing seed corpora. A flat list, one entry
/// per message type.
pub fn sample_frames() -> Vec<Frame> {
    let params = Params {
        chunk_log2: 20,
        mode: RegMode::Dynamic,
        flags: flag::ZERO_ELISION,
        channels: 2,
        digest: DigestAlg::Xxh3_64,
        auth: AuthMode::HmacSha256,
        max_reg_inflight: 4,
    };
    let msgs = vec![
        Message::Hello(Hello {
            version_min: 1,
            version_max: 1,
            session_id: 0x0123_4567_89ab_cdef,
            params,
            credit_window: 64,
            nonce: [0x11; NONCE_LEN],
            state_max: 1 << 30,
        }),
        Message::HelloAck(HelloAck {
            version: 1,
            session_id: 0x0123_4567_89ab_cdef,
            params,
            credit_window: 32,
            pin_budget: 1 << 30,
            nonce: [0x22; NONCE_LEN],
            mac: [0x33; MAC_LEN],
            state_capacity: 256 << 20,
        }),
        Message::Auth {
            mac: [0x44; MAC_LEN],
        },
        Message::BlockTable {
            blocks: vec![
                BlockDesc {
                    name: b"pc.ram".to_vec(),
                    length: 1 << 30,
                    page_log2: 12,
                },
                BlockDesc {
                    name: b"vga.vram".to_vec(),
                    length: 16 << 20,
                    page_log2: 21,
                },
            ],
        },
        Message::BlockTableAck {
            rkeys: vec![0x1000, 0x2000],
        },
        Message::RegRequest {
            req_id: 1,
            chunks: vec![
                ChunkRef { block: 0, chunk: 0 },
                ChunkRef {
                    block: 0,
                    chunk: 1023,
                },
            ],
        },
        Message::RegResult {
            req_id: 1,
            rkeys: vec![0xdead_beef, 0x0bad_cafe],
        },
        Message::UnregRequest {
            req_id: 1,
            chunks: vec![ChunkRef { block: 1, chunk: 7 }],
        },
        Message::UnregDone {
            req_id: 1,
            count: 1,
        },
        Message::Zero {
            round: 2,
            ranges: vec![PageRange {
                block: 0,
                first_page: 256,
                page_count: 512,
            }],
        },
        Message::RoundEnd {
            round: 2,
            last: true,
            data_bytes: 123_456_789,
            zero_pages: 512,
        },
        Message::RoundAck { round: 2 },
        Message::DeviceState {
            offset: 32_768,
            total_len: 40_000,
            data: vec![0xab; 16],
        },
        Message::Digests {
            first_chunk: 4096,
            digests: vec![0x0102_0304_0506_0708, u64::MAX],
        },
        Message::Prepare {
            state_len: 40_000,
            digest_count: 1040,
            state_digest: 0x0123_4567_89ab_cdef,
        },
        Message::Prepared,
        Message::Commit,
        Message::Started,
        Message::Abort {
            reason: AbortReason::DigestMismatch,
        },
        Message::Nop,
        Message::StatePlaced { placed: 8 << 20 },
    ];
    msgs.into_iter()
        .enumerate()
        .map(|(i, msg)| Frame {
            credits: i as u16,
            msg,
        })
        .collect()
}
