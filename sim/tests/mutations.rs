//! Each deliberate machine bug (rdmig-model's `mutations` feature) must be caught by the
//! simulator's checkers, as a violation and not as a safe outcome.
//! Run with `cargo test -p rdmig-sim --features mutations --test mutations`.
#![cfg(feature = "mutations")]

use rdmig_model::destination::DstMutations;
use rdmig_model::source::Mutations;
use rdmig_sim::faults::FaultKind;
use rdmig_sim::guest::GuestConfig;
use rdmig_sim::profile::Profile;
use rdmig_sim::{Sim, SimConfig};

fn cfg(seed: u64) -> SimConfig {
    let mut g = GuestConfig::new(8 << 20);
    g.dirty_bytes_per_s = 2_000_000_000;
    g.zero_write_ppm = 100_000;
    let mut c = SimConfig::new(seed, Profile::named("rdma-100g").unwrap(), g);
    c.migration.chunk_log2 = 16;
    c.migration.reg_batch = 4;
    c.migration.max_rounds = 5;
    c.migration.downtime_limit_ms = 1;
    c
}

/// Runs seeds 1..=20 with mutation `m` set on the source until one is caught; returns the
/// invariants that caught it.
fn caught(m: Mutations, adjust: impl Fn(&mut SimConfig)) -> Vec<&'static str> {
    let mut hits = Vec::new();
    for seed in 1..=20 {
        let mut c = cfg(seed);
        adjust(&mut c);
        let mut sim = Sim::new(c).unwrap();
        sim.src.set_mutations(m);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(f)) => hits.push(f.invariant),
            Err(_) => hits.push("PANIC"),
        }
    }
    hits
}

#[test]
fn write_before_registration_is_caught() {
    let hits = caught(
        Mutations {
            write_before_reg_result: true,
            ..Mutations::default()
        },
        |_| {},
    );
    assert!(hits.contains(&"INV-REG-1"), "{hits:?}");
}

#[test]
fn resume_after_commit_is_caught() {
    let hits = caught(
        Mutations {
            resume_after_commit: true,
            ..Mutations::default()
        },
        |c| {
            // The destination takes longer to start than the source waits for STARTED, and
            // sends no keepalive meanwhile: the source ends in doubt after COMMIT.
            c.guest.start_ns = 300_000_000;
            c.migration.idle_timeout_ms = 100;
            c.migration.keepalive_ms = 0;
        },
    );
    assert!(hits.contains(&"SW-6"), "{hits:?}");
}

#[test]
fn evicting_chunks_with_writes_in_flight_is_caught() {
    let hits = caught(
        Mutations {
            evict_inflight: true,
            ..Mutations::default()
        },
        |c| {
            c.migration.pin_budget = Some(3 << 16);
            c.migration.writes_per_channel = Some(64);
        },
    );
    assert!(hits.contains(&"INV-REG-1"), "{hits:?}");
}

#[test]
fn skipping_the_final_scan_is_caught() {
    let hits = caught(
        Mutations {
            skip_final_scan: true,
            ..Mutations::default()
        },
        |c| c.migration.verify_digests = false,
    );
    assert!(hits.contains(&"INV-MEM-1"), "{hits:?}");
}

#[test]
fn ignoring_credits_is_caught() {
    let hits = caught(
        Mutations {
            ignore_credits: true,
            ..Mutations::default()
        },
        |c| {
            c.migration.dst_credit_window = 4;
            c.migration.src_credit_window = 4;
            c.migration.reg_batch = 1;
        },
    );
    assert!(hits.contains(&"INV-FC-1"), "{hits:?}");
}

#[test]
fn ending_a_round_before_its_writes_land_is_caught() {
    let hits = caught(
        Mutations {
            skip_drain: true,
            ..Mutations::default()
        },
        |c| {
            c.migration.verify_digests = false;
            c.migration.max_rounds = 1;
            c.guest.capture_ns = 0;
            c.profile = Profile::named("rdma-25g").unwrap();
        },
    );
    // Either the destination starts on memory a write has yet to reach, or a completion
    // arrives after the round it belongs to has ended and the source stops on it (a result
    // no honest pair produces).
    assert!(
        hits.iter()
            .any(|h| ["INV-MEM-1", "INV-REG-1", "SW-8", "HONEST"].contains(h)),
        "{hits:?}"
    );
}

#[test]
fn relinquishing_after_commit_is_caught() {
    let hits = caught(
        Mutations {
            relinquish_after_commit: true,
            ..Mutations::default()
        },
        |_| {},
    );
    assert!(hits.contains(&"SW-6"), "{hits:?}");
}

/// spec: ERR-4: without a deadline on writes in flight, a data channel that goes silent for
/// good while the control channel carries keepalives leaves both sides waiting forever.
#[test]
fn writes_without_a_deadline_are_caught_by_a_silent_data_channel() {
    let hits = caught(
        Mutations {
            writes_without_deadline: true,
            ..Mutations::default()
        },
        |c| {
            c.migration.idle_timeout_ms = 200;
            c.migration.keepalive_ms = 50;
            let mut f = rdmig_sim::faults::FaultConfig::only(FaultKind::Silence, c.estimate_ns());
            f.silence_forever_ppm = 1_000_000;
            c.faults = f;
        },
    );
    assert!(hits.contains(&"LIVENESS"), "{hits:?}");
}

/// spec: DATA-3: a destination that zero-fills without checking the range, against a hostile
/// source.
#[test]
fn a_skipped_zero_range_check_is_caught_by_a_hostile_source() {
    let mut hits = Vec::new();
    for seed in 1..=40 {
        let mut c = cfg(seed);
        let mut f = rdmig_sim::faults::FaultConfig::only(FaultKind::Hostile, c.estimate_ns());
        f.hostile_ppm = 200_000;
        f.hostile_side = 0;
        c.faults = f;
        let mut sim = Sim::new(c).unwrap();
        sim.set_dst_mutations(DstMutations {
            skip_zero_range_check: true,
            ..DstMutations::default()
        });
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run())) {
            Ok(Ok(())) => {}
            Ok(Err(f)) => hits.push(f.invariant),
            Err(_) => hits.push("PANIC"),
        }
    }
    assert!(hits.contains(&"INV-REG-1"), "{hits:?}");
}
