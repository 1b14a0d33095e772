//! Data channels: writes posted, placed by the destination NIC, completed.

use super::*;

impl Sim {
    /// The source posts a write: checked against what was negotiated and declared, then
    /// timed through the three stages it occupies (the sending core or WQE engine, the link,
    /// and for TCP the receiving core) and queued for placement.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post_write(
        &mut self,
        ch: usize,
        wr_id: u64,
        block: u16,
        offset: u64,
        len: u64,
        rkey: u32,
        remote_offset: u64,
    ) -> R {
        self.check_write(ch, block, offset, len)?;
        self.stats.writes_posted += 1;
        self.stats.data_posted_bytes += len;
        self.trace.rec(self.now, Tag::WritePosted, ch as u64, wr_id);
        self.stats.cpu[SRC].requests_ns += self.costs.wr_ns;
        // The state area's writes follow the final round and belong to no round.
        let round = if self.is_state_block(block) {
            NO_ROUND
        } else {
            self.stats.rounds.len().saturating_sub(1)
        };
        if !self.chans[ch].alive {
            // A broken queue pair flushes new requests with an error.
            self.push_cqe(
                ch,
                Cqe {
                    at: self.now + self.costs.latency_ns,
                    wr_id,
                    ok: false,
                },
            );
            return Ok(());
        }
        let (s1, produced) = self.occupy_sender(ch, len);
        // The stages pipeline: the link may start once the request is processed and cannot
        // finish before the sender has produced the last byte.
        let l_start = self.occupy_link(round, s1 + self.costs.wr_ns, len);
        let sent = self.link_free.max(produced);
        let place = if self.costs.rdma {
            sent + self.costs.latency_ns
        } else {
            let untouched = self.untouched_bytes(block, offset, len);
            self.occupy_receiver(ch, len, untouched, l_start, sent)
        };
        self.queue_placement(
            ch,
            Wr {
                wr_id,
                block,
                offset,
                len,
                rkey,
                remote_offset,
                place_at: place,
                round,
            },
        );
        Ok(())
    }

    /// Source block `block` is the state buffer, after the RAM blocks (spec: STATE-2).
    fn is_state_block(&self, block: u16) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.src_block == block as usize)
    }

    /// Pages of source block `b`: RAM, or the state buffer as far as the area reaches.
    fn src_block_pages(&self, b: usize) -> Option<u64> {
        match (self.guest.mem.get(b), &self.state) {
            (Some(m), _) => Some(m.len() as u64),
            (None, Some(s)) if s.src_block == b => Some(s.pages().min(s.buf.len() as u64)),
            _ => None,
        }
    }

    /// A write on a channel that was negotiated and admitted, of whole pages within a source
    /// block.
    fn check_write(&self, ch: usize, block: u16, offset: u64, len: u64) -> R {
        let negotiated = self.src.params().channels as usize;
        let b = block as usize;
        let page_log2 = self.src_page_log2(b);
        let mask = (1u64 << page_log2) - 1;
        if ch >= negotiated || ch >= self.chans.len() {
            return Err(self.fail(
                "DATA-1",
                format!("write on channel {ch}, but {negotiated} were negotiated"),
            ));
        }
        if !self.chans[ch].joined {
            return Err(self.fail(
                "AUTH-6",
                format!("write on channel {ch}, which the destination never admitted"),
            ));
        }
        let pages = self.src_block_pages(b);
        if pages.is_none_or(|n| (offset + len) >> page_log2 > n)
            || len == 0
            || offset & mask != 0
            || len & mask != 0
        {
            return Err(self.fail(
                "DATA-1",
                format!("write of source block {block} [{offset}, +{len}) outside the block"),
            ));
        }
        Ok(())
    }

    /// CPU time `t` as one channel sees it: channels beyond the cores share them.
    fn core_share(&self, t: u64) -> u64 {
        let nch = self.chans.len() as u64;
        t * nch.max(self.costs.cores) / self.costs.cores
    }

    /// The sending stage (NIC WQE engine, or the sending core) takes the write when it is
    /// free. Returns when it took it, and when it has produced all of it (the link cannot
    /// finish sending before then).
    fn occupy_sender(&mut self, ch: usize, len: u64) -> (u64, u64) {
        let mut per_byte = self.costs.send_fs_per_byte;
        if self.cfg.guest.hash_scan && !self.costs.rdma {
            // The TCP binding sends a hashing log's writes from a private copy it hashes
            // (spec: SCAN-2): the same read-and-hash work as a scan, per byte sent.
            per_byte += self.costs.scan_fs_per_byte;
        }
        let send_cpu = self.core_share(ns(len, per_byte));
        let wr_ns = self.costs.wr_ns;
        let chan = &mut self.chans[ch];
        let s1 = self.now.max(chan.send_free);
        let produced = s1 + wr_ns + send_cpu;
        chan.send_free = produced;
        self.stats.cpu[SRC].transport_ns += send_cpu;
        (s1, produced)
    }

    /// The link: one FIFO for all channels in this direction. The write starts on it at
    /// `ready` or when it frees up, whichever is later; returns that start. An idle stretch
    /// within a round (after its first write) is charged to the current cause.
    fn occupy_link(&mut self, round: usize, ready: u64, len: u64) -> u64 {
        let wire_ns = self.costs.wire_ns(len);
        let l_start = ready.max(self.link_free);
        if let Some(r) = self.stats.rounds.get_mut(round) {
            if l_start > self.link_free && r.first_post_ns.is_some_and(|f| self.link_free >= f) {
                let gap = l_start - self.link_free;
                self.stats.idle_gap_ns[self.cause as usize] += gap;
                r.gap_ns[self.cause as usize] += gap;
            }
        }
        self.link_free = l_start + wire_ns;
        self.stats.link_busy_ns += wire_ns;
        let wire_bytes = self.costs.wire_bytes(len);
        if round == NO_ROUND {
            self.stats.state_wire_bytes += wire_bytes;
        } else {
            self.stats.data_wire_bytes += wire_bytes;
        }
        if let Some(r) = self.stats.rounds.get_mut(round) {
            r.first_post_ns.get_or_insert(self.now);
            r.wire_ns += wire_ns;
            r.header_ns += ns(wire_bytes - len, self.costs.link_fs_per_byte);
        }
        l_start
    }

    /// Bytes of the destination pages a write of source `block` lands on that were never
    /// touched (each costs a fault when first written).
    fn untouched_bytes(&self, block: u16, offset: u64, len: u64) -> u64 {
        if self.cfg.guest.dst_pretouched {
            return 0;
        }
        let page_log2 = self.src_page_log2(block as usize);
        let d = self.dst_of_src[block as usize] as usize;
        let n = len >> page_log2;
        (n - self.touched[d].count_range(offset >> page_log2, n)) << page_log2
    }

    /// TCP: the receiving core copies into memory, faulting in untouched pages. It starts
    /// when the first bytes arrive (one latency after `l_start`) and it is free, and cannot
    /// finish before the last bytes arrive (one latency after `sent`). Returns when the write
    /// is placed.
    fn occupy_receiver(
        &mut self,
        ch: usize,
        len: u64,
        untouched: u64,
        l_start: u64,
        sent: u64,
    ) -> u64 {
        let c = &self.costs;
        // A TCP destination verifying with the page tree hashes pages as they land.
        let hashing =
            !c.rdma && self.src.params().digest == rdmig_model::wire::DigestAlg::Xxh3PageTree;
        let per_byte = c.recv_fs_per_byte + if hashing { c.digest_fs_per_byte } else { 0 };
        let recv_cpu = self.core_share(ns(len, per_byte) + c.recv_write_ns)
            + ns(untouched, c.touch_fs_per_byte);
        let latency_ns = c.latency_ns;
        self.stats.cpu[DST].transport_ns += recv_cpu;
        let chan = &mut self.chans[ch];
        let s3 = (l_start + latency_ns).max(chan.recv_free);
        let done = (s3 + recv_cpu).max(sent + latency_ns);
        chan.recv_free = done;
        done
    }

    /// Queues `w` for placement on `ch`, no earlier than the write before it (a queue pair
    /// places in order), and arms the channel's placement event if none is pending.
    fn queue_placement(&mut self, ch: usize, mut w: Wr) {
        let chan = &mut self.chans[ch];
        w.place_at = w.place_at.max(chan.last_place);
        chan.last_place = w.place_at;
        let place = w.place_at;
        chan.inflight.push_back(w);
        if chan.place_at.is_none() {
            chan.place_at = Some(place);
            self.push(place, Ev::Place(ch, place));
        }
    }

    pub(super) fn place(&mut self, ch: usize) -> R {
        // A silent channel places nothing until it heals (and never, if for good).
        let silent_until = self.chans[ch].silence.until;
        if silent_until > self.now {
            if silent_until != u64::MAX {
                self.chans[ch].place_at = Some(silent_until);
                self.push(silent_until, Ev::Place(ch, silent_until));
            }
            return Ok(());
        }
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
    pub(super) fn land(&mut self, ch: usize, w: Wr) -> R {
        let placed = if self.crashed[DST] {
            Err(Refusal::UnknownKey)
        } else {
            self.nic.place(w.rkey, w.remote_offset, w.len)
        };
        let ok = match placed {
            Err(Refusal::UnknownKey) => {
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
            Err(Refusal::OutOfBounds) => {
                return Err(self.fail(
                    "INV-REG-1",
                    format!(
                        "write wr{} [{}, +{}) beyond its registration",
                        w.wr_id, w.remote_offset, w.len
                    ),
                ));
            }
            Ok((block, at)) => {
                let page_log2 = self.src_page_log2(w.block as usize);
                let want = self.dst_of_src[w.block as usize];
                if block != want || at != w.offset {
                    return Err(self.fail(
                        "INV-MEM-1",
                        format!(
                            "write of source block {} offset {} lands at destination block {} offset {} (expected block {want})",
                            w.block, w.offset, block, at
                        ),
                    ));
                }
                let (p0, n) = (
                    (w.offset >> page_log2) as usize,
                    (w.len >> page_log2) as usize,
                );
                let q0 = (at >> page_log2) as usize;
                let lb = block as usize;
                // The data path reads source memory now, not when the page was scanned (nor,
                // for the state buffer, when the VMM reported it produced).
                match &self.state {
                    Some(s) if s.src_block == w.block as usize => {
                        self.dmem[lb][q0..q0 + n].copy_from_slice(&s.buf[p0..p0 + n]);
                        self.stats.state_placed_bytes += w.len;
                        let by_ch = &mut self.stats.state_placed_by_channel;
                        if by_ch.len() <= ch {
                            by_ch.resize(ch + 1, 0);
                        }
                        by_ch[ch] += w.len;
                    }
                    _ => {
                        self.dmem[lb][q0..q0 + n]
                            .copy_from_slice(&self.guest.mem[w.block as usize][p0..p0 + n]);
                        self.guest.sent(w.block as usize, p0, n);
                        self.stats.data_placed_bytes += w.len;
                    }
                }
                self.touched[lb].set_range(q0 as u64, n as u64);
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

    pub(super) fn push_cqe(&mut self, ch: usize, mut e: Cqe) {
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
    pub(super) fn completion_delay(&mut self) -> u64 {
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
    pub(super) fn poll(&mut self, ch: usize) -> R {
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
                SrcInput::WriteDone { wr_id: e.wr_id }
            } else {
                SrcInput::WriteFailed { wr_id: e.wr_id }
            };
            self.feed_src(input)?;
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
    // Opening and closing channels (spec: AUTH-6)

    /// The source opens data channel `ch`: the connection and its DATA_HELLO reach the
    /// listener one latency later (never, over a channel silent for good).
    pub(super) fn open_data(&mut self, hello: DataHello) -> R {
        let ch = hello.channel as usize;
        if ch >= self.chans.len() {
            return Err(self.fail(
                "AUTH-6",
                format!("the source opened channel {ch} of {}", self.chans.len()),
            ));
        }
        if !self.chans[ch].alive {
            self.push(self.now + self.costs.latency_ns, Ev::DetectData(SRC, ch));
            return Ok(());
        }
        let at = (self.now + self.costs.latency_ns).max(self.chans[ch].silence.until);
        if at == u64::MAX {
            return Ok(());
        }
        let conn = data_conn(ch);
        // A data connection never becomes a session, so its nonce is never used.
        let nonce = [0u8; wire::NONCE_LEN];
        self.push(
            at,
            Ev::Lsn(Box::new(LsnInput::Accepted {
                conn,
                nonce,
                binding: None,
            })),
        );
        self.push(
            at,
            Ev::Lsn(Box::new(LsnInput::DataHello {
                conn,
                hello: Ok(hello),
            })),
        );
        Ok(())
    }

    /// The listener admitted `conn` as channel `ch`; the source learns it one latency later.
    pub(super) fn admitted(&mut self, conn: ConnId, ch: usize) -> R {
        if ch >= self.chans.len() || conn != data_conn(ch) || self.chans[ch].joined {
            return Err(self.fail(
                "AUTH-6",
                format!("the destination admitted connection {conn} as channel {ch}"),
            ));
        }
        self.chans[ch].joined = true;
        let at = (self.now + self.costs.latency_ns).max(self.chans[ch].silence.until);
        if at != u64::MAX {
            self.push(
                at,
                Ev::Src(Box::new(SrcInput::DataOpened { channel: ch as u8 })),
            );
        }
        Ok(())
    }

    /// The listener closed `conn`: its peer learns it after what was sent before.
    pub(super) fn close_conn(&mut self, conn: ConnId) {
        if conn == CTRL_CONN {
            // The close follows the last frame on the connection (a FIN after the data).
            let after = self.ctrl_ready(SRC, self.ctrl[DST].last_arrive.max(self.now));
            self.ctrl_closed_at = Some(after);
            if after != u64::MAX {
                self.push(after + 1, Ev::Detect(SRC));
            }
        } else if let Some(ch) = (0..self.chans.len()).find(|&ch| data_conn(ch) == conn) {
            // The destination closes its data connections after the control connection, so
            // the source reads the outcome (ABORT, STARTED) before it sees them go.
            let after_ctrl = self.ctrl_closed_at.map_or(0, |t| t.saturating_add(2));
            let at = (self.now + self.costs.latency_ns)
                .max(after_ctrl)
                .max(self.chans[ch].silence.until);
            if at != u64::MAX {
                self.push(at, Ev::DetectData(SRC, ch));
            }
        } else {
            self.strays.retain(|&c| c != conn);
        }
    }
}
