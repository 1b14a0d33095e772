//! A stateright model of a whole migration: the real [`Source`] and [`Listener`] (with the
//! [`Destination`](rdmig_model::Destination) machines it runs) composed with a
//! nondeterministic environment.
//!
//! The machines are not re-implemented here: every transition feeds one input to the very
//! `handle` functions the transports call and carries out the commands they return. What this
//! module adds is only what the machines cannot decide themselves, and it leaves every such
//! choice to the checker:
//!
//! - a control connection (two ordered queues of encoded frames) and `channels` data channels
//!   (ordered queues of one-sided writes) that the source opens and the listener admits;
//!   links stay up, fail loudly (what is queued is lost and both sides notice), or go silent
//!   for good (nothing crosses and nobody is told);
//! - write completions in any order (RDMA orders nothing across queues);
//! - driver answers (dirty scans, pause, registrations, digests, device state, workload start)
//!   delivered at any later point, in any order;
//! - a guest that writes any page while the source workload runs, within a write budget;
//! - time: a timer may fire early (a slow peer, costing a fault), and fires for free once
//!   nothing else can happen, unless the peer keeps it from firing (keepalives reset the
//!   destination's idle timer while the source is alive and can reach it; nothing resets the
//!   source's progress deadline but progress);
//! - operator cancel and crash of either process (the workload survives a crash of its
//!   source; a guard resumes it unless the source relinquished it), within the fault budget;
//! - stray connections to the listener (half-open, garbage, a replayed HELLO, a forged data
//!   join);
//! - optionally a hostile peer that sends well-formed frames of its choosing besides the
//!   honest ones.
//!
//! Memory is tiny (a few pages) and a page's content is a version counter (`0` reads as an
//! all-zero page), so "the destination holds what the source held at pause" is an exact
//! comparison, and digests are real xxh3 over those bytes.
//!
//! Properties are named after the spec's IDs; `rdmig-model check` runs them and
//! `tests/check.rs` asserts them on the configurations `make test` runs.

mod hostile;
mod props;
mod run;
mod state;
mod world;

use std::collections::{BTreeSet, VecDeque};

use rdmig_model::destination::DestConfig;
use rdmig_model::listener::{ConnId, Listener, ListenerConfig, LsnInput, LsnTimer};
use rdmig_model::source::{LimitPolicy, Source, SourceConfig, SrcInput, SrcTimer};
use rdmig_model::types::*;
use rdmig_model::wire::{self, BlockDesc, DigestAlg, RegMode};
use rdmig_model::{DstTimer, PageBitmap};
use stateright::{Model, Property};

pub use crate::env::HashCompare;
pub use hostile::Inject;
pub use props::*;
pub use run::*;
pub use state::*;

/// Every block uses 4 KiB pages; a page is one version byte in the model.
const PAGE_LOG2: u8 = 12;
/// The device-state blob the source hands over at switchover.
const DEVICE_STATE: &[u8] = b"rdmig device state";
/// Bytes the state area's device state falls short of its last page (a partial last page).
const STATE_SHORT: u64 = 1000;
/// What the source's state buffer holds before the driver produced anything: no version
/// a produced page carries.
const STATE_UNPRODUCED: u8 = 0xcc;
/// Pre-shared key: the model runs the authenticated handshake, as production does.
const PSK: &[u8] = b"rdmig model key";
/// The machines read no clock; the model passes a constant. Timers fire by choice of the
/// checker instead of by deadline, so a constant clock loses no behaviour and keeps the
/// state space finite.
const NOW: Millis = 0;
/// The source's control connection at the listener.
const CTRL_CONN: ConnId = 1;

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
    /// Channel failures, silences, crashes, cancels and early timeouts, in total.
    pub faults: u8,
    /// Links may go silent (a fault of its own kind, from the same budget).
    pub silence: bool,
    /// Keepalive timer firings; keepalives are on in every configuration.
    pub keepalives: u8,
    /// Stray connections that may arrive, each at most once.
    pub strays: Vec<Stray>,
    /// A hostile peer and how many frames of its own it may send.
    pub adversary: Option<Adversary>,
    pub hostile_frames: u8,
    /// The destination lists its blocks in reverse order (matching is by name, spec: BLK-2).
    pub reverse_dst_blocks: bool,
    /// The source workload is paused before the source machine starts (a save that is not
    /// live, spec: SAVE-1).
    pub src_paused_at_start: bool,
    /// The source's dirty log hashes memory (spec: section 11.2) and compares as given,
    /// instead of a writer's bitmap; its writes then read source memory when they land (the
    /// latest point, the adversarial one for this log: a write carries bytes newer than the
    /// scan that reported it).
    pub hash_log: Option<crate::env::HashCompare>,
    /// The guest may also put a page back to its version before its last write (a lock
    /// released, a counter brought back).
    pub guest_reverts: bool,
    /// Pages of device state carried over the data channels into a state area (spec:
    /// STATE-1); 0 sends it on the control channel. The driver produces it in two steps.
    pub state_pages: u64,
    /// Deliberate machine bugs, to show the checker catches them.
    #[cfg(feature = "mutations")]
    pub mutations: rdmig_model::source::Mutations,
    #[cfg(feature = "mutations")]
    pub dst_mutations: rdmig_model::destination::DstMutations,
}

impl CheckConfig {
    /// Two blocks (six pages, and five: a short last chunk) of 2-page chunks, one data
    /// channel, a pin budget of four chunks (so the first round must evict), two guest writes,
    /// one fault of any kind (silent links included), and a stray connection.
    pub fn small() -> Self {
        CheckConfig {
            name: "small",
            block_pages: vec![6, 5],
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
            silence: true,
            keepalives: 0,
            strays: vec![Stray::HalfOpen],
            adversary: None,
            hostile_frames: 0,
            reverse_dst_blocks: false,
            src_paused_at_start: false,
            hash_log: None,
            guest_reverts: false,
            state_pages: 0,
            #[cfg(feature = "mutations")]
            mutations: Default::default(),
            #[cfg(feature = "mutations")]
            dst_mutations: Default::default(),
        }
    }

    /// Two data channels (writes of one round race each other, and either can be lost or go
    /// silent), reversed destination block order, pin-all as a second initial state, zeroing
    /// guest writes, registration bursts longer than the credit window (so senders block on
    /// credits). The guest writes one page: with 22 guest choices per step a second write
    /// multiplies the states by about ten. Keepalives and the other stray kinds are left to
    /// `small` and `strays`: with two channels each multiplies the states several times.
    pub fn medium() -> Self {
        CheckConfig {
            name: "medium",
            modes: vec![RegMode::Dynamic, RegMode::PinAll],
            channels: 2,
            max_reg_inflight: 4,
            guest_writes: 1,
            guest_zeroes: true,
            reverse_dst_blocks: true,
            ..Self::small()
        }
    }

    /// Every stray kind against a fault-free migration: none may disturb it.
    pub fn strays() -> Self {
        CheckConfig {
            name: "strays",
            guest_writes: 1,
            faults: 0,
            silence: false,
            strays: vec![
                Stray::HalfOpen,
                Stray::Garbage,
                Stray::ReplayHello,
                Stray::BadDataHello,
                Stray::HelloThenClose,
            ],
            ..Self::small()
        }
    }

    /// An honest source against a destination that also sends frames of its own choosing.
    pub fn hostile_destination() -> Self {
        CheckConfig {
            name: "hostile-destination",
            guest_writes: 0,
            faults: 0,
            silence: false,
            strays: vec![],
            adversary: Some(Adversary::Destination),
            hostile_frames: 4,
            ..Self::small()
        }
    }

    /// An honest destination against a source that also sends frames of its own choosing.
    pub fn hostile_source() -> Self {
        CheckConfig {
            name: "hostile-source",
            guest_writes: 0,
            faults: 0,
            silence: false,
            strays: vec![],
            adversary: Some(Adversary::Source),
            hostile_frames: 4,
            ..Self::small()
        }
    }

    /// A save that is not live: the workload is paused before the source starts, so the guest
    /// writes nothing, and every fault may strike while it is paused.
    pub fn paused_save() -> Self {
        CheckConfig {
            name: "paused-save",
            guest_writes: 0,
            src_paused_at_start: true,
            ..Self::small()
        }
    }

    /// The `scan` dirty log (spec: SCAN-1) against a guest that writes, zeroes and undoes
    /// writes: one block of three one-page chunks (one page starting zero) under a pin budget
    /// of two, one channel, three guest steps, no faults (the other configurations draw them
    /// for the bitmap log).
    pub fn hash_log(compare: crate::env::HashCompare) -> Self {
        CheckConfig {
            name: "hash-log",
            block_pages: vec![3],
            chunk_pages: 1,
            pin_budget_chunks: 2,
            guest_writes: 3,
            guest_zeroes: true,
            guest_reverts: true,
            hash_log: Some(compare),
            faults: 0,
            silence: false,
            strays: vec![],
            max_rounds: 3,
            ..Self::small()
        }
    }

    /// Device state over the data channels (spec: STATE-1 .. STATE-5): one RAM block of two
    /// 2-page chunks, three pages of device state (two chunks, the last short, the last page
    /// partial) produced in two steps, a pin budget of two chunks in dynamic mode (so the
    /// tail must evict RAM chunks to register the state area), pin-all as a second initial
    /// state, one guest write, one fault of any kind.
    pub fn state_area() -> Self {
        CheckConfig {
            name: "state-area",
            block_pages: vec![4],
            chunk_pages: 2,
            modes: vec![RegMode::Dynamic, RegMode::PinAll],
            pin_budget_chunks: 2,
            state_pages: 3,
            guest_writes: 1,
            strays: vec![],
            ..Self::small()
        }
    }

    pub const NAMES: [&'static str; 8] = [
        "small",
        "medium",
        "strays",
        "hostile-destination",
        "hostile-source",
        "paused-save",
        "hash-log",
        "state-area",
    ];

    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "small" => Some(Self::small()),
            "medium" => Some(Self::medium()),
            "strays" => Some(Self::strays()),
            "hostile-destination" => Some(Self::hostile_destination()),
            "hostile-source" => Some(Self::hostile_source()),
            "paused-save" => Some(Self::paused_save()),
            "hash-log" => Some(Self::hash_log(crate::env::HashCompare::Both)),
            "state-area" => Some(Self::state_area()),
            _ => None,
        }
    }

    fn chunk_log2(&self) -> u8 {
        PAGE_LOG2 + self.chunk_pages.trailing_zeros() as u8
    }

    /// The device state the destination's consumer must hold at start: the control
    /// channel's blob, or the state area's page versions.
    fn expected_state(&self) -> Vec<u8> {
        if self.state_pages == 0 {
            DEVICE_STATE.to_vec()
        } else {
            (0..self.state_pages).map(|p| 0x51 + p as u8).collect()
        }
    }

    /// The state area's length (spec: STATE-1).
    fn state_bytes(&self) -> u64 {
        self.state_pages << PAGE_LOG2
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
    /// The source's HELLO, encoded (strays replay it).
    hello: Vec<u8>,
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
    /// A data channel's DATA_HELLO reaches the listener.
    Join(u8),
    /// The source learns that the listener admitted data channel `n`.
    Opened(u8),
    /// The source learns that data channel `n` failed or closed.
    DataLost(u8),
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
    /// The guest puts a page back to its version before its last write.
    GuestRevert {
        block: u16,
        page: u16,
    },
    SrcTimer(SrcTimer),
    LsnTimer(LsnTimer),
    FailControl,
    FailData(u8),
    SilenceControl,
    SilenceData(u8),
    Crash(Side),
    Cancel(Side),
    Stray(Stray),
    /// The hostile peer sends a frame of its choosing.
    Inject(Inject),
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
        let mut dst_blocks = blocks.clone();
        if cfg.reverse_dst_blocks {
            dst_blocks.reverse();
        }
        let dst_order = dst_blocks
            .iter()
            .map(|d| wire::block_index(&blocks, &d.name).expect("same names"))
            .collect();
        let machines: Vec<(SourceConfig, DestConfig)> = cfg
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
                s.paused_at_start = cfg.src_paused_at_start;
                s.state_max = cfg.state_bytes();
                s.idle_timeout_ms = 1_000;
                s.keepalive_ms = 500;
                // Pin-all needs every byte pinned (spec: REG-8); dynamic mode gets the small
                // chunk budget so that rounds must evict.
                let pin_budget = match mode {
                    RegMode::PinAll => {
                        (cfg.block_pages.iter().sum::<u64>() << PAGE_LOG2) + cfg.state_bytes()
                    }
                    RegMode::Dynamic => cfg.pin_budget_chunks * chunk_bytes,
                };
                let mut d =
                    DestConfig::with_defaults(dst_blocks.clone(), Some(PSK.to_vec()), pin_budget);
                d.credit_window = cfg.credit_window;
                d.state_capacity = cfg.state_bytes();
                d.idle_timeout_ms = 1_000;
                d.keepalive_ms = 500;
                #[cfg(feature = "mutations")]
                {
                    d.mutations = cfg.dst_mutations;
                }
                (s, d)
            })
            .collect();
        let hello = {
            let mut src = Source::new(machines[0].0.clone(), [1; wire::NONCE_LEN])
                .expect("valid source config");
            let cmds = src.step(NOW, SrcInput::Start);
            match &cmds[..] {
                [rdmig_model::SrcCommand::Send(f)] => {
                    wire::encode_to_vec(f).expect("HELLO encodes")
                }
                other => unreachable!("Start sends HELLO alone: {other:?}"),
            }
        };
        ProtocolModel {
            cfg,
            machines,
            dst_order,
            hello,
        }
    }

    fn initial(&self, src_cfg: &SourceConfig, dst_cfg: &DestConfig) -> State {
        #[allow(unused_mut)]
        let mut src =
            Source::new(src_cfg.clone(), [1; wire::NONCE_LEN]).expect("valid source config");
        #[cfg(feature = "mutations")]
        src.set_mutations(self.cfg.mutations);
        let lsn = Listener::new(ListenerConfig::new(dst_cfg.clone())).expect("valid listener");
        // Every third page starts out zero, so the first round sends ZERO ranges too.
        // The state area, if any, is one more block on both sides (spec: STATE-2): the
        // source's state buffer and the destination's staging area.
        let state = self.cfg.state_pages as usize;
        let mut src_mem: Vec<Vec<u8>> = self
            .cfg
            .block_pages
            .iter()
            .map(|&n| (0..n).map(|p| u8::from(p % 3 != 2)).collect())
            .collect();
        // The destination starts with garbage no source page can hold.
        let mut dst_mem: Vec<Vec<u8>> = self
            .dst_order
            .iter()
            .map(|&b| vec![0xee; self.cfg.block_pages[b] as usize])
            .collect();
        if state > 0 {
            src_mem.push(vec![STATE_UNPRODUCED; state]);
            dst_mem.push(vec![0xee; state]);
        }
        let mut s = State {
            src,
            lsn,
            s2d: VecDeque::new(),
            d2s: VecDeque::new(),
            ctrl: Link::Up,
            ctrl_closed: false,
            data: vec![
                DataChannel {
                    link: Link::Up,
                    conn: None,
                    writes: VecDeque::new(),
                };
                self.cfg.channels as usize
            ],
            joins: Vec::new(),
            opened: Vec::new(),
            data_lost: Vec::new(),
            completions: Vec::new(),
            nic: crate::env::Nic::default(),
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
            src_running: !self.cfg.src_paused_at_start,
            dst_running: false,
            src_crashed: false,
            dst_crashed: false,
            relinquished: false,
            snapshot: None,
            state_received: Vec::new(),
            strays_left: self.cfg.strays.iter().copied().collect::<BTreeSet<_>>(),
            strays_open: BTreeSet::new(),
            faults_left: self.cfg.faults,
            guest_left: self.cfg.guest_writes,
            keepalives_left: self.cfg.keepalives,
            hostile_left: self.cfg.hostile_frames,
            obs: Observed::default(),
            prev: if self.cfg.guest_reverts {
                src_mem.clone()
            } else {
                Vec::new()
            },
            // No page holds version 0xdd: the destination holds nothing known yet.
            hash_log: self
                .cfg
                .hash_log
                .map(|c| crate::env::HashLog::new(c, &src_mem, 0xdd)),
            src_mem,
        };
        self.feed_lsn(
            &mut s,
            LsnInput::Accepted {
                conn: CTRL_CONN,
                nonce: [2; wire::NONCE_LEN],
                binding: None,
            },
        );
        self.feed_src(&mut s, SrcInput::Start);
        self.settle(&mut s);
        s
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
        for j in &s.joins {
            out.push(Action::Join(j.channel));
        }
        for &ch in &s.opened {
            out.push(Action::Opened(ch));
        }
        for &ch in &s.data_lost {
            out.push(Action::DataLost(ch));
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
            let ram = self.cfg.block_pages.len();
            for (b, mem) in s.src_mem.iter().enumerate().take(ram) {
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
                    if self.cfg.guest_reverts && s.prev[b][p] != v {
                        out.push(Action::GuestRevert {
                            block: b as u16,
                            page: p as u16,
                        });
                    }
                }
            }
        }
    }

    fn quiescent(&self, s: &State) -> bool {
        let mut v = Vec::new();
        self.progress_actions(s, &mut v);
        v.is_empty()
    }

    /// The source keeps the destination's idle timer from firing: it is alive, can reach the
    /// destination, and has the credit to send its keepalives (spec: ERR-5).
    fn source_keeps_destination_alive(&self, s: &State) -> bool {
        s.src_live()
            && s.ctrl == Link::Up
            && !s.ctrl_closed
            && s.src.credits().can_send()
            && self.machines[0].0.keepalive_ms > 0
    }

    /// Timers that may fire now: early ones cost a fault; once nothing else can happen they
    /// fire for free, except a timer the peer keeps resetting.
    fn timer_actions(&self, s: &State, quiet: bool, out: &mut Vec<Action>) {
        let faults = s.faults_left > 0;
        if s.src_live() {
            let t = s.src.timers();
            if t.progress.is_some() && (faults || quiet) {
                out.push(Action::SrcTimer(SrcTimer::Progress));
            }
            if t.keepalive.is_some() && s.keepalives_left > 0 {
                out.push(Action::SrcTimer(SrcTimer::Keepalive));
            }
        }
        if s.dst_live() {
            let t = s.lsn.timers();
            if t.session.idle.is_some()
                && (faults || (quiet && !self.source_keeps_destination_alive(s)))
            {
                out.push(Action::LsnTimer(LsnTimer::Session(DstTimer::Idle)));
            }
            if t.session.keepalive.is_some() && s.keepalives_left > 0 {
                out.push(Action::LsnTimer(LsnTimer::Session(DstTimer::Keepalive)));
            }
            for (conn, _) in s.lsn.handshake_deadlines() {
                // A stray's deadline passes whenever; the source's connections are slow only
                // by a fault, or once nothing else can happen.
                if s.strays_open.contains(&conn) || faults || quiet {
                    out.push(Action::LsnTimer(LsnTimer::Handshake(conn)));
                }
            }
        }
    }

    /// Delivers a message, a completion, a driver answer, a guest write, a stray connection
    /// or a hostile frame. `None`: the action is not enabled in this state.
    fn deliver(&self, s: &mut State, a: Action) -> Option<()> {
        match a {
            Action::CtrlToDst => {
                let bytes = s.s2d.pop_front()?;
                let frame = wire::decode(&bytes);
                self.feed_lsn(
                    s,
                    LsnInput::Frame {
                        conn: CTRL_CONN,
                        frame,
                    },
                );
            }
            Action::CtrlToSrc => {
                let bytes = s.d2s.pop_front()?;
                let input = match wire::decode(&bytes) {
                    Ok(f) => SrcInput::Frame(f),
                    Err(e) => SrcInput::Malformed(e),
                };
                self.feed_src(s, input);
            }
            Action::Land(ch) => self.land(s, ch as usize),
            Action::Complete { wr_id, ok } => {
                let i = s.completions.iter().position(|&c| c == (wr_id, ok))?;
                s.completions.remove(i);
                let input = if ok {
                    SrcInput::WriteDone { wr_id }
                } else {
                    SrcInput::WriteFailed { wr_id }
                };
                self.feed_src(s, input);
            }
            Action::Join(ch) => {
                let i = s.joins.iter().position(|j| j.channel == ch)?;
                self.join(s, i);
            }
            Action::Opened(ch) => {
                let i = s.opened.iter().position(|&c| c == ch)?;
                s.opened.remove(i);
                self.feed_src(s, SrcInput::DataOpened { channel: ch });
            }
            Action::DataLost(ch) => {
                let i = s.data_lost.iter().position(|&c| c == ch)?;
                s.data_lost.remove(i);
                self.feed_src(s, SrcInput::DataLost { channel: ch });
            }
            Action::SrcDriver(r) => {
                let i = s.src_pending.iter().position(|x| *x == r)?;
                s.src_pending.remove(i);
                self.answer_src(s, r);
            }
            Action::DstDriver(r) => {
                let i = s.dst_pending.iter().position(|x| *x == r)?;
                s.dst_pending.remove(i);
                self.answer_dst(s, r);
            }
            Action::Notice(side) => self.notice(s, side),
            Action::GuestWrite { block, page } => {
                let v = s.src_mem[block as usize][page as usize].checked_add(1)?;
                guest_store(s, block, page, v);
            }
            Action::GuestZero { block, page } => guest_store(s, block, page, 0),
            Action::GuestRevert { block, page } => {
                let v = s.prev[block as usize][page as usize];
                guest_store(s, block, page, v);
            }
            Action::Stray(k) => self.stray(s, k),
            Action::Inject(i) => {
                s.hostile_left -= 1;
                self.inject(s, i);
            }
            other => unreachable!("not a delivery: {other:?}"),
        }
        Some(())
    }

    /// A side learns that its control connection failed (spec: ERR-3).
    fn notice(&self, s: &mut State, side: Side) {
        match side {
            Side::Src => {
                s.src_notice = Notice::Done;
                self.feed_src(s, SrcInput::TransportFailed);
            }
            Side::Dst => {
                s.dst_notice = Notice::Done;
                self.feed_lsn(s, LsnInput::Closed { conn: CTRL_CONN });
            }
        }
    }

    /// A source timer fires. A progress deadline that fires while the pair is not quiescent
    /// is a fault (the environment was slow), and spends the fault budget.
    fn src_timer(&self, old: &State, s: &mut State, kind: SrcTimer) -> Option<()> {
        match kind {
            SrcTimer::Progress => {
                if !self.quiescent(old) {
                    s.faults_left = s.faults_left.checked_sub(1)?;
                }
            }
            SrcTimer::Keepalive => s.keepalives_left = s.keepalives_left.checked_sub(1)?,
        }
        self.feed_src(s, SrcInput::Timer(kind));
        Some(())
    }

    /// A listener timer fires: a keepalive, a stray's handshake deadline, or a session
    /// deadline (a fault unless the pair is quiescent, as for the source).
    fn lsn_timer(&self, old: &State, s: &mut State, kind: LsnTimer) -> Option<()> {
        match kind {
            LsnTimer::Session(DstTimer::Keepalive) => {
                s.keepalives_left = s.keepalives_left.checked_sub(1)?
            }
            LsnTimer::Handshake(conn) if s.strays_open.contains(&conn) => {
                s.strays_open.remove(&conn);
            }
            _ => {
                if !self.quiescent(old) || self.source_keeps_destination_alive(old) {
                    s.faults_left = s.faults_left.checked_sub(1)?;
                }
            }
        }
        self.feed_lsn(s, LsnInput::Timer(kind));
        Some(())
    }

    /// A fault from the budget: a link fails or goes silent, a side crashes or is cancelled.
    fn fault(&self, s: &mut State, a: Action) {
        s.faults_left -= 1;
        match a {
            Action::FailControl => self.fail_control(s),
            Action::FailData(ch) => self.fail_data(s, ch as usize),
            Action::SilenceControl => self.silence_control(s),
            Action::SilenceData(ch) => self.silence_data(s, ch as usize),
            Action::Crash(side) => self.crash(s, side),
            // spec: ERR-1
            Action::Cancel(Side::Src) => self.feed_src(s, SrcInput::Cancel),
            Action::Cancel(Side::Dst) => self.feed_lsn(s, LsnInput::Cancel),
            other => unreachable!("not a fault: {other:?}"),
        }
    }
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
        self.timer_actions(s, quiet, out);
        let any_live = s.src_live() || s.dst_live();
        if s.faults_left > 0 && any_live {
            if s.ctrl == Link::Up {
                out.push(Action::FailControl);
                if self.cfg.silence {
                    out.push(Action::SilenceControl);
                }
            }
            for (i, ch) in s.data.iter().enumerate() {
                if ch.link == Link::Up && ch.conn.is_some() {
                    out.push(Action::FailData(i as u8));
                    if self.cfg.silence {
                        out.push(Action::SilenceData(i as u8));
                    }
                }
            }
            for side in [Side::Src, Side::Dst] {
                if s.live(side) {
                    out.push(Action::Cancel(side));
                    out.push(Action::Crash(side));
                }
            }
        }
        if s.dst_live() {
            for &k in &s.strays_left {
                out.push(Action::Stray(k));
            }
        }
        if s.hostile_left > 0 {
            self.hostile_actions(s, out);
        }
    }

    fn next_state(&self, old: &State, a: Action) -> Option<State> {
        let mut s = old.clone();
        // Timers and cancels may be ignored by the machines: see below.
        let may_be_noop = matches!(
            a,
            Action::SrcTimer(_) | Action::LsnTimer(_) | Action::Cancel(_)
        );
        match a {
            Action::SrcTimer(kind) => self.src_timer(old, &mut s, kind)?,
            Action::LsnTimer(kind) => self.lsn_timer(old, &mut s, kind)?,
            Action::FailControl
            | Action::FailData(_)
            | Action::SilenceControl
            | Action::SilenceData(_)
            | Action::Crash(_)
            | Action::Cancel(_) => self.fault(&mut s, a),
            _ => self.deliver(&mut s, a)?,
        }
        self.settle(&mut s);
        if may_be_noop {
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
        props::properties(&self.cfg)
    }
}

/// The guest stores version `v` in a page and marks it in the writer's log; the version it
/// replaces is what a revert restores.
fn guest_store(s: &mut State, block: u16, page: u16, v: u8) {
    let (b, p) = (block as usize, page as usize);
    let old = std::mem::replace(&mut s.src_mem[b][p], v);
    if let Some(prev) = s.prev.get_mut(b) {
        prev[p] = old;
    }
    s.dirty[b].set(page as u64);
    s.guest_left -= 1;
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
        assert_eq!(
            init[0].lsn.handshaking(),
            1,
            "the source's connection is accepted"
        );
    }

    #[test]
    fn trace_file_names_are_slugs() {
        assert_eq!(
            trace_file_name("INV-OWN-1 source and destination"),
            "counterexample-inv-own-1-source-and-destination.txt"
        );
    }
}
