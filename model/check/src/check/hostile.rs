//! A hostile peer: besides what its honest machine sends, it sends well-formed frames of its
//! own choosing, within the protocol's bounds, at any point (spec: section 10, "hostile
//! peer"). The honest side must stay safe and reach an outcome.

use rdmig_model::listener::LsnInput;
use rdmig_model::source::SrcInput;
use rdmig_model::wire::{self, AbortReason, ChunkRef, Frame, Message, PageRange};

use super::state::*;
use super::{Action, ProtocolModel, CTRL_CONN};

/// A frame the hostile peer sends of its own accord.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Inject {
    /// A keepalive.
    Nop,
    /// The oldest frame in flight from the honest side arrives twice.
    Duplicate,
    Abort,
    // A hostile destination:
    /// ROUND_ACK for the source's current round, whether or not it ended it.
    RoundAckNow,
    /// ROUND_ACK for a round the source has not reached.
    RoundAckAhead,
    /// REG_RESULT answering request 1 with a key the NIC never issued.
    RegResultForged,
    UnregDoneForged,
    Prepared,
    Started,
    // A hostile source:
    /// REG_REQUEST for the first chunk, numbered 1.
    RegRequest,
    /// REG_REQUEST for a chunk past the block's end.
    RegRequestOutside,
    /// REG_REQUEST for every chunk at once (more than the pin budget).
    RegRequestAll,
    /// The source's own BLOCK_TABLE, at any time (before AUTH, too).
    BlockTable,
    UnregRequest,
    /// ZERO of the first page in the destination's current round.
    ZeroInside,
    /// ZERO running past the end of the second block.
    ZeroOutside,
    /// ROUND_END closing the destination's current round as the last.
    RoundEndLast,
    /// PREPARE claiming no device state and every digest.
    Prepare,
    Commit,
}

const FROM_DESTINATION: [Inject; 9] = [
    Inject::Nop,
    Inject::Duplicate,
    Inject::Abort,
    Inject::RoundAckNow,
    Inject::RoundAckAhead,
    Inject::RegResultForged,
    Inject::UnregDoneForged,
    Inject::Prepared,
    Inject::Started,
];

const FROM_SOURCE: [Inject; 13] = [
    Inject::Nop,
    Inject::Duplicate,
    Inject::Abort,
    Inject::BlockTable,
    Inject::RegRequest,
    Inject::RegRequestOutside,
    Inject::RegRequestAll,
    Inject::UnregRequest,
    Inject::ZeroInside,
    Inject::ZeroOutside,
    Inject::RoundEndLast,
    Inject::Prepare,
    Inject::Commit,
];

impl ProtocolModel {
    pub(super) fn hostile_actions(&self, s: &State, out: &mut Vec<Action>) {
        if s.ctrl != Link::Up || s.ctrl_closed {
            return;
        }
        let choices: &[Inject] = match self.cfg.adversary {
            Some(Adversary::Destination) if s.src_live() => &FROM_DESTINATION,
            Some(Adversary::Source) if s.dst_live() => &FROM_SOURCE,
            _ => &[],
        };
        for &i in choices {
            let queue = match self.cfg.adversary {
                Some(Adversary::Destination) => &s.d2s,
                _ => &s.s2d,
            };
            if i != Inject::Duplicate || !queue.is_empty() {
                out.push(Action::Inject(i));
            }
        }
    }

    /// Delivers the hostile frame at once (it overtakes nothing the honest side has queued:
    /// it arrives next). One arm per frame of the alphabet; its length is the alphabet's.
    pub(super) fn inject(&self, s: &mut State, i: Inject) {
        let dst_round = s.lsn.session().map_or(1, |d| d.round());
        let total_chunks = s.src.geometry().total_chunks;
        let msg = match i {
            Inject::Nop => Message::Nop,
            Inject::Abort => Message::Abort {
                reason: AbortReason::Cancelled,
            },
            Inject::Duplicate => {
                let q = match self.cfg.adversary {
                    Some(Adversary::Destination) => &s.d2s,
                    _ => &s.s2d,
                };
                let Some(bytes) = q.front().cloned() else {
                    return;
                };
                return self.deliver_hostile(s, bytes);
            }
            Inject::RoundAckNow => Message::RoundAck {
                round: s.src.round(),
            },
            Inject::RoundAckAhead => Message::RoundAck {
                round: s.src.round() + 1,
            },
            Inject::RegResultForged => Message::RegResult {
                req_id: 1,
                rkeys: vec![0xbad],
            },
            Inject::UnregDoneForged => Message::UnregDone {
                req_id: 1,
                count: 1,
            },
            Inject::Prepared => Message::Prepared,
            Inject::Started => Message::Started,
            Inject::RegRequest => Message::RegRequest {
                req_id: 1,
                chunks: vec![ChunkRef { block: 0, chunk: 0 }],
            },
            Inject::RegRequestOutside => Message::RegRequest {
                req_id: 1,
                chunks: vec![ChunkRef {
                    block: 0,
                    chunk: 99,
                }],
            },
            Inject::RegRequestAll => Message::RegRequest {
                req_id: 1,
                chunks: (0..total_chunks)
                    .map(|g| s.src.geometry().chunk_of_global(g))
                    .collect(),
            },
            Inject::BlockTable => Message::BlockTable {
                blocks: self.machines[0].0.blocks.clone(),
            },
            Inject::UnregRequest => Message::UnregRequest {
                req_id: 1,
                chunks: vec![ChunkRef { block: 0, chunk: 0 }],
            },
            Inject::ZeroInside => Message::Zero {
                round: dst_round,
                ranges: vec![PageRange {
                    block: 0,
                    first_page: 0,
                    page_count: 1,
                }],
            },
            Inject::ZeroOutside => Message::Zero {
                round: dst_round,
                ranges: vec![PageRange {
                    block: 1,
                    first_page: 1,
                    page_count: 100,
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
                digest_count: total_chunks,
                state_digest: 0,
            },
            Inject::Commit => Message::Commit,
        };
        let bytes = wire::encode_to_vec(&Frame { credits: 0, msg }).expect("well-formed");
        self.deliver_hostile(s, bytes);
    }

    fn deliver_hostile(&self, s: &mut State, bytes: Vec<u8>) {
        match self.cfg.adversary {
            Some(Adversary::Destination) => {
                let input = match wire::decode(&bytes) {
                    Ok(f) => SrcInput::Frame(f),
                    Err(e) => SrcInput::Malformed(e),
                };
                self.feed_src(s, input);
            }
            _ => {
                let frame = wire::decode(&bytes);
                self.feed_lsn(
                    s,
                    LsnInput::Frame {
                        conn: CTRL_CONN,
                        frame,
                    },
                );
            }
        }
    }
}
