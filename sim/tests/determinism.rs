//! One seed reproduces a run exactly: the digest of the full event trace and the whole
//! report are identical across two runs, with faults, and differ between seeds.

mod common;

use rdmig_sim::rng::parse_seed;
use rdmig_sim::{run, SimConfig};

fn fingerprint(cfg: &SimConfig) -> (String, String) {
    let r = run(cfg.clone()).expect("valid config");
    assert!(r.failure.is_none(), "{}", r.failure.unwrap());
    let json = serde_json::to_string(&r.report).unwrap();
    (r.report.trace_digest, json)
}

#[test]
fn same_seed_same_trace_and_report() {
    let base = common::small(0, "rdma-100g");
    for seed in [1, 2, 3, 17, 4242, u64::MAX] {
        let cfg = SimConfig::swarm(seed, &base);
        let a = fingerprint(&cfg);
        let b = fingerprint(&cfg);
        assert_eq!(a.0, b.0, "trace digest differs for seed {seed}");
        assert_eq!(a.1, b.1, "report differs for seed {seed}");
    }
}

#[test]
fn same_seed_same_trace_on_tcp_with_faults() {
    let cfg = common::small(99, "tcp-25g").with_random_faults();
    assert_eq!(fingerprint(&cfg), fingerprint(&cfg));
}

#[test]
fn different_seeds_give_different_traces() {
    let base = common::small(0, "rdma-100g");
    let a = fingerprint(&common::small(1, "rdma-100g")).0;
    let b = fingerprint(&common::small(2, "rdma-100g")).0;
    assert_ne!(a, b);
    let c = fingerprint(&SimConfig::swarm(5, &base)).0;
    let d = fingerprint(&SimConfig::swarm(6, &base)).0;
    assert_ne!(c, d);
}

#[test]
fn a_commit_hash_is_a_seed() {
    let h = "f5c1467aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab";
    let s = parse_seed(h).unwrap();
    let cfg = common::small(s, "rdma-100g");
    assert_eq!(fingerprint(&cfg), fingerprint(&cfg));
}
