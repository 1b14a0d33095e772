//! One test per requirement the machines implement, named after its spec ID. Each drives a
//! machine with crafted frames (as a malicious or broken peer would send) and asserts the
//! exact reaction.

use rdmig_check::pair::{Guest, Pair};
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

fn quiet() -> Guest {
    Guest {
        pages_per_step: 0,
        active_steps: 0,
        zero_one_in: 0,
        seed: 1,
    }
}

/// A pair advanced until the source scans for round 1: the destination is in Receiving.
fn receiving_pair() -> Pair {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::Scanning, 1000);
    assert_eq!(p.dst.phase(), DstPhase::Receiving);
    p
}

fn frame(msg: Message) -> Input {
    Input::Frame(Frame { credits: 0, msg })
}

fn aborted(cmds: &[Command]) -> Option<AbortInfo> {
    cmds.iter().find_map(|c| match c {
        Command::Finish(Outcome::Aborted(a)) => Some(*a),
        _ => None,
    })
}

fn assert_abort(cmds: &[Command], reason: AbortReason) {
    let a = aborted(cmds).unwrap_or_else(|| panic!("expected abort {reason:?}, got {cmds:?}"));
    assert_eq!(a.reason, reason, "{}", a.detail);
}

fn sent(cmds: &[Command]) -> Vec<&Message> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send(f) => Some(&f.msg),
            _ => None,
        })
        .collect()
}

fn hello(params: Params) -> Message {
    Message::Hello(Hello {
        version_min: 1,
        version_max: 1,
        session_id: 7,
        params,
        credit_window: 8,
        nonce: [1; 32],
    })
}

fn no_memory_exposed(cmds: &[Command]) -> bool {
    !cmds.iter().any(|c| {
        matches!(
            c,
            Command::Register { .. } | Command::ZeroFill { .. } | Command::StartWorkload
        )
    })
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
    assert_abort(&d.step(0, frame(h)), AbortReason::Incompatible);
}

/// spec: HS-3: the destination narrows channels and in-flight registrations to its maxima.
#[test]
fn hs_3_destination_narrows_channels() {
    let mut cfg = dst_cfg();
    cfg.max_channels = 2;
    let mut d = Destination::new(cfg, [0; 32]).unwrap();
    let mut p = src_cfg().params;
    p.channels = 8;
    let cmds = d.step(0, frame(hello(p)));
    match sent(&cmds)[..] {
        [Message::HelloAck(a)] => assert_eq!(a.params.channels, 2),
        ref other => panic!("{other:?}"),
    }
}

/// spec: HS-2, HS-4: a HELLO_ACK for another session or with widened parameters is rejected.
#[test]
fn hs_4_source_rejects_changed_parameters() {
    for tweak in 0..3 {
        let mut s = Source::new(src_cfg(), [0; 32]).unwrap();
        let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
        let out = s.step(0, Input::Start);
        let Command::Send(f) = &out[0] else { panic!() };
        let out = d.step(0, Input::Frame(f.clone()));
        let Command::Send(Frame {
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
            Input::Frame(Frame {
                credits,
                msg: Message::HelloAck(a),
            }),
        );
        assert_abort(&cmds, AbortReason::ProtocolViolation);
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
    assert_abort(&d.step(0, frame(hello(p))), AbortReason::AuthFailed);

    let mut cfg = dst_cfg();
    cfg.psk = None;
    let mut d = Destination::new(cfg, [0; 32]).unwrap();
    assert_abort(
        &d.step(0, frame(hello(src_cfg().params))),
        AbortReason::Incompatible,
    );

    let mut s = src_cfg();
    s.psk = None; // key missing while auth is on: a configuration error, not a silent downgrade
    assert!(Source::new(s, [0; 32]).is_err());
}

/// spec: AUTH-2, AUTH-5: a wrong source MAC aborts; nothing is registered before AUTH.
#[test]
fn auth_2_no_block_table_before_auth_and_wrong_mac_fails() {
    let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
    d.step(0, frame(hello(src_cfg().params)));
    let cmds = d.step(0, frame(Message::BlockTable { blocks: blocks() }));
    assert_abort(&cmds, AbortReason::ProtocolViolation);
    assert!(no_memory_exposed(&cmds));

    let mut d = Destination::new(dst_cfg(), [0; 32]).unwrap();
    d.step(0, frame(hello(src_cfg().params)));
    let cmds = d.step(0, frame(Message::Auth { mac: [0x55; 32] }));
    assert_abort(&cmds, AbortReason::AuthFailed);
    assert!(no_memory_exposed(&cmds));
}

/// spec: AUTH-3: a destination without the key cannot make the source send anything past HELLO.
#[test]
fn auth_3_source_sends_nothing_to_an_unproven_destination() {
    let mut s = Source::new(src_cfg(), [0; 32]).unwrap();
    s.step(0, Input::Start);
    let forged = HelloAck {
        version: 1,
        session_id: 7,
        params: src_cfg().params,
        credit_window: 8,
        pin_budget: 1 << 30,
        nonce: [3; 32],
        mac: [0x66; 32],
    };
    let cmds = s.step(0, frame(Message::HelloAck(forged)));
    assert_abort(&cmds, AbortReason::AuthFailed);
    assert!(sent(&cmds)
        .iter()
        .all(|m| matches!(m, Message::Abort { .. })));
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
        table_with(|b| b[0].name = b"other".to_vec()),
        table_with(|b| b[1] = b[0].clone()),
        table_with(|b| {
            b.pop();
        }),
        table_with(|b| b[0].length += 4096),
        table_with(|b| b[1].page_log2 = 13),
    ];
    for table in cases {
        let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
        p.run_until_source(SrcPhase::AwaitTableAck, 1000);
        // Rewind the destination to just after AUTH by replaying the real stream.
        let mut d = Destination::new(dst_cfg(), [9; 32]).unwrap();
        for bytes in &p.source_stream[..2] {
            d.step(0, Input::Frame(decode(bytes).unwrap()));
        }
        assert_eq!(d.phase(), DstPhase::AwaitTable);
        let cmds = d.step(0, frame(Message::BlockTable { blocks: table }));
        assert_abort(&cmds, AbortReason::BlockMismatch);
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
        vec![ChunkRef { block: 2, chunk: 0 }],
        vec![ChunkRef { block: 0, chunk: 4 }],
        vec![ChunkRef {
            block: 1,
            chunk: u32::MAX,
        }],
        vec![
            ChunkRef { block: 0, chunk: 1 },
            ChunkRef { block: 0, chunk: 1 },
        ],
    ];
    for chunks in cases {
        let mut d = receiving_pair().dst;
        let cmds = d.step(0, frame(Message::RegRequest { req_id: 1, chunks }));
        assert_abort(&cmds, AbortReason::ProtocolViolation);
        assert!(no_memory_exposed(&cmds));
    }
}

/// spec: REG-4: a request beyond the pin budget aborts without registering anything.
#[test]
fn reg_4_request_beyond_pin_budget_aborts() {
    let mut d = receiving_pair().dst; // budget 32 KiB = 2 chunks
    let chunks = (0..3).map(|c| ChunkRef { block: 0, chunk: c }).collect();
    let cmds = d.step(0, frame(Message::RegRequest { req_id: 1, chunks }));
    assert_abort(&cmds, AbortReason::PinBudget);
    assert!(no_memory_exposed(&cmds));
}

/// spec: REG-2, REG-9: request ids in sequence and no more than the in-flight limit.
#[test]
fn reg_9_request_ids_in_sequence() {
    let mut d = receiving_pair().dst;
    let cmds = d.step(
        0,
        frame(Message::RegRequest {
            req_id: 2,
            chunks: vec![ChunkRef { block: 0, chunk: 0 }],
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation);
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
    assert_abort(&cmds, AbortReason::ProtocolViolation);
    assert!(!cmds.iter().any(|c| matches!(c, Command::Unregister { .. })));
}

/// spec: REG-5, REG-9: the source rejects a REG_RESULT it never asked for.
#[test]
fn reg_5_unrequested_registration_result_aborts_source() {
    let mut p = receiving_pair();
    p.run_until_source(SrcPhase::Sending, 1000);
    let mut s = p.src.clone();
    let cmds = s.step(
        0,
        frame(Message::RegResult {
            req_id: 99,
            rkeys: vec![1],
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation);
    assert!(!cmds.iter().any(|c| matches!(c, Command::PostWrite { .. })));
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
    assert_abort(&cmds, AbortReason::ProtocolViolation);
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
    assert_abort(&cmds, AbortReason::ProtocolViolation);
    let mut d = receiving_pair().dst;
    let ranges = vec![PageRange {
        block: 0,
        first_page: 0,
        page_count: 1,
    }];
    assert_abort(
        &d.step(0, frame(Message::Zero { round: 5, ranges })),
        AbortReason::ProtocolViolation,
    );
}

/// spec: FC-5: a peer that sends beyond its credits, or grants more than the window, aborts.
#[test]
fn fc_5_credit_overrun_and_over_grant_abort() {
    let mut d = receiving_pair().dst;
    let mut last = Vec::new();
    for _ in 0..=8 {
        last = d.step(0, frame(Message::Nop));
        if aborted(&last).is_some() {
            break;
        }
    }
    // NOPs are answered with credit returns, so a polite flood is fine; a frame granting more
    // than the window is not.
    assert!(aborted(&last).is_none());
    let cmds = d.step(
        0,
        Input::Frame(Frame {
            credits: u16::MAX,
            msg: Message::Nop,
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation);
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
    assert_abort(&cmds, AbortReason::ProtocolViolation);
}

/// spec: SW-5, SW-7: PREPARE with wrong counts aborts, and COMMIT before PREPARED never starts
/// the workload.
#[test]
fn sw_7_no_start_without_commit_in_prepared() {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::Finalizing, 100_000);
    let mut d = p.dst.clone();
    let cmds = d.step(0, frame(Message::Commit));
    assert_abort(&cmds, AbortReason::ProtocolViolation);
    assert!(no_memory_exposed(&cmds));
    let mut d = p.dst.clone();
    let cmds = d.step(
        0,
        frame(Message::Prepare {
            state_len: 0,
            digest_count: 1,
        }),
    );
    assert_abort(&cmds, AbortReason::ProtocolViolation);
}

/// spec: SW-6, INV-DOUBT-1: after COMMIT is sent, a failure leaves the source in doubt and
/// paused; before it, the same failure resumes the workload (INV-OWN-2).
#[test]
fn sw_6_failure_after_commit_is_in_doubt_not_resume() {
    let mut p = Pair::new(src_cfg(), dst_cfg(), quiet(), vec![]).unwrap();
    p.run_until_source(SrcPhase::AwaitPrepared, 100_000);
    let mut before = p.src.clone();
    let cmds = before.step(0, Input::TransportFailed);
    assert!(cmds.contains(&Command::ResumeWorkload));
    assert!(matches!(before.outcome(), Some(Outcome::Aborted(_))));

    p.run_until_source(SrcPhase::AwaitStarted, 100_000);
    while !p.src.commit_sent() {
        p.step();
    }
    let mut after = p.src.clone();
    let cmds = after.step(0, Input::TransportFailed);
    assert!(!cmds.contains(&Command::ResumeWorkload));
    assert!(matches!(after.outcome(), Some(Outcome::InDoubt(_))));
    let mut after = p.src.clone();
    assert!(
        after.step(0, Input::Cancel).is_empty(),
        "cancel after commit is ignored"
    );
}

/// spec: ERR-4: silence past the idle timeout aborts and resumes.
#[test]
fn err_4_idle_timeout_aborts() {
    let mut s = Source::new(src_cfg(), [0; 32]).unwrap();
    s.step(0, Input::Start);
    let t = s
        .timers()
        .idle
        .expect("waiting for HELLO_ACK arms the idle timer");
    assert_eq!(t, 30_000);
    assert_abort(
        &s.step(t, Input::Timer(TimerKind::Idle)),
        AbortReason::Timeout,
    );
}

/// spec: ERR-1: a peer's ABORT ends the destination without starting anything.
#[test]
fn err_1_peer_abort_ends_destination_and_unregisters() {
    let mut p = receiving_pair();
    p.run_until_source(SrcPhase::AwaitRoundAck, 10_000);
    let mut d = p.dst.clone();
    let cmds = d.step(
        0,
        frame(Message::Abort {
            reason: AbortReason::Cancelled,
        }),
    );
    let a = aborted(&cmds).unwrap();
    assert!(a.by_peer);
    assert_eq!(d.registered_bytes(), 0);
    assert!(!cmds.iter().any(|c| matches!(c, Command::StartWorkload)));
}
