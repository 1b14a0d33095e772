//! The destination side: validates everything the source sends before acting on it, exposes
//! memory only after the key is proven and only within the pin budget, and starts the
//! workload only on COMMIT.

use std::collections::{BTreeSet, VecDeque};

use crate::auth;
use crate::table::{check_destination, DstPhase, Event};
use crate::types::*;
use crate::wire::{
    self, AbortReason, AuthMode, BlockDesc, ChunkRef, DigestAlg, Frame, Hello, HelloAck, Message,
    PageRange, Params, RegMode, MAX_REG_INFLIGHT, NONCE_LEN,
};

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
    pub idle_timeout_ms: u64,
    /// 0 disables keepalives.
    pub keepalive_ms: u64,
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
        }
    }
}

/// Observations for reports; excluded from equality and hashing (see `SourceStats`).
#[derive(Debug, Clone, Default)]
pub struct DestStats {
    pub rounds: u32,
    pub reg_chunks: u64,
    pub unreg_chunks: u64,
    pub zero_pages: u64,
    pub max_registered_bytes: u64,
    pub state_bytes: u64,
    pub control_frames_received: u64,
}
impl PartialEq for DestStats {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for DestStats {}
impl std::hash::Hash for DestStats {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ChunkSt {
    Unreg,
    /// In an accepted REG_REQUEST, registration not yet finished.
    Pending,
    Registered(u32),
}

/// The destination state machine (spec: section "State tables", destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    cfg: DestConfig,
    phase: DstPhase,
    nonce: [u8; NONCE_LEN],
    hello_payload: Vec<u8>,
    ack_payload: Vec<u8>,
    params: Option<Params>,
    session_id: u64,
    credits: Credits,
    outbox: VecDeque<Message>,
    /// Geometry in the source's table order (wire indices).
    geo: Option<Geometry>,
    /// Wire block index -> local block index.
    local: Vec<u16>,
    /// Local block index -> first chunk in local chunk order (for digests).
    local_first: Vec<u32>,
    chunks: Vec<ChunkSt>,
    block_keys: Vec<Option<u32>>,
    registered_bytes: u64,
    reg_queue: VecDeque<(u32, Vec<ChunkRef>)>,
    reg_started: bool,
    next_reg_id: u32,
    next_unreg_id: u32,
    round: u32,
    state_total: Option<u32>,
    state_received: u32,
    digests: Vec<u64>,
    last_recv: Millis,
    last_send: Millis,
    now: Millis,
    outcome: Option<Outcome>,
    pub stats: DestStats,
}

/// Bound on queued replies: each request in flight earns at most one (spec: REG-2).
const MAX_OUTBOX: usize = 4 * MAX_REG_INFLIGHT as usize + 8;

impl Destination {
    /// `nonce` must come from a cryptographic random source (spec: AUTH-1).
    pub fn new(
        cfg: DestConfig,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, crate::source::ConfigError> {
        use crate::source::ConfigError;
        Message::BlockTable {
            blocks: cfg.blocks.clone(),
        }
        .validate()
        .map_err(|_| ConfigError("block table outside protocol bounds"))?;
        let mut names = BTreeSet::new();
        if !cfg.blocks.iter().all(|b| names.insert(b.name.clone())) {
            return Err(ConfigError("duplicate block name"));
        }
        if !(wire::MIN_CREDIT_WINDOW..=wire::MAX_CREDIT_WINDOW).contains(&cfg.credit_window)
            || !(1..=wire::MAX_CHANNELS).contains(&cfg.max_channels)
            || !(1..=MAX_REG_INFLIGHT).contains(&cfg.max_reg_inflight)
            || cfg.idle_timeout_ms == 0
        {
            return Err(ConfigError(
                "window, channels, in-flight limit or timeout out of range",
            ));
        }
        Ok(Destination {
            credits: Credits::new(cfg.credit_window),
            cfg,
            phase: DstPhase::AwaitHello,
            nonce,
            hello_payload: Vec::new(),
            ack_payload: Vec::new(),
            params: None,
            session_id: 0,
            outbox: VecDeque::new(),
            geo: None,
            local: Vec::new(),
            local_first: Vec::new(),
            chunks: Vec::new(),
            block_keys: Vec::new(),
            registered_bytes: 0,
            reg_queue: VecDeque::new(),
            reg_started: false,
            next_reg_id: 1,
            next_unreg_id: 1,
            round: 1,
            state_total: None,
            state_received: 0,
            digests: Vec::new(),
            last_recv: 0,
            last_send: 0,
            now: 0,
            outcome: None,
            stats: DestStats::default(),
        })
    }

    pub fn phase(&self) -> DstPhase {
        self.phase
    }
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }
    pub fn params(&self) -> Option<Params> {
        self.params
    }
    pub fn credits(&self) -> &Credits {
        &self.credits
    }
    /// Bytes registered or being registered (spec: INV-PIN-1).
    pub fn registered_bytes(&self) -> u64 {
        self.registered_bytes
    }
    pub fn pin_budget(&self) -> u64 {
        self.cfg.pin_budget
    }
    /// Current round number (the one being received).
    pub fn round(&self) -> u32 {
        self.round
    }
    /// Geometry in wire order, once the block table is accepted.
    pub fn geometry(&self) -> Option<&Geometry> {
        self.geo.as_ref()
    }
    /// Local block index of a wire block index.
    pub fn local_block(&self, wire_block: u16) -> Option<u16> {
        self.local.get(wire_block as usize).copied()
    }

    pub fn timers(&self) -> Timers {
        if self.phase == DstPhase::Done {
            return Timers::default();
        }
        let awaiting = !matches!(
            self.phase,
            DstPhase::Pinning | DstPhase::Verifying | DstPhase::Starting
        );
        Timers {
            idle: awaiting.then(|| self.last_recv + self.cfg.idle_timeout_ms),
            keepalive: (self.cfg.keepalive_ms > 0
                && !matches!(self.phase, DstPhase::AwaitHello | DstPhase::Starting))
            .then(|| self.last_send + self.cfg.keepalive_ms),
        }
    }

    pub fn handle(&mut self, now: Millis, input: Input, out: &mut Vec<Command>) {
        self.now = now;
        if self.phase == DstPhase::Done {
            return;
        }
        self.on_input(input, out);
        if self.phase != DstPhase::Done {
            self.flush(out);
        }
    }

    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Command> {
        let mut out = Vec::new();
        self.handle(now, input, &mut out);
        out
    }

    fn go(&mut self, to: DstPhase, ev: Event) {
        check_destination(self.phase, ev, to);
        self.phase = to;
    }

    fn on_input(&mut self, input: Input, out: &mut Vec<Command>) {
        if self.phase == DstPhase::Starting
            && !matches!(
                input,
                Input::WorkloadStarted | Input::WorkloadFailed | Input::Frame(_)
            )
        {
            return; // committed: only the workload's own result can end this phase (SW-7)
        }
        match input {
            Input::Frame(f) => self.on_frame(f, out),
            Input::Malformed(_) if self.phase == DstPhase::Starting => {} // committed, see on_frame
            Input::Malformed(_) => self.violation(out, "malformed frame"),
            Input::Registered { target, rkey } => self.on_registered(target, rkey, out),
            Input::RegisterFailed { .. } => {
                if self.phase == DstPhase::Pinning || self.reg_started {
                    self.abort(
                        out,
                        AbortReason::RegistrationFailed,
                        "memory registration failed",
                    )
                } else {
                    self.local_error(out, "registration result not requested")
                }
            }
            Input::Digests(d) => self.on_digests(d, out),
            Input::WorkloadStarted => {
                if self.phase != DstPhase::Starting {
                    return self.local_error(out, "workload start not requested");
                }
                if self.credits.can_send() {
                    self.send(Message::Started, out); // spec: SW-7
                }
                self.outcome = Some(Outcome::Completed);
                out.push(Command::Finish(Outcome::Completed));
                self.go(DstPhase::Done, Event::WorkloadStarted);
            }
            Input::WorkloadFailed => {
                if self.phase != DstPhase::Starting {
                    return self.local_error(out, "workload start not requested");
                }
                // The workload did not start, so the source may safely resume (spec: SW-7).
                self.abort(out, AbortReason::WorkloadFailed, "workload failed to start")
            }
            Input::Timer(TimerKind::Idle) => {
                if self.timers().idle.is_some() {
                    self.abort(
                        out,
                        AbortReason::Timeout,
                        "peer silent past the idle timeout",
                    ); // spec: ERR-4
                }
            }
            Input::Timer(TimerKind::Keepalive) => {
                if self.phase != DstPhase::AwaitHello
                    && self.outbox.is_empty()
                    && self.credits.can_send()
                {
                    self.send(Message::Nop, out); // spec: ERR-5
                } else {
                    self.last_send = self.now;
                }
            }
            Input::TransportFailed => {
                if self.phase == DstPhase::Starting {
                    return; // spec: ERR-3: committed; the start goes ahead
                }
                self.abort(out, AbortReason::TransportFailed, "transport failed")
            }
            Input::Cancel => {
                if self.phase == DstPhase::Starting {
                    return; // committed: cancelling now would lose the workload
                }
                self.abort(out, AbortReason::Cancelled, "cancelled by operator")
            }
            Input::Start
            | Input::WriteDone { .. }
            | Input::WriteFailed { .. }
            | Input::Dirty(_)
            | Input::WorkloadPaused
            | Input::DeviceState(_) => {
                self.local_error(out, "source-only input given to the destination")
            }
        }
    }

    fn local_error(&mut self, out: &mut Vec<Command>, detail: &'static str) {
        self.abort(out, AbortReason::LocalError, detail)
    }

    fn violation(&mut self, out: &mut Vec<Command>, detail: &'static str) {
        self.abort(out, AbortReason::ProtocolViolation, detail)
    }

    fn abort(&mut self, out: &mut Vec<Command>, reason: AbortReason, detail: &'static str) {
        self.abort_inner(out, reason, false, detail)
    }

    /// Revokes every registration, tells the source why (if a credit allows), and ends with
    /// nothing started (spec: ERR-1, INV-OWN-1).
    fn abort_inner(
        &mut self,
        out: &mut Vec<Command>,
        reason: AbortReason,
        by_peer: bool,
        detail: &'static str,
    ) {
        self.unregister_all(out);
        if !by_peer && reason != AbortReason::TransportFailed && self.credits.can_send() {
            self.outbox.clear();
            self.send(Message::Abort { reason }, out);
        }
        let o = Outcome::Aborted(AbortInfo {
            reason,
            by_peer,
            detail,
        });
        self.outcome = Some(o);
        out.push(Command::Finish(o));
        self.go(DstPhase::Done, Event::Abort);
    }

    fn unregister_all(&mut self, out: &mut Vec<Command>) {
        for (b, k) in self.block_keys.iter_mut().enumerate() {
            if let Some(rkey) = k.take() {
                out.push(Command::Unregister {
                    target: RegTarget::Block(self.local[b]),
                    rkey,
                });
            }
        }
        if let Some(geo) = &self.geo {
            for (g, st) in self.chunks.iter_mut().enumerate() {
                if let ChunkSt::Registered(rkey) = *st {
                    let c = geo.chunk_of_global(g as u32);
                    let c = ChunkRef {
                        block: self.local[c.block as usize],
                        chunk: c.chunk,
                    };
                    out.push(Command::Unregister {
                        target: RegTarget::Chunk(c),
                        rkey,
                    });
                }
                *st = ChunkSt::Unreg;
            }
        }
        self.registered_bytes = 0;
    }

    fn send(&mut self, msg: Message, out: &mut Vec<Command>) {
        let grant = self.credits.take(); // spec: FC-2, FC-3
        self.last_send = self.now;
        out.push(Command::Send(Frame {
            credits: grant,
            msg,
        }));
    }

    fn queue(&mut self, msg: Message, out: &mut Vec<Command>) {
        if self.outbox.len() >= MAX_OUTBOX {
            return self.violation(out, "source is not returning credits");
        }
        self.outbox.push_back(msg);
    }

    fn flush(&mut self, out: &mut Vec<Command>) {
        while !self.outbox.is_empty() && self.credits.can_send() {
            let m = self.outbox.pop_front().expect("not empty");
            self.send(m, out);
        }
        if self.outbox.is_empty() && self.phase != DstPhase::AwaitHello && self.credits.wants_nop()
        {
            self.send(Message::Nop, out); // spec: FC-4
        }
    }

    fn on_frame(&mut self, f: Frame, out: &mut Vec<Command>) {
        if self.phase == DstPhase::Starting {
            // Committed: the workload is being started and nothing the source sends now can
            // undo that; aborting here could let both sides run (spec: INV-OWN-1). Credits are
            // still taken back so STARTED can be sent.
            let _ = self.credits.on_receive(f.credits);
            return;
        }
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
            (_, Message::Abort { reason }) => self.abort_inner(out, reason, true, "source aborted"),
            (DstPhase::AwaitHello, Message::Hello(h)) => self.on_hello(h, out),
            (DstPhase::AwaitAuth, Message::Auth { mac }) => {
                let ok = match &self.cfg.psk {
                    Some(key) => {
                        auth::verify_src(key, &self.hello_payload, &self.ack_payload, &mac)
                    }
                    None => mac == [0; wire::MAC_LEN],
                };
                if !ok {
                    return self.abort(
                        out,
                        AbortReason::AuthFailed,
                        "source failed to prove the key",
                    ); // spec: AUTH-5
                }
                self.go(DstPhase::AwaitTable, Event::Auth); // spec: AUTH-2
            }
            (DstPhase::AwaitTable, Message::BlockTable { blocks }) => self.on_table(blocks, out),
            (DstPhase::Receiving, Message::RegRequest { req_id, chunks }) => {
                self.on_reg_request(req_id, chunks, out)
            }
            (DstPhase::Receiving, Message::UnregRequest { req_id, chunks }) => {
                self.on_unreg_request(req_id, chunks, out)
            }
            (DstPhase::Receiving, Message::Zero { round, ranges }) => {
                self.on_zero(round, ranges, out)
            }
            (DstPhase::Receiving, Message::RoundEnd { round, last, .. }) => {
                if round != self.round {
                    return self.violation(out, "ROUND_END for another round"); // spec: RND-4
                }
                if !self.reg_queue.is_empty() {
                    return self.violation(out, "ROUND_END with registration outstanding");
                    // spec: RND-2
                }
                self.stats.rounds = round;
                self.queue(Message::RoundAck { round }, out);
                if last {
                    self.go(DstPhase::ReceivingTail, Event::LastRoundEnd);
                } else {
                    self.round += 1;
                    self.go(DstPhase::Receiving, Event::RoundEnd);
                }
            }
            (
                DstPhase::ReceivingTail,
                Message::DeviceState {
                    offset,
                    total_len,
                    data,
                },
            ) => {
                // spec: SW-3
                if *self.state_total.get_or_insert(total_len) != total_len {
                    return self.violation(out, "device state total changed");
                }
                if offset != self.state_received {
                    return self.violation(out, "device state not contiguous");
                }
                self.state_received += data.len() as u32;
                self.stats.state_bytes = self.state_received as u64;
                out.push(Command::StoreDeviceState { offset, data });
            }
            (
                DstPhase::ReceivingTail,
                Message::Digests {
                    first_chunk,
                    digests,
                },
            ) => {
                let total = self.geo.as_ref().map_or(0, |g| g.total_chunks) as usize;
                let alg = self.params.map_or(DigestAlg::None, |p| p.digest);
                if alg == DigestAlg::None
                    || first_chunk as usize != self.digests.len()
                    || self.digests.len() + digests.len() > total
                {
                    return self.violation(out, "digests out of order or beyond the chunk count");
                    // spec: SW-4
                }
                self.digests.extend_from_slice(&digests);
            }
            (
                DstPhase::ReceivingTail,
                Message::Prepare {
                    state_len,
                    digest_count,
                },
            ) => self.on_prepare(state_len, digest_count, out),
            (DstPhase::Prepared, Message::Commit) => {
                self.unregister_all(out); // spec: SW-8
                out.push(Command::StartWorkload); // spec: SW-7
                self.go(DstPhase::Starting, Event::CommitMsg);
            }
            _ => self.violation(out, "message not allowed in this phase"),
        }
    }

    fn on_hello(&mut self, h: Hello, out: &mut Vec<Command>) {
        self.session_id = h.session_id;
        self.hello_payload = auth::payload(&Message::Hello(h.clone()));
        // spec: HS-1
        if !(h.version_min..=h.version_max).contains(&wire::PROTOCOL_VERSION) {
            return self.abort(out, AbortReason::Incompatible, "no common protocol version");
        }
        // spec: AUTH-4
        match (&self.cfg.psk, h.params.auth) {
            (Some(_), AuthMode::Insecure) => {
                return self.abort(
                    out,
                    AbortReason::AuthFailed,
                    "source offered no authentication",
                )
            }
            (None, AuthMode::HmacSha256) => {
                return self.abort(
                    out,
                    AbortReason::Incompatible,
                    "destination configured insecure",
                )
            }
            _ => {}
        }
        // spec: HS-3: narrow what may be narrowed; everything else is taken as proposed.
        let params = Params {
            channels: h.params.channels.min(self.cfg.max_channels),
            max_reg_inflight: h.params.max_reg_inflight.min(self.cfg.max_reg_inflight),
            ..h.params
        };
        self.params = Some(params);
        self.credits.learn_peer_window(h.credit_window);
        let mut ack = HelloAck {
            version: wire::PROTOCOL_VERSION,
            session_id: h.session_id,
            params,
            credit_window: self.cfg.credit_window,
            pin_budget: self.cfg.pin_budget,
            nonce: self.nonce,
            mac: [0; wire::MAC_LEN],
        };
        if let Some(key) = &self.cfg.psk {
            let zero = auth::payload(&Message::HelloAck(ack.clone()));
            ack.mac = auth::dst_mac(key, &self.hello_payload, &zero); // spec: AUTH-1
        }
        self.ack_payload = auth::payload(&Message::HelloAck(ack.clone()));
        self.queue(Message::HelloAck(ack), out);
        self.credits.announce_window();
        self.go(DstPhase::AwaitAuth, Event::Hello);
    }

    fn on_table(&mut self, blocks: Vec<BlockDesc>, out: &mut Vec<Command>) {
        let params = self.params.expect("set in AwaitHello");
        // spec: BLK-2: match by name; every local block must be named exactly once.
        let mut local = Vec::with_capacity(blocks.len());
        let mut seen = BTreeSet::new();
        for b in &blocks {
            let Some(i) = wire::block_index(&self.cfg.blocks, &b.name) else {
                return self.abort(out, AbortReason::BlockMismatch, "unknown block");
            };
            if !seen.insert(i) {
                return self.abort(out, AbortReason::BlockMismatch, "duplicate block");
            }
            let l = &self.cfg.blocks[i];
            if l.length != b.length || l.page_log2 != b.page_log2 {
                return self.abort(
                    out,
                    AbortReason::BlockMismatch,
                    "block length or page size differs",
                );
            }
            local.push(i as u16);
        }
        if seen.len() != self.cfg.blocks.len() {
            return self.abort(
                out,
                AbortReason::BlockMismatch,
                "a local block is missing from the table",
            );
        }
        let geo = match Geometry::new(&blocks, params.chunk_log2) {
            Ok(g) => g,
            Err(e) => return self.abort(out, AbortReason::Incompatible, e), // spec: BLK-3
        };
        let local_geo =
            Geometry::new(&self.cfg.blocks, params.chunk_log2).expect("same blocks, same sizes");
        self.local_first = local_geo.blocks.iter().map(|b| b.first_chunk).collect();
        self.chunks = vec![ChunkSt::Unreg; geo.total_chunks as usize];
        self.block_keys = vec![None; geo.blocks.len()];
        self.local = local;
        let total = geo.total_bytes;
        let chunk = geo.chunk_size().min(total);
        self.geo = Some(geo);
        match params.mode {
            RegMode::PinAll => {
                if total > self.cfg.pin_budget {
                    return self.abort(
                        out,
                        AbortReason::PinBudget,
                        "pin-all needs more than the pin budget",
                    ); // spec: REG-8
                }
                self.registered_bytes = total;
                self.stats.max_registered_bytes = total;
                for (b, d) in blocks.iter().enumerate() {
                    let lb = self.local[b];
                    out.push(Command::Register {
                        target: RegTarget::Block(lb),
                        block: lb,
                        offset: 0,
                        len: d.length,
                    });
                }
                self.go(DstPhase::Pinning, Event::TablePinAll);
            }
            RegMode::Dynamic => {
                if chunk > self.cfg.pin_budget {
                    return self.abort(out, AbortReason::PinBudget, "pin budget below one chunk");
                }
                self.queue(
                    Message::BlockTableAck {
                        rkeys: vec![0; blocks.len()],
                    },
                    out,
                );
                self.go(DstPhase::Receiving, Event::TableDynamic);
            }
        }
    }

    fn on_registered(&mut self, target: RegTarget, rkey: u32, out: &mut Vec<Command>) {
        match (self.phase, target) {
            (DstPhase::Pinning, RegTarget::Block(lb)) => {
                let Some(b) = self.local.iter().position(|&l| l == lb) else {
                    return self.local_error(out, "registered an unknown block");
                };
                if self.block_keys[b].is_some() {
                    return self.local_error(out, "block registered twice");
                }
                self.block_keys[b] = Some(rkey);
                if self.block_keys.iter().all(Option::is_some) {
                    let rkeys = self
                        .block_keys
                        .iter()
                        .map(|k| k.expect("all set"))
                        .collect();
                    self.queue(Message::BlockTableAck { rkeys }, out);
                    self.go(DstPhase::Receiving, Event::Pinned);
                }
            }
            (DstPhase::Receiving, RegTarget::Chunk(lc)) if self.reg_started => {
                let Some(b) = self.local.iter().position(|&l| l == lc.block) else {
                    return self.local_error(out, "registered an unknown block");
                };
                let wc = ChunkRef {
                    block: b as u16,
                    chunk: lc.chunk,
                };
                let geo = self.geo.as_ref().expect("table accepted");
                let (_, chunks) = self
                    .reg_queue
                    .front()
                    .expect("reg_started implies a request");
                if !geo.valid_chunk(wc) || !chunks.contains(&wc) {
                    return self
                        .local_error(out, "registration result for a chunk not being registered");
                }
                let g = geo.global(wc) as usize;
                if self.chunks[g] != ChunkSt::Pending {
                    return self.local_error(out, "chunk registered twice");
                }
                self.chunks[g] = ChunkSt::Registered(rkey);
                let all = chunks.iter().all(|&c| {
                    matches!(self.chunks[geo.global(c) as usize], ChunkSt::Registered(_))
                });
                if all {
                    let (id, chunks) = self.reg_queue.pop_front().expect("front exists");
                    let rkeys = chunks
                        .iter()
                        .map(|&c| match self.chunks[geo.global(c) as usize] {
                            ChunkSt::Registered(k) => k,
                            _ => unreachable!("all registered"),
                        })
                        .collect();
                    self.reg_started = false;
                    self.queue(Message::RegResult { req_id: id, rkeys }, out);
                    self.start_next_registration(out);
                }
            }
            _ => self.local_error(out, "registration result not requested"),
        }
    }

    fn on_reg_request(&mut self, req_id: u32, chunks: Vec<ChunkRef>, out: &mut Vec<Command>) {
        let params = self.params.expect("negotiated");
        if params.mode != RegMode::Dynamic {
            return self.violation(out, "REG_REQUEST in pin-all mode");
        }
        if req_id != self.next_reg_id {
            return self.violation(out, "REG_REQUEST id out of sequence"); // spec: REG-9
        }
        if self.reg_queue.len() >= params.max_reg_inflight as usize {
            return self.violation(out, "too many registration requests in flight");
            // spec: REG-2
        }
        let geo = self.geo.as_ref().expect("table accepted");
        let mut bytes = 0u64;
        let mut seen = BTreeSet::new();
        for &c in &chunks {
            // spec: REG-3
            if !geo.valid_chunk(c) {
                return self.violation(out, "REG_REQUEST names a chunk outside the block table");
            }
            let g = geo.global(c);
            if self.chunks[g as usize] != ChunkSt::Unreg || !seen.insert(g) {
                return self.violation(out, "REG_REQUEST names a chunk already registered");
            }
            bytes += geo.chunk_span(c).1;
        }
        if self.registered_bytes + bytes > self.cfg.pin_budget {
            return self.abort(
                out,
                AbortReason::PinBudget,
                "registration would exceed the pin budget",
            ); // spec: REG-4
        }
        for g in seen {
            self.chunks[g as usize] = ChunkSt::Pending;
        }
        self.registered_bytes += bytes;
        self.stats.max_registered_bytes =
            self.stats.max_registered_bytes.max(self.registered_bytes);
        self.stats.reg_chunks += chunks.len() as u64;
        self.next_reg_id += 1;
        self.reg_queue.push_back((req_id, chunks));
        self.start_next_registration(out);
    }

    fn start_next_registration(&mut self, out: &mut Vec<Command>) {
        if self.reg_started {
            return;
        }
        let Some((_, chunks)) = self.reg_queue.front() else {
            return;
        };
        let geo = self.geo.as_ref().expect("table accepted");
        for &c in chunks {
            let (offset, len) = geo.chunk_span(c);
            let lb = self.local[c.block as usize];
            let target = RegTarget::Chunk(ChunkRef {
                block: lb,
                chunk: c.chunk,
            });
            out.push(Command::Register {
                target,
                block: lb,
                offset,
                len,
            });
        }
        self.reg_started = true;
    }

    fn on_unreg_request(&mut self, req_id: u32, chunks: Vec<ChunkRef>, out: &mut Vec<Command>) {
        if self.params.map(|p| p.mode) != Some(RegMode::Dynamic) {
            return self.violation(out, "UNREG_REQUEST in pin-all mode");
        }
        if req_id != self.next_unreg_id {
            return self.violation(out, "UNREG_REQUEST id out of sequence"); // spec: REG-9
        }
        let geo = self.geo.as_ref().expect("table accepted");
        let mut seen = BTreeSet::new();
        for &c in &chunks {
            // spec: REG-7
            if !geo.valid_chunk(c) || !seen.insert(c) {
                return self.violation(out, "UNREG_REQUEST names an invalid or repeated chunk");
            }
            if !matches!(self.chunks[geo.global(c) as usize], ChunkSt::Registered(_)) {
                return self.violation(out, "UNREG_REQUEST names a chunk that is not registered");
            }
        }
        for &c in &chunks {
            let g = geo.global(c) as usize;
            let ChunkSt::Registered(rkey) = self.chunks[g] else {
                unreachable!("checked")
            };
            self.chunks[g] = ChunkSt::Unreg;
            self.registered_bytes -= geo.chunk_span(c).1;
            let lc = ChunkRef {
                block: self.local[c.block as usize],
                chunk: c.chunk,
            };
            out.push(Command::Unregister {
                target: RegTarget::Chunk(lc),
                rkey,
            });
        }
        self.stats.unreg_chunks += chunks.len() as u64;
        self.next_unreg_id += 1;
        self.queue(
            Message::UnregDone {
                req_id,
                count: chunks.len() as u16,
            },
            out,
        );
    }

    fn on_zero(&mut self, round: u32, ranges: Vec<PageRange>, out: &mut Vec<Command>) {
        if self
            .params
            .is_some_and(|p| p.flags & wire::flag::ZERO_ELISION == 0)
        {
            return self.violation(out, "ZERO without zero elision negotiated"); // spec: HS-3
        }
        if round != self.round {
            return self.violation(out, "ZERO for another round"); // spec: RND-4
        }
        let geo = self.geo.as_ref().expect("table accepted");
        // spec: DATA-3: check every range before acting on any.
        for r in &ranges {
            let ok = geo
                .blocks
                .get(r.block as usize)
                .is_some_and(|b| r.first_page as u64 + r.page_count as u64 <= b.pages);
            if !ok {
                return self.violation(out, "ZERO range outside its block");
            }
        }
        for r in ranges {
            let page_log2 = geo.blocks[r.block as usize].page_log2;
            self.stats.zero_pages += r.page_count as u64;
            out.push(Command::ZeroFill {
                block: self.local[r.block as usize],
                offset: (r.first_page as u64) << page_log2,
                len: (r.page_count as u64) << page_log2,
            });
        }
    }

    fn on_prepare(&mut self, state_len: u32, digest_count: u32, out: &mut Vec<Command>) {
        // spec: SW-5
        let total_chunks = self.geo.as_ref().map_or(0, |g| g.total_chunks);
        let verify = self.params.map(|p| p.digest) != Some(DigestAlg::None);
        let state_ok =
            state_len == self.state_received && self.state_total.unwrap_or(0) == state_len;
        let want_digests = if verify { total_chunks } else { 0 };
        if !state_ok || digest_count != want_digests || self.digests.len() as u32 != digest_count {
            return self.violation(out, "PREPARE counts differ from what was received");
        }
        if verify {
            out.push(Command::ComputeDigests);
            self.go(DstPhase::Verifying, Event::PrepareVerify);
        } else {
            self.queue(Message::Prepared, out);
            self.go(DstPhase::Prepared, Event::PrepareNoVerify);
        }
    }

    fn on_digests(&mut self, local: Vec<u64>, out: &mut Vec<Command>) {
        if self.phase != DstPhase::Verifying {
            return self.local_error(out, "digests not requested");
        }
        let geo = self.geo.as_ref().expect("table accepted");
        if local.len() != geo.total_chunks as usize {
            return self.local_error(out, "digest count differs from chunk count");
        }
        for (b, bg) in geo.blocks.iter().enumerate() {
            let lf = self.local_first[self.local[b] as usize] as usize;
            let wf = bg.first_chunk as usize;
            let n = bg.chunks as usize;
            if local[lf..lf + n] != self.digests[wf..wf + n] {
                return self.abort(
                    out,
                    AbortReason::DigestMismatch,
                    "received memory differs from the source",
                );
            }
        }
        self.queue(Message::Prepared, out);
        self.go(DstPhase::Prepared, Event::DigestsMatch);
    }
}
