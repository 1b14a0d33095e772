//! One test per requirement the machines implement, named after its spec ID. Each drives a
//! machine with crafted frames (as a malicious or broken peer would send) and asserts the
//! exact reaction.

mod common;

use common::*;
use rdmig_check::pair::Pair;
use rdmig_model::table::{DstPhase, SrcPhase};
use rdmig_model::wire::*;
use rdmig_model::*;

const KEY: &[u8] = b"k3y";

fn blocks() -> Vec<BlockDesc> {
    vec![
        BlockDesc {
            name: b"ram0".to_vec(),
            length: 64 << 10,
            page_log2: 12,
        },
        BlockDesc {
            name: b"ram1".to_vec(),
            length: 32 << 10,
            page_log2: 12,
        },
    ]
}

fn src_cfg() -> SourceConfig {
    let mut s = SourceConfig::with_defaults(7, blocks(), Some(KEY.to_vec()));
    s.params.chunk_log2 = 14; // 16 KiB: 4 + 2 chunks
    s.credit_window = 8;
    s
}

fn dst_cfg() -> DestConfig {
    let mut d = DestConfig::with_defaults(blocks(), Some(KEY.to_vec()), 32 << 10);
    d.credit_window = 8;
    d
}

/// A pair advanced until the source scans for round 1: the destination is in Receiving.
fn receiving_pair() -> Pair {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::Scanning, 1000);
    assert_eq!(p.dst.phase(), DstPhase::Receiving);
    p
}

fn sent(cmds: &[impl Cmd]) -> Vec<&Message> {
    cmds.iter().filter_map(|c| c.message()).collect()
}

fn hello(params: Params) -> Message {
    Message::Hello(Hello {
        version_min: 1,
        version_max: 1,
        session_id: 7,
        params,
        credit_window: 8,
        nonce: [1; 32],
        state_max: 0,
    })
}

fn no_memory_exposed(cmds: &[impl Cmd]) -> bool {
    !cmds.iter().any(|c| c.exposes_memory())
}

/// spec: HS-1: no common version aborts with Incompatible.
#[test]
fn hs_1_no_common_version_is_incompatible() {
    let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
    let mut h = hello(src_cfg().params);
    if let Message::Hello(h) = &mut h {
        h.version_min = 2;
        h.version_max = 3;
    }
    let cmds = d.step(0, frame(h));
    assert_abort(&cmds, AbortReason::Incompatible, Detail::NoCommonVersion);
}

/// spec: HS-3: the destination narrows channels and registrations in flight to its maxima,
/// takes every other parameter as proposed, and rejects a ZERO when zero elision was not
/// agreed.
#[test]
fn hs_3_destination_narrows_only_what_may_be_narrowed() {
    let mut cfg = dst_cfg();
    cfg.max_channels = 2;
    cfg.max_reg_inflight = 3;
    let mut d = Destination::new(cfg, [0; 32]).unwrap();
    let mut p = src_cfg().params;
    p.channels = 8;
    p.max_reg_inflight = 9;
    p.flags = 0; // no zero elision
    let cmds = d.step(0, frame(hello(p)));
    let [Message::HelloAck(a)] = sent(&cmds)[..] else {
        panic!("expected HELLO_ACK, got {cmds:?}");
    };
    let narrowed = Params {
        channels: 2,
        max_reg_inflight: 3,
        ..p
    };
    assert_eq!(
        a.params, narrowed,
        "only channels and max_reg_inflight change"
    );

    let mut pair = Pair::new(
        SourceConfig {
            params: p,
            ..src_cfg()
        },
        dst_cfg(),
        quiet(),
        vec![],
    )
    .unwrap();
    pair.run_until_source(SrcPhase::Scanning, 1000);
    let mut d = pair.dst.clone();
    let ranges = vec![PageRange {
        block: 0,
        first_page: 0,
        page_count: 1,
    }];
    let cmds = d.step(0, frame(Message::Zero { round: 1, ranges }));
    assert_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::ZeroNotNegotiated,
    );
    assert!(no_memory_exposed(&cmds));
}

/// spec: HS-2, HS-4: a HELLO_ACK for another session or with widened parameters is rejected.
#[test]
fn hs_4_source_rejects_changed_parameters() {
    for (tweak, detail) in [
        (0, Detail::OtherSession),
        (1, Detail::NotNarrowing),
        (2, Detail::NotNarrowing),
    ] {
        let mut s = Source::new(src_cfg(), [0; 32]).unwrap();
        let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
        let out = s.step(0, SrcInput::Start);
        let SrcCommand::Send(f) = &out[0] else {
            panic!()
        };
        let out = d.step(0, DstInput::Frame(f.clone()));
        let DstCommand::Send(Frame {
            msg: Message::HelloAck(mut a),
            credits,
        }) = out[0].clone()
        else {
            panic!()
        };
        match tweak {
            0 => a.session_id += 1,
            1 => a.params.chunk_log2 += 1,
            _ => a.params.channels += 1,
        }
        let cmds = s.step(
            0,
            SrcInput::Frame(Frame {
                credits,
                msg: Message::HelloAck(a),
            }),
        );
        assert_abort(&cmds, AbortReason::ProtocolViolation, detail);
        assert!(!sent(&cmds)
            .iter()
            .any(|m| matches!(m, Message::Auth { .. })));
    }
}

/// spec: AUTH-4: a keyed destination refuses an insecure source; an insecure destination
/// refuses an authenticated proposal.
#[test]
fn auth_4_insecure_must_be_explicit_on_both_sides() {
    let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
    let mut p = src_cfg().params;
    p.auth = AuthMode::Insecure;
    let cmds = d.step(0, frame(hello(p)));
    assert_abort(&cmds, AbortReason::AuthFailed, Detail::PeerInsecure);

    let mut cfg = dst_cfg();
    cfg.psk = None;
    let mut d = Destination::new(cfg, [0; 32]).unwrap();
    let cmds = d.step(0, frame(hello(src_cfg().params)));
    assert_abort(&cmds, AbortReason::Incompatible, Detail::LocalInsecure);

    let mut s = src_cfg();
    s.psk = None; // key missing while auth is on: a configuration error, not a silent downgrade
    assert!(Source::new(s, [0; 32]).is_err());
}

/// spec: AUTH-2, AUTH-5: a wrong source MAC aborts; nothing is registered before AUTH.
#[test]
fn auth_2_no_block_table_before_auth_and_wrong_mac_fails() {
    let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
    d.step(0, frame::<DstInput>(hello(src_cfg().params)));
    let cmds = d.step(0, frame(Message::BlockTable { blocks: blocks() }));
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::WrongPhase);
    assert!(no_memory_exposed(&cmds));

    let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
    d.step(0, frame::<DstInput>(hello(src_cfg().params)));
    let cmds = d.step(0, frame(Message::Auth { mac: [0x55; 32] }));
    assert_abort(&cmds, AbortReason::AuthFailed, Detail::SourceKey);
    assert!(no_memory_exposed(&cmds));
}

/// spec: AUTH-3: a destination without the key cannot make the source send anything past HELLO.
#[test]
fn auth_3_source_sends_nothing_to_an_unproven_destination() {
    let mut s = Source::new(src_cfg(), [0; 32]).unwrap();
    s.step(0, SrcInput::Start);
    let forged = HelloAck {
        version: 1,
        session_id: 7,
        params: src_cfg().params,
        credit_window: 8,
        pin_budget: 1 << 30,
        nonce: [3; 32],
        mac: [0x66; 32],
        state_capacity: 0,
    };
    let cmds = s.step(0, frame(Message::HelloAck(forged)));
    assert_abort(&cmds, AbortReason::AuthFailed, Detail::DestinationKey);
    assert!(sent(&cmds)
        .iter()
        .all(|m| matches!(m, Message::Abort { .. })));
    assert!(no_memory_exposed(&cmds));
}

/// spec: AUTH-6: a data channel joins only the current, authenticated session, only for a
/// negotiated channel not joined yet, and only with the token the key gives for this
/// destination's nonce.
#[test]
fn auth_6_data_channels_join_only_with_the_session_token() {
    let token =
        |session: u64, ch: u8, nonce: &[u8; 32]| auth::data_token(Some(KEY), session, ch, nonce);
    // Before the block table nothing may join.
    let mut early = Destination::new(dst_cfg(), [9; 32]).unwrap();
    early.step(0, frame::<DstInput>(hello(src_cfg().params)));
    let h = DataHello {
        session_id: 7,
        channel: 0,
        token: token(7, 0, &[9; 32]),
    };
    assert!(early.admit_data(&h).is_err(), "joined before AUTH");

    // The pair's destination nonce is [9; 32]; it negotiated one channel and admitted it.
    let p = receiving_pair();
    let refused = [
        DataHello {
            token: [0; 32],
            ..h
        },
        DataHello {
            session_id: 8,
            token: token(8, 0, &[9; 32]),
            ..h
        },
        DataHello {
            token: token(7, 0, &[1; 32]),
            ..h
        },
        DataHello {
            channel: 1,
            token: token(7, 1, &[9; 32]),
            ..h
        },
    ];
    for bad in refused {
        let mut d = p.dst.clone();
        let before = d.clone();
        assert!(d.admit_data(&bad).is_err(), "{bad:?} admitted");
        assert_eq!(d, before, "a refused join changes nothing");
    }
    let mut d = p.dst.clone();
    assert!(d.admit_data(&h).is_err(), "channel 0 joined twice");
}

fn table_with(f: impl FnOnce(&mut Vec<BlockDesc>)) -> Vec<BlockDesc> {
    let mut b = blocks();
    f(&mut b);
    b
}

/// spec: BLK-2: unknown, duplicate, missing or mismatched blocks abort with BlockMismatch.
#[test]
fn blk_2_block_table_must_match_by_name() {
    let cases = [
        (
            table_with(|b| b[0].name = b"other".to_vec()),
            Detail::UnknownBlock,
        ),
        (table_with(|b| b[1] = b[0].clone()), Detail::DuplicateBlock),
        (
            table_with(|b| {
                b.pop();
            }),
            Detail::MissingBlock,
        ),
        (table_with(|b| b[0].length += 4096), Detail::BlockDiffers),
        (table_with(|b| b[1].page_log2 = 13), Detail::BlockDiffers),
    ];
    for (table, detail) in cases {
        let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
        p.run_until_source(SrcPhase::AwaitTableAck, 1000);
        // Rewind the destination to just after AUTH by replaying the real stream.
        let mut d = Destination::new(dst_cfg(), [9; 32]).unwrap();
        for bytes in &p.source_stream[..2] {
            d.step(0, DstInput::Frame(decode(bytes).unwrap()));
        }
        assert_eq!(d.phase(), DstPhase::AwaitTable);
        let cmds = d.step(0, frame(Message::BlockTable { blocks: table }));
        assert_abort(&cmds, AbortReason::BlockMismatch, detail);
        assert!(no_memory_exposed(&cmds));
    }
}

/// spec: BLK-3: a block whose page is larger than the chunk cannot be chunked.
#[test]
fn blk_3_page_larger_than_chunk_is_rejected() {
    let mut s = src_cfg();
    s.blocks[0].page_log2 = 15;
    s.blocks[0].length = 64 << 10;
    assert!(Source::new(s, [0; 32]).is_err());
}

/// spec: REG-3: chunk references outside the table, repeated, or already registered abort.
#[test]
fn reg_3_invalid_chunk_references_abort() {
    let cases = vec![
        (vec![ChunkRef { block: 2, chunk: 0 }], Detail::RegChunkRange),
        (vec![ChunkRef { block: 0, chunk: 4 }], Detail::RegChunkRange),
        (
            vec![ChunkRef {
                block: 1,
                chunk: u32::MAX,
            }],
            Detail::RegChunkRange,
        ),
        (
            vec![
                ChunkRef { block: 0, chunk: 1 },
                ChunkRef { block: 0, chunk: 1 },
            ],
            Detail::RegChunkTaken,
        ),
    ];
    for (chunks, detail) in cases {
        let mut d = receiving_pair().dst;
        let cmds = d.step(0, frame(Message::RegRequest { req_id: 1, chunks }));
        assert_abort(&cmds, AbortReason::ProtocolViolation, detail);
        assert!(no_memory_exposed(&cmds));
    }
}

/// spec: REG-4: a request beyond the pin budget aborts without registering anything.
#[test]
fn reg_4_request_beyond_pin_budget_aborts() {
    let mut d = receiving_pair().dst; // budget 32 KiB = 2 chunks
    let chunks = (0..3).map(|c| ChunkRef { block: 0, chunk: c }).collect();
    let cmds = d.step(0, frame(Message::RegRequest { req_id: 1, chunks }));
    assert_abort(&cmds, AbortReason::PinBudget, Detail::OverBudget);
    assert!(no_memory_exposed(&cmds));
}

/// spec: REG-2: no more REG_REQUESTs outstanding than `max_reg_inflight`.
#[test]
fn reg_2_registration_requests_in_flight_are_bounded() {
    let mut cfg = dst_cfg();
    cfg.pin_budget = 1 << 30;
    cfg.max_reg_inflight = 2;
    let mut p = Pair::new(src_cfg(), cfg, quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::Scanning, 1000);
    let mut d = p.dst.clone();
    let req = |id: u32, c: u32| {
        frame(Message::RegRequest {
            req_id: id,
            chunks: vec![ChunkRef { block: 0, chunk: c }],
        })
    };
    assert!(aborted(&d.step(0, req(1, 0))).is_none());
    assert!(aborted(&d.step(0, req(2, 1))).is_none());
    let cmds = d.step(0, req(3, 2));
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::RegInflight);
}

/// spec: REG-9: request ids are consecutive from 1 per kind at the destination, and the source
/// accepts only the answer to its oldest request, with the same count.
#[test]
fn reg_9_ids_in_sequence_and_answers_to_the_oldest() {
    let mut d = receiving_pair().dst;
    let cmds = d.step(
        0,
        frame(Message::RegRequest {
            req_id: 2,
            chunks: vec![ChunkRef { block: 0, chunk: 0 }],
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::RegIdSequence);
    let mut d = receiving_pair().dst;
    let cmds = d.step(
        0,
        frame(Message::UnregRequest {
            req_id: 3,
            chunks: vec![ChunkRef { block: 0, chunk: 0 }],
        }),
    );
    assert_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::UnregIdSequence,
    );

    // The source, with REG_REQUEST 1 outstanding, refuses an answer to another id or count.
    let mut p = receiving_pair();
    p.run_until_source(SrcPhase::Sending, 1000);
    let mut s = p.src.clone();
    let wrong_id = s.step(
        0,
        frame(Message::RegResult {
            req_id: 2,
            rkeys: vec![1],
        }),
    );
    assert_abort(
        &wrong_id,
        AbortReason::ProtocolViolation,
        Detail::RegResultMismatch,
    );
    let mut s = p.src.clone();
    let wrong_count = s.step(
        0,
        frame(Message::RegResult {
            req_id: 1,
            rkeys: vec![1; 7],
        }),
    );
    assert_abort(
        &wrong_count,
        AbortReason::ProtocolViolation,
        Detail::RegResultMismatch,
    );
}

/// spec: REG-7: unregistering a chunk that is not registered aborts.
#[test]
fn reg_7_unregister_of_unregistered_chunk_aborts() {
    let mut d = receiving_pair().dst;
    let cmds = d.step(
        0,
        frame(Message::UnregRequest {
            req_id: 1,
            chunks: vec![ChunkRef { block: 0, chunk: 0 }],
        }),
    );
    assert_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::UnregNotRegistered,
    );
    assert!(!cmds
        .iter()
        .any(|c| matches!(c, DstCommand::Unregister { .. })));
}

/// spec: REG-5: the source rejects a REG_RESULT it never asked for and writes nothing.
#[test]
fn reg_5_unrequested_registration_result_aborts_source() {
    let mut p = receiving_pair();
    p.run_until_source(SrcPhase::AwaitRoundAck, 10_000);
    let mut s = p.src.clone();
    // In AwaitRoundAck no registration is outstanding.
    let cmds = s.step(
        0,
        frame(Message::RegResult {
            req_id: 99,
            rkeys: vec![1],
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::WrongPhase);
    assert!(no_memory_exposed(&cmds));
}

/// spec: DATA-3: a ZERO range past the end of its block aborts before any zero-fill.
#[test]
fn data_3_zero_range_outside_block_aborts() {
    let mut d = receiving_pair().dst;
    let ranges = vec![
        PageRange {
            block: 0,
            first_page: 0,
            page_count: 1,
        },
        PageRange {
            block: 1,
            first_page: 7,
            page_count: 2,
        }, // block 1 has 8 pages
    ];
    let cmds = d.step(0, frame(Message::Zero { round: 1, ranges }));
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::ZeroRange);
    assert!(no_memory_exposed(&cmds));
}

/// spec: RND-4: messages for another round abort.
#[test]
fn rnd_4_wrong_round_aborts() {
    let mut d = receiving_pair().dst;
    let cmds = d.step(
        0,
        frame(Message::RoundEnd {
            round: 2,
            last: false,
            data_bytes: 0,
            zero_pages: 0,
        }),
    );
    assert_abort(
        &cmds,
        AbortReason::ProtocolViolation,
        Detail::RoundEndMismatch,
    );
    let mut d = receiving_pair().dst;
    let ranges = vec![PageRange {
        block: 0,
        first_page: 0,
        page_count: 1,
    }];
    let cmds = d.step(0, frame(Message::Zero { round: 5, ranges }));
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::ZeroRound);
}

/// spec: FC-5: a peer that keeps sending after its credits are gone, or that grants more than
/// the window, aborts.
#[test]
fn fc_5_credit_overrun_and_over_grant_abort() {
    // A source that never grants credits back: the destination answers with NOPs while its
    // own credits last (FC-4), then can return none, and the frame after the window is an
    // overrun.
    let mut d = receiving_pair().dst;
    let mut overrun = None;
    for n in 0..64 {
        let cmds = d.step(0, frame(Message::Nop));
        if let Some(a) = aborted(&cmds) {
            overrun = Some((n, a));
            break;
        }
    }
    let (n, a) = overrun.expect("a peer that never returns credits is stopped");
    assert_eq!(
        (a.reason, a.detail),
        (AbortReason::ProtocolViolation, Detail::NoCredit)
    );
    assert!(
        n >= 8,
        "the window (8) is honoured before the overrun ({n} frames)"
    );

    let mut d = receiving_pair().dst;
    let cmds = d.step(
        0,
        DstInput::Frame(Frame {
            credits: u16::MAX,
            msg: Message::Nop,
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::OverGrant);
}

/// spec: FC-3: the last credit is reserved for a frame that returns credits.
#[test]
fn fc_3_last_credit_needs_a_grant() {
    let mut c = Credits::new(8);
    c.learn_peer_window(4);
    for _ in 0..3 {
        c.take();
    }
    assert_eq!(c.send, 1);
    assert!(!c.can_send());
    c.on_receive(0).unwrap();
    assert!(c.can_send());
    assert_eq!(c.take(), 1);
    assert!(c.on_receive(5).is_err(), "grant beyond the window");
}

/// spec: SW-3: device state must arrive contiguously with a fixed total.
#[test]
fn sw_3_device_state_out_of_order_aborts() {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![5; 50_000]).unwrap();
    p.run_until_source(SrcPhase::Finalizing, 100_000);
    let mut d = p.dst.clone();
    assert_eq!(d.phase(), DstPhase::ReceivingTail);
    let cmds = d.step(
        0,
        frame(Message::DeviceState {
            offset: 100,
            total_len: 50_000,
            data: vec![1; 10],
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::StateGap);
}

/// spec: SW-5, SW-7: PREPARE with wrong counts aborts, and COMMIT before PREPARED never starts
/// the workload.
#[test]
fn sw_7_no_start_without_commit_in_prepared() {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::Finalizing, 100_000);
    let mut d = p.dst.clone();
    let cmds = d.step(0, frame(Message::Commit));
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::WrongPhase);
    assert!(no_memory_exposed(&cmds));
    let mut d = p.dst.clone();
    let cmds = d.step(
        0,
        frame(Message::Prepare {
            state_len: 0,
            digest_count: 1,
            state_digest: 0,
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation, Detail::PrepareCounts);
}

/// spec: SW-6, INV-DOUBT-1: after COMMIT is sent, a failure leaves the source in doubt and
/// paused; before it, the same failure resumes the workload (INV-OWN-2). The workload is
/// relinquished before COMMIT leaves, never after.
#[test]
fn sw_6_failure_after_commit_is_in_doubt_not_resume() {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::AwaitPrepared, 100_000);
    let mut before = p.src.clone();
    let cmds = before.step(0, SrcInput::TransportFailed);
    assert!(cmds.contains(&SrcCommand::ResumeWorkload));
    assert!(matches!(before.outcome(), Some(Outcome::Aborted(_))));

    // PREPARED arrives: RelinquishWorkload comes before COMMIT in the same batch.
    let mut s = p.src.clone();
    let cmds = s.step(0, frame(Message::Prepared));
    let relinquish = cmds
        .iter()
        .position(|c| *c == SrcCommand::RelinquishWorkload);
    let commit = cmds
        .iter()
        .position(|c| matches!(c, SrcCommand::Send(f) if f.msg == Message::Commit));
    assert!(
        matches!((relinquish, commit), (Some(r), Some(c)) if r < c),
        "{cmds:?}"
    );
    assert!(s.commit_sent());

    let mut after = s.clone();
    let cmds = after.step(0, SrcInput::TransportFailed);
    assert!(!cmds.contains(&SrcCommand::ResumeWorkload));
    assert!(matches!(
        after.outcome(),
        Some(Outcome::InDoubt(Detail::TransportFailed))
    ));
    // The operator stops waiting: in doubt, nothing resumed.
    let mut after = s.clone();
    let cmds = after.step(0, SrcInput::Cancel);
    assert!(!cmds.contains(&SrcCommand::ResumeWorkload));
    assert_eq!(after.outcome(), Some(Outcome::InDoubt(Detail::Cancelled)));
    // An ABORT from the destination means "not started": the source resumes (SW-6 exception).
    let mut after = s.clone();
    let cmds = after.step(
        0,
        frame(Message::Abort {
            reason: AbortReason::WorkloadFailed,
        }),
    );
    assert!(cmds.contains(&SrcCommand::ResumeWorkload));
}

/// spec: ERR-4: a wait on the peer without progress for the idle timeout aborts and resumes.
#[test]
fn err_4_no_progress_aborts() {
    let mut s = Source::new(src_cfg(), [0; 32]).unwrap();
    s.step(0, SrcInput::Start);
    let t = s
        .timers()
        .progress
        .expect("waiting for HELLO_ACK arms the progress deadline");
    assert_eq!(t, 30_000);
    let cmds = s.step(t, SrcInput::Timer(SrcTimer::Progress));
    assert_abort(&cmds, AbortReason::Timeout, Detail::NoProgress);
}

/// spec: ERR-4: writes in flight are a wait on the peer: keepalive NOPs do not move the
/// deadline, a completion does; after the pause the expiry resumes the workload.
#[test]
fn err_4_writes_in_flight_need_completions_not_keepalives() {
    let mut p = receiving_pair();
    // Run until a write is in flight.
    while p.src.writes_in_flight() == 0 {
        p.step();
        assert!(p.src.outcome().is_none());
    }
    let mut s = p.src.clone();
    let t0 = s
        .timers()
        .progress
        .expect("writes in flight arm the deadline");
    // NOPs granting nothing new are no progress.
    s.step(t0 - 1, frame(Message::Nop));
    assert_eq!(
        s.timers().progress,
        Some(t0),
        "a keepalive moved the deadline"
    );
    let cmds = s.step(t0, SrcInput::Timer(SrcTimer::Progress));
    assert_abort(&cmds, AbortReason::Timeout, Detail::NoProgress);
}

/// spec: ERR-3: a data channel that ends after the final round was acknowledged changes
/// nothing; before, it aborts the migration.
#[test]
fn err_3_data_channel_loss_matters_until_the_final_round() {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![1; 10]).unwrap();
    p.run_until_source(SrcPhase::Sending, 100_000);
    let mut s = p.src.clone();
    let cmds = s.step(0, SrcInput::DataLost { channel: 0 });
    assert_abort(&cmds, AbortReason::TransportFailed, Detail::DataChannelLost);
    p.run_until_source(SrcPhase::AwaitPrepared, 100_000);
    let mut s = p.src.clone();
    assert!(s.step(0, SrcInput::DataLost { channel: 0 }).is_empty());
    assert_eq!(s.phase(), SrcPhase::AwaitPrepared);
}

/// spec: ERR-1: a peer's ABORT ends the destination without starting anything, and every key
/// it held is revoked (one Unregister per registration).
#[test]
fn err_1_peer_abort_ends_destination_and_unregisters() {
    let mut p = receiving_pair();
    p.run_until_source(SrcPhase::AwaitRoundAck, 10_000);
    let mut d = p.dst.clone();
    let held = d.registered_bytes();
    assert!(held > 0, "the first round registered chunks");
    let cmds = d.step(
        0,
        frame(Message::Abort {
            reason: AbortReason::Cancelled,
        }),
    );
    let a = aborted(&cmds).unwrap();
    assert!(a.by_peer);
    let unregistered = cmds
        .iter()
        .filter(|c| matches!(c, DstCommand::Unregister { .. }))
        .count() as u64;
    assert_eq!(
        unregistered << 14,
        held,
        "one Unregister per registered 16 KiB chunk"
    );
    assert!(!cmds.iter().any(|c| matches!(c, DstCommand::StartWorkload)));
}
