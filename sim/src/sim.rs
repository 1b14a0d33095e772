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
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use rdmig_model::table::SrcPhase;
use rdmig_model::wire::{self, AuthMode, DigestAlg, Frame, Message, Params, RegMode};
use rdmig_model::{
    Command, DestConfig, Destination, Input, LimitPolicy, Outcome, RegTarget, Source, SourceConfig,
    TimerKind,
};

use crate::bits::Bits;
use crate::config::{SimConfig, Streams};
use crate::faults::FaultKind;
use crate::guest::{digests, Guest, GARBAGE};
use crate::profile::{ns, Costs};
use crate::rng::Rng;
use crate::trace::{input_kind, Tag, Trace};

pub const NS_PER_MS: u64 = 1_000_000;
/// Index of the source in per-side arrays, and the direction of the frames it sends.
pub const SRC: usize = 0;
/// Index of the destination in per-side arrays, and the direction of the frames it sends.
pub const DST: usize = 1;
/// Width of one throughput bin.
pub const BIN_NS: u64 = NS_PER_MS;

/// An invariant violation (or a livelock, or a machine panic) with what it takes to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    /// The spec ID of the violated invariant or rule, `LIVENESS`, or `PANIC`.
    pub invariant: &'static str,
    pub detail: String,
    pub at_ns: u64,
    pub tail: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "VIOLATION {} at {:.6} ms (seed {}): {}",
            self.invariant,
            self.at_ns as f64 / 1e6,
            self.seed,
            self.detail
        )?;
        writeln!(f, "trace tail (oldest first):")?;
        for l in &self.tail {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

type R = Result<(), Failure>;

/// Why the source posted a write after the link went idle: the input that unblocked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A REG_RESULT made chunks writable.
    Registration,
    /// An UNREG_DONE freed pin budget.
    Eviction,
    /// A completion freed a send-queue slot.
    Completion,
    /// A dirty scan started a round.
    RoundStart,
    Other,
}

pub const CAUSES: [&str; 5] = [
    "registration",
    "eviction",
    "send-queue",
    "round-start",
    "other",
];

/// CPU time charged to one side by the cost model, nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpu {
    /// Copies and checksums of TCP, per byte.
    pub transport_ns: u64,
    /// Posting write requests / send syscalls.
    pub requests_ns: u64,
    /// Dirty scans with zero-page detection.
    pub scan_ns: u64,
    pub digest_ns: u64,
    /// Pinning and unpinning memory.
    pub registration_ns: u64,
    pub zero_fill_ns: u64,
    pub control_ns: u64,
}

impl Cpu {
    pub fn total_ns(&self) -> u64 {
        self.transport_ns
            + self.requests_ns
            + self.scan_ns
            + self.digest_ns
            + self.registration_ns
            + self.zero_fill_ns
            + self.control_ns
    }
}

/// Timing of one round as the simulator saw it, in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundTiming {
    pub round: u32,
    /// The dirty scan result reached the source and the round began.
    pub start_ns: u64,
    pub first_post_ns: Option<u64>,
    pub last_place_ns: Option<u64>,
    /// ROUND_ACK reached the source.
    pub end_ns: Option<u64>,
    /// Payload bytes placed during the round.
    pub placed_bytes: u64,
    /// Link time of the round's writes, headers included.
    pub wire_ns: u64,
    /// Link time of the headers alone.
    pub header_ns: u64,
    /// Link idle between two of the round's writes, by what ended the gap (see `CAUSES`).
    pub gap_ns: [u64; 5],
    /// Registration-thread time of the work the destination started during the round.
    pub reg_ns: u64,
}

/// Everything measured during a run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub writes_posted: u64,
    pub writes_failed: u64,
    pub data_posted_bytes: u64,
    pub data_placed_bytes: u64,
    pub data_wire_bytes: u64,
    pub zero_frames: u64,
    pub zero_frame_bytes: u64,
    pub control_frames: u64,
    pub control_bytes: u64,
    pub frames_lost: u64,
    /// Time the source-to-destination link spent transmitting.
    pub link_busy_ns: u64,
    pub registrations: u64,
    pub unregistrations: u64,
    /// Time the destination's registration threads were busy (summed over threads).
    pub reg_busy_ns: u64,
    pub cpu: [Cpu; 2],
    /// Payload bytes placed per `BIN_NS` of virtual time.
    pub bins: Vec<u64>,
    /// Link idle time between two writes of a round, by what ended it (see `CAUSES`).
    pub idle_gap_ns: [u64; 5],
    pub rounds: Vec<RoundTiming>,
    /// (time, kind, detail) of every fault injected.
    pub faults: Vec<(u64, FaultKind, u64)>,
    pub setup_done_ns: Option<u64>,
    pub paused_ns: Option<u64>,
    pub commit_sent_ns: Option<u64>,
    pub dst_started_ns: Option<u64>,
    pub finished_ns: [Option<u64>; 2],
    /// What the source expected the final round to take when it switched over
    /// (dirty bytes of the last scan at the bandwidth it measured; spec: CONV-1).
    pub predicted_downtime_ns: Option<u64>,
    pub last_scan_dirty_bytes: u64,
    pub memory_verified: bool,
    pub phases: Vec<(u64, usize, String)>,
    pub guest_pages_written: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    GuestTick,
    /// Boxed so that events stay small in the heap.
    Input(usize, Box<Input>),
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
    Timer(usize, usize, u64),
    FaultTick,
    Detect(usize),
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
    round: usize,
}

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

/// A registration as the destination's NIC holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mr {
    block: u16,
    offset: u64,
    len: u64,
}

/// The whole simulated world of one run.
pub struct Sim {
    pub cfg: SimConfig,
    costs: Costs,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    pub src: Source,
    pub dst: Destination,
    out: Vec<Command>,
    pub guest: Guest,
    /// Destination memory (page versions) in the destination's block order.
    pub dmem: Vec<Vec<u32>>,
    touched: Vec<Bits>,
    dst_of_src: Vec<u16>,
    src_of_dst: Vec<usize>,
    chans: Vec<Chan>,
    link_free: u64,
    ctrl: [CtrlDir; 2],
    ctrl_alive: bool,
    nic: BTreeMap<u32, Mr>,
    nic_bytes: u64,
    next_rkey: u32,
    reg_free: Vec<u64>,
    reg_jobs: u64,
    timer_at: [[Option<u64>; 2]; 2],
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
        let blocks = cfg.guest.layout(&mut st.guest);
        let mut dst_blocks = blocks.clone();
        if cfg.migration.permute_dst_blocks {
            st.guest.shuffle(&mut dst_blocks);
        }
        let src_of_dst: Vec<usize> = dst_blocks
            .iter()
            .map(|d| rdmig_model::wire::block_index(&blocks, &d.name).expect("same names"))
            .collect();
        let mut dst_of_src = vec![0u16; blocks.len()];
        for (d, &s) in src_of_dst.iter().enumerate() {
            dst_of_src[s] = d as u16;
        }
        let mut device_state = vec![0u8; cfg.guest.device_state_bytes as usize];
        st.guest.fill(&mut device_state);
        let guest = Guest::new(&cfg.guest, &blocks, st.guest.fork());

        let m = &cfg.migration;
        let mut key = vec![0u8; 32];
        st.keys.fill(&mut key);
        let session_id = st.keys.next_u64();
        let mut src_nonce = [0u8; wire::NONCE_LEN];
        let mut dst_nonce = [0u8; wire::NONCE_LEN];
        st.keys.fill(&mut src_nonce);
        st.keys.fill(&mut dst_nonce);
        let src_psk = m.authenticate.then(|| key.clone());
        let dst_psk = if cfg.faults.wrong_key {
            let mut other = vec![0u8; 32];
            st.keys.fill(&mut other);
            Some(other)
        } else {
            src_psk.clone()
        };
        let channels = cfg.channels();
        let mut scfg = SourceConfig::with_defaults(session_id, blocks.clone(), src_psk);
        scfg.params = Params {
            chunk_log2: m.chunk_log2,
            mode: if m.pin_all {
                RegMode::PinAll
            } else {
                RegMode::Dynamic
            },
            flags: if m.zero_elision {
                wire::flag::ZERO_ELISION
            } else {
                0
            },
            channels,
            digest: if m.verify_digests {
                DigestAlg::Xxh3_64
            } else {
                DigestAlg::None
            },
            auth: if m.authenticate {
                AuthMode::HmacSha256
            } else {
                AuthMode::Insecure
            },
            max_reg_inflight: m.max_reg_inflight,
        };
        scfg.credit_window = m.src_credit_window;
        scfg.writes_per_channel = m.writes_per_channel.unwrap_or(cfg.profile.sq_depth);
        scfg.reg_batch = m.reg_batch;
        scfg.downtime_limit_ms = m.downtime_limit_ms;
        scfg.max_rounds = m.max_rounds;
        scfg.on_limit = if m.on_limit_abort {
            LimitPolicy::Abort
        } else {
            LimitPolicy::Switchover
        };
        scfg.idle_timeout_ms = m.idle_timeout_ms;
        scfg.keepalive_ms = m.keepalive_ms;
        let src = Source::new(scfg, src_nonce).map_err(|e| e.to_string())?;
        let dcfg = DestConfig {
            blocks: dst_blocks.clone(),
            psk: dst_psk,
            pin_budget: cfg.pin_budget(),
            credit_window: m.dst_credit_window,
            max_channels: m.dst_max_channels,
            max_reg_inflight: m.dst_max_reg_inflight,
            idle_timeout_ms: m.idle_timeout_ms,
            keepalive_ms: m.keepalive_ms,
        };
        let dst = Destination::new(dcfg, dst_nonce).map_err(|e| e.to_string())?;
        let dmem: Vec<Vec<u32>> = dst_blocks
            .iter()
            .map(|b| vec![GARBAGE; (b.length >> b.page_log2) as usize])
            .collect();
        let touched = dst_blocks
            .iter()
            .map(|b| {
                let mut t = Bits::new(b.length >> b.page_log2);
                if cfg.guest.dst_pretouched {
                    t.fill();
                }
                t
            })
            .collect();
        let costs = cfg.profile.costs();
        let safety = if cfg.faults.any() {
            cfg.faults.safety_ns
        } else {
            0
        };
        let mut sim = Sim {
            deadline: safety + cfg.liveness_bound_ns(),
            chans: (0..channels)
                .map(|_| Chan {
                    alive: true,
                    ..Chan::default()
                })
                .collect(),
            reg_free: vec![0; costs.reg_threads],
            costs,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            src,
            dst,
            out: Vec::new(),
            guest,
            dmem,
            touched,
            dst_of_src,
            src_of_dst,
            link_free: 0,
            ctrl: [CtrlDir::default(), CtrlDir::default()],
            ctrl_alive: true,
            nic: BTreeMap::new(),
            nic_bytes: 0,
            next_rkey: 0x100,
            reg_jobs: 0,
            timer_at: [[None; 2]; 2],
            crashed: [false; 2],
            src_running: true,
            dst_running: false,
            pause_pending: false,
            tick_scheduled: false,
            guest_since: 0,
            stall_until: [0; 2],
            snapshot: None,
            device_state,
            received_state: Vec::new(),
            fault_rng: st.faults,
            faults_active: false,
            commit_sent: false,
            started_received: false,
            cause: Cause::Other,
            scratch: Vec::new(),
            cqe_buf: Vec::new(),
            trace: Trace::new(cfg.trace_tail),
            stats: Stats::default(),
            cfg,
        };
        sim.push(0, Ev::Input(SRC, Box::new(Input::Start)));
        sim.ensure_tick();
        if sim.cfg.faults.any() {
            sim.faults_active = true;
            let tick = sim.cfg.faults.tick_ns.max(1);
            sim.push(tick, Ev::FaultTick);
            sim.push(safety, Ev::SafetyEnd);
        }
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
            _ => self.dst.outcome().is_some(),
        }
    }

    /// Both sides have an outcome or are down.
    pub fn finished(&self) -> bool {
        (self.crashed[SRC] || self.done(SRC)) && (self.crashed[DST] || self.done(DST))
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
                        self.dst.phase(),
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

    fn dispatch(&mut self, ev: Ev) -> R {
        match ev {
            Ev::GuestTick => {
                self.tick_scheduled = false;
                self.advance_guest();
                self.ensure_tick();
                Ok(())
            }
            Ev::Input(side, input) => self.feed(side, *input),
            Ev::SrcPaused => {
                if !self.pause_pending || self.crashed[SRC] {
                    return Ok(());
                }
                self.pause_pending = false;
                self.advance_guest();
                self.src_running = false;
                self.snapshot = Some(self.guest.mem.clone());
                self.stats.paused_ns = Some(self.now);
                self.trace.rec(self.now, Tag::Paused, 0, 0);
                self.feed(SRC, Input::WorkloadPaused)
            }
            Ev::DstStarted => {
                if self.crashed[DST] {
                    return Ok(());
                }
                self.dst_running = true;
                self.stats.dst_started_ns = Some(self.now);
                self.trace.rec(self.now, Tag::Started, 0, 0);
                self.feed(DST, Input::WorkloadStarted)
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
            Ev::Timer(side, k, at) => self.timer(side, k, at),
            Ev::FaultTick => self.fault_tick(),
            Ev::Detect(side) => {
                // spec: ERR-3: a broken transport reaches each side as an input.
                if self.crashed[side] || self.done(side) {
                    return Ok(());
                }
                self.feed(side, Input::TransportFailed)
            }
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

    // -----------------------------------------------------------------------------------------
    // Feeding the machines

    /// Hands one input to a machine and carries out every command it returns, in order.
    fn feed(&mut self, side: usize, input: Input) -> R {
        self.trace
            .rec(self.now, Tag::Input, side as u64, input_kind(&input));
        if self.crashed[side] {
            return Ok(());
        }
        self.cause = match &input {
            Input::Frame(f) => match f.msg {
                Message::RegResult { .. } => Cause::Registration,
                Message::UnregDone { .. } => Cause::Eviction,
                _ => Cause::Other,
            },
            Input::WriteDone { .. } | Input::WriteFailed { .. } => Cause::Completion,
            Input::Dirty(_) => Cause::RoundStart,
            _ => Cause::Other,
        };
        let round_ack =
            matches!(&input, Input::Frame(f) if matches!(f.msg, Message::RoundAck { .. }));
        let table_ack =
            matches!(&input, Input::Frame(f) if matches!(f.msg, Message::BlockTableAck { .. }));
        let now_ms = self.now / NS_PER_MS;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let (before_s, before_d, round_before) =
            (self.src.phase(), self.dst.phase(), self.src.round());
        if side == SRC {
            self.src.handle(now_ms, input, &mut out);
        } else {
            self.dst.handle(now_ms, input, &mut out);
        }
        if side == SRC {
            if round_ack {
                if let Some(r) = self.stats.rounds.last_mut() {
                    r.end_ns.get_or_insert(self.now);
                }
            }
            if table_ack && self.src.phase() == SrcPhase::Scanning {
                self.stats.setup_done_ns = Some(self.now);
            }
            if self.src.round() > round_before {
                self.stats.rounds.push(RoundTiming {
                    round: self.src.round(),
                    start_ns: self.now,
                    ..RoundTiming::default()
                });
            }
        }
        if self.src.phase() != before_s {
            self.stats
                .phases
                .push((self.now, SRC, format!("{:?}", self.src.phase())));
        }
        if self.dst.phase() != before_d {
            self.stats
                .phases
                .push((self.now, DST, format!("{:?}", self.dst.phase())));
        }
        for c in out.drain(..) {
            self.exec(side, c)?;
        }
        self.out = out;
        self.arm_timers(side);
        Ok(())
    }

    fn exec(&mut self, side: usize, cmd: Command) -> R {
        match (side, cmd) {
            (_, Command::Send(f)) => self.send_frame(side, f),
            (
                SRC,
                Command::PostWrite {
                    channel,
                    wr_id,
                    block,
                    offset,
                    len,
                    rkey,
                    remote_offset,
                },
            ) => self.post_write(
                channel as usize,
                wr_id,
                block,
                offset,
                len,
                rkey,
                remote_offset,
            ),
            (SRC, Command::ScanDirty { all }) => {
                self.advance_guest();
                let scan = self.guest.scan(all);
                let page_log2 = self.guest.page_log2();
                let dirty: u64 = scan.dirty.iter().map(|d| d.count_ones()).sum();
                let zero: u64 = scan.zero.iter().map(|z| z.count_ones()).sum();
                self.stats.last_scan_dirty_bytes = (dirty - zero) << page_log2;
                // Zero pages are compared in full; a non-zero page differs within its first
                // cache lines (counted as 256 bytes).
                let compared = (zero << page_log2) + (dirty - zero) * 256;
                let t = 50_000 + ns(compared, self.costs.zero_check_fs_per_byte);
                self.stats.cpu[SRC].scan_ns += t;
                self.trace.rec(self.now, Tag::Scan, all as u64, dirty);
                self.push(self.now + t, Ev::Input(SRC, Box::new(Input::Dirty(scan))));
                Ok(())
            }
            (SRC, Command::PauseWorkload) => {
                // What the source predicted for the final round (spec: CONV-1).
                let bytes = self.stats.last_scan_dirty_bytes;
                self.stats.predicted_downtime_ns = match self.src.bandwidth() {
                    Some(bw) if bw > 0 => Some((bytes as u128 * 1_000_000_000 / bw as u128) as u64),
                    _ => (bytes == 0).then_some(0),
                };
                self.pause_pending = true;
                self.push(self.now + self.cfg.guest.pause_ns, Ev::SrcPaused);
                Ok(())
            }
            (SRC, Command::ResumeWorkload) => {
                // spec: SW-6, INV-OWN-1
                if self.commit_sent {
                    return Err(self.fail(
                        "SW-6",
                        "the source resumed its workload after sending COMMIT".into(),
                    ));
                }
                self.pause_pending = false;
                if !self.src_running {
                    self.guest_since = self.now;
                }
                self.src_running = true;
                self.trace.rec(self.now, Tag::Resumed, 0, 0);
                self.ensure_tick();
                Ok(())
            }
            (SRC, Command::CaptureDeviceState) => {
                self.trace.rec(
                    self.now,
                    Tag::DeviceState,
                    self.device_state.len() as u64,
                    0,
                );
                let blob = self.device_state.clone();
                self.push(
                    self.now + self.cfg.guest.capture_ns,
                    Ev::Input(SRC, Box::new(Input::DeviceState(blob))),
                );
                Ok(())
            }
            (SRC, Command::ComputeDigests) => {
                let log2 = self.src.params().chunk_log2;
                let d = digests(
                    &self.guest.mem,
                    self.guest.page_log2(),
                    log2,
                    &mut self.scratch,
                );
                let t = self.digest_time(SRC);
                self.trace.rec(self.now, Tag::Digests, SRC as u64, 0);
                self.push(self.now + t, Ev::Input(SRC, Box::new(Input::Digests(d))));
                Ok(())
            }
            (
                DST,
                Command::Register {
                    target,
                    block,
                    offset,
                    len,
                },
            ) => self.register(target, block, offset, len),
            (DST, Command::Unregister { rkey, .. }) => {
                let Some(mr) = self.nic.remove(&rkey) else {
                    return Err(self.fail(
                        "REG-7",
                        format!("the destination unregistered rkey {rkey:#x}, which its NIC does not hold"),
                    ));
                };
                self.nic_bytes -= mr.len;
                self.stats.unregistrations += 1;
                let t = ns(mr.len, self.costs.dereg_fs_per_byte);
                self.occupy_reg_thread(t);
                self.stats.cpu[DST].registration_ns += t;
                self.trace.rec(self.now, Tag::Unregister, rkey as u64, 0);
                Ok(())
            }
            (DST, Command::ZeroFill { block, offset, len }) => {
                let (b, p0, n) = self.dst_range(block, offset, len, "ZeroFill")?;
                self.dmem[b][p0..p0 + n].fill(0);
                self.touched[b].set_range(p0 as u64, n as u64);
                self.stats.cpu[DST].zero_fill_ns += ns(len, self.costs.zero_fill_fs_per_byte);
                self.trace.rec(self.now, Tag::ZeroFill, block as u64, len);
                Ok(())
            }
            (DST, Command::StoreDeviceState { offset, data }) => {
                if offset as usize != self.received_state.len() {
                    return Err(self.fail(
                        "SW-3",
                        format!(
                            "device state stored at {offset} after {} contiguous bytes",
                            self.received_state.len()
                        ),
                    ));
                }
                self.received_state.extend_from_slice(&data);
                Ok(())
            }
            (DST, Command::ComputeDigests) => {
                let Some(p) = self.dst.params() else {
                    return Err(self.fail("SW-5", "destination digests before negotiating".into()));
                };
                let d = digests(
                    &self.dmem,
                    self.guest.page_log2(),
                    p.chunk_log2,
                    &mut self.scratch,
                );
                let t = self.digest_time(DST);
                self.trace.rec(self.now, Tag::Digests, DST as u64, 0);
                self.push(self.now + t, Ev::Input(DST, Box::new(Input::Digests(d))));
                Ok(())
            }
            (DST, Command::StartWorkload) => self.start_workload(),
            (_, Command::Finish(o)) => self.finish(side, o),
            (s, c) => Err(self.fail(
                "TABLE",
                format!(
                    "{} issued a command meant for the other side: {c:?}",
                    ["source", "destination"][s]
                ),
            )),
        }
    }

    fn digest_time(&mut self, side: usize) -> u64 {
        let cpu = ns(self.cfg.guest.ram_bytes, self.costs.digest_fs_per_byte);
        self.stats.cpu[side].digest_ns += cpu;
        cpu / self.costs.cores.max(1)
    }

    /// Checks a destination range and converts it to (local block, first page, pages).
    fn dst_range(
        &self,
        block: u16,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<(usize, usize, usize), Failure> {
        let b = block as usize;
        let page_log2 = self.guest.page_log2();
        let mask = (1u64 << page_log2) - 1;
        let ok = b < self.dmem.len()
            && len > 0
            && offset & mask == 0
            && len & mask == 0
            && (offset + len) >> page_log2 <= self.dmem[b].len() as u64;
        if !ok {
            return Err(self.fail(
                "INV-REG-1",
                format!("{what} of block {block} [{offset}, +{len}) is outside the block or not page aligned"),
            ));
        }
        Ok((
            b,
            (offset >> page_log2) as usize,
            (len >> page_log2) as usize,
        ))
    }

    // -----------------------------------------------------------------------------------------
    // Control channel

    // spec: WIRE-5: every frame goes through the real codec, both ways.
    fn send_frame(&mut self, from: usize, f: Frame) -> R {
        let code = f.msg.code();
        let bytes = match wire::encode_to_vec(&f) {
            Ok(b) => b,
            Err(e) => {
                return Err(self.fail(
                    "WIRE-5",
                    format!("a machine sent an unencodable {}: {e}", f.msg.name()),
                ))
            }
        };
        let len = bytes.len() as u64;
        if code == wire::code::ZERO {
            self.stats.zero_frames += 1;
            self.stats.zero_frame_bytes += len;
        } else {
            self.stats.control_frames += 1;
            self.stats.control_bytes += len;
        }
        self.stats.cpu[from].control_ns += self.costs.frame_ns;
        if from == SRC && code == wire::code::COMMIT {
            self.commit_sent = true;
            self.stats.commit_sent_ns = Some(self.now);
        }
        let dir = from;
        if !self.ctrl_alive {
            self.stats.frames_lost += 1;
            self.trace
                .rec(self.now, Tag::FrameLost, dir as u64, code as u64);
            return Ok(());
        }
        self.trace
            .rec(self.now, Tag::FrameSent, dir as u64, code as u64);
        let wire_ns = self.costs.wire_ns(len);
        if dir == SRC {
            // Control shares the source-to-destination link with the data; the NIC
            // interleaves queues, so a frame does not wait behind queued writes.
            self.stats.link_busy_ns += wire_ns;
        }
        let arrive = (self.now + self.costs.frame_ns + self.costs.latency_ns + wire_ns)
            .max(self.ctrl[dir].last_arrive);
        self.ctrl[dir].last_arrive = arrive;
        self.ctrl[dir].queue.push_back((arrive, bytes));
        // spec: INV-FC-1: frames in flight never exceed what the receiver has buffers for,
        // nor what it has granted.
        let rx = 1 - dir;
        if !self.crashed[rx] && !self.done(rx) {
            let c = if rx == SRC {
                self.src.credits()
            } else {
                self.dst.credits()
            };
            let inflight = self.ctrl[dir].queue.len();
            if inflight > c.window as usize || inflight > c.peer_may_send as usize {
                return Err(self.fail(
                    "INV-FC-1",
                    format!(
                        "{} frames in flight to the {}, whose window is {} and who granted {}",
                        inflight,
                        ["source", "destination"][rx],
                        c.window,
                        c.peer_may_send
                    ),
                ));
            }
        }
        let at = arrive.max(self.stall_until[rx]);
        self.schedule_ctrl(dir, at);
        Ok(())
    }

    fn schedule_ctrl(&mut self, dir: usize, at: u64) {
        if self.ctrl[dir].at.is_some_and(|x| x <= at) {
            return;
        }
        self.ctrl[dir].at = Some(at);
        self.push(at, Ev::Ctrl(dir, at));
    }

    fn deliver_ctrl(&mut self, dir: usize) -> R {
        let rx = 1 - dir;
        let Some(&(arrive, _)) = self.ctrl[dir].queue.front() else {
            return Ok(());
        };
        let ready = arrive.max(self.stall_until[rx]);
        if ready > self.now {
            self.schedule_ctrl(dir, ready);
            return Ok(());
        }
        let (_, bytes) = self.ctrl[dir].queue.pop_front().expect("front exists");
        let input = match wire::decode(&bytes) {
            Ok(f) => Input::Frame(f),
            Err(e) => Input::Malformed(e),
        };
        if rx == SRC && matches!(&input, Input::Frame(f) if f.msg == Message::Started) {
            self.started_received = true;
        }
        self.stats.cpu[rx].control_ns += self.costs.frame_ns;
        self.feed(rx, input)?;
        if let Some(&(next, _)) = self.ctrl[dir].queue.front() {
            let at = next.max(self.stall_until[rx]).max(self.now);
            self.schedule_ctrl(dir, at);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Data channels

    #[allow(clippy::too_many_arguments)]
    fn post_write(
        &mut self,
        ch: usize,
        wr_id: u64,
        block: u16,
        offset: u64,
        len: u64,
        rkey: u32,
        remote_offset: u64,
    ) -> R {
        let negotiated = self.src.params().channels as usize;
        let b = block as usize;
        let page_log2 = self.guest.page_log2();
        let mask = (1u64 << page_log2) - 1;
        if ch >= negotiated || ch >= self.chans.len() {
            return Err(self.fail(
                "DATA-1",
                format!("write on channel {ch}, but {negotiated} were negotiated"),
            ));
        }
        if b >= self.guest.mem.len()
            || len == 0
            || offset & mask != 0
            || len & mask != 0
            || (offset + len) >> page_log2 > self.guest.mem[b].len() as u64
        {
            return Err(self.fail(
                "DATA-1",
                format!("write of source block {block} [{offset}, +{len}) outside the block"),
            ));
        }
        self.stats.writes_posted += 1;
        self.stats.data_posted_bytes += len;
        self.trace.rec(self.now, Tag::WritePosted, ch as u64, wr_id);
        let c = self.costs.clone();
        self.stats.cpu[SRC].requests_ns += c.wr_ns;
        let round = self.stats.rounds.len().saturating_sub(1);
        if !self.chans[ch].alive {
            // A broken queue pair flushes new requests with an error.
            self.push_cqe(
                ch,
                Cqe {
                    at: self.now + c.latency_ns,
                    wr_id,
                    ok: false,
                },
            );
            return Ok(());
        }
        // Channels beyond the cores share them.
        let nch = self.chans.len() as u64;
        let share = |t: u64| t * nch.max(c.cores) / c.cores;
        let send_cpu = share(ns(len, c.send_fs_per_byte));
        let chan = &mut self.chans[ch];
        let s1 = self.now.max(chan.send_free);
        let produced = s1 + c.wr_ns + send_cpu;
        chan.send_free = produced;
        self.stats.cpu[SRC].transport_ns += send_cpu;
        // The link: one FIFO for all channels in this direction.
        let wire_ns = c.wire_ns(len);
        let l_start = (s1 + c.wr_ns).max(self.link_free);
        if let Some(r) = self.stats.rounds.get_mut(round) {
            if l_start > self.link_free && r.first_post_ns.is_some_and(|f| self.link_free >= f) {
                let gap = l_start - self.link_free;
                self.stats.idle_gap_ns[self.cause as usize] += gap;
                r.gap_ns[self.cause as usize] += gap;
            }
        }
        self.link_free = l_start + wire_ns;
        self.stats.link_busy_ns += wire_ns;
        let wire_bytes = c.wire_bytes(len);
        self.stats.data_wire_bytes += wire_bytes;
        if let Some(r) = self.stats.rounds.get_mut(round) {
            r.first_post_ns.get_or_insert(self.now);
            r.wire_ns += wire_ns;
            r.header_ns += ns(wire_bytes - len, c.link_fs_per_byte);
        }
        let sent = self.link_free.max(produced);
        let place = if c.rdma {
            sent + c.latency_ns
        } else {
            // The receiving core copies into memory, faulting in untouched pages.
            let untouched = if self.cfg.guest.dst_pretouched {
                0
            } else {
                let d = self.dst_of_src[b] as usize;
                let n = len >> page_log2;
                (n - self.touched[d].count_range(offset >> page_log2, n)) << page_log2
            };
            let recv_cpu = share(ns(len, c.recv_fs_per_byte)) + ns(untouched, c.touch_fs_per_byte);
            self.stats.cpu[DST].transport_ns += recv_cpu;
            let chan = &mut self.chans[ch];
            let s3 = (l_start + c.latency_ns).max(chan.recv_free);
            let done = (s3 + recv_cpu).max(sent + c.latency_ns);
            chan.recv_free = done;
            done
        };
        let chan = &mut self.chans[ch];
        let place = place.max(chan.last_place);
        chan.last_place = place;
        chan.inflight.push_back(Wr {
            wr_id,
            block,
            offset,
            len,
            rkey,
            remote_offset,
            place_at: place,
            round,
        });
        if chan.place_at.is_none() {
            chan.place_at = Some(place);
            self.push(place, Ev::Place(ch, place));
        }
        Ok(())
    }

    fn place(&mut self, ch: usize) -> R {
        while let Some(w) = self.chans[ch].inflight.front() {
            if w.place_at > self.now {
                break;
            }
            let w = self.chans[ch].inflight.pop_front().expect("front exists");
            self.land(ch, w)?;
        }
        if let Some(w) = self.chans[ch].inflight.front() {
            let at = w.place_at;
            self.chans[ch].place_at = Some(at);
            self.push(at, Ev::Place(ch, at));
        }
        Ok(())
    }

    /// A write reaches the destination's NIC, which checks its key and range.
    // spec: INV-REG-1, DATA-1, REG-5
    fn land(&mut self, ch: usize, w: Wr) -> R {
        let mr = if self.crashed[DST] {
            None
        } else {
            self.nic.get(&w.rkey).copied()
        };
        let ok = match mr {
            None => {
                if !self.crashed[DST] && !self.done(DST) {
                    return Err(self.fail(
                        "INV-REG-1",
                        format!(
                            "write wr{} (block {} offset {} len {}) uses rkey {:#x}, which is not registered, while the destination is live",
                            w.wr_id, w.block, w.offset, w.len, w.rkey
                        ),
                    ));
                }
                false
            }
            Some(mr) => {
                if w.remote_offset + w.len > mr.len {
                    return Err(self.fail(
                        "INV-REG-1",
                        format!(
                            "write wr{} [{}, +{}) beyond its registration of {} bytes",
                            w.wr_id, w.remote_offset, w.len, mr.len
                        ),
                    ));
                }
                let page_log2 = self.guest.page_log2();
                let at = mr.offset + w.remote_offset;
                let want = self.dst_of_src[w.block as usize];
                if mr.block != want || at != w.offset {
                    return Err(self.fail(
                        "INV-MEM-1",
                        format!(
                            "write of source block {} offset {} lands at destination block {} offset {} (expected block {want})",
                            w.block, w.offset, mr.block, at
                        ),
                    ));
                }
                let (p0, n) = (
                    (w.offset >> page_log2) as usize,
                    (w.len >> page_log2) as usize,
                );
                let q0 = (at >> page_log2) as usize;
                let lb = mr.block as usize;
                self.dmem[lb][q0..q0 + n]
                    .copy_from_slice(&self.guest.mem[w.block as usize][p0..p0 + n]);
                self.touched[lb].set_range(q0 as u64, n as u64);
                self.stats.data_placed_bytes += w.len;
                let bin = (self.now / BIN_NS) as usize;
                if self.stats.bins.len() <= bin {
                    self.stats.bins.resize(bin + 1, 0);
                }
                self.stats.bins[bin] += w.len;
                if let Some(r) = self.stats.rounds.get_mut(w.round) {
                    r.placed_bytes += w.len;
                    r.last_place_ns = Some(self.now);
                }
                true
            }
        };
        if ok {
            self.trace.rec(self.now, Tag::WritePlaced, w.wr_id, w.len);
        } else {
            self.stats.writes_failed += 1;
            self.trace.rec(self.now, Tag::WriteRejected, w.wr_id, 1);
        }
        let at = w.place_at + self.costs.latency_ns;
        self.push_cqe(
            ch,
            Cqe {
                at,
                wr_id: w.wr_id,
                ok,
            },
        );
        Ok(())
    }

    fn push_cqe(&mut self, ch: usize, mut e: Cqe) {
        let chan = &mut self.chans[ch];
        // Completions of one queue arrive in order.
        e.at = e.at.max(chan.last_cqe);
        chan.last_cqe = e.at;
        chan.cq.push_back(e);
        if chan.poll_at.is_none() {
            let at = e.at + self.costs.cq_wakeup_ns + self.completion_delay();
            self.chans[ch].poll_at = Some(at);
            self.push(at, Ev::Poll(ch, at));
        }
    }

    /// Extra delay before a poll: a delayed completion fault, or the reorder fault holding
    /// completions back so that several are harvested (and shuffled) together.
    fn completion_delay(&mut self) -> u64 {
        if !self.faults_active {
            return 0;
        }
        let f = &self.cfg.faults;
        let (delay_ppm, delay_max, reorder_ppm) = (
            f.completion_delay_ppm,
            f.completion_delay_max_ns,
            f.reorder_ppm,
        );
        let mut d = 0;
        if self.fault_rng.chance(delay_ppm) {
            d = self.fault_rng.between(1, delay_max.max(1));
            self.record_fault(FaultKind::CompletionDelay, d);
        }
        if self.fault_rng.chance(reorder_ppm) {
            d += self.fault_rng.between(1, 50_000);
        }
        d
    }

    /// Harvests up to a batch of due completions and hands them to the source.
    fn poll(&mut self, ch: usize) -> R {
        let mut batch = std::mem::take(&mut self.cqe_buf);
        batch.clear();
        while batch.len() < self.costs.cq_batch {
            match self.chans[ch].cq.front() {
                Some(e) if e.at <= self.now => {
                    batch.push(*e);
                    self.chans[ch].cq.pop_front();
                }
                _ => break,
            }
        }
        if batch.len() > 1
            && self.faults_active
            && self.fault_rng.chance(self.cfg.faults.reorder_ppm)
        {
            self.fault_rng.shuffle(&mut batch);
            self.record_fault(FaultKind::CompletionReorder, batch.len() as u64);
        }
        for e in batch.drain(..) {
            let input = if e.ok {
                Input::WriteDone { wr_id: e.wr_id }
            } else {
                Input::WriteFailed { wr_id: e.wr_id }
            };
            self.feed(SRC, input)?;
        }
        self.cqe_buf = batch;
        if self.chans[ch].poll_at.is_none() {
            if let Some(e) = self.chans[ch].cq.front().copied() {
                let at = if e.at <= self.now {
                    self.now
                } else {
                    e.at + self.costs.cq_wakeup_ns + self.completion_delay()
                };
                self.chans[ch].poll_at = Some(at);
                self.push(at, Ev::Poll(ch, at));
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Registration at the destination

    fn occupy_reg_thread(&mut self, dur: u64) -> u64 {
        let (i, free) = self
            .reg_free
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(i, t)| (t, i))
            .expect("at least one registration thread");
        let end = self.now.max(free) + dur;
        self.reg_free[i] = end;
        self.stats.reg_busy_ns += dur;
        if let Some(r) = self.stats.rounds.last_mut() {
            r.reg_ns += dur;
        }
        end
    }

    fn register(&mut self, target: RegTarget, block: u16, offset: u64, len: u64) -> R {
        let (b, p0, n) = self.dst_range(block, offset, len, "Register")?;
        // Pinning (RDMA) faults untouched pages in; a TCP transport only records a key, and
        // its receiving copy pays for first touch instead.
        let untouched = if self.costs.rdma {
            (n as u64 - self.touched[b].count_range(p0 as u64, n as u64)) << self.guest.page_log2()
        } else {
            0
        };
        let c = &self.costs;
        let dur = c.reg_fixed_ns + ns(len, c.reg_fs_per_byte) + ns(untouched, c.touch_fs_per_byte);
        let end = self.occupy_reg_thread(dur);
        self.stats.cpu[DST].registration_ns += dur;
        self.stats.registrations += 1;
        if self.costs.rdma {
            self.touched[b].set_range(p0 as u64, n as u64);
        }
        let fail = self.faults_active && self.fault_rng.chance(self.cfg.faults.reg_fail_ppm);
        self.reg_jobs += 1;
        self.trace
            .rec(self.now, Tag::Register, block as u64, offset);
        self.push(
            end,
            Ev::RegDone {
                target,
                block,
                offset,
                len,
                fail,
            },
        );
        Ok(())
    }

    fn reg_done(&mut self, target: RegTarget, block: u16, offset: u64, len: u64, fail: bool) -> R {
        self.reg_jobs -= 1;
        if self.crashed[DST] || self.done(DST) {
            // The session is gone: the driver releases the registration with its device.
            return Ok(());
        }
        if fail {
            self.record_fault(FaultKind::RegistrationFailure, block as u64);
            return self.feed(DST, Input::RegisterFailed { target });
        }
        let rkey = self.next_rkey;
        self.next_rkey += 1;
        self.nic.insert(rkey, Mr { block, offset, len });
        self.nic_bytes += len;
        self.trace.rec(self.now, Tag::Registered, rkey as u64, len);
        self.feed(DST, Input::Registered { target, rkey })
    }

    // -----------------------------------------------------------------------------------------
    // Switchover and outcomes

    fn start_workload(&mut self) -> R {
        self.trace.rec(self.now, Tag::StartWorkload, 0, 0);
        // spec: SW-7
        if !self.commit_sent {
            return Err(self.fail(
                "SW-7",
                "the destination starts its workload although the source never sent COMMIT".into(),
            ));
        }
        if self.src_running {
            return Err(self.fail(
                "INV-OWN-1",
                "the destination starts while the source workload runs".into(),
            ));
        }
        // spec: SW-8
        if !self.nic.is_empty() || self.reg_jobs > 0 {
            return Err(self.fail(
                "SW-8",
                format!(
                    "the destination starts with {} registrations held and {} in progress",
                    self.nic.len(),
                    self.reg_jobs
                ),
            ));
        }
        // spec: INV-MEM-1: every page equals the source page at pause.
        let Some(snap) = self.snapshot.as_ref() else {
            return Err(self.fail(
                "INV-OWN-1",
                "the destination starts before the source paused".into(),
            ));
        };
        for (d, &s) in self.src_of_dst.iter().enumerate() {
            if snap[s] != self.dmem[d] {
                let p = snap[s]
                    .iter()
                    .zip(&self.dmem[d])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(self.fail(
                    "INV-MEM-1",
                    format!(
                        "at start, destination block {d} page {p} holds version {:#x}, the source had {:#x} at pause",
                        self.dmem[d][p], snap[s][p]
                    ),
                ));
            }
        }
        if self.received_state != self.device_state {
            return Err(self.fail(
                "INV-MEM-1",
                format!(
                    "device state differs at start ({} bytes received, {} captured)",
                    self.received_state.len(),
                    self.device_state.len()
                ),
            ));
        }
        self.stats.memory_verified = true;
        self.push(self.now + self.cfg.guest.start_ns, Ev::DstStarted);
        Ok(())
    }

    fn finish(&mut self, side: usize, o: Outcome) -> R {
        self.stats.finished_ns[side] = Some(self.now);
        self.trace
            .rec(self.now, Tag::Finish, side as u64, outcome_code(&o));
        match (side, o) {
            (SRC, Outcome::Aborted(a)) => {
                // spec: INV-OWN-2
                if !self.src_running {
                    return Err(self.fail(
                        "INV-OWN-2",
                        format!(
                            "the source aborted ({:?}: {}) without resuming its workload",
                            a.reason, a.detail
                        ),
                    ));
                }
            }
            (SRC, Outcome::InDoubt(why)) => {
                // spec: INV-DOUBT-1
                if !self.commit_sent || self.started_received {
                    return Err(self.fail(
                        "INV-DOUBT-1",
                        format!(
                            "source in doubt ({why}) with COMMIT sent = {}, STARTED received = {}",
                            self.commit_sent, self.started_received
                        ),
                    ));
                }
            }
            (SRC, Outcome::Completed) => {
                if !self.started_received {
                    return Err(self.fail(
                        "SW-7",
                        "the source completed without receiving STARTED".into(),
                    ));
                }
            }
            (_, Outcome::Completed) => {
                if !self.dst_running {
                    return Err(self.fail(
                        "SW-7",
                        "the destination completed without its workload running".into(),
                    ));
                }
            }
            (_, Outcome::Aborted(a)) => {
                if self.dst_running {
                    return Err(self.fail(
                        "INV-OWN-1",
                        format!(
                            "the destination aborted ({:?}) after starting its workload",
                            a.reason
                        ),
                    ));
                }
            }
            (_, Outcome::InDoubt(_)) => {
                return Err(self.fail(
                    "INV-DOUBT-1",
                    "the destination reached InDoubt, which only the source may".into(),
                ))
            }
        }
        Ok(())
    }

    /// Invariants checked after every event.
    fn check(&self) -> R {
        // spec: INV-OWN-1
        if self.src_running && self.dst_running {
            return Err(self.fail(
                "INV-OWN-1",
                "source and destination workloads both run".into(),
            ));
        }
        // spec: INV-PIN-1, as the destination accounts it and as its NIC holds it.
        let budget = self.cfg.pin_budget();
        if !self.crashed[DST] && !self.done(DST) && self.dst.registered_bytes() > budget {
            return Err(self.fail(
                "INV-PIN-1",
                format!(
                    "destination accounts {} registered bytes over its budget of {budget}",
                    self.dst.registered_bytes()
                ),
            ));
        }
        if self.nic_bytes > budget {
            return Err(self.fail(
                "INV-PIN-1",
                format!(
                    "the NIC holds {} registered bytes over the budget of {budget}",
                    self.nic_bytes
                ),
            ));
        }
        // spec: REG-4: the source never asks beyond the budget it was told.
        if !self.done(SRC) && self.src.registered_bytes() > budget {
            return Err(self.fail(
                "REG-4",
                format!(
                    "source accounts {} registered bytes over the budget of {budget}",
                    self.src.registered_bytes()
                ),
            ));
        }
        Ok(())
    }

    /// Checks on the final state: legal outcome pairs and a single owner.
    fn final_checks(&self) -> R {
        let s = self.src.outcome();
        let d = self.dst.outcome();
        if let Some(Outcome::Aborted(_)) = s {
            if !self.crashed[SRC] && !self.src_running {
                return Err(self.fail(
                    "INV-OWN-2",
                    "aborted migration left the source paused".into(),
                ));
            }
            if self.stats.dst_started_ns.is_some() && !self.crashed[DST] {
                return Err(self.fail(
                    "INV-OWN-1",
                    "source aborted but the destination started".into(),
                ));
            }
        }
        if let Some(Outcome::Completed) = d {
            if self.src_running {
                return Err(self.fail(
                    "INV-OWN-1",
                    "destination completed but the source runs".into(),
                ));
            }
        }
        if let Some(Outcome::Completed) = s {
            if !matches!(d, Some(Outcome::Completed)) && !self.crashed[DST] {
                return Err(self.fail("SW-7", format!("source completed, destination {d:?}")));
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Timers

    fn deadline(&self, side: usize, k: usize) -> Option<u64> {
        let t = if side == SRC {
            self.src.timers()
        } else {
            self.dst.timers()
        };
        if k == 0 {
            t.idle
        } else {
            t.keepalive
        }
    }

    fn arm_timers(&mut self, side: usize) {
        if self.crashed[side] || self.done(side) {
            return;
        }
        for k in 0..2 {
            if let Some(d) = self.deadline(side, k) {
                let at = (d * NS_PER_MS).max(self.now);
                if self.timer_at[side][k].is_some_and(|x| x <= at) {
                    continue;
                }
                self.timer_at[side][k] = Some(at);
                self.push(at, Ev::Timer(side, k, at));
            }
        }
    }

    fn timer(&mut self, side: usize, k: usize, at: u64) -> R {
        if self.timer_at[side][k] != Some(at) {
            return Ok(());
        }
        self.timer_at[side][k] = None;
        if self.crashed[side] || self.done(side) {
            return Ok(());
        }
        match self.deadline(side, k) {
            Some(d) if d * NS_PER_MS <= self.now => {
                self.trace.rec(self.now, Tag::Timer, side as u64, k as u64);
                let kind = if k == 0 {
                    TimerKind::Idle
                } else {
                    TimerKind::Keepalive
                };
                self.feed(side, Input::Timer(kind))?;
                // spec: ERR-4, ERR-5: a fired timer moves its deadline.
                if !self.done(side)
                    && self
                        .deadline(side, k)
                        .is_some_and(|d| d * NS_PER_MS <= self.now)
                {
                    return Err(self.fail(
                        "ERR-4",
                        format!(
                            "{} {kind:?} deadline did not move after firing: a driver would spin",
                            ["source", "destination"][side]
                        ),
                    ));
                }
                Ok(())
            }
            Some(_) => {
                self.arm_timers(side);
                Ok(())
            }
            None => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Faults

    fn record_fault(&mut self, kind: FaultKind, detail: u64) {
        self.stats.faults.push((self.now, kind, detail));
        let idx = crate::faults::ALL_KINDS
            .iter()
            .position(|&k| k == kind)
            .expect("listed") as u64;
        self.trace.rec(self.now, Tag::Fault, idx, detail);
    }

    fn fault_tick(&mut self) -> R {
        if !self.faults_active || self.finished() {
            return Ok(());
        }
        let f = self.cfg.faults.clone();
        if self.fault_rng.chance(f.conn_loss_ppm) {
            let n = self.src.params().channels as u64;
            let ch = self.fault_rng.below(n + 1);
            self.lose_channel(ch as usize);
        }
        if !self.crashed[SRC] && !self.done(SRC) && self.fault_rng.chance(f.source_crash_ppm) {
            self.crash(SRC);
        }
        if !self.crashed[DST] && !self.done(DST) && self.fault_rng.chance(f.destination_crash_ppm) {
            self.crash(DST);
        }
        if self.fault_rng.chance(f.cancel_ppm) {
            let side = if self.fault_rng.chance(800_000) {
                SRC
            } else {
                DST
            };
            self.record_fault(FaultKind::Cancel, side as u64);
            if !self.done(side) {
                self.feed(side, Input::Cancel)?;
            }
        }
        if self.fault_rng.chance(f.slow_receiver_ppm) {
            let side = self.fault_rng.below(2) as usize;
            let d = self.fault_rng.between(1, f.stall_max_ns.max(1));
            self.stall_until[side] = self.stall_until[side].max(self.now + d);
            self.record_fault(FaultKind::SlowReceiver, d);
        }
        let next = self.now + f.tick_ns.max(1);
        if next < f.safety_ns {
            self.push(next, Ev::FaultTick);
        }
        Ok(())
    }

    fn detect(&mut self, side: usize) {
        let d = self.fault_rng.between(0, self.cfg.faults.detect_max_ns);
        self.push(self.now + d, Ev::Detect(side));
    }

    /// Breaks channel `ch` (0 = control, `1 + i` = data channel `i`).
    fn lose_channel(&mut self, ch: usize) {
        if ch == 0 {
            if !self.ctrl_alive {
                return;
            }
            self.ctrl_alive = false;
            for d in 0..2 {
                self.stats.frames_lost += self.ctrl[d].queue.len() as u64;
                self.ctrl[d].queue.clear();
                self.ctrl[d].at = None;
            }
        } else {
            let i = ch - 1;
            if i >= self.chans.len() || !self.chans[i].alive {
                return;
            }
            self.chans[i].alive = false;
            self.chans[i].place_at = None;
            let lost: Vec<Wr> = self.chans[i].inflight.drain(..).collect();
            for w in lost {
                self.stats.writes_failed += 1;
                let at = self.now + self.costs.latency_ns;
                self.push_cqe(
                    i,
                    Cqe {
                        at,
                        wr_id: w.wr_id,
                        ok: false,
                    },
                );
            }
        }
        self.record_fault(FaultKind::ConnectionLoss, ch as u64);
        self.detect(SRC);
        self.detect(DST);
    }

    fn crash(&mut self, side: usize) {
        self.crashed[side] = true;
        if side == SRC {
            self.record_fault(FaultKind::SourceCrash, 0);
            self.src_running = false;
            self.pause_pending = false;
            // The source's NIC dies with it: nothing more is sent or completed.
            for c in &mut self.chans {
                c.inflight.clear();
                c.cq.clear();
                c.place_at = None;
                c.poll_at = None;
            }
        } else {
            self.record_fault(FaultKind::DestinationCrash, 0);
            self.dst_running = false;
            // Its registrations vanish: writes still in flight are rejected.
            self.nic.clear();
            self.nic_bytes = 0;
        }
        if !self.fault_rng.chance(self.cfg.faults.silent_crash_ppm) {
            self.detect(1 - side);
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
