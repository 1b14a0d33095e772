//! Faults as they strike: lost and silent connections, crashes, cancels, stalls, stray
//! connections and a hostile peer.

use super::*;

/// What a stray connection to the listener does (spec: LIVE-4, LIVE-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stray {
    HalfOpen,
    Garbage,
    ReplayHello,
    BadDataHello,
    HelloThenClose,
}

const STRAYS: [Stray; 5] = [
    Stray::HalfOpen,
    Stray::Garbage,
    Stray::ReplayHello,
    Stray::BadDataHello,
    Stray::HelloThenClose,
];

impl Sim {
    pub(super) fn record_fault(&mut self, kind: FaultKind, detail: u64) {
        self.stats.faults.push((self.now, kind, detail));
        let idx = crate::faults::ALL_KINDS
            .iter()
            .position(|&k| k == kind)
            .expect("listed") as u64;
        self.trace.rec(self.now, Tag::Fault, idx, detail);
    }

    pub(super) fn fault_tick(&mut self) -> R {
        if !self.faults_active || self.finished() {
            return Ok(());
        }
        let f = self.cfg.faults.clone();
        if self.fault_rng.chance(f.conn_loss_ppm) {
            let n = self.src.params().channels as u64;
            let ch = self.fault_rng.below(n + 1);
            self.lose_channel(ch as usize);
        }
        if self.fault_rng.chance(f.silence_ppm) {
            let n = self.src.params().channels as u64;
            let link = self.fault_rng.below(n + 1) as usize;
            let forever = self.fault_rng.chance(f.silence_forever_ppm);
            let d = self.fault_rng.between(1, f.silence_max_ns.max(1));
            self.silence(link, if forever { u64::MAX } else { self.now + d });
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
                match side {
                    SRC => self.feed_src(SrcInput::Cancel)?,
                    _ => self.feed_lsn(LsnInput::Cancel)?,
                }
            }
        }
        if self.fault_rng.chance(f.slow_receiver_ppm) {
            let side = self.fault_rng.below(2) as usize;
            let d = self.fault_rng.between(1, f.stall_max_ns.max(1));
            self.stall_until[side] = self.stall_until[side].max(self.now + d);
            self.record_fault(FaultKind::SlowReceiver, d);
        }
        if !self.crashed[DST] && !self.done(DST) && self.fault_rng.chance(f.stray_ppm) {
            let k = STRAYS[self.fault_rng.below(STRAYS.len() as u64) as usize];
            self.stray(k)?;
        }
        if self.fault_rng.chance(f.hostile_ppm) {
            self.inject(f.hostile_side as usize)?;
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

    fn detect_data(&mut self, side: usize, ch: usize) {
        let d = self.fault_rng.between(0, self.cfg.faults.detect_max_ns);
        self.push(self.now + d, Ev::DetectData(side, ch));
    }

    /// Breaks channel `ch` loudly (0 = control, `1 + i` = data channel `i`).
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
            self.record_fault(FaultKind::ConnectionLoss, ch as u64);
            self.detect(SRC);
            self.detect(DST);
            return;
        }
        let i = ch - 1;
        if i >= self.chans.len() || !self.chans[i].alive {
            return;
        }
        self.fail_chan(i);
        self.record_fault(FaultKind::ConnectionLoss, ch as u64);
        self.detect_data(SRC, i);
        if self.chans[i].joined {
            self.detect_data(DST, i);
        }
    }

    /// Data channel `i` is broken: what is in flight completes in error.
    fn fail_chan(&mut self, i: usize) {
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

    /// Link `link` (0 = control, `1 + i` = data channel `i`) goes silent until `until`
    /// (`u64::MAX`: for good): nothing crosses it and nobody is told. Every live side must
    /// still reach an outcome by its own timers (spec: ERR-4, LIVE-1).
    fn silence(&mut self, link: usize, until: u64) {
        let s = match link {
            0 => &mut self.ctrl_silence,
            i if i <= self.chans.len() => &mut self.chans[i - 1].silence,
            _ => return,
        };
        s.until = s.until.max(until);
        self.record_fault(FaultKind::Silence, link as u64);
        if until == u64::MAX {
            // Bounded liveness: local work, then at most an idle timeout on each side.
            let bound = self.now
                + self.cfg.estimate_ns()
                + 2 * self.cfg.migration.idle_timeout_ms * NS_PER_MS
                + NS_PER_MS * 1_000;
            self.deadline = self.deadline.min(bound);
        }
    }

    pub(super) fn crash(&mut self, side: usize) {
        self.crashed[side] = true;
        if side == SRC {
            self.record_fault(FaultKind::SourceCrash, 0);
            self.pause_pending = false;
            // The workload lives in its own process and survives the source. Its guard resumes
            // it unless the source relinquished it (spec: SW-6, INV-OWN-2).
            if !self.src_running && !self.relinquished {
                self.resume_source();
            }
            // The source's NIC dies with it: nothing more is sent or completed.
            for c in &mut self.chans {
                c.inflight.clear();
                c.cq.clear();
                c.place_at = None;
                c.poll_at = None;
            }
        } else {
            self.record_fault(FaultKind::DestinationCrash, 0);
            // Its registrations vanish: writes still in flight are rejected. A workload it
            // started keeps running.
            self.nic.clear();
        }
        if !self.fault_rng.chance(self.cfg.faults.silent_crash_ppm) {
            self.detect(1 - side);
        }
    }

    /// A stray connection reaches the listener and does what its kind does.
    fn stray(&mut self, k: Stray) -> R {
        let conn = self.next_stray;
        self.next_stray += 1;
        self.record_fault(FaultKind::Stray, k as u64);
        self.strays.push(conn);
        let nonce = [0x5a; wire::NONCE_LEN];
        self.feed_lsn(LsnInput::Accepted {
            conn,
            nonce,
            binding: None,
        })?;
        let hello = self.hello.clone();
        match k {
            Stray::HalfOpen => Ok(()),
            Stray::Garbage => self.feed_lsn(LsnInput::Frame {
                conn,
                frame: wire::decode(b"GET / HTTP/1.1\r\n"),
            }),
            Stray::ReplayHello | Stray::HelloThenClose => {
                if let Some(h) = hello {
                    self.feed_lsn(LsnInput::Frame {
                        conn,
                        frame: wire::decode(&h),
                    })?;
                }
                if k == Stray::HelloThenClose && self.strays.contains(&conn) {
                    self.strays.retain(|&c| c != conn);
                    self.feed_lsn(LsnInput::Closed { conn })?;
                }
                Ok(())
            }
            Stray::BadDataHello => self.feed_lsn(LsnInput::DataHello {
                conn,
                hello: Ok(DataHello {
                    session_id: self.lsn.session().and_then(|d| d.session_id()).unwrap_or(0),
                    channel: 0,
                    token: [0x66; 32],
                }),
            }),
        }
    }
}
