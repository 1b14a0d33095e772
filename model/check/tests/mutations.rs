//! Each deliberate machine bug (the `mutations` feature) must be caught by the model checker:
//! the checker has to find a counterexample to a safety property, or the mutation survives.
//!
//! Run with `cargo test -p rdmig-check --features mutations --test mutations`.
#![cfg(feature = "mutations")]

use rdmig_check::check::{self, CheckConfig, ProtocolModel, Stop, Strategy};
use rdmig_model::destination::DstMutations;
use rdmig_model::source::Mutations;

/// Runs the small configuration with `m` and the given budgets until the first
/// counterexample; returns the names of the violated properties. Breadth-first, so the
/// counterexample is a shortest one. Each test uses the smallest budgets under which its bug
/// can show at all, so the suite stays fast in an unoptimised build; the full small
/// configuration catches the same bugs, only later.
fn violations(
    m: Mutations,
    faults: u8,
    guest_writes: u8,
    max_reg_inflight: u8,
) -> Vec<&'static str> {
    let mut cfg = CheckConfig::small();
    cfg.mutations = m;
    cfg.faults = faults;
    cfg.guest_writes = guest_writes;
    cfg.max_reg_inflight = max_reg_inflight;
    let run = check::run(
        ProtocolModel::new(cfg),
        Strategy::Bfs,
        2,
        Stop::FirstFailure,
    );
    let v = run.violations();
    for name in &v {
        let path = run
            .result(name)
            .and_then(|r| r.discovery.as_ref())
            .expect("a violation has a path");
        eprintln!(
            "{m:?}: \"{name}\" violated after {} steps ({} unique states, {:.1}s)",
            path.clone().into_vec().len() - 1,
            run.unique_states,
            run.elapsed.as_secs_f64()
        );
    }
    if let Some(trace) = run.first_violation_trace() {
        eprintln!("{trace}");
    }
    v
}

fn assert_caught_by(m: Mutations, budgets: (u8, u8, u8), expected: &[&str]) {
    let v = violations(m, budgets.0, budgets.1, budgets.2);
    assert!(!v.is_empty(), "mutation {m:?} survived the model checker");
    assert!(
        v.iter().any(|n| expected.contains(n)),
        "mutation {m:?} caught only by {v:?}, expected one of {expected:?}"
    );
}

/// spec: RND-2: ending a round before its writes complete lets the destination verify (or
/// start on) memory that a write has yet to reach. No guest write or fault is needed.
#[test]
fn rnd_2_skip_drain_is_caught() {
    assert_caught_by(
        Mutations {
            skip_drain: true,
            ..Default::default()
        },
        (0, 0, 2),
        // Digests catch it first now that they are ready when the final round is
        // acknowledged: a digest mismatch, which an honest pair never ends in.
        &[
            check::P_REG,
            check::P_MEM,
            check::P_MEM_DIGEST,
            check::P_HONEST,
        ],
    );
}

/// spec: REG-5, INV-REG-1: writing with a key the destination never issued.
#[test]
fn inv_reg_1_write_before_reg_result_is_caught() {
    assert_caught_by(
        Mutations {
            write_before_reg_result: true,
            ..Default::default()
        },
        (0, 0, 2),
        &[check::P_REG],
    );
}

/// spec: SW-6, INV-OWN-1: resuming after COMMIT can leave two workloads running; it takes
/// one failure after COMMIT.
#[test]
fn inv_own_1_resume_after_commit_is_caught() {
    assert_caught_by(
        Mutations {
            resume_after_commit: true,
            ..Default::default()
        },
        (1, 0, 2),
        &[check::P_OWN1, check::P_SW6],
    );
}

/// spec: REG-6, INV-REG-1: evicting a chunk with writes in flight.
#[test]
fn reg_6_evict_inflight_is_caught() {
    assert_caught_by(
        Mutations {
            evict_inflight: true,
            ..Default::default()
        },
        (0, 0, 2),
        &[check::P_REG],
    );
}

/// spec: SW-1, INV-MEM-1: skipping the scan after pausing loses a write the guest made just
/// before the pause; it takes one guest write.
#[test]
fn sw_1_skip_final_scan_is_caught() {
    assert_caught_by(
        Mutations {
            skip_final_scan: true,
            ..Default::default()
        },
        (0, 1, 2),
        &[check::P_MEM, check::P_MEM_DIGEST],
    );
}

/// spec: FC-3, INV-FC-1: sending without credit (the last credit without a grant first). It
/// takes a burst longer than the window: four registration requests after a ZERO.
#[test]
fn inv_fc_1_ignore_credits_is_caught() {
    assert_caught_by(
        Mutations {
            ignore_credits: true,
            ..Default::default()
        },
        (0, 0, 4),
        &[check::P_FC, check::P_FC3],
    );
}

/// spec: SW-6: relinquishing the workload only after COMMIT left would let a guard resume a
/// workload the destination may already run.
#[test]
fn sw_6_relinquish_after_commit_is_caught() {
    assert_caught_by(
        Mutations {
            relinquish_after_commit: true,
            ..Default::default()
        },
        (0, 0, 2),
        &[check::P_RELINQUISH],
    );
}

/// spec: ERR-4: without a deadline on outstanding writes, a data channel that goes silent
/// (or a destination that never acknowledges) leaves the source waiting forever while the
/// destination's keepalives keep everything else alive: a liveness failure. It takes the one
/// fault that silences the data channel.
#[test]
fn err_4_writes_without_deadline_is_caught() {
    assert_caught_by(
        Mutations {
            writes_without_deadline: true,
            ..Default::default()
        },
        (1, 0, 2),
        &[check::P_LIVE_END],
    );
}

/// The properties `cfg` violates first (breadth-first, so with a shortest counterexample,
/// whose trace goes to stderr).
fn first_violations(cfg: CheckConfig) -> Vec<&'static str> {
    let run = check::run(
        ProtocolModel::new(cfg),
        Strategy::Bfs,
        2,
        Stop::FirstFailure,
    );
    if let Some(trace) = run.first_violation_trace() {
        eprintln!("{trace}");
    }
    run.violations()
}

/// A hostile source (its own frames beside the honest ones) against a destination with a
/// deliberate bug: the checker's hostile-source configuration must catch it.
fn assert_hostile_source_catches(m: DstMutations, expected: &[&str]) {
    let mut cfg = CheckConfig::hostile_source();
    cfg.dst_mutations = m;
    let v = first_violations(cfg);
    assert!(
        !v.is_empty(),
        "destination mutation {m:?} survived the hostile source"
    );
    assert!(
        v.iter().any(|n| expected.contains(n)),
        "{m:?} caught only by {v:?}, expected one of {expected:?}"
    );
}

/// spec: DATA-3: a destination that zero-fills a range without checking it against the block.
#[test]
fn data_3_skipped_zero_range_check_is_caught_by_a_hostile_source() {
    assert_hostile_source_catches(
        DstMutations {
            skip_zero_range_check: true,
            ..Default::default()
        },
        &[check::P_SANE],
    );
}

/// spec: AUTH-2: a destination that takes the block table before AUTH.
#[test]
fn auth_2_table_before_auth_is_caught_by_a_hostile_source() {
    assert_hostile_source_catches(
        DstMutations {
            table_before_auth: true,
            ..Default::default()
        },
        &[check::P_AUTH2],
    );
}

/// spec: REG-4: a destination that registers beyond its pin budget.
#[test]
fn reg_4_skipped_pin_budget_is_caught_by_a_hostile_source() {
    assert_hostile_source_catches(
        DstMutations {
            skip_pin_budget: true,
            ..Default::default()
        },
        &[check::P_PIN],
    );
}

/// spec: STATE-3: a source that announces device state as placed once its writes are posted,
/// not once they completed, lets the destination feed its consumer bytes that have not
/// landed; the state-area configuration must catch it.
#[test]
fn state_3_announcing_state_before_its_writes_complete_is_caught() {
    let mut cfg = CheckConfig::state_area();
    cfg.mutations = Mutations {
        state_placed_early: true,
        ..Default::default()
    };
    cfg.faults = 0;
    cfg.guest_writes = 0;
    let v = first_violations(cfg);
    assert!(
        v.contains(&check::P_STATE3),
        "early STATE_PLACED caught only by {v:?}"
    );
}
