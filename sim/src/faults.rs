//! Faults, drawn per seed (swarm testing): which kinds are on and how often they strike.
//!
//! Probabilities are integers per million, rolled at each fault tick of virtual time (or per
//! registration, per completion poll) during the safety phase only. When the safety phase
//! ends, the network heals (no new faults; a crashed side stays down) and the liveness phase
//! requires every surviving side to reach an outcome within a bound.

use serde::Serialize;

use crate::rng::Rng;

/// Every kind of fault the simulator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A control or data channel breaks; both sides see TransportFailed after detection.
    ConnectionLoss,
    /// A completion poll is delayed, so completions of different queues interleave late.
    CompletionDelay,
    /// Completions harvested together are handed over in shuffled order.
    CompletionReorder,
    /// The destination fails to register memory (RegisterFailed).
    RegistrationFailure,
    /// The destination's pin budget is tiny: below one chunk, a few chunks, or (pin-all)
    /// below RAM.
    PinBudget,
    /// A side stops reposting receive buffers for a while: its peer runs out of credits.
    SlowReceiver,
    SourceCrash,
    DestinationCrash,
    /// The operator cancels (usually at the source, sometimes at the destination).
    Cancel,
    /// The two sides hold different pre-shared keys.
    WrongKey,
    /// A link goes silent (nothing crosses, nobody is told), for a while or for good.
    Silence,
    /// A connection that is not the source's reaches the listener (half-open, garbage, a
    /// replayed HELLO, a forged data join).
    Stray,
    /// A peer sends well-formed frames of its own choosing besides the honest ones.
    Hostile,
}

pub const ALL_KINDS: [FaultKind; 13] = [
    FaultKind::ConnectionLoss,
    FaultKind::CompletionDelay,
    FaultKind::CompletionReorder,
    FaultKind::RegistrationFailure,
    FaultKind::PinBudget,
    FaultKind::SlowReceiver,
    FaultKind::SourceCrash,
    FaultKind::DestinationCrash,
    FaultKind::Cancel,
    FaultKind::WrongKey,
    FaultKind::Silence,
    FaultKind::Stray,
    FaultKind::Hostile,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ConnectionLoss => "connection-loss",
            FaultKind::CompletionDelay => "completion-delay",
            FaultKind::CompletionReorder => "completion-reorder",
            FaultKind::RegistrationFailure => "registration-failure",
            FaultKind::PinBudget => "pin-budget",
            FaultKind::SlowReceiver => "slow-receiver",
            FaultKind::SourceCrash => "source-crash",
            FaultKind::DestinationCrash => "destination-crash",
            FaultKind::Cancel => "cancel",
            FaultKind::WrongKey => "wrong-key",
            FaultKind::Silence => "silence",
            FaultKind::Stray => "stray",
            FaultKind::Hostile => "hostile",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        ALL_KINDS.iter().copied().find(|k| k.name() == s)
    }
}

/// The faults of one run. All zero means a fault-free run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FaultConfig {
    /// Virtual time between two rolls of the per-tick faults.
    pub tick_ns: u64,
    /// Faults strike only before this virtual time.
    pub safety_ns: u64,
    pub conn_loss_ppm: u32,
    pub source_crash_ppm: u32,
    pub destination_crash_ppm: u32,
    pub cancel_ppm: u32,
    pub slow_receiver_ppm: u32,
    pub stall_max_ns: u64,
    pub completion_delay_ppm: u32,
    pub completion_delay_max_ns: u64,
    pub reorder_ppm: u32,
    pub reg_fail_ppm: u32,
    pub pin_starved: bool,
    pub wrong_key: bool,
    /// Longest time a side takes to notice a broken transport or crashed peer.
    pub detect_max_ns: u64,
    /// Chance that a crash goes unreported, leaving the idle timeout to notice it.
    pub silent_crash_ppm: u32,
    pub silence_ppm: u32,
    /// Longest silence that heals.
    pub silence_max_ns: u64,
    /// Chance that a silence is for good.
    pub silence_forever_ppm: u32,
    pub stray_ppm: u32,
    pub hostile_ppm: u32,
    /// Which side is hostile (0 source, 1 destination).
    pub hostile_side: u8,
}

impl FaultConfig {
    pub fn none() -> FaultConfig {
        FaultConfig::default()
    }

    pub fn any(&self) -> bool {
        !self.kinds().is_empty()
    }

    /// Kinds enabled in this configuration.
    pub fn kinds(&self) -> Vec<FaultKind> {
        ALL_KINDS
            .iter()
            .copied()
            .filter(|k| match k {
                FaultKind::ConnectionLoss => self.conn_loss_ppm > 0,
                FaultKind::CompletionDelay => self.completion_delay_ppm > 0,
                FaultKind::CompletionReorder => self.reorder_ppm > 0,
                FaultKind::RegistrationFailure => self.reg_fail_ppm > 0,
                FaultKind::PinBudget => self.pin_starved,
                FaultKind::SlowReceiver => self.slow_receiver_ppm > 0,
                FaultKind::SourceCrash => self.source_crash_ppm > 0,
                FaultKind::DestinationCrash => self.destination_crash_ppm > 0,
                FaultKind::Cancel => self.cancel_ppm > 0,
                FaultKind::WrongKey => self.wrong_key,
                FaultKind::Silence => self.silence_ppm > 0,
                FaultKind::Stray => self.stray_ppm > 0,
                FaultKind::Hostile => self.hostile_ppm > 0,
            })
            .collect()
    }

    fn base(est_ns: u64) -> FaultConfig {
        FaultConfig {
            tick_ns: 500_000,
            safety_ns: est_ns,
            stall_max_ns: 20_000_000,
            completion_delay_max_ns: 2_000_000,
            detect_max_ns: 2_000_000,
            silent_crash_ppm: 500_000,
            silence_max_ns: 50_000_000,
            silence_forever_ppm: 300_000,
            ..FaultConfig::default()
        }
    }

    /// One kind only, struck often enough to hit within a run of about `est_ns`: the fixed
    /// per-kind scenarios of the test suite.
    pub fn only(kind: FaultKind, est_ns: u64) -> FaultConfig {
        let mut f = FaultConfig::base(est_ns);
        match kind {
            FaultKind::ConnectionLoss => f.conn_loss_ppm = 100_000,
            FaultKind::CompletionDelay => f.completion_delay_ppm = 300_000,
            FaultKind::CompletionReorder => f.reorder_ppm = 500_000,
            FaultKind::RegistrationFailure => f.reg_fail_ppm = 20_000,
            FaultKind::PinBudget => f.pin_starved = true,
            FaultKind::SlowReceiver => f.slow_receiver_ppm = 200_000,
            FaultKind::SourceCrash => f.source_crash_ppm = 100_000,
            FaultKind::DestinationCrash => f.destination_crash_ppm = 100_000,
            FaultKind::Cancel => f.cancel_ppm = 100_000,
            FaultKind::WrongKey => f.wrong_key = true,
            FaultKind::Silence => f.silence_ppm = 50_000,
            FaultKind::Stray => f.stray_ppm = 200_000,
            FaultKind::Hostile => f.hostile_ppm = 50_000,
        }
        f
    }

    /// Swarm testing: each kind is on with probability 1/2 (wrong keys rarely, since they end
    /// every run at the handshake), with a strength drawn from a wide range, and the safety
    /// phase lasts up to twice the fault-free estimate `est_ns`.
    pub fn draw(rng: &mut Rng, est_ns: u64) -> FaultConfig {
        let mut f = FaultConfig::base(rng.between(0, 2 * est_ns.max(1)));
        f.tick_ns = rng.between(100_000, 2_000_000);
        let strength = |rng: &mut Rng, hi: u32| -> u32 {
            if rng.chance(500_000) {
                rng.pick(&[hi / 100, hi / 20, hi / 5, hi]).max(1)
            } else {
                0
            }
        };
        f.conn_loss_ppm = strength(rng, 50_000);
        f.source_crash_ppm = strength(rng, 20_000);
        f.destination_crash_ppm = strength(rng, 20_000);
        f.cancel_ppm = strength(rng, 20_000);
        f.slow_receiver_ppm = strength(rng, 200_000);
        f.completion_delay_ppm = strength(rng, 500_000);
        f.reorder_ppm = strength(rng, 1_000_000);
        f.reg_fail_ppm = strength(rng, 20_000);
        f.pin_starved = rng.chance(250_000);
        f.wrong_key = rng.chance(30_000);
        f.silence_ppm = strength(rng, 20_000);
        f.silence_max_ns = rng.pick(&[1_000_000, 50_000_000, 2_000_000_000]);
        f.silence_forever_ppm = rng.pick(&[0, 300_000, 1_000_000]);
        f.stray_ppm = strength(rng, 100_000);
        // A hostile peer ends most runs early, so it is drawn less often.
        f.hostile_ppm = if rng.chance(150_000) {
            rng.pick(&[1_000, 10_000, 50_000])
        } else {
            0
        };
        f.hostile_side = rng.below(2) as u8;
        f.stall_max_ns = rng.pick(&[1_000_000, 20_000_000, 200_000_000, 3_000_000_000]);
        f.completion_delay_max_ns = rng.pick(&[10_000, 500_000, 5_000_000]);
        f.detect_max_ns = rng.between(10_000, 5_000_000);
        f.silent_crash_ppm = rng.pick(&[0, 500_000, 1_000_000]);
        f
    }
}
