//! Registration at the destination: pinning on a pool of registration threads.

use super::*;

impl Sim {
    pub(super) fn occupy_reg_thread(&mut self, dur: u64) -> u64 {
        let (i, free) = self
            .reg_free
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(i, t)| (t, i))
            .expect("at least one registration thread");
        let end = self.now.max(free) + dur;
        self.reg_free[i] = end;
        self.stats.reg_busy_ns += dur;
        if let Some(r) = self.stats.rounds.last_mut() {
            r.reg_ns += dur;
        }
        end
    }

    pub(super) fn register(&mut self, target: RegTarget, block: u16, offset: u64, len: u64) -> R {
        let (b, p0, n) = self.dst_range(block, offset, len, "Register")?;
        // Pinning (RDMA) faults untouched pages in; a TCP transport only records a key, and
        // its receiving copy pays for first touch instead.
        let untouched = if self.costs.rdma {
            (n as u64 - self.touched[b].count_range(p0 as u64, n as u64)) << self.dst_page_log2(b)
        } else {
            0
        };
        let c = &self.costs;
        let dur = c.reg_fixed_ns + ns(len, c.reg_fs_per_byte) + ns(untouched, c.touch_fs_per_byte);
        let end = self.occupy_reg_thread(dur);
        self.stats.cpu[DST].registration_ns += dur;
        self.stats.registrations += 1;
        if self.costs.rdma {
            self.touched[b].set_range(p0 as u64, n as u64);
        }
        let fail = self.faults_active && self.fault_rng.chance(self.cfg.faults.reg_fail_ppm);
        self.reg_jobs += 1;
        self.trace
            .rec(self.now, Tag::Register, block as u64, offset);
        self.push(
            end,
            Ev::RegDone {
                target,
                block,
                offset,
                len,
                fail,
            },
        );
        Ok(())
    }

    pub(super) fn reg_done(
        &mut self,
        target: RegTarget,
        block: u16,
        offset: u64,
        len: u64,
        fail: bool,
    ) -> R {
        self.reg_jobs -= 1;
        if self.crashed[DST] || self.done(DST) {
            // The session is gone: the driver releases the registration with its device.
            return Ok(());
        }
        if fail {
            self.record_fault(FaultKind::RegistrationFailure, block as u64);
            return self.feed_dst(DstInput::RegisterFailed { target });
        }
        let rkey = self.nic.register(block, offset, len);
        self.trace.rec(self.now, Tag::Registered, rkey as u64, len);
        self.feed_dst(DstInput::Registered { target, rkey })
    }
}
