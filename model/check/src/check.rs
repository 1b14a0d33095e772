//! A stateright model of a whole migration: the real [`Source`] and [`Destination`] machines
//! composed with a nondeterministic environment.
//!
//! The machines are not re-implemented here: every transition feeds one input to the very
//! `Source::handle` / `Destination::handle` the transports call and carries out the commands
//! they return. What this module adds is only what the machines cannot decide themselves, and
//! it leaves every such choice to the checker:
//!
//! - a control channel (two ordered queues of encoded frames) and `channels` data channels
//!   (ordered queues of one-sided writes), reliable until they fail; a failure drops whatever
//!   is still queued and both sides notice it later;
//! - write completions in any order (RDMA orders nothing across queues);
//! - driver answers (dirty scans, pause, registrations, digests, device state, workload start)
//!   delivered at any later point, in any order;
//! - a guest that writes any page while the source workload runs, within a write budget;
//! - idle timers that fire at any time (costing a fault) or for free once nothing else can
//!   happen, keepalive timers within their own budget;
//! - operator cancel and crash of either side, within the fault budget.
//!
//! Memory is tiny (a few pages) and a page's content is a version counter (`0` reads as an
//! all-zero page), so "the destination holds what the source held at pause" is an exact
//! comparison, and digests are real xxh3 over those bytes.
//!
//! Properties are named after the spec's invariant IDs; `rdmig-model check` runs them and
//! `tests/check.rs` asserts them on the small configuration.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use stateright::{Checker, Expectation, HasDiscoveries, Model, Path, Property};

use rdmig_model::destination::{DestConfig, Destination};
use rdmig_model::digest::chunk_digest;
use rdmig_model::source::{LimitPolicy, Source, SourceConfig};
use rdmig_model::types::*;
use rdmig_model::wire::{self, AbortReason, BlockDesc, DigestAlg, Frame, Message, RegMode};

/// Every block uses 4 KiB pages; a page is one version byte in the model.
const PAGE_LOG2: u8 = 12;
/// The device-state blob the source hands over at switchover.
const DEVICE_STATE: &[u8] = b"rdmig device state";
/// Pre-shared key: the model runs the authenticated handshake, as production does.
const PSK: &[u8] = b"rdmig model key";
/// The machines read no clock; the model passes a constant. Timers fire by choice of the
/// checker instead of by deadline, so a constant clock loses no behaviour and keeps the
/// state space finite.
const NOW: Millis = 0;

/// Sizes and budgets of one model configuration. Every budget bounds the state space.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub name: &'static str,
    /// Pages per block, in the source's table order.
    pub block_pages: Vec<u64>,
    /// Pages per chunk (a power of two).
    pub chunk_pages: u64,
    /// One initial state per registration mode.
    pub modes: Vec<RegMode>,
    pub channels: u8,
    pub credit_window: u16,
    pub writes_per_channel: u16,
    pub reg_batch: u16,
    pub max_reg_inflight: u8,
    /// Destination pin budget, in chunks.
    pub pin_budget_chunks: u64,
    pub digest: DigestAlg,
    pub max_rounds: u32,
    /// Pages the guest may write during the whole migration (the bounded dirty rate).
    pub guest_writes: u8,
    /// The guest may also zero a page (exercises ZERO ranges after the first round).
    pub guest_zeroes: bool,
    /// Channel failures, crashes, cancels and early idle timeouts, in total.
    pub faults: u8,
    /// Keepalive timer firings; 0 disables keepalives on both sides.
    pub keepalives: u8,
    /// The destination lists its blocks in reverse order (matching is by name, spec: BLK-2).
    pub reverse_dst_blocks: bool,
    /// Deliberate machine bugs, to show the checker catches them.
    #[cfg(feature = "mutations")]
    pub mutations: rdmig_model::source::Mutations,
}

impl CheckConfig {
    /// Two blocks of three 2-page chunks, one data channel, a pin budget of four chunks (so
    /// the first round must evict), two guest writes and one fault.
    pub fn small() -> Self {
        CheckConfig {
            name: "small",
            block_pages: vec![6, 6],
            chunk_pages: 2,
            modes: vec![RegMode::Dynamic],
            channels: 1,
            credit_window: 4,
            writes_per_channel: 2,
            reg_batch: 1,
            max_reg_inflight: 2,
            pin_budget_chunks: 4,
            digest: DigestAlg::Xxh3_64,
            max_rounds: 3,
            guest_writes: 2,
            guest_zeroes: false,
            faults: 1,
            keepalives: 0,
            reverse_dst_blocks: false,
            #[cfg(feature = "mutations")]
            mutations: Default::default(),
        }
    }

    /// Two data channels (writes of one round race each other), reversed destination block
    /// order, pin-all as a second initial state, zeroing guest writes, registration bursts
    /// longer than the credit window (so senders block on credits), one keepalive. The guest
    /// writes one page: with 24 guest choices per step a second write multiplies the ~55
    /// million states by about ten.
    pub fn medium() -> Self {
        CheckConfig {
            name: "medium",
            modes: vec![RegMode::Dynamic, RegMode::PinAll],
            channels: 2,
            max_reg_inflight: 4,
            guest_writes: 1,
            guest_zeroes: true,
            reverse_dst_blocks: true,
            keepalives: 1,
            ..Self::small()
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "small" => Some(Self::small()),
            "medium" => Some(Self::medium()),
            _ => None,
        }
    }

    fn chunk_log2(&self) -> u8 {
        PAGE_LOG2 + self.chunk_pages.trailing_zeros() as u8
    }
}

/// The model: configuration plus the machine configurations derived from it.
#[derive(Debug, Clone)]
pub struct ProtocolModel {
    pub cfg: CheckConfig,
    /// One (source, destination) configuration pair per initial state.
    machines: Vec<(SourceConfig, DestConfig)>,
    /// Destination (local) block index -> source block index.
    dst_order: Vec<usize>,
}

/// One side of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Src,
    Dst,
}

/// A request a machine issued to its driver that awaits an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SrcReq {
    Scan { all: bool },
    Pause,
    DeviceState,
    Digests,
}

/// A request the destination issued to its driver that awaits an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DstReq {
    Register {
        target: RegTarget,
        block: u16,
        offset: u64,
        len: u64,
    },
    Digests,
    Start,
}

/// What the checker may do next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// The oldest control frame from the source arrives at the destination.
    CtrlToDst,
    CtrlToSrc,
    /// The oldest write of data channel `n` reaches the destination's NIC.
    Land(u8),
    /// A write completion reaches the source.
    Complete {
        wr_id: u64,
        ok: bool,
    },
    SrcDriver(SrcReq),
    DstDriver(DstReq),
    /// A side notices that a connection failed or was closed by its peer.
    Notice(Side),
    /// The guest writes a page (its version goes up).
    GuestWrite {
        block: u16,
        page: u16,
    },
    /// The guest zeroes a page.
    GuestZero {
        block: u16,
        page: u16,
    },
    Timer(Side, TimerKind),
    FailControl,
    FailData(u8),
    Crash(Side),
    Cancel(Side),
}

/// A one-sided write on a data channel. It carries the page versions it read when posted:
/// the NIC reads source memory at some point before completion, and the earliest point is the
/// adversarial one (a late write then carries stale data).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Write {
    pub wr_id: u64,
    pub rkey: u32,
    pub remote_offset: u64,
    pub len: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataChannel {
    pub up: bool,
    pub writes: VecDeque<Write>,
}

/// A registration as the destination NIC holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mr {
    /// Destination (local) block.
    pub block: u16,
    pub offset: u64,
    pub len: u64,
}

/// Whether a side has been told its connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notice {
    None,
    Pending,
    /// Delivered, or moot because the side has ended.
    Done,
}

/// The kind of input that ended the source in doubt (spec: INV-DOUBT-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    Frame,
    Malformed,
    WriteDone,
    WriteFailed,
    Driver,
    Timer(TimerKind),
    TransportFailed,
    Cancel,
    Start,
}

impl Cause {
    fn of(i: &Input) -> Self {
        match i {
            Input::Start => Cause::Start,
            Input::Frame(_) => Cause::Frame,
            Input::Malformed(_) => Cause::Malformed,
            Input::WriteDone { .. } => Cause::WriteDone,
            Input::WriteFailed { .. } => Cause::WriteFailed,
            Input::Timer(k) => Cause::Timer(*k),
            Input::TransportFailed => Cause::TransportFailed,
            Input::Cancel => Cause::Cancel,
            _ => Cause::Driver,
        }
    }
}

/// What the environment saw happen, for the properties. Determined by the path taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Observed {
    /// The source emitted COMMIT.
    pub commit_sent: bool,
    /// A STARTED frame reached the source.
    pub started_received: bool,
    /// The source sent an UNREG_REQUEST (an eviction).
    pub evicted: bool,
    /// What ended the source in doubt.
    pub doubt_cause: Option<Cause>,
    /// INV-MEM-1 verdict at the moment the destination workload started.
    pub memory_equal_at_start: Option<bool>,
    /// SW-8: a registration was still live when the destination workload started.
    pub registered_at_start: bool,
    /// FC-3: a frame spent the sender's last credit without granting any back.
    pub last_credit_misused: bool,
    /// INV-REG-1: the first write the NIC had to reject while it should not have happened.
    pub reg_violation: Option<&'static str>,
    /// A command the driver could not carry out (frame that does not encode, wrong-side
    /// command, range outside memory).
    pub driver_violation: Option<&'static str>,
    /// A machine panicked (a production assertion fired); the state is terminal.
    pub panic: Option<String>,
}

/// One global state: both machines and everything between and around them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    pub src: Source,
    pub dst: Destination,
    /// Encoded control frames in flight, source to destination.
    pub s2d: VecDeque<Vec<u8>>,
    pub d2s: VecDeque<Vec<u8>>,
    pub ctrl_up: bool,
    pub data: Vec<DataChannel>,
    /// Completions not yet delivered, sorted: delivery order is the checker's choice.
    pub completions: Vec<(u64, bool)>,
    /// The destination NIC's registration table.
    pub nic: BTreeMap<u32, Mr>,
    pub next_rkey: u32,
    /// Page versions per block (source order).
    pub src_mem: Vec<Vec<u8>>,
    /// Page versions per block (destination order).
    pub dst_mem: Vec<Vec<u8>>,
    /// The source's dirty log.
    pub dirty: Vec<PageBitmap>,
    pub src_pending: Vec<SrcReq>,
    pub dst_pending: Vec<DstReq>,
    pub src_notice: Notice,
    pub dst_notice: Notice,
    pub src_running: bool,
    pub dst_running: bool,
    pub src_crashed: bool,
    pub dst_crashed: bool,
    /// Source memory when the pause completed.
    pub snapshot: Option<Vec<Vec<u8>>>,
    /// Device state the destination stored.
    pub state_received: Vec<u8>,
    pub faults_left: u8,
    pub guest_left: u8,
    pub keepalives_left: u8,
    pub obs: Observed,
}

impl State {
    pub fn src_live(&self) -> bool {
        !self.src_crashed && self.src.outcome().is_none()
    }
    pub fn dst_live(&self) -> bool {
        !self.dst_crashed && self.dst.outcome().is_none()
    }
    pub fn live(&self, side: Side) -> bool {
        match side {
            Side::Src => self.src_live(),
            Side::Dst => self.dst_live(),
        }
    }
    fn completed(&self) -> bool {
        self.src.outcome() == Some(Outcome::Completed)
            && self.dst.outcome() == Some(Outcome::Completed)
    }

    /// A few lines describing the state, for traces.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let side = |outcome: Option<Outcome>, crashed: bool, phase: String| {
            if crashed {
                "CRASHED".to_string()
            } else {
                match outcome {
                    Some(o) => format!("{o:?}"),
                    None => phase,
                }
            }
        };
        let _ =
            writeln!(
            s,
            "src {} round {} credits {} reg {}B workload {} | dst {} round {} reg {}B workload {}",
            side(
                self.src.outcome(),
                self.src_crashed,
                format!("{:?}", self.src.phase())
            ),
            self.src.round(),
            self.src.credits().send,
            self.src.registered_bytes(),
            if self.src_running { "RUNNING" } else { "paused" },
            side(
                self.dst.outcome(),
                self.dst_crashed,
                format!("{:?}", self.dst.phase())
            ),
            self.dst.round(),
            self.dst.registered_bytes(),
            if self.dst_running { "RUNNING" } else { "stopped" },
        );
        let frames = |q: &VecDeque<Vec<u8>>| {
            q.iter()
                .map(|b| frame_brief(b))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "  ctrl {}: s2d [{}] d2s [{}]",
            if self.ctrl_up { "up" } else { "DOWN" },
            frames(&self.s2d),
            frames(&self.d2s)
        );
        for (i, ch) in self.data.iter().enumerate() {
            let ws: Vec<String> = ch
                .writes
                .iter()
                .map(|w| {
                    format!(
                        "w{} key {:#x} @{}+{} {:?}",
                        w.wr_id, w.rkey, w.remote_offset, w.len, w.data
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "  data{i} {}: [{}]",
                if ch.up { "up" } else { "DOWN" },
                ws.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  completions {:?} | src driver {:?} | dst driver {:?} | notices src {:?} dst {:?}",
            self.completions, self.src_pending, self.dst_pending, self.src_notice, self.dst_notice
        );
        let nic: Vec<String> = self
            .nic
            .iter()
            .map(|(k, m)| format!("{k:#x}=b{}@{}+{}", m.block, m.offset, m.len))
            .collect();
        let _ = writeln!(s, "  nic [{}]", nic.join(", "));
        let _ = writeln!(
            s,
            "  mem src {:?} dst {:?} snapshot {:?}",
            self.src_mem, self.dst_mem, self.snapshot
        );
        let o = &self.obs;
        let mut seen: Vec<String> = [
            (o.commit_sent, "COMMIT sent"),
            (o.started_received, "STARTED received"),
            (o.evicted, "evicted"),
            (o.registered_at_start, "REGISTERED AT START"),
            (o.last_credit_misused, "LAST CREDIT MISUSED"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
        .collect();
        if let Some(eq) = o.memory_equal_at_start {
            seen.push(format!("memory equal at start: {eq}"));
        }
        if let Some(c) = o.doubt_cause {
            seen.push(format!("in doubt by {c:?}"));
        }
        for v in [o.reg_violation, o.driver_violation].into_iter().flatten() {
            seen.push(format!("VIOLATION: {v}"));
        }
        if let Some(p) = &o.panic {
            seen.push(format!("PANIC: {p}"));
        }
        let _ = write!(
            s,
            "  budgets: faults {} guest {} keepalives {} | observed: {}",
            self.faults_left,
            self.guest_left,
            self.keepalives_left,
            seen.join(", ")
        );
        s
    }
}

/// Message name plus the fields that matter for reading a trace.
fn frame_brief(bytes: &[u8]) -> String {
    match wire::decode(bytes) {
        Ok(f) => {
            let m = match &f.msg {
                Message::RegRequest { req_id, chunks } => {
                    format!("REG_REQUEST#{req_id} {chunks:?}")
                }
                Message::RegResult { req_id, rkeys } => format!("REG_RESULT#{req_id} {rkeys:x?}"),
                Message::UnregRequest { req_id, chunks } => {
                    format!("UNREG_REQUEST#{req_id} {chunks:?}")
                }
                Message::UnregDone { req_id, count } => format!("UNREG_DONE#{req_id} n={count}"),
                Message::Zero { round, ranges } => format!("ZERO r{round} {ranges:?}"),
                Message::RoundEnd { round, last, .. } => format!("ROUND_END r{round} last={last}"),
                Message::RoundAck { round } => format!("ROUND_ACK r{round}"),
                Message::DeviceState { offset, data, .. } => {
                    format!("DEVICE_STATE @{offset}+{}", data.len())
                }
                Message::Digests {
                    first_chunk,
                    digests,
                } => format!("DIGESTS @{first_chunk} n={}", digests.len()),
                Message::Prepare {
                    state_len,
                    digest_count,
                } => format!("PREPARE state={state_len} digests={digest_count}"),
                Message::Abort { reason } => format!("ABORT {reason:?}"),
                other => other.name().to_string(),
            };
            format!("{m} +{}", f.credits)
        }
        Err(e) => format!("<malformed: {e}>"),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

impl ProtocolModel {
    pub fn new(cfg: CheckConfig) -> Self {
        let blocks: Vec<BlockDesc> = cfg
            .block_pages
            .iter()
            .enumerate()
            .map(|(i, &pages)| BlockDesc {
                name: format!("block{i}").into_bytes(),
                length: pages << PAGE_LOG2,
                page_log2: PAGE_LOG2,
            })
            .collect();
        let chunk_bytes = 1u64 << cfg.chunk_log2();
        let keepalive_ms = if cfg.keepalives > 0 { 500 } else { 0 };
        let mut dst_blocks = blocks.clone();
        if cfg.reverse_dst_blocks {
            dst_blocks.reverse();
        }
        let dst_order = dst_blocks
            .iter()
            .map(|d| rdmig_model::wire::block_index(&blocks, &d.name).expect("same names"))
            .collect();
        let machines = cfg
            .modes
            .iter()
            .map(|&mode| {
                let mut s = SourceConfig::with_defaults(0x5e55, blocks.clone(), Some(PSK.to_vec()));
                s.params.chunk_log2 = cfg.chunk_log2();
                s.params.mode = mode;
                s.params.channels = cfg.channels;
                s.params.digest = cfg.digest;
                s.params.max_reg_inflight = cfg.max_reg_inflight;
                s.credit_window = cfg.credit_window;
                s.writes_per_channel = cfg.writes_per_channel;
                s.reg_batch = cfg.reg_batch;
                s.max_rounds = cfg.max_rounds;
                s.on_limit = LimitPolicy::Switchover;
                s.idle_timeout_ms = 1_000;
                s.keepalive_ms = keepalive_ms;
                // Pin-all needs every byte pinned (spec: REG-8); dynamic mode gets the small
                // chunk budget so that rounds must evict.
                let pin_budget = match mode {
                    RegMode::PinAll => cfg.block_pages.iter().sum::<u64>() << PAGE_LOG2,
                    RegMode::Dynamic => cfg.pin_budget_chunks * chunk_bytes,
                };
                let mut d =
                    DestConfig::with_defaults(dst_blocks.clone(), Some(PSK.to_vec()), pin_budget);
                d.credit_window = cfg.credit_window;
                d.idle_timeout_ms = 1_000;
                d.keepalive_ms = keepalive_ms;
                (s, d)
            })
            .collect();
        ProtocolModel {
            cfg,
            machines,
            dst_order,
        }
    }

    fn initial(&self, src_cfg: &SourceConfig, dst_cfg: &DestConfig) -> State {
        #[allow(unused_mut)]
        let mut src =
            Source::new(src_cfg.clone(), [1; wire::NONCE_LEN]).expect("valid source config");
        #[cfg(feature = "mutations")]
        {
            src.mutations = self.cfg.mutations;
        }
        let dst = Destination::new(dst_cfg.clone(), [2; wire::NONCE_LEN])
            .expect("valid destination config");
        // Every third page starts out zero, so the first round sends ZERO ranges too.
        let src_mem: Vec<Vec<u8>> = self
            .cfg
            .block_pages
            .iter()
            .map(|&n| (0..n).map(|p| u8::from(p % 3 != 2)).collect())
            .collect();
        // The destination starts with garbage no source page can hold.
        let dst_mem = self
            .dst_order
            .iter()
            .map(|&b| vec![0xee; self.cfg.block_pages[b] as usize])
            .collect();
        let mut s = State {
            src,
            dst,
            s2d: VecDeque::new(),
            d2s: VecDeque::new(),
            ctrl_up: true,
            data: vec![
                DataChannel {
                    up: true,
                    writes: VecDeque::new(),
                };
                self.cfg.channels as usize
            ],
            completions: Vec::new(),
            nic: BTreeMap::new(),
            next_rkey: 0x100,
            src_mem,
            dst_mem,
            dirty: self
                .cfg
                .block_pages
                .iter()
                .map(|&n| PageBitmap::new(n))
                .collect(),
            src_pending: Vec::new(),
            dst_pending: Vec::new(),
            src_notice: Notice::None,
            dst_notice: Notice::None,
            src_running: true,
            dst_running: false,
            src_crashed: false,
            dst_crashed: false,
            snapshot: None,
            state_received: Vec::new(),
            faults_left: self.cfg.faults,
            guest_left: self.cfg.guest_writes,
            keepalives_left: self.cfg.keepalives,
            obs: Observed::default(),
        };
        self.feed_src(&mut s, Input::Start);
        self.settle(&mut s);
        s
    }

    // ---------------------------------------------------------------------------------------
    // Feeding the machines and carrying out their commands

    fn feed_src(&self, s: &mut State, input: Input) {
        if let Input::Frame(Frame {
            msg: Message::Started,
            ..
        }) = &input
        {
            s.obs.started_received = true;
        }
        let cause = Cause::of(&input);
        let was_live = s.src.outcome().is_none();
        let mut out = Vec::new();
        let src = &mut s.src;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| src.handle(NOW, input, &mut out))) {
            s.obs.panic = Some(format!("source: {}", panic_message(p)));
            return;
        }
        if was_live && matches!(s.src.outcome(), Some(Outcome::InDoubt(_))) {
            s.obs.doubt_cause = Some(cause);
        }
        for c in out {
            self.exec_src(s, c);
        }
    }

    fn feed_dst(&self, s: &mut State, input: Input) {
        let mut out = Vec::new();
        let dst = &mut s.dst;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| dst.handle(NOW, input, &mut out))) {
            s.obs.panic = Some(format!("destination: {}", panic_message(p)));
            return;
        }
        for c in out {
            self.exec_dst(s, c);
        }
    }

    fn feed(&self, s: &mut State, side: Side, input: Input) {
        match side {
            Side::Src => self.feed_src(s, input),
            Side::Dst => self.feed_dst(s, input),
        }
    }

    fn driver_violation(s: &mut State, what: &'static str) {
        s.obs.driver_violation.get_or_insert(what);
    }

    /// Encodes a frame as the transport would; a frame that does not encode is a machine bug.
    fn encode(s: &mut State, f: &Frame) -> Option<Vec<u8>> {
        match wire::encode_to_vec(f) {
            Ok(b) => Some(b),
            Err(_) => {
                Self::driver_violation(s, "a machine sent a frame that does not encode");
                None
            }
        }
    }

    fn exec_src(&self, s: &mut State, c: Command) {
        match c {
            Command::Send(f) => {
                match f.msg {
                    Message::Commit => s.obs.commit_sent = true,
                    Message::UnregRequest { .. } => s.obs.evicted = true,
                    _ => {}
                }
                if let Some(b) = Self::encode(s, &f) {
                    if s.ctrl_up {
                        s.s2d.push_back(b);
                        check_last_credit(s, Side::Src, f.credits);
                    }
                }
            }
            Command::PostWrite {
                channel,
                wr_id,
                block,
                offset,
                len,
                rkey,
                remote_offset,
            } => {
                let pages = s.src_mem.get(block as usize).map_or(0, |m| m.len() as u64);
                let first = offset >> PAGE_LOG2;
                let count = len >> PAGE_LOG2;
                let aligned = (offset | len) & ((1 << PAGE_LOG2) - 1) == 0;
                if !aligned || count == 0 || first + count > pages {
                    return Self::driver_violation(s, "write reads outside its source block");
                }
                let Some(ch) = s.data.get_mut(channel as usize) else {
                    return Self::driver_violation(
                        s,
                        "write posted to a channel that does not exist",
                    );
                };
                if ch.up {
                    let data = s.src_mem[block as usize][first as usize..(first + count) as usize]
                        .to_vec();
                    ch.writes.push_back(Write {
                        wr_id,
                        rkey,
                        remote_offset,
                        len,
                        data,
                    });
                } else {
                    // A queue pair in error flushes every new work request.
                    insert_sorted(&mut s.completions, (wr_id, false));
                }
            }
            Command::ScanDirty { all } => s.src_pending.push(SrcReq::Scan { all }),
            Command::PauseWorkload => s.src_pending.push(SrcReq::Pause),
            Command::ResumeWorkload => {
                // The driver runs workload operations in order: a pause still in progress
                // completes first, then the resume; the net effect is a running workload.
                s.src_pending.retain(|r| *r != SrcReq::Pause);
                s.src_running = true;
            }
            Command::CaptureDeviceState => s.src_pending.push(SrcReq::DeviceState),
            Command::ComputeDigests => s.src_pending.push(SrcReq::Digests),
            Command::Finish(_) => {}
            Command::Register { .. }
            | Command::Unregister { .. }
            | Command::ZeroFill { .. }
            | Command::StoreDeviceState { .. }
            | Command::StartWorkload => {
                Self::driver_violation(s, "the source issued a destination command")
            }
        }
    }

    fn exec_dst(&self, s: &mut State, c: Command) {
        match c {
            Command::Send(f) => {
                if let Some(b) = Self::encode(s, &f) {
                    if s.ctrl_up {
                        s.d2s.push_back(b);
                        check_last_credit(s, Side::Dst, f.credits);
                    }
                }
            }
            Command::Register {
                target,
                block,
                offset,
                len,
            } => {
                let bytes = s
                    .dst_mem
                    .get(block as usize)
                    .map_or(0, |m| (m.len() as u64) << PAGE_LOG2);
                if len == 0 || offset + len > bytes {
                    return Self::driver_violation(s, "registration outside its block");
                }
                s.dst_pending.push(DstReq::Register {
                    target,
                    block,
                    offset,
                    len,
                });
            }
            Command::Unregister { rkey, .. } => {
                if s.nic.remove(&rkey).is_none() {
                    Self::driver_violation(s, "unregister of a key the NIC does not hold");
                }
            }
            Command::ZeroFill { block, offset, len } => {
                let first = (offset >> PAGE_LOG2) as usize;
                let count = (len >> PAGE_LOG2) as usize;
                match s.dst_mem.get_mut(block as usize) {
                    Some(m) if first + count <= m.len() => m[first..first + count].fill(0),
                    _ => Self::driver_violation(s, "zero fill outside its block"),
                }
            }
            Command::StoreDeviceState { offset, data } => {
                if offset as usize != s.state_received.len() {
                    return Self::driver_violation(s, "device state stored out of order");
                }
                s.state_received.extend_from_slice(&data);
            }
            Command::ComputeDigests => s.dst_pending.push(DstReq::Digests),
            Command::StartWorkload => s.dst_pending.push(DstReq::Start),
            Command::Finish(_) => {}
            Command::PostWrite { .. }
            | Command::ScanDirty { .. }
            | Command::PauseWorkload
            | Command::ResumeWorkload
            | Command::CaptureDeviceState => {
                Self::driver_violation(s, "the destination issued a source command")
            }
        }
    }

    fn digests(&self, mem: &[Vec<u8>]) -> Vec<u64> {
        mem.iter()
            .flat_map(|b| b.chunks(self.cfg.chunk_pages as usize).map(chunk_digest))
            .collect()
    }

    fn answer_src(&self, s: &mut State, r: SrcReq) {
        match r {
            SrcReq::Scan { all } => {
                let mut dirty = Vec::new();
                let mut zero = Vec::new();
                for (b, mem) in s.src_mem.iter().enumerate() {
                    let n = mem.len() as u64;
                    let d = if all {
                        PageBitmap::full(n)
                    } else {
                        s.dirty[b].clone()
                    };
                    s.dirty[b] = PageBitmap::new(n);
                    let mut z = PageBitmap::new(n);
                    for p in 0..n {
                        if d.get(p) && mem[p as usize] == 0 {
                            z.set(p);
                        }
                    }
                    dirty.push(d);
                    zero.push(z);
                }
                self.feed_src(s, Input::Dirty(DirtyScan { dirty, zero }));
            }
            SrcReq::Pause => {
                s.src_running = false;
                s.snapshot = Some(s.src_mem.clone());
                self.feed_src(s, Input::WorkloadPaused);
            }
            SrcReq::DeviceState => self.feed_src(s, Input::DeviceState(DEVICE_STATE.to_vec())),
            SrcReq::Digests => {
                let d = self.digests(&s.src_mem);
                self.feed_src(s, Input::Digests(d));
            }
        }
    }

    fn answer_dst(&self, s: &mut State, r: DstReq) {
        match r {
            DstReq::Register {
                target,
                block,
                offset,
                len,
            } => {
                let rkey = s.next_rkey;
                s.next_rkey += 1;
                s.nic.insert(rkey, Mr { block, offset, len });
                self.feed_dst(s, Input::Registered { target, rkey });
            }
            DstReq::Digests => {
                let d = self.digests(&s.dst_mem);
                self.feed_dst(s, Input::Digests(d));
            }
            DstReq::Start => {
                // spec: INV-MEM-1: compare at the moment the workload starts.
                let equal = s.snapshot.as_ref().is_some_and(|snap| {
                    self.dst_order
                        .iter()
                        .enumerate()
                        .all(|(d, &b)| snap[b] == s.dst_mem[d])
                }) && s.state_received == DEVICE_STATE;
                if s.obs.memory_equal_at_start != Some(false) {
                    s.obs.memory_equal_at_start = Some(equal);
                }
                if !s.nic.is_empty() {
                    s.obs.registered_at_start = true; // spec: SW-8
                }
                s.dst_running = true;
                self.feed_dst(s, Input::WorkloadStarted);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The environment

    /// The NIC places (or rejects) the oldest write of a channel (spec: INV-REG-1, DATA-1).
    fn land(&self, s: &mut State, ch: usize) {
        let Some(w) = s.data[ch].writes.pop_front() else {
            return;
        };
        let placed = match s.nic.get(&w.rkey).copied() {
            Some(mr) if w.remote_offset + w.len <= mr.len => {
                let first = ((mr.offset + w.remote_offset) >> PAGE_LOG2) as usize;
                let mem = &mut s.dst_mem[mr.block as usize];
                if first + w.data.len() <= mem.len() {
                    mem[first..first + w.data.len()].copy_from_slice(&w.data);
                    true
                } else {
                    s.obs
                        .reg_violation
                        .get_or_insert("write lands beyond its block");
                    false
                }
            }
            Some(_) => {
                s.obs
                    .reg_violation
                    .get_or_insert("write beyond the bounds of its registration");
                false
            }
            None => {
                // Rejection is fine once the destination has ended (its keys are revoked).
                if s.dst_live() {
                    s.obs.reg_violation.get_or_insert(
                        "write to a key the destination has not registered (or has unregistered)",
                    );
                }
                false
            }
        };
        if placed {
            insert_sorted(&mut s.completions, (w.wr_id, true));
        } else {
            // A remote access error completes the write in error and breaks the queue pair.
            insert_sorted(&mut s.completions, (w.wr_id, false));
            self.fail_data(s, ch);
        }
    }

    fn raise_notices(s: &mut State) {
        for side in [Side::Src, Side::Dst] {
            let live = s.live(side);
            let n = match side {
                Side::Src => &mut s.src_notice,
                Side::Dst => &mut s.dst_notice,
            };
            if live && *n == Notice::None {
                *n = Notice::Pending;
            }
        }
    }

    /// The control connection breaks: everything in flight is lost and both sides notice.
    fn fail_control(&self, s: &mut State) {
        s.ctrl_up = false;
        s.s2d.clear();
        s.d2s.clear();
        Self::raise_notices(s);
    }

    /// A data channel breaks: queued writes complete in error, both sides notice.
    fn fail_data(&self, s: &mut State, ch: usize) {
        s.data[ch].up = false;
        for w in std::mem::take(&mut s.data[ch].writes) {
            insert_sorted(&mut s.completions, (w.wr_id, false));
        }
        Self::raise_notices(s);
    }

    fn crash(&self, s: &mut State, side: Side) {
        match side {
            Side::Src => {
                // The source process holds the workload: it dies too. Its writes die with it.
                s.src_crashed = true;
                s.src_running = false;
                s.src_pending.clear();
                for ch in &mut s.data {
                    ch.up = false;
                    ch.writes.clear();
                }
            }
            Side::Dst => {
                // The OS revokes the dead process's registrations; writes then fail.
                s.dst_crashed = true;
                s.dst_running = false;
                s.dst_pending.clear();
                s.nic.clear();
                for ch in 0..s.data.len() {
                    self.fail_data(s, ch);
                }
            }
        }
        self.fail_control(s);
    }

    /// Consequences that follow by themselves: inputs for a side that has ended are dropped,
    /// and a side that has ended closes its connections once its last frame has left, so its
    /// peer notices (as a real transport closes the queue pair on finish).
    fn settle(&self, s: &mut State) {
        if !s.src_live() {
            s.completions.clear();
            s.d2s.clear();
            s.src_pending.clear();
            s.src_notice = Notice::Done;
        }
        if !s.dst_live() {
            s.s2d.clear();
            s.dst_pending.clear();
            s.dst_notice = Notice::Done;
        }
        if s.src.outcome().is_some() && s.s2d.is_empty() && s.dst_notice == Notice::None {
            s.dst_notice = Notice::Pending;
        }
        if s.dst.outcome().is_some() && s.d2s.is_empty() && s.src_notice == Notice::None {
            s.src_notice = Notice::Pending;
        }
        if !s.src_live() && !s.dst_live() {
            for ch in &mut s.data {
                ch.writes.clear();
            }
        }
        if s.dst.outcome().is_some() && !s.dst_crashed && !s.nic.is_empty() {
            s.obs
                .reg_violation
                .get_or_insert("memory still registered after the destination ended");
        }
    }

    /// Actions that make progress without a fault: deliveries, driver answers, the guest.
    fn progress_actions(&self, s: &State, out: &mut Vec<Action>) {
        if !s.s2d.is_empty() {
            out.push(Action::CtrlToDst);
        }
        if !s.d2s.is_empty() {
            out.push(Action::CtrlToSrc);
        }
        for (i, ch) in s.data.iter().enumerate() {
            if !ch.writes.is_empty() {
                out.push(Action::Land(i as u8));
            }
        }
        for &(wr_id, ok) in &s.completions {
            out.push(Action::Complete { wr_id, ok });
        }
        for r in &s.src_pending {
            out.push(Action::SrcDriver(r.clone()));
        }
        for r in &s.dst_pending {
            out.push(Action::DstDriver(r.clone()));
        }
        if s.src_notice == Notice::Pending {
            out.push(Action::Notice(Side::Src));
        }
        if s.dst_notice == Notice::Pending {
            out.push(Action::Notice(Side::Dst));
        }
        // The guest runs while the workload runs at the source; writes before the first scan
        // (which reports every page) would change nothing, so they start with round 1.
        if s.src_running && s.guest_left > 0 && s.src_live() && s.src.round() >= 1 {
            for (b, mem) in s.src_mem.iter().enumerate() {
                for (p, &v) in mem.iter().enumerate() {
                    out.push(Action::GuestWrite {
                        block: b as u16,
                        page: p as u16,
                    });
                    if self.cfg.guest_zeroes && v != 0 {
                        out.push(Action::GuestZero {
                            block: b as u16,
                            page: p as u16,
                        });
                    }
                }
            }
        }
    }

    fn timers(s: &State, side: Side) -> Timers {
        match side {
            Side::Src => s.src.timers(),
            Side::Dst => s.dst.timers(),
        }
    }

    fn quiescent(&self, s: &State) -> bool {
        let mut v = Vec::new();
        self.progress_actions(s, &mut v);
        v.is_empty()
    }
}

fn insert_sorted(v: &mut Vec<(u64, bool)>, x: (u64, bool)) {
    let i = v.partition_point(|&y| y < x);
    v.insert(i, x);
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        self.machines
            .iter()
            .map(|(s, d)| self.initial(s, d))
            .collect()
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        if s.obs.panic.is_some() {
            return; // a machine assertion fired: nothing meaningful follows
        }
        self.progress_actions(s, out);
        let quiet = out.is_empty();
        let faults = s.faults_left > 0;
        for side in [Side::Src, Side::Dst] {
            if !s.live(side) {
                continue;
            }
            let t = Self::timers(s, side);
            // spec: ERR-4: an idle timeout may fire early (a slow peer, costing a fault) and
            // fires for free once nothing else can happen (the peer is gone or stuck).
            if t.idle.is_some() && (faults || quiet) {
                out.push(Action::Timer(side, TimerKind::Idle));
            }
            if t.keepalive.is_some() && s.keepalives_left > 0 {
                out.push(Action::Timer(side, TimerKind::Keepalive));
            }
        }
        if faults {
            let any_live = s.src_live() || s.dst_live();
            if s.ctrl_up && any_live {
                out.push(Action::FailControl);
            }
            for (i, ch) in s.data.iter().enumerate() {
                if ch.up && any_live {
                    out.push(Action::FailData(i as u8));
                }
            }
            for side in [Side::Src, Side::Dst] {
                if s.live(side) {
                    out.push(Action::Cancel(side));
                    out.push(Action::Crash(side));
                }
            }
        }
    }

    fn next_state(&self, old: &State, a: Action) -> Option<State> {
        let mut s = old.clone();
        let mut check_noop = false;
        match a {
            Action::CtrlToDst | Action::CtrlToSrc => {
                let (q, side) = if a == Action::CtrlToDst {
                    (&mut s.s2d, Side::Dst)
                } else {
                    (&mut s.d2s, Side::Src)
                };
                let bytes = q.pop_front()?;
                let input = match wire::decode(&bytes) {
                    Ok(f) => Input::Frame(f),
                    Err(e) => Input::Malformed(e),
                };
                self.feed(&mut s, side, input);
            }
            Action::Land(ch) => self.land(&mut s, ch as usize),
            Action::Complete { wr_id, ok } => {
                let i = s.completions.iter().position(|&c| c == (wr_id, ok))?;
                s.completions.remove(i);
                let input = if ok {
                    Input::WriteDone { wr_id }
                } else {
                    Input::WriteFailed { wr_id }
                };
                self.feed_src(&mut s, input);
            }
            Action::SrcDriver(r) => {
                let i = s.src_pending.iter().position(|x| *x == r)?;
                s.src_pending.remove(i);
                self.answer_src(&mut s, r);
            }
            Action::DstDriver(r) => {
                let i = s.dst_pending.iter().position(|x| *x == r)?;
                s.dst_pending.remove(i);
                self.answer_dst(&mut s, r);
            }
            Action::Notice(side) => {
                match side {
                    Side::Src => s.src_notice = Notice::Done,
                    Side::Dst => s.dst_notice = Notice::Done,
                }
                self.feed(&mut s, side, Input::TransportFailed); // spec: ERR-3
            }
            Action::GuestWrite { block, page } => {
                let v = &mut s.src_mem[block as usize][page as usize];
                *v = v.checked_add(1)?;
                s.dirty[block as usize].set(page as u64);
                s.guest_left -= 1;
            }
            Action::GuestZero { block, page } => {
                s.src_mem[block as usize][page as usize] = 0;
                s.dirty[block as usize].set(page as u64);
                s.guest_left -= 1;
            }
            Action::Timer(side, kind) => {
                check_noop = true;
                match kind {
                    TimerKind::Idle => {
                        if !self.quiescent(old) {
                            s.faults_left = s.faults_left.checked_sub(1)?;
                        }
                    }
                    TimerKind::Keepalive => s.keepalives_left = s.keepalives_left.checked_sub(1)?,
                }
                self.feed(&mut s, side, Input::Timer(kind));
            }
            Action::FailControl => {
                s.faults_left -= 1;
                self.fail_control(&mut s);
            }
            Action::FailData(ch) => {
                s.faults_left -= 1;
                self.fail_data(&mut s, ch as usize);
            }
            Action::Crash(side) => {
                s.faults_left -= 1;
                self.crash(&mut s, side);
            }
            Action::Cancel(side) => {
                check_noop = true;
                s.faults_left -= 1;
                self.feed(&mut s, side, Input::Cancel); // spec: ERR-1
            }
        }
        self.settle(&mut s);
        if check_noop {
            // A timer or cancel the machine ignores changes nothing but a budget: leaving it
            // out keeps the graph free of spurious states.
            let mut probe = s.clone();
            probe.faults_left = old.faults_left;
            probe.keepalives_left = old.keepalives_left;
            if probe == *old {
                return None;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(P_MEM, |_, s: &State| {
                s.obs.memory_equal_at_start != Some(false)
            }),
            Property::always(P_MEM_DIGEST, |_, s: &State| {
                // The environment never corrupts data, so a digest mismatch is a lost update.
                let mismatch = |o: Option<Outcome>| matches!(o, Some(Outcome::Aborted(a)) if a.reason == AbortReason::DigestMismatch);
                !mismatch(s.src.outcome()) && !mismatch(s.dst.outcome())
            }),
            Property::always(P_REG, |_, s: &State| s.obs.reg_violation.is_none()),
            Property::always(P_SW8, |_, s: &State| !s.obs.registered_at_start),
            Property::always(P_OWN1, |_, s: &State| !(s.src_running && s.dst_running)),
            Property::always(P_SW6, |_, s: &State| {
                !(matches!(s.src.outcome(), Some(Outcome::InDoubt(_))) && s.src_running)
            }),
            Property::always(P_OWN2, |_, s: &State| {
                let src_ok = !matches!(s.src.outcome(), Some(Outcome::Aborted(_))) || s.src_running;
                let dst_ok =
                    !matches!(s.dst.outcome(), Some(Outcome::Aborted(_))) || !s.dst_running;
                src_ok && dst_ok
            }),
            Property::always(P_FC, |_, s: &State| fc_ok(s)),
            Property::always(P_FC3, |_, s: &State| !s.obs.last_credit_misused),
            Property::always(P_PIN, |_, s: &State| {
                let budget = s.dst.pin_budget();
                let nic: u64 = s.nic.values().map(|m| m.len).sum();
                s.dst.registered_bytes() <= budget
                    && nic <= budget
                    && s.src.registered_bytes() <= budget
            }),
            Property::always(P_DOUBT, |_, s: &State| match s.src.outcome() {
                Some(Outcome::InDoubt(_)) => {
                    s.obs.commit_sent
                        && !s.obs.started_received
                        && matches!(
                            s.obs.doubt_cause,
                            Some(
                                Cause::TransportFailed
                                    | Cause::WriteFailed
                                    | Cause::Timer(TimerKind::Idle)
                            )
                        )
                }
                _ => true,
            }),
            Property::always(P_SANE, |_, s: &State| {
                s.obs.panic.is_none() && s.obs.driver_violation.is_none()
            }),
            Property::always(P_LIVE_CLEAN, |m: &ProtocolModel, s: &State| {
                // Without any fault, nothing may end other than Completed: a timeout here
                // means the protocol got stuck on its own.
                s.faults_left < m.cfg.faults
                    || (!s.src_crashed
                        && !s.dst_crashed
                        && matches!(s.src.outcome(), None | Some(Outcome::Completed))
                        && matches!(s.dst.outcome(), None | Some(Outcome::Completed)))
            }),
            Property::eventually(P_LIVE_END, |_, s: &State| !s.src_live() && !s.dst_live()),
            Property::sometimes(P_DONE, |_, s: &State| s.completed()),
            Property::sometimes(P_DONE_ROUNDS, |_, s: &State| {
                s.completed() && s.src.round() >= 3
            }),
            Property::sometimes(P_DONE_EVICT, |_, s: &State| s.completed() && s.obs.evicted),
            Property::sometimes(P_ABORT_RESUME, |_, s: &State| {
                matches!(s.src.outcome(), Some(Outcome::Aborted(_)))
                    && s.src_running
                    && s.snapshot.is_some()
            }),
            Property::sometimes(P_NOP, |_, s: &State| {
                s.s2d
                    .iter()
                    .chain(s.d2s.iter())
                    .any(|b| b.first() == Some(&wire::code::NOP))
            }),
            Property::sometimes(P_LATE_WRITE, |_, s: &State| {
                s.src_live() && !s.dst_live() && s.completions.iter().any(|&(_, ok)| !ok)
            }),
            Property::sometimes(P_DOUBT_REACH, |_, s: &State| {
                matches!(s.src.outcome(), Some(Outcome::InDoubt(_)))
            }),
        ]
    }
}

/// Frames the sender on `from` has outstanding: in flight, received but not yet granted back,
/// or granted back in a frame still in flight. Frames lost with a connection or dropped by a
/// side that has ended are not counted, so this never exceeds what the sender accounts.
fn outstanding(s: &State, from: Side) -> u32 {
    let grants = |q: &VecDeque<Vec<u8>>| -> u32 {
        q.iter()
            .map(|b| wire::decode_header(b).map_or(0, |h| h.credits as u32))
            .sum()
    };
    match from {
        Side::Src => s.s2d.len() as u32 + s.dst.credits().ungranted as u32 + grants(&s.d2s),
        Side::Dst => s.d2s.len() as u32 + s.src.credits().ungranted as u32 + grants(&s.s2d),
    }
}

/// spec: INV-FC-1: outstanding frames never exceed the receiver's window.
fn fc_ok(s: &State) -> bool {
    outstanding(s, Side::Src) <= s.dst.credits().window as u32
        && outstanding(s, Side::Dst) <= s.src.credits().window as u32
}

/// spec: FC-3: called after a frame from `from` was queued. If the sender now has the
/// receiver's whole window outstanding, the frame took its last credit and must grant some,
/// or both sides could end up out of credits with nothing left to return them.
fn check_last_credit(s: &mut State, from: Side, grant: u16) {
    let window = match from {
        Side::Src => s.dst.credits().window,
        Side::Dst => s.src.credits().window,
    };
    if grant == 0 && outstanding(s, from) >= window as u32 {
        s.obs.last_credit_misused = true;
    }
}

pub const P_MEM: &str = "INV-MEM-1 destination memory equals the source at pause when it starts";
pub const P_MEM_DIGEST: &str = "INV-MEM-1 digests never mismatch (no update is lost)";
pub const P_REG: &str = "INV-REG-1 writes land only in live registrations, within bounds";
pub const P_SW8: &str = "SW-8 nothing is registered when the destination starts";
pub const P_OWN1: &str = "INV-OWN-1 source and destination workloads never both run";
pub const P_SW6: &str = "SW-6 the source never resumes once in doubt";
pub const P_OWN2: &str = "INV-OWN-2 an aborted migration leaves the source running";
pub const P_FC: &str = "INV-FC-1 frames outstanding never exceed the receiver's window";
pub const P_FC3: &str = "FC-3 the last credit is spent only by a frame that grants credits";
pub const P_PIN: &str = "INV-PIN-1 registered bytes never exceed the pin budget";
pub const P_DOUBT: &str = "INV-DOUBT-1 in doubt only after COMMIT, before STARTED, on a failure";
pub const P_SANE: &str = "machine assertions and driver checks hold";
pub const P_LIVE_CLEAN: &str = "LIVE without faults both sides complete";
pub const P_LIVE_END: &str = "LIVE both sides eventually reach an outcome";
pub const P_DONE: &str = "sometimes a migration completes";
pub const P_DONE_ROUNDS: &str = "sometimes a migration completes after 2 pre-copy rounds";
pub const P_DONE_EVICT: &str = "sometimes a migration completes after an eviction";
pub const P_ABORT_RESUME: &str = "sometimes an abort after pausing resumes the source";
pub const P_NOP: &str = "FC-4 sometimes a NOP returns credits";
pub const P_LATE_WRITE: &str =
    "INV-REG-1 sometimes a write is rejected because the destination has ended";
pub const P_DOUBT_REACH: &str = "INV-DOUBT-1 sometimes the source ends in doubt";

// -------------------------------------------------------------------------------------------
// Running the checker

/// Search order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Shortest counterexamples; more memory.
    Bfs,
    Dfs,
}

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Explore every reachable state (or until every property has a discovery).
    Exhaustive,
    /// Stop at the first counterexample (for mutation tests).
    FirstFailure,
}

/// A property and what the checker found for it.
pub struct PropertyResult {
    pub name: &'static str,
    pub expectation: Expectation,
    /// Example (sometimes) or counterexample (always, eventually).
    pub discovery: Option<Path<State, Action>>,
}

impl PropertyResult {
    /// True if the property holds: no counterexample, or an example was found.
    pub fn ok(&self) -> bool {
        match self.expectation {
            Expectation::Sometimes => self.discovery.is_some(),
            _ => self.discovery.is_none(),
        }
    }
}

/// Figures and results of one checker run.
pub struct CheckRun {
    pub config: &'static str,
    pub total_states: usize,
    pub unique_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
    pub properties: Vec<PropertyResult>,
}

impl CheckRun {
    pub fn all_ok(&self) -> bool {
        self.properties.iter().all(PropertyResult::ok)
    }
    pub fn result(&self, name: &str) -> Option<&PropertyResult> {
        self.properties.iter().find(|p| p.name == name)
    }
    /// Names of violated always/eventually properties.
    pub fn violations(&self) -> Vec<&'static str> {
        self.properties
            .iter()
            .filter(|p| p.expectation != Expectation::Sometimes && !p.ok())
            .map(|p| p.name)
            .collect()
    }
    pub fn states_per_sec(&self) -> f64 {
        self.total_states as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the checker to completion and collects the results.
pub fn run(model: ProtocolModel, strategy: Strategy, threads: usize, stop: Stop) -> CheckRun {
    run_with_progress(model, strategy, threads, stop, |_| {})
}

/// Figures of a run in progress.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub total_states: usize,
    pub unique_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
}

/// Like [`run`], calling `progress` about every ten seconds until the run ends.
pub fn run_with_progress(
    model: ProtocolModel,
    strategy: Strategy,
    threads: usize,
    stop: Stop,
    progress: impl FnMut(&Progress),
) -> CheckRun {
    let config = model.cfg.name;
    let builder = model
        .checker()
        .threads(threads.max(1))
        .finish_when(match stop {
            Stop::Exhaustive => HasDiscoveries::All,
            Stop::FirstFailure => HasDiscoveries::AnyFailures,
        });
    let start = Instant::now();
    match strategy {
        Strategy::Bfs => finish(config, builder.spawn_bfs(), start, progress),
        Strategy::Dfs => finish(config, builder.spawn_dfs(), start, progress),
    }
}

fn finish(
    config: &'static str,
    c: impl Checker<ProtocolModel>,
    start: Instant,
    mut progress: impl FnMut(&Progress),
) -> CheckRun {
    const EVERY: Duration = Duration::from_secs(10);
    let mut next = start + EVERY;
    while !c.is_done() {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next {
            next += EVERY;
            progress(&Progress {
                total_states: c.state_count(),
                unique_states: c.unique_state_count(),
                max_depth: c.max_depth(),
                elapsed: start.elapsed(),
            });
        }
    }
    let c = c.join();
    let elapsed = start.elapsed();
    let mut found = c.discoveries();
    let properties = c
        .model()
        .properties()
        .into_iter()
        .map(|p| PropertyResult {
            name: p.name,
            expectation: p.expectation,
            discovery: found.remove(p.name),
        })
        .collect();
    CheckRun {
        config,
        total_states: c.state_count(),
        unique_states: c.unique_state_count(),
        max_depth: c.max_depth(),
        elapsed,
        properties,
    }
}

/// One line per step: the action taken and both sides afterwards.
pub fn render_path(title: &str, path: &Path<State, Action>) -> String {
    let steps = path.clone().into_vec();
    let mut out = format!("# {title}\n# {} steps\n\n", steps.len().saturating_sub(1));
    let mut prev: Option<(State, Action)> = None;
    for (i, (state, action)) in steps.into_iter().enumerate() {
        let what = match &prev {
            None => "initial state (source started)".to_string(),
            Some((before, a)) => describe(before, a),
        };
        let _ = writeln!(out, "step {i}: {what}\n{}\n", state.summary());
        prev = action.map(|a| (state, a));
    }
    out
}

/// An action in words, with the frame it delivers when it delivers one.
pub fn describe(before: &State, a: &Action) -> String {
    match a {
        Action::CtrlToDst => format!(
            "source -> destination: {}",
            before.s2d.front().map_or("?".into(), |b| frame_brief(b))
        ),
        Action::CtrlToSrc => format!(
            "destination -> source: {}",
            before.d2s.front().map_or("?".into(), |b| frame_brief(b))
        ),
        Action::Land(ch) => format!(
            "data{ch}: write {} reaches the NIC",
            before.data[*ch as usize]
                .writes
                .front()
                .map_or("?".into(), |w| format!("w{} key {:#x}", w.wr_id, w.rkey))
        ),
        other => format!("{other:?}"),
    }
}

/// File name for a property's counterexample: `counterexample-<slug>.txt`.
pub fn trace_file_name(property: &str) -> String {
    let mut slug = String::new();
    for c in property.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    format!("counterexample-{}.txt", slug.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdmig_model::table::SrcPhase;

    /// The initial state is what the source's Start produces: HELLO on the wire.
    #[test]
    fn initial_state_has_hello_in_flight() {
        let m = ProtocolModel::new(CheckConfig::small());
        let init = m.init_states();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].src.phase(), SrcPhase::AwaitHelloAck);
        assert_eq!(init[0].s2d.len(), 1);
        assert!(frame_brief(&init[0].s2d[0]).starts_with("HELLO"));
    }

    #[test]
    fn trace_file_names_are_slugs() {
        assert_eq!(
            trace_file_name("INV-OWN-1 source and destination"),
            "counterexample-inv-own-1-source-and-destination.txt"
        );
    }
}
