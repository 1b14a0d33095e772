//! spec: INV-MEM-1 with the content-hash dirty log (`rdmig send --dirty-log scan`) and a guest
//! whose writes undo earlier ones (a lock word taken and released, a counter up and down).
//!
//! The data path reads a page when its write is placed, after the scan that reported it. A
//! page scanned at content A, written B, sent as B, then written back to A is unchanged
//! compared with that scan, though the destination holds B. A log that compares each page
//! with what the destination holds as well as with its previous scan (`ScanBase::Held`)
//! sends it again. One that compares with its previous scan only (`ScanBase::LastScan`)
//! loses it; one that compares with what the destination holds only (`ScanBase::HeldOnly`)
//! loses a page the switchover merge keeps as zero. The simulator's comparison of
//! destination and source memory at start reports both.

use rdmig_sim::guest::{GuestConfig, ScanBase};
use rdmig_sim::profile::Profile;
use rdmig_sim::{run, RunResult, SimConfig};

/// A 4 MiB guest dirtying 500 MB/s into a hot fifth of memory, 30 % of its writes reverting,
/// with a 1 ms downtime limit so that pre-copy runs several rounds. Digest verification is
/// off: the pair then switches over whatever the destination holds, and INV-MEM-1 is the
/// simulator's check at start.
fn reverting(seed: u64, profile: &str, base: ScanBase, zero_writes: bool) -> SimConfig {
    let mut g = GuestConfig::new(4 << 20);
    g.dirty_bytes_per_s = 500_000_000;
    g.pattern = "hot:0.2".parse().unwrap();
    g.hash_scan = true;
    g.scan_base = base;
    g.revert_write_ppm = 300_000;
    g.zero_write_ppm = if zero_writes { 100_000 } else { 0 };
    let mut c = SimConfig::new(seed, Profile::named(profile).unwrap(), g);
    c.migration.chunk_log2 = 18;
    c.migration.downtime_limit_ms = 1;
    c.migration.verify_digests = false;
    c
}

/// Runs seeds 1..=10 of every (profile, zero writes, zero elision) combination with `base`;
/// `each` sees every run.
fn run_cases(base: ScanBase, mut each: impl FnMut(&str, RunResult)) -> u64 {
    let mut runs = 0;
    for profile in ["rdma-25g", "tcp-25g"] {
        for (zero_writes, zero_elision) in [(false, true), (true, true), (true, false)] {
            for seed in 1..=10 {
                let mut c = reverting(seed, profile, base, zero_writes);
                c.migration.zero_elision = zero_elision;
                let what = format!(
                    "seed {seed} {profile} zero writes {zero_writes} elision {zero_elision}"
                );
                each(&what, run(c).unwrap());
                runs += 1;
            }
        }
    }
    runs
}

/// Runs with `base` that end in INV-MEM-1 at start; any other failure fails the test.
fn lost_pages(base: ScanBase) -> (u64, u64) {
    let mut lost = 0;
    let runs = run_cases(base, |what, r| {
        if let Some(f) = r.failure {
            assert_eq!(f.invariant, "INV-MEM-1", "{what}: {f}");
            assert!(f.detail.starts_with("at start"), "{what}: {f}");
            lost += 1;
        }
    });
    eprintln!("{base}: {lost} of {runs} runs lost a page");
    (lost, runs)
}

#[test]
fn inv_mem_1_hash_scan_survives_reverting_writes() {
    let mut several = 0;
    let runs = run_cases(ScanBase::Held, |what, r| {
        assert!(r.failure.is_none(), "{what}: {}", r.failure.unwrap());
        assert_eq!(r.report.outcome.class, "completed", "{what}");
        assert!(r.report.memory_verified, "{what}");
        // At least one pre-copy scan compares memory with what round 1 sent.
        let rounds = r.report.rounds.len();
        assert!(rounds >= 2, "{what}: {rounds} rounds");
        several += (rounds >= 3) as u64;
    });
    assert_eq!(runs, 60);
    assert!(
        several >= 30,
        "only {several} of {runs} runs had 3 rounds or more"
    );
}

/// The log compared with its previous scan only: the simulator must find the lost page.
#[test]
fn inv_mem_1_hash_scan_against_last_scan_loses_reverted_pages() {
    let (lost, runs) = lost_pages(ScanBase::LastScan);
    assert!(lost >= 1, "no run of {runs} lost a reverted page");
}

/// The log compared with what the destination holds only: the simulator must find the page
/// the final round zeroes.
#[test]
fn inv_mem_1_hash_scan_against_held_only_loses_pages_at_switchover() {
    let (lost, runs) = lost_pages(ScanBase::HeldOnly);
    assert!(lost >= 1, "no run of {runs} lost a page at switchover");
}
