//! The source side: decides what to send, when a round ends, when to switch over, and when it
//! may (and may never again) resume its workload.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::auth;
use crate::table::{check_source, Event, SrcPhase};
use crate::types::*;
use crate::wire::{
    self, AbortReason, AuthMode, BlockDesc, ChunkRef, DigestAlg, Frame, Hello, HelloAck, Message,
    PageRange, Params, RegMode, MAX_DIGEST_BATCH, MAX_REG_BATCH, MAX_STATE_CHUNK, MAX_ZERO_RANGES,
    NONCE_LEN,
};

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
    pub idle_timeout_ms: u64,
    /// 0 disables keepalives.
    pub keepalive_ms: u64,
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
        }
    }
}

/// Per-round observations, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundStats {
    pub round: u32,
    pub last: bool,
    pub dirty_pages: u64,
    pub zero_pages: u64,
    pub data_bytes: u64,
    pub writes: u64,
    pub started_ms: Millis,
    pub duration_ms: Millis,
}

/// Observations for reports. Not protocol state: excluded from equality and hashing so that a
/// model checker fingerprints only what decides behaviour.
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    pub rounds: Vec<RoundStats>,
    pub reg_requests: u64,
    pub reg_chunks: u64,
    pub unreg_requests: u64,
    pub unreg_chunks: u64,
    pub control_frames_sent: u64,
    pub control_bytes_sent: u64,
    pub control_frames_received: u64,
    pub data_bytes: u64,
    pub zero_pages: u64,
    pub zero_messages: u64,
    pub paused_at_ms: Option<Millis>,
    pub finished_at_ms: Option<Millis>,
    pub started_at_ms: Option<Millis>,
    pub setup_done_ms: Option<Millis>,
}
impl PartialEq for SourceStats {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for SourceStats {}
impl std::hash::Hash for SourceStats {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

/// What the source knows about one chunk's registration at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ChunkSt {
    Unreg,
    Requested,
    /// Writable with `rkey`; `base` is the chunk's offset within that registration.
    Registered {
        rkey: u32,
        base: u64,
    },
    /// UNREG_REQUEST sent: never written again until registered anew (spec: REG-6).
    Unregistering,
}

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
}

/// The source state machine (spec: section "State tables", source).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    cfg: SourceConfig,
    phase: SrcPhase,
    geo: Geometry,
    nonce: [u8; NONCE_LEN],
    hello_payload: Vec<u8>,
    params: Params,
    pin_budget: u64,
    credits: Credits,
    outbox: VecDeque<Message>,

    round: u32,
    last: bool,
    final_scan: bool,
    round_start: Millis,
    started_at: Millis,
    /// Bytes per second measured over the previous round (spec: CONV-1).
    bandwidth: Option<u64>,
    carry: Option<DirtyScan>,

    todo: Vec<PageBitmap>,
    zero_todo: Vec<PageBitmap>,
    zero_cursor: (usize, u64),
    pending: BTreeSet<u32>,
    ready: BTreeSet<u32>,
    need_reg: BTreeSet<u32>,
    chunks: Vec<ChunkSt>,
    chunk_inflight: Vec<u32>,
    registered: BTreeSet<u32>,
    reg_bytes: u64,
    reg_queue: VecDeque<(u32, Vec<u32>)>,
    unreg_queue: VecDeque<(u32, Vec<u32>)>,
    next_reg_id: u32,
    next_unreg_id: u32,
    inflight: BTreeMap<u64, (u32, u8)>,
    channel_inflight: Vec<u16>,
    next_wr_id: u64,
    next_channel: u8,

    workload_paused: bool,
    commit_sent: bool,
    device_state: Option<Vec<u8>>,
    state_cursor: usize,
    digests: Option<Vec<u64>>,
    digest_cursor: usize,
    prepare_sent: bool,

    last_recv: Millis,
    last_send: Millis,
    now: Millis,
    outcome: Option<Outcome>,
    pub stats: SourceStats,
    #[cfg(feature = "mutations")]
    pub mutations: Mutations,
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid source configuration: {0}")]
pub struct ConfigError(pub &'static str);

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
        let geo = Geometry::new(&cfg.blocks, cfg.params.chunk_log2).map_err(ConfigError)?;
        let n = geo.total_chunks as usize;
        let channels = cfg.params.channels as usize;
        Ok(Source {
            hello_payload: auth::payload(&hello),
            params: cfg.params,
            credits: Credits::new(cfg.credit_window),
            todo: geo
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages))
                .collect(),
            zero_todo: geo
                .blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages))
                .collect(),
            chunks: vec![ChunkSt::Unreg; n],
            chunk_inflight: vec![0; n],
            channel_inflight: vec![0; channels],
            cfg,
            phase: SrcPhase::Idle,
            geo,
            nonce,
            pin_budget: 0,
            outbox: VecDeque::new(),
            round: 0,
            last: false,
            final_scan: false,
            round_start: 0,
            started_at: 0,
            bandwidth: None,
            carry: None,
            zero_cursor: (0, 0),
            pending: BTreeSet::new(),
            ready: BTreeSet::new(),
            need_reg: BTreeSet::new(),
            registered: BTreeSet::new(),
            reg_bytes: 0,
            reg_queue: VecDeque::new(),
            unreg_queue: VecDeque::new(),
            next_reg_id: 1,
            next_unreg_id: 1,
            inflight: BTreeMap::new(),
            next_wr_id: 1,
            next_channel: 0,
            workload_paused: false,
            commit_sent: false,
            device_state: None,
            state_cursor: 0,
            digests: None,
            digest_cursor: 0,
            prepare_sent: false,
            last_recv: 0,
            last_send: 0,
            now: 0,
            outcome: None,
            stats: SourceStats::default(),
            #[cfg(feature = "mutations")]
            mutations: Mutations::default(),
        })
    }

    pub fn phase(&self) -> SrcPhase {
        self.phase
    }
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
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
        &self.credits
    }
    pub fn commit_sent(&self) -> bool {
        self.commit_sent
    }
    /// Bytes the source accounts as registered at the destination (spec: REG-4).
    pub fn registered_bytes(&self) -> u64 {
        self.reg_bytes
    }
    /// Writes posted and not yet completed.
    pub fn writes_in_flight(&self) -> usize {
        self.inflight.len()
    }
    /// Bytes still to send in the current round.
    pub fn remaining_bytes(&self) -> u64 {
        self.todo
            .iter()
            .zip(&self.geo.blocks)
            .map(|(t, b)| t.count_ones() << b.page_log2)
            .sum()
    }
    /// Measured bandwidth in bytes per second, once a round has completed.
    pub fn bandwidth(&self) -> Option<u64> {
        self.bandwidth
    }

    /// Armed deadlines.
    pub fn timers(&self) -> Timers {
        if matches!(self.phase, SrcPhase::Idle | SrcPhase::Done) {
            return Timers::default();
        }
        Timers {
            idle: self
                .awaiting_peer()
                .then(|| self.last_recv + self.cfg.idle_timeout_ms),
            keepalive: (self.cfg.keepalive_ms > 0).then(|| self.last_send + self.cfg.keepalive_ms),
        }
    }

    fn awaiting_peer(&self) -> bool {
        match self.phase {
            SrcPhase::AwaitHelloAck
            | SrcPhase::AwaitTableAck
            | SrcPhase::AwaitRoundAck
            | SrcPhase::AwaitPrepared
            | SrcPhase::AwaitStarted => true,
            SrcPhase::Sending | SrcPhase::Finalizing => {
                // Out of credits means waiting for the destination's grant, whether the frame
                // that waits is in the outbox or still to be built from the round's bitmaps.
                !self.reg_queue.is_empty()
                    || !self.unreg_queue.is_empty()
                    || !self.credits.can_send()
            }
            _ => false,
        }
    }

    /// Feeds one input; commands are appended to `out` in the order the driver must run them.
    pub fn handle(&mut self, now: Millis, input: Input, out: &mut Vec<Command>) {
        self.now = now;
        if self.phase == SrcPhase::Done {
            return; // late completions and frames after the outcome are dropped
        }
        self.on_input(input, out);
        if self.phase != SrcPhase::Done {
            self.pump(out);
        }
    }

    /// Convenience form of [`handle`](Self::handle).
    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Command> {
        let mut out = Vec::new();
        self.handle(now, input, &mut out);
        out
    }

    fn go(&mut self, to: SrcPhase, ev: Event) {
        check_source(self.phase, ev, to);
        self.phase = to;
    }

    fn on_input(&mut self, input: Input, out: &mut Vec<Command>) {
        match input {
            Input::Start => {
                if self.phase != SrcPhase::Idle {
                    return self.local_error(out, "start given twice");
                }
                self.started_at = self.now;
                self.last_recv = self.now;
                self.stats.started_at_ms = Some(self.now);
                let hello = Message::Hello(Hello {
                    version_min: wire::PROTOCOL_VERSION,
                    version_max: wire::PROTOCOL_VERSION,
                    session_id: self.cfg.session_id,
                    params: self.cfg.params,
                    credit_window: self.cfg.credit_window,
                    nonce: self.nonce,
                });
                self.outbox.push_back(hello);
                self.credits.announce_window();
                self.go(SrcPhase::AwaitHelloAck, Event::Start); // spec: HS-1
            }
            Input::Frame(f) => self.on_frame(f, out),
            Input::Malformed(_) => {
                self.abort(out, AbortReason::ProtocolViolation, "malformed frame")
            }
            Input::WriteDone { wr_id } => self.on_write_done(wr_id, out),
            Input::WriteFailed { .. } => {
                self.abort(out, AbortReason::TransportFailed, "write failed")
            }
            Input::Dirty(scan) => self.on_dirty(scan, out),
            Input::WorkloadPaused => {
                if self.phase != SrcPhase::Pausing {
                    return self.local_error(out, "pause confirmed while not pausing");
                }
                self.stats.paused_at_ms = Some(self.now);
                self.final_scan = true;
                out.push(Command::ScanDirty { all: false }); // spec: SW-1
                self.go(SrcPhase::Scanning, Event::WorkloadPaused);
            }
            Input::WorkloadFailed => {
                self.abort(out, AbortReason::WorkloadFailed, "workload pause failed")
            }
            Input::DeviceState(blob) => {
                if self.phase != SrcPhase::Finalizing || self.device_state.is_some() {
                    return self.local_error(out, "device state not requested");
                }
                if blob.len() > wire::MAX_DEVICE_STATE as usize {
                    return self.local_error(out, "device state larger than 64 MiB");
                    // spec: SW-3
                }
                self.device_state = Some(blob);
            }
            Input::Digests(d) => {
                if self.phase != SrcPhase::Finalizing || self.digests.is_some() {
                    return self.local_error(out, "digests not requested");
                }
                if d.len() != self.geo.total_chunks as usize {
                    return self.local_error(out, "digest count differs from chunk count");
                }
                self.digests = Some(d);
            }
            Input::Timer(TimerKind::Idle) => {
                if self.awaiting_peer() {
                    self.abort(
                        out,
                        AbortReason::Timeout,
                        "peer silent past the idle timeout",
                    ); // spec: ERR-4
                }
            }
            Input::Timer(TimerKind::Keepalive) => {
                if self.phase == SrcPhase::Idle {
                    return;
                }
                if self.outbox.is_empty() && self.credits.can_send() {
                    self.send(Message::Nop, out); // spec: ERR-5
                } else {
                    self.last_send = self.now;
                }
            }
            Input::TransportFailed => {
                self.abort(out, AbortReason::TransportFailed, "transport failed")
            }
            Input::Cancel => {
                if self.commit_sent {
                    return; // spec: SW-6: too late to cancel; waiting for STARTED or the timeout
                }
                self.abort(out, AbortReason::Cancelled, "cancelled by operator");
            }
            Input::Registered { .. } | Input::RegisterFailed { .. } | Input::WorkloadStarted => {
                self.local_error(out, "destination-only input given to the source")
            }
        }
    }

    fn local_error(&mut self, out: &mut Vec<Command>, detail: &'static str) {
        self.abort(out, AbortReason::LocalError, detail)
    }

    fn violation(&mut self, out: &mut Vec<Command>, detail: &'static str) {
        self.abort(out, AbortReason::ProtocolViolation, detail)
    }

    /// Ends the migration. Before COMMIT has left, the workload resumes and the outcome is
    /// Aborted (spec: INV-OWN-2); after, the outcome is InDoubt (spec: INV-DOUBT-1).
    fn abort_inner(
        &mut self,
        out: &mut Vec<Command>,
        reason: AbortReason,
        by_peer: bool,
        detail: &'static str,
    ) {
        #[cfg(feature = "mutations")]
        let resume_anyway = self.mutations.resume_after_commit;
        #[cfg(not(feature = "mutations"))]
        let resume_anyway = false;
        if self.commit_sent && !(by_peer && self.phase == SrcPhase::AwaitStarted) {
            if resume_anyway && self.workload_paused {
                out.push(Command::ResumeWorkload);
            }
            let o = Outcome::InDoubt(detail);
            self.outcome = Some(o);
            self.stats.finished_at_ms = Some(self.now);
            out.push(Command::Finish(o));
            self.go(SrcPhase::Done, Event::InDoubt);
            return;
        }
        // An ABORT from the destination after COMMIT means it did not start (spec: SW-7), so
        // resuming here keeps a single owner.
        if !by_peer
            && reason != AbortReason::TransportFailed
            && self.phase != SrcPhase::Idle
            && self.credits.can_send()
        {
            self.outbox.clear();
            self.send(Message::Abort { reason }, out); // spec: ERR-1
        }
        if self.workload_paused {
            out.push(Command::ResumeWorkload);
            self.workload_paused = false;
        }
        let o = Outcome::Aborted(AbortInfo {
            reason,
            by_peer,
            detail,
        });
        self.outcome = Some(o);
        self.stats.finished_at_ms = Some(self.now);
        out.push(Command::Finish(o));
        self.go(SrcPhase::Done, Event::Abort);
    }

    fn abort(&mut self, out: &mut Vec<Command>, reason: AbortReason, detail: &'static str) {
        self.abort_inner(out, reason, false, detail)
    }

    fn send(&mut self, msg: Message, out: &mut Vec<Command>) {
        #[cfg(feature = "mutations")]
        let grant = if self.mutations.ignore_credits && !self.credits.can_send() {
            self.credits.send = self.credits.send.saturating_sub(1);
            std::mem::take(&mut self.credits.ungranted)
        } else {
            self.credits.take()
        };
        #[cfg(not(feature = "mutations"))]
        let grant = self.credits.take(); // spec: FC-2, FC-3
        if msg == Message::Commit {
            self.commit_sent = true;
        }
        self.stats.control_frames_sent += 1;
        self.last_send = self.now;
        out.push(Command::Send(Frame {
            credits: grant,
            msg,
        }));
    }

    fn can_send(&self) -> bool {
        #[cfg(feature = "mutations")]
        if self.mutations.ignore_credits {
            return true;
        }
        self.credits.can_send()
    }

    // -----------------------------------------------------------------------------------------
    // Frames from the destination

    fn on_frame(&mut self, f: Frame, out: &mut Vec<Command>) {
        // Drivers decode frames with `wire::decode`, which validates; a frame built any other
        // way is checked here too, so no unvalidated field reaches the logic (spec: WIRE-5).
        if f.msg.validate().is_err() {
            return self.violation(out, "frame outside protocol bounds");
        }
        if let Err(e) = self.credits.on_receive(f.credits) {
            return self.violation(out, e); // spec: FC-5
        }
        self.stats.control_frames_received += 1;
        self.last_recv = self.now;
        match (self.phase, f.msg) {
            (_, Message::Nop) => {}
            (_, Message::Abort { reason }) => {
                self.abort_inner(out, reason, true, "destination aborted")
            }
            (SrcPhase::AwaitHelloAck, Message::HelloAck(a)) => self.on_hello_ack(a, out),
            (SrcPhase::AwaitTableAck, Message::BlockTableAck { rkeys }) => {
                self.on_table_ack(rkeys, out)
            }
            (SrcPhase::Sending, Message::RegResult { req_id, rkeys }) => {
                self.on_reg_result(req_id, rkeys, out)
            }
            (SrcPhase::Sending, Message::UnregDone { req_id, count }) => {
                self.on_unreg_done(req_id, count, out)
            }
            (SrcPhase::AwaitRoundAck, Message::RoundAck { round }) => self.on_round_ack(round, out),
            (SrcPhase::AwaitPrepared, Message::Prepared) => {
                self.outbox.push_back(Message::Commit); // spec: SW-6
                self.go(SrcPhase::AwaitStarted, Event::PreparedMsg);
            }
            (SrcPhase::AwaitStarted, Message::Started) => {
                if !self.commit_sent {
                    return self.violation(out, "STARTED before COMMIT");
                }
                self.outcome = Some(Outcome::Completed);
                self.stats.finished_at_ms = Some(self.now);
                out.push(Command::Finish(Outcome::Completed));
                self.go(SrcPhase::Done, Event::StartedMsg);
            }
            _ => self.violation(out, "message not allowed in this phase"),
        }
    }

    fn on_hello_ack(&mut self, a: HelloAck, out: &mut Vec<Command>) {
        let p = self.cfg.params;
        // spec: HS-2, HS-4
        if a.session_id != self.cfg.session_id {
            return self.violation(out, "HELLO_ACK for another session");
        }
        if a.version != wire::PROTOCOL_VERSION {
            return self.abort(out, AbortReason::Incompatible, "unsupported version chosen");
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
            return self.violation(out, "HELLO_ACK parameters not a narrowing of HELLO");
        }
        let ack_payload = auth::payload(&Message::HelloAck(a.clone()));
        match (&self.cfg.psk, q.auth) {
            (Some(key), AuthMode::HmacSha256) => {
                let zero = auth::payload(&Message::HelloAck(HelloAck {
                    mac: [0; wire::MAC_LEN],
                    ..a.clone()
                }));
                if !auth::verify_dst(key, &self.hello_payload, &zero, &a.mac) {
                    return self.abort(
                        out,
                        AbortReason::AuthFailed,
                        "destination failed to prove the key",
                    ); // spec: AUTH-5
                }
            }
            (None, AuthMode::Insecure) => {
                if a.mac != [0; wire::MAC_LEN] {
                    return self.violation(out, "MAC present in insecure mode"); // spec: AUTH-4
                }
            }
            _ => return self.violation(out, "authentication mode changed"),
        }
        match q.mode {
            RegMode::PinAll if a.pin_budget < self.geo.total_bytes => {
                return self.abort(
                    out,
                    AbortReason::PinBudget,
                    "pin budget below total memory for pin-all",
                );
            }
            RegMode::Dynamic if a.pin_budget < self.geo.chunk_size().min(self.geo.total_bytes) => {
                return self.abort(out, AbortReason::PinBudget, "pin budget below one chunk");
            }
            _ => {}
        }
        self.credits.learn_peer_window(a.credit_window);
        self.params = q;
        self.pin_budget = a.pin_budget;
        self.channel_inflight = vec![0; q.channels as usize];
        let mac = match &self.cfg.psk {
            Some(key) => auth::src_mac(key, &self.hello_payload, &ack_payload), // spec: AUTH-1
            None => [0; wire::MAC_LEN],
        };
        // spec: AUTH-3: no memory data before BLOCK_TABLE_ACK, which follows the verified AUTH.
        self.outbox.push_back(Message::Auth { mac });
        self.outbox.push_back(Message::BlockTable {
            blocks: self.cfg.blocks.clone(),
        });
        self.go(SrcPhase::AwaitTableAck, Event::HelloAck);
    }

    fn on_table_ack(&mut self, rkeys: Vec<u32>, out: &mut Vec<Command>) {
        if rkeys.len() != self.geo.blocks.len() {
            return self.violation(out, "BLOCK_TABLE_ACK count differs from the table");
        }
        match self.params.mode {
            RegMode::PinAll => {
                // spec: REG-8
                for (b, &rkey) in rkeys.iter().enumerate() {
                    let first = self.geo.blocks[b].first_chunk;
                    for c in 0..self.geo.blocks[b].chunks {
                        let base = (c as u64) << self.geo.chunk_log2;
                        self.chunks[(first + c) as usize] = ChunkSt::Registered { rkey, base };
                    }
                }
                self.reg_bytes = self.geo.total_bytes;
            }
            RegMode::Dynamic => {
                if rkeys.iter().any(|&k| k != 0) {
                    return self.violation(out, "block keys in dynamic mode");
                }
            }
        }
        self.stats.setup_done_ms = Some(self.now);
        out.push(Command::ScanDirty { all: true });
        self.go(SrcPhase::Scanning, Event::TableAck);
    }

    fn on_reg_result(&mut self, req_id: u32, rkeys: Vec<u32>, out: &mut Vec<Command>) {
        // spec: REG-9
        let Some((id, chunks)) = self.reg_queue.front() else {
            return self.violation(out, "REG_RESULT with no request outstanding");
        };
        if *id != req_id || chunks.len() != rkeys.len() {
            return self.violation(out, "REG_RESULT does not answer the oldest request");
        }
        let (_, chunks) = self.reg_queue.pop_front().expect("checked above");
        for (g, rkey) in chunks.into_iter().zip(rkeys) {
            #[cfg(feature = "mutations")]
            if self.mutations.write_before_reg_result {
                if let ChunkSt::Registered { .. } = self.chunks[g as usize] {
                    self.chunks[g as usize] = ChunkSt::Registered { rkey, base: 0 };
                    continue;
                }
            }
            debug_assert_eq!(self.chunks[g as usize], ChunkSt::Requested);
            self.chunks[g as usize] = ChunkSt::Registered { rkey, base: 0 }; // spec: REG-5
            self.registered.insert(g);
            if self.pending.contains(&g) {
                self.ready.insert(g);
            }
        }
    }

    fn on_unreg_done(&mut self, req_id: u32, count: u16, out: &mut Vec<Command>) {
        let Some((id, chunks)) = self.unreg_queue.front() else {
            return self.violation(out, "UNREG_DONE with no request outstanding");
        };
        if *id != req_id || chunks.len() != count as usize {
            return self.violation(out, "UNREG_DONE does not answer the oldest request");
        }
        let (_, chunks) = self.unreg_queue.pop_front().expect("checked above");
        for g in chunks {
            debug_assert_eq!(self.chunks[g as usize], ChunkSt::Unregistering);
            self.chunks[g as usize] = ChunkSt::Unreg; // spec: REG-6: freed only now
            self.reg_bytes -= self.chunk_len(g);
            if self.pending.contains(&g) {
                self.need_reg.insert(g);
            }
        }
    }

    fn on_round_ack(&mut self, round: u32, out: &mut Vec<Command>) {
        if round != self.round {
            return self.violation(out, "ROUND_ACK for another round"); // spec: RND-4
        }
        let dur = self.now.saturating_sub(self.round_start);
        let bytes = self.stats.rounds.last().map_or(0, |r| r.data_bytes);
        if let Some(r) = self.stats.rounds.last_mut() {
            r.duration_ms = dur;
        }
        if dur > 0 && bytes > 0 {
            self.bandwidth = Some(bytes.saturating_mul(1000) / dur);
        }
        if self.last {
            out.push(Command::CaptureDeviceState); // spec: SW-2
            if self.params.digest != DigestAlg::None {
                out.push(Command::ComputeDigests); // spec: SW-4
            }
            self.go(SrcPhase::Finalizing, Event::FinalRoundAck);
        } else {
            out.push(Command::ScanDirty { all: false }); // spec: CONV-1
            self.go(SrcPhase::Scanning, Event::RoundAck);
        }
    }

    fn on_write_done(&mut self, wr_id: u64, out: &mut Vec<Command>) {
        let Some((g, ch)) = self.inflight.remove(&wr_id) else {
            return self.local_error(out, "completion for an unknown write");
        };
        self.chunk_inflight[g as usize] -= 1;
        self.channel_inflight[ch as usize] -= 1;
    }

    // -----------------------------------------------------------------------------------------
    // Rounds and convergence

    fn on_dirty(&mut self, scan: DirtyScan, out: &mut Vec<Command>) {
        if self.phase != SrcPhase::Scanning {
            return self.local_error(out, "dirty scan not requested");
        }
        let shape_ok = scan.dirty.len() == self.geo.blocks.len()
            && scan.zero.len() == self.geo.blocks.len()
            && scan
                .dirty
                .iter()
                .zip(&self.geo.blocks)
                .all(|(d, b)| d.len() == b.pages)
            && scan
                .zero
                .iter()
                .zip(&self.geo.blocks)
                .all(|(d, b)| d.len() == b.pages);
        if !shape_ok {
            return self.local_error(out, "dirty scan does not match the block table");
        }
        if self.final_scan {
            #[cfg(feature = "mutations")]
            let scan = if self.mutations.skip_final_scan {
                DirtyScan {
                    dirty: scan
                        .dirty
                        .iter()
                        .map(|d| PageBitmap::new(d.len()))
                        .collect(),
                    zero: scan.zero.iter().map(|d| PageBitmap::new(d.len())).collect(),
                }
            } else {
                scan
            };
            let merged = match self.carry.take() {
                Some(mut c) => {
                    for b in 0..c.dirty.len() {
                        c.dirty[b].union_with(&scan.dirty[b]);
                        c.zero[b].subtract(&scan.dirty[b]);
                        c.zero[b].union_with(&scan.zero[b]);
                    }
                    c
                }
                None => scan,
            };
            return self.start_round(merged, true);
        }
        if self.round == 0 {
            return self.start_round(scan, false);
        }
        let elide = self.params.flags & wire::flag::ZERO_ELISION != 0;
        let dirty_bytes: u64 = scan
            .dirty
            .iter()
            .zip(&scan.zero)
            .zip(&self.geo.blocks)
            .map(|((d, z), b)| {
                (d.count_ones() - if elide { z.count_ones() } else { 0 }) << b.page_log2
            })
            .sum();
        // spec: CONV-1
        let converged = match self.bandwidth {
            Some(bw) => {
                dirty_bytes.saturating_mul(1000) <= bw.saturating_mul(self.cfg.downtime_limit_ms)
            }
            None => dirty_bytes == 0,
        };
        // spec: CONV-2
        let out_of_time = self
            .cfg
            .max_time_ms
            .is_some_and(|t| self.now.saturating_sub(self.started_at) >= t);
        let limit = self.round >= self.cfg.max_rounds || out_of_time;
        if converged || (limit && self.cfg.on_limit == LimitPolicy::Switchover) {
            self.carry = Some(scan);
            self.workload_paused = true;
            out.push(Command::PauseWorkload); // spec: SW-1
            self.go(SrcPhase::Pausing, Event::Converged);
        } else if limit {
            self.abort(
                out,
                AbortReason::NotConverged,
                "round or time limit reached without converging",
            );
        } else {
            self.start_round(scan, false);
        }
    }

    fn start_round(&mut self, scan: DirtyScan, last: bool) {
        self.round += 1; // spec: RND-1
        self.last = last;
        self.round_start = self.now;
        let elide = self.params.flags & wire::flag::ZERO_ELISION != 0;
        let mut stats = RoundStats {
            round: self.round,
            last,
            started_ms: self.now,
            ..Default::default()
        };
        for (b, (d, z)) in scan.dirty.into_iter().zip(scan.zero).enumerate() {
            stats.dirty_pages += d.count_ones();
            let mut data = d;
            if elide {
                data.subtract(&z);
                stats.zero_pages += z.count_ones();
                self.zero_todo[b] = z;
            }
            self.todo[b] = data;
        }
        self.zero_cursor = (0, 0);
        for b in 0..self.geo.blocks.len() {
            for c in 0..self.geo.blocks[b].chunks {
                let cr = ChunkRef {
                    block: b as u16,
                    chunk: c,
                };
                let (first, count) = self.geo.chunk_pages(cr);
                if self.todo[b].any_in(first, count) {
                    let g = self.geo.global(cr);
                    self.pending.insert(g);
                    match self.chunks[g as usize] {
                        ChunkSt::Registered { .. } => {
                            self.ready.insert(g);
                        }
                        ChunkSt::Unreg => {
                            self.need_reg.insert(g);
                        }
                        ChunkSt::Requested | ChunkSt::Unregistering => {
                            unreachable!("round starts only when registration traffic is quiescent")
                        }
                    }
                }
            }
        }
        self.stats.rounds.push(stats);
        self.go(SrcPhase::Sending, Event::DirtyScan);
    }

    fn chunk_len(&self, g: u32) -> u64 {
        self.geo.chunk_span(self.geo.chunk_of_global(g)).1
    }

    // -----------------------------------------------------------------------------------------
    // Sending: everything that waits on credits, channel slots or the pin budget

    fn pump(&mut self, out: &mut Vec<Command>) {
        while !self.outbox.is_empty() && self.can_send() {
            let m = self.outbox.pop_front().expect("not empty");
            self.send(m, out);
        }
        if self.outbox.is_empty() {
            match self.phase {
                SrcPhase::Sending => self.pump_round(out),
                SrcPhase::Finalizing => self.pump_tail(out),
                _ => {}
            }
        }
        if self.phase != SrcPhase::Done && self.outbox.is_empty() && self.credits.wants_nop() {
            self.send(Message::Nop, out); // spec: FC-4
        }
    }

    fn pump_round(&mut self, out: &mut Vec<Command>) {
        // Zero ranges first: they are cheap and need no registration (spec: DATA-4).
        while self.zero_cursor.0 < self.zero_todo.len() && self.can_send() {
            match self.next_zero_message() {
                Some(m) => {
                    self.stats.zero_messages += 1;
                    self.send(m, out)
                }
                None => break,
            }
        }
        self.post_writes(out);
        if self.params.mode == RegMode::Dynamic {
            self.request_registrations(out);
            self.evict(out);
        }
        // spec: RND-2: the round ends only when every write is placed and registration is idle.
        #[cfg(feature = "mutations")]
        let drained = self.inflight.is_empty() || self.mutations.skip_drain;
        #[cfg(not(feature = "mutations"))]
        let drained = self.inflight.is_empty();
        if self.pending.is_empty()
            && self.zero_cursor.0 >= self.zero_todo.len()
            && drained
            && self.reg_queue.is_empty()
            && self.unreg_queue.is_empty()
            && self.can_send()
        {
            let r = self.stats.rounds.last().cloned().unwrap_or_default();
            self.send(
                Message::RoundEnd {
                    round: self.round,
                    last: self.last,
                    data_bytes: r.data_bytes,
                    zero_pages: r.zero_pages,
                },
                out,
            );
            self.go(SrcPhase::AwaitRoundAck, Event::RoundQuiescent);
        }
    }

    /// Builds the next ZERO message from the zero bitmaps (spec: DATA-3).
    fn next_zero_message(&mut self) -> Option<Message> {
        let mut ranges = Vec::new();
        let (mut b, mut p) = self.zero_cursor;
        while b < self.zero_todo.len() && ranges.len() < MAX_ZERO_RANGES {
            match self.zero_todo[b].next_set(p) {
                Some(start) => {
                    let end = self.zero_todo[b]
                        .next_clear(start)
                        .min(start + u32::MAX as u64);
                    ranges.push(PageRange {
                        block: b as u16,
                        first_page: start as u32,
                        page_count: (end - start) as u32,
                    });
                    self.zero_todo[b].clear_range(start, end - start);
                    self.stats.zero_pages += end - start;
                    p = end;
                }
                None => {
                    b += 1;
                    p = 0;
                }
            }
        }
        self.zero_cursor = (b, p);
        (!ranges.is_empty()).then_some(Message::Zero {
            round: self.round,
            ranges,
        })
    }

    fn pick_channel(&mut self) -> Option<u8> {
        let n = self.channel_inflight.len() as u8;
        for i in 0..n {
            let ch = (self.next_channel + i) % n;
            if self.channel_inflight[ch as usize] < self.cfg.writes_per_channel {
                self.next_channel = (ch + 1) % n;
                return Some(ch);
            }
        }
        None
    }

    fn post_writes(&mut self, out: &mut Vec<Command>) {
        while let Some(&g) = self.ready.first() {
            let ChunkSt::Registered { rkey, base } = self.chunks[g as usize] else {
                unreachable!("ready chunks are registered");
            };
            let c = self.geo.chunk_of_global(g);
            let b = c.block as usize;
            let page_log2 = self.geo.blocks[b].page_log2;
            let (first, count) = self.geo.chunk_pages(c);
            let (chunk_off, _) = self.geo.chunk_span(c);
            let end = first + count;
            while let Some(p) = self.todo[b].next_set(first).filter(|&p| p < end) {
                let Some(ch) = self.pick_channel() else {
                    return; // every send queue is full; completions will call us again
                };
                let run_end = self.todo[b].next_clear(p).min(end);
                let offset = p << page_log2;
                let len = (run_end - p) << page_log2;
                let wr_id = self.next_wr_id;
                self.next_wr_id += 1;
                self.todo[b].clear_range(p, run_end - p);
                self.inflight.insert(wr_id, (g, ch));
                self.chunk_inflight[g as usize] += 1;
                self.channel_inflight[ch as usize] += 1;
                if let Some(r) = self.stats.rounds.last_mut() {
                    r.data_bytes += len;
                    r.writes += 1;
                }
                self.stats.data_bytes += len;
                // spec: DATA-1, REG-5
                out.push(Command::PostWrite {
                    channel: ch,
                    wr_id,
                    block: c.block,
                    offset,
                    len,
                    rkey,
                    remote_offset: base + (offset - chunk_off),
                });
            }
            self.ready.remove(&g);
            self.pending.remove(&g);
        }
    }

    fn request_registrations(&mut self, out: &mut Vec<Command>) {
        // spec: REG-2, REG-4
        while self.reg_queue.len() < self.params.max_reg_inflight as usize && self.can_send() {
            let mut batch = Vec::new();
            while batch.len() < self.cfg.reg_batch as usize {
                let Some(&g) = self.need_reg.first() else {
                    break;
                };
                let len = self.chunk_len(g);
                if self.reg_bytes + len > self.pin_budget {
                    break;
                }
                self.need_reg.remove(&g);
                self.reg_bytes += len;
                self.chunks[g as usize] = ChunkSt::Requested;
                #[cfg(feature = "mutations")]
                if self.mutations.write_before_reg_result {
                    self.chunks[g as usize] = ChunkSt::Registered { rkey: 0, base: 0 };
                    self.ready.insert(g);
                }
                batch.push(g);
            }
            if batch.is_empty() {
                break;
            }
            let id = self.next_reg_id;
            self.next_reg_id += 1;
            let chunks = batch.iter().map(|&g| self.geo.chunk_of_global(g)).collect();
            self.stats.reg_requests += 1;
            self.stats.reg_chunks += batch.len() as u64;
            self.reg_queue.push_back((id, batch));
            self.send(Message::RegRequest { req_id: id, chunks }, out);
        }
    }

    /// Frees pin budget when chunks wait for registration that cannot fit (spec: REG-6).
    fn evict(&mut self, out: &mut Vec<Command>) {
        let Some(&next) = self.need_reg.first() else {
            return;
        };
        if !self.reg_queue.is_empty() || !self.unreg_queue.is_empty() || !self.can_send() {
            return;
        }
        let need: u64 = self
            .need_reg
            .iter()
            .take(self.cfg.reg_batch as usize)
            .map(|&g| self.chunk_len(g))
            .sum::<u64>()
            .max(self.chunk_len(next));
        let free = self.pin_budget - self.reg_bytes;
        #[cfg(feature = "mutations")]
        let evict_inflight = self.mutations.evict_inflight;
        #[cfg(not(feature = "mutations"))]
        let evict_inflight = false;
        let mut victims = Vec::new();
        let mut freed = 0;
        for &g in &self.registered {
            if free + freed >= need || victims.len() >= MAX_REG_BATCH {
                break;
            }
            if (self.chunk_inflight[g as usize] == 0 || evict_inflight)
                && !self.pending.contains(&g)
            {
                victims.push(g);
                freed += self.chunk_len(g);
            }
        }
        if victims.is_empty() {
            return; // chunks still being written; their completions call us again
        }
        for &g in &victims {
            self.chunks[g as usize] = ChunkSt::Unregistering;
            self.registered.remove(&g);
        }
        let id = self.next_unreg_id;
        self.next_unreg_id += 1;
        let chunks = victims
            .iter()
            .map(|&g| self.geo.chunk_of_global(g))
            .collect();
        self.stats.unreg_requests += 1;
        self.stats.unreg_chunks += victims.len() as u64;
        self.unreg_queue.push_back((id, victims));
        self.send(Message::UnregRequest { req_id: id, chunks }, out);
    }

    /// Device state, digests, then PREPARE (spec: SW-3 .. SW-5).
    fn pump_tail(&mut self, out: &mut Vec<Command>) {
        let need_digests = self.params.digest != DigestAlg::None;
        if self.device_state.is_none() || (need_digests && self.digests.is_none()) {
            return;
        }
        while self.can_send() && !self.prepare_sent {
            let state = self.device_state.as_ref().expect("checked");
            if self.state_cursor < state.len() {
                let end = (self.state_cursor + MAX_STATE_CHUNK).min(state.len());
                let m = Message::DeviceState {
                    offset: self.state_cursor as u32,
                    total_len: state.len() as u32,
                    data: state[self.state_cursor..end].to_vec(),
                };
                self.state_cursor = end;
                self.send(m, out);
                continue;
            }
            if let Some(d) = self
                .digests
                .as_ref()
                .filter(|d| self.digest_cursor < d.len())
            {
                let end = (self.digest_cursor + MAX_DIGEST_BATCH).min(d.len());
                let m = Message::Digests {
                    first_chunk: self.digest_cursor as u32,
                    digests: d[self.digest_cursor..end].to_vec(),
                };
                self.digest_cursor = end;
                self.send(m, out);
                continue;
            }
            let digest_count = if need_digests {
                self.geo.total_chunks
            } else {
                0
            };
            self.send(
                Message::Prepare {
                    state_len: state.len() as u32,
                    digest_count,
                },
                out,
            );
            self.prepare_sent = true;
            self.go(SrcPhase::AwaitPrepared, Event::TailSent);
        }
    }
}
