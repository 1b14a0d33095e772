//! The source's rounds: which pages go in the current round, which chunks need registering or
//! may be evicted under the pin budget, which writes are in flight on which channel, and when
//! the round is quiescent enough to end (spec: sections 5 and 6).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{Link, SourceConfig, SrcCommand, SrcOut, WriteCmd};
use crate::detail::Detail;
use crate::geometry::{Geometry, PageBitmap};
use crate::source::stats::RoundStats;
use crate::types::*;
use crate::wire::{
    self, ChunkRef, Message, PageRange, Params, RegMode, MAX_REG_BATCH, MAX_ZERO_RANGES,
};

/// Where a transfer stands (the source phases Scanning, Sending, AwaitRoundAck, Pausing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Sub {
    /// A dirty scan was requested.
    Scanning,
    /// A round is in progress.
    Sending,
    /// ROUND_END sent.
    AwaitRoundAck,
    /// Converged: the workload pause was requested.
    Pausing,
}

/// The next round's dirty scan, taken while this round's last writes travel (spec: RND-3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(super) enum Ahead {
    #[default]
    None,
    /// Requested: its result comes as `Dirty`, during this round or after its ROUND_ACK.
    Requested,
    /// Arrived before the ROUND_ACK; the next round starts from it.
    Ready(DirtyScan),
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

/// The data channels: which joined, and how many writes each has in flight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Channels {
    open: Vec<bool>,
    inflight: Vec<u16>,
    next: u8,
}

impl Channels {
    /// Records that `ch` joined; false if it does not exist or had joined already.
    pub(super) fn opened(&mut self, ch: u8) -> bool {
        match self.open.get_mut(ch as usize) {
            Some(o) if !*o => {
                *o = true;
                true
            }
            _ => false,
        }
    }

    pub(super) fn all_open(&self) -> bool {
        self.open.iter().all(|&o| o)
    }

    /// The next open channel with room for a write, round robin (spec: DATA-1).
    fn pick(&mut self, depth: u16) -> Option<u8> {
        let n = self.open.len() as u8;
        for i in 0..n {
            let ch = (self.next + i) % n;
            if self.open[ch as usize] && self.inflight[ch as usize] < depth {
                self.next = (ch + 1) % n;
                return Some(ch);
            }
        }
        None
    }
}

/// Writes posted and not yet completed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Writes {
    /// wr_id -> (global chunk, channel).
    pub(super) inflight: BTreeMap<u64, (u32, u8)>,
    chunk_inflight: Vec<u32>,
    next_wr_id: u64,
    /// Writes into the state area in flight, by (offset in the area, wr_id): the smallest
    /// bounds the placed prefix (spec: STATE-3).
    state_inflight: BTreeSet<(u64, u64)>,
    state_offset: BTreeMap<u64, u64>,
}

impl Writes {
    /// Completes `wr_id`; false if no such write is in flight.
    pub(super) fn complete(&mut self, wr_id: u64, channels: &mut Channels) -> bool {
        let Some((g, ch)) = self.inflight.remove(&wr_id) else {
            return false;
        };
        self.chunk_inflight[g as usize] -= 1;
        channels.inflight[ch as usize] -= 1;
        if let Some(off) = self.state_offset.remove(&wr_id) {
            self.state_inflight.remove(&(off, wr_id));
        }
        true
    }
}

/// Registrations at the destination as the source accounts them (spec: REG-4, REG-6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Registrations {
    chunks: Vec<ChunkSt>,
    registered: BTreeSet<u32>,
    /// Requested + registered + unregistering bytes: never below the destination's count.
    pub(super) bytes: u64,
    budget: u64,
    reg_queue: VecDeque<(u32, Vec<u32>)>,
    unreg_queue: VecDeque<(u32, Vec<u32>)>,
    next_reg_id: u32,
    next_unreg_id: u32,
}

impl Registrations {
    fn idle(&self) -> bool {
        self.reg_queue.is_empty() && self.unreg_queue.is_empty()
    }
}

/// The current round's pages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RoundWork {
    /// Pages still to write, per block.
    todo: Vec<PageBitmap>,
    /// All-zero pages still to announce in ZERO, per block.
    zero_todo: Vec<PageBitmap>,
    zero_cursor: (usize, u64),
    /// Chunks with pages still to write.
    pending: BTreeSet<u32>,
    /// Pending chunks that are registered.
    ready: BTreeSet<u32>,
    /// Pending chunks waiting for a registration.
    need_reg: BTreeSet<u32>,
}

/// Rounds of pre-copy and the final round.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Transfer {
    pub(super) sub: Sub,
    /// The current round is the final one (after the pause).
    pub(super) last: bool,
    /// The pause is confirmed: the next scan is the final one.
    pub(super) final_scan: bool,
    /// The workload pause was requested.
    pub(super) paused: bool,
    round_start: Millis,
    round_bytes: u64,
    round_zero_pages: u64,
    /// Bytes per second measured over the previous round (spec: CONV-1).
    pub(super) bandwidth: Option<u64>,
    /// The scan that triggered switchover, merged into the final scan (spec: CONV-1).
    pub(super) carry: Option<DirtyScan>,
    pub(super) channels: Channels,
    pub(super) regs: Registrations,
    work: RoundWork,
    pub(super) writes: Writes,
    /// The final round's tail, once requested: device state and digests are asked for as the
    /// final round starts (memory no longer changes) and arrive while it runs (spec: SW-2).
    pub(super) tail: Option<Box<super::Tail>>,
    pub(super) ahead: Ahead,
    /// State-area pages handed to the writes so far (spec: STATE-3).
    state_queued: u64,
}

impl Transfer {
    /// The transfer after BLOCK_TABLE_ACK: in pin-all mode every chunk is registered under its
    /// block's key (spec: REG-8).
    pub(super) fn new(geo: &Geometry, p: &Params, budget: u64, rkeys: &[u32]) -> Transfer {
        let n = geo.total_chunks as usize;
        let mut regs = Registrations {
            chunks: vec![ChunkSt::Unreg; n],
            registered: BTreeSet::new(),
            bytes: 0,
            budget,
            reg_queue: VecDeque::new(),
            unreg_queue: VecDeque::new(),
            next_reg_id: 1,
            next_unreg_id: 1,
        };
        if p.mode == RegMode::PinAll {
            for (b, &rkey) in rkeys.iter().enumerate() {
                let first = geo.blocks[b].first_chunk;
                for c in 0..geo.blocks[b].chunks {
                    let base = (c as u64) << geo.chunk_log2;
                    regs.chunks[(first + c) as usize] = ChunkSt::Registered { rkey, base };
                }
            }
            regs.bytes = geo.total_bytes;
        }
        let empty = || {
            geo.blocks
                .iter()
                .map(|b| PageBitmap::new(b.pages))
                .collect()
        };
        Transfer {
            sub: Sub::Scanning,
            last: false,
            final_scan: false,
            paused: false,
            round_start: 0,
            round_bytes: 0,
            round_zero_pages: 0,
            bandwidth: None,
            carry: None,
            channels: Channels {
                open: vec![false; p.channels as usize],
                inflight: vec![0; p.channels as usize],
                next: 0,
            },
            regs,
            work: RoundWork {
                todo: empty(),
                zero_todo: empty(),
                zero_cursor: (0, 0),
                pending: BTreeSet::new(),
                ready: BTreeSet::new(),
                need_reg: BTreeSet::new(),
            },
            writes: Writes {
                inflight: BTreeMap::new(),
                chunk_inflight: vec![0; n],
                next_wr_id: 1,
                state_inflight: BTreeSet::new(),
                state_offset: BTreeMap::new(),
            },
            tail: None,
            ahead: Ahead::None,
            state_queued: 0,
        }
    }

    /// Waiting on the peer (spec: ERR-4): a data channel to join, a registration answer, a
    /// write completion, credits, or the round's acknowledgement.
    pub(super) fn waiting(&self, link: &Link, writes_exempt: bool) -> bool {
        let joining = !self.channels.all_open();
        match self.sub {
            Sub::AwaitRoundAck => true,
            Sub::Sending => {
                joining
                    || !self.regs.idle()
                    || (!self.writes.inflight.is_empty() && !writes_exempt)
                    || !link.can_send()
            }
            Sub::Scanning | Sub::Pausing => joining,
        }
    }

    /// After the final round: waiting on the peer for a registration answer or a write of the
    /// state area (spec: ERR-4); producing the state is local work.
    pub(super) fn state_waiting(&self) -> bool {
        !self.regs.idle() || !self.writes.inflight.is_empty()
    }

    pub(super) fn regs_idle(&self) -> bool {
        self.regs.idle()
    }

    /// Hands the device state's pages produced since the last call to the writes: whole
    /// pages while it grows, the last partial page once it is complete (spec: STATE-3).
    pub(super) fn queue_state(&mut self, geo: &Geometry) {
        let (Some(sb), Some(tail)) = (geo.state_block(), self.tail.as_deref()) else {
            return;
        };
        let log2 = geo.blocks[sb].page_log2;
        let pages = if tail.state_done {
            tail.produced.div_ceil(1 << log2)
        } else {
            tail.produced >> log2
        };
        if pages <= self.state_queued {
            return;
        }
        let first = self.state_queued;
        self.work.todo[sb].set_range(first, pages - first);
        self.state_queued = pages;
        let ppc = geo.pages_per_chunk(sb);
        for c in (first / ppc)..pages.div_ceil(ppc) {
            let g = geo.global(ChunkRef {
                block: sb as u16,
                chunk: c as u32,
            });
            self.enqueue(g);
        }
    }

    /// A chunk with pages to write: ready if registered, else waiting for (or in) its
    /// registration.
    fn enqueue(&mut self, g: u32) {
        self.work.pending.insert(g);
        match self.regs.chunks[g as usize] {
            ChunkSt::Registered { .. } => {
                self.work.ready.insert(g);
            }
            ChunkSt::Unreg => {
                self.work.need_reg.insert(g);
            }
            // Their answers (REG_RESULT, UNREG_DONE) look at `pending`.
            ChunkSt::Requested | ChunkSt::Unregistering => {}
        }
    }

    /// The device state's prefix whose every byte is placed: up to the first page not yet
    /// written or still in flight (spec: STATE-3).
    pub(super) fn state_placed(&self, geo: &Geometry, ignore_inflight: bool) -> u64 {
        let (Some(sb), Some(tail)) = (geo.state_block(), self.tail.as_deref()) else {
            return 0;
        };
        let log2 = geo.blocks[sb].page_log2;
        let unsent = self.work.todo[sb]
            .next_set(0)
            .unwrap_or(self.state_queued)
            .min(self.state_queued)
            << log2;
        let inflight = self
            .writes
            .state_inflight
            .first()
            .filter(|_| !ignore_inflight)
            .map_or(u64::MAX, |&(off, _)| off);
        unsent.min(inflight).min(tail.produced)
    }

    /// Writes and registrations of the state area after the final round (spec: STATE-2).
    pub(super) fn pump_state(
        &mut self,
        link: &mut Link,
        geo: &Geometry,
        cfg: &SourceConfig,
        s: &super::Session,
        out: &mut SrcOut,
    ) {
        self.post_writes(geo, cfg, out);
        if s.params.mode == RegMode::Dynamic {
            self.request_registrations(link, geo, cfg, &s.params, out);
            self.evict(link, geo, cfg, out);
        }
    }

    pub(super) fn remaining_bytes(&self, geo: &Geometry) -> u64 {
        self.work
            .todo
            .iter()
            .zip(&geo.blocks)
            .map(|(t, b)| t.count_ones() << b.page_log2)
            .sum()
    }

    /// The final scan: the pages of the scan that triggered switchover plus everything the
    /// final scan found (spec: SW-1).
    pub(super) fn merge_carry(&mut self, scan: DirtyScan) -> DirtyScan {
        match self.carry.take() {
            Some(mut c) => {
                for b in 0..c.dirty.len() {
                    c.dirty[b].union_with(&scan.dirty[b]);
                    c.zero[b].subtract(&scan.dirty[b]);
                    c.zero[b].union_with(&scan.zero[b]);
                }
                c
            }
            None => scan,
        }
    }

    /// ROUND_ACK arrived: the round's duration and the bandwidth it measured (spec: CONV-1).
    pub(super) fn measure_round(&mut self, now: Millis, out: &mut SrcOut) {
        let dur = now.saturating_sub(self.round_start);
        if let Some(r) = out.stats.rounds.last_mut() {
            r.duration_ms = dur;
        }
        if dur > 0 && self.round_bytes > 0 {
            self.bandwidth = Some(self.round_bytes.saturating_mul(1000) / dur);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_round(
        &mut self,
        scan: DirtyScan,
        last: bool,
        round: u32,
        now: Millis,
        geo: &Geometry,
        p: &Params,
        out: &mut SrcOut,
    ) {
        self.sub = Sub::Sending;
        self.last = last;
        self.round_start = now;
        self.round_bytes = 0;
        self.round_zero_pages = 0;
        let elide = p.flags & wire::flag::ZERO_ELISION != 0;
        let mut stats = RoundStats {
            round,
            last,
            started_ms: now,
            ..Default::default()
        };
        for (b, (d, z)) in scan.dirty.into_iter().zip(scan.zero).enumerate() {
            stats.dirty_pages += d.count_ones();
            let mut data = d;
            if elide {
                data.subtract(&z);
                stats.zero_pages += z.count_ones();
                self.round_zero_pages += z.count_ones();
                self.work.zero_todo[b] = z;
            }
            self.work.todo[b] = data;
        }
        self.work.zero_cursor = (0, 0);
        for (b, bg) in geo.blocks.iter().enumerate() {
            for c in 0..bg.chunks {
                let cr = ChunkRef {
                    block: b as u16,
                    chunk: c,
                };
                let (first, count) = geo.chunk_pages(cr);
                if !self.work.todo[b].any_in(first, count) {
                    continue;
                }
                let g = geo.global(cr);
                assert!(
                    matches!(
                        self.regs.chunks[g as usize],
                        ChunkSt::Registered { .. } | ChunkSt::Unreg
                    ),
                    "a round starts only when registration traffic is quiescent"
                );
                self.enqueue(g);
            }
        }
        out.stats.rounds.push(stats);
    }

    /// Sends what the round can send now. Returns true when it sent ROUND_END.
    pub(super) fn pump(
        &mut self,
        link: &mut Link,
        geo: &Geometry,
        cfg: &SourceConfig,
        s: &super::Session,
        round: u32,
        out: &mut SrcOut,
    ) -> bool {
        // Zero ranges first: they are cheap and need no registration (spec: DATA-4).
        while self.work.zero_cursor.0 < self.work.zero_todo.len() && link.can_send() {
            match self.next_zero_message(round, out) {
                Some(m) => {
                    out.stats.zero_messages += 1;
                    link.send(m, out)
                }
                None => break,
            }
        }
        self.post_writes(geo, cfg, out);
        // spec: RND-3: every write of a pre-copy round is posted: the next round's scan runs
        // while they travel. It may miss what the workload writes after it; the scan after
        // that, or the final one after the pause, sees it.
        if !self.last
            && !self.paused
            && self.ahead == Ahead::None
            && self.work.pending.is_empty()
            && self.work.zero_cursor.0 >= self.work.zero_todo.len()
        {
            self.ahead = Ahead::Requested;
            out.cmds.push(SrcCommand::ScanDirty { all: false });
        }
        if s.params.mode == RegMode::Dynamic {
            self.request_registrations(link, geo, cfg, &s.params, out);
            self.evict(link, geo, cfg, out);
        }
        // spec: RND-2: the round ends only when every write is placed and registration is idle.
        #[cfg(feature = "mutations")]
        let drained = self.writes.inflight.is_empty() || link.mutations.skip_drain;
        #[cfg(not(feature = "mutations"))]
        let drained = self.writes.inflight.is_empty();
        if self.work.pending.is_empty()
            && self.work.zero_cursor.0 >= self.work.zero_todo.len()
            && drained
            && self.channels.all_open()
            && self.regs.idle()
            && link.can_send()
        {
            link.send(
                Message::RoundEnd {
                    round,
                    last: self.last,
                    data_bytes: self.round_bytes,
                    zero_pages: self.round_zero_pages,
                },
                out,
            );
            self.sub = Sub::AwaitRoundAck;
            return true;
        }
        false
    }

    /// Builds the next ZERO message from the zero bitmaps (spec: DATA-3).
    fn next_zero_message(&mut self, round: u32, out: &mut SrcOut) -> Option<Message> {
        let mut ranges = Vec::new();
        let (mut b, mut p) = self.work.zero_cursor;
        let zt = &mut self.work.zero_todo;
        while b < zt.len() && ranges.len() < MAX_ZERO_RANGES {
            match zt[b].next_set(p) {
                Some(start) => {
                    let end = zt[b].next_clear(start).min(start + u32::MAX as u64);
                    ranges.push(PageRange {
                        block: b as u16,
                        first_page: start as u32,
                        page_count: (end - start) as u32,
                    });
                    zt[b].clear_range(start, end - start);
                    out.stats.zero_pages += end - start;
                    p = end;
                }
                None => {
                    b += 1;
                    p = 0;
                }
            }
        }
        self.work.zero_cursor = (b, p);
        (!ranges.is_empty()).then_some(Message::Zero { round, ranges })
    }

    fn post_writes(&mut self, geo: &Geometry, cfg: &SourceConfig, out: &mut SrcOut) {
        while let Some(&g) = self.work.ready.first() {
            let ChunkSt::Registered { rkey, base } = self.regs.chunks[g as usize] else {
                unreachable!("ready chunks are registered");
            };
            let c = geo.chunk_of_global(g);
            let b = c.block as usize;
            let page_log2 = geo.blocks[b].page_log2;
            let (first, count) = geo.chunk_pages(c);
            let (chunk_off, _) = geo.chunk_span(c);
            let end = first + count;
            while let Some(p) = self.work.todo[b].next_set(first).filter(|&p| p < end) {
                let Some(ch) = self.channels.pick(cfg.writes_per_channel) else {
                    return; // no open channel has room; completions and joins call us again
                };
                let run_end = self.work.todo[b].next_clear(p).min(end);
                let offset = p << page_log2;
                let len = (run_end - p) << page_log2;
                let wr_id = self.writes.next_wr_id;
                self.writes.next_wr_id += 1;
                self.work.todo[b].clear_range(p, run_end - p);
                self.writes.inflight.insert(wr_id, (g, ch));
                self.writes.chunk_inflight[g as usize] += 1;
                self.channels.inflight[ch as usize] += 1;
                if b >= geo.ram_blocks {
                    self.writes.state_inflight.insert((offset, wr_id));
                    self.writes.state_offset.insert(wr_id, offset);
                    out.stats.state_bytes += len;
                    out.stats.state_writes += 1;
                } else {
                    self.round_bytes += len;
                    if let Some(r) = out.stats.rounds.last_mut() {
                        r.data_bytes += len;
                        r.writes += 1;
                    }
                    out.stats.data_bytes += len;
                }
                // spec: DATA-1, REG-5
                out.cmds.push(SrcCommand::PostWrite(WriteCmd {
                    channel: ch,
                    wr_id,
                    block: c.block,
                    offset,
                    len,
                    rkey,
                    remote_offset: base + (offset - chunk_off),
                }));
            }
            self.work.ready.remove(&g);
            self.work.pending.remove(&g);
        }
    }

    fn request_registrations(
        &mut self,
        link: &mut Link,
        geo: &Geometry,
        cfg: &SourceConfig,
        p: &Params,
        out: &mut SrcOut,
    ) {
        // spec: REG-2, REG-4
        while self.regs.reg_queue.len() < p.max_reg_inflight as usize && link.can_send() {
            let mut batch = Vec::new();
            while batch.len() < cfg.reg_batch as usize {
                let Some(&g) = self.work.need_reg.first() else {
                    break;
                };
                let len = geo.chunk_len(g);
                if self.regs.bytes + len > self.regs.budget {
                    break;
                }
                self.work.need_reg.remove(&g);
                self.regs.bytes += len;
                self.regs.chunks[g as usize] = ChunkSt::Requested;
                #[cfg(feature = "mutations")]
                if link.mutations.write_before_reg_result {
                    self.regs.chunks[g as usize] = ChunkSt::Registered { rkey: 0, base: 0 };
                    self.work.ready.insert(g);
                }
                batch.push(g);
            }
            if batch.is_empty() {
                break;
            }
            let id = self.regs.next_reg_id;
            self.regs.next_reg_id += 1;
            let chunks = batch.iter().map(|&g| geo.chunk_of_global(g)).collect();
            out.stats.reg_requests += 1;
            out.stats.reg_chunks += batch.len() as u64;
            self.regs.reg_queue.push_back((id, batch));
            link.send(Message::RegRequest { req_id: id, chunks }, out);
        }
    }

    /// Frees pin budget when chunks wait for registration that cannot fit (spec: REG-6).
    fn evict(&mut self, link: &mut Link, geo: &Geometry, cfg: &SourceConfig, out: &mut SrcOut) {
        let Some(&next) = self.work.need_reg.first() else {
            return;
        };
        if !self.regs.idle() || !link.can_send() {
            return;
        }
        let need: u64 = self
            .work
            .need_reg
            .iter()
            .take(cfg.reg_batch as usize)
            .map(|&g| geo.chunk_len(g))
            .sum::<u64>()
            .max(geo.chunk_len(next));
        let free = self.regs.budget - self.regs.bytes;
        #[cfg(feature = "mutations")]
        let evict_inflight = link.mutations.evict_inflight;
        #[cfg(not(feature = "mutations"))]
        let evict_inflight = false;
        let mut victims = Vec::new();
        let mut freed = 0;
        for &g in &self.regs.registered {
            if free + freed >= need || victims.len() >= MAX_REG_BATCH {
                break;
            }
            if (self.writes.chunk_inflight[g as usize] == 0 || evict_inflight)
                && !self.work.pending.contains(&g)
            {
                victims.push(g);
                freed += geo.chunk_len(g);
            }
        }
        if victims.is_empty() {
            return; // chunks still being written; their completions call us again
        }
        for &g in &victims {
            self.regs.chunks[g as usize] = ChunkSt::Unregistering;
            self.regs.registered.remove(&g);
        }
        let id = self.regs.next_unreg_id;
        self.regs.next_unreg_id += 1;
        let chunks = victims.iter().map(|&g| geo.chunk_of_global(g)).collect();
        out.stats.unreg_requests += 1;
        out.stats.unreg_chunks += victims.len() as u64;
        self.regs.unreg_queue.push_back((id, victims));
        link.send(Message::UnregRequest { req_id: id, chunks }, out);
    }

    /// REG_RESULT: the keys of the oldest outstanding request (spec: REG-9, REG-5).
    pub(super) fn on_reg_result(&mut self, req_id: u32, rkeys: Vec<u32>) -> Result<(), Detail> {
        let Some((id, chunks)) = self.regs.reg_queue.front() else {
            return Err(Detail::UnaskedRegResult);
        };
        if *id != req_id || chunks.len() != rkeys.len() {
            return Err(Detail::RegResultMismatch);
        }
        let (_, chunks) = self.regs.reg_queue.pop_front().expect("checked above");
        for (g, rkey) in chunks.into_iter().zip(rkeys) {
            if let ChunkSt::Registered { .. } = self.regs.chunks[g as usize] {
                // Only the write_before_reg_result mutation marks a chunk registered early.
                self.regs.chunks[g as usize] = ChunkSt::Registered { rkey, base: 0 };
                continue;
            }
            debug_assert_eq!(self.regs.chunks[g as usize], ChunkSt::Requested);
            self.regs.chunks[g as usize] = ChunkSt::Registered { rkey, base: 0 }; // spec: REG-5
            self.regs.registered.insert(g);
            if self.work.pending.contains(&g) {
                self.work.ready.insert(g);
            }
        }
        Ok(())
    }

    /// UNREG_DONE: the oldest eviction is complete; its bytes are free now (spec: REG-6, REG-9).
    pub(super) fn on_unreg_done(
        &mut self,
        req_id: u32,
        count: u16,
        geo: &Geometry,
    ) -> Result<(), Detail> {
        let Some((id, chunks)) = self.regs.unreg_queue.front() else {
            return Err(Detail::UnaskedUnregDone);
        };
        if *id != req_id || chunks.len() != count as usize {
            return Err(Detail::UnregDoneMismatch);
        }
        let (_, chunks) = self.regs.unreg_queue.pop_front().expect("checked above");
        for g in chunks {
            debug_assert_eq!(self.regs.chunks[g as usize], ChunkSt::Unregistering);
            self.regs.chunks[g as usize] = ChunkSt::Unreg; // spec: REG-6: freed only now
            self.regs.bytes -= geo.chunk_len(g);
            if self.work.pending.contains(&g) {
                self.work.need_reg.insert(g);
            }
        }
        Ok(())
    }
}
