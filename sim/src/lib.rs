//! rdmig-sim: a deterministic simulator for rdmig live migration.
//!
//! It runs the *same* source and destination state machines as production (crate
//! `rdmig-model`, used verbatim) against simulated RDMA or TCP hardware, a simulated guest,
//! and injected faults, in one thread on a virtual clock. One seed reproduces a run exactly.
//! See `world::Sim` for the world model, `config::SimConfig` for what a run depends on, and
//! `report::Report` for what it measures.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bits;
pub mod config;
pub mod faults;
pub mod guest;
pub mod plot;
pub mod profile;
pub mod report;
pub mod trace;
pub mod units;
pub mod validate;
pub mod world;

/// The one generator of every test world (checker, pair, simulator): `rdmig_check::rng`.
pub use rdmig_check::rng;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use config::{MigrationConfig, SimConfig};
pub use report::Report;
pub use world::{Failure, Sim};

/// A finished run: its report, and the failure that stopped it, if any.
pub struct RunResult {
    pub report: Report,
    pub failure: Option<Failure>,
}

/// Runs one configuration to the end. A panic inside a machine (one of its own production
/// assertions) is caught and reported like an invariant violation, with the trace tail.
pub fn run(cfg: SimConfig) -> Result<RunResult, String> {
    let mut sim = Sim::new(cfg)?;
    let r = catch_unwind(AssertUnwindSafe(|| sim.run()));
    let failure = match r {
        Ok(Ok(())) => None,
        Ok(Err(f)) => Some(f),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Some(Failure {
                seed: sim.cfg.seed,
                invariant: "PANIC",
                detail: msg,
                at_ns: sim.now_ns(),
                tail: sim.trace.tail(),
            })
        }
    };
    Ok(RunResult {
        report: Report::of(&sim),
        failure,
    })
}

/// What a swarm of runs produced.
#[derive(Debug, Default)]
pub struct SwarmSummary {
    pub runs: u64,
    /// Runs per outcome class.
    pub outcomes: BTreeMap<String, u64>,
    /// Runs in which each fault kind struck at least once.
    pub faults_hit: BTreeMap<&'static str, u64>,
    pub failures: Vec<(SimConfig, Failure)>,
    pub events: u64,
}

/// Runs `seeds` with swarm-drawn configurations around `base`; `each` sees every result.
pub fn swarm(
    base: &SimConfig,
    seeds: impl IntoIterator<Item = u64>,
    mut each: impl FnMut(&SimConfig, &RunResult),
) -> SwarmSummary {
    let mut s = SwarmSummary::default();
    for seed in seeds {
        let cfg = SimConfig::swarm(seed, base);
        let res = match run(cfg.clone()) {
            Ok(r) => r,
            Err(e) => panic!("swarm drew an invalid configuration for seed {seed}: {e}"),
        };
        s.runs += 1;
        s.events += res.report.events;
        *s.outcomes
            .entry(res.report.outcome.class.clone())
            .or_insert(0) += 1;
        for k in res.report.faults_injected.keys() {
            *s.faults_hit.entry(k).or_insert(0) += 1;
        }
        each(&cfg, &res);
        if let Some(f) = res.failure {
            s.failures.push((cfg, f));
        }
    }
    s
}
