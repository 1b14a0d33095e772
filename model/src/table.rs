//! The transition tables of both machines, declared as data (spec: section "State tables").
//!
//! Each machine asserts that every phase change it makes is listed here, so the table cannot
//! drift from the code; tests snapshot it, so any added or removed edge is a reviewable diff.

/// Source phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SrcPhase {
    /// Created, waiting for the operator's start.
    Idle,
    /// HELLO sent.
    AwaitHelloAck,
    /// AUTH and BLOCK_TABLE sent.
    AwaitTableAck,
    /// Dirty log scan requested for the next round.
    Scanning,
    /// Round in progress: zero ranges, registrations, evictions, writes.
    Sending,
    /// ROUND_END sent.
    AwaitRoundAck,
    /// Converged (or out of rounds): workload pause requested.
    Pausing,
    /// Final round acknowledged: sending the device state (DEVICE_STATE, or writes into the
    /// state area announced by STATE_PLACED), the digests and PREPARE.
    Finalizing,
    /// PREPARE sent.
    AwaitPrepared,
    /// COMMIT sent: the source will never resume (spec: SW-6).
    AwaitStarted,
    Done,
}

/// Destination phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DstPhase {
    AwaitHello,
    /// HELLO_ACK sent, waiting for the source's proof of the key.
    AwaitAuth,
    AwaitTable,
    /// Pin-all: registering every block.
    Pinning,
    /// Rounds in progress.
    Receiving,
    /// Final ROUND_END received: device state (on the control channel, or over the data
    /// channels into the state area), digests, PREPARE.
    ReceivingTail,
    /// PREPARE received: the device state's consumer finishing, digests being computed.
    Verifying,
    /// PREPARED sent; starts only on COMMIT (spec: SW-7).
    Prepared,
    /// COMMIT received, workload start requested.
    Starting,
    Done,
}

/// What moved a machine from one phase to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    Start,
    HelloAck,
    TableAck,
    DirtyScan,
    RoundQuiescent,
    RoundAck,
    Converged,
    WorkloadPaused,
    FinalRoundAck,
    TailSent,
    PreparedMsg,
    StartedMsg,
    Hello,
    Auth,
    TableDynamic,
    TablePinAll,
    Pinned,
    RoundEnd,
    LastRoundEnd,
    Prepare,
    Verified,
    CommitMsg,
    WorkloadStarted,
    Abort,
    InDoubt,
}

use DstPhase as D;
use Event as E;
use SrcPhase as S;

/// Every source transition: (from, event, to, spec requirement).
pub const SOURCE: &[(SrcPhase, Event, SrcPhase, &str)] = &[
    (S::Idle, E::Start, S::AwaitHelloAck, "HS-1"),
    (S::AwaitHelloAck, E::HelloAck, S::AwaitTableAck, "AUTH-3"),
    (S::AwaitTableAck, E::TableAck, S::Scanning, "BLK-2"),
    (S::Scanning, E::DirtyScan, S::Sending, "CONV-1"),
    (S::Scanning, E::Converged, S::Pausing, "SW-1"),
    (S::Sending, E::RoundQuiescent, S::AwaitRoundAck, "RND-2"),
    (S::AwaitRoundAck, E::RoundAck, S::Scanning, "RND-3"),
    (S::AwaitRoundAck, E::FinalRoundAck, S::Finalizing, "SW-2"),
    (S::Pausing, E::WorkloadPaused, S::Scanning, "SW-1"),
    (S::Finalizing, E::TailSent, S::AwaitPrepared, "SW-5"),
    (S::AwaitPrepared, E::PreparedMsg, S::AwaitStarted, "SW-6"),
    (S::AwaitStarted, E::StartedMsg, S::Done, "SW-7"),
    (S::AwaitStarted, E::InDoubt, S::Done, "ERR-3"),
    (S::Idle, E::Abort, S::Done, "ERR-1"),
    (S::AwaitHelloAck, E::Abort, S::Done, "ERR-1"),
    (S::AwaitTableAck, E::Abort, S::Done, "ERR-1"),
    (S::Scanning, E::Abort, S::Done, "ERR-1"),
    (S::Sending, E::Abort, S::Done, "ERR-1"),
    (S::AwaitRoundAck, E::Abort, S::Done, "ERR-1"),
    (S::Pausing, E::Abort, S::Done, "ERR-1"),
    (S::Finalizing, E::Abort, S::Done, "ERR-1"),
    (S::AwaitPrepared, E::Abort, S::Done, "ERR-1"),
    (S::AwaitStarted, E::Abort, S::Done, "SW-7"),
];

/// Every destination transition: (from, event, to, spec requirement).
pub const DESTINATION: &[(DstPhase, Event, DstPhase, &str)] = &[
    (D::AwaitHello, E::Hello, D::AwaitAuth, "HS-3"),
    (D::AwaitAuth, E::Auth, D::AwaitTable, "AUTH-2"),
    (D::AwaitTable, E::TableDynamic, D::Receiving, "BLK-2"),
    (D::AwaitTable, E::TablePinAll, D::Pinning, "REG-8"),
    (D::Pinning, E::Pinned, D::Receiving, "REG-8"),
    (D::Receiving, E::RoundEnd, D::Receiving, "RND-4"),
    (D::Receiving, E::LastRoundEnd, D::ReceivingTail, "SW-2"),
    (D::ReceivingTail, E::Prepare, D::Verifying, "SW-5"),
    (D::Verifying, E::Verified, D::Prepared, "STATE-4"),
    (D::Prepared, E::CommitMsg, D::Starting, "SW-7"),
    (D::Starting, E::WorkloadStarted, D::Done, "SW-7"),
    (D::AwaitHello, E::Abort, D::Done, "ERR-1"),
    (D::AwaitAuth, E::Abort, D::Done, "ERR-1"),
    (D::AwaitTable, E::Abort, D::Done, "ERR-1"),
    (D::Pinning, E::Abort, D::Done, "ERR-1"),
    (D::Receiving, E::Abort, D::Done, "ERR-1"),
    (D::ReceivingTail, E::Abort, D::Done, "ERR-1"),
    (D::Verifying, E::Abort, D::Done, "ERR-1"),
    (D::Prepared, E::Abort, D::Done, "ERR-1"),
    (D::Starting, E::Abort, D::Done, "ERR-1"),
];

/// Asserts a source transition is in the table (TigerBeetle-style production assertion).
pub fn check_source(from: SrcPhase, ev: Event, to: SrcPhase) {
    assert!(
        SOURCE
            .iter()
            .any(|&(f, e, t, _)| f == from && e == ev && t == to),
        "source transition {from:?} --{ev:?}--> {to:?} is not in the table"
    );
}

/// Asserts a destination transition is in the table.
pub fn check_destination(from: DstPhase, ev: Event, to: DstPhase) {
    assert!(
        DESTINATION
            .iter()
            .any(|&(f, e, t, _)| f == from && e == ev && t == to),
        "destination transition {from:?} --{ev:?}--> {to:?} is not in the table"
    );
}

/// The tables rendered as Markdown, as they appear in the spec.
pub fn render() -> String {
    let mut s = String::from("### Source\n\n| from | event | to | spec |\n|---|---|---|---|\n");
    for (f, e, t, id) in SOURCE {
        s += &format!("| {f:?} | {e:?} | {t:?} | {id} |\n");
    }
    s += "\n### Destination\n\n| from | event | to | spec |\n|---|---|---|---|\n";
    for (f, e, t, id) in DESTINATION {
        s += &format!("| {f:?} | {e:?} | {t:?} | {id} |\n");
    }
    s
}
