//! Feeding the machines and carrying out their commands.

use super::*;

impl Sim {
    // -----------------------------------------------------------------------------------------
    // Feeding the machines

    /// Hands one input to the source and carries out every command it returns, in order.
    pub(super) fn feed_src(&mut self, input: SrcInput) -> R {
        self.trace
            .rec(self.now, Tag::Input, SRC as u64, src_input_kind(&input));
        if self.crashed[SRC] {
            return Ok(());
        }
        self.cause = match &input {
            SrcInput::Frame(f) => match f.msg {
                Message::RegResult { .. } => Cause::Registration,
                Message::UnregDone { .. } => Cause::Eviction,
                _ => Cause::Other,
            },
            SrcInput::WriteDone { .. } | SrcInput::WriteFailed { .. } => Cause::Completion,
            SrcInput::Dirty(_) => Cause::RoundStart,
            _ => Cause::Other,
        };
        if let SrcInput::Frame(f) = &input {
            if f.msg == Message::Started {
                self.started_received = true;
            }
        }
        let round_ack =
            matches!(&input, SrcInput::Frame(f) if matches!(f.msg, Message::RoundAck { .. }));
        let table_ack =
            matches!(&input, SrcInput::Frame(f) if matches!(f.msg, Message::BlockTableAck { .. }));
        let now_ms = self.now / NS_PER_MS;
        let mut out = SrcOut {
            cmds: Vec::new(),
            stats: std::mem::take(&mut self.src_stats),
        };
        let (before, round_before) = (self.src.phase(), self.src.round());
        self.src.handle(now_ms, input, &mut out);
        self.src_stats = std::mem::take(&mut out.stats);
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
        if self.src.phase() != before {
            if self.src.phase() == SrcPhase::Finalizing {
                self.stats.final_ack_ns = Some(self.now);
            }
            self.stats
                .phases
                .push((self.now, SRC, format!("{:?}", self.src.phase())));
        }
        for c in out.cmds {
            self.exec_src(c)?;
        }
        self.arm_timers(SRC);
        Ok(())
    }

    /// Hands one input to the listening destination and carries out its commands.
    pub(super) fn feed_lsn(&mut self, input: LsnInput) -> R {
        self.trace
            .rec(self.now, Tag::Input, DST as u64, lsn_input_kind(&input));
        if self.crashed[DST] {
            return Ok(());
        }
        let now_ms = self.now / NS_PER_MS;
        let mut out = LsnOut {
            cmds: Vec::new(),
            stats: std::mem::take(&mut self.dst_stats),
        };
        let before = self.lsn.session().map(|d| d.phase());
        self.lsn.handle(now_ms, input, &mut out);
        self.dst_stats = std::mem::take(&mut out.stats);
        let after = self.lsn.session().map(|d| d.phase());
        if after != before {
            if let Some(p) = after {
                self.stats.phases.push((self.now, DST, format!("{p:?}")));
            }
        }
        for c in out.cmds {
            self.exec_lsn(c)?;
        }
        self.arm_timers(DST);
        Ok(())
    }

    /// A driver answer for the destination's session.
    pub(super) fn feed_dst(&mut self, input: DstInput) -> R {
        self.feed_lsn(LsnInput::Local(input))
    }

    /// Carries out one source command in the simulated world: one arm per command, each
    /// short; its length is the number of commands.
    fn exec_src(&mut self, cmd: SrcCommand) -> R {
        match cmd {
            SrcCommand::Send(f) => {
                if f.msg == Message::Commit && !self.relinquished {
                    return Err(self.fail(
                        "SW-6",
                        "COMMIT left before the source relinquished its workload".into(),
                    ));
                }
                if let Message::Zero { ranges, .. } = &f.msg {
                    for r in ranges {
                        self.guest.zeroed(
                            r.block as usize,
                            r.first_page as u64,
                            r.page_count as u64,
                        );
                    }
                }
                self.send_frame(SRC, f)
            }
            SrcCommand::OpenData { hello } => self.open_data(hello),
            SrcCommand::PostWrite(w) => self.post_write(
                w.channel as usize,
                w.wr_id,
                w.block,
                w.offset,
                w.len,
                w.rkey,
                w.remote_offset,
            ),
            SrcCommand::ScanDirty { all } => {
                self.advance_guest();
                let scan = self.guest.scan(all);
                let page_log2 = self.guest.page_log2();
                let dirty: u64 = scan.dirty.iter().map(|d| d.count_ones()).sum();
                let zero: u64 = scan.zero.iter().map(|z| z.count_ones()).sum();
                self.stats.last_scan_dirty_bytes = (dirty - zero) << page_log2;
                // Zero pages are compared in full; a non-zero page differs within its first
                // cache lines (counted as 256 bytes).
                let compared = (zero << page_log2) + (dirty - zero) * 256;
                let mut t = 50_000 + ns(compared, self.costs.zero_check_fs_per_byte);
                if self.cfg.guest.hash_scan && !all {
                    // Content hashing reads every page, whatever changed; once the workload is
                    // paused its cores are the scan's too. A scan of every page reports
                    // without hashing (the transport hashes what it sends).
                    let per_byte = match self.stats.paused_ns {
                        Some(_) => self.costs.paused_scan_fs_per_byte,
                        None => self.costs.scan_fs_per_byte,
                    };
                    t += ns(self.cfg.guest.ram_bytes, per_byte);
                }
                self.stats.cpu[SRC].scan_ns += t;
                self.trace.rec(self.now, Tag::Scan, all as u64, dirty);
                self.push(self.now + t, Ev::Src(Box::new(SrcInput::Dirty(scan))));
                Ok(())
            }
            SrcCommand::PauseWorkload => {
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
            SrcCommand::ResumeWorkload => {
                // spec: SW-6, INV-OWN-1
                if self.commit_sent {
                    return Err(self.fail(
                        "SW-6",
                        "the source resumed its workload after sending COMMIT".into(),
                    ));
                }
                self.resume_source();
                Ok(())
            }
            SrcCommand::RelinquishWorkload => {
                self.relinquished = true;
                Ok(())
            }
            SrcCommand::CaptureDeviceState { area } if area > 0 || self.state.is_some() => {
                self.capture_state(area)
            }
            SrcCommand::CaptureDeviceState { .. } => {
                self.trace.rec(
                    self.now,
                    Tag::DeviceState,
                    self.device_state.len() as u64,
                    0,
                );
                let blob = self.device_state.clone();
                self.push(
                    self.now + self.cfg.guest.capture_ns,
                    Ev::Src(Box::new(SrcInput::DeviceState(blob))),
                );
                Ok(())
            }
            SrcCommand::ComputeDigests => {
                let p = self.src.params();
                let d = digests(
                    &self.guest.mem,
                    p.digest,
                    self.guest.page_log2(),
                    p.chunk_log2,
                    &mut self.scratch,
                );
                let t = self.digest_time(SRC);
                self.trace.rec(self.now, Tag::Digests, SRC as u64, 0);
                self.push(self.now + t, Ev::Src(Box::new(SrcInput::Digests(d))));
                Ok(())
            }
            SrcCommand::Finish(o) => self.finish(SRC, o),
        }
    }

    /// The source workload runs again (its own resume, or its guard's).
    pub(super) fn resume_source(&mut self) {
        self.pause_pending = false;
        if !self.src_running {
            self.guest_since = self.now;
        }
        self.src_running = true;
        self.trace.rec(self.now, Tag::Resumed, 0, 0);
        self.ensure_tick();
    }

    fn exec_lsn(&mut self, cmd: LsnCommand) -> R {
        match cmd {
            LsnCommand::Send { conn, frame } => {
                if conn == CTRL_CONN {
                    self.send_frame(DST, frame)
                } else {
                    Ok(()) // a stray ignores what it is sent
                }
            }
            LsnCommand::Close { conn } => {
                self.close_conn(conn);
                Ok(())
            }
            LsnCommand::Admit { conn, channel } => self.admitted(conn, channel as usize),
            LsnCommand::Session(c) => self.exec_dst(c),
            LsnCommand::Finish(o) => self.finish(DST, o),
        }
    }

    fn exec_dst(&mut self, cmd: DstCommand) -> R {
        match cmd {
            DstCommand::Register {
                target,
                block,
                offset,
                len,
            } => self.register(target, block, offset, len),
            DstCommand::Unregister { rkey, .. } => {
                let Some(len) = self
                    .nic
                    .regs()
                    .find(|(k, _)| **k == rkey)
                    .map(|(_, m)| m.len)
                else {
                    return Err(self.fail(
                        "REG-7",
                        format!("the destination unregistered rkey {rkey:#x}, which its NIC does not hold"),
                    ));
                };
                self.nic.unregister(rkey);
                self.stats.unregistrations += 1;
                let t = ns(len, self.costs.dereg_fs_per_byte);
                self.occupy_reg_thread(t);
                self.stats.cpu[DST].registration_ns += t;
                self.trace.rec(self.now, Tag::Unregister, rkey as u64, 0);
                Ok(())
            }
            DstCommand::ZeroFill { block, offset, len } => {
                let (b, p0, n) = self.dst_range(block, offset, len, "ZeroFill")?;
                self.dmem[b][p0..p0 + n].fill(0);
                self.touched[b].set_range(p0 as u64, n as u64);
                self.stats.cpu[DST].zero_fill_ns += ns(len, self.costs.zero_fill_fs_per_byte);
                self.trace.rec(self.now, Tag::ZeroFill, block as u64, len);
                Ok(())
            }
            DstCommand::StoreDeviceState { offset, data } => {
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
            DstCommand::FeedState { upto } => self.feed_state(upto),
            DstCommand::FinishState { len } => self.finish_state(len),
            DstCommand::ComputeDigests => {
                let Some(p) = self.lsn.session().and_then(|d| d.params()) else {
                    return Err(self.fail("SW-5", "destination digests before negotiating".into()));
                };
                // RAM only: the state area has no chunk digests (spec: SW-4).
                let d = digests(
                    &self.dmem[..self.dst_ram_blocks()],
                    p.digest,
                    self.guest.page_log2(),
                    p.chunk_log2,
                    &mut self.scratch,
                );
                let t = self.digest_time(DST);
                self.trace.rec(self.now, Tag::Digests, DST as u64, 0);
                self.push(
                    self.now + t,
                    Ev::Lsn(Box::new(LsnInput::Local(DstInput::Digests(d)))),
                );
                Ok(())
            }
            DstCommand::StartWorkload => self.start_workload(),
            DstCommand::Send(_) | DstCommand::Finish(_) => Err(self.fail(
                "TABLE",
                "the listener passed on a session frame or outcome".into(),
            )),
        }
    }

    /// Time to digest memory at the end. With the page tree, what rdmig keeps current costs
    /// nothing here: the source's `scan` log already hashed every page of the paused memory,
    /// and the TCP destination hashed pages as they landed (charged to its receive path); an
    /// RDMA destination, and a source with a bitmap log, digest all memory.
    pub(super) fn digest_time(&mut self, side: usize) -> u64 {
        let tree = self.src.params().digest == rdmig_model::wire::DigestAlg::Xxh3PageTree;
        let kept = tree
            && if side == SRC {
                self.cfg.guest.hash_scan
            } else {
                !self.costs.rdma
            };
        if kept {
            return 0;
        }
        let cpu = ns(self.cfg.guest.ram_bytes, self.costs.digest_fs_per_byte);
        self.stats.cpu[side].digest_ns += cpu;
        cpu / self.costs.cores.max(1)
    }

    /// Checks a destination range and converts it to (local block, first page, pages).
    pub(super) fn dst_range(
        &self,
        block: u16,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<(usize, usize, usize), Failure> {
        let b = block as usize;
        let page_log2 = self.dst_page_log2(b);
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
}
