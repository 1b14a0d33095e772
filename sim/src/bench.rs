//! `rdmig-sim bench` and `compare`: performance figures of the simulator and of the protocol
//! on simulated hardware. Wall-clock time is read here only, to measure the simulator itself;
//! simulations never read it.

use std::time::Instant;

use crate::guest::{GuestConfig, Pattern};
use crate::profile::Profile;
use crate::report::Report;
use crate::units::{fmt_bytes, ms};
use crate::world::{Sim, CAUSES};
use crate::{run, SimConfig};

/// A table with one column per report.
pub fn compare_table(reports: &[Report]) -> String {
    let mut s = String::new();
    let mut row = |name: &str, f: &dyn Fn(&Report) -> String| {
        s += &format!("{name:<28}");
        for r in reports {
            s += &format!(" {:>22}", f(r));
        }
        s.push('\n');
    };
    let o = |v: Option<f64>, unit: &str| {
        v.map(|v| format!("{v:.1} {unit}"))
            .unwrap_or_else(|| "-".into())
    };
    row("profile", &|r| r.profile.clone());
    row("guest", &|r| {
        format!(
            "{} @ {}/s",
            fmt_bytes(r.ram_bytes),
            fmt_bytes(r.dirty_bytes_per_s)
        )
    });
    row("outcome", &|r| r.outcome.class.clone());
    row("total time", &|r| format!("{:.3} s", r.total_ms / 1e3));
    row("downtime", &|r| o(r.downtime_ms, "ms"));
    row("predicted downtime", &|r| o(r.predicted_downtime_ms, "ms"));
    row("rounds", &|r| r.rounds.len().to_string());
    row("data sent", &|r| fmt_bytes(r.bytes.data_payload));
    row("on the wire (data)", &|r| fmt_bytes(r.bytes.data_wire));
    row("zero pages elided", &|r| fmt_bytes(r.bytes.zero_page_bytes));
    row("control bytes", &|r| {
        fmt_bytes(r.bytes.control_bytes + r.bytes.zero_frame_bytes)
    });
    row("registration round trips", &|r| {
        r.registration.requests.to_string()
    });
    row("source CPU", &|r| {
        format!("{:.2} core-s", r.cpu_source.total_s)
    });
    row("destination CPU", &|r| {
        format!("{:.2} core-s", r.cpu_destination.total_s)
    });
    row("link utilisation", &|r| {
        format!("{:.1}%", r.link_utilisation * 100.0)
    });
    row("payload throughput", &|r| {
        format!("{:.2} Gb/s", r.effective_throughput_gbps)
    });
    row("round 1 throughput", &|r| {
        r.rounds
            .first()
            .and_then(|x| x.throughput_gbps)
            .map(|g| format!("{g:.2} Gb/s"))
            .unwrap_or_else(|| "-".into())
    });
    s
}

fn base(profile: &str, ram: u64, dirty: u64, pattern: Pattern) -> SimConfig {
    let mut g = GuestConfig::new(ram);
    g.dirty_bytes_per_s = dirty;
    g.pattern = pattern;
    let mut c = SimConfig::new(1, Profile::named(profile).expect("known profile"), g);
    c.trace_tail = 0;
    c
}

/// CPU time of the calling thread in seconds (Linux schedstat, nanosecond resolution), so
/// that the simulator's speed is measured on one core even when other work shares the machine.
pub fn thread_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Simulator speed on one workload.
pub struct Speed {
    pub runs: u64,
    /// Migrations per second of this thread's CPU time (one core), if measurable.
    pub per_cpu_s: Option<f64>,
    pub per_wall_s: f64,
    pub mean_events: f64,
    pub mean_virtual_ms: f64,
    pub last_outcome: String,
}

/// Runs `n` seeds of `cfg` and measures the simulator.
pub fn speed(cfg: &SimConfig, n: u64) -> Result<Speed, String> {
    let c0 = thread_cpu_s();
    let t0 = Instant::now();
    let mut events = 0;
    let mut total = 0.0;
    let mut last = String::new();
    for seed in 1..=n {
        let mut c = cfg.clone();
        c.seed = seed;
        let r = run(c)?;
        if let Some(f) = r.failure {
            return Err(f.to_string());
        }
        events += r.report.events;
        total += r.report.total_ms;
        last = r.report.outcome.class;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = c0.zip(thread_cpu_s()).map(|(a, b)| b - a);
    Ok(Speed {
        runs: n,
        per_cpu_s: cpu.filter(|&c| c > 0.0).map(|c| n as f64 / c),
        per_wall_s: n as f64 / wall,
        mean_events: events as f64 / n as f64,
        mean_virtual_ms: total / n as f64,
        last_outcome: last,
    })
}

/// The workloads whose simulation speed `bench` reports.
pub fn speed_cases() -> Vec<(&'static str, SimConfig)> {
    let gib = 1u64 << 30;
    vec![
        (
            "idle 1 GiB guest, rdma-100g",
            base("rdma-100g", gib, 0, Pattern::Uniform),
        ),
        (
            "1 GiB guest dirtying 1 GB/s uniform, rdma-100g",
            base("rdma-100g", gib, 1_000_000_000, Pattern::Uniform),
        ),
        (
            "1 GiB guest dirtying 2 GB/s hot:0.1, tcp-100g",
            base(
                "tcp-100g",
                gib,
                2_000_000_000,
                "hot:0.1".parse().expect("valid"),
            ),
        ),
    ]
}

/// Round 1 of a run: payload rate against the line rate, and where its time went.
pub fn round_one_breakdown(sim: &Sim) -> Option<String> {
    let r = sim.stats.rounds.first()?;
    let end = r.end_ns?;
    let first = r.first_post_ns?;
    let last = r.last_place_ns?;
    let d = end - r.start_ns;
    let line = sim.cfg.profile.link_gbps;
    let gbps = r.placed_bytes as f64 * 8.0 / d as f64;
    let goodput = sim.costs().goodput_bytes_per_s() * 8.0 / 1e9;
    let mut s = format!(
        "    round 1: {} payload in {:.3} ms = {:.2} Gb/s = {:.1}% of the {} Gb/s line rate ({:.1}% of the {:.2} Gb/s goodput full-size packets allow)\n",
        fmt_bytes(r.placed_bytes),
        ms(d),
        gbps,
        gbps / line * 100.0,
        line,
        gbps / goodput * 100.0,
        goodput
    );
    let pct = |x: u64| x as f64 / d as f64 * 100.0;
    let payload = r.wire_ns - r.header_ns;
    let gaps: u64 = r.gap_ns.iter().sum();
    let ramp = first - r.start_ns;
    let drain = end - last;
    let other = d.saturating_sub(ramp + r.wire_ns + gaps + drain);
    s += &format!(
        "    where round 1's time went: payload on the link {:.1}%, packet headers {:.1}%",
        pct(payload),
        pct(r.header_ns)
    );
    s += &format!(
        ", before the first write (first registration batch) {:.1}% ({:.3} ms)",
        pct(ramp),
        ms(ramp)
    );
    for (i, name) in CAUSES.iter().enumerate() {
        if r.gap_ns[i] > 0 {
            s += &format!(
                ", link idle waiting for {name} {:.1}% ({:.3} ms)",
                pct(r.gap_ns[i]),
                ms(r.gap_ns[i])
            );
        }
    }
    s += &format!(
        ", last placement to ROUND_ACK {:.1} us, request posting and latency {:.1} us\n",
        drain as f64 / 1e3,
        other as f64 / 1e3
    );
    let reg_threads = sim.cfg.profile.reg_threads as f64;
    s += &format!(
        "    destination registration threads busy {:.1}% of round 1 ({} threads, {} registrations in the run)\n",
        r.reg_ns as f64 / reg_threads / d as f64 * 100.0,
        sim.cfg.profile.reg_threads,
        sim.stats.registrations
    );
    Some(s)
}

fn throughput_case(title: &str, cfg: SimConfig) -> Result<String, String> {
    let mut sim = Sim::new(cfg)?;
    let t0 = Instant::now();
    sim.run().map_err(|f| f.to_string())?;
    let wall = t0.elapsed().as_secs_f64();
    let rep = Report::of(&sim);
    let mut s = format!(
        "  {title}\n    outcome {}, total {:.3} s virtual ({:.2} s wall, {} events)\n",
        rep.outcome.class,
        rep.total_ms / 1e3,
        wall,
        rep.events
    );
    s += &round_one_breakdown(&sim).unwrap_or_else(|| "    (no round completed)\n".into());
    Ok(s)
}

/// Every figure `rdmig-sim bench` prints; `runs` seeds per speed case, and the efficiency
/// cases unless `speed_only`.
pub fn run_all(quick: bool, runs: Option<u64>, speed_only: bool) -> Result<String, String> {
    let gib = 1u64 << 30;
    let n = runs.unwrap_or(if quick { 40 } else { 300 });
    let mut s = String::from(
        "simulator speed (migrations per second of one core's CPU time; wall-clock rate in brackets):\n",
    );
    for (label, cfg) in speed_cases() {
        let sp = speed(&cfg, n)?;
        s += &format!(
            "  {label}: {} migrations/s ({:.0}/s wall; {n} seeds, {:.0} events and {:.1} ms virtual each, {})\n",
            sp.per_cpu_s
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "n/a".into()),
            sp.per_wall_s,
            sp.mean_events,
            sp.mean_virtual_ms,
            sp.last_outcome
        );
    }
    if speed_only {
        return Ok(s);
    }
    let big = if quick { 4 * gib } else { 16 * gib };
    s += &format!(
        "\nrdma-100g transfer efficiency, idle {} guest, dynamic registration, 1 MiB chunks:\n",
        fmt_bytes(big)
    );
    let idle = base("rdma-100g", big, 0, Pattern::Uniform);
    s += &throughput_case(
        "default profile (destination memory untouched: pinning faults it in; 4 registration threads)",
        idle.clone(),
    )?;
    let mut pre = idle.clone();
    pre.guest.dst_pretouched = true;
    s += &throughput_case(
        "destination memory pre-faulted (-mem-prealloc): pinning only",
        pre,
    )?;
    let mut threads = idle.clone();
    threads.profile.reg_threads = 8;
    s += &throughput_case("untouched memory, 8 registration threads", threads)?;
    let mut serial = base(
        "rdma-40g",
        if quick { gib } else { 8 * gib },
        0,
        Pattern::Uniform,
    );
    serial.migration.reg_batch = 1;
    serial.migration.max_reg_inflight = 1;
    serial.profile.reg_threads = 1;
    serial.profile.channels = 1;
    s += &throughput_case(
        "reference: registration unpipelined (one chunk per request, one request in flight, one thread) on rdma-40g; QEMU, which also waits for each write, reached ~24% of 40 Gb/s",
        serial,
    )?;
    Ok(s)
}
