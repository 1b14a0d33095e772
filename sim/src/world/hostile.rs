//! A hostile peer: besides its honest frames it sends well-formed frames of its own choosing
//! (spec: section 10, "hostile peer"). Its frames arrive at once on the control connection.
//! A run with hostile frames is not an honest pair: it may end in ProtocolViolation, but the
//! honest side's safety and liveness still hold.

use rdmig_model::wire::{AbortReason, ChunkRef, PageRange};

use super::*;

/// A frame the hostile peer sends of its own accord.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    Nop,
    /// The last frame the honest side sent, again.
    Replay,
    Abort,
    RoundAck,
    RegResult,
    Prepared,
    Started,
    RegRequest,
    ZeroOutside,
    RoundEndLast,
    Prepare,
    Commit,
}

const FROM_DESTINATION: [Inject; 7] = [
    Inject::Nop,
    Inject::Replay,
    Inject::Abort,
    Inject::RoundAck,
    Inject::RegResult,
    Inject::Prepared,
    Inject::Started,
];

const FROM_SOURCE: [Inject; 8] = [
    Inject::Nop,
    Inject::Replay,
    Inject::Abort,
    Inject::RegRequest,
    Inject::ZeroOutside,
    Inject::RoundEndLast,
    Inject::Prepare,
    Inject::Commit,
];

impl Sim {
    /// The hostile `side` sends a frame of its choosing now.
    pub(super) fn inject(&mut self, side: usize) -> R {
        let receiver = 1 - side;
        if self.crashed[receiver] || self.done(receiver) || !self.ctrl_alive {
            return Ok(());
        }
        let choices: &[Inject] = if side == DST {
            &FROM_DESTINATION
        } else {
            &FROM_SOURCE
        };
        let i = choices[self.fault_rng.below(choices.len() as u64) as usize];
        let dst_round = self.lsn.session().map_or(1, |d| d.round());
        let msg = match i {
            Inject::Nop => Message::Nop,
            Inject::Replay => {
                let Some(bytes) = self.last_sent[side].clone() else {
                    return Ok(());
                };
                return self.deliver_hostile(side, bytes, i);
            }
            Inject::Abort => Message::Abort {
                reason: AbortReason::Cancelled,
            },
            Inject::RoundAck => Message::RoundAck {
                round: self.src.round(),
            },
            Inject::RegResult => Message::RegResult {
                req_id: 1,
                rkeys: vec![0xbad],
            },
            Inject::Prepared => Message::Prepared,
            Inject::Started => Message::Started,
            Inject::RegRequest => Message::RegRequest {
                req_id: 1,
                chunks: vec![ChunkRef { block: 0, chunk: 0 }],
            },
            Inject::ZeroOutside => Message::Zero {
                round: dst_round,
                ranges: vec![PageRange {
                    block: 0,
                    first_page: u32::MAX - 1,
                    page_count: 1,
                }],
            },
            Inject::RoundEndLast => Message::RoundEnd {
                round: dst_round,
                last: true,
                data_bytes: 0,
                zero_pages: 0,
            },
            Inject::Prepare => Message::Prepare {
                state_len: 0,
                digest_count: 0,
                state_digest: 0,
            },
            Inject::Commit => Message::Commit,
        };
        let bytes = wire::encode_to_vec(&Frame { credits: 0, msg }).expect("well-formed");
        self.deliver_hostile(side, bytes, i)
    }

    fn deliver_hostile(&mut self, side: usize, bytes: Vec<u8>, i: Inject) -> R {
        self.hostile_frames += 1;
        self.record_fault(FaultKind::Hostile, i as u64);
        let frame = wire::decode(&bytes);
        match side {
            DST => self.feed_src(frame.map_or_else(SrcInput::Malformed, SrcInput::Frame)),
            _ => self.feed_lsn(LsnInput::Frame {
                conn: CTRL_CONN,
                frame,
            }),
        }
    }
}
