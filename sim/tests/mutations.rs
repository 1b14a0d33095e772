//! Each deliberate machine bug (rdmig-model's `mutations` feature) must be caught by the
//! simulator's checkers, as a violation and not as a safe outcome.
//! Run with `cargo test -p rdmig-sim --features mutations --test mutations`.
#![cfg(feature = "mutations")]

use rdmig_model::source::Mutations;
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
        sim.src.mutations = m;
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
    assert!(
        hits.iter()
            .any(|h| ["INV-MEM-1", "INV-REG-1", "SW-8"].contains(h)),
        "{hits:?}"
    );
}
