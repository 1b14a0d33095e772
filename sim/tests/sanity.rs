//! Sanity of the models: downtime prediction, CPU costs, zero elision, eviction, pin-all,
//! non-convergence, and the round-one breakdown behind `bench`.

mod common;

use rdmig_sim::guest::GuestConfig;
use rdmig_sim::profile::Profile;
use rdmig_sim::{run, Report, Sim, SimConfig};

fn cfg(profile: &str, ram: u64, dirty: u64, pattern: &str) -> SimConfig {
    let mut g = GuestConfig::new(ram);
    g.dirty_bytes_per_s = dirty;
    g.pattern = pattern.parse().unwrap();
    SimConfig::new(7, Profile::named(profile).unwrap(), g)
}

fn ok(c: SimConfig) -> Report {
    let r = run(c).unwrap();
    assert!(r.failure.is_none(), "{}", r.failure.unwrap());
    r.report
}

/// spec: CONV-1: with a dirty rate far below bandwidth, the source switches over because the
/// remaining dirty bytes fit the limit at the measured bandwidth, and the downtime it
/// predicted (and the one measured) is within the limit.
#[test]
fn predicted_downtime_within_limit_when_dirty_rate_well_below_bandwidth() {
    for (profile, rate) in [("rdma-100g", 200_000_000), ("tcp-25g", 100_000_000)] {
        let r = ok(cfg(profile, 128 << 20, rate, "hot:0.1"));
        assert_eq!(r.outcome.class, "completed", "{profile}");
        let limit = r.downtime_limit_ms as f64;
        let predicted = r.predicted_downtime_ms.expect("switched over");
        assert!(
            predicted <= limit,
            "{profile}: predicted {predicted} > {limit}"
        );
        let measured = r.downtime_ms.expect("destination started");
        assert!(
            measured <= limit,
            "{profile}: measured {measured} > {limit}"
        );
        assert!(
            r.rounds.len() < 30,
            "{profile}: converged by CONV-1, not the round limit"
        );
        assert!(r.memory_verified);
    }
}

#[test]
fn rdma_writes_cost_no_cpu_per_byte_and_tcp_does() {
    let rdma = ok(cfg("rdma-100g", 64 << 20, 0, "uniform"));
    let tcp = ok(cfg("tcp-100g", 64 << 20, 0, "uniform"));
    assert_eq!(rdma.cpu_source.transport_s, 0.0);
    assert_eq!(rdma.cpu_destination.transport_s, 0.0);
    assert!(tcp.cpu_source.transport_s > 0.005 && tcp.cpu_destination.transport_s > 0.005);
    // RDMA pays for registration instead.
    assert!(rdma.cpu_destination.registration_s > tcp.cpu_destination.registration_s);
}

#[test]
fn one_tcp_stream_is_cpu_bound_and_four_fill_the_link() {
    let mut one = cfg("tcp-100g", 256 << 20, 0, "uniform");
    one.migration.channels = Some(1);
    one.guest.dst_pretouched = true;
    // The transport alone: no page hashing on the receive path (verification's page tree).
    one.migration.verify_digests = false;
    let mut four = one.clone();
    four.migration.channels = Some(4);
    let g1 = ok(one).rounds[0].throughput_gbps.unwrap();
    let g4 = ok(four).rounds[0].throughput_gbps.unwrap();
    assert!((25.0..40.0).contains(&g1), "one stream: {g1} Gb/s");
    assert!(g4 > 85.0, "four streams: {g4} Gb/s");
}

#[test]
fn zero_pages_travel_as_zero_ranges() {
    let mut c = cfg("rdma-100g", 64 << 20, 0, "uniform");
    c.guest.zero_ppm = 900_000;
    let r = ok(c);
    let ram = r.ram_bytes as f64;
    assert!(r.bytes.zero_page_bytes as f64 > 0.8 * ram, "{:?}", r.bytes);
    assert!((r.bytes.data_payload as f64) < 0.2 * ram, "{:?}", r.bytes);
    assert_eq!(r.bytes.zero_page_bytes + r.bytes.data_payload, r.ram_bytes);
}

#[test]
fn small_pin_budget_evicts_and_completes() {
    let mut c = cfg("rdma-100g", 32 << 20, 50_000_000, "uniform");
    c.migration.pin_budget = Some(4 << 20);
    let r = ok(c);
    assert_eq!(r.outcome.class, "completed");
    assert!(r.registration.unreg_requests > 0);
    assert!(r.registration.max_registered_bytes <= 4 << 20);
}

#[test]
fn pin_all_registers_blocks_once() {
    let mut c = cfg("rdma-100g", 32 << 20, 50_000_000, "uniform");
    c.migration.pin_all = true;
    c.guest.blocks = 3;
    c.migration.permute_dst_blocks = true;
    let r = ok(c);
    assert_eq!(r.outcome.class, "completed");
    assert_eq!(r.registration.requests, 0);
    assert_eq!(r.registration.registrations, 3);
}

#[test]
fn dirty_rate_above_bandwidth_does_not_converge() {
    let mut c = cfg("rdma-25g", 32 << 20, 8_000_000_000, "uniform");
    c.migration.max_rounds = 4;
    // All of this small guest would fit the default 300 ms limit; 1 ms does not.
    c.migration.downtime_limit_ms = 1;
    c.migration.on_limit_abort = true;
    let r = ok(c.clone());
    assert_eq!(r.outcome.class, "aborted:NotConverged");
    assert_eq!(r.rounds.len(), 4);
    // With switchover instead, it completes with a long final round.
    c.migration.on_limit_abort = false;
    let r = ok(c);
    assert_eq!(r.outcome.class, "completed");
    assert!(r.rounds.last().unwrap().last);
}

#[test]
fn rounds_account_for_every_byte_sent() {
    let r = ok(cfg("rdma-100g", 32 << 20, 500_000_000, "seq"));
    let sent: u64 = r.rounds.iter().map(|x| x.sent_bytes).sum();
    assert_eq!(sent, r.bytes.data_payload);
    assert!(r.rounds.len() >= 2);
    assert!(r.rounds[0].dirty_bytes == r.ram_bytes);
}

#[test]
fn round_one_breakdown_explains_the_time() {
    let mut sim = Sim::new(cfg("rdma-100g", 64 << 20, 0, "uniform")).unwrap();
    sim.run().unwrap();
    let b = rdmig_sim::bench::round_one_breakdown(&sim).unwrap();
    assert!(b.contains("% of the 100 Gb/s line rate"), "{b}");
    assert!(b.contains("payload on the link"), "{b}");
}

#[test]
fn burst_pattern_keeps_the_average_rate() {
    let mut c = cfg("rdma-100g", 16 << 20, 100_000_000, "burst:5:15");
    c.migration.max_rounds = 3;
    let r = ok(c);
    assert_eq!(r.outcome.class, "completed");
}

/// spec: section 11: a pause that lands between a write's data and its mark loses the write
/// from a log marked only after the data (INV-MEM-1 fails; with `--verify` the pair aborts with
/// DigestMismatch instead), and not from one marked before the data as well (what `rdmig workload`
/// does since a process test under load caught it). Over seeds: the interrupted write may
/// hit a page already in the log, which loses nothing.
#[test]
fn a_pause_inside_a_write_needs_the_mark_before_the_data() {
    let run_with = |seed: u64, marks_before: bool, verify: bool| {
        let mut c = cfg("tcp-25g", 16 << 20, 50_000_000, "uniform");
        c.seed = seed;
        c.guest.stop_mid_write = true;
        c.guest.marks_before = marks_before;
        c.guest.zero_ppm = 0;
        c.migration.verify_digests = verify;
        run(c).unwrap()
    };
    let (mut lost, mut caught) = (0, 0);
    for seed in 1..=10 {
        if let Some(f) = run_with(seed, false, false).failure {
            assert!(f.to_string().contains("INV-MEM-1"), "{f}");
            lost += 1;
        }
        // Verification catches it: the pair aborts (the simulator still reports an honest
        // pair ending in DigestMismatch, INV-HONEST-1, as the environment's bug it is), and
        // never completes with the write lost.
        if let Some(f) = run_with(seed, false, true).failure {
            let f = f.to_string();
            assert!(
                f.contains("DigestMismatch") && !f.contains("INV-MEM-1"),
                "{f}"
            );
            caught += 1;
        }
        for verify in [false, true] {
            let r = run_with(seed, true, verify);
            assert!(r.failure.is_none(), "{}", r.failure.unwrap());
            assert_eq!(r.report.outcome.class, "completed");
        }
    }
    assert!(lost >= 5, "{lost} of 10 runs lost the interrupted write");
    assert!(caught >= 5, "{caught} of 10 verified runs caught it");
}
