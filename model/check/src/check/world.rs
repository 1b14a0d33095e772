//! The environment of the model: feeding the machines, carrying out their commands, and
//! everything that happens to links, processes and connections on its own.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rdmig_model::destination::{DstCommand, DstInput};
use rdmig_model::digest::chunk_digest;
use rdmig_model::listener::{ConnId, LsnCommand, LsnInput, LsnOut};
use rdmig_model::source::{SrcCommand, SrcInput, SrcOut};
use rdmig_model::types::*;
use rdmig_model::wire::{self, DataHello, Frame, Message};

use super::state::*;
use super::{ProtocolModel, CTRL_CONN, DEVICE_STATE, NOW, PAGE_LOG2, STATE_SHORT};
use crate::env::{self, Refusal, Versions};

/// The connection of data channel `ch`.
pub(super) fn data_conn(ch: u8) -> ConnId {
    10 + ch as ConnId
}

/// The connection of a stray.
pub(super) fn stray_conn(k: Stray) -> ConnId {
    100 + k as ConnId
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

impl Cause {
    fn of(i: &SrcInput) -> Self {
        match i {
            SrcInput::Start => Cause::Start,
            SrcInput::Frame(_) => Cause::Frame,
            SrcInput::Malformed(_) => Cause::Malformed,
            SrcInput::WriteDone { .. } => Cause::WriteDone,
            SrcInput::WriteFailed { .. } => Cause::WriteFailed,
            SrcInput::Timer(_) => Cause::Timer,
            SrcInput::TransportFailed => Cause::TransportFailed,
            SrcInput::Cancel => Cause::Cancel,
            _ => Cause::Driver,
        }
    }
}

impl ProtocolModel {
    // ---------------------------------------------------------------------------------------
    // Feeding the machines and carrying out their commands

    pub(super) fn feed_src(&self, s: &mut State, input: SrcInput) {
        if let SrcInput::Frame(Frame {
            msg: Message::Started,
            ..
        }) = &input
        {
            s.obs.started_received = true;
        }
        let cause = Cause::of(&input);
        let was_live = s.src.outcome().is_none();
        let mut out = SrcOut::new();
        let src = &mut s.src;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| src.handle(NOW, input, &mut out))) {
            s.obs.panic = Some(format!("source: {}", panic_message(p)));
            return;
        }
        if was_live && matches!(s.src.outcome(), Some(Outcome::InDoubt(_))) {
            s.obs.doubt_cause = Some(cause);
        }
        for c in out.cmds {
            self.exec_src(s, c);
        }
    }

    pub(super) fn feed_lsn(&self, s: &mut State, input: LsnInput) {
        if let LsnInput::Frame {
            frame:
                Ok(Frame {
                    msg: Message::Commit,
                    ..
                }),
            ..
        } = &input
        {
            s.obs.commit_delivered = true;
        }
        if let LsnInput::Frame {
            conn: CTRL_CONN,
            frame:
                Ok(Frame {
                    msg: Message::Auth { .. },
                    ..
                }),
        } = &input
        {
            s.obs.auth_delivered = true;
        }
        let mut out = LsnOut::new();
        let lsn = &mut s.lsn;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| lsn.handle(NOW, input, &mut out))) {
            s.obs.panic = Some(format!("destination: {}", panic_message(p)));
            return;
        }
        for c in out.cmds {
            self.exec_lsn(s, c);
        }
    }

    pub(super) fn feed_dst(&self, s: &mut State, input: DstInput) {
        self.feed_lsn(s, LsnInput::Local(input));
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

    fn exec_src(&self, s: &mut State, c: SrcCommand) {
        match c {
            SrcCommand::Send(f) => {
                match f.msg {
                    Message::Commit => {
                        s.obs.commit_sent = true;
                        if !s.relinquished {
                            s.obs.commit_before_relinquish = true; // spec: SW-6
                        }
                    }
                    Message::UnregRequest { .. } => s.obs.evicted = true,
                    // spec: SCAN-2: the destination will hold zeros there.
                    Message::Zero { ref ranges, .. } => {
                        if let Some(log) = s.hash_log.as_mut() {
                            for r in ranges {
                                log.zeroed(
                                    r.block as usize,
                                    r.first_page as u64,
                                    r.page_count as u64,
                                );
                            }
                        }
                    }
                    _ => {}
                }
                if let Some(b) = Self::encode(s, &f) {
                    if s.ctrl == Link::Up && !s.ctrl_closed {
                        s.s2d.push_back(b);
                        super::props::check_last_credit(s, Side::Src, f.credits);
                    }
                }
            }
            SrcCommand::OpenData { hello } => match s.data.get(hello.channel as usize) {
                Some(ch) if ch.link == Link::Up => s.joins.push(hello),
                Some(ch) if ch.link == Link::Down => Self::lose_data(s, hello.channel),
                // A silent network swallows the connection attempt.
                Some(_) => {}
                None => Self::driver_violation(s, "a data channel that was not negotiated"),
            },
            SrcCommand::PostWrite(w) => {
                let pages = s
                    .src_mem
                    .get(w.block as usize)
                    .map_or(0, |m| m.len() as u64);
                let first = w.offset >> PAGE_LOG2;
                let count = w.len >> PAGE_LOG2;
                let aligned = (w.offset | w.len) & ((1 << PAGE_LOG2) - 1) == 0;
                if !aligned || count == 0 || first + count > pages {
                    return Self::driver_violation(s, "write reads outside its source block");
                }
                let Some(ch) = s.data.get_mut(w.channel as usize) else {
                    return Self::driver_violation(s, "write on a channel that does not exist");
                };
                if ch.conn.is_none() {
                    return Self::driver_violation(s, "write on a channel that never joined");
                }
                match ch.link {
                    Link::Up if s.hash_log.is_some() => ch.writes.push_back(Write {
                        wr_id: w.wr_id,
                        rkey: w.rkey,
                        remote_offset: w.remote_offset,
                        len: w.len,
                        data: Vec::new(),
                        reads_at_landing: Some((w.block, first)),
                    }),
                    Link::Up => {
                        let data = s.src_mem[w.block as usize]
                            [first as usize..(first + count) as usize]
                            .to_vec();
                        ch.writes.push_back(Write {
                            wr_id: w.wr_id,
                            rkey: w.rkey,
                            remote_offset: w.remote_offset,
                            len: w.len,
                            data,
                            reads_at_landing: None,
                        });
                    }
                    // A queue pair in error flushes every new work request.
                    Link::Down => insert_sorted(&mut s.completions, (w.wr_id, false)),
                    // A silent link swallows it: no completion, ever.
                    Link::Silent => {}
                }
            }
            SrcCommand::ScanDirty { all } => s.src_pending.push(SrcReq::Scan { all }),
            SrcCommand::PauseWorkload => s.src_pending.push(SrcReq::Pause),
            SrcCommand::ResumeWorkload => {
                // The driver runs workload operations in order: a pause still in progress
                // completes first, then the resume; the net effect is a running workload.
                s.src_pending.retain(|r| *r != SrcReq::Pause);
                s.src_running = true;
            }
            SrcCommand::RelinquishWorkload => s.relinquished = true,
            SrcCommand::CaptureDeviceState { area: 0 } => s.src_pending.push(SrcReq::DeviceState),
            SrcCommand::CaptureDeviceState { area } => {
                if area != self.cfg.state_bytes() {
                    return Self::driver_violation(s, "a state area other than negotiated");
                }
                s.src_pending.push(SrcReq::StateFirst)
            }
            SrcCommand::ComputeDigests => s.src_pending.push(SrcReq::Digests),
            SrcCommand::Finish(_) => {}
        }
    }

    fn exec_lsn(&self, s: &mut State, c: LsnCommand) {
        match c {
            LsnCommand::Send { conn, frame } => {
                let Some(b) = Self::encode(s, &frame) else {
                    return;
                };
                if conn == CTRL_CONN {
                    if s.ctrl == Link::Up && !s.ctrl_closed {
                        s.d2s.push_back(b);
                        super::props::check_last_credit(s, Side::Dst, frame.credits);
                    }
                } else if !s.strays_open.contains(&conn) {
                    Self::driver_violation(s, "a frame for a connection that is not open");
                }
                // A stray ignores what it is sent.
            }
            LsnCommand::Close { conn } => {
                if conn == CTRL_CONN {
                    s.ctrl_closed = true;
                } else if let Some(ch) = s.data.iter().position(|d| d.conn == Some(conn)) {
                    self.close_data(s, ch);
                } else if let Some(ch) = s.joins_refused(conn) {
                    // A refused join: the source learns the channel failed.
                    Self::lose_data(s, ch);
                } else {
                    s.strays_open.remove(&conn);
                }
            }
            LsnCommand::Admit { conn, channel } => match s.data.get_mut(channel as usize) {
                Some(ch) if conn == data_conn(channel) && ch.conn.is_none() => {
                    ch.conn = Some(conn);
                    s.opened.push(channel);
                }
                _ => Self::driver_violation(s, "admitted a connection that is no data channel"),
            },
            LsnCommand::Session(c) => self.exec_dst(s, c),
            LsnCommand::Finish(_) => {}
        }
    }

    fn exec_dst(&self, s: &mut State, c: DstCommand) {
        match c {
            DstCommand::Register {
                target,
                block,
                offset,
                len,
            } => {
                if !s.obs.auth_delivered {
                    s.obs.unauthenticated_registration = true; // spec: AUTH-2
                }
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
            DstCommand::Unregister { rkey, .. } => {
                if !s.nic.unregister(rkey) {
                    Self::driver_violation(s, "unregister of a key the NIC does not hold");
                }
            }
            DstCommand::ZeroFill { block, offset, len } => {
                let first = (offset >> PAGE_LOG2) as usize;
                let count = (len >> PAGE_LOG2) as usize;
                match s.dst_mem.get_mut(block as usize) {
                    Some(m) if first + count <= m.len() => m[first..first + count].fill(0),
                    _ => Self::driver_violation(s, "zero fill outside its block"),
                }
            }
            DstCommand::StoreDeviceState { offset, data } => {
                if offset as usize != s.state_received.len() {
                    return Self::driver_violation(s, "device state stored out of order");
                }
                s.state_received.extend_from_slice(&data);
            }
            DstCommand::FeedState { upto } => {
                // spec: STATE-4: the consumer takes the placed pages in order.
                let Some(area) = s.dst_mem.get(self.dst_order.len()) else {
                    return Self::driver_violation(s, "device state fed without a state area");
                };
                let pages = upto.div_ceil(1 << PAGE_LOG2) as usize;
                if pages > area.len() || pages < s.state_received.len() {
                    return Self::driver_violation(s, "device state fed beyond the state area");
                }
                let fed = area[s.state_received.len()..pages].to_vec();
                if fed.contains(&0xee) {
                    s.obs.fed_unplaced = true;
                }
                s.state_received.extend_from_slice(&fed);
            }
            DstCommand::FinishState { .. } => s.dst_pending.push(DstReq::FinishState),
            DstCommand::ComputeDigests => s.dst_pending.push(DstReq::Digests),
            DstCommand::StartWorkload => s.dst_pending.push(DstReq::Start),
            DstCommand::Send(_) | DstCommand::Finish(_) => {
                Self::driver_violation(s, "the listener passed on a session frame or outcome")
            }
        }
    }

    /// Chunk digests of the abstract memory (one byte per page, its version), by the
    /// configured algorithm (spec: SW-4).
    fn digests(&self, mem: &[Vec<u8>]) -> Vec<u64> {
        let tree = self.cfg.digest == rdmig_model::wire::DigestAlg::Xxh3PageTree;
        mem.iter()
            .flat_map(|b| {
                b.chunks(self.cfg.chunk_pages as usize).map(move |c| {
                    if tree {
                        let pages: Vec<u64> = c
                            .iter()
                            .map(|v| chunk_digest(std::slice::from_ref(v)))
                            .collect();
                        rdmig_model::digest::tree_digest(&pages)
                    } else {
                        chunk_digest(c)
                    }
                })
            })
            .collect()
    }

    pub(super) fn answer_src(&self, s: &mut State, r: SrcReq) {
        match r {
            SrcReq::Scan { all } => {
                let scan = match s.hash_log.as_mut() {
                    Some(log) => {
                        // The writer's bitmap is not what this log reads: kept empty.
                        for d in &mut s.dirty {
                            *d = rdmig_model::PageBitmap::new(d.len());
                        }
                        log.scan(&s.src_mem, all)
                    }
                    None => env::scan(&Versions { mem: &s.src_mem }, &mut s.dirty, all),
                };
                self.feed_src(s, SrcInput::Dirty(scan));
            }
            SrcReq::Pause => {
                s.src_running = false;
                s.snapshot = Some(s.src_mem.clone());
                self.feed_src(s, SrcInput::WorkloadPaused);
            }
            SrcReq::DeviceState => self.feed_src(s, SrcInput::DeviceState(DEVICE_STATE.to_vec())),
            SrcReq::StateFirst => {
                let want = self.cfg.expected_state();
                let sb = self.cfg.block_pages.len();
                s.src_mem[sb][0] = want[0];
                s.src_pending.push(SrcReq::StateRest);
                self.feed_src(
                    s,
                    SrcInput::StateProduced {
                        len: 1 << PAGE_LOG2,
                    },
                );
            }
            SrcReq::StateRest => {
                let want = self.cfg.expected_state();
                let sb = self.cfg.block_pages.len();
                s.src_mem[sb].copy_from_slice(&want);
                let len = self.cfg.state_bytes() - STATE_SHORT;
                let digest = chunk_digest(&want);
                self.feed_src(s, SrcInput::StateDone { len, digest });
            }
            SrcReq::Digests => {
                let d = self.digests(&s.src_mem[..self.cfg.block_pages.len()]);
                self.feed_src(s, SrcInput::Digests(d));
            }
        }
    }

    pub(super) fn answer_dst(&self, s: &mut State, r: DstReq) {
        match r {
            DstReq::Register {
                target,
                block,
                offset,
                len,
            } => {
                let rkey = s.nic.register(block, offset, len);
                self.feed_dst(s, DstInput::Registered { target, rkey });
            }
            DstReq::Digests => {
                let d = self.digests(&s.dst_mem[..self.dst_order.len()]);
                self.feed_dst(s, DstInput::Digests(d));
            }
            DstReq::FinishState => {
                let digest = chunk_digest(&s.state_received);
                self.feed_dst(s, DstInput::StateLoaded { digest });
            }
            DstReq::Start => {
                // spec: INV-MEM-1: compare at the moment the workload starts.
                let equal = s.snapshot.as_ref().is_some_and(|snap| {
                    self.dst_order
                        .iter()
                        .enumerate()
                        .all(|(d, &b)| snap[b] == s.dst_mem[d])
                }) && s.state_received == self.cfg.expected_state();
                if s.obs.memory_equal_at_start != Some(false) {
                    s.obs.memory_equal_at_start = Some(equal);
                }
                if !s.nic.is_empty() {
                    s.obs.registered_at_start = true; // spec: SW-8
                }
                s.dst_running = true;
                self.feed_dst(s, DstInput::WorkloadStarted);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The environment

    /// The NIC places (or rejects) the oldest write of a channel (spec: INV-REG-1, DATA-1).
    pub(super) fn land(&self, s: &mut State, ch: usize) {
        let Some(mut w) = s.data[ch].writes.pop_front() else {
            return;
        };
        if let Some((b, first)) = w.reads_at_landing {
            // The NIC reads source memory now (checked against the block when posted), and
            // the hash log learns what the destination holds (spec: SCAN-2).
            let count = (w.len >> PAGE_LOG2) as usize;
            let first = first as usize;
            w.data = s.src_mem[b as usize][first..first + count].to_vec();
            if let Some(log) = s.hash_log.as_mut() {
                log.sent(b as usize, first, &w.data);
            }
        }
        let placed = match s.nic.place(w.rkey, w.remote_offset, w.len) {
            Ok((block, at)) => {
                let first = (at >> PAGE_LOG2) as usize;
                let mem = &mut s.dst_mem[block as usize];
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
            Err(Refusal::OutOfBounds) => {
                s.obs
                    .reg_violation
                    .get_or_insert("write beyond the bounds of its registration");
                false
            }
            Err(Refusal::UnknownKey) => {
                // Rejection is fine once the destination has ended (its keys are revoked).
                if s.dst_live() && s.lsn.session().is_some() {
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

    /// Data channel `ch` is connected (its join reaches the listener).
    pub(super) fn join(&self, s: &mut State, i: usize) {
        let hello = s.joins.remove(i);
        let conn = data_conn(hello.channel);
        self.feed_lsn(
            s,
            LsnInput::Accepted {
                conn,
                nonce: [0xd0; wire::NONCE_LEN],
                binding: None,
            },
        );
        self.feed_lsn(
            s,
            LsnInput::DataHello {
                conn,
                hello: Ok(hello),
            },
        );
    }

    pub(super) fn raise_notice(s: &mut State, side: Side) {
        let live = s.live(side);
        let n = match side {
            Side::Src => &mut s.src_notice,
            Side::Dst => &mut s.dst_notice,
        };
        if live && *n == Notice::None {
            *n = Notice::Pending;
        }
    }

    /// The control connection breaks loudly: what is in flight is lost, both sides notice.
    pub(super) fn fail_control(&self, s: &mut State) {
        s.ctrl = Link::Down;
        s.s2d.clear();
        s.d2s.clear();
        Self::raise_notice(s, Side::Src);
        Self::raise_notice(s, Side::Dst);
    }

    /// A data channel breaks loudly: queued writes complete in error, both sides notice.
    pub(super) fn fail_data(&self, s: &mut State, ch: usize) {
        if s.data[ch].link == Link::Silent {
            return;
        }
        s.data[ch].link = Link::Down;
        for w in std::mem::take(&mut s.data[ch].writes) {
            insert_sorted(&mut s.completions, (w.wr_id, false));
        }
        Self::lose_data(s, ch as u8);
        if let Some(conn) = s.data[ch].conn {
            if s.dst_live() {
                self.feed_lsn(s, LsnInput::Closed { conn });
            }
        }
    }

    /// The destination closed data channel `ch`.
    fn close_data(&self, s: &mut State, ch: usize) {
        if s.data[ch].link != Link::Up {
            return;
        }
        s.data[ch].link = Link::Down;
        for w in std::mem::take(&mut s.data[ch].writes) {
            insert_sorted(&mut s.completions, (w.wr_id, false));
        }
        Self::lose_data(s, ch as u8);
    }

    /// The source's transport reports data channel `ch` gone.
    fn lose_data(s: &mut State, ch: u8) {
        if s.src_live() && !s.data_lost.contains(&ch) {
            s.data_lost.push(ch);
        }
    }

    /// A link goes silent for good: nothing crosses it and nobody is told.
    pub(super) fn silence_control(&self, s: &mut State) {
        s.ctrl = Link::Silent;
        s.s2d.clear();
        s.d2s.clear();
        s.obs.silenced = true;
    }

    pub(super) fn silence_data(&self, s: &mut State, ch: usize) {
        s.data[ch].link = Link::Silent;
        s.data[ch].writes.clear();
        s.obs.silenced = true;
    }

    pub(super) fn crash(&self, s: &mut State, side: Side) {
        match side {
            Side::Src => {
                // The workload lives in its own process and survives. The guard resumes it
                // unless the source relinquished it before COMMIT (spec: SW-6, INV-OWN-2).
                s.src_crashed = true;
                if !s.src_running && !s.relinquished {
                    s.src_running = true;
                    s.obs.guard_resumed = true;
                }
                s.src_pending.clear();
                s.joins.clear();
                for ch in 0..s.data.len() {
                    s.data[ch].writes.clear();
                    if s.data[ch].link == Link::Up {
                        s.data[ch].link = Link::Down;
                        if let Some(conn) = s.data[ch].conn {
                            if s.dst_live() {
                                self.feed_lsn(s, LsnInput::Closed { conn });
                            }
                        }
                    }
                }
                if s.ctrl == Link::Up {
                    // Its kernel closes its connections: the destination notices.
                    s.ctrl = Link::Down;
                    s.s2d.clear();
                    s.d2s.clear();
                    Self::raise_notice(s, Side::Dst);
                }
            }
            Side::Dst => {
                // The OS revokes the dead process's registrations; writes then fail. A
                // workload it already started keeps running.
                s.dst_crashed = true;
                s.dst_pending.clear();
                s.nic.clear();
                for ch in 0..s.data.len() {
                    if s.data[ch].link == Link::Up {
                        s.data[ch].link = Link::Down;
                        for w in std::mem::take(&mut s.data[ch].writes) {
                            insert_sorted(&mut s.completions, (w.wr_id, false));
                        }
                        Self::lose_data(s, ch as u8);
                    }
                }
                if s.ctrl == Link::Up {
                    s.ctrl = Link::Down;
                    s.s2d.clear();
                    s.d2s.clear();
                    Self::raise_notice(s, Side::Src);
                }
            }
        }
    }

    /// A stray connection arrives and does what its kind does.
    pub(super) fn stray(&self, s: &mut State, k: Stray) {
        let conn = stray_conn(k);
        s.obs.stray = true;
        s.strays_left.remove(&k);
        s.strays_open.insert(conn);
        self.feed_lsn(
            s,
            LsnInput::Accepted {
                conn,
                nonce: [0x5a; wire::NONCE_LEN],
                binding: None,
            },
        );
        let hello = || {
            let h = self.hello.clone();
            LsnInput::Frame {
                conn,
                frame: wire::decode(&h),
            }
        };
        match k {
            Stray::HalfOpen => {}
            Stray::Garbage => self.feed_lsn(
                s,
                LsnInput::Frame {
                    conn,
                    frame: wire::decode(b"GET / HTTP/1.1\r\n"),
                },
            ),
            Stray::ReplayHello => self.feed_lsn(s, hello()),
            Stray::BadDataHello => self.feed_lsn(
                s,
                LsnInput::DataHello {
                    conn,
                    hello: Ok(DataHello {
                        session_id: self.machines[0].0.session_id,
                        channel: 0,
                        token: [0x66; 32],
                    }),
                },
            ),
            Stray::HelloThenClose => {
                self.feed_lsn(s, hello());
                if s.strays_open.remove(&conn) {
                    self.feed_lsn(s, LsnInput::Closed { conn });
                }
            }
        }
    }

    /// Consequences that follow by themselves: inputs for a side that has ended are dropped,
    /// and a side that has ended closes its connections once its last frame has left, so its
    /// peer notices (as a real transport closes the connection on finish).
    pub(super) fn settle(&self, s: &mut State) {
        if !s.src_live() {
            s.completions.clear();
            s.d2s.clear();
            s.src_pending.clear();
            s.opened.clear();
            s.data_lost.clear();
            s.src_notice = Notice::Done;
        }
        if !s.dst_live() {
            s.s2d.clear();
            s.dst_pending.clear();
            s.joins.clear();
            s.dst_notice = Notice::Done;
        }
        if s.src.outcome().is_some()
            && !s.src_crashed
            && s.s2d.is_empty()
            && s.ctrl == Link::Up
            && s.dst_notice == Notice::None
        {
            s.dst_notice = Notice::Pending;
        }
        if s.ctrl_closed && s.d2s.is_empty() && s.ctrl == Link::Up && s.src_notice == Notice::None {
            s.src_notice = Notice::Pending;
        }
        if !s.src_live() && !s.dst_live() {
            for ch in &mut s.data {
                ch.writes.clear();
            }
        }
        if s.lsn.outcome().is_some() && !s.dst_crashed && !s.nic.is_empty() {
            s.obs
                .reg_violation
                .get_or_insert("memory still registered after the destination ended");
        }
    }
}

impl State {
    /// The data channel whose join the listener refused with `Close { conn }`, if any.
    fn joins_refused(&self, conn: ConnId) -> Option<u8> {
        (10..10 + rdmig_model::wire::MAX_CHANNELS as ConnId)
            .contains(&conn)
            .then(|| (conn - 10) as u8)
    }
}

pub(super) fn insert_sorted(v: &mut Vec<(u64, bool)>, x: (u64, bool)) {
    let i = v.partition_point(|&y| y < x);
    v.insert(i, x);
}
