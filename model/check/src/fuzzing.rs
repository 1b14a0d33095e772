//! Fuzz target bodies with their oracles. The cargo-fuzz targets in `fuzz/` are one-line calls
//! into these, and `cargo test` replays the checked-in corpora and crash inputs through the
//! same functions, so a regression is caught without a fuzzer installed.
//!
//! Every function panics when the machine misbehaves: a panic inside a machine, a command that
//! would touch memory outside what was declared or registered, a budget overrun, or a rejected
//! message that does not end the session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};

use crate::pair::{Guest, Pair};
use rdmig_model::destination::{DestConfig, Destination, DstCommand, DstInput, DstTimer};
use rdmig_model::listener::{ConnId, Listener, ListenerConfig, LsnCommand, LsnInput, LsnTimer};
use rdmig_model::source::{Source, SourceConfig, SrcCommand, SrcInput, SrcTimer};
use rdmig_model::table::{DstPhase, SrcPhase};
use rdmig_model::types::*;
use rdmig_model::wire::{self, BlockDesc, DataHello, Frame, Message, RegMode};
use rdmig_model::{auth, Geometry, PageBitmap};

const KEY: &[u8] = b"fuzzing key";

/// Most events one session input drives.
const MAX_EVENTS: usize = 256;

/// The small memory every session target uses: two blocks, 16 KiB chunks.
pub fn blocks() -> Vec<BlockDesc> {
    vec![
        BlockDesc {
            name: b"ram0".to_vec(),
            length: 96 << 10,
            page_log2: 12,
        },
        BlockDesc {
            name: b"ram1".to_vec(),
            length: 40 << 10,
            page_log2: 12,
        },
    ]
}

/// The state area of the dynamic-mode sessions (spec: STATE-1); pin-all sessions send their
/// device state on the control channel, so the recordings cover both paths.
pub const STATE_AREA: u64 = 32 << 10;

fn configs(mode: RegMode) -> (SourceConfig, DestConfig) {
    let mut s = SourceConfig::with_defaults(0xF022, blocks(), Some(KEY.to_vec()));
    s.params.chunk_log2 = 14;
    s.params.channels = 2;
    s.params.mode = mode;
    s.credit_window = 8;
    s.reg_batch = 2;
    s.writes_per_channel = 3;
    s.downtime_limit_ms = 1;
    let mut d = DestConfig::with_defaults(blocks(), Some(KEY.to_vec()), 48 << 10);
    d.credit_window = 8;
    if mode == RegMode::PinAll {
        d.pin_budget = 1 << 20;
    } else {
        s.state_max = STATE_AREA;
        d.state_capacity = STATE_AREA;
    }
    (s, d)
}

/// A recorded complete migration: both machines at several points, and both control streams.
pub struct Recording {
    pub source_stream: Vec<Vec<u8>>,
    pub dest_stream: Vec<Vec<u8>>,
    /// Destination snapshots with the number of source frames they had consumed.
    pub dst_snapshots: Vec<(Destination, usize)>,
    /// Source snapshots with the number of destination frames they had consumed.
    pub src_snapshots: Vec<(Source, usize)>,
}

/// Records one dynamic-mode migration with a writing guest (cached per process).
pub fn recording() -> &'static Recording {
    static REC: OnceLock<Recording> = OnceLock::new();
    REC.get_or_init(|| record(RegMode::Dynamic))
}

/// The same migration in pin-all mode (cached per process): its snapshots hold whole-block
/// registrations, which no input reaches from a dynamic-mode start without the key.
pub fn recording_pin_all() -> &'static Recording {
    static REC: OnceLock<Recording> = OnceLock::new();
    REC.get_or_init(|| record(RegMode::PinAll))
}

/// How many snapshots a session input may start from, per side: those of [`recording`], then
/// those of [`recording_pin_all`].
pub fn session_starts(destination: bool) -> usize {
    let count = |r: &Recording| {
        if destination {
            r.dst_snapshots.len()
        } else {
            r.src_snapshots.len()
        }
    };
    count(recording()) + count(recording_pin_all())
}

/// The recording and the index in it of session start `start` (see [`session_starts`]).
fn session_start(destination: bool, start: usize) -> (&'static Recording, usize) {
    let dynamic = recording();
    let n = if destination {
        dynamic.dst_snapshots.len()
    } else {
        dynamic.src_snapshots.len()
    };
    if start < n {
        (dynamic, start)
    } else {
        (recording_pin_all(), start - n)
    }
}

/// Records one migration in `mode` with a writing guest, with snapshots of both machines.
fn record(mode: RegMode) -> Recording {
    let (s, d) = configs(mode);
    let guest = Guest {
        pages_per_step: 1,
        active_steps: 200,
        zero_one_in: 3,
        seed: 77,
    };
    let mut pair = Pair::new(s, d, guest, vec![0x5a; 20_000]).expect("valid config");
    let mut dst_snapshots = vec![(pair.dst.clone(), 0)];
    let mut src_snapshots = vec![(pair.src.clone(), 0)];
    for phase in [
        SrcPhase::Sending,
        SrcPhase::AwaitRoundAck,
        SrcPhase::Finalizing,
        SrcPhase::AwaitPrepared,
    ] {
        pair.run_until_source(phase, 100_000);
        dst_snapshots.push((pair.dst.clone(), pair.delivered_to_dst));
        src_snapshots.push((pair.src.clone(), pair.delivered_to_src));
    }
    let r = pair.run(100_000);
    assert_eq!(
        r.source,
        Some(Outcome::Completed),
        "recording must complete"
    );
    Recording {
        source_stream: pair.source_stream,
        dest_stream: pair.dest_stream,
        dst_snapshots,
        src_snapshots,
    }
}

/// `wire_decode`: any bytes decode to a frame or a typed error; a decoded frame re-encodes to
/// the same bytes and decodes again to itself (spec: WIRE-4, WIRE-5).
pub fn wire_decode(data: &[u8]) {
    if let Ok(f) = wire::decode(data) {
        let again = wire::encode_to_vec(&f).expect("a decoded frame is within bounds");
        assert_eq!(again, data, "decoding is not canonical");
        assert_eq!(wire::decode(&again).as_ref(), Ok(&f));
    }
    if data.len() >= wire::HEADER_LEN {
        let _ = wire::decode_header(data);
    }
}

/// `wire_roundtrip`: a valid message encodes within the frame limit and decodes to itself.
pub fn wire_roundtrip(f: &Frame) {
    if f.msg.validate().is_err() {
        assert!(
            wire::encode_to_vec(f).is_err(),
            "an invalid message must not encode"
        );
        return;
    }
    match wire::encode_to_vec(f) {
        Ok(bytes) => {
            assert!(bytes.len() <= wire::MAX_FRAME_LEN);
            assert_eq!(wire::decode(&bytes).as_ref(), Ok(f));
        }
        Err(wire::WireError::TooLong(_)) => {} // e.g. 64 blocks with long names
        Err(e) => panic!("valid message failed to encode: {e}"),
    }
}

/// `wire_roundtrip` on raw fuzzer bytes, decoded into a frame as the cargo-fuzz target does
/// (`Frame::arbitrary_take_rest`); bytes that make no frame are skipped like there.
pub fn wire_roundtrip_bytes(data: &[u8]) {
    if let Ok(f) = Frame::arbitrary_take_rest(Unstructured::new(data)) {
        wire_roundtrip(&f);
    }
}

/// Decodes received bytes as a driver would: a frame, or the decode error (`true` = rejected).
fn decode_input(bytes: &[u8]) -> (Result<Frame, wire::WireError>, bool) {
    let r = wire::decode(bytes);
    let rejected = r.is_err();
    (r, rejected)
}

/// The next frame of a recorded stream, optionally with one byte replaced.
fn recorded(
    stream: &[Vec<u8>],
    cursor: &mut usize,
    mutate: Option<(u16, u8)>,
) -> Option<(Result<Frame, wire::WireError>, bool)> {
    let mut bytes = stream.get(*cursor)?.clone();
    *cursor += 1;
    if let Some((at, value)) = mutate {
        let i = at as usize % bytes.len();
        bytes[i] = value;
    }
    Some(decode_input(&bytes))
}

fn dst_input(r: Result<Frame, wire::WireError>) -> DstInput {
    r.map_or_else(DstInput::Malformed, DstInput::Frame)
}

fn src_input(r: Result<Frame, wire::WireError>) -> SrcInput {
    r.map_or_else(SrcInput::Malformed, SrcInput::Frame)
}

/// Chunks of the fuzzing memory at the fuzzing chunk size.
fn total_chunks() -> usize {
    Geometry::new(&blocks(), 14).expect("valid").total_chunks as usize
}

/// One thing that happens to a destination driven by a malicious source.
#[derive(Debug, Arbitrary)]
pub enum DstEvent {
    /// A well-formed frame with arbitrary content.
    Frame(Frame),
    /// Arbitrary bytes through the decoder.
    Raw(Vec<u8>),
    /// The next frame of the recorded honest stream (reaches deep states).
    Recorded,
    /// The next recorded frame with one byte replaced.
    Mutated {
        at: u16,
        value: u8,
    },
    /// The driver finishes the `which`-th pending registration.
    Registered {
        which: u8,
    },
    RegisterFailed,
    Digests {
        correct: bool,
    },
    /// The device state's consumer finished (spec: STATE-4, STATE-5).
    StateLoaded {
        digest: u64,
    },
    StateFailed,
    WorkloadStarted,
    WorkloadFailed,
    Timer(bool),
    TransportFailed,
    Cancel,
    /// A data channel asks to join with this hello (spec: AUTH-6).
    DataHello(DataHello),
    /// A data channel asks to join with the token the real key gives.
    DataHelloKeyed {
        channel: u8,
    },
}

/// What the destination oracle tracks: the NIC's registration table and declared memory.
struct DstOracle {
    blocks: Vec<BlockDesc>,
    nic: BTreeMap<u32, (RegTarget, u16, u64, u64)>,
    pending: Vec<RegTarget>,
    next_rkey: u32,
    commit_fed: bool,
    finished: bool,
}

impl DstOracle {
    fn check(&mut self, d: &Destination, cmds: &[DstCommand], rejected: bool) {
        assert!(
            d.registered_bytes() <= d.pin_budget(),
            "INV-PIN-1: registered bytes over budget"
        );
        for c in cmds {
            assert!(!self.finished, "command after Finish: {c:?}");
            match c {
                DstCommand::Register {
                    target,
                    block,
                    offset,
                    len,
                } => {
                    let b = &self.blocks[*block as usize];
                    assert!(
                        *len > 0 && offset + len <= b.length,
                        "registration outside a declared block"
                    );
                    let overlaps = self
                        .nic
                        .values()
                        .any(|&(_, bb, o, l)| bb == *block && *offset < o + l && o < offset + len);
                    assert!(!overlaps, "the same memory registered twice");
                    self.pending.push(*target);
                }
                DstCommand::Unregister { rkey, .. } => {
                    assert!(
                        self.nic.remove(rkey).is_some(),
                        "unregister of a key not registered"
                    );
                }
                DstCommand::ZeroFill { block, offset, len } => {
                    let b = &self.blocks[*block as usize];
                    assert!(offset + len <= b.length, "zero-fill outside its block");
                }
                DstCommand::StoreDeviceState { offset, data } => {
                    assert!(*offset as usize + data.len() <= wire::MAX_DEVICE_STATE as usize);
                }
                DstCommand::FeedState { upto } | DstCommand::FinishState { len: upto } => {
                    assert!(
                        *upto <= STATE_AREA,
                        "STATE-4: device state beyond the state area"
                    );
                }
                DstCommand::StartWorkload => {
                    assert!(self.commit_fed, "SW-7: started without COMMIT");
                    assert!(
                        self.nic.is_empty(),
                        "SW-8: memory still registered at start"
                    );
                }
                DstCommand::Finish(_) => self.finished = true,
                DstCommand::ComputeDigests => {}
                DstCommand::Send(f) => {
                    wire::encode_to_vec(f).expect("destination sent an invalid frame");
                }
            }
        }
        if rejected && !self.finished {
            panic!("a malformed frame did not end the session");
        }
    }
}

impl DstOracle {
    /// An oracle for destination `d`, fresh or a recorded snapshot. It knows none of a
    /// snapshot's registrations: their keys lie below the range it grants (see `feed`).
    fn new(d: &Destination) -> DstOracle {
        DstOracle {
            finished: d.outcome().is_some(),
            ..DstOracle::fresh()
        }
    }

    /// An oracle for a destination that has not started.
    fn fresh() -> DstOracle {
        let (_, dcfg) = configs(RegMode::Dynamic);
        // The state area registers as one more local block (spec: STATE-2).
        let mut blocks = dcfg.blocks;
        blocks.push(BlockDesc {
            name: b"state-area".to_vec(),
            length: STATE_AREA,
            page_log2: wire::STATE_PAGE_LOG2,
        });
        DstOracle {
            blocks,
            nic: BTreeMap::new(),
            pending: Vec::new(),
            next_rkey: 0x1_0000,
            commit_fed: false,
            finished: false,
        }
    }

    /// The driver finishes the `which`-th pending registration: the NIC grants the next key
    /// over the block or chunk. `None` if nothing is pending.
    fn registered(&mut self, which: u8) -> Option<DstInput> {
        if self.pending.is_empty() {
            return None;
        }
        let target = self.pending.remove(which as usize % self.pending.len());
        let rkey = self.next_rkey;
        self.next_rkey += 1;
        let (block, off, len) = match target {
            RegTarget::Block(b) => (b, 0, self.blocks[b as usize].length),
            RegTarget::Chunk(c) => {
                let o = (c.chunk as u64) << 14;
                (
                    c.block,
                    o,
                    (1u64 << 14).min(self.blocks[c.block as usize].length - o),
                )
            }
        };
        self.nic.insert(rkey, (target, block, off, len));
        Some(DstInput::Registered { target, rkey })
    }

    /// Feeds `input` to the destination and checks the commands it answers with. `rejected`:
    /// the driver could not decode the input, which must end a session still under way.
    fn feed(&mut self, d: &mut Destination, now: u64, input: DstInput, rejected: bool) {
        if let DstInput::Frame(f) = &input {
            if f.msg == Message::Commit {
                self.commit_fed = true;
            }
        }
        // Once committed (Starting) the destination deliberately ignores what the source sends.
        let was_done = d.outcome().is_some() || d.phase() == DstPhase::Starting;
        let cmds = d.step(now, input);
        // A mid-migration snapshot holds registrations made before it (keys below the fuzz
        // range); unregistering those is legitimate.
        let cmds: Vec<DstCommand> = cmds
            .into_iter()
            .filter(|c| !matches!(c, DstCommand::Unregister { rkey, .. } if *rkey < 0x1_0000))
            .collect();
        self.check(d, &cmds, rejected && !was_done);
    }
}

/// `destination_session`: a malicious source against the destination, from a fresh start or
/// from a recorded mid-migration state, in dynamic or pin-all mode.
pub fn destination_session(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let start = u.int_in_range(0..=session_starts(true) - 1).unwrap_or(0);
    let (rec, start) = session_start(true, start);
    let (mut d, mut cursor) = rec.dst_snapshots[start].clone();
    let mut oracle = DstOracle::new(&d);
    let mut now = 0;
    // Events are drawn while the input lasts: past its end `Unstructured` yields zeros, and
    // the same all-zero event repeated to the bound would cost most of each execution.
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        let Ok(ev) = DstEvent::arbitrary(&mut u) else {
            break;
        };
        now += 1;
        let Some((input, rejected)) =
            dst_event_input(ev, &mut d, &mut oracle, &rec.source_stream, &mut cursor)
        else {
            continue;
        };
        oracle.feed(&mut d, now, input, rejected);
    }
}

/// The destination's input for event `ev`, and whether the driver rejected its bytes. `None`
/// when there is nothing to feed: the recorded `stream` is exhausted, no registration is
/// pending, or the event was a data channel's join, which the destination answers directly
/// (checked here).
fn dst_event_input(
    ev: DstEvent,
    d: &mut Destination,
    oracle: &mut DstOracle,
    stream: &[Vec<u8>],
    cursor: &mut usize,
) -> Option<(DstInput, bool)> {
    let mut rejected = false;
    let input = match ev {
        DstEvent::Frame(f) => DstInput::Frame(f),
        DstEvent::Raw(bytes) => {
            let (i, r) = decode_input(&bytes);
            rejected = r;
            dst_input(i)
        }
        DstEvent::Recorded | DstEvent::Mutated { .. } => {
            let mutate = match ev {
                DstEvent::Mutated { at, value } => Some((at, value)),
                _ => None,
            };
            let (i, r) = recorded(stream, cursor, mutate)?;
            rejected = r;
            dst_input(i)
        }
        DstEvent::Registered { which } => oracle.registered(which)?,
        DstEvent::RegisterFailed => DstInput::RegisterFailed {
            target: oracle
                .pending
                .first()
                .copied()
                .unwrap_or(RegTarget::Block(0)),
        },
        DstEvent::Digests { correct } => {
            DstInput::Digests(vec![u64::from(!correct); total_chunks()])
        }
        DstEvent::StateLoaded { digest } => DstInput::StateLoaded { digest },
        DstEvent::StateFailed => DstInput::StateFailed,
        DstEvent::WorkloadStarted => DstInput::WorkloadStarted,
        DstEvent::WorkloadFailed => DstInput::WorkloadFailed,
        DstEvent::Timer(idle) => DstInput::Timer(if idle {
            DstTimer::Idle
        } else {
            DstTimer::Keepalive
        }),
        DstEvent::TransportFailed => DstInput::TransportFailed,
        DstEvent::Cancel => DstInput::Cancel,
        DstEvent::DataHello(h) => {
            admit_checked(d, &h);
            return None;
        }
        DstEvent::DataHelloKeyed { channel } => {
            let session_id = d.session_id().unwrap_or(0);
            let h = DataHello {
                session_id,
                channel,
                token: keyed_token(session_id, channel, &RECORDING_DST_NONCE),
            };
            admit_checked(d, &h);
            return None;
        }
    };
    Some((input, rejected))
}

/// The data-channel token the fuzzing key gives (`auth::data_token`), remembered per thread:
/// the same few sessions and channels come back in every input, and computing the MAC each
/// time would cost more than the machines.
fn keyed_token(session_id: u64, channel: u8, nonce: &[u8; wire::NONCE_LEN]) -> [u8; wire::MAC_LEN] {
    type Tokens = BTreeMap<(u64, u8, [u8; wire::NONCE_LEN]), [u8; wire::MAC_LEN]>;
    thread_local! {
        static TOKENS: std::cell::RefCell<Tokens> = const { std::cell::RefCell::new(BTreeMap::new()) };
    }
    TOKENS.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() >= 4096 {
            t.clear(); // session ids a fuzzer made up
        }
        *t.entry((session_id, channel, *nonce))
            .or_insert_with(|| auth::data_token(Some(KEY), session_id, channel, nonce))
    })
}

/// The nonce the recording's destination drew (`Pair::new`).
const RECORDING_DST_NONCE: [u8; wire::NONCE_LEN] = [9; wire::NONCE_LEN];

/// Offers `h` to the destination: it may admit only the current session's channels, each once,
/// with a token the key gives, and only after the block table (spec: AUTH-6).
fn admit_checked(d: &mut Destination, h: &DataHello) {
    let phase = d.phase();
    let before = d.clone();
    if let Ok(ch) = d.admit_data(h) {
        assert_eq!(
            phase,
            DstPhase::Receiving,
            "AUTH-6: admitted outside Receiving"
        );
        assert_eq!(ch, h.channel);
        assert_eq!(
            Some(h.session_id),
            d.session_id(),
            "AUTH-6: another session"
        );
        assert!(
            h.token == keyed_token(h.session_id, ch, &RECORDING_DST_NONCE),
            "AUTH-6: admitted a token the key does not give"
        );
        assert!(
            before.clone().admit_data(h).is_ok() && d.clone().admit_data(h).is_err(),
            "AUTH-6: a channel joins once"
        );
    } else {
        assert_eq!(&before, d, "a refused join changed the destination");
    }
}

/// `data_hello`: DATA_HELLO, the 56 bytes a data connection opens with, as they arrive from
/// the network. Any bytes decode to a hello or to one of the two typed refusals (wrong magic,
/// reserved bytes not zero); a decoded hello re-encodes to the same bytes; offered to a
/// destination, fresh or mid-migration, it is admitted only as AUTH-6 allows
/// ([`admit_checked`]).
///
/// Input: a byte choosing the destination snapshot, then records `[selector u8][56 bytes]`.
/// Selector bit 0 writes the destination's session id into the bytes, bit 1 the token the key
/// gives for the bytes' session id and channel, so the fuzzer reaches admission without
/// forging the MAC.
pub fn data_hello(data: &[u8]) {
    let rec = recording();
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut d = rec.dst_snapshots[first as usize % rec.dst_snapshots.len()]
        .0
        .clone();
    while rest.len() > wire::DATA_HELLO_LEN {
        let sel = rest[0];
        let mut b = [0u8; wire::DATA_HELLO_LEN];
        b.copy_from_slice(&rest[1..=wire::DATA_HELLO_LEN]);
        rest = &rest[1 + wire::DATA_HELLO_LEN..];
        if sel & 1 == 1 {
            b[8..16].copy_from_slice(&d.session_id().unwrap_or(0).to_le_bytes());
        }
        if sel & 2 == 2 {
            let session_id = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
            let token = keyed_token(session_id, b[16], &RECORDING_DST_NONCE);
            b[24..56].copy_from_slice(&token);
        }
        let magic = b[..8] == wire::DATA_HELLO_MAGIC;
        let reserved_zero = b[17..24] == [0; 7];
        match DataHello::decode(&b) {
            Ok(h) => {
                assert!(
                    magic && reserved_zero,
                    "DATA_HELLO accepted with bad framing"
                );
                assert_eq!(h.encode(), b, "DATA_HELLO decoding is not canonical");
                admit_checked(&mut d, &h);
            }
            Err(wire::WireError::OutOfRange {
                field: "data_hello_magic",
                ..
            }) => assert!(!magic, "a correct magic refused"),
            Err(wire::WireError::Reserved("data_hello")) => {
                assert!(magic && !reserved_zero, "zero reserved bytes refused")
            }
            Err(e) => panic!("DATA_HELLO refused for an unexpected reason: {e}"),
        }
    }
}

/// One thing that happens to a source driven by a malicious destination.
#[derive(Debug, Arbitrary)]
pub enum SrcEvent {
    Frame(Frame),
    Raw(Vec<u8>),
    Recorded,
    Mutated {
        at: u16,
        value: u8,
    },
    /// Completes the `which`-th write in flight.
    WriteDone {
        which: u8,
    },
    WriteFailed,
    /// A well-formed dirty scan drawn from `seed`.
    Dirty {
        seed: u64,
    },
    Paused,
    WorkloadFailed,
    DeviceState {
        len: u16,
    },
    /// The state area's device state grows to `len` bytes (spec: STATE-3).
    StateProduced {
        len: u16,
    },
    StateDone {
        len: u16,
        digest: u64,
    },
    Digests,
    Timer(bool),
    TransportFailed,
    Cancel,
    /// The destination admitted data channel `channel`.
    DataOpened {
        channel: u8,
    },
}

/// What the source oracle tracks: the keys the destination granted, the writes in flight, and
/// who holds the workload.
struct SrcOracle {
    geo: Geometry,
    /// The session starts from a recorded snapshot past the handshake, so it holds keys
    /// granted before it that the oracle never saw.
    mid_migration: bool,
    keys: BTreeSet<u32>,
    pin_all: bool,
    inflight: Vec<u64>,
    seen_wr: BTreeSet<u64>,
    finished: bool,
    commit_sent: bool,
    relinquished: bool,
    table_acked: bool,
}

/// `source_session`: a malicious destination against the source, from a fresh start or from a
/// recorded mid-migration state, in dynamic or pin-all mode.
pub fn source_session(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let start = u.int_in_range(0..=session_starts(false) - 1).unwrap_or(0);
    let (rec, start) = session_start(false, start);
    let (mut s, mut cursor) = rec.src_snapshots[start].clone();
    let mut oracle = SrcOracle::new(&s, start > 0);
    let mut now = 0;
    if start == 0 {
        s.step(0, SrcInput::Start);
    }
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        let Ok(ev) = SrcEvent::arbitrary(&mut u) else {
            break;
        };
        now += 1;
        let Some((input, rejected)) = oracle.input(ev, &rec.dest_stream, &mut cursor) else {
            continue;
        };
        oracle.feed(&mut s, now, input, rejected);
    }
}

/// A well-formed dirty scan of `geo` drawn from `seed`.
fn dirty_scan(geo: &Geometry, seed: u64) -> DirtyScan {
    let mut rng = crate::rng::Rng::new(seed);
    let mut dirty = Vec::new();
    let mut zero = Vec::new();
    for b in &geo.blocks {
        let mut d = PageBitmap::new(b.pages);
        let mut z = PageBitmap::new(b.pages);
        for p in 0..b.pages {
            // A third of the pages dirty, a seventh of those zero.
            if rng.below(3) == 0 {
                d.set(p);
                if rng.below(7) == 0 {
                    z.set(p);
                }
            }
        }
        dirty.push(d);
        zero.push(z);
    }
    DirtyScan { dirty, zero }
}

impl SrcOracle {
    /// An oracle for source `s` as it is before the session's first input.
    fn new(s: &Source, mid_migration: bool) -> SrcOracle {
        let commit_sent = s.commit_sent();
        SrcOracle {
            geo: s.geometry().clone(),
            mid_migration,
            keys: BTreeSet::new(),
            pin_all: s.params().mode == RegMode::PinAll,
            inflight: Vec::new(),
            seen_wr: BTreeSet::new(),
            finished: s.outcome().is_some(),
            commit_sent,
            relinquished: commit_sent,
            table_acked: mid_migration,
        }
    }

    /// The source's input for event `ev`, and whether the driver rejected its bytes. `None`
    /// when there is nothing to feed: the recorded `stream` is exhausted, or no write is in
    /// flight to complete.
    fn input(
        &mut self,
        ev: SrcEvent,
        stream: &[Vec<u8>],
        cursor: &mut usize,
    ) -> Option<(SrcInput, bool)> {
        let mut rejected = false;
        let input = match ev {
            SrcEvent::Frame(f) => SrcInput::Frame(f),
            SrcEvent::Raw(bytes) => {
                let (i, r) = decode_input(&bytes);
                rejected = r;
                src_input(i)
            }
            SrcEvent::Recorded | SrcEvent::Mutated { .. } => {
                let mutate = match ev {
                    SrcEvent::Mutated { at, value } => Some((at, value)),
                    _ => None,
                };
                let (i, r) = recorded(stream, cursor, mutate)?;
                rejected = r;
                src_input(i)
            }
            SrcEvent::WriteDone { which } => {
                if self.inflight.is_empty() {
                    return None;
                }
                SrcInput::WriteDone {
                    wr_id: self.inflight.remove(which as usize % self.inflight.len()),
                }
            }
            SrcEvent::WriteFailed => SrcInput::WriteFailed {
                wr_id: self.inflight.first().copied().unwrap_or(0),
            },
            SrcEvent::Dirty { seed } => SrcInput::Dirty(dirty_scan(&self.geo, seed)),
            SrcEvent::Paused => SrcInput::WorkloadPaused,
            SrcEvent::WorkloadFailed => SrcInput::WorkloadFailed,
            SrcEvent::DeviceState { len } => SrcInput::DeviceState(vec![7; len as usize]),
            SrcEvent::StateProduced { len } => SrcInput::StateProduced { len: len as u64 },
            SrcEvent::StateDone { len, digest } => SrcInput::StateDone {
                len: len as u64,
                digest,
            },
            SrcEvent::Digests => SrcInput::Digests(vec![1; self.geo.ram_chunks as usize]),
            SrcEvent::Timer(idle) => SrcInput::Timer(if idle {
                SrcTimer::Progress
            } else {
                SrcTimer::Keepalive
            }),
            SrcEvent::TransportFailed => SrcInput::TransportFailed,
            SrcEvent::Cancel => SrcInput::Cancel,
            SrcEvent::DataOpened { channel } => SrcInput::DataOpened { channel },
        };
        Some((input, rejected))
    }

    /// Feeds `input` to the source and checks every command it answers with. `rejected`: the
    /// driver could not decode the input, which must end a session still under way.
    fn feed(&mut self, s: &mut Source, now: u64, input: SrcInput, rejected: bool) {
        let peer_abort = self.observe(&input);
        let was_done = s.outcome().is_some();
        let phase_before = s.phase();
        let cmds = s.step(now, input);
        if phase_before == SrcPhase::AwaitTableAck && s.phase() == SrcPhase::Scanning {
            self.table_acked = true;
        }
        // HELLO_ACK may add a state area to the geometry (spec: STATE-2).
        self.geo = s.geometry().clone();
        for c in &cmds {
            self.check(s, c, peer_abort);
        }
        if rejected && !was_done {
            assert!(self.finished, "a malformed frame did not end the session");
        }
    }

    /// Learns what a frame from the destination grants: keys, and the registration mode.
    /// Returns whether the frame is the destination's ABORT.
    fn observe(&mut self, input: &SrcInput) -> bool {
        if let SrcInput::Frame(f) = input {
            match &f.msg {
                Message::RegResult { rkeys, .. } => self.keys.extend(rkeys),
                Message::BlockTableAck { rkeys } => self.keys.extend(rkeys),
                Message::HelloAck(a) => self.pin_all = a.params.mode == RegMode::PinAll,
                Message::Abort { .. } => return true,
                _ => {}
            }
        }
        false
    }

    /// One command of the source; `peer_abort`: the destination aborted in the input that
    /// caused it, which allows taking the workload back even after COMMIT.
    fn check(&mut self, s: &Source, c: &SrcCommand, peer_abort: bool) {
        assert!(!self.finished, "command after Finish: {c:?}");
        match c {
            SrcCommand::PostWrite(w) => self.check_write(w),
            SrcCommand::ResumeWorkload => {
                assert!(
                    !self.commit_sent || peer_abort,
                    "SW-6: resumed after COMMIT"
                );
                assert!(
                    !self.relinquished || peer_abort,
                    "SW-6: resumed after giving it up"
                );
            }
            SrcCommand::RelinquishWorkload => self.relinquished = true,
            SrcCommand::Send(f) => {
                wire::encode_to_vec(f).expect("source sent an invalid frame");
                if f.msg == Message::Commit {
                    assert!(
                        self.relinquished,
                        "SW-6: COMMIT before relinquishing the workload"
                    );
                    self.commit_sent = true;
                }
            }
            SrcCommand::OpenData { hello } => {
                assert!(
                    self.table_acked,
                    "AUTH-3: data channel before the block table was acknowledged"
                );
                assert!(hello.channel < s.params().channels);
            }
            SrcCommand::Finish(_) => self.finished = true,
            SrcCommand::ScanDirty { .. }
            | SrcCommand::PauseWorkload
            | SrcCommand::CaptureDeviceState { .. }
            | SrcCommand::ComputeDigests => {}
        }
    }

    /// A write reads within its local block and writes within a registration the destination
    /// granted, on a fresh work request id (spec: AUTH-3, REG-5).
    fn check_write(&mut self, w: &rdmig_model::WriteCmd) {
        assert!(
            self.table_acked,
            "AUTH-3: write before the block table was acknowledged"
        );
        let b = &self.geo.blocks[w.block as usize];
        assert!(
            w.offset + w.len <= b.length,
            "write reads outside the local block"
        );
        assert!(
            self.mid_migration || self.keys.contains(&w.rkey),
            "REG-5: write with a key never granted"
        );
        let limit = if self.pin_all {
            b.length
        } else {
            self.geo.chunk_size()
        };
        assert!(
            w.remote_offset + w.len <= limit,
            "write beyond the registration"
        );
        assert!((w.channel as usize) < 16);
        assert!(self.seen_wr.insert(w.wr_id), "work request id reused");
        self.inflight.push(w.wr_id);
    }
}

/// One frame from a peer that does not hold the key.
#[derive(Debug, Arbitrary)]
pub enum AuthEvent {
    Frame(Frame),
    Raw(Vec<u8>),
    /// A frame replayed from a recorded session that used the real key (a replay attack).
    Replayed(u8),
}

/// `handshake_auth`: whatever a peer without the key sends, a keyed destination never gets
/// past authentication and a keyed source never sends memory or its block table (spec: AUTH-2,
/// AUTH-3, AUTH-5).
pub fn handshake_auth(data: &[u8]) {
    let rec = recording();
    let mut u = Unstructured::new(data);
    let attack_destination: bool = u.arbitrary().unwrap_or(true);
    let (scfg, dcfg) = configs(RegMode::Dynamic);
    // Fresh nonces differ from the recording's, so replayed proofs are stale.
    let mut d = Destination::new(dcfg, [0xd5; wire::NONCE_LEN]).expect("valid");
    let mut s = Source::new(scfg, [0x5d; wire::NONCE_LEN]).expect("valid");
    if !attack_destination {
        s.step(0, SrcInput::Start);
    }
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        let Ok(ev) = AuthEvent::arbitrary(&mut u) else {
            break;
        };
        let frame = match ev {
            AuthEvent::Frame(f) => Ok(f),
            AuthEvent::Raw(b) => wire::decode(&b),
            AuthEvent::Replayed(i) => {
                let stream = if attack_destination {
                    &rec.source_stream
                } else {
                    &rec.dest_stream
                };
                Ok(wire::decode(&stream[i as usize % stream.len()])
                    .expect("recorded frames decode"))
            }
        };
        if attack_destination {
            let cmds = d.step(0, dst_input(frame));
            assert!(
                matches!(
                    d.phase(),
                    DstPhase::AwaitHello | DstPhase::AwaitAuth | DstPhase::Done
                ),
                "AUTH-2: destination passed authentication without the key"
            );
            assert!(!cmds
                .iter()
                .any(|c| matches!(c, DstCommand::Register { .. } | DstCommand::ZeroFill { .. })));
        } else {
            let cmds = s.step(0, src_input(frame));
            for c in &cmds {
                match c {
                    SrcCommand::Send(f) => assert!(
                        matches!(
                            f.msg,
                            Message::Hello(_) | Message::Abort { .. } | Message::Nop
                        ),
                        "AUTH-3: source sent {} to an unproven destination",
                        f.msg.name()
                    ),
                    SrcCommand::PostWrite(_) | SrcCommand::OpenData { .. } => {
                        panic!("AUTH-3: source wrote memory to an unproven destination")
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Connections a listener input may have in their handshake at once: small, so the fuzzer
/// reaches the eviction of the oldest (spec: LIVE-5).
const LISTENER_MAX_PENDING: usize = 4;

/// One thing that happens to a listening destination: connections come and go, and each
/// sends what it likes. `conn` picks one of the connections accepted so far.
#[derive(Debug, Arbitrary)]
pub enum LsnEvent {
    /// A connection is accepted; with `recorded_nonce` the listener draws the nonce the
    /// recording's destination drew, so the recorded source stream authenticates on it.
    Accept {
        recorded_nonce: bool,
    },
    Frame {
        conn: u8,
        frame: Frame,
    },
    Raw {
        conn: u8,
        bytes: Vec<u8>,
    },
    /// The next frame of the recorded honest source stream.
    Recorded {
        conn: u8,
    },
    Mutated {
        conn: u8,
        at: u16,
        value: u8,
    },
    /// DATA_HELLO bytes, decoded as the driver does.
    DataHello {
        conn: u8,
        bytes: [u8; wire::DATA_HELLO_LEN],
    },
    /// DATA_HELLO with the token the key gives for the current session.
    DataHelloKeyed {
        conn: u8,
        channel: u8,
    },
    Closed {
        conn: u8,
    },
    Registered {
        which: u8,
    },
    /// The driver finishes every pending registration, as a real one does at once.
    RegisteredAll,
    RegisterFailed,
    Digests {
        correct: bool,
    },
    WorkloadStarted,
    WorkloadFailed,
    HandshakeTimer {
        conn: u8,
    },
    SessionTimer(bool),
    Cancel,
}

/// What the listener oracle tracks about connections, on top of the session's memory.
struct LsnOracle {
    session: DstOracle,
    accepted: Vec<(ConnId, [u8; wire::NONCE_LEN])>,
    next_conn: ConnId,
    /// Connections the listener closed.
    closed: BTreeSet<ConnId>,
    /// Connections that opened with DATA_HELLO, with the hello.
    hellos: BTreeMap<ConnId, Result<DataHello, wire::WireError>>,
    /// Connections that opened with a control frame.
    control: BTreeSet<ConnId>,
    bound: Option<ConnId>,
    admitted: BTreeSet<u8>,
    finished: bool,
}

/// `listener_session`: connections against a listening destination (spec: AUTH-2, AUTH-6,
/// LIVE-4, LIVE-5): any mix of control connections (frames, raw bytes, the recorded honest
/// source), data connections (DATA_HELLO bytes or keyed hellos), closes, timers and driver
/// answers, in the order the transports can report them (DATA_HELLO only as a connection's
/// first message, control frames only on connections that did not open with it). Nothing reaches memory before a source proves the key, and then only what the
/// destination oracle allows; at most one session, bound for good; the handshakes in
/// progress stay within the limit; nothing is sent on a connection the listener closed; a
/// data connection is admitted only with the key's token for the session, each channel once;
/// malformed bytes on the session's connection end it; nothing but closing late connections
/// follows the end.
pub fn listener_session(data: &[u8]) {
    let rec = recording();
    let (_, dcfg) = configs(RegMode::Dynamic);
    let mut cfg = ListenerConfig::new(dcfg);
    cfg.max_pending = LISTENER_MAX_PENDING;
    let mut l = Listener::new(cfg).expect("valid config");
    let mut o = LsnOracle {
        session: DstOracle::fresh(),
        accepted: Vec::new(),
        next_conn: 1,
        closed: BTreeSet::new(),
        hellos: BTreeMap::new(),
        control: BTreeSet::new(),
        bound: None,
        admitted: BTreeSet::new(),
        finished: false,
    };
    let mut u = Unstructured::new(data);
    let mut cursor = 0;
    let mut now = 0;
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        let Ok(ev) = LsnEvent::arbitrary(&mut u) else {
            break;
        };
        now += 1;
        if let LsnEvent::RegisteredAll = ev {
            while let Some(i) = o.session.registered(0) {
                o.feed(&mut l, now, LsnInput::Local(i), None);
            }
            continue;
        }
        let Some((input, rejected_on)) = o.input(ev, &l, &rec.source_stream, &mut cursor) else {
            continue;
        };
        o.feed(&mut l, now, input, rejected_on);
    }
}

impl LsnOracle {
    fn conn(&self, i: u8) -> Option<ConnId> {
        if self.accepted.is_empty() {
            return None;
        }
        Some(self.accepted[i as usize % self.accepted.len()].0)
    }

    /// A connection for a control frame: one that did not open with DATA_HELLO (the
    /// transports read a connection that did as a data channel only).
    fn control_conn(&mut self, i: u8) -> Option<ConnId> {
        let c = self.conn(i)?;
        if self.hellos.contains_key(&c) {
            return None;
        }
        self.control.insert(c);
        Some(c)
    }

    /// A connection for DATA_HELLO: one that has sent nothing yet (the transports report
    /// DATA_HELLO only as a connection's first message).
    fn fresh_conn(&self, i: u8) -> Option<ConnId> {
        let c = self.conn(i)?;
        (!self.hellos.contains_key(&c) && !self.control.contains(&c)).then_some(c)
    }

    /// The listener's input for `ev`, and the connection whose bytes failed to decode, if
    /// any. `None` when there is nothing to feed, or the event is one no transport reports
    /// (see [`LsnOracle::control_conn`] and [`LsnOracle::fresh_conn`]).
    fn input(
        &mut self,
        ev: LsnEvent,
        l: &Listener,
        stream: &[Vec<u8>],
        cursor: &mut usize,
    ) -> Option<(LsnInput, Option<ConnId>)> {
        let frame = |conn: ConnId, r: (Result<Frame, wire::WireError>, bool)| {
            let rejected = r.1.then_some(conn);
            (LsnInput::Frame { conn, frame: r.0 }, rejected)
        };
        let hello = |o: &mut LsnOracle, conn: ConnId, h: Result<DataHello, wire::WireError>| {
            o.hellos.insert(conn, h.clone());
            (LsnInput::DataHello { conn, hello: h }, None)
        };
        Some(match ev {
            LsnEvent::Accept { recorded_nonce } => {
                let conn = self.next_conn;
                self.next_conn += 1;
                let nonce = if recorded_nonce {
                    RECORDING_DST_NONCE
                } else {
                    [conn as u8 ^ 0xc0; wire::NONCE_LEN]
                };
                self.accepted.push((conn, nonce));
                let input = LsnInput::Accepted {
                    conn,
                    nonce,
                    binding: None,
                };
                (input, None)
            }
            LsnEvent::Frame { conn, frame: f } => (
                LsnInput::Frame {
                    conn: self.control_conn(conn)?,
                    frame: Ok(f),
                },
                None,
            ),
            LsnEvent::Raw { conn, bytes } => frame(self.control_conn(conn)?, decode_input(&bytes)),
            LsnEvent::Recorded { conn } => {
                let c = self.control_conn(conn)?;
                frame(c, recorded(stream, cursor, None)?)
            }
            LsnEvent::Mutated { conn, at, value } => {
                let c = self.control_conn(conn)?;
                frame(c, recorded(stream, cursor, Some((at, value)))?)
            }
            LsnEvent::DataHello { conn, bytes } => match self.fresh_conn(conn) {
                Some(c) => hello(self, c, DataHello::decode(&bytes)),
                // A hello on a connection that already spoke (its control frames, or its own
                // hello): no transport reports one, but the listener stays safe whatever its
                // driver feeds it, and what it admits must have opened with a hello.
                None => (
                    LsnInput::DataHello {
                        conn: self.conn(conn)?,
                        hello: DataHello::decode(&bytes),
                    },
                    None,
                ),
            },
            LsnEvent::DataHelloKeyed { conn, channel } => {
                let c = self.fresh_conn(conn)?;
                let session_id = l.session().and_then(|d| d.session_id()).unwrap_or(0);
                let nonce = self.session_nonce().unwrap_or(RECORDING_DST_NONCE);
                let h = DataHello {
                    session_id,
                    channel,
                    token: keyed_token(session_id, channel, &nonce),
                };
                hello(self, c, Ok(h))
            }
            LsnEvent::Closed { conn } => (
                LsnInput::Closed {
                    conn: self.conn(conn)?,
                },
                None,
            ),
            LsnEvent::Registered { which } => {
                (LsnInput::Local(self.session.registered(which)?), None)
            }
            LsnEvent::RegisteredAll => return None, // fed one by one by the caller
            LsnEvent::RegisterFailed => {
                let target = self
                    .session
                    .pending
                    .first()
                    .copied()
                    .unwrap_or(RegTarget::Block(0));
                (LsnInput::Local(DstInput::RegisterFailed { target }), None)
            }
            LsnEvent::Digests { correct } => (
                LsnInput::Local(DstInput::Digests(vec![u64::from(!correct); total_chunks()])),
                None,
            ),
            LsnEvent::WorkloadStarted => (LsnInput::Local(DstInput::WorkloadStarted), None),
            LsnEvent::WorkloadFailed => (LsnInput::Local(DstInput::WorkloadFailed), None),
            LsnEvent::HandshakeTimer { conn } => {
                (LsnInput::Timer(LsnTimer::Handshake(self.conn(conn)?)), None)
            }
            LsnEvent::SessionTimer(idle) => (
                LsnInput::Timer(LsnTimer::Session(if idle {
                    DstTimer::Idle
                } else {
                    DstTimer::Keepalive
                })),
                None,
            ),
            LsnEvent::Cancel => (LsnInput::Cancel, None),
        })
    }

    /// The nonce the session's control connection was accepted with.
    fn session_nonce(&self) -> Option<[u8; wire::NONCE_LEN]> {
        let b = self.bound?;
        self.accepted.iter().find(|(c, _)| *c == b).map(|(_, n)| *n)
    }

    /// Feeds `input` and checks what the listener answers. `rejected_on`: the connection
    /// whose bytes the driver could not decode.
    fn feed(&mut self, l: &mut Listener, now: u64, input: LsnInput, rejected_on: Option<ConnId>) {
        let accepted_conn = match &input {
            LsnInput::Accepted { conn, .. } => Some(*conn),
            _ => None,
        };
        let admission = match &input {
            LsnInput::DataHello { conn, .. } => Some(*conn),
            _ => None,
        };
        let session_conn = l.session_conn();
        if let LsnInput::Frame { conn, frame: Ok(f) } = &input {
            if f.msg == Message::Commit && session_conn == Some(*conn) {
                self.session.commit_fed = true;
            }
        }
        // Once committed (Starting) the destination deliberately ignores what the source sends.
        let session_live =
            l.outcome().is_none() && l.session().is_some_and(|d| d.phase() != DstPhase::Starting);
        let cmds = l.step(now, input);
        if self.finished {
            let late = matches!(cmds.as_slice(), [LsnCommand::Close { conn }] if Some(*conn) == accepted_conn);
            assert!(cmds.is_empty() || late, "commands after Finish: {cmds:?}");
            return;
        }
        assert!(
            l.handshaking() <= LISTENER_MAX_PENDING,
            "LIVE-5: {} connections in their handshake",
            l.handshaking()
        );
        match (self.bound, l.session_conn()) {
            (Some(b), now_bound) => assert_eq!(now_bound, Some(b), "AUTH-2: the session changed"),
            (None, b) => self.bound = b,
        }
        let mut memory = Vec::new();
        for c in cmds {
            match c {
                LsnCommand::Send { conn, frame } => {
                    assert!(
                        !self.closed.contains(&conn),
                        "sent on connection {conn} after closing it"
                    );
                    wire::encode_to_vec(&frame).expect("listener sent an invalid frame");
                }
                LsnCommand::Close { conn } => {
                    self.closed.insert(conn);
                }
                LsnCommand::Admit { conn, channel } => {
                    assert_eq!(
                        admission,
                        Some(conn),
                        "admitted a connection that did not ask"
                    );
                    let session_id = l.session().and_then(|d| d.session_id());
                    let nonce = self
                        .session_nonce()
                        .expect("AUTH-6: admitted without a session");
                    let Some(Ok(h)) = self.hellos.get(&conn) else {
                        panic!("AUTH-6: admitted a connection whose first bytes were not a hello");
                    };
                    assert_eq!(Some(h.session_id), session_id, "AUTH-6: another session");
                    assert_eq!(h.channel, channel);
                    assert!(
                        h.token == keyed_token(h.session_id, channel, &nonce),
                        "AUTH-6: admitted a token the key does not give"
                    );
                    assert!(
                        self.admitted.insert(channel),
                        "AUTH-6: channel {channel} joined twice"
                    );
                }
                LsnCommand::Session(cmd) => {
                    assert!(
                        self.bound.is_some(),
                        "AUTH-2: {cmd:?} before a source proved the key"
                    );
                    memory.push(cmd);
                }
                LsnCommand::Finish(_) => self.finished = true,
            }
        }
        if let Some(d) = l.session() {
            self.session.check(d, &memory, false);
        }
        if rejected_on.is_some() && rejected_on == session_conn && session_live {
            assert!(self.finished, "a malformed frame did not end the session");
        }
    }
}

/// Seed inputs for the corpora: every sample frame encoded, and the recorded streams.
pub fn seed_frames() -> Vec<Vec<u8>> {
    let rec = recording();
    let mut v: Vec<Vec<u8>> = wire::sample_frames()
        .iter()
        .map(|f| wire::encode_to_vec(f).expect("samples are valid"))
        .collect();
    v.extend(rec.source_stream.iter().cloned());
    v.extend(rec.dest_stream.iter().cloned());
    v.sort();
    v.dedup();
    v
}

/// Builds session-target input bytes that start from snapshot `start` and then replay `n`
/// recorded frames interleaved with driver answers, found by trial against the same decoder
/// the targets use. Used to seed corpora with inputs that reach deep states.
pub fn session_seed(destination: bool, start: u8, n: usize) -> Vec<u8> {
    let mut bytes = vec![start];
    let matches = |b: &[u8], want: usize| -> bool {
        let mut u = Unstructured::new(b);
        let _ = u.int_in_range(0..=session_starts(destination) - 1);
        let mut got = 0;
        for i in 0..want {
            // The targets draw an event only while input remains.
            if u.is_empty() {
                return false;
            }
            let ok = if destination {
                match DstEvent::arbitrary(&mut u) {
                    Ok(DstEvent::Recorded) => i % 4 != 3,
                    Ok(DstEvent::Registered { .. }) => i % 4 == 3,
                    _ => false,
                }
            } else {
                match SrcEvent::arbitrary(&mut u) {
                    Ok(SrcEvent::Recorded) => i % 4 != 3,
                    Ok(SrcEvent::WriteDone { .. }) => i % 4 == 3,
                    _ => false,
                }
            };
            if !ok {
                return false;
            }
            got += 1;
        }
        got == want
    };
    for i in 0..n {
        let base = bytes.clone();
        let mut found = false;
        'search: for len in 1..=5 {
            for v in 0..=255u8 {
                let mut b = base.clone();
                b.extend(std::iter::repeat_n(v, len));
                if matches(&b, i + 1) {
                    bytes = b;
                    found = true;
                    break 'search;
                }
            }
        }
        if !found {
            break;
        }
    }
    bytes
}

/// Builds `listener_session` input bytes: a connection accepted with the recording's nonce
/// that replays `n` recorded source frames, each followed by the driver finishing the
/// registrations it caused, then a second connection that asks to join as data channel 0 with
/// the key's token. Found by trial against the same decoder the target uses, like
/// [`session_seed`].
pub fn listener_seed(n: usize) -> Vec<u8> {
    type Want = Box<dyn Fn(&LsnEvent) -> bool>;
    let mut want: Vec<Want> = vec![Box::new(|e| {
        matches!(
            e,
            LsnEvent::Accept {
                recorded_nonce: true
            }
        )
    })];
    for _ in 0..n {
        want.push(Box::new(|e| matches!(e, LsnEvent::Recorded { .. })));
        want.push(Box::new(|e| matches!(e, LsnEvent::RegisteredAll)));
    }
    want.push(Box::new(|e| {
        matches!(
            e,
            LsnEvent::Accept {
                recorded_nonce: false
            }
        )
    }));
    // Two connections by then: an odd `conn` picks the second.
    want.push(Box::new(
        |e| matches!(e, LsnEvent::DataHelloKeyed { conn, channel: 0 } if conn % 2 == 1),
    ));
    // The target draws an event only while input remains.
    let matches = |b: &[u8], k: usize| -> bool {
        let mut u = Unstructured::new(b);
        want[..k]
            .iter()
            .all(|w| !u.is_empty() && LsnEvent::arbitrary(&mut u).is_ok_and(|e| w(&e)))
    };
    let mut bytes = Vec::new();
    for k in 1..=want.len() {
        let base = bytes.clone();
        // Zeros first complete an event that ended in the padding, then a run of one value.
        let found = (0..=4).find_map(|zeros| {
            (1..=6).find_map(|len| {
                (0..=255u8).find_map(|v| {
                    let mut b = base.clone();
                    b.extend(std::iter::repeat_n(0, zeros));
                    b.extend(std::iter::repeat_n(v, len));
                    matches(&b, k).then_some(b)
                })
            })
        });
        match found {
            Some(b) => bytes = b,
            None => break,
        }
    }
    bytes
}
