//! Device state over the data channels (spec: section 7.4, STATE-1 .. STATE-5): one test per
//! requirement, each driving a machine with what a broken or malicious peer or driver would
//! give it, and asserting the exact reaction. Together they are the bad-input table of the
//! state area.

mod common;

use common::{assert_abort, frame, quiet};
use rdmig_check::pair::Pair;
use rdmig_model::table::{DstPhase, SrcPhase};
use rdmig_model::wire::*;
use rdmig_model::*;

const KEY: &[u8] = b"k3y";
/// The state area both sides agree on: three 16 KiB chunks.
const AREA: u64 = 48 << 10;

fn blocks() -> Vec<BlockDesc> {
    vec![BlockDesc {
        name: b"ram0".to_vec(),
        length: 64 << 10,
        page_log2: 12,
    }]
}

fn src_cfg(state_max: u64) -> SourceConfig {
    let mut s = SourceConfig::with_defaults(7, blocks(), Some(KEY.to_vec()));
    s.params.chunk_log2 = 14;
    s.params.channels = 2;
    s.credit_window = 8;
    s.state_max = state_max;
    s
}

fn dst_cfg(capacity: u64) -> DestConfig {
    // A budget of three chunks: the tail must evict RAM chunks to register the area.
    let mut d = DestConfig::with_defaults(blocks(), Some(KEY.to_vec()), 48 << 10);
    d.credit_window = 8;
    d.state_capacity = capacity;
    d
}

/// 40,000 bytes of device state: ten pages, the last one partial.
fn device_state() -> Vec<u8> {
    (0..40_000u32).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn pair(state_max: u64, capacity: u64) -> Pair {
    Pair::new(
        src_cfg(state_max),
        dst_cfg(capacity),
        quiet(),
        device_state(),
    )
    .unwrap()
}

/// A pair whose source just entered Finalizing: the destination is in ReceivingTail.
fn tail_pair() -> Pair {
    let mut p = pair(AREA, AREA);
    p.run_until_source(SrcPhase::Finalizing, 100_000);
    assert_eq!(p.src.phase(), SrcPhase::Finalizing);
    assert_eq!(p.dst.phase(), DstPhase::ReceivingTail);
    p
}

/// A pair stepped until the destination verifies (PREPARE arrived), before the consumer's
/// answer is fed.
fn verifying_pair() -> Pair {
    let mut p = pair(AREA, AREA);
    p.run_until_source(SrcPhase::Finalizing, 100_000);
    for _ in 0..100_000 {
        if p.dst.phase() == DstPhase::Verifying {
            return p;
        }
        p.step();
    }
    panic!("the destination never verified");
}

fn assert_dst_abort(cmds: &[DstCommand], reason: AbortReason, detail: Detail) {
    assert_abort(cmds, reason, detail);
    assert!(
        !cmds.iter().any(|c| matches!(c, DstCommand::StartWorkload)),
        "nothing starts"
    );
}

/// spec: STATE-1 .. STATE-4: a migration whose device state goes over the data channels
/// completes, the state area's chunks registered after RAM chunks made room for them, and
/// the consumer holds the source's state when the workload starts.
#[test]
fn state_3_a_device_state_streams_into_the_state_area_and_reaches_the_consumer() {
    let mut p = pair(AREA, AREA);
    let r = p.run(200_000);
    assert_eq!(r.source, Some(Outcome::Completed));
    assert_eq!(r.destination, Some(Outcome::Completed));
    assert_eq!(
        r.memory_equal_at_start,
        Some(true),
        "memory and state equal"
    );
    assert!(p.src_stats.state_bytes >= 40_000, "{:?}", p.src_stats);
    assert!(
        p.src_stats.unreg_chunks > 0,
        "RAM chunks evicted for the area"
    );
    assert_eq!(p.dst_stats.state_bytes, 40_000);
}

/// spec: STATE-1: the state area is the smaller of the proposal and the destination's
/// capacity, and 0 (the control channel) when either side has none.
#[test]
fn state_1_the_area_is_the_smaller_of_proposal_and_capacity() {
    for (max, cap, want) in [(AREA, 1 << 20, AREA), (1 << 20, AREA, AREA), (AREA, 0, 0)] {
        let mut s = Source::new(src_cfg(max), [1; 32]).unwrap();
        let mut d = Destination::new(dst_cfg(cap), [2; 32]).unwrap();
        let hello = match &s.step(0, SrcInput::Start)[..] {
            [SrcCommand::Send(f)] => f.clone(),
            other => panic!("{other:?}"),
        };
        let ack = d.step(0, DstInput::Frame(hello));
        let got = ack.iter().find_map(|c| match c {
            DstCommand::Send(Frame {
                msg: Message::HelloAck(a),
                ..
            }) => Some(a.state_capacity),
            _ => None,
        });
        assert_eq!(got, Some(want), "state_max {max}, capacity {cap}");
    }
    // Without a state area the device state still travels, on the control channel.
    let mut p = pair(AREA, 0);
    let r = p.run(200_000);
    assert_eq!(r.memory_equal_at_start, Some(true));
    assert_eq!(p.src_stats.state_bytes, 0, "no state-area writes");
}

/// spec: STATE-1: a HELLO_ACK offering a larger area than proposed is a protocol violation.
#[test]
fn state_1_the_source_refuses_an_area_larger_than_proposed() {
    let mut cfg = SourceConfig::with_defaults(7, blocks(), None);
    cfg.params.chunk_log2 = 14;
    cfg.state_max = AREA;
    let mut s = Source::new(cfg.clone(), [1; 32]).unwrap();
    s.step(0, SrcInput::Start);
    let ack = HelloAck {
        version: 1,
        session_id: 7,
        params: cfg.params,
        credit_window: 8,
        pin_budget: 1 << 30,
        nonce: [3; 32],
        mac: [0; 32],
        state_capacity: AREA + 4096,
    };
    let cmds = s.step(
        0,
        SrcInput::Frame(Frame {
            credits: 0,
            msg: Message::HelloAck(ack),
        }),
    );
    assert_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::StateAreaOverMax,
    );
}

/// spec: STATE-1: with a state area the device state never comes as DEVICE_STATE, and
/// without one never as STATE_PLACED.
#[test]
fn state_1_each_session_takes_its_state_on_one_path_only() {
    let mut d = tail_pair().dst;
    let cmds = d.step(
        0,
        frame::<DstInput>(Message::DeviceState {
            offset: 0,
            total_len: 10,
            data: vec![1; 10],
        }),
    );
    assert_dst_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::StateOnControl,
    );

    let mut p = pair(AREA, 0);
    p.run_until_source(SrcPhase::Finalizing, 100_000);
    let cmds = p.dst.step(0, frame(Message::StatePlaced { placed: 4096 }));
    assert_dst_abort(&cmds, AbortReason::ProtocolViolation, Detail::NoStateArea);
}

/// spec: STATE-2: the state area is not registered during the rounds, is never zero-filled
/// by ZERO, and after the final round only its chunks may be registered.
#[test]
fn state_2_the_area_is_registered_only_after_the_final_round_and_never_zeroed() {
    let mut p = pair(AREA, AREA);
    p.run_until_source(SrcPhase::Scanning, 1000);
    assert_eq!(p.dst.phase(), DstPhase::Receiving);
    let state = ChunkRef { block: 1, chunk: 0 };
    let mut d = p.dst.clone();
    let cmds = d.step(
        0,
        frame::<DstInput>(Message::RegRequest {
            req_id: 1,
            chunks: vec![state],
        }),
    );
    assert_dst_abort(&cmds, AbortReason::ProtocolViolation, Detail::RegChunkRange);
    let mut d = p.dst.clone();
    let cmds = d.step(
        0,
        frame::<DstInput>(Message::Zero {
            round: 1,
            ranges: vec![PageRange {
                block: 1,
                first_page: 0,
                page_count: 1,
            }],
        }),
    );
    assert_dst_abort(&cmds, AbortReason::ProtocolViolation, Detail::ZeroRange);

    let mut d = tail_pair().dst;
    let cmds = d.step(
        0,
        frame::<DstInput>(Message::RegRequest {
            req_id: 99,
            chunks: vec![ChunkRef { block: 0, chunk: 0 }],
        }),
    );
    assert_dst_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::RegOutsideStateArea,
    );
}

/// spec: STATE-3: STATE_PLACED names a prefix that grows and stays inside the area; a
/// section longer than announced, a gap or an overlap is one of these.
#[test]
fn state_3_placed_prefixes_grow_within_the_area() {
    let base = tail_pair().dst;
    let mut d = base.clone();
    let cmds = d.step(
        0,
        frame::<DstInput>(Message::StatePlaced { placed: AREA + 1 }),
    );
    assert_dst_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::StatePlacedOrder,
    );
    let mut d = base.clone();
    let cmds = d.step(0, frame::<DstInput>(Message::StatePlaced { placed: 8192 }));
    assert!(cmds
        .iter()
        .any(|c| matches!(c, DstCommand::FeedState { upto: 8192 })));
    for placed in [8192, 4096] {
        let mut d2 = d.clone();
        let cmds = d2.step(0, frame(Message::StatePlaced { placed }));
        assert_dst_abort(
            &cmds,
            AbortReason::ProtocolViolation,
            Detail::StatePlacedOrder,
        );
    }
    // PREPARE must announce exactly what was placed.
    let mut d2 = d.clone();
    let cmds = d2.step(
        0,
        frame::<DstInput>(Message::Prepare {
            state_len: 8193,
            digest_count: 4,
            state_digest: 0,
        }),
    );
    assert_dst_abort(&cmds, AbortReason::ProtocolViolation, Detail::PrepareCounts);
}

/// spec: STATE-3, ERR-4: a source that stops mid-state leaves the destination waiting only
/// until its idle timeout; nothing starts.
#[test]
fn state_3_a_stream_that_stops_mid_state_times_out() {
    let mut d = tail_pair().dst;
    d.step(0, frame::<DstInput>(Message::StatePlaced { placed: 4096 }));
    assert!(
        d.timers().idle.is_some(),
        "the destination waits with a deadline"
    );
    let cmds = d.step(1_000_000, DstInput::Timer(DstTimer::Idle));
    assert_dst_abort(&cmds, AbortReason::Timeout, Detail::IdleTimeout);
}

/// spec: STATE-3: a state larger than the negotiated area, or reported shrinking, is the
/// source driver's error: the source aborts and resumes its workload.
#[test]
fn state_3_the_source_refuses_a_state_beyond_the_area() {
    let mut p = pair(AREA, AREA);
    // Paused, the final scan requested: its (empty) result starts the final round, which
    // asks for the device state.
    p.run_until_source(SrcPhase::AwaitTableAck, 1000);
    for _ in 0..100_000 {
        if p.src.workload_paused() && p.src.phase() == SrcPhase::Scanning {
            break;
        }
        p.step();
    }
    assert_eq!(p.src.phase(), SrcPhase::Scanning);
    let final_scan = DirtyScan {
        dirty: vec![PageBitmap::new(16)],
        zero: vec![PageBitmap::new(16)],
    };
    let cmds = p.src.step(0, SrcInput::Dirty(final_scan));
    assert!(cmds.contains(&SrcCommand::CaptureDeviceState { area: AREA }));
    for (input, detail) in [
        (
            SrcInput::StateProduced { len: AREA + 1 },
            Detail::StateOverArea,
        ),
        (
            SrcInput::StateDone {
                len: AREA + 4096,
                digest: 0,
            },
            Detail::StateOverArea,
        ),
    ] {
        let mut s = p.src.clone();
        let cmds = s.step(0, input);
        assert_abort(&cmds, AbortReason::LocalError, detail);
        assert!(cmds.contains(&SrcCommand::ResumeWorkload), "resumed");
    }
    let mut s = p.src.clone();
    s.step(0, SrcInput::StateProduced { len: 8192 });
    let cmds = s.step(0, SrcInput::StateProduced { len: 4096 });
    assert_abort(&cmds, AbortReason::LocalError, Detail::StateProgress);
}

/// spec: STATE-4: a consumer that refuses the state aborts the destination before its vote,
/// so the source resumes; PREPARED waits for the consumer.
#[test]
fn state_4_a_refused_state_aborts_before_the_vote() {
    let p = verifying_pair();
    let mut d = p.dst.clone();
    let cmds = d.step(0, DstInput::StateFailed);
    assert_dst_abort(&cmds, AbortReason::WorkloadFailed, Detail::StateRefused);
    assert!(!cmds.iter().any(|c| matches!(
        c,
        DstCommand::Send(Frame {
            msg: Message::Prepared,
            ..
        })
    )));
    // The digests alone do not make the vote: the consumer must be done too.
    let mut d = p.dst.clone();
    let local = digest::digests(&[vec![0u8; 64 << 10]], 14);
    let cmds = d.step(0, DstInput::Digests(local));
    assert!(!cmds.iter().any(|c| matches!(
        c,
        DstCommand::Send(Frame {
            msg: Message::Prepared,
            ..
        })
    )));
}

/// spec: STATE-5: a consumer's digest that differs from PREPARE's aborts with
/// DigestMismatch; the right one lets the destination vote.
#[test]
fn state_5_a_state_digest_mismatch_aborts() {
    let p = verifying_pair();
    let mut d = p.dst.clone();
    let cmds = d.step(0, DstInput::StateLoaded { digest: 1 });
    assert_dst_abort(&cmds, AbortReason::DigestMismatch, Detail::StateDigest);
    let mut p = p;
    let r = p.run(200_000);
    assert_eq!(r.destination, Some(Outcome::Completed), "honest digest");
}

/// spec: STATE-3: PREPARE while a registration of the state area is still under way at the
/// destination is a ProtocolViolation: the destination would vote with a registration its
/// driver has not finished, and nothing starts.
#[test]
fn state_3_prepare_while_a_registration_is_unanswered_is_refused() {
    // An area of six chunks for three chunks of state, and a budget that holds them all:
    // chunks of the area stay free for a registration after the state is placed.
    let mut dst = dst_cfg(2 * AREA);
    dst.pin_budget = 1 << 20;
    let mut p = Pair::new(src_cfg(2 * AREA), dst, quiet(), device_state()).unwrap();
    p.run_until_source(SrcPhase::AwaitPrepared, 100_000);
    assert_eq!(p.src.phase(), SrcPhase::AwaitPrepared);
    assert_eq!(
        p.dst.phase(),
        DstPhase::ReceivingTail,
        "PREPARE still in flight"
    );
    // A registration of a free chunk of the area, under the next request id the
    // destination expects, whose driver never answers.
    let free = ChunkRef { block: 1, chunk: 5 };
    let registering = (0..64u32).find_map(|req_id| {
        let mut d = p.dst.clone();
        let cmds = d.step(
            0,
            frame::<DstInput>(Message::RegRequest {
                req_id,
                chunks: vec![free],
            }),
        );
        cmds.iter()
            .any(|c| matches!(c, DstCommand::Register { .. }))
            .then_some(d)
    });
    p.dst = registering.expect("some request id starts a registration");
    for _ in 0..100_000 {
        if p.dst.outcome().is_some() {
            break;
        }
        p.step();
    }
    assert_eq!(
        p.dst.outcome(),
        Some(Outcome::Aborted(AbortInfo {
            reason: AbortReason::ProtocolViolation,
            by_peer: false,
            detail: Detail::PrepareBusy,
        }))
    );
    assert_ne!(p.src.outcome(), Some(Outcome::Completed), "nothing starts");
}
