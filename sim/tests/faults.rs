//! A fixed seed per fault kind, each striking on a small migrating guest, with the run's
//! summary snapshotted (insta): outcome, timing, bytes, rounds. Every run must also pass all
//! invariant checks, and the fault must really have been injected.

mod common;

use rdmig_sim::faults::FaultKind;
use rdmig_sim::run;

fn scenario(name: &str, cfg: rdmig_sim::SimConfig, expect_injected: Option<FaultKind>) {
    let r = run(cfg).expect("valid config");
    if let Some(f) = &r.failure {
        panic!("{name}: {f}");
    }
    if let Some(k) = expect_injected {
        assert!(
            r.report.faults_injected.contains_key(k.name()),
            "{name}: {} never struck",
            k.name()
        );
    }
    insta::assert_snapshot!(format!("fault_{name}"), common::summary(&r.report));
}

#[test]
fn no_faults() {
    scenario("none", common::small(1, "rdma-100g"), None);
}

#[test]
fn connection_loss() {
    let c = common::small(3, "rdma-100g").with_fault(FaultKind::ConnectionLoss);
    scenario("connection_loss", c, Some(FaultKind::ConnectionLoss));
}

#[test]
fn completion_delay() {
    let c = common::small(1, "rdma-100g").with_fault(FaultKind::CompletionDelay);
    scenario("completion_delay", c, Some(FaultKind::CompletionDelay));
}

#[test]
fn completion_reorder() {
    let c = common::small(1, "rdma-100g").with_fault(FaultKind::CompletionReorder);
    scenario("completion_reorder", c, Some(FaultKind::CompletionReorder));
}

#[test]
fn registration_failure() {
    let c = common::small(1, "rdma-100g").with_fault(FaultKind::RegistrationFailure);
    scenario(
        "registration_failure",
        c,
        Some(FaultKind::RegistrationFailure),
    );
}

#[test]
fn pin_budget_below_one_chunk() {
    let c = common::small(1, "rdma-100g").with_fault(FaultKind::PinBudget);
    scenario("pin_budget_below_chunk", c, None);
}

#[test]
fn pin_budget_of_a_few_chunks() {
    // Seed 6 draws a budget just over one chunk: eviction on every registration.
    let c = common::small(6, "rdma-100g").with_fault(FaultKind::PinBudget);
    scenario("pin_budget_few_chunks", c, None);
}

#[test]
fn slow_receiver() {
    let c = common::small(2, "rdma-100g").with_fault(FaultKind::SlowReceiver);
    scenario("slow_receiver", c, Some(FaultKind::SlowReceiver));
}

#[test]
fn source_crash() {
    let c = common::small(3, "rdma-100g").with_fault(FaultKind::SourceCrash);
    scenario("source_crash", c, Some(FaultKind::SourceCrash));
}

#[test]
fn destination_crash() {
    let c = common::small(3, "rdma-100g").with_fault(FaultKind::DestinationCrash);
    scenario("destination_crash", c, Some(FaultKind::DestinationCrash));
}

#[test]
fn cancel() {
    let c = common::small(3, "rdma-100g").with_fault(FaultKind::Cancel);
    scenario("cancel", c, Some(FaultKind::Cancel));
}

#[test]
fn wrong_key() {
    let c = common::small(1, "rdma-100g").with_fault(FaultKind::WrongKey);
    scenario("wrong_key", c, None);
}

#[test]
fn tcp_connection_loss() {
    let c = common::small(5, "tcp-25g").with_fault(FaultKind::ConnectionLoss);
    scenario("tcp_connection_loss", c, Some(FaultKind::ConnectionLoss));
}

/// The destination takes longer to start than the source waits for STARTED and sends no
/// keepalive meanwhile: the source ends in doubt, legitimately, because COMMIT had left
/// (spec: INV-DOUBT-1), while the destination starts.
#[test]
fn in_doubt_after_commit() {
    let mut c = common::small(1, "rdma-100g");
    c.guest.start_ns = 800_000_000;
    c.migration.keepalive_ms = 0;
    let r = run(c.clone()).unwrap();
    assert!(r.failure.is_none(), "{}", r.failure.unwrap());
    assert_eq!(r.report.outcome.class, "in-doubt, destination started");
    scenario("in_doubt", c, None);
}
