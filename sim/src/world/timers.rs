//! The machines' timers on the virtual clock: one wake-up per side at its earliest deadline,
//! which fires every timer then due.

use rdmig_model::listener::LsnTimer;
use rdmig_model::source::SrcTimer;
use rdmig_model::DstTimer;

use super::*;

impl Sim {
    /// A side's earliest deadline, in virtual nanoseconds.
    fn earliest(&self, side: usize) -> Option<u64> {
        let ms = match side {
            SRC => self.src.timers().next().map(|(t, _)| t),
            _ => self.lsn.timers().next().map(|(t, _)| t),
        };
        ms.map(|t| t.saturating_mul(NS_PER_MS))
    }

    pub(super) fn arm_timers(&mut self, side: usize) {
        if self.crashed[side] || self.done(side) {
            return;
        }
        if let Some(d) = self.earliest(side) {
            let at = d.max(self.now);
            if self.timer_at[side].is_some_and(|x| x <= at) {
                return;
            }
            self.timer_at[side] = Some(at);
            self.push(at, Ev::Timer(side, at));
        }
    }

    pub(super) fn timer(&mut self, side: usize, at: u64) -> R {
        if self.timer_at[side] != Some(at) {
            return Ok(());
        }
        self.timer_at[side] = None;
        if self.crashed[side] || self.done(side) {
            return Ok(());
        }
        let due = |t: Option<u64>, now: u64| t.is_some_and(|t| t.saturating_mul(NS_PER_MS) <= now);
        match side {
            SRC => {
                for kind in [SrcTimer::Progress, SrcTimer::Keepalive] {
                    let deadline = |s: &Self| match kind {
                        SrcTimer::Progress => s.src.timers().progress,
                        SrcTimer::Keepalive => s.src.timers().keepalive,
                    };
                    if self.done(SRC) || !due(deadline(self), self.now) {
                        continue;
                    }
                    self.trace
                        .rec(self.now, Tag::Timer, SRC as u64, kind as u64);
                    self.feed_src(SrcInput::Timer(kind))?;
                    if !self.done(SRC) && due(deadline(self), self.now) {
                        return Err(self.spin(SRC, &format!("{kind:?}")));
                    }
                }
            }
            _ => {
                for (conn, deadline) in self.lsn.handshake_deadlines() {
                    if !self.done(DST) && due(Some(deadline), self.now) {
                        self.trace.rec(self.now, Tag::Timer, DST as u64, 2);
                        self.feed_lsn(LsnInput::Timer(LsnTimer::Handshake(conn)))?;
                    }
                }
                for kind in [DstTimer::Idle, DstTimer::Keepalive] {
                    let deadline = |s: &Self| {
                        let t = s.lsn.timers().session;
                        match kind {
                            DstTimer::Idle => t.idle,
                            DstTimer::Keepalive => t.keepalive,
                        }
                    };
                    if self.done(DST) || !due(deadline(self), self.now) {
                        continue;
                    }
                    self.trace
                        .rec(self.now, Tag::Timer, DST as u64, kind as u64);
                    self.feed_lsn(LsnInput::Timer(LsnTimer::Session(kind)))?;
                    if !self.done(DST) && due(deadline(self), self.now) {
                        return Err(self.spin(DST, &format!("{kind:?}")));
                    }
                }
            }
        }
        self.arm_timers(side);
        Ok(())
    }

    /// spec: ERR-4, ERR-5: a fired timer moves its deadline, or a driver would spin.
    fn spin(&self, side: usize, kind: &str) -> Failure {
        self.fail(
            "ERR-4",
            format!(
                "{} {kind} deadline did not move after firing: a driver would spin",
                ["source", "destination"][side]
            ),
        )
    }
}
