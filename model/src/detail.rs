//! Why a side ended without completing: one variant per cause, so tests, the checker and
//! operators can tell causes apart without parsing text. `Display` gives the line an operator
//! reads in the report.

use thiserror::Error;

/// The exact cause of an abort or of an in-doubt end. The coarse class that travels on the
/// wire is the [`AbortReason`](crate::wire::AbortReason) beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Error)]
#[non_exhaustive]
pub enum Detail {
    // ---- the operator, the environment, the peer's own decision
    #[error("cancelled by operator")]
    Cancelled,
    #[error("transport failed")]
    TransportFailed,
    #[error("a data channel failed before the final round was acknowledged")]
    DataChannelLost,
    #[error("a write completed with an error")]
    WriteFailed,
    #[error("peer silent past the idle timeout")]
    IdleTimeout,
    /// spec: ERR-4: a reply, a write completion, a data channel or credits awaited for the
    /// whole progress timeout (keepalives do not count as progress).
    #[error("no progress from the peer within the timeout")]
    NoProgress,
    #[error("the peer aborted")]
    PeerAborted,
    #[error("round or time limit reached without converging")]
    NotConverged,
    #[error("memory registration failed")]
    RegistrationFailed,
    #[error("workload pause failed")]
    PauseFailed,
    #[error("workload failed to start")]
    StartFailed,
    #[error("received memory differs from the source")]
    DigestMismatch,
    #[error("received device state differs from the source's")]
    StateDigest,
    #[error("the device state's consumer refused it")]
    StateRefused,

    // ---- negotiation (HELLO, HELLO_ACK, AUTH, BLOCK_TABLE)
    #[error("no common protocol version")]
    NoCommonVersion,
    #[error("unsupported version chosen")]
    VersionChosen,
    #[error("source offered no authentication")]
    PeerInsecure,
    #[error("destination configured insecure")]
    LocalInsecure,
    #[error("destination failed to prove the key")]
    DestinationKey,
    #[error("source failed to prove the key")]
    SourceKey,
    #[error("unknown block")]
    UnknownBlock,
    #[error("duplicate block")]
    DuplicateBlock,
    #[error("block length or page size differs")]
    BlockDiffers,
    #[error("a local block is missing from the table")]
    MissingBlock,
    #[error("block page size larger than chunk size")]
    PageOverChunk,
    #[error("too many chunks")]
    TooManyChunks,
    #[error("pin-all needs more than the pin budget")]
    PinAllOverBudget,
    #[error("pin budget below one chunk")]
    BudgetBelowChunk,
    #[error("registration would exceed the pin budget")]
    OverBudget,

    // ---- protocol violations by the peer
    #[error("malformed frame")]
    Malformed,
    #[error("frame outside protocol bounds")]
    OutOfBounds,
    #[error("peer sent a frame without credit")]
    NoCredit,
    #[error("credit grant exceeds the peer's window")]
    OverGrant,
    #[error("message not allowed in this phase")]
    WrongPhase,
    #[error("HELLO_ACK for another session")]
    OtherSession,
    #[error("HELLO_ACK parameters not a narrowing of HELLO")]
    NotNarrowing,
    #[error("MAC present in insecure mode")]
    MacInInsecure,
    #[error("authentication mode changed")]
    AuthModeChanged,
    #[error("BLOCK_TABLE_ACK count differs from the table")]
    TableAckCount,
    #[error("block keys in dynamic mode")]
    KeysInDynamic,
    #[error("REG_RESULT with no request outstanding")]
    UnaskedRegResult,
    #[error("REG_RESULT does not answer the oldest request")]
    RegResultMismatch,
    #[error("UNREG_DONE with no request outstanding")]
    UnaskedUnregDone,
    #[error("UNREG_DONE does not answer the oldest request")]
    UnregDoneMismatch,
    #[error("ROUND_ACK for another round")]
    RoundAckMismatch,
    #[error("STARTED before COMMIT")]
    StartedBeforeCommit,
    #[error("source is not returning credits")]
    OutboxOverflow,
    #[error("REG_REQUEST in pin-all mode")]
    RegInPinAll,
    #[error("REG_REQUEST id out of sequence")]
    RegIdSequence,
    #[error("too many registration requests in flight")]
    RegInflight,
    #[error("REG_REQUEST names a chunk outside the block table")]
    RegChunkRange,
    #[error("REG_REQUEST names a chunk already registered")]
    RegChunkTaken,
    #[error("UNREG_REQUEST in pin-all mode")]
    UnregInPinAll,
    #[error("UNREG_REQUEST id out of sequence")]
    UnregIdSequence,
    #[error("UNREG_REQUEST names an invalid or repeated chunk")]
    UnregChunkRange,
    #[error("UNREG_REQUEST names a chunk that is not registered")]
    UnregNotRegistered,
    #[error("ZERO without zero elision negotiated")]
    ZeroNotNegotiated,
    #[error("ZERO for another round")]
    ZeroRound,
    #[error("ZERO range outside its block")]
    ZeroRange,
    #[error("ROUND_END for another round")]
    RoundEndMismatch,
    #[error("ROUND_END with registration outstanding")]
    RoundEndBusy,
    #[error("device state total changed")]
    StateTotalChanged,
    #[error("device state not contiguous")]
    StateGap,
    #[error("DEVICE_STATE in a session whose device state uses the state area")]
    StateOnControl,
    #[error("STATE_PLACED in a session without a state area")]
    NoStateArea,
    #[error("STATE_PLACED not growing, or beyond the state area")]
    StatePlacedOrder,
    #[error("REG_REQUEST after the final round names a chunk outside the state area")]
    RegOutsideStateArea,
    #[error("PREPARE with a registration outstanding")]
    PrepareBusy,
    #[error("HELLO_ACK offers a state area larger than proposed")]
    StateAreaOverMax,
    #[error("digests out of order or beyond the chunk count")]
    DigestOrder,
    #[error("PREPARE counts differ from what was received")]
    PrepareCounts,

    // ---- the local driver did something the machine did not ask for
    #[error("start given twice")]
    StartTwice,
    #[error("input not requested in this phase")]
    Unrequested,
    #[error("a data channel reported open twice or out of range")]
    DataChannelUnknown,
    #[error("completion for an unknown write")]
    UnknownWrite,
    #[error("dirty scan does not match the block table")]
    ScanShape,
    #[error("device state larger than the protocol allows")]
    StateTooLarge,
    #[error("device state larger than the negotiated state area")]
    StateOverArea,
    #[error("device state bytes reported shrinking or after the end")]
    StateProgress,
    #[error("digest count differs from chunk count")]
    DigestCount,
    #[error("registration result for a block or chunk not being registered")]
    UnknownRegistration,
}
