//! Each deliberate machine bug (the `mutations` feature) must be caught by the model checker:
//! the checker has to find a counterexample to a safety property, or the mutation survives.
//!
//! Run with `cargo test -p rdmig-model --features mutations --test mutations`.
#![cfg(feature = "mutations")]

use rdmig_model::check::{self, CheckConfig, ProtocolModel, Stop, Strategy};
use rdmig_model::source::Mutations;

/// Runs the small configuration with `m` until the first counterexample; returns the names of
/// the violated properties. Breadth-first, so the counterexample is a shortest one.
fn violations(m: Mutations) -> Vec<&'static str> {
    let mut cfg = CheckConfig::small();
    cfg.mutations = m;
    let run = check::run(ProtocolModel::new(cfg), Strategy::Bfs, 2, Stop::FirstFailure);
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
    v
}

fn assert_caught_by(m: Mutations, expected: &[&str]) {
    let v = violations(m);
    assert!(!v.is_empty(), "mutation {m:?} survived the model checker");
    assert!(
        v.iter().any(|n| expected.contains(n)),
        "mutation {m:?} caught only by {v:?}, expected one of {expected:?}"
    );
}

/// spec: RND-2: ending a round before its writes complete lets a write land after the
/// destination has moved on.
#[test]
fn rnd_2_skip_drain_is_caught() {
    assert_caught_by(
        Mutations {
            skip_drain: true,
            ..Default::default()
        },
        &[check::P_REG, check::P_MEM, check::P_MEM_DIGEST],
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
        &[check::P_REG],
    );
}

/// spec: SW-6, INV-OWN-1: resuming after COMMIT can leave two workloads running.
#[test]
fn inv_own_1_resume_after_commit_is_caught() {
    assert_caught_by(
        Mutations {
            resume_after_commit: true,
            ..Default::default()
        },
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
        &[check::P_REG],
    );
}

/// spec: SW-1, INV-MEM-1: skipping the scan after pausing loses the last writes.
#[test]
fn sw_1_skip_final_scan_is_caught() {
    assert_caught_by(
        Mutations {
            skip_final_scan: true,
            ..Default::default()
        },
        &[check::P_MEM, check::P_MEM_DIGEST],
    );
}

/// spec: FC-3, INV-FC-1: sending without credit.
#[test]
fn inv_fc_1_ignore_credits_is_caught() {
    assert_caught_by(
        Mutations {
            ignore_credits: true,
            ..Default::default()
        },
        &[check::P_FC],
    );
}
