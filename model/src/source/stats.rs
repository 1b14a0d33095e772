//! What the source observes for reports. Nothing here decides anything: the machine only
//! writes it (into the [`Out`](crate::Out) sink), never reads it.

use crate::types::Millis;

/// Per-round observations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundStats {
    pub round: u32,
    pub last: bool,
    pub dirty_pages: u64,
    pub zero_pages: u64,
    pub data_bytes: u64,
    pub writes: u64,
    pub started_ms: Millis,
    pub duration_ms: Millis,
}

/// Observations over the whole migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStats {
    pub rounds: Vec<RoundStats>,
    pub reg_requests: u64,
    pub reg_chunks: u64,
    pub unreg_requests: u64,
    pub unreg_chunks: u64,
    pub control_frames_sent: u64,
    pub control_frames_received: u64,
    pub data_bytes: u64,
    /// Device-state bytes written into the state area, and the writes that carried them.
    pub state_bytes: u64,
    pub state_writes: u64,
    pub zero_pages: u64,
    pub zero_messages: u64,
    pub started_at_ms: Option<Millis>,
    /// BLOCK_TABLE_ACK received: the handshake is over.
    pub setup_done_ms: Option<Millis>,
    /// Every data channel joined.
    pub channels_open_ms: Option<Millis>,
    pub paused_at_ms: Option<Millis>,
    /// The final ROUND_ACK arrived: memory is in place, the tail begins.
    pub final_round_acked_ms: Option<Millis>,
    /// PREPARE sent.
    pub prepare_sent_ms: Option<Millis>,
    /// COMMIT handed to the transport.
    pub commit_sent_ms: Option<Millis>,
    pub finished_at_ms: Option<Millis>,
}
