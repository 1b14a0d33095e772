//! The destination's authenticated session: how the source's block table maps onto local
//! blocks, which chunks are registered, the round being received, and the switchover's tail.

use std::collections::{BTreeSet, VecDeque};

use super::{DestConfig, DstCommand, DstOut};
use crate::detail::Detail;
use crate::geometry::Geometry;
use crate::types::*;
use crate::wire::{self, AbortReason, BlockDesc, ChunkRef, DigestAlg, Message, PageRange, Params};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ChunkSt {
    Unreg,
    /// In an accepted REG_REQUEST, registration not yet finished.
    Pending,
    Registered(u32),
}

/// What a round message asks of the machine.
pub(super) enum Next {
    Stay,
    /// Queue this reply.
    Reply(Message),
    /// A valid ROUND_END: acknowledge it; `last` ends the rounds (spec: RND-4, SW-2).
    RoundEnd {
        round: u32,
        last: bool,
    },
}

/// Everything from the accepted block table on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Session {
    pub(super) session_id: u64,
    pub(super) params: Params,
    /// Geometry in the source's table order (wire indices).
    pub(super) geo: Geometry,
    /// Wire block index -> local block index.
    pub(super) local: Vec<u16>,
    /// Local block index -> first chunk in local chunk order (for digests).
    local_first: Vec<u32>,
    chunks: Vec<ChunkSt>,
    block_keys: Vec<Option<u32>>,
    pub(super) registered_bytes: u64,
    budget: u64,
    reg_queue: VecDeque<(u32, Vec<ChunkRef>)>,
    reg_started: bool,
    #[cfg(feature = "mutations")]
    mutations: super::DstMutations,
    next_reg_id: u32,
    next_unreg_id: u32,
    pub(super) round: u32,
    /// Data channels admitted, one bit each (spec: AUTH-6).
    pub(super) joined: u16,
}

impl Session {
    /// Matches the source's table against the local blocks by name (spec: BLK-2) and checks
    /// it fits the chunk size and the pin budget (spec: BLK-3, REG-4).
    pub(super) fn new(
        cfg: &DestConfig,
        session_id: u64,
        params: Params,
        blocks: &[BlockDesc],
        state_capacity: u64,
    ) -> Result<Session, (AbortReason, Detail)> {
        let mismatch = |d| Err((AbortReason::BlockMismatch, d));
        let mut local = Vec::with_capacity(blocks.len());
        let mut seen = BTreeSet::new();
        for b in blocks {
            let Some(i) = wire::block_index(&cfg.blocks, &b.name) else {
                return mismatch(Detail::UnknownBlock);
            };
            if !seen.insert(i) {
                return mismatch(Detail::DuplicateBlock);
            }
            let l = &cfg.blocks[i];
            if l.length != b.length || l.page_log2 != b.page_log2 {
                return mismatch(Detail::BlockDiffers);
            }
            local.push(i as u16);
        }
        if seen.len() != cfg.blocks.len() {
            return mismatch(Detail::MissingBlock);
        }
        // spec: BLK-3, BLK-1, STATE-2: the state area is one more block after the table's.
        let incompatible = |d| (AbortReason::Incompatible, d);
        let geo = Geometry::new(blocks, params.chunk_log2)
            .and_then(|g| g.with_state_area(state_capacity))
            .map_err(incompatible)?;
        let local_geo = Geometry::new(&cfg.blocks, params.chunk_log2)
            .and_then(|g| g.with_state_area(state_capacity))
            .map_err(incompatible)?;
        if state_capacity > 0 {
            local.push(cfg.blocks.len() as u16);
        }
        if params.mode == wire::RegMode::Dynamic
            && geo.chunk_size().min(geo.total_bytes) > cfg.pin_budget
        {
            return Err((AbortReason::PinBudget, Detail::BudgetBelowChunk)); // spec: REG-4
        }
        Ok(Session {
            session_id,
            params,
            local_first: local_geo.blocks.iter().map(|b| b.first_chunk).collect(),
            chunks: vec![ChunkSt::Unreg; geo.total_chunks as usize],
            block_keys: vec![None; geo.blocks.len()],
            registered_bytes: 0,
            budget: cfg.pin_budget,
            reg_queue: VecDeque::new(),
            reg_started: false,
            #[cfg(feature = "mutations")]
            mutations: cfg.mutations,
            next_reg_id: 1,
            next_unreg_id: 1,
            round: 1,
            joined: 0,
            geo,
            local,
        })
    }

    /// Pin-all: registers every block whole, the state area too (spec: REG-8, STATE-2).
    pub(super) fn pin_all(&mut self, out: &mut DstOut) -> Result<(), (AbortReason, Detail)> {
        let total = self.geo.total_bytes;
        if total > self.budget {
            return Err((AbortReason::PinBudget, Detail::PinAllOverBudget));
        }
        self.registered_bytes = total;
        out.stats.max_registered_bytes = total;
        for (b, bg) in self.geo.blocks.iter().enumerate() {
            let lb = self.local[b];
            out.cmds.push(DstCommand::Register {
                target: RegTarget::Block(lb),
                block: lb,
                offset: 0,
                len: bg.length,
            });
        }
        Ok(())
    }

    /// A registration request is being answered (PREPARE must not overtake it).
    pub(super) fn registration_busy(&self) -> bool {
        !self.reg_queue.is_empty()
    }

    /// REG_REQUEST and UNREG_REQUEST after the final round: registrations name only chunks
    /// of the state area; evictions may free any chunk (spec: STATE-2).
    pub(super) fn on_tail_registration(
        &mut self,
        m: Message,
        out: &mut DstOut,
    ) -> Result<Next, (AbortReason, Detail)> {
        match m {
            Message::RegRequest { req_id, chunks } => {
                let state = self.geo.state_block();
                if chunks.iter().any(|c| Some(c.block as usize) != state) {
                    return Err((AbortReason::ProtocolViolation, Detail::RegOutsideStateArea));
                }
                self.on_reg_request(req_id, chunks, out)
            }
            Message::UnregRequest { req_id, chunks } => self.on_unreg_request(req_id, chunks, out),
            _ => Err((AbortReason::ProtocolViolation, Detail::WrongPhase)),
        }
    }

    /// `target` is being registered at this machine's request.
    pub(super) fn registering(&self, target: RegTarget) -> bool {
        match target {
            RegTarget::Block(lb) => {
                self.local
                    .iter()
                    .position(|&l| l == lb)
                    .is_some_and(|b| self.block_keys[b].is_none())
                    && self.params.mode == wire::RegMode::PinAll
            }
            RegTarget::Chunk(lc) => self.reg_started && self.wire_chunk(lc).is_some(),
        }
    }

    /// The wire chunk of local chunk `lc` if it is in the request being registered.
    fn wire_chunk(&self, lc: ChunkRef) -> Option<ChunkRef> {
        let b = self.local.iter().position(|&l| l == lc.block)?;
        let wc = ChunkRef {
            block: b as u16,
            chunk: lc.chunk,
        };
        let (_, chunks) = self.reg_queue.front()?;
        (self.geo.valid_chunk(wc) && chunks.contains(&wc)).then_some(wc)
    }

    /// A whole block is registered (pin-all); once all are, BLOCK_TABLE_ACK carries the keys.
    pub(super) fn on_block_registered(
        &mut self,
        target: RegTarget,
        rkey: u32,
    ) -> Result<Option<Message>, Detail> {
        let RegTarget::Block(lb) = target else {
            return Err(Detail::UnknownRegistration);
        };
        let Some(b) = self.local.iter().position(|&l| l == lb) else {
            return Err(Detail::UnknownRegistration);
        };
        if self.block_keys[b].replace(rkey).is_some() {
            return Err(Detail::UnknownRegistration);
        }
        let rkeys: Option<Vec<u32>> = self.block_keys.iter().copied().collect();
        Ok(rkeys.map(|rkeys| Message::BlockTableAck { rkeys }))
    }

    /// A chunk of the current request is registered; once all are, REG_RESULT answers it and
    /// the next request's registration starts (spec: REG-2).
    pub(super) fn on_chunk_registered(
        &mut self,
        target: RegTarget,
        rkey: u32,
        out: &mut DstOut,
    ) -> Result<Option<Message>, Detail> {
        let RegTarget::Chunk(lc) = target else {
            return Err(Detail::UnknownRegistration);
        };
        if !self.reg_started {
            return Err(Detail::UnknownRegistration);
        }
        let Some(wc) = self.wire_chunk(lc) else {
            return Err(Detail::UnknownRegistration);
        };
        let g = self.geo.global(wc) as usize;
        if self.chunks[g] != ChunkSt::Pending {
            return Err(Detail::UnknownRegistration);
        }
        self.chunks[g] = ChunkSt::Registered(rkey);
        let (_, chunks) = self
            .reg_queue
            .front()
            .expect("wire_chunk found the request");
        let key = |c: &ChunkRef| match self.chunks[self.geo.global(*c) as usize] {
            ChunkSt::Registered(k) => Some(k),
            _ => None,
        };
        let Some(rkeys) = chunks.iter().map(key).collect::<Option<Vec<u32>>>() else {
            return Ok(None);
        };
        let (req_id, _) = self.reg_queue.pop_front().expect("front exists");
        self.reg_started = false;
        self.start_next_registration(out);
        Ok(Some(Message::RegResult { req_id, rkeys }))
    }

    pub(super) fn on_round_message(
        &mut self,
        m: Message,
        out: &mut DstOut,
    ) -> Result<Next, (AbortReason, Detail)> {
        let violation = |d| Err((AbortReason::ProtocolViolation, d));
        match m {
            Message::RegRequest { req_id, chunks } => {
                // spec: STATE-2: the state area is written only after the final round.
                if chunks
                    .iter()
                    .any(|c| c.block as usize >= self.geo.ram_blocks)
                {
                    return violation(Detail::RegChunkRange);
                }
                self.on_reg_request(req_id, chunks, out)
            }
            Message::UnregRequest { req_id, chunks } => self.on_unreg_request(req_id, chunks, out),
            Message::Zero { round, ranges } => self.on_zero(round, ranges, out),
            Message::RoundEnd { round, last, .. } => {
                if round != self.round {
                    return violation(Detail::RoundEndMismatch); // spec: RND-4
                }
                if !self.reg_queue.is_empty() {
                    return violation(Detail::RoundEndBusy); // spec: RND-2
                }
                if !last {
                    self.round += 1;
                }
                Ok(Next::RoundEnd { round, last })
            }
            _ => violation(Detail::WrongPhase),
        }
    }

    fn on_reg_request(
        &mut self,
        req_id: u32,
        chunks: Vec<ChunkRef>,
        out: &mut DstOut,
    ) -> Result<Next, (AbortReason, Detail)> {
        let violation = |d| Err((AbortReason::ProtocolViolation, d));
        if self.params.mode != wire::RegMode::Dynamic {
            return violation(Detail::RegInPinAll);
        }
        if req_id != self.next_reg_id {
            return violation(Detail::RegIdSequence); // spec: REG-9
        }
        if self.reg_queue.len() >= self.params.max_reg_inflight as usize {
            return violation(Detail::RegInflight); // spec: REG-2
        }
        let mut bytes = 0u64;
        let mut seen = BTreeSet::new();
        for &c in &chunks {
            // spec: REG-3
            if !self.geo.valid_chunk(c) {
                return violation(Detail::RegChunkRange);
            }
            let g = self.geo.global(c);
            if self.chunks[g as usize] != ChunkSt::Unreg || !seen.insert(g) {
                return violation(Detail::RegChunkTaken);
            }
            bytes += self.geo.chunk_span(c).1;
        }
        #[cfg(feature = "mutations")]
        let over = self.registered_bytes + bytes > self.budget && !self.mutations.skip_pin_budget;
        #[cfg(not(feature = "mutations"))]
        let over = self.registered_bytes + bytes > self.budget;
        if over {
            return Err((AbortReason::PinBudget, Detail::OverBudget)); // spec: REG-4
        }
        for g in seen {
            self.chunks[g as usize] = ChunkSt::Pending;
        }
        self.registered_bytes += bytes;
        out.stats.max_registered_bytes = out.stats.max_registered_bytes.max(self.registered_bytes);
        out.stats.reg_chunks += chunks.len() as u64;
        self.next_reg_id += 1;
        self.reg_queue.push_back((req_id, chunks));
        self.start_next_registration(out);
        Ok(Next::Stay)
    }

    fn start_next_registration(&mut self, out: &mut DstOut) {
        if self.reg_started {
            return;
        }
        let Some((_, chunks)) = self.reg_queue.front() else {
            return;
        };
        for &c in chunks {
            let (offset, len) = self.geo.chunk_span(c);
            let lb = self.local[c.block as usize];
            out.cmds.push(DstCommand::Register {
                target: RegTarget::Chunk(ChunkRef {
                    block: lb,
                    chunk: c.chunk,
                }),
                block: lb,
                offset,
                len,
            });
        }
        self.reg_started = true;
    }

    fn on_unreg_request(
        &mut self,
        req_id: u32,
        chunks: Vec<ChunkRef>,
        out: &mut DstOut,
    ) -> Result<Next, (AbortReason, Detail)> {
        let violation = |d| Err((AbortReason::ProtocolViolation, d));
        if self.params.mode != wire::RegMode::Dynamic {
            return violation(Detail::UnregInPinAll);
        }
        if req_id != self.next_unreg_id {
            return violation(Detail::UnregIdSequence); // spec: REG-9
        }
        let mut seen = BTreeSet::new();
        for &c in &chunks {
            // spec: REG-7
            if !self.geo.valid_chunk(c) || !seen.insert(c) {
                return violation(Detail::UnregChunkRange);
            }
            if !matches!(
                self.chunks[self.geo.global(c) as usize],
                ChunkSt::Registered(_)
            ) {
                return violation(Detail::UnregNotRegistered);
            }
        }
        for &c in &chunks {
            let g = self.geo.global(c) as usize;
            let ChunkSt::Registered(rkey) = self.chunks[g] else {
                unreachable!("checked above");
            };
            self.chunks[g] = ChunkSt::Unreg;
            self.registered_bytes -= self.geo.chunk_span(c).1;
            let lc = ChunkRef {
                block: self.local[c.block as usize],
                chunk: c.chunk,
            };
            out.cmds.push(DstCommand::Unregister {
                target: RegTarget::Chunk(lc),
                rkey,
            });
        }
        out.stats.unreg_chunks += chunks.len() as u64;
        self.next_unreg_id += 1;
        Ok(Next::Reply(Message::UnregDone {
            req_id,
            count: chunks.len() as u16,
        }))
    }

    fn on_zero(
        &mut self,
        round: u32,
        ranges: Vec<PageRange>,
        out: &mut DstOut,
    ) -> Result<Next, (AbortReason, Detail)> {
        let violation = |d| Err((AbortReason::ProtocolViolation, d));
        if self.params.flags & wire::flag::ZERO_ELISION == 0 {
            return violation(Detail::ZeroNotNegotiated); // spec: HS-3
        }
        if round != self.round {
            return violation(Detail::ZeroRound); // spec: RND-4
        }
        // spec: DATA-3: check every range before acting on any.
        #[cfg(feature = "mutations")]
        let ranges_to_check: &[PageRange] = if self.mutations.skip_zero_range_check {
            &[]
        } else {
            &ranges
        };
        #[cfg(not(feature = "mutations"))]
        let ranges_to_check: &[PageRange] = &ranges;
        for r in ranges_to_check {
            // spec: STATE-2: no ZERO names the state area.
            let ok = self.geo.blocks[..self.geo.ram_blocks]
                .get(r.block as usize)
                .is_some_and(|b| r.first_page as u64 + r.page_count as u64 <= b.pages);
            if !ok {
                return violation(Detail::ZeroRange);
            }
        }
        for r in ranges {
            let Some(b) = self.geo.blocks.get(r.block as usize) else {
                continue; // only a mutation lets an unknown block this far
            };
            let page_log2 = b.page_log2;
            out.stats.zero_pages += r.page_count as u64;
            out.cmds.push(DstCommand::ZeroFill {
                block: self.local[r.block as usize],
                offset: (r.first_page as u64) << page_log2,
                len: (r.page_count as u64) << page_log2,
            });
        }
        Ok(Next::Stay)
    }

    /// Revokes every registration (on abort, and before the start: spec: SW-8).
    pub(super) fn unregister_all(&mut self, out: &mut DstOut) {
        for (b, k) in self.block_keys.iter_mut().enumerate() {
            if let Some(rkey) = k.take() {
                out.cmds.push(DstCommand::Unregister {
                    target: RegTarget::Block(self.local[b]),
                    rkey,
                });
            }
        }
        for (g, st) in self.chunks.iter_mut().enumerate() {
            if let ChunkSt::Registered(rkey) = *st {
                let c = self.geo.chunk_of_global(g as u32);
                out.cmds.push(DstCommand::Unregister {
                    target: RegTarget::Chunk(ChunkRef {
                        block: self.local[c.block as usize],
                        chunk: c.chunk,
                    }),
                    rkey,
                });
            }
            *st = ChunkSt::Unreg;
        }
        self.reg_queue.clear();
        self.reg_started = false;
        self.registered_bytes = 0;
    }

    /// Local digests (local chunk order) equal the received ones (wire chunk order).
    pub(super) fn digests_match(&self, local: &[u64], received: &[u64]) -> bool {
        self.geo.blocks[..self.geo.ram_blocks]
            .iter()
            .enumerate()
            .all(|(b, bg)| {
                let lf = self.local_first[self.local[b] as usize] as usize;
                let wf = bg.first_chunk as usize;
                let n = bg.chunks as usize;
                local.get(lf..lf + n) == received.get(wf..wf + n)
            })
    }
}

/// The switchover's tail: device state and digests received so far (spec: SW-3, SW-4,
/// STATE-3), then what verification has confirmed (STATE-4, STATE-5).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(super) struct Tail {
    state_total: Option<u32>,
    state_received: u32,
    /// The state area's placed prefix, from STATE_PLACED.
    state_placed: u64,
    pub(super) digests: Vec<u64>,
    /// PREPARE's digest of the device state.
    pub(super) state_digest: u64,
    pub(super) digests_ok: bool,
    pub(super) state_loaded: bool,
}

impl Tail {
    pub(super) fn on_message(
        &mut self,
        s: &Session,
        m: Message,
        out: &mut DstOut,
    ) -> Result<(), Detail> {
        let area = s.geo.state_block().map(|b| s.geo.blocks[b].length);
        match m {
            Message::DeviceState {
                offset,
                total_len,
                data,
            } => {
                // spec: SW-3; STATE-1: with a state area the device state uses it alone.
                if area.is_some() {
                    return Err(Detail::StateOnControl);
                }
                if *self.state_total.get_or_insert(total_len) != total_len {
                    return Err(Detail::StateTotalChanged);
                }
                if offset != self.state_received {
                    return Err(Detail::StateGap);
                }
                self.state_received += data.len() as u32;
                out.stats.state_bytes = self.state_received as u64;
                out.cmds.push(DstCommand::StoreDeviceState { offset, data });
                Ok(())
            }
            Message::StatePlaced { placed } => {
                // spec: STATE-3: a prefix of the area that only grows.
                let Some(area) = area else {
                    return Err(Detail::NoStateArea);
                };
                if placed <= self.state_placed || placed > area {
                    return Err(Detail::StatePlacedOrder);
                }
                self.state_placed = placed;
                out.stats.state_bytes = placed;
                out.cmds.push(DstCommand::FeedState { upto: placed });
                Ok(())
            }
            Message::Digests {
                first_chunk,
                digests,
            } => {
                // spec: SW-4
                let total = s.geo.ram_chunks as usize;
                if s.params.digest == DigestAlg::None
                    || first_chunk as usize != self.digests.len()
                    || self.digests.len() + digests.len() > total
                {
                    return Err(Detail::DigestOrder);
                }
                self.digests.extend_from_slice(&digests);
                Ok(())
            }
            _ => Err(Detail::WrongPhase),
        }
    }

    /// PREPARE's counts equal what arrived (spec: SW-5, STATE-3).
    pub(super) fn counts_match(&self, s: &Session, state_len: u64, digest_count: u32) -> bool {
        let verify = s.params.digest != DigestAlg::None;
        let want_digests = if verify { s.geo.ram_chunks } else { 0 };
        let state = match s.geo.state_block() {
            Some(_) => state_len == self.state_placed,
            None => {
                state_len == self.state_received as u64
                    && self.state_total.unwrap_or(0) as u64 == state_len
            }
        };
        state && digest_count == want_digests && self.digests.len() as u32 == digest_count
    }
}
