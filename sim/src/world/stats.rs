//! What a run measures, and how a failed run reports itself.

use crate::faults::FaultKind;

/// An invariant violation (or a livelock, or a machine panic) with what it takes to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    /// The spec ID of the violated invariant or rule, `LIVENESS`, or `PANIC`.
    pub invariant: &'static str,
    pub detail: String,
    pub at_ns: u64,
    pub tail: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "VIOLATION {} at {:.6} ms (seed {}): {}",
            self.invariant,
            self.at_ns as f64 / 1e6,
            self.seed,
            self.detail
        )?;
        writeln!(f, "trace tail (oldest first):")?;
        for l in &self.tail {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

pub(super) type R = Result<(), Failure>;

/// Why the source posted a write after the link went idle: the input that unblocked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A REG_RESULT made chunks writable.
    Registration,
    /// An UNREG_DONE freed pin budget.
    Eviction,
    /// A completion freed a send-queue slot.
    Completion,
    /// A dirty scan started a round.
    RoundStart,
    Other,
}

pub const CAUSES: [&str; 5] = [
    "registration",
    "eviction",
    "send-queue",
    "round-start",
    "other",
];

/// CPU time charged to one side by the cost model, nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpu {
    /// Copies and checksums of TCP, per byte.
    pub transport_ns: u64,
    /// Posting write requests / send syscalls.
    pub requests_ns: u64,
    /// Dirty scans with zero-page detection.
    pub scan_ns: u64,
    pub digest_ns: u64,
    /// Pinning and unpinning memory.
    pub registration_ns: u64,
    pub zero_fill_ns: u64,
    pub control_ns: u64,
}

impl Cpu {
    pub fn total_ns(&self) -> u64 {
        self.transport_ns
            + self.requests_ns
            + self.scan_ns
            + self.digest_ns
            + self.registration_ns
            + self.zero_fill_ns
            + self.control_ns
    }
}

/// Timing of one round as the simulator saw it, in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundTiming {
    pub round: u32,
    /// The dirty scan result reached the source and the round began.
    pub start_ns: u64,
    pub first_post_ns: Option<u64>,
    pub last_place_ns: Option<u64>,
    /// ROUND_ACK reached the source.
    pub end_ns: Option<u64>,
    /// Payload bytes placed during the round.
    pub placed_bytes: u64,
    /// Link time of the round's writes, headers included.
    pub wire_ns: u64,
    /// Link time of the headers alone.
    pub header_ns: u64,
    /// Link idle between two of the round's writes, by what ended the gap (see `CAUSES`).
    pub gap_ns: [u64; 5],
    /// Registration-thread time of the work the destination started during the round.
    pub reg_ns: u64,
}

/// Everything measured during a run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub writes_posted: u64,
    pub writes_failed: u64,
    pub data_posted_bytes: u64,
    pub data_placed_bytes: u64,
    pub data_wire_bytes: u64,
    pub zero_frames: u64,
    pub zero_frame_bytes: u64,
    pub control_frames: u64,
    pub control_bytes: u64,
    pub frames_lost: u64,
    /// Time the source-to-destination link spent transmitting.
    pub link_busy_ns: u64,
    pub registrations: u64,
    pub unregistrations: u64,
    /// Time the destination's registration threads were busy (summed over threads).
    pub reg_busy_ns: u64,
    pub cpu: [Cpu; 2],
    /// Payload bytes placed per `BIN_NS` of virtual time.
    pub bins: Vec<u64>,
    /// Link idle time between two writes of a round, by what ended it (see `CAUSES`).
    pub idle_gap_ns: [u64; 5],
    pub rounds: Vec<RoundTiming>,
    /// (time, kind, detail) of every fault injected.
    pub faults: Vec<(u64, FaultKind, u64)>,
    pub setup_done_ns: Option<u64>,
    pub paused_ns: Option<u64>,
    pub commit_sent_ns: Option<u64>,
    pub dst_started_ns: Option<u64>,
    pub finished_ns: [Option<u64>; 2],
    /// What the source expected the final round to take when it switched over
    /// (dirty bytes of the last scan at the bandwidth it measured; spec: CONV-1).
    pub predicted_downtime_ns: Option<u64>,
    pub last_scan_dirty_bytes: u64,
    pub memory_verified: bool,
    pub phases: Vec<(u64, usize, String)>,
    pub guest_pages_written: u64,
    /// The source entered Finalizing: the final ROUND_ACK reached it.
    pub final_ack_ns: Option<u64>,
    /// The source sent PREPARE.
    pub prepare_sent_ns: Option<u64>,
    /// With a state area: when the VMM finished producing the device state, when the
    /// destination's consumer finished taking it, the bytes fed to it, and the device-state
    /// bytes placed in the area, in all and per data channel (spec: STATE-3, STATE-4).
    pub state_done_ns: Option<u64>,
    pub state_loaded_ns: Option<u64>,
    pub state_fed_bytes: u64,
    pub state_placed_bytes: u64,
    /// The state area's writes on the wire, headers included (not in `data_wire_bytes`).
    pub state_wire_bytes: u64,
    pub state_placed_by_channel: Vec<u64>,
}
