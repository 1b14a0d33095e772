//! A full migration between the real machines, in memory (spec: INV-MEM-1 end to end).

use rdmig_check::pair::{Guest, Pair};
use rdmig_model::wire::{BlockDesc, DigestAlg, RegMode};
use rdmig_model::*;

fn blocks() -> Vec<BlockDesc> {
    vec![
        BlockDesc {
            name: b"pc.ram".to_vec(),
            length: 256 << 10,
            page_log2: 12,
        },
        BlockDesc {
            name: b"vga.vram".to_vec(),
            length: 72 << 10,
            page_log2: 12,
        },
    ]
}

fn configs(pin_budget: u64) -> (SourceConfig, DestConfig) {
    let key = b"correct horse battery staple".to_vec();
    let mut s = SourceConfig::with_defaults(42, blocks(), Some(key.clone()));
    s.params.chunk_log2 = 14; // 16 KiB chunks: 16 + 5 chunks
    s.params.channels = 2;
    s.reg_batch = 3;
    s.writes_per_channel = 4;
    s.credit_window = 8;
    s.downtime_limit_ms = 2;
    let mut d = DestConfig::with_defaults(blocks(), Some(key), pin_budget);
    d.credit_window = 8;
    // Local order differs from the source's: matching is by name (spec: BLK-2).
    d.blocks.reverse();
    (s, d)
}

fn guest() -> Guest {
    Guest {
        pages_per_step: 1,
        active_steps: 400,
        zero_one_in: 4,
        seed: 0x5eed,
    }
}

/// spec: INV-MEM-1, REG-6, RND-3, SW-8: two blocks, several rounds with pages dirtied between
/// and during rounds, zero pages, evictions under a small pin budget, and switchover.
#[test]
fn inv_mem_1_full_migration_with_eviction_matches_source_at_pause() {
    let (s, d) = configs(64 << 10); // budget: 4 chunks of 21
    let mut pair = Pair::new(s, d, guest(), b"device state".repeat(5000)).unwrap();
    let r = pair.run(200_000);
    assert_eq!(r.source, Some(Outcome::Completed), "{r:?}");
    assert_eq!(r.destination, Some(Outcome::Completed), "{r:?}");
    assert_eq!(r.memory_equal_at_start, Some(true));
    assert!(r.rounds >= 3, "expected several rounds, got {}", r.rounds);
    assert!(
        r.unreg_chunks > 0,
        "the small pin budget must force evictions"
    );
    assert!(r.zero_pages > 0, "zero pages must travel as ZERO ranges");
    assert!(r.max_registered_bytes <= 64 << 10);
    assert!(!pair.source_running() && pair.destination_running());
}

/// spec: SW-4, SW-5: both digest algorithms verify a migration end to end; with the page tree
/// as with the chunks' bytes, the destination votes PREPARED and starts.
#[test]
fn sw_5_both_digest_algorithms_verify_a_migration() {
    for alg in [DigestAlg::Xxh3_64, DigestAlg::Xxh3PageTree] {
        let (mut s, d) = configs(1 << 20);
        s.params.digest = alg;
        let mut pair = Pair::new(s, d, guest(), vec![9; 100]).unwrap();
        let r = pair.run(200_000);
        assert_eq!(r.source, Some(Outcome::Completed), "{alg:?}: {r:?}");
        assert_eq!(r.memory_equal_at_start, Some(true));
    }
}

/// spec: REG-8: pin-all registers whole blocks once and never sends REG_REQUEST.
#[test]
fn reg_8_pin_all_migration_matches() {
    let (mut s, d) = configs(1 << 20);
    s.params.mode = RegMode::PinAll;
    let mut pair = Pair::new(s, d, guest(), vec![1, 2, 3]).unwrap();
    let r = pair.run(200_000);
    assert_eq!(r.source, Some(Outcome::Completed), "{r:?}");
    assert_eq!(r.memory_equal_at_start, Some(true));
    assert_eq!(r.reg_chunks, 0);
}

/// spec: AUTH-5: a destination with another key is rejected before any memory is registered.
#[test]
fn auth_5_wrong_key_aborts_before_registration() {
    let (s, mut d) = configs(1 << 20);
    d.psk = Some(b"wrong".to_vec());
    let mut pair = Pair::new(s, d, guest(), vec![]).unwrap();
    let r = pair.run(10_000);
    match r.source {
        Some(Outcome::Aborted(a)) => assert_eq!(a.reason, wire::AbortReason::AuthFailed),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(r.destination, Some(Outcome::Aborted(_))));
    assert_eq!(r.max_registered_bytes, 0);
    assert_eq!(r.data_bytes, 0);
    assert!(pair.source_running());
}

/// spec: CONV-2: a guest that never stops dirtying hits the round limit; with the abort policy
/// the source keeps running and the destination never starts.
#[test]
fn conv_2_round_limit_with_abort_policy_resumes_source() {
    let (mut s, d) = configs(1 << 20);
    s.max_rounds = 3;
    s.downtime_limit_ms = 0;
    s.on_limit = LimitPolicy::Abort;
    let g = Guest {
        pages_per_step: 2,
        active_steps: u64::MAX,
        zero_one_in: 0,
        seed: 3,
    };
    let mut pair = Pair::new(s, d, g, vec![]).unwrap();
    let r = pair.run(200_000);
    match r.source {
        Some(Outcome::Aborted(a)) => assert_eq!(a.reason, wire::AbortReason::NotConverged),
        other => panic!("unexpected {other:?}"),
    }
    assert!(pair.source_running() && !pair.destination_running());
}
