//! The destination side: validates everything the source sends before acting on it, exposes
//! memory only after the key is proven and only within the pin budget, and starts the
//! workload only on COMMIT.
//!
//! The machine is fed [`DstInput`]s and answers with [`DstCommand`]s. Its per-phase data
//! ([`State`]) holds the handshake until AUTH, then the [`Session`] (block mapping,
//! registrations, rounds), then the switchover's tail; nothing of a later phase exists
//! before that phase.

mod session;

use std::collections::{BTreeSet, VecDeque};

use crate::auth;
use crate::credits::Credits;
use crate::detail::Detail;
use crate::table::{check_destination, DstPhase, Event};
use crate::types::*;
use crate::wire::{
    self, AbortReason, AuthMode, BlockDesc, DataHello, Frame, Hello, HelloAck, Message, Params,
    RegMode, WireError, MAC_LEN, MAX_REG_INFLIGHT, NONCE_LEN,
};

use session::{Session, Tail};

/// Destination settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DestConfig {
    /// Local blocks, in local order; the source's table must match them by name (spec: BLK-2).
    pub blocks: Vec<BlockDesc>,
    /// Pre-shared key; `None` means the operator chose insecure mode explicitly (spec: AUTH-4).
    pub psk: Option<Vec<u8>>,
    /// Most bytes registered at once (spec: REG-4).
    pub pin_budget: u64,
    pub credit_window: u16,
    pub max_channels: u8,
    pub max_reg_inflight: u8,
    /// Longest silence from the source while waiting on it (spec: ERR-4).
    pub idle_timeout_ms: u64,
    /// 0 disables keepalives.
    pub keepalive_ms: u64,
    /// Largest state area this destination holds for device state sent over the data
    /// channels (a multiple of 4 KiB); 0 takes device state on the control channel only
    /// (spec: STATE-1).
    pub state_capacity: u64,
    /// Deliberate bugs (checker and simulator tests only).
    #[cfg(feature = "mutations")]
    pub mutations: DstMutations,
}

/// Deliberate destination bugs, to show the checker and the simulator catch them. Only present
/// with the `mutations` feature.
#[cfg(feature = "mutations")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DstMutations {
    /// Zero-fill ZERO ranges without checking them against the block (DATA-3).
    pub skip_zero_range_check: bool,
    /// Accept BLOCK_TABLE while still waiting for AUTH (AUTH-2).
    pub table_before_auth: bool,
    /// Register a REG_REQUEST even when it exceeds the pin budget (REG-4).
    pub skip_pin_budget: bool,
}

impl DestConfig {
    /// Defaults matching `SourceConfig::with_defaults`.
    pub fn with_defaults(blocks: Vec<BlockDesc>, psk: Option<Vec<u8>>, pin_budget: u64) -> Self {
        DestConfig {
            blocks,
            psk,
            pin_budget,
            credit_window: 64,
            max_channels: wire::MAX_CHANNELS,
            max_reg_inflight: MAX_REG_INFLIGHT,
            idle_timeout_ms: 30_000,
            keepalive_ms: 5_000,
            state_capacity: 0,
            #[cfg(feature = "mutations")]
            mutations: DstMutations::default(),
        }
    }

    /// Checks every bound; the same checks [`Destination::new`] applies.
    pub fn validate(&self) -> Result<(), crate::source::ConfigError> {
        use crate::source::ConfigError;
        Message::BlockTable {
            blocks: self.blocks.clone(),
        }
        .validate()
        .map_err(|_| ConfigError("block table outside protocol bounds"))?;
        let mut names = BTreeSet::new();
        if !self.blocks.iter().all(|b| names.insert(b.name.clone())) {
            return Err(ConfigError("duplicate block name"));
        }
        if !(wire::MIN_CREDIT_WINDOW..=wire::MAX_CREDIT_WINDOW).contains(&self.credit_window) {
            return Err(ConfigError("credit window outside 4..=1024"));
        }
        if !(1..=wire::MAX_CHANNELS).contains(&self.max_channels) {
            return Err(ConfigError("channels outside 1..=16"));
        }
        if !(1..=MAX_REG_INFLIGHT).contains(&self.max_reg_inflight) {
            return Err(ConfigError(
                "registration requests in flight outside 1..=16",
            ));
        }
        if self.idle_timeout_ms == 0 {
            return Err(ConfigError("the idle timeout must be positive"));
        }
        if self.keepalive_ms >= self.idle_timeout_ms {
            // spec: ERR-5: keepalives must come well within the peer's idle timeout.
            return Err(ConfigError(
                "keepalive interval must be below the idle timeout",
            ));
        }
        if self.state_capacity > wire::MAX_STATE_AREA
            || !self
                .state_capacity
                .is_multiple_of(1 << wire::STATE_PAGE_LOG2)
        {
            return Err(ConfigError(
                "the state area must be whole 4 KiB pages, at most 1 TiB",
            ));
        }
        Ok(())
    }
}

/// Observations for reports; the machine only writes them (into the [`Out`] sink).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestStats {
    pub rounds: u32,
    pub reg_chunks: u64,
    pub unreg_chunks: u64,
    pub zero_pages: u64,
    pub max_registered_bytes: u64,
    pub state_bytes: u64,
    pub control_frames_received: u64,
    /// AUTH verified.
    pub authenticated_ms: Option<Millis>,
    /// The final ROUND_END arrived: the source is paused and its memory in place.
    pub final_round_ms: Option<Millis>,
    /// PREPARE arrived.
    pub prepare_ms: Option<Millis>,
    /// COMMIT arrived; the workload start was requested.
    pub commit_ms: Option<Millis>,
    pub finished_at_ms: Option<Millis>,
}

/// Which of the destination's timers fired (see [`Destination::timers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DstTimer {
    /// No frame from the source for the idle timeout while waiting on it (spec: ERR-4).
    Idle,
    /// Nothing sent for the keepalive interval (spec: ERR-5).
    Keepalive,
}

/// The destination's armed deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DstTimers {
    pub idle: Option<Millis>,
    pub keepalive: Option<Millis>,
}

impl DstTimers {
    /// The earliest deadline and its kind.
    pub fn next(&self) -> Option<(Millis, DstTimer)> {
        [
            self.idle.map(|t| (t, DstTimer::Idle)),
            self.keepalive.map(|t| (t, DstTimer::Keepalive)),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Everything that can happen to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DstInput {
    /// A control frame arrived and decoded.
    Frame(Frame),
    /// A control frame arrived and failed to decode.
    Malformed(WireError),
    /// Answer to `DstCommand::Register`.
    Registered {
        target: RegTarget,
        rkey: u32,
    },
    RegisterFailed {
        target: RegTarget,
    },
    /// Answer to `DstCommand::ComputeDigests`: one digest per RAM chunk in local chunk order.
    Digests(Vec<u64>),
    /// Answer to `DstCommand::FinishState`: the consumer holds the whole device state, whose
    /// bytes digest to `digest` (XXH3-64).
    StateLoaded {
        digest: u64,
    },
    /// The consumer of the device state refused it or failed.
    StateFailed,
    /// Answer to `DstCommand::StartWorkload`.
    WorkloadStarted,
    WorkloadFailed,
    Timer(DstTimer),
    /// The control channel failed (spec: ERR-3).
    TransportFailed,
    /// An admitted data channel failed or was closed (spec: ERR-3: a failure while rounds
    /// are received; afterwards every write is placed and the channel's end changes nothing).
    DataLost {
        channel: u8,
    },
    /// The operator cancels (spec: ERR-1).
    Cancel,
}

impl From<Frame> for DstInput {
    fn from(f: Frame) -> Self {
        DstInput::Frame(f)
    }
}

/// What the destination asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DstCommand {
    Send(Frame),
    /// Register `len` bytes at `offset` of local block `block` for remote write; answer with
    /// `DstInput::Registered` or `DstInput::RegisterFailed`.
    Register {
        target: RegTarget,
        block: u16,
        offset: u64,
        len: u64,
    },
    /// Revoke a registration immediately: no write under `rkey` lands after this returns.
    Unregister {
        target: RegTarget,
        rkey: u32,
    },
    /// Write zeros over local `block[offset..offset+len]`.
    ZeroFill {
        block: u16,
        offset: u64,
        len: u64,
    },
    /// Store device-state bytes at `offset` (device state on the control channel).
    StoreDeviceState {
        offset: u32,
        data: Vec<u8>,
    },
    /// The state area's first `upto` bytes are placed: hand them, from where the previous
    /// feed ended, to the device state's consumer, in order (spec: STATE-4).
    FeedState {
        upto: u64,
    },
    /// The device state is complete at `len` bytes: let the consumer finish taking it
    /// (answer `StateLoaded` or `StateFailed`). The workload does not start (spec: STATE-4).
    FinishState {
        len: u64,
    },
    /// Digest every RAM chunk of local memory (answer `DstInput::Digests`).
    ComputeDigests,
    /// Start the workload (answer `WorkloadStarted` or `WorkloadFailed`).
    StartWorkload,
    /// The machine reached its final outcome; it accepts no further input.
    Finish(Outcome),
}

/// The sink the destination writes into.
pub type DstOut = Out<DstCommand, DestStats>;

/// What the handshake settled, until the block table arrives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Handshake {
    session_id: u64,
    params: Params,
    state_capacity: u64,
    hello_payload: Vec<u8>,
    ack_payload: Vec<u8>,
}

/// Per-phase data (spec: section "State tables", destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum State {
    AwaitHello,
    AwaitAuth(Box<Handshake>),
    AwaitTable(Box<Handshake>),
    Pinning(Box<Session>),
    Receiving(Box<Session>),
    ReceivingTail(Box<Session>, Box<Tail>),
    Verifying(Box<Session>, Box<Tail>),
    Prepared(Box<Session>),
    /// COMMIT received, every key revoked, the start requested (spec: SW-7).
    Starting,
    Done(Outcome),
}

/// Bound on queued replies: each request in flight earns at most one (spec: REG-2).
const MAX_OUTBOX: usize = 4 * MAX_REG_INFLIGHT as usize + 8;

/// The destination state machine (spec: section "State tables", destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    cfg: DestConfig,
    nonce: [u8; NONCE_LEN],
    /// The connection's TLS channel binding, when it runs inside TLS (spec: AUTH-1).
    binding: Option<crate::auth::Binding>,
    credits: Credits,
    outbox: VecDeque<Message>,
    last_recv: Millis,
    last_send: Millis,
    now: Millis,
    state: State,
}

impl Destination {
    /// `nonce` must come from a cryptographic random source (spec: AUTH-1).
    pub fn new(
        cfg: DestConfig,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, crate::source::ConfigError> {
        cfg.validate()?;
        Ok(Destination {
            credits: Credits::new(cfg.credit_window),
            cfg,
            nonce,
            binding: None,
            outbox: VecDeque::new(),
            last_recv: 0,
            last_send: 0,
            now: 0,
            state: State::AwaitHello,
        })
    }

    /// Starts the idle clock (a connection was accepted at `now`).
    /// The connection this machine serves runs inside TLS with this channel binding.
    pub fn with_binding(mut self, binding: Option<crate::auth::Binding>) -> Self {
        self.binding = binding;
        self
    }

    pub fn with_clock(mut self, now: Millis) -> Self {
        self.now = now;
        self.last_recv = now;
        self.last_send = now;
        self
    }

    pub fn phase(&self) -> DstPhase {
        match &self.state {
            State::AwaitHello => DstPhase::AwaitHello,
            State::AwaitAuth(_) => DstPhase::AwaitAuth,
            State::AwaitTable(_) => DstPhase::AwaitTable,
            State::Pinning(_) => DstPhase::Pinning,
            State::Receiving(_) => DstPhase::Receiving,
            State::ReceivingTail(..) => DstPhase::ReceivingTail,
            State::Verifying(..) => DstPhase::Verifying,
            State::Prepared(_) => DstPhase::Prepared,
            State::Starting => DstPhase::Starting,
            State::Done(_) => DstPhase::Done,
        }
    }

    pub fn outcome(&self) -> Option<Outcome> {
        match self.state {
            State::Done(o) => Some(o),
            _ => None,
        }
    }

    /// Parameters agreed in HELLO_ACK, once sent.
    pub fn params(&self) -> Option<Params> {
        match &self.state {
            State::AwaitHello | State::Starting | State::Done(_) => None,
            State::AwaitAuth(h) | State::AwaitTable(h) => Some(h.params),
            State::Pinning(s)
            | State::Receiving(s)
            | State::ReceivingTail(s, _)
            | State::Verifying(s, _)
            | State::Prepared(s) => Some(s.params),
        }
    }

    /// The session id of the HELLO this destination answered.
    pub fn session_id(&self) -> Option<u64> {
        match &self.state {
            State::AwaitAuth(h) | State::AwaitTable(h) => Some(h.session_id),
            State::Pinning(s)
            | State::Receiving(s)
            | State::ReceivingTail(s, _)
            | State::Verifying(s, _)
            | State::Prepared(s) => Some(s.session_id),
            _ => None,
        }
    }

    /// The source proved the key: AUTH verified (spec: AUTH-2), and the session has not ended.
    pub fn authenticated(&self) -> bool {
        !matches!(
            self.state,
            State::AwaitHello | State::AwaitAuth(_) | State::Done(_)
        )
    }

    pub fn credits(&self) -> &Credits {
        &self.credits
    }

    /// Bytes registered or being registered (spec: INV-PIN-1).
    pub fn registered_bytes(&self) -> u64 {
        self.session().map_or(0, |s| s.registered_bytes)
    }

    pub fn pin_budget(&self) -> u64 {
        self.cfg.pin_budget
    }

    /// The session's state area in bytes, once its block table is accepted (spec: STATE-1).
    pub fn state_area(&self) -> u64 {
        self.session()
            .and_then(|s| s.geo.state_block().map(|b| s.geo.blocks[b].length))
            .unwrap_or(0)
    }

    pub fn config(&self) -> &DestConfig {
        &self.cfg
    }

    /// Current round number (the one being received).
    pub fn round(&self) -> u32 {
        self.session().map_or(0, |s| s.round)
    }

    /// Local block index of a wire block index, once the table is accepted.
    pub fn local_block(&self, wire_block: u16) -> Option<u16> {
        self.session()
            .and_then(|s| s.local.get(wire_block as usize).copied())
    }

    fn session(&self) -> Option<&Session> {
        match &self.state {
            State::Pinning(s)
            | State::Receiving(s)
            | State::ReceivingTail(s, _)
            | State::Verifying(s, _)
            | State::Prepared(s) => Some(s),
            _ => None,
        }
    }

    pub fn timers(&self) -> DstTimers {
        match self.state {
            State::Done(_) | State::Starting => return DstTimers::default(),
            _ => {}
        }
        let awaiting = !matches!(self.state, State::Pinning(_) | State::Verifying(..));
        DstTimers {
            idle: awaiting.then(|| self.last_recv + self.cfg.idle_timeout_ms),
            keepalive: (self.cfg.keepalive_ms > 0 && !matches!(self.state, State::AwaitHello))
                .then(|| self.last_send + self.cfg.keepalive_ms),
        }
    }

    /// A data channel asks to join with `hello` (spec: AUTH-6, DATA-6): admitted only after AUTH and
    /// the block table, for this session, for a channel below the negotiated count that has
    /// not joined yet, with a token that verifies in constant time. Returns the channel.
    pub fn admit_data(&mut self, hello: &DataHello) -> Result<u8, Detail> {
        let key = self.cfg.psk.clone();
        let nonce = self.nonce;
        let State::Receiving(s) = &mut self.state else {
            return Err(Detail::WrongPhase);
        };
        let ok = hello.session_id == s.session_id
            && hello.channel < s.params.channels
            && s.joined & (1 << hello.channel) == 0
            && auth::verify_data_token(
                key.as_deref(),
                hello.session_id,
                hello.channel,
                &nonce,
                &hello.token,
            );
        if !ok {
            return Err(Detail::SourceKey);
        }
        s.joined |= 1 << hello.channel;
        Ok(hello.channel)
    }

    pub fn handle(&mut self, now: Millis, input: DstInput, out: &mut DstOut) {
        self.now = now;
        if matches!(self.state, State::Done(_)) {
            return;
        }
        self.on_input(input, out);
        if !matches!(self.state, State::Done(_)) {
            self.flush(out);
        }
    }

    /// Convenience form of [`handle`](Self::handle) that returns the commands only.
    pub fn step(&mut self, now: Millis, input: DstInput) -> Vec<DstCommand> {
        let mut out = DstOut::new();
        self.handle(now, input, &mut out);
        out.cmds
    }

    /// Moves to `to`, asserting the edge from the current phase is in the table.
    fn go(&mut self, to: State, ev: Event) {
        let from = self.phase();
        self.state = to;
        check_destination(from, ev, self.phase());
    }

    /// Takes the per-phase data out to move it into the next phase; the caller puts a state
    /// back with [`set`](Self::set).
    fn take(&mut self) -> State {
        std::mem::replace(&mut self.state, State::Starting)
    }

    /// Enters `to` from phase `from` (the phase before a [`take`](Self::take)).
    fn set(&mut self, from: DstPhase, to: State, ev: Event) {
        self.state = to;
        check_destination(from, ev, self.phase());
    }

    fn on_input(&mut self, input: DstInput, out: &mut DstOut) {
        if matches!(self.state, State::Starting) {
            // Committed: only the workload's own result can end this phase; frames still
            // return credits so STARTED can be sent (spec: SW-7).
            return match input {
                DstInput::Frame(f) => {
                    let _ = self.credits.on_receive(f.credits);
                }
                DstInput::WorkloadStarted => self.started(out),
                // The workload did not start, so the source may safely resume (spec: SW-7).
                DstInput::WorkloadFailed => {
                    self.abort(out, AbortReason::WorkloadFailed, Detail::StartFailed)
                }
                _ => {}
            };
        }
        match input {
            DstInput::Frame(f) => self.on_frame(f, out),
            DstInput::Malformed(_) => self.violation(out, Detail::Malformed),
            DstInput::Registered { target, rkey } => self.on_registered(target, rkey, out),
            DstInput::RegisterFailed { target } => {
                let requested = match &self.state {
                    State::Pinning(s) | State::Receiving(s) | State::ReceivingTail(s, _) => {
                        s.registering(target)
                    }
                    _ => false,
                };
                if requested {
                    self.abort(
                        out,
                        AbortReason::RegistrationFailed,
                        Detail::RegistrationFailed,
                    )
                } else {
                    self.abort(out, AbortReason::LocalError, Detail::Unrequested)
                }
            }
            DstInput::Digests(d) => self.on_digests(d, out),
            DstInput::StateLoaded { digest } => self.on_state_loaded(digest, out),
            DstInput::StateFailed => match self.state {
                State::Verifying(..) => {
                    self.abort(out, AbortReason::WorkloadFailed, Detail::StateRefused)
                }
                _ => self.abort(out, AbortReason::LocalError, Detail::Unrequested),
            },
            DstInput::WorkloadStarted | DstInput::WorkloadFailed => {
                self.abort(out, AbortReason::LocalError, Detail::Unrequested)
            }
            DstInput::Timer(DstTimer::Idle) => {
                if self.timers().idle.is_some() {
                    self.abort(out, AbortReason::Timeout, Detail::IdleTimeout); // spec: ERR-4
                }
            }
            DstInput::Timer(DstTimer::Keepalive) => {
                if !matches!(self.state, State::AwaitHello)
                    && self.outbox.is_empty()
                    && self.credits.can_send()
                {
                    self.send(Message::Nop, out); // spec: ERR-5
                } else {
                    self.last_send = self.now;
                }
            }
            DstInput::TransportFailed => {
                self.abort(out, AbortReason::TransportFailed, Detail::TransportFailed)
            }
            // spec: DATA-7: the data channels matter while they may still carry writes: the
            // rounds, and the device state of a session with a state area.
            DstInput::DataLost { .. } => {
                let carrying = match &self.state {
                    State::Receiving(_) => true,
                    State::ReceivingTail(s, _) => s.geo.state_block().is_some(),
                    _ => false,
                };
                if carrying {
                    self.abort(out, AbortReason::TransportFailed, Detail::DataChannelLost)
                }
            }
            DstInput::Cancel => self.abort(out, AbortReason::Cancelled, Detail::Cancelled),
        }
    }

    fn started(&mut self, out: &mut DstOut) {
        if self.credits.can_send() {
            self.send(Message::Started, out); // spec: SW-7
        }
        out.stats.finished_at_ms = Some(self.now);
        out.cmds.push(DstCommand::Finish(Outcome::Completed));
        self.go(State::Done(Outcome::Completed), Event::WorkloadStarted);
    }

    fn violation(&mut self, out: &mut DstOut, d: Detail) {
        self.abort(out, AbortReason::ProtocolViolation, d)
    }

    fn abort(&mut self, out: &mut DstOut, reason: AbortReason, d: Detail) {
        self.abort_inner(out, reason, false, d)
    }

    /// Revokes every registration, tells the source why (if a credit allows), and ends with
    /// nothing started (spec: ERR-1, INV-OWN-1).
    fn abort_inner(&mut self, out: &mut DstOut, reason: AbortReason, by_peer: bool, d: Detail) {
        if let State::Pinning(s)
        | State::Receiving(s)
        | State::ReceivingTail(s, _)
        | State::Verifying(s, _)
        | State::Prepared(s) = &mut self.state
        {
            s.unregister_all(out);
        }
        if !by_peer && reason != AbortReason::TransportFailed && self.credits.can_send() {
            self.outbox.clear();
            self.send(Message::Abort { reason }, out);
        }
        let o = Outcome::Aborted(AbortInfo {
            reason,
            by_peer,
            detail: d,
        });
        out.stats.finished_at_ms = Some(self.now);
        out.cmds.push(DstCommand::Finish(o));
        self.go(State::Done(o), Event::Abort);
    }

    fn send(&mut self, msg: Message, out: &mut DstOut) {
        let grant = self.credits.take(); // spec: FC-2, FC-3
        self.last_send = self.now;
        out.cmds.push(DstCommand::Send(Frame {
            credits: grant,
            msg,
        }));
    }

    fn queue(&mut self, msg: Message, out: &mut DstOut) {
        if self.outbox.len() >= MAX_OUTBOX {
            return self.violation(out, Detail::OutboxOverflow);
        }
        self.outbox.push_back(msg);
    }

    fn flush(&mut self, out: &mut DstOut) {
        while !self.outbox.is_empty() && self.credits.can_send() {
            let m = self.outbox.pop_front().expect("not empty");
            self.send(m, out);
        }
        if self.outbox.is_empty()
            && !matches!(self.state, State::AwaitHello)
            && self.credits.wants_nop()
        {
            self.send(Message::Nop, out); // spec: FC-4
        }
    }

    fn on_frame(&mut self, f: Frame, out: &mut DstOut) {
        // Drivers decode frames with `wire::decode`, which validates; a frame built any other
        // way is checked here too, so no unvalidated field reaches the logic (spec: WIRE-5).
        if f.msg.validate().is_err() {
            return self.violation(out, Detail::OutOfBounds);
        }
        if let Err(d) = self.credits.on_receive(f.credits) {
            return self.violation(out, d); // spec: FC-5
        }
        out.stats.control_frames_received += 1;
        self.last_recv = self.now;
        match (self.phase(), f.msg) {
            (_, Message::Nop) => {}
            (_, Message::Abort { reason }) => {
                self.abort_inner(out, reason, true, Detail::PeerAborted)
            }
            (DstPhase::AwaitHello, Message::Hello(h)) => self.on_hello(h, out),
            (DstPhase::AwaitAuth, Message::Auth { mac }) => self.on_auth(mac, out),
            (DstPhase::AwaitTable, Message::BlockTable { blocks }) => self.on_table(blocks, out),
            #[cfg(feature = "mutations")]
            (DstPhase::AwaitAuth, Message::BlockTable { blocks })
                if self.cfg.mutations.table_before_auth =>
            {
                let State::AwaitAuth(hs) = self.take() else {
                    unreachable!("phase AwaitAuth");
                };
                self.state = State::AwaitTable(hs);
                self.on_table(blocks, out)
            }
            (
                DstPhase::Receiving,
                m @ (Message::RegRequest { .. }
                | Message::UnregRequest { .. }
                | Message::Zero { .. }
                | Message::RoundEnd { .. }),
            ) => self.on_round_message(m, out),
            (
                DstPhase::ReceivingTail,
                m @ (Message::DeviceState { .. }
                | Message::Digests { .. }
                | Message::StatePlaced { .. }),
            ) => {
                let State::ReceivingTail(s, tail) = &mut self.state else {
                    unreachable!("phase ReceivingTail");
                };
                if let Err(d) = tail.on_message(s, m, out) {
                    self.violation(out, d);
                }
            }
            // spec: STATE-2: the state area's chunks are registered after the final round.
            (
                DstPhase::ReceivingTail,
                m @ (Message::RegRequest { .. } | Message::UnregRequest { .. }),
            ) => {
                let State::ReceivingTail(s, _) = &mut self.state else {
                    unreachable!("phase ReceivingTail");
                };
                match s.on_tail_registration(m, out) {
                    Err((reason, d)) => self.abort(out, reason, d),
                    Ok(session::Next::Reply(m)) => self.queue(m, out),
                    Ok(_) => {}
                }
            }
            (
                DstPhase::ReceivingTail,
                Message::Prepare {
                    state_len,
                    digest_count,
                    state_digest,
                },
            ) => self.on_prepare(state_len, digest_count, state_digest, out),
            (DstPhase::Prepared, Message::Commit) => {
                let State::Prepared(mut s) = self.take() else {
                    unreachable!("phase Prepared");
                };
                s.unregister_all(out); // spec: SW-8
                out.cmds.push(DstCommand::StartWorkload); // spec: SW-7
                out.stats.commit_ms = Some(self.now);
                self.set(DstPhase::Prepared, State::Starting, Event::CommitMsg);
            }
            _ => self.violation(out, Detail::WrongPhase),
        }
    }

    fn on_auth(&mut self, mac: [u8; MAC_LEN], out: &mut DstOut) {
        let State::AwaitAuth(hs) = &self.state else {
            unreachable!("phase AwaitAuth");
        };
        let ok = match &self.cfg.psk {
            Some(key) => auth::verify_src(
                key,
                &hs.hello_payload,
                &hs.ack_payload,
                self.binding.as_ref(),
                &mac,
            ),
            None => mac == [0; MAC_LEN],
        };
        if !ok {
            return self.abort(out, AbortReason::AuthFailed, Detail::SourceKey); // spec: AUTH-5
        }
        let State::AwaitAuth(hs) = self.take() else {
            unreachable!("phase AwaitAuth");
        };
        out.stats.authenticated_ms = Some(self.now);
        self.set(DstPhase::AwaitAuth, State::AwaitTable(hs), Event::Auth); // spec: AUTH-2
    }

    fn on_round_message(&mut self, m: Message, out: &mut DstOut) {
        let State::Receiving(s) = &mut self.state else {
            unreachable!("phase Receiving");
        };
        match s.on_round_message(m, out) {
            Err((reason, d)) => self.abort(out, reason, d),
            Ok(session::Next::Stay) => {}
            Ok(session::Next::Reply(m)) => self.queue(m, out),
            Ok(session::Next::RoundEnd { round, last }) => {
                out.stats.rounds = round;
                if last {
                    out.stats.final_round_ms = Some(self.now);
                    let State::Receiving(s) = self.take() else {
                        unreachable!("phase Receiving");
                    };
                    let to = State::ReceivingTail(s, Box::default());
                    self.set(DstPhase::Receiving, to, Event::LastRoundEnd);
                } else {
                    check_destination(DstPhase::Receiving, Event::RoundEnd, DstPhase::Receiving);
                }
                self.queue(Message::RoundAck { round }, out);
            }
        }
    }

    fn on_hello(&mut self, h: Hello, out: &mut DstOut) {
        let hello_payload = auth::payload(&Message::Hello(h.clone()));
        // spec: HS-1
        if !(h.version_min..=h.version_max).contains(&wire::PROTOCOL_VERSION) {
            return self.abort(out, AbortReason::Incompatible, Detail::NoCommonVersion);
        }
        // spec: AUTH-4
        match (&self.cfg.psk, h.params.auth) {
            (Some(_), AuthMode::Insecure) => {
                return self.abort(out, AbortReason::AuthFailed, Detail::PeerInsecure)
            }
            (None, AuthMode::HmacSha256) => {
                return self.abort(out, AbortReason::Incompatible, Detail::LocalInsecure)
            }
            _ => {}
        }
        // spec: HS-3: narrow what may be narrowed; everything else is taken as proposed.
        let params = Params {
            channels: h.params.channels.min(self.cfg.max_channels),
            max_reg_inflight: h.params.max_reg_inflight.min(self.cfg.max_reg_inflight),
            ..h.params
        };
        self.credits.learn_peer_window(h.credit_window);
        // spec: STATE-1: the state area is the smaller of what the source may need and what
        // this destination holds.
        let state_capacity = h.state_max.min(self.cfg.state_capacity);
        let mut ack = HelloAck {
            version: wire::PROTOCOL_VERSION,
            session_id: h.session_id,
            params,
            credit_window: self.cfg.credit_window,
            pin_budget: self.cfg.pin_budget,
            nonce: self.nonce,
            mac: [0; MAC_LEN],
            state_capacity,
        };
        if let Some(key) = &self.cfg.psk {
            let zero = auth::payload(&Message::HelloAck(ack.clone()));
            ack.mac = auth::dst_mac(key, &hello_payload, &zero, self.binding.as_ref());
            // spec: AUTH-1
        }
        let ack_payload = auth::payload(&Message::HelloAck(ack.clone()));
        let hs = Handshake {
            session_id: h.session_id,
            params,
            state_capacity,
            hello_payload,
            ack_payload,
        };
        self.go(State::AwaitAuth(Box::new(hs)), Event::Hello);
        self.credits.announce_window();
        self.queue(Message::HelloAck(ack), out);
    }

    fn on_table(&mut self, blocks: Vec<BlockDesc>, out: &mut DstOut) {
        let State::AwaitTable(hs) = &self.state else {
            unreachable!("phase AwaitTable");
        };
        let made = Session::new(
            &self.cfg,
            hs.session_id,
            hs.params,
            &blocks,
            hs.state_capacity,
        );
        let mut s = match made {
            Ok(s) => Box::new(s),
            Err((reason, d)) => return self.abort(out, reason, d),
        };
        match s.params.mode {
            RegMode::PinAll => {
                if let Err((reason, d)) = s.pin_all(out) {
                    return self.abort(out, reason, d); // spec: REG-8
                }
                self.go(State::Pinning(s), Event::TablePinAll);
            }
            RegMode::Dynamic => {
                let rkeys = vec![0; s.geo.blocks.len()];
                self.go(State::Receiving(s), Event::TableDynamic);
                self.queue(Message::BlockTableAck { rkeys }, out);
            }
        }
    }

    fn on_registered(&mut self, target: RegTarget, rkey: u32, out: &mut DstOut) {
        let r = match &mut self.state {
            State::Pinning(s) => s.on_block_registered(target, rkey),
            State::Receiving(s) | State::ReceivingTail(s, _) => {
                s.on_chunk_registered(target, rkey, out)
            }
            _ => Err(Detail::Unrequested),
        };
        match r {
            Err(d) => self.abort(out, AbortReason::LocalError, d),
            Ok(None) => {}
            Ok(Some(reply)) => {
                if matches!(reply, Message::BlockTableAck { .. }) {
                    let State::Pinning(s) = self.take() else {
                        unreachable!("block keys complete only in Pinning");
                    };
                    self.set(DstPhase::Pinning, State::Receiving(s), Event::Pinned);
                }
                self.queue(reply, out);
            }
        }
    }

    fn on_prepare(
        &mut self,
        state_len: u64,
        digest_count: u32,
        state_digest: u64,
        out: &mut DstOut,
    ) {
        out.stats.prepare_ms = Some(self.now);
        let State::ReceivingTail(s, tail) = &self.state else {
            unreachable!("phase ReceivingTail");
        };
        // spec: SW-5, STATE-3
        if !tail.counts_match(s, state_len, digest_count) {
            return self.violation(out, Detail::PrepareCounts);
        }
        if s.registration_busy() {
            return self.violation(out, Detail::PrepareBusy);
        }
        let State::ReceivingTail(s, mut tail) = self.take() else {
            unreachable!("phase ReceivingTail");
        };
        tail.state_digest = state_digest;
        // spec: STATE-4: the consumer finishes taking the state before the vote, so a state
        // it refuses aborts with the source still able to resume.
        out.cmds.push(DstCommand::FinishState { len: state_len });
        if s.params.digest != wire::DigestAlg::None {
            out.cmds.push(DstCommand::ComputeDigests);
        } else {
            tail.digests_ok = true;
        }
        self.set(
            DstPhase::ReceivingTail,
            State::Verifying(s, tail),
            Event::Prepare,
        );
    }

    fn on_digests(&mut self, local: Vec<u64>, out: &mut DstOut) {
        let State::Verifying(s, tail) = &mut self.state else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if tail.digests_ok || s.params.digest == wire::DigestAlg::None {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        }
        if local.len() != s.geo.ram_chunks as usize {
            return self.abort(out, AbortReason::LocalError, Detail::DigestCount);
        }
        if !s.digests_match(&local, &tail.digests) {
            return self.abort(out, AbortReason::DigestMismatch, Detail::DigestMismatch);
        }
        tail.digests_ok = true;
        self.verified(out);
    }

    fn on_state_loaded(&mut self, digest: u64, out: &mut DstOut) {
        let State::Verifying(s, tail) = &mut self.state else {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        };
        if tail.state_loaded {
            return self.abort(out, AbortReason::LocalError, Detail::Unrequested);
        }
        // spec: STATE-5
        if s.params.digest != wire::DigestAlg::None && digest != tail.state_digest {
            return self.abort(out, AbortReason::DigestMismatch, Detail::StateDigest);
        }
        tail.state_loaded = true;
        self.verified(out);
    }

    /// Votes PREPARED once the digests match (if negotiated) and the consumer holds the state.
    fn verified(&mut self, out: &mut DstOut) {
        let State::Verifying(_, tail) = &self.state else {
            unreachable!("phase Verifying");
        };
        if !(tail.digests_ok && tail.state_loaded) {
            return;
        }
        let State::Verifying(s, _) = self.take() else {
            unreachable!("phase Verifying");
        };
        self.set(DstPhase::Verifying, State::Prepared(s), Event::Verified);
        self.queue(Message::Prepared, out);
    }
}
