//! Swarm testing: 1000 seeds, each with its own protocol knobs, guest and faults drawn from
//! the seed; no invariant may be violated and every live side must reach an outcome.

use std::collections::BTreeSet;

use rdmig_sim::guest::GuestConfig;
use rdmig_sim::profile::Profile;
use rdmig_sim::{swarm, SimConfig};

fn base(profile: &str) -> SimConfig {
    // Swarm draws RAM between half and one and a half times this.
    SimConfig::new(
        0,
        Profile::named(profile).unwrap(),
        GuestConfig::new(8 << 20),
    )
}

fn check(profile: &str, seeds: std::ops::Range<u64>) -> rdmig_sim::SwarmSummary {
    let s = swarm(&base(profile), seeds, |_, _| {});
    let mut msg = String::new();
    for (_, f) in &s.failures {
        msg += &format!(
            "{f}\nreplay: rdmig-sim run --seed {} --swarm --profile {profile} --ram 8MiB\n",
            f.seed
        );
    }
    assert!(
        s.failures.is_empty(),
        "{} failing seeds:\n{msg}",
        s.failures.len()
    );
    s
}

#[test]
fn swarm_rdma_800_seeds() {
    let s = check("rdma-100g", 1..801);
    assert_eq!(s.runs, 800);
    eprintln!(
        "rdma swarm outcomes {:?} faults {:?}",
        s.outcomes, s.faults_hit
    );
    // The swarm reaches both ends: completions and aborts, and most fault kinds strike.
    assert!(
        s.outcomes.get("completed").copied().unwrap_or(0) > 100,
        "{:?}",
        s.outcomes
    );
    assert!(
        s.outcomes
            .keys()
            .filter(|k| k.starts_with("aborted"))
            .count()
            >= 4,
        "{:?}",
        s.outcomes
    );
    let kinds: BTreeSet<_> = s.faults_hit.keys().collect();
    assert!(kinds.len() >= 7, "{kinds:?}");
    // The real environment's faults strike too: links that go silent, stray connections and
    // hostile peers (spec: LIVE-1, LIVE-5), each in several runs.
    for kind in ["silence", "stray", "hostile", "source-crash"] {
        let n = s.faults_hit.get(kind).copied().unwrap_or(0);
        assert!(n >= 5, "{kind} struck in {n} runs: {:?}", s.faults_hit);
    }
}

#[test]
fn swarm_tcp_200_seeds() {
    let s = check("tcp-25g", 1001..1201);
    assert_eq!(s.runs, 200);
    eprintln!(
        "tcp swarm outcomes {:?} faults {:?}",
        s.outcomes, s.faults_hit
    );
}
