//! The simulator: the model's source and destination machines, verbatim, driven against
//! simulated hardware on a virtual clock in one thread.
//!
//! The simulator decides nothing about the protocol. It only models what the machines ask
//! their driver for: a link that serialises bytes, queue pairs that place writes and report
//! completions, a NIC that checks keys, a destination that pins memory, a guest that dirties
//! pages, and the faults of the run. Every event passes through one queue ordered by
//! (virtual time, sequence number), so a seed replays bit for bit. Invariants are checked as
//! events happen; the first violation stops the run with the seed and the trace tail.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use rdmig_check::env::{Nic, Refusal};
use rdmig_model::destination::{DestStats, DstCommand, DstInput};
use rdmig_model::listener::{ConnId, LsnCommand, LsnInput, LsnOut};
use rdmig_model::source::{SourceStats, SrcCommand, SrcInput, SrcOut};
use rdmig_model::table::SrcPhase;
use rdmig_model::wire::{self, AuthMode, DataHello, DigestAlg, Frame, Message, Params, RegMode};
use rdmig_model::{
    DestConfig, LimitPolicy, Listener, ListenerConfig, Outcome, RegTarget, Source, SourceConfig,
};

use crate::bits::Bits;
use crate::config::{SimConfig, Streams};
use crate::faults::FaultKind;
use crate::guest::{digests, Guest, GARBAGE};
use crate::profile::{ns, Costs};
use crate::rng::Rng;
use crate::trace::{lsn_input_kind, src_input_kind, Tag, Trace};

pub const NS_PER_MS: u64 = 1_000_000;
/// Index of the source in per-side arrays, and the direction of the frames it sends.
pub const SRC: usize = 0;
/// Index of the destination in per-side arrays, and the direction of the frames it sends.
pub const DST: usize = 1;
/// Width of one throughput bin.
pub const BIN_NS: u64 = NS_PER_MS;

mod control;
mod data;
mod faults;
mod hostile;
mod machines;
mod outcomes;
mod registration;
mod setup;
mod state;
mod stats;
mod timers;

pub use hostile::Inject;
use setup::{BlockLayout, SessionKeys};
use state::StateArea;
pub use state::STATE_STEP;
use stats::R;
pub use stats::*;

/// The source's control connection at the listener.
const CTRL_CONN: ConnId = 1;

/// The connection of data channel `ch`.
fn data_conn(ch: usize) -> ConnId {
    10 + ch as ConnId
}

/// A link that is silent until the given time (`u64::MAX`: for good).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Silence {
    until: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    GuestTick,
    /// Boxed so that events stay small in the heap.
    Src(Box<SrcInput>),
    Lsn(Box<LsnInput>),
    SrcPaused,
    DstStarted,
    Ctrl(usize, u64),
    Place(usize, u64),
    Poll(usize, u64),
    RegDone {
        target: RegTarget,
        block: u16,
        offset: u64,
        len: u64,
        fail: bool,
    },
    /// A side's earliest timer deadline, as armed at the given time.
    Timer(usize, u64),
    FaultTick,
    /// A side learns that its control connection is gone.
    Detect(usize),
    /// A side learns that data channel `ch` is gone.
    DetectData(usize, usize),
    /// The VMM adds the next step of device state to the source's state buffer.
    StateStep,
    SafetyEnd,
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    /// Earliest first; equal times in scheduling order, so ties never depend on the heap.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone)]
struct Wr {
    wr_id: u64,
    block: u16,
    offset: u64,
    len: u64,
    rkey: u32,
    remote_offset: u64,
    place_at: u64,
    /// The round the write belongs to; `NO_ROUND` for the state area's writes.
    round: usize,
}

/// The round of a write that belongs to none (the state area's, after the final round).
const NO_ROUND: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct Cqe {
    at: u64,
    wr_id: u64,
    ok: bool,
}

/// One data channel: a queue pair (RDMA) or a stream (TCP), with its completion queue.
#[derive(Debug, Default)]
struct Chan {
    alive: bool,
    /// The listener admitted it.
    joined: bool,
    silence: Silence,
    /// Posted, not yet placed; placement times never decrease.
    inflight: VecDeque<Wr>,
    /// Placed or failed, waiting to be harvested; completion times never decrease.
    cq: VecDeque<Cqe>,
    place_at: Option<u64>,
    poll_at: Option<u64>,
    /// When the sending stage (NIC WQE engine, or the sending core) is free.
    send_free: u64,
    /// When the receiving core is free (TCP).
    recv_free: u64,
    last_place: u64,
    last_cqe: u64,
}

/// Control frames in flight in one direction, in order.
#[derive(Debug, Default)]
struct CtrlDir {
    queue: VecDeque<(u64, Vec<u8>)>,
    last_arrive: u64,
    at: Option<u64>,
}

/// The whole simulated world of one run.
pub struct Sim {
    pub cfg: SimConfig,
    costs: Costs,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    pub src: Source,
    pub lsn: Listener,
    /// What the machines observed, for reports.
    pub src_stats: SourceStats,
    pub dst_stats: DestStats,
    pub guest: Guest,
    /// Destination memory (page versions) in the destination's block order.
    pub dmem: Vec<Vec<u32>>,
    touched: Vec<Bits>,
    dst_of_src: Vec<u16>,
    src_of_dst: Vec<usize>,
    /// The device state's path over the data channels, when the session has a state area.
    state: Option<StateArea>,
    chans: Vec<Chan>,
    link_free: u64,
    ctrl: [CtrlDir; 2],
    ctrl_alive: bool,
    ctrl_silence: Silence,
    nic: Nic,
    reg_free: Vec<u64>,
    reg_jobs: u64,
    /// The wake-up armed for each side's earliest timer.
    timer_at: [Option<u64>; 2],
    /// Stray connections open at the listener.
    strays: Vec<ConnId>,
    next_stray: ConnId,
    /// The source relinquished its workload (a guard may no longer resume it).
    relinquished: bool,
    /// Frames a hostile peer injected (their effects are the peer's doing, not the protocol's).
    hostile_frames: u64,
    /// The source's HELLO, encoded (a stray replays it).
    hello: Option<Vec<u8>>,
    /// When the source learns the destination closed the control connection.
    ctrl_closed_at: Option<u64>,
    /// The last frame each side sent (a hostile peer replays it).
    last_sent: [Option<Vec<u8>>; 2],
    crashed: [bool; 2],
    src_running: bool,
    dst_running: bool,
    pause_pending: bool,
    tick_scheduled: bool,
    /// Virtual time up to which the guest's writes have been applied.
    guest_since: u64,
    stall_until: [u64; 2],
    snapshot: Option<Vec<Vec<u32>>>,
    device_state: Vec<u8>,
    received_state: Vec<u8>,
    fault_rng: Rng,
    faults_active: bool,
    commit_sent: bool,
    started_received: bool,
    cause: Cause,
    /// Virtual time by which every live side must have an outcome.
    deadline: u64,
    scratch: Vec<u8>,
    cqe_buf: Vec<Cqe>,
    pub trace: Trace,
    pub stats: Stats,
}

fn outcome_code(o: &Outcome) -> u64 {
    match o {
        Outcome::Completed => 0,
        Outcome::Aborted(_) => 1,
        Outcome::InDoubt(_) => 2,
    }
}

impl Sim {
    /// Builds the world for `cfg`: the block layout, both machines (configured from the
    /// profile and migration knobs), initial memory, and the first events.
    pub fn new(cfg: SimConfig) -> Result<Sim, String> {
        cfg.validate()?;
        let mut st = Streams::new(cfg.seed);
        // Each stream's draws keep a fixed order (guest: the layout, the device state, then
        // the guest's own stream; keys: the session's secrets), so a seed names one world.
        let layout = BlockLayout::draw(&cfg, &mut st.guest);
        // The control channel's blob, or the first version of the state area's pages.
        let (device_state, state) = if cfg.guest.state_area {
            let base = st.guest.between(1, 1 << 30) as u32;
            let area = StateArea::new(&cfg, base, layout.src.len(), layout.dst.len());
            (Vec::new(), Some(area))
        } else {
            let mut blob = vec![0u8; cfg.guest.device_state_bytes as usize];
            st.guest.fill(&mut blob);
            (blob, None)
        };
        let guest = Guest::new(&cfg.guest, &layout.src, st.guest.fork());
        let keys = SessionKeys::draw(&cfg, &mut st.keys);
        let scfg = setup::source_config(&cfg, keys.session_id, layout.src.clone(), keys.src_psk);
        let src = Source::new(scfg, keys.src_nonce).map_err(|e| e.to_string())?;
        let dcfg = setup::dest_config(&cfg, layout.dst.clone(), keys.dst_psk);
        let lsn = Listener::new(ListenerConfig::new(dcfg)).map_err(|e| e.to_string())?;
        let mut sim = Sim::at_time_zero(
            cfg,
            (src, lsn),
            guest,
            layout,
            (device_state, state),
            st.faults,
        );
        sim.schedule_start(keys.dst_nonce);
        Ok(sim)
    }

    pub fn now_ns(&self) -> u64 {
        self.now
    }

    pub fn crashed(&self, side: usize) -> bool {
        self.crashed[side]
    }

    pub fn source_running(&self) -> bool {
        self.src_running
    }

    /// Turns on deliberate destination bugs (before the run; tests only).
    #[cfg(feature = "mutations")]
    pub fn set_dst_mutations(&mut self, m: rdmig_model::destination::DstMutations) {
        let mut cfg = self.lsn.config().clone();
        cfg.dest.mutations = m;
        self.lsn = Listener::new(cfg).expect("the same valid configuration");
    }

    pub fn destination_running(&self) -> bool {
        self.dst_running
    }

    pub fn costs(&self) -> &Costs {
        &self.costs
    }

    /// When the link finishes what has been queued on it (may lie past the run's end when a
    /// run stops with writes queued).
    pub fn link_free_ns(&self) -> u64 {
        self.link_free
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn fail(&self, invariant: &'static str, detail: String) -> Failure {
        Failure {
            seed: self.cfg.seed,
            invariant,
            detail,
            at_ns: self.now,
            tail: self.trace.tail(),
        }
    }

    fn done(&self, side: usize) -> bool {
        match side {
            SRC => self.src.outcome().is_some(),
            _ => self.lsn.outcome().is_some(),
        }
    }

    /// The destination is done, or will never get a session: the source is gone and no
    /// connection is in its handshake (a listening destination waits for the operator).
    fn dst_settled(&self) -> bool {
        self.crashed[DST]
            || self.done(DST)
            || ((self.crashed[SRC] || self.done(SRC))
                && self.lsn.session().is_none()
                && self.lsn.handshaking() == 0)
    }

    /// Both sides have an outcome or are down (or the destination listens on with no session).
    pub fn finished(&self) -> bool {
        (self.crashed[SRC] || self.done(SRC)) && self.dst_settled()
    }

    /// Runs to the end: both sides finished (or crashed), an invariant violated, or the
    /// liveness bound passed.
    pub fn run(&mut self) -> R {
        while !self.finished() {
            let Some(s) = self.queue.pop() else {
                return Err(self.fail(
                    "LIVENESS",
                    "nothing left to happen, yet a live side has no outcome".into(),
                ));
            };
            if s.at > self.deadline {
                return Err(self.fail(
                    "LIVENESS",
                    format!(
                        "no outcome within the liveness bound ({:.3} ms); source {:?}{}, destination {:?}{}",
                        self.deadline as f64 / 1e6,
                        self.src.phase(),
                        if self.crashed[SRC] { " (crashed)" } else { "" },
                        self.lsn.session().map(|d| d.phase()),
                        if self.crashed[DST] { " (crashed)" } else { "" }
                    ),
                ));
            }
            if self.trace.events > self.cfg.max_events {
                return Err(self.fail("LIVENESS", "event limit reached (livelock?)".into()));
            }
            self.now = s.at;
            self.dispatch(s.ev)?;
            self.check()?;
        }
        self.final_checks()
    }

    /// Routes one scheduled event to its handler: one arm per event kind; its length is the
    /// number of kinds.
    fn dispatch(&mut self, ev: Ev) -> R {
        match ev {
            Ev::GuestTick => {
                self.tick_scheduled = false;
                self.advance_guest();
                self.ensure_tick();
                Ok(())
            }
            Ev::Src(input) => self.feed_src(*input),
            Ev::Lsn(input) => self.feed_lsn(*input),
            Ev::SrcPaused => {
                if !self.pause_pending || self.crashed[SRC] {
                    return Ok(());
                }
                self.pause_pending = false;
                self.advance_guest();
                if self.cfg.guest.stop_mid_write {
                    self.guest.write_interrupted();
                }
                self.src_running = false;
                self.snapshot = Some(self.guest.mem.clone());
                self.stats.paused_ns = Some(self.now);
                self.trace.rec(self.now, Tag::Paused, 0, 0);
                self.feed_src(SrcInput::WorkloadPaused)
            }
            Ev::DstStarted => {
                if self.crashed[DST] {
                    return Ok(());
                }
                self.dst_running = true;
                self.stats.dst_started_ns = Some(self.now);
                self.trace.rec(self.now, Tag::Started, 0, 0);
                self.feed_dst(DstInput::WorkloadStarted)
            }
            Ev::Ctrl(dir, at) => {
                if self.ctrl[dir].at != Some(at) {
                    return Ok(());
                }
                self.ctrl[dir].at = None;
                self.deliver_ctrl(dir)
            }
            Ev::Place(ch, at) => {
                if self.chans[ch].place_at != Some(at) {
                    return Ok(());
                }
                self.chans[ch].place_at = None;
                self.place(ch)
            }
            Ev::Poll(ch, at) => {
                if self.chans[ch].poll_at != Some(at) {
                    return Ok(());
                }
                self.chans[ch].poll_at = None;
                self.poll(ch)
            }
            Ev::RegDone {
                target,
                block,
                offset,
                len,
                fail,
            } => self.reg_done(target, block, offset, len, fail),
            Ev::Timer(side, at) => self.timer(side, at),
            Ev::FaultTick => self.fault_tick(),
            Ev::Detect(side) => {
                // spec: ERR-3: a broken transport reaches each side as an input.
                if self.crashed[side] || self.done(side) {
                    return Ok(());
                }
                match side {
                    SRC => self.feed_src(SrcInput::TransportFailed),
                    _ => self.feed_lsn(LsnInput::Closed { conn: CTRL_CONN }),
                }
            }
            Ev::DetectData(side, ch) => {
                if self.crashed[side] || self.done(side) {
                    return Ok(());
                }
                match side {
                    SRC => self.feed_src(SrcInput::DataLost { channel: ch as u8 }),
                    _ => self.feed_lsn(LsnInput::Closed {
                        conn: data_conn(ch),
                    }),
                }
            }
            Ev::StateStep => self.state_step(),
            Ev::SafetyEnd => {
                self.faults_active = false;
                self.trace.rec(self.now, Tag::SafetyEnd, 0, 0);
                Ok(())
            }
        }
    }

    /// Applies the guest's writes up to now. Ticks batch them, and every point where the
    /// guest's progress matters (a dirty scan, the pause) catches up first, so the batching
    /// never hides a write from the protocol.
    fn advance_guest(&mut self) {
        if self.src_running && self.now > self.guest_since {
            let n = self.guest.tick(self.now, self.now - self.guest_since);
            self.stats.guest_pages_written += n;
            if n > 0 {
                self.trace.rec(self.now, Tag::GuestTick, n, 0);
            }
        }
        self.guest_since = self.now;
    }

    fn ensure_tick(&mut self) {
        if !self.tick_scheduled && self.src_running && self.cfg.guest.dirty_bytes_per_s > 0 {
            self.tick_scheduled = true;
            self.push(self.now + self.cfg.guest.tick_ns, Ev::GuestTick);
        }
    }
}

/// What each side ended with, as reported.
pub fn outcome_name(o: Option<Outcome>, crashed: bool) -> String {
    match (o, crashed) {
        (_, true) => "crashed".into(),
        (None, false) => "none".into(),
        (Some(Outcome::Completed), _) => "completed".into(),
        (Some(Outcome::Aborted(a)), _) => format!(
            "aborted:{:?}{}",
            a.reason,
            if a.by_peer { "(peer)" } else { "" }
        ),
        (Some(Outcome::InDoubt(_)), _) => "in-doubt".into(),
    }
}
