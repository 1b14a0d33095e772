//! Device state over the data channels (spec: STATE-1 .. STATE-5): the device state written
//! into the destination's state area, announced placed in STATE_PLACED and fed to the
//! destination's consumer, under every fault the swarm injects; a destination whose area is
//! too small; and what the state adds to the downtime when it streams over all channels.

use std::collections::{BTreeMap, BTreeSet};

use rdmig_model::Outcome;
use rdmig_sim::guest::GuestConfig;
use rdmig_sim::profile::Profile;
use rdmig_sim::{run, Report, Sim, SimConfig};

/// A small idle guest on `profile` whose `state` bytes of device state use the state area.
fn cfg(seed: u64, profile: &str, ram: u64, state: u64) -> SimConfig {
    let mut g = GuestConfig::new(ram);
    g.state_area = true;
    g.device_state_bytes = state;
    let mut c = SimConfig::new(seed, Profile::named(profile).unwrap(), g);
    c.migration.idle_timeout_ms = 2_000;
    c.migration.keepalive_ms = 200;
    c
}

fn ok(c: SimConfig) -> Report {
    let r = run(c).unwrap();
    assert!(r.failure.is_none(), "{}", r.failure.unwrap());
    r.report
}

/// What a swarm of state-area runs did.
#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    /// Runs that completed with the whole device state fed through the area.
    through_area: u64,
    /// Runs in which each fault kind struck between the final ROUND_ACK and PREPARE, while
    /// the device state was being produced, written and fed.
    struck_in_tail: BTreeMap<&'static str, u64>,
    failures: Vec<String>,
}

/// Seeds with swarm-drawn configurations and faults around a base whose every seed has a
/// state area (the swarm draws its size, rates and capacity).
fn state_swarm(profile: &str, seeds: std::ops::Range<u64>) -> Tally {
    let mut g = GuestConfig::new(8 << 20);
    g.state_area = true;
    let base = SimConfig::new(0, Profile::named(profile).unwrap(), g);
    let mut t = Tally::default();
    for seed in seeds {
        let c = SimConfig::swarm(seed, &base);
        assert!(c.guest.state_area, "seed {seed}");
        let mut sim = Sim::new(c).unwrap();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run())) {
            Ok(Ok(())) => {}
            Ok(Err(f)) => t.failures.push(format!(
                "{f}\nreplay: rdmig-sim run --seed {seed} --swarm --state-area --profile {profile} --ram 8MiB"
            )),
            Err(_) => t.failures.push(format!("seed {seed}: PANIC")),
        }
        let r = Report::of(&sim);
        *t.outcomes.entry(r.outcome.class.clone()).or_insert(0) += 1;
        if r.outcome.class == "completed" {
            assert_eq!(r.device_state.path, "area");
            assert_eq!(
                r.device_state.fed_bytes, r.device_state.bytes,
                "seed {seed}"
            );
            t.through_area += 1;
        }
        if let Some(ack) = sim.stats.final_ack_ns {
            let end = sim.stats.prepare_sent_ns.unwrap_or(u64::MAX);
            let kinds: BTreeSet<_> = sim
                .stats
                .faults
                .iter()
                .filter(|(at, _, _)| (ack..=end).contains(at))
                .map(|(_, k, _)| k.name())
                .collect();
            for k in kinds {
                *t.struck_in_tail.entry(k).or_insert(0) += 1;
            }
        }
    }
    assert!(
        t.failures.is_empty(),
        "{} failing seeds:\n{}",
        t.failures.len(),
        t.failures.join("\n")
    );
    t
}

/// spec: STATE-3, STATE-4: across a swarm of drawn configurations and faults, the destination
/// feeds its consumer only device state the source produced and placed, and whatever
/// completes starts with exactly the source's device state. The faults strike while the
/// state crosses, not only before it.
#[test]
fn state_3_swarm_with_faults_feeds_only_placed_state() {
    let t = state_swarm("rdma-100g", 1..801);
    eprintln!(
        "state-area swarm: outcomes {:?}; faults while the state crossed {:?}",
        t.outcomes, t.struck_in_tail
    );
    assert!(
        t.through_area >= 200,
        "{} completed through the area",
        t.through_area
    );
    assert!(
        t.outcomes
            .keys()
            .filter(|k| k.starts_with("aborted"))
            .count()
            >= 4,
        "{:?}",
        t.outcomes
    );
    // The capacity drawn below the state now and then: the source's expected abort.
    assert!(
        t.outcomes.contains_key("aborted:LocalError"),
        "{:?}",
        t.outcomes
    );
    assert!(t.struck_in_tail.len() >= 7, "{:?}", t.struck_in_tail);
    for kind in [
        "connection-loss",
        "completion-delay",
        "silence",
        "slow-receiver",
        "stray",
    ] {
        assert!(
            t.struck_in_tail.contains_key(kind),
            "{kind}: {:?}",
            t.struck_in_tail
        );
    }
}

/// spec: STATE-3: the same over TCP streams, whose receiving cores place the writes.
#[test]
fn state_3_swarm_over_tcp_feeds_only_placed_state() {
    let t = state_swarm("tcp-25g", 1001..1201);
    assert!(
        t.through_area >= 50,
        "{} completed through the area",
        t.through_area
    );
    assert!(t.struck_in_tail.len() >= 4, "{:?}", t.struck_in_tail);
}

/// spec: STATE-3: a source that announces device state placed once its writes are posted
/// (not completed) makes the destination feed its consumer bytes not yet in the area; the
/// simulator stops the run on it.
#[cfg(feature = "mutations")]
#[test]
fn state_3_placed_announced_before_the_writes_complete_is_caught() {
    use rdmig_model::source::Mutations;
    let mut hits = Vec::new();
    for seed in 1..=5 {
        let mut c = cfg(seed, "rdma-25g", 16 << 20, 8 << 20);
        c.guest.state_save_bytes_per_s = if seed % 2 == 0 { 2_000_000_000 } else { 0 };
        let mut sim = Sim::new(c).unwrap();
        sim.src.set_mutations(Mutations {
            state_placed_early: true,
            ..Mutations::default()
        });
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run())) {
            Ok(Ok(())) => {}
            Ok(Err(f)) => hits.push(f.invariant),
            Err(_) => hits.push("PANIC"),
        }
    }
    assert!(
        !hits.is_empty() && hits.iter().all(|h| ["STATE-3", "INV-MEM-1"].contains(h)),
        "{hits:?}"
    );
}

/// spec: STATE-1, STATE-3: a destination whose area is smaller than the device state: the
/// source aborts (LocalError) when the VMM reports more than fits, whether at once or part
/// way through its stream, resumes its workload, and the destination starts nothing.
#[test]
fn state_1_an_area_below_the_state_aborts_at_the_source_which_resumes() {
    for save_rate in [0, 1_000_000_000] {
        let mut c = cfg(3, "rdma-100g", 16 << 20, 8 << 20);
        c.guest.dirty_bytes_per_s = 100_000_000;
        c.guest.state_save_bytes_per_s = save_rate;
        c.migration.state_capacity = Some(4 << 20);
        let mut sim = Sim::new(c).unwrap();
        let r = sim.run();
        assert!(r.is_ok(), "{}", r.unwrap_err());
        match sim.src.outcome() {
            Some(Outcome::Aborted(a)) => {
                assert_eq!(a.reason, rdmig_model::wire::AbortReason::LocalError);
                assert_eq!(a.detail, rdmig_model::Detail::StateOverArea);
                assert!(!a.by_peer);
            }
            o => panic!("save rate {save_rate}: source {o:?}"),
        }
        assert!(sim.source_running(), "the source's workload runs again");
        assert!(
            matches!(sim.lsn.outcome(), Some(Outcome::Aborted(_))),
            "{:?}",
            sim.lsn.outcome()
        );
        assert!(!sim.destination_running());
        assert!(sim.stats.dst_started_ns.is_none(), "nothing started");
        // A stream may have placed and fed what fit before the VMM reported more; at once,
        // nothing was written.
        let fed = sim.stats.state_fed_bytes;
        assert!(
            fed <= 4 << 20 && (save_rate > 0 || fed == 0),
            "save rate {save_rate}: {fed} bytes fed"
        );
    }
}

/// 256 MiB of device state over 2 channels of a 25 Gb/s RDMA link: the final ROUND_ACK to
/// PREPARE is the state's time on the wire, within 15 % (the first registrations and the
/// round trips), and both channels carry it.
fn streamed(save_rate: u64) -> (Report, f64) {
    let mut c = cfg(1, "rdma-25g", 64 << 20, 256 << 20);
    c.migration.channels = Some(2);
    c.guest.capture_ns = 0;
    c.guest.state_save_bytes_per_s = save_rate;
    let wire_ms = c.profile.costs().wire_ns(256 << 20) as f64 / 1e6;
    let r = ok(c);
    assert_eq!(r.outcome.class, "completed");
    assert_eq!(r.device_state.path, "area");
    assert_eq!(r.device_state.fed_bytes, 256 << 20);
    (r, wire_ms)
}

/// spec: STATE-3: the device state is written over all data channels, round robin like RAM,
/// so what it adds to the downtime is its size over the link rate.
#[test]
fn state_3_the_state_streams_over_all_channels_at_link_rate() {
    let (r, wire_ms) = streamed(0);
    let t = r.downtime.ack_to_prepare_ms.unwrap();
    assert!(
        t >= wire_ms && t <= 1.15 * wire_ms,
        "final ROUND_ACK to PREPARE {t:.3} ms, the state's wire time {wire_ms:.3} ms"
    );
    let by_ch = &r.device_state.placed_by_channel;
    assert_eq!(by_ch.len(), 2, "{by_ch:?}");
    for &b in by_ch {
        assert!(b >= 100 << 20, "a channel carried {b} bytes: {by_ch:?}");
    }
}

/// spec: STATE-3: pages are written as the VMM produces them, so with production slower than
/// the link the state adds its production time, not production plus transfer: PREPARE
/// follows the last step within a quarter of the transfer time.
#[test]
fn state_3_production_below_link_rate_overlaps_the_transfer() {
    let rate = 1_000_000_000;
    let produce_ms = (256u64 << 20) as f64 * 1e3 / rate as f64;
    let (r, wire_ms) = streamed(rate);
    let t = r.downtime.ack_to_prepare_ms.unwrap();
    let produced = r.device_state.produced_after_ack_ms.unwrap();
    assert!(
        produce_ms > 2.0 * wire_ms,
        "production {produce_ms} ms is the slower"
    );
    assert!(
        t >= produced && t - produced < 0.25 * wire_ms,
        "PREPARE {t:.3} ms after the final ROUND_ACK, production done {produced:.3} ms after it, transfer {wire_ms:.3} ms"
    );
    assert!(
        t < produce_ms + 0.25 * wire_ms,
        "{t:.3} ms against production {produce_ms:.3} ms + transfer {wire_ms:.3} ms"
    );
}

/// spec: STATE-4: the consumer loads the state as it is placed; one slower than the link
/// delays the vote (PREPARED), not PREPARE, and the run still completes with the whole state.
#[test]
fn state_4_a_slow_consumer_delays_the_vote_not_the_transfer() {
    let run_with = |load: u64| {
        let mut c = cfg(2, "rdma-100g", 32 << 20, 64 << 20);
        c.guest.capture_ns = 0;
        c.guest.state_load_bytes_per_s = load;
        ok(c)
    };
    let fast = run_with(0);
    let slow = run_with(500_000_000);
    let ack_prep = |r: &Report| r.downtime.ack_to_prepare_ms.unwrap();
    assert!(
        (ack_prep(&slow) - ack_prep(&fast)).abs() < 0.5,
        "{} vs {}",
        ack_prep(&slow),
        ack_prep(&fast)
    );
    // 64 MiB at 500 MB/s: 134 ms of loading, most of it after the transfer.
    let loaded = slow.device_state.loaded_after_ack_ms.unwrap();
    assert!(
        loaded > 120.0,
        "consumer done {loaded} ms after the ROUND_ACK"
    );
    assert!(
        slow.downtime.verify_ms.unwrap() > fast.downtime.verify_ms.unwrap() + 100.0,
        "{:?} vs {:?}",
        slow.downtime,
        fast.downtime
    );
    assert!(slow.memory_verified && fast.memory_verified);
}

/// spec: STATE-1: device state far beyond the control channel's 64 MiB (SW-3) crosses in a
/// state area, and the control channel refuses it without one.
#[test]
fn state_1_several_gib_of_device_state_cross_in_the_area() {
    let c = cfg(4, "rdma-100g", 64 << 20, 3 << 30);
    let r = ok(c.clone());
    assert_eq!(r.outcome.class, "completed");
    assert_eq!(r.device_state.fed_bytes, 3 << 30);
    let mut control = c;
    control.guest.state_area = false;
    assert!(control.validate().is_err());
}

/// spec: STATE-1: the command line: `--state-area` with its rates runs the state through the
/// area and reports what it added; `--state-capacity` below the state ends in the source's
/// abort, which is no violation.
#[test]
fn state_1_the_command_line_takes_the_state_area() {
    let sim = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--seed",
            "5",
            "--ram",
            "16MiB",
            "--dirty",
            "100MB/s",
            "--device-state",
            "80MiB",
            "--state-area",
            "--state-save-rate",
            "4GB/s",
            "--state-load-rate",
            "2GB/s",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rdmig-sim"))
            .args(&args)
            .output()
            .expect("binary runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON report")
    };
    let v = sim(&[]);
    assert_eq!(v["outcome"]["class"], "completed");
    assert_eq!(v["device_state"]["path"], "area");
    assert_eq!(v["device_state"]["fed_bytes"], 80u64 << 20);
    assert!(v["downtime"]["ack_to_prepare_ms"].as_f64().unwrap() > 15.0);
    let small = sim(&["--state-capacity", "1MiB"]);
    assert_eq!(small["outcome"]["class"], "aborted:LocalError");
    assert_eq!(small["memory_verified"], false);
}
