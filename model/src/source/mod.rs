//! The source side: decides what to send, when a round ends, when to switch over, and when it
//! may (and may never again) resume its workload.
//!
//! The machine is fed [`SrcInput`]s and answers with [`SrcCommand`]s; it holds per-phase data
//! in [`State`] (the handshake, the transfer of rounds, the tail of the switchover), so a phase
//! never reads data another phase has not built yet.

mod stats;
mod transfer;

use std::collections::{BTreeSet, VecDeque};

use crate::auth;
use crate::credits::Credits;
use crate::detail::Detail;
use crate::geometry::Geometry;
use crate::table::{check_source, Event, SrcPhase};
use crate::types::*;
use crate::wire::{
    self, AbortReason, AuthMode, BlockDesc, DigestAlg, Frame, Hello, HelloAck, Message, Params,
    RegMode, WireError, MAC_LEN, MAX_DIGEST_BATCH, MAX_REG_BATCH, MAX_STATE_CHUNK, NONCE_LEN,
};

pub use stats::{RoundStats, SourceStats};
use transfer::{Ahead, Sub, Transfer};

/// What to do when the round or time limit is reached without converging (spec: CONV-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitPolicy {
    /// Switch over anyway, accepting a longer downtime.
    Switchover,
    /// Abort; the workload keeps running at the source.
    Abort,
}

/// Source settings. Every count has an explicit bound checked by [`Source::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceConfig {
    pub session_id: u64,
    pub blocks: Vec<BlockDesc>,
    /// Proposed parameters (spec: HS-3).
    pub params: Params,
    /// Pre-shared key; `None` only together with `params.auth == Insecure` (spec: AUTH-4).
    pub psk: Option<Vec<u8>>,
    pub credit_window: u16,
    /// Writes in flight per data channel (the send queue depth).
    pub writes_per_channel: u16,
    /// Chunks per REG_REQUEST; small batches keep registration pipelined with writes.
    pub reg_batch: u16,
    pub downtime_limit_ms: u64,
    pub max_rounds: u32,
    pub max_time_ms: Option<u64>,
    pub on_limit: LimitPolicy,
    /// Longest wait on the peer without progress (spec: ERR-4).
    pub idle_timeout_ms: u64,
    /// 0 disables keepalives.
    pub keepalive_ms: u64,
    /// The control connection's TLS channel binding, when it runs inside TLS (spec: AUTH-1).
    pub channel_binding: Option<crate::auth::Binding>,
    /// The workload was paused before this machine started (a save that is not live, spec:
    /// SAVE-1): it is this machine's to resume on an abort, whenever that comes.
    pub paused_at_start: bool,
    /// Largest device state to send over the data channels, proposed in HELLO (whole 4 KiB
    /// pages); 0 sends the device state on the control channel (spec: STATE-1).
    pub state_max: u64,
}

impl SourceConfig {
    /// Sensible defaults: 1 MiB chunks, dynamic registration, zero elision, one channel,
    /// xxh3 verification, 300 ms downtime limit, 30 rounds then switch over.
    pub fn with_defaults(session_id: u64, blocks: Vec<BlockDesc>, psk: Option<Vec<u8>>) -> Self {
        SourceConfig {
            session_id,
            blocks,
            params: Params {
                chunk_log2: 20,
                mode: RegMode::Dynamic,
                flags: wire::flag::ZERO_ELISION,
                channels: 1,
                digest: DigestAlg::Xxh3_64,
                auth: if psk.is_some() {
                    AuthMode::HmacSha256
                } else {
                    AuthMode::Insecure
                },
                max_reg_inflight: 4,
            },
            psk,
            credit_window: 64,
            writes_per_channel: 64,
            reg_batch: 64,
            downtime_limit_ms: 300,
            max_rounds: 30,
            max_time_ms: None,
            on_limit: LimitPolicy::Switchover,
            idle_timeout_ms: 30_000,
            keepalive_ms: 5_000,
            channel_binding: None,
            paused_at_start: false,
            state_max: 0,
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub &'static str);

/// Which of the source's timers fired (see [`Source::timers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SrcTimer {
    /// Waited on the peer without progress for the idle timeout (spec: ERR-4).
    Progress,
    /// Nothing sent for the keepalive interval (spec: ERR-5).
    Keepalive,
}

/// The source's armed deadlines; the driver fires `SrcInput::Timer(kind)` once `now >=`
/// the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SrcTimers {
    pub progress: Option<Millis>,
    pub keepalive: Option<Millis>,
}

impl SrcTimers {
    /// The earliest deadline and its kind.
    pub fn next(&self) -> Option<(Millis, SrcTimer)> {
        [
            self.progress.map(|t| (t, SrcTimer::Progress)),
            self.keepalive.map(|t| (t, SrcTimer::Keepalive)),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Everything that can happen to the source. The driver feeds control frames in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SrcInput {
    /// The operator starts the migration.
    Start,
    /// A control frame arrived and decoded.
    Frame(Frame),
    /// A control frame arrived and failed to decode.
    Malformed(WireError),
    /// Data channel `channel` joined the session: the destination admitted its DATA_HELLO
    /// (spec: AUTH-6).
    DataOpened {
        channel: u8,
    },
    /// A one-sided write completed: its bytes are placed at the destination.
    WriteDone {
        wr_id: u64,
    },
    /// A one-sided write completed with an error.
    WriteFailed {
        wr_id: u64,
    },
    /// Result of `SrcCommand::ScanDirty`.
    Dirty(DirtyScan),
    WorkloadPaused,
    /// Pausing the workload, or reading its dirty log or device state, failed.
    WorkloadFailed,
    /// Result of `SrcCommand::CaptureDeviceState { area: 0 }`: the whole device state.
    DeviceState(Vec<u8>),
    /// `CaptureDeviceState` with a state area: the device state's first `len` bytes are in
    /// the source's state buffer (block index `blocks.len()` of `PostWrite`); more may follow.
    StateProduced {
        len: u64,
    },
    /// The device state is complete at `len` bytes; `digest` is their XXH3-64 (spec: STATE-5).
    StateDone {
        len: u64,
        digest: u64,
    },
    /// Result of `SrcCommand::ComputeDigests`: one digest per chunk in global chunk order.
    Digests(Vec<u64>),
    Timer(SrcTimer),
    /// The control channel failed (spec: ERR-3).
    TransportFailed,
    /// Data channel `channel` failed or was closed (spec: ERR-3: a failure before the final
    /// ROUND_ACK; afterwards every write is placed and the channel's end changes nothing).
    DataLost {
        channel: u8,
    },
    /// The operator cancels (spec: ERR-1).
    Cancel,
}

impl From<Frame> for SrcInput {
    fn from(f: Frame) -> Self {
        SrcInput::Frame(f)
    }
}

/// One-sided write of local `block[offset..offset+len]` to `rkey` at `remote_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteCmd {
    pub channel: u8,
    pub wr_id: u64,
    pub block: u16,
    pub offset: u64,
    pub len: u64,
    pub rkey: u32,
    pub remote_offset: u64,
}

/// What the source asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SrcCommand {
    Send(Frame),
    /// Open data channel `channel` and present `hello` (spec: AUTH-6); answer
    /// `SrcInput::DataOpened` once the destination admitted it, `DataLost` otherwise (spec: DATA-5).
    OpenData {
        hello: wire::DataHello,
    },
    /// Answer `WriteDone` or `WriteFailed` once the write completes.
    PostWrite(WriteCmd),
    /// Fetch and clear the dirty log; with `all`, report every page as dirty.
    ScanDirty {
        all: bool,
    },
    PauseWorkload,
    ResumeWorkload,
    /// COMMIT is about to leave: from here on nothing may resume the workload, neither this
    /// machine nor anything the driver set up to resume it should the source die (spec: SW-6).
    /// Carried out before the `Send(COMMIT)` that follows it.
    RelinquishWorkload,
    /// Produce the device state. With `area` 0 answer `SrcInput::DeviceState` with the
    /// whole blob; otherwise stream it into the state buffer (at most `area` bytes),
    /// answering `StateProduced` as it grows and `StateDone` at its end (spec: STATE-3).
    CaptureDeviceState {
        area: u64,
    },
    /// Digest every chunk of local memory (answer `SrcInput::Digests`).
    ComputeDigests,
    /// The machine reached its final outcome; it accepts no further input.
    Finish(Outcome),
}

/// The sink the source writes into.
pub type SrcOut = Out<SrcCommand, SourceStats>;

/// Deliberate protocol bugs for checking that the model checker and simulator catch them.
/// Only present with the `mutations` feature; production builds cannot enable any.
#[cfg(feature = "mutations")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mutations {
    /// End a round without waiting for write completions.
    pub skip_drain: bool,
    /// Write to a chunk as soon as its registration is requested.
    pub write_before_reg_result: bool,
    /// Resume the workload when an error follows COMMIT.
    pub resume_after_commit: bool,
    /// Evict chunks that still have writes in flight.
    pub evict_inflight: bool,
    /// Skip the final dirty scan after pausing.
    pub skip_final_scan: bool,
    /// Ignore the credit rule and send whenever there is something to send.
    pub ignore_credits: bool,
    /// Give up the workload only after COMMIT has left (too late for a guard to know).
    pub relinquish_after_commit: bool,
    /// Do not count outstanding writes as a wait on the peer (no deadline for them).
    pub writes_without_deadline: bool,
    /// Announce device state in STATE_PLACED once its writes are posted, not completed.
    pub state_placed_early: bool,
}

/// What the handshake settled, kept for the rest of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Session {
    params: Params,
    pin_budget: u64,
    dst_nonce: [u8; NONCE_LEN],
    /// The negotiated state area (spec: STATE-1); 0: device state on the control channel.
    state_area: u64,
}

/// The device state and digests of the switchover, sent in order before PREPARE.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Tail {
    /// The control channel's device state, whole.
    device_state: Option<Vec<u8>>,
    state_cursor: usize,
    /// The state area's device state: bytes produced so far, and its end once known.
    produced: u64,
    state_done: bool,
    /// The largest prefix announced in STATE_PLACED.
    placed_sent: u64,
    state_digest: u64,
    digests: Option<Vec<u64>>,
    digest_cursor: usize,
}

/// Bytes of newly placed device state that make a STATE_PLACED worth its frame (the last
/// one goes whatever its size) (spec: STATE-3).
pub const STATE_PLACED_STEP: u64 = 4 << 20;

/// Per-phase data (spec: section "State tables", source).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum State {
    Idle,
    AwaitHelloAck,
    AwaitTableAck(Session),
    /// Scanning, Sending, AwaitRoundAck and Pausing: rounds of pre-copy and the final round.
    Transfer(Session, Box<Transfer>),
    /// The transfer stays: its registrations and channels carry the state area's writes.
    Finalizing(Session, Box<Transfer>),
    AwaitPrepared(Session),
    /// PREPARED received, COMMIT queued; `commit_sent` once it is handed to the transport.
    AwaitStarted {
        commit_sent: bool,
    },
    Done(Outcome),
}

/// Control-channel bookkeeping every phase shares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Link {
    credits: Credits,
    outbox: VecDeque<Message>,
    last_send: Millis,
    /// The last progress on a wait on the peer, or when the current wait began (spec: ERR-4).
    progress_at: Millis,
    now: Millis,
    #[cfg(feature = "mutations")]
    mutations: Mutations,
}

impl Link {
    fn can_send(&self) -> bool {
        #[cfg(feature = "mutations")]
        if self.mutations.ignore_credits {
            return true;
        }
        self.credits.can_send()
    }

    fn send(&mut self, msg: Message, out: &mut SrcOut) {
        #[cfg(feature = "mutations")]
        let grant = if self.mutations.ignore_credits && !self.credits.can_send() {
            self.credits.send = self.credits.send.saturating_sub(1);
            std::mem::take(&mut self.credits.ungranted)
        } else {
            self.credits.take()
        };
        #[cfg(not(feature = "mutations"))]
        let grant = self.credits.take(); // spec: FC-2, FC-3
        let commit = msg == Message::Commit;
        #[cfg(feature = "mutations")]
        let late = self.mutations.relinquish_after_commit;
        #[cfg(not(feature = "mutations"))]
        let late = false;
        if commit && !late {
            out.cmds.push(SrcCommand::RelinquishWorkload); // spec: SW-6
        }
        out.stats.control_frames_sent += 1;
        if commit {
            out.stats.commit_sent_ms = Some(self.now);
        }
        self.last_send = self.now;
        out.cmds.push(SrcCommand::Send(Frame {
            credits: grant,
            msg,
        }));
        if commit && late {
            out.cmds.push(SrcCommand::RelinquishWorkload);
        }
    }
}

/// The source state machine (spec: section "State tables", source).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    cfg: SourceConfig,
    geo: Geometry,
    nonce: [u8; NONCE_LEN],
    hello_payload: Vec<u8>,
    /// The proposal until HELLO_ACK, then the agreed parameters.
    params: Params,
    /// Rounds started so far (spec: RND-1).
    round: u32,
    started_at: Millis,
    link: Link,
    state: State,
}

impl Source {
    /// `nonce` must come from a cryptographic random source (spec: AUTH-1).
    pub fn new(cfg: SourceConfig, nonce: [u8; NONCE_LEN]) -> Result<Self, ConfigError> {
        Message::BlockTable {
            blocks: cfg.blocks.clone(),
        }
        .validate()
        .map_err(|_| ConfigError("block table outside protocol bounds"))?;
        let hello = Message::Hello(Hello {
            version_min: wire::PROTOCOL_VERSION,
            version_max: wire::PROTOCOL_VERSION,
            session_id: cfg.session_id,
            params: cfg.params,
            credit_window: cfg.credit_window,
            nonce,
            state_max: cfg.state_max,
        });
        hello
            .validate()
            .map_err(|_| ConfigError("parameters outside protocol bounds"))?;
        match (cfg.params.auth, &cfg.psk) {
            (AuthMode::Insecure, None) | (AuthMode::HmacSha256, Some(_)) => {}
            _ => {
                return Err(ConfigError(
                    "a key is required exactly when authentication is on",
                ))
            }
        }
        let mut names = BTreeSet::new();
        if !cfg.blocks.iter().all(|b| names.insert(b.name.clone())) {
            return Err(ConfigError("duplicate block name"));
        }
        if cfg.writes_per_channel == 0
            || cfg.reg_batch == 0
            || cfg.reg_batch as usize > MAX_REG_BATCH
        {
            return Err(ConfigError(
                "writes_per_channel and reg_batch must be 1..=1024",
            ));
        }
        if cfg.max_rounds == 0 || cfg.idle_timeout_ms == 0 {
            return Err(ConfigError(
                "max_rounds and idle_timeout_ms must be positive",
            ));
        }
        if cfg.keepalive_ms >= cfg.idle_timeout_ms {
            // spec: ERR-5: keepalives must come well within the peer's idle timeout.
            return Err(ConfigError(
                "keepalive interval must be below the idle timeout",
            ));
        }
        let geo = Geometry::new(&cfg.blocks, cfg.params.chunk_log2)
            .map_err(|_| ConfigError("block page size above the chunk size, or too many chunks"))?;
        Ok(Source {
            hello_payload: auth::payload(&hello),
            params: cfg.params,
            link: Link {
                credits: Credits::new(cfg.credit_window),
                outbox: VecDeque::new(),
                last_send: 0,
                progress_at: 0,
                now: 0,
                #[cfg(feature = "mutations")]
                mutations: Mutations::default(),
            },
            cfg,
            geo,
            nonce,
            round: 0,
            started_at: 0,
            state: State::Idle,
        })
    }

    /// Turns on deliberate bugs (checker and simulator tests only).
    #[cfg(feature = "mutations")]
    pub fn set_mutations(&mut self, m: Mutations) {
        self.link.mutations = m;
    }

    pub fn phase(&self) -> SrcPhase {
        match &self.state {
            State::Idle => SrcPhase::Idle,
            State::AwaitHelloAck => SrcPhase::AwaitHelloAck,
            State::AwaitTableAck(_) => SrcPhase::AwaitTableAck,
            State::Transfer(_, t) => match t.sub {
                Sub::Scanning => SrcPhase::Scanning,
                Sub::Sending => SrcPhase::Sending,
                Sub::AwaitRoundAck => SrcPhase::AwaitRoundAck,
                Sub::Pausing => SrcPhase::Pausing,
            },
            State::Finalizing(..) => SrcPhase::Finalizing,
            State::AwaitPrepared(_) => SrcPhase::AwaitPrepared,
            State::AwaitStarted { .. } => SrcPhase::AwaitStarted,
            State::Done(_) => SrcPhase::Done,
        }
    }

    pub fn outcome(&self) -> Option<Outcome> {
        match self.state {
            State::Done(o) => Some(o),
            _ => None,
        }
    }

    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Negotiated parameters (the proposal until HELLO_ACK arrives).
    pub fn params(&self) -> Params {
        self.params
    }

    pub fn credits(&self) -> &Credits {
        &self.link.credits
    }

    /// COMMIT has been handed to the transport: the source will never resume on its own.
    pub fn commit_sent(&self) -> bool {
        matches!(
            self.state,
            State::AwaitStarted { commit_sent: true }
                | State::Done(Outcome::InDoubt(_) | Outcome::Completed)
        )
    }

    /// Bytes the source accounts as registered at the destination (spec: REG-4).
    pub fn registered_bytes(&self) -> u64 {
        match &self.state {
            State::Transfer(_, t) | State::Finalizing(_, t) => t.regs.bytes,
            _ => 0,
        }
    }

    /// Writes posted and not yet completed.
    pub fn writes_in_flight(&self) -> usize {
        match &self.state {
            State::Transfer(_, t) | State::Finalizing(_, t) => t.writes.inflight.len(),
            _ => 0,
        }
    }

    /// Bytes still to send in the current round.
    pub fn remaining_bytes(&self) -> u64 {
        match &self.state {
            State::Transfer(_, t) => t.remaining_bytes(&self.geo),
            _ => 0,
        }
    }

    /// Measured bandwidth in bytes per second, once a round has completed.
    pub fn bandwidth(&self) -> Option<u64> {
        match &self.state {
            State::Transfer(_, t) => t.bandwidth,
            _ => None,
        }
    }

    /// The workload is paused (or its pause was requested) by this machine, or was paused
    /// before it started (spec: SAVE-1).
    pub fn workload_paused(&self) -> bool {
        if self.cfg.paused_at_start && !matches!(self.state, State::Done(_)) {
            return true;
        }
        match &self.state {
            State::Transfer(_, t) => t.paused,
            State::Finalizing(..) | State::AwaitPrepared(_) | State::AwaitStarted { .. } => true,
            _ => false,
        }
    }

    /// Armed deadlines.
    pub fn timers(&self) -> SrcTimers {
        if matches!(self.state, State::Idle | State::Done(_)) {
            return SrcTimers::default();
        }
        SrcTimers {
            progress: self
                .waiting()
                .then(|| self.link.progress_at + self.cfg.idle_timeout_ms),
            keepalive: (self.cfg.keepalive_ms > 0)
                .then(|| self.link.last_send + self.cfg.keepalive_ms),
        }
    }

    /// The source waits on the peer: a reply, a write completion, a data channel, or credits
    /// (spec: ERR-4). Local work (scanning, pausing, capturing state, digests) is not waiting.
    pub fn waiting(&self) -> bool {
        match &self.state {
            State::Idle | State::Done(_) => false,
            State::AwaitHelloAck
            | State::AwaitTableAck(_)
            | State::AwaitPrepared(_)
            | State::AwaitStarted { .. } => true,
            State::Transfer(_, t) => t.waiting(&self.link, self.mutation_no_write_deadline()),
            // Out of credits means waiting for the destination's grant.
            State::Finalizing(_, t) => !self.link.can_send() || t.state_waiting(),
        }
    }

    #[cfg(feature = "mutations")]
    fn mutation_no_write_deadline(&self) -> bool {
        self.link.mutations.writes_without_deadline
    }
    #[cfg(not(feature = "mutations"))]
    fn mutation_no_write_deadline(&self) -> bool {
        false
    }

    /// Feeds one input; commands are appended to `out.cmds` in the order the driver must run
    /// them.
    pub fn handle(&mut self, now: Millis, input: SrcInput, out: &mut SrcOut) {
        self.link.now = now;
        if matches!(self.state, State::Done(_)) {
            return; // late completions and frames after the outcome are dropped
        }
        let was_waiting = self.waiting();
        self.on_input(input, out);
        if !matches!(self.state, State::Done(_)) {
            self.pump(out);
        }
        if !was_waiting && self.waiting() {
            self.link.progress_at = now; // a new wait on the peer begins now
        }
    }

    /// Convenience form of [`handle`](Self::handle) that returns the commands only.
    pub fn step(&mut self, now: Millis, input: SrcInput) -> Vec<SrcCommand> {
        let mut out = SrcOut::new();
        self.handle(now, input, &mut out);
        out.cmds
    }

    fn go(&mut self, to: State, ev: Event) {
        let from = self.phase();
        self.state = to;
        check_source(from, ev, self.phase());
    }

    fn progress(&mut self) {
        self.link.progress_at = self.link.now;
    }

    fn on_input(&mut self, input: SrcInput, out: &mut SrcOut) {
        match input {
            SrcInput::Start => self.on_start(out),
            SrcInput::Frame(f) => self.on_frame(f, out),
            SrcInput::Malformed(_) => {
                self.abort(out, AbortReason::ProtocolViolation, Detail::Malformed)
            }
            SrcInput::DataOpened { channel } => self.on_data_opened(channel, out),
            SrcInput::WriteDone { wr_id } => self.on_write_done(wr_id, out),
            SrcInput::WriteFailed { .. } => {
                self.abort(out, AbortReason::TransportFailed, Detail::WriteFailed)
            }
            SrcInput::Dirty(scan) => self.on_dirty(scan, out),
            SrcInput::WorkloadPaused => self.on_paused(out),
            SrcInput::WorkloadFailed => {
                self.abort(out, AbortReason::WorkloadFailed, Detail::PauseFailed)
            }
            SrcInput::DeviceState(blob) => self.on_device_state(blob, out),
            SrcInput::StateProduced { len } => self.on_state_produced(len, None, out),
            SrcInput::StateDone { len, digest } => self.on_state_produced(len, Some(digest), out),
            SrcInput::Digests(d) => self.on_digests(d, out),
            SrcInput::Timer(SrcTimer::Progress) => {
                if self.waiting() {
                    // spec: ERR-4
                    self.abort(out, AbortReason::Timeout, Detail::NoProgress);
                }
            }
            SrcInput::Timer(SrcTimer::Keepalive) => self.on_keepalive(out),
            SrcInput::TransportFailed => {
                self.abort(out, AbortReason::TransportFailed, Detail::TransportFailed)
            }
            SrcInput::DataLost { .. } => {
                // spec: DATA-7, ERR-3: the data channels matter until the final round is placed,
                // and with a state area until the device state is.
                let carrying = match &self.state {
                    State::AwaitTableAck(_) | State::Transfer(..) => true,
                    State::Finalizing(s, _) => s.state_area > 0,
                    _ => false,
                };
                if carrying {
                    self.abort(out, AbortReason::TransportFailed, Detail::DataChannelLost)
                }
            }
            // spec: SW-6: after COMMIT left, a cancel stops the wait for STARTED and ends in
            // doubt; nothing is resumed.
            SrcInput::Cancel => self.abort(out, AbortReason::Cancelled, Detail::Cancelled),
        }
    }

    fn on_start(&mut self, out: &mut SrcOut) {
        if !matches!(self.state, State::Idle) {
            return self.abort(out, AbortReason::LocalError, Detail::StartTwice);
        }
        self.started_at = self.link.now;
        out.stats.started_at_ms = Some(self.link.now);
        let hello = Message::Hello(Hello {
            version_min: wire::PROTOCOL_VERSION,
            version_max: wire::PROTOCOL_VERSION,
            session_id: self.cfg.session_id,
            params: self.cfg.params,
            credit_window: self.cfg.credit_window,
            nonce: self.nonce,
            state_max: self.cfg.state_max,
        });
        self.link.outbox.push_back(hello);
        self.link.credits.announce_window();
        self.go(State::AwaitHelloAck, Event::Start); // spec: HS-1
    }

    fn on_paused(&mut self, out: &mut SrcOut) {
        let State::Transfer(_, t) = &mut self.state else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if t.sub != Sub::Pausing || t.final_scan {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        }
        t.final_scan = true;
        t.sub = Sub::Scanning;
        out.stats.paused_at_ms = Some(self.link.now);
        out.cmds.push(SrcCommand::ScanDirty { all: false }); // spec: SW-1
        check_source(SrcPhase::Pausing, Event::WorkloadPaused, SrcPhase::Scanning);
    }

    /// The tail being prepared: during the final round, or in Finalizing.
    fn tail_mut(&mut self) -> Option<(&Session, &mut Tail)> {
        match &mut self.state {
            State::Transfer(s, t) | State::Finalizing(s, t) => {
                t.tail.as_deref_mut().map(|tail| (&*s, tail))
            }
            _ => None,
        }
    }

    fn on_device_state(&mut self, blob: Vec<u8>, out: &mut SrcOut) {
        let Some((s, tail)) = self.tail_mut() else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if tail.device_state.is_some() || s.state_area > 0 {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        }
        if blob.len() > wire::MAX_DEVICE_STATE as usize {
            // spec: SW-3
            return self.abort(out, AbortReason::LocalError, Detail::StateTooLarge);
        }
        tail.state_digest = crate::digest::chunk_digest(&blob);
        tail.device_state = Some(blob);
    }

    /// The device state grows in the state buffer; its pages join the writes once the final
    /// round is acknowledged (spec: STATE-3).
    fn on_state_produced(&mut self, len: u64, digest: Option<u64>, out: &mut SrcOut) {
        let Some((s, tail)) = self.tail_mut() else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if s.state_area == 0 {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        }
        if tail.state_done || len < tail.produced {
            return self.abort(out, AbortReason::LocalError, Detail::StateProgress);
        }
        if len > s.state_area {
            return self.abort(out, AbortReason::LocalError, Detail::StateOverArea);
        }
        tail.produced = len;
        if let Some(d) = digest {
            tail.state_done = true;
            tail.state_digest = d;
        }
        if let State::Finalizing(_, t) = &mut self.state {
            t.queue_state(&self.geo);
        }
    }

    fn on_digests(&mut self, d: Vec<u64>, out: &mut SrcOut) {
        let total = self.geo.ram_chunks as usize;
        let Some((s, tail)) = self.tail_mut() else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if tail.digests.is_some() || s.params.digest == DigestAlg::None {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        }
        if d.len() != total {
            return self.abort(out, AbortReason::LocalError, Detail::DigestCount);
        }
        tail.digests = Some(d);
    }

    fn on_keepalive(&mut self, out: &mut SrcOut) {
        if matches!(self.state, State::Idle) {
            return;
        }
        if self.link.outbox.is_empty() && self.link.credits.can_send() {
            self.link.send(Message::Nop, out); // spec: ERR-5
        } else {
            self.link.last_send = self.link.now;
        }
    }

    fn abort(&mut self, out: &mut SrcOut, reason: AbortReason, detail: Detail) {
        self.abort_inner(out, reason, false, detail)
    }

    /// Ends the migration. Before COMMIT has left, the workload resumes and the outcome is
    /// Aborted (spec: INV-OWN-2); after, the outcome is InDoubt (spec: INV-DOUBT-1).
    fn abort_inner(&mut self, out: &mut SrcOut, reason: AbortReason, by_peer: bool, d: Detail) {
        let paused = self.workload_paused();
        let commit_sent = matches!(self.state, State::AwaitStarted { commit_sent: true });
        out.stats.finished_at_ms = Some(self.link.now);
        if commit_sent && !by_peer {
            #[cfg(feature = "mutations")]
            if self.link.mutations.resume_after_commit {
                out.cmds.push(SrcCommand::ResumeWorkload);
            }
            let o = Outcome::InDoubt(d);
            out.cmds.push(SrcCommand::Finish(o));
            return self.go(State::Done(o), Event::InDoubt);
        }
        // An ABORT from the destination after COMMIT means it did not start (spec: SW-7), so
        // resuming here keeps a single owner.
        if !by_peer
            && reason != AbortReason::TransportFailed
            && !matches!(self.state, State::Idle)
            && self.link.credits.can_send()
        {
            self.link.outbox.clear();
            self.link.send(Message::Abort { reason }, out); // spec: ERR-1
        }
        if paused {
            out.cmds.push(SrcCommand::ResumeWorkload);
        }
        let o = Outcome::Aborted(AbortInfo {
            reason,
            by_peer,
            detail: d,
        });
        out.cmds.push(SrcCommand::Finish(o));
        self.go(State::Done(o), Event::Abort);
    }

    fn violation(&mut self, out: &mut SrcOut, d: Detail) {
        self.abort(out, AbortReason::ProtocolViolation, d)
    }

    // -----------------------------------------------------------------------------------------
    // Frames from the destination

    fn on_frame(&mut self, f: Frame, out: &mut SrcOut) {
        // Drivers decode frames with `wire::decode`, which validates; a frame built any other
        // way is checked here too, so no unvalidated field reaches the logic (spec: WIRE-5).
        if f.msg.validate().is_err() {
            return self.violation(out, Detail::OutOfBounds);
        }
        let starved = !self.link.credits.can_send();
        if let Err(d) = self.link.credits.on_receive(f.credits) {
            return self.violation(out, d); // spec: FC-5
        }
        out.stats.control_frames_received += 1;
        // spec: ERR-4: a keepalive is not progress, unless it brings the credits we wait for.
        if f.msg != Message::Nop || (starved && self.link.credits.can_send()) {
            self.progress();
        }
        match (&mut self.state, f.msg) {
            (_, Message::Nop) => {}
            (_, Message::Abort { reason }) => {
                self.abort_inner(out, reason, true, Detail::PeerAborted)
            }
            (State::AwaitHelloAck, Message::HelloAck(a)) => self.on_hello_ack(a, out),
            (State::AwaitTableAck(s), Message::BlockTableAck { rkeys }) => {
                let s = *s;
                self.on_table_ack(s, rkeys, out)
            }
            (State::Transfer(_, t), Message::RegResult { req_id, rkeys })
                if t.sub == Sub::Sending =>
            {
                if let Err(d) = t.on_reg_result(req_id, rkeys) {
                    self.violation(out, d);
                }
            }
            (State::Transfer(_, t), Message::UnregDone { req_id, count })
                if t.sub == Sub::Sending =>
            {
                if let Err(d) = t.on_unreg_done(req_id, count, &self.geo) {
                    self.violation(out, d);
                }
            }
            // spec: STATE-2: the state area's registrations and evictions after the final round.
            (State::Finalizing(_, t), Message::RegResult { req_id, rkeys }) => {
                if let Err(d) = t.on_reg_result(req_id, rkeys) {
                    self.violation(out, d);
                }
            }
            (State::Finalizing(_, t), Message::UnregDone { req_id, count }) => {
                if let Err(d) = t.on_unreg_done(req_id, count, &self.geo) {
                    self.violation(out, d);
                }
            }
            (State::Transfer(_, t), Message::RoundAck { round }) if t.sub == Sub::AwaitRoundAck => {
                if round != self.round {
                    return self.violation(out, Detail::RoundAckMismatch); // spec: RND-4
                }
                self.on_round_ack(out)
            }
            (State::AwaitPrepared(_), Message::Prepared) => {
                self.link.outbox.push_back(Message::Commit); // spec: SW-6
                self.go(
                    State::AwaitStarted { commit_sent: false },
                    Event::PreparedMsg,
                );
            }
            (State::AwaitStarted { commit_sent }, Message::Started) => {
                if !*commit_sent {
                    return self.violation(out, Detail::StartedBeforeCommit);
                }
                out.stats.finished_at_ms = Some(self.link.now);
                out.cmds.push(SrcCommand::Finish(Outcome::Completed));
                self.go(State::Done(Outcome::Completed), Event::StartedMsg);
            }
            _ => self.violation(out, Detail::WrongPhase),
        }
    }

    fn on_hello_ack(&mut self, a: HelloAck, out: &mut SrcOut) {
        let p = self.cfg.params;
        // spec: HS-2, HS-4
        if a.session_id != self.cfg.session_id {
            return self.violation(out, Detail::OtherSession);
        }
        if a.version != wire::PROTOCOL_VERSION {
            return self.abort(out, AbortReason::Incompatible, Detail::VersionChosen);
        }
        let q = a.params;
        if q.chunk_log2 != p.chunk_log2
            || q.mode != p.mode
            || q.flags != p.flags
            || q.digest != p.digest
            || q.auth != p.auth
            || q.channels > p.channels
            || q.max_reg_inflight > p.max_reg_inflight
        {
            return self.violation(out, Detail::NotNarrowing);
        }
        let ack_payload = auth::payload(&Message::HelloAck(a.clone()));
        match (&self.cfg.psk, q.auth) {
            (Some(key), AuthMode::HmacSha256) => {
                let zero = auth::payload(&Message::HelloAck(HelloAck {
                    mac: [0; MAC_LEN],
                    ..a.clone()
                }));
                let binding = self.cfg.channel_binding.as_ref();
                if !auth::verify_dst(key, &self.hello_payload, &zero, binding, &a.mac) {
                    // spec: AUTH-5
                    return self.abort(out, AbortReason::AuthFailed, Detail::DestinationKey);
                }
            }
            (None, AuthMode::Insecure) => {
                if a.mac != [0; MAC_LEN] {
                    return self.violation(out, Detail::MacInInsecure); // spec: AUTH-4
                }
            }
            _ => return self.violation(out, Detail::AuthModeChanged),
        }
        match q.mode {
            _ if a.state_capacity > self.cfg.state_max => {
                return self.violation(out, Detail::StateAreaOverMax); // spec: STATE-1
            }
            RegMode::PinAll if a.pin_budget < self.geo.total_bytes + a.state_capacity => {
                return self.abort(out, AbortReason::PinBudget, Detail::PinAllOverBudget);
            }
            RegMode::Dynamic if a.pin_budget < self.geo.chunk_size().min(self.geo.total_bytes) => {
                return self.abort(out, AbortReason::PinBudget, Detail::BudgetBelowChunk);
            }
            _ => {}
        }
        // spec: STATE-2: the state area is one more block, after the table's.
        self.geo = match self.geo.with_state_area(a.state_capacity) {
            Ok(g) => g,
            Err(d) => return self.abort(out, AbortReason::Incompatible, d),
        };
        self.link.credits.learn_peer_window(a.credit_window);
        self.params = q;
        let mac = match &self.cfg.psk {
            // spec: AUTH-1
            Some(key) => auth::src_mac(
                key,
                &self.hello_payload,
                &ack_payload,
                self.cfg.channel_binding.as_ref(),
            ),
            None => [0; MAC_LEN],
        };
        // spec: AUTH-3: no memory data before BLOCK_TABLE_ACK, which follows the verified AUTH.
        self.link.outbox.push_back(Message::Auth { mac });
        self.link.outbox.push_back(Message::BlockTable {
            blocks: self.cfg.blocks.clone(),
        });
        let session = Session {
            params: q,
            pin_budget: a.pin_budget,
            dst_nonce: a.nonce,
            state_area: a.state_capacity,
        };
        self.go(State::AwaitTableAck(session), Event::HelloAck);
    }

    fn on_table_ack(&mut self, s: Session, rkeys: Vec<u32>, out: &mut SrcOut) {
        if rkeys.len() != self.geo.blocks.len() {
            return self.violation(out, Detail::TableAckCount);
        }
        if s.params.mode == RegMode::Dynamic && rkeys.iter().any(|&k| k != 0) {
            return self.violation(out, Detail::KeysInDynamic);
        }
        let t = Transfer::new(&self.geo, &s.params, s.pin_budget, &rkeys);
        out.stats.setup_done_ms = Some(self.link.now);
        // spec: AUTH-3, AUTH-6, DATA-5: data channels open only after the table is acknowledged, each
        // with a token bound to this session and the destination's nonce.
        for channel in 0..s.params.channels {
            let token = auth::data_token(
                self.cfg.psk.as_deref(),
                self.cfg.session_id,
                channel,
                &s.dst_nonce,
            );
            out.cmds.push(SrcCommand::OpenData {
                hello: wire::DataHello {
                    session_id: self.cfg.session_id,
                    channel,
                    token,
                },
            });
        }
        out.cmds.push(SrcCommand::ScanDirty { all: true });
        self.go(State::Transfer(s, Box::new(t)), Event::TableAck);
    }

    fn on_data_opened(&mut self, channel: u8, out: &mut SrcOut) {
        let State::Transfer(_, t) = &mut self.state else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if !t.channels.opened(channel) {
            return self.abort(out, AbortReason::LocalError, Detail::DataChannelUnknown);
        }
        if t.channels.all_open() {
            out.stats.channels_open_ms = Some(self.link.now);
        }
        self.progress();
    }

    fn on_write_done(&mut self, wr_id: u64, out: &mut SrcOut) {
        let (State::Transfer(_, t) | State::Finalizing(_, t)) = &mut self.state else {
            return self.abort(out, AbortReason::LocalError, Detail::UnknownWrite);
        };
        if !t.writes.complete(wr_id, &mut t.channels) {
            return self.abort(out, AbortReason::LocalError, Detail::UnknownWrite);
        }
        self.progress();
    }

    fn on_round_ack(&mut self, out: &mut SrcOut) {
        let now = self.link.now;
        let State::Transfer(s, t) = &mut self.state else {
            unreachable!("checked by the caller");
        };
        t.measure_round(now, out);
        if t.last {
            let s = *s;
            out.stats.final_round_acked_ms = Some(now);
            // Requested when the final round started (spec: SW-2, SW-4); the device state
            // produced so far joins the writes (spec: STATE-3).
            assert!(t.tail.is_some(), "the final round requests its tail");
            let State::Transfer(_, mut t) = std::mem::replace(&mut self.state, State::Idle) else {
                unreachable!("matched above");
            };
            t.queue_state(&self.geo);
            self.state = State::Finalizing(s, t);
            check_source(
                SrcPhase::AwaitRoundAck,
                Event::FinalRoundAck,
                SrcPhase::Finalizing,
            );
        } else {
            t.sub = Sub::Scanning;
            check_source(SrcPhase::AwaitRoundAck, Event::RoundAck, SrcPhase::Scanning);
            match std::mem::take(&mut t.ahead) {
                // spec: RND-3: taken while the round's last writes travelled.
                Ahead::Ready(scan) => self.on_dirty(scan, out),
                // Still running: its result comes as `Dirty`.
                Ahead::Requested => t.ahead = Ahead::Requested,
                Ahead::None => out.cmds.push(SrcCommand::ScanDirty { all: false }), // spec: CONV-1
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Rounds and convergence

    fn on_dirty(&mut self, scan: DirtyScan, out: &mut SrcOut) {
        let now = self.link.now;
        let elapsed = now.saturating_sub(self.started_at);
        let State::Transfer(s, t) = &mut self.state else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if !self.geo.scan_fits(&scan) {
            return self.abort(out, AbortReason::LocalError, Detail::ScanShape);
        }
        match (t.sub, &t.ahead) {
            // spec: RND-3: the next round's scan, early: kept until the ROUND_ACK.
            (Sub::Sending | Sub::AwaitRoundAck, Ahead::Requested) => {
                t.ahead = Ahead::Ready(scan);
                return;
            }
            (Sub::Scanning, Ahead::Requested) => t.ahead = Ahead::None,
            (Sub::Scanning, Ahead::None) => {}
            _ => return self.abort(out, AbortReason::LocalError, Detail::Unrequested),
        }
        if t.final_scan {
            #[cfg(feature = "mutations")]
            let scan = if self.link.mutations.skip_final_scan {
                DirtyScan {
                    dirty: scan
                        .dirty
                        .iter()
                        .map(|d| crate::PageBitmap::new(d.len()))
                        .collect(),
                    zero: scan
                        .zero
                        .iter()
                        .map(|d| crate::PageBitmap::new(d.len()))
                        .collect(),
                }
            } else {
                scan
            };
            let merged = t.merge_carry(scan);
            self.round += 1;
            t.start_round(merged, true, self.round, now, &self.geo, &s.params, out);
            // spec: SW-2, SW-4: the workload is paused and the final scan taken, so memory
            // is final: the device state and digests are prepared while the final round runs.
            t.tail = Some(Box::default());
            out.cmds
                .push(SrcCommand::CaptureDeviceState { area: s.state_area });
            if s.params.digest != DigestAlg::None {
                out.cmds.push(SrcCommand::ComputeDigests);
            }
            return check_source(SrcPhase::Scanning, Event::DirtyScan, SrcPhase::Sending);
        }
        if self.round == 0 {
            self.round += 1;
            t.start_round(scan, false, self.round, now, &self.geo, &s.params, out);
            return check_source(SrcPhase::Scanning, Event::DirtyScan, SrcPhase::Sending);
        }
        let elide = s.params.flags & wire::flag::ZERO_ELISION != 0;
        let dirty_bytes = self.geo.dirty_bytes(&scan, elide);
        // spec: CONV-1
        let converged = match t.bandwidth {
            Some(bw) => {
                dirty_bytes.saturating_mul(1000) <= bw.saturating_mul(self.cfg.downtime_limit_ms)
            }
            None => dirty_bytes == 0,
        };
        // spec: CONV-2
        let out_of_time = self.cfg.max_time_ms.is_some_and(|l| elapsed >= l);
        let limit = self.round >= self.cfg.max_rounds || out_of_time;
        if converged || (limit && self.cfg.on_limit == LimitPolicy::Switchover) {
            t.carry = Some(scan);
            t.paused = true;
            t.sub = Sub::Pausing;
            out.cmds.push(SrcCommand::PauseWorkload); // spec: SW-1
            check_source(SrcPhase::Scanning, Event::Converged, SrcPhase::Pausing);
        } else if limit {
            self.abort(out, AbortReason::NotConverged, Detail::NotConverged);
        } else {
            self.round += 1;
            t.start_round(scan, false, self.round, now, &self.geo, &s.params, out);
            check_source(SrcPhase::Scanning, Event::DirtyScan, SrcPhase::Sending);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sending: everything that waits on credits, channel slots or the pin budget

    fn pump(&mut self, out: &mut SrcOut) {
        while !self.link.outbox.is_empty() && self.link.can_send() {
            let m = self.link.outbox.pop_front().expect("not empty");
            if m == Message::Commit {
                self.state = State::AwaitStarted { commit_sent: true };
            }
            self.link.send(m, out);
        }
        if self.link.outbox.is_empty() {
            match &mut self.state {
                State::Transfer(s, t) if t.sub == Sub::Sending => {
                    let round = self.round;
                    if t.pump(&mut self.link, &self.geo, &self.cfg, s, round, out) {
                        check_source(
                            SrcPhase::Sending,
                            Event::RoundQuiescent,
                            SrcPhase::AwaitRoundAck,
                        );
                    }
                }
                State::Finalizing(..) => self.pump_tail(out),
                _ => {}
            }
        }
        if !matches!(self.state, State::Done(_))
            && self.link.outbox.is_empty()
            && self.link.credits.wants_nop()
        {
            self.link.send(Message::Nop, out); // spec: FC-4
        }
    }

    /// Device state, digests, then PREPARE (spec: SW-3 .. SW-5, STATE-3).
    fn pump_tail(&mut self, out: &mut SrcOut) {
        let State::Finalizing(s, t) = &mut self.state else {
            return;
        };
        let area = s.state_area > 0;
        if area {
            t.pump_state(&mut self.link, &self.geo, &self.cfg, s, out);
        }
        #[cfg(feature = "mutations")]
        let early = self.link.mutations.state_placed_early;
        #[cfg(not(feature = "mutations"))]
        let early = false;
        let placed = t.state_placed(&self.geo, early);
        let regs_idle = t.regs_idle();
        let tail = t
            .tail
            .as_deref_mut()
            .expect("requested when the final round started");
        if area && placed > tail.placed_sent && self.link.can_send() {
            let last = tail.state_done && placed == tail.produced;
            if last || placed - tail.placed_sent >= STATE_PLACED_STEP {
                tail.placed_sent = placed;
                self.link.send(Message::StatePlaced { placed }, out);
            }
        }
        let state_complete = if area {
            tail.state_done && tail.placed_sent == tail.produced && regs_idle
        } else {
            tail.device_state.is_some()
        };
        let need_digests = s.params.digest != DigestAlg::None;
        if !state_complete || (need_digests && tail.digests.is_none()) {
            return;
        }
        let empty = Vec::new();
        let state = tail.device_state.as_ref().unwrap_or(&empty);
        while self.link.can_send() {
            if tail.state_cursor < state.len() {
                let end = (tail.state_cursor + MAX_STATE_CHUNK).min(state.len());
                let m = Message::DeviceState {
                    offset: tail.state_cursor as u32,
                    total_len: state.len() as u32,
                    data: state[tail.state_cursor..end].to_vec(),
                };
                tail.state_cursor = end;
                self.link.send(m, out);
                continue;
            }
            if let Some(d) = tail
                .digests
                .as_ref()
                .filter(|d| tail.digest_cursor < d.len())
            {
                let end = (tail.digest_cursor + MAX_DIGEST_BATCH).min(d.len());
                let m = Message::Digests {
                    first_chunk: tail.digest_cursor as u32,
                    digests: d[tail.digest_cursor..end].to_vec(),
                };
                tail.digest_cursor = end;
                self.link.send(m, out);
                continue;
            }
            let digest_count = if need_digests { self.geo.ram_chunks } else { 0 };
            let m = Message::Prepare {
                state_len: if area {
                    tail.produced
                } else {
                    state.len() as u64
                },
                digest_count,
                state_digest: if need_digests { tail.state_digest } else { 0 },
            };
            self.link.send(m, out);
            out.stats.prepare_sent_ms = Some(self.link.now);
            let s = *s;
            return self.go(State::AwaitPrepared(s), Event::TailSent);
        }
    }
}
