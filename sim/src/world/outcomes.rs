//! Switchover and outcomes, and the invariants checked as they happen.

use rdmig_model::wire::AbortReason;

use super::*;

impl Sim {
    pub(super) fn start_workload(&mut self) -> R {
        self.trace.rec(self.now, Tag::StartWorkload, 0, 0);
        // spec: SW-7
        if !self.commit_sent {
            return Err(self.fail(
                "SW-7",
                "the destination starts its workload although the source never sent COMMIT".into(),
            ));
        }
        if self.src_running {
            return Err(self.fail(
                "INV-OWN-1",
                "the destination starts while the source workload runs".into(),
            ));
        }
        // spec: SW-8
        if !self.nic.is_empty() || self.reg_jobs > 0 {
            return Err(self.fail(
                "SW-8",
                format!(
                    "the destination starts with {} registrations held and {} in progress",
                    self.nic.regs().count(),
                    self.reg_jobs
                ),
            ));
        }
        // spec: INV-MEM-1: every page equals the source page at pause.
        let Some(snap) = self.snapshot.as_ref() else {
            return Err(self.fail(
                "INV-OWN-1",
                "the destination starts before the source paused".into(),
            ));
        };
        for (d, &s) in self.src_of_dst.iter().enumerate() {
            if snap[s] != self.dmem[d] {
                let p = snap[s]
                    .iter()
                    .zip(&self.dmem[d])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(self.fail(
                    "INV-MEM-1",
                    format!(
                        "at start, destination block {d} page {p} holds version {:#x}, the source had {:#x} at pause",
                        self.dmem[d][p], snap[s][p]
                    ),
                ));
            }
        }
        self.check_state_at_start()?;
        self.stats.memory_verified = true;
        self.push(self.now + self.cfg.guest.start_ns, Ev::DstStarted);
        Ok(())
    }

    pub(super) fn finish(&mut self, side: usize, o: Outcome) -> R {
        self.stats.finished_ns[side] = Some(self.now);
        self.trace
            .rec(self.now, Tag::Finish, side as u64, outcome_code(&o));
        match (side, o) {
            (SRC, Outcome::Aborted(a)) => {
                // spec: INV-OWN-2
                if !self.src_running {
                    return Err(self.fail(
                        "INV-OWN-2",
                        format!(
                            "the source aborted ({:?}: {}) without resuming its workload",
                            a.reason, a.detail
                        ),
                    ));
                }
            }
            (SRC, Outcome::InDoubt(why)) => {
                // spec: INV-DOUBT-1
                if !self.commit_sent || self.started_received {
                    return Err(self.fail(
                        "INV-DOUBT-1",
                        format!(
                            "source in doubt ({why}) with COMMIT sent = {}, STARTED received = {}",
                            self.commit_sent, self.started_received
                        ),
                    ));
                }
            }
            (SRC, Outcome::Completed) => {
                if !self.started_received {
                    return Err(self.fail(
                        "SW-7",
                        "the source completed without receiving STARTED".into(),
                    ));
                }
            }
            (_, Outcome::Completed) => {
                if !self.dst_running {
                    return Err(self.fail(
                        "SW-7",
                        "the destination completed without its workload running".into(),
                    ));
                }
            }
            (_, Outcome::Aborted(a)) => {
                if self.dst_running {
                    return Err(self.fail(
                        "INV-OWN-1",
                        format!(
                            "the destination aborted ({:?}) after starting its workload",
                            a.reason
                        ),
                    ));
                }
            }
            (_, Outcome::InDoubt(_)) => {
                return Err(self.fail(
                    "INV-DOUBT-1",
                    "the destination reached InDoubt, which only the source may".into(),
                ))
            }
        }
        Ok(())
    }

    /// Invariants checked after every event.
    pub(super) fn check(&self) -> R {
        // spec: INV-OWN-1
        if self.src_running && self.dst_running {
            return Err(self.fail(
                "INV-OWN-1",
                "source and destination workloads both run".into(),
            ));
        }
        // spec: INV-PIN-1, as the destination accounts it and as its NIC holds it.
        let budget = self.cfg.pin_budget();
        let accounted = self.lsn.session().map_or(0, |d| d.registered_bytes());
        if !self.crashed[DST] && !self.done(DST) && accounted > budget {
            return Err(self.fail(
                "INV-PIN-1",
                format!(
                    "destination accounts {accounted} registered bytes over its budget of {budget}"
                ),
            ));
        }
        if self.nic.bytes() > budget {
            return Err(self.fail(
                "INV-PIN-1",
                format!(
                    "the NIC holds {} registered bytes over the budget of {budget}",
                    self.nic.bytes()
                ),
            ));
        }
        // spec: REG-4: the source never asks beyond the budget it was told.
        if !self.done(SRC) && self.src.registered_bytes() > budget {
            return Err(self.fail(
                "REG-4",
                format!(
                    "source accounts {} registered bytes over the budget of {budget}",
                    self.src.registered_bytes()
                ),
            ));
        }
        Ok(())
    }

    /// Checks on the final state: legal outcome pairs and a single owner.
    pub(super) fn final_checks(&self) -> R {
        let s = self.src.outcome();
        let d = self.lsn.outcome();
        // An honest pair never ends on a broken rule, a lost update, mismatched blocks or a
        // driver answer the machine did not expect (the simulator is a conforming driver):
        // only a hostile peer, or a bug, can make it.
        if self.hostile_frames == 0 {
            for (side, o) in [(SRC, s), (DST, d)] {
                if let Some(Outcome::Aborted(a)) = o {
                    if self.expected_state_abort(side, &a) {
                        continue;
                    }
                    if matches!(
                        a.reason,
                        AbortReason::ProtocolViolation
                            | AbortReason::DigestMismatch
                            | AbortReason::BlockMismatch
                            | AbortReason::LocalError
                    ) {
                        return Err(self.fail(
                            "HONEST",
                            format!(
                                "an honest {} aborted with {:?} ({})",
                                ["source", "destination"][side],
                                a.reason,
                                a.detail
                            ),
                        ));
                    }
                }
            }
        }
        // spec: INV-OWN-2: a source that died before relinquishing its workload leaves it
        // running (its guard resumed it).
        if self.crashed[SRC] && !self.relinquished && !self.src_running {
            return Err(self.fail(
                "INV-OWN-2",
                "the source died before relinquishing its workload and left it paused".into(),
            ));
        }
        if let Some(Outcome::Aborted(_)) = s {
            if !self.crashed[SRC] && !self.src_running {
                return Err(self.fail(
                    "INV-OWN-2",
                    "aborted migration left the source paused".into(),
                ));
            }
            if self.stats.dst_started_ns.is_some() && !self.crashed[DST] {
                return Err(self.fail(
                    "INV-OWN-1",
                    "source aborted but the destination started".into(),
                ));
            }
        }
        if let Some(Outcome::Completed) = d {
            if self.src_running {
                return Err(self.fail(
                    "INV-OWN-1",
                    "destination completed but the source runs".into(),
                ));
            }
        }
        if let Some(Outcome::Completed) = s {
            if !matches!(d, Some(Outcome::Completed)) && !self.crashed[DST] {
                return Err(self.fail("SW-7", format!("source completed, destination {d:?}")));
            }
        }
        Ok(())
    }
}
