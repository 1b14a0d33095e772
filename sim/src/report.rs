//! The report of one run: JSON for tools, a readable summary for people. Every figure is
//! computed from what the run measured; nothing is estimated after the fact.

use std::collections::BTreeMap;

use rdmig_model::Outcome;
use serde::Serialize;

use crate::profile::Transport;
use crate::units::{fmt_bytes, ms};
use crate::world::{outcome_name, Cpu, Sim, Stats, BIN_NS, CAUSES, DST, SRC};

#[derive(Debug, Clone, Serialize)]
pub struct OutcomeReport {
    /// One word for counting runs: `completed`, `aborted:<Reason>`, `in-doubt, destination
    /// <x>`, `source-crashed, destination <x>`, ...
    pub class: String,
    pub source: String,
    pub destination: String,
    pub source_detail: Option<String>,
    pub destination_detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bytes {
    /// Page contents placed at the destination by writes.
    pub data_payload: u64,
    /// Every posted write on the wire, packet headers included (writes cut short by a
    /// failure count in full).
    pub data_wire: u64,
    /// Pages sent as ZERO ranges instead of data, and their size.
    pub zero_pages: u64,
    pub zero_page_bytes: u64,
    /// ZERO frames on the wire.
    pub zero_frame_bytes: u64,
    pub zero_frames: u64,
    /// Every other control frame.
    pub control_bytes: u64,
    pub control_frames: u64,
    pub frames_lost: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub last: bool,
    pub dirty_bytes: u64,
    pub zero_bytes: u64,
    pub sent_bytes: u64,
    pub writes: u64,
    pub duration_ms: Option<f64>,
    pub throughput_gbps: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    /// REG_REQUEST round trips and the chunks they carried.
    pub requests: u64,
    pub chunks: u64,
    pub unreg_requests: u64,
    pub unreg_chunks: u64,
    /// Memory registrations the destination performed.
    pub registrations: u64,
    pub max_registered_bytes: u64,
    /// Registration threads' busy time, summed.
    pub busy_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    pub total_s: f64,
    pub transport_s: f64,
    pub requests_s: f64,
    pub scan_s: f64,
    pub digest_s: f64,
    pub registration_s: f64,
    pub zero_fill_s: f64,
    pub control_s: f64,
}

impl From<&Cpu> for CpuReport {
    fn from(c: &Cpu) -> Self {
        let s = |n: u64| n as f64 / 1e9;
        CpuReport {
            total_s: s(c.total_ns()),
            transport_s: s(c.transport_ns),
            requests_s: s(c.requests_ns),
            scan_s: s(c.scan_ns),
            digest_s: s(c.digest_ns),
            registration_s: s(c.registration_ns),
            zero_fill_s: s(c.zero_fill_ns),
            control_s: s(c.control_ns),
        }
    }
}

/// Downtime split at the events that bound its parts.
#[derive(Debug, Clone, Serialize)]
pub struct Downtime {
    /// Pause to the final round's ROUND_ACK: the final scan, the last dirty pages.
    pub final_round_ms: Option<f64>,
    /// Final ROUND_ACK to COMMIT: device state, digests on both sides, PREPARE/PREPARED.
    pub verify_ms: Option<f64>,
    /// COMMIT to the destination's workload running.
    pub commit_to_start_ms: Option<f64>,
    /// Final ROUND_ACK to PREPARE sent: what the device state (and the digests) added to the
    /// downtime before the destination could vote.
    pub ack_to_prepare_ms: Option<f64>,
}

/// The device state and its path (spec: SW-3, STATE-1 .. STATE-5).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStateReport {
    /// `control` (DEVICE_STATE frames) or `area` (writes into the state area).
    pub path: &'static str,
    pub bytes: u64,
    /// The negotiated state area (0 on the control channel).
    pub area_bytes: u64,
    /// Device-state bytes the source wrote into the area, the writes that carried them, and
    /// what the destination's NIC placed of them per data channel.
    pub written_bytes: u64,
    pub writes: u64,
    /// Those writes on the wire, headers included.
    pub wire_bytes: u64,
    pub placed_by_channel: Vec<u64>,
    /// Bytes the destination fed its consumer (STATE_PLACED).
    pub fed_bytes: u64,
    /// The VMM's production rate and the consumer's rate, bytes per second (0: at once).
    pub save_bytes_per_s: u64,
    pub load_bytes_per_s: u64,
    /// From the final ROUND_ACK: the VMM done producing, and the consumer done loading
    /// (negative when it happened before the ROUND_ACK).
    pub produced_after_ack_ms: Option<f64>,
    pub loaded_after_ack_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub profile: String,
    pub transport: Transport,
    pub link_gbps: f64,
    pub ram_bytes: u64,
    pub page_bytes: u64,
    pub dirty_bytes_per_s: u64,
    pub pattern: String,
    pub zero_fraction: f64,
    pub mode: &'static str,
    pub chunk_bytes: u64,
    pub channels: u8,
    pub pin_budget_bytes: u64,
    pub faults_enabled: Vec<&'static str>,
    pub faults_injected: BTreeMap<&'static str, u64>,
    pub outcome: OutcomeReport,
    /// Start to the last side's outcome.
    pub total_ms: f64,
    /// Start to BLOCK_TABLE_ACK (handshake, authentication, pin-all registration).
    pub setup_ms: Option<f64>,
    /// Source pause to destination workload running.
    pub downtime_ms: Option<f64>,
    pub downtime: Downtime,
    pub device_state: DeviceStateReport,
    pub predicted_downtime_ms: Option<f64>,
    pub downtime_limit_ms: u64,
    pub bytes: Bytes,
    pub rounds: Vec<RoundReport>,
    pub registration: Registration,
    pub cpu_source: CpuReport,
    pub cpu_destination: CpuReport,
    /// Time the source-to-destination link transmitted, over the total time.
    pub link_utilisation: f64,
    /// Payload placed per second of total time, over the line rate.
    pub effective_throughput_gbps: f64,
    /// Link idle time between writes within rounds, by what ended the gap.
    pub idle_gaps_ms: BTreeMap<&'static str, f64>,
    pub memory_verified: bool,
    pub guest_pages_written: u64,
    pub events: u64,
    pub trace_digest: String,
    /// (ms, Gb/s) of payload placed, at most 400 points.
    pub throughput: Vec<[f64; 2]>,
    /// Every phase change of either machine: (ms, side, phase).
    pub timeline: Vec<(f64, &'static str, String)>,
}

fn detail(o: Option<Outcome>) -> Option<String> {
    match o? {
        Outcome::Completed => None,
        Outcome::Aborted(a) => Some(a.detail.to_string()),
        Outcome::InDoubt(d) => Some(d.to_string()),
    }
}

/// Short name of one side's outcome for a class.
fn short(o: Option<Outcome>) -> &'static str {
    match o {
        None => "pending",
        Some(Outcome::Completed) => "started",
        Some(Outcome::Aborted(_)) => "aborted",
        Some(Outcome::InDoubt(_)) => "in-doubt",
    }
}

/// The outcome class a swarm counts.
pub fn classify(s: Option<Outcome>, d: Option<Outcome>, crashed: [bool; 2]) -> String {
    match (crashed[SRC], crashed[DST]) {
        (true, true) => "both-crashed".into(),
        (true, false) => format!("source-crashed, destination {}", short(d)),
        (false, true) => format!(
            "destination-crashed, source {}",
            short(s).replace("started", "completed")
        ),
        (false, false) => match s {
            Some(Outcome::Completed) => "completed".into(),
            Some(Outcome::Aborted(a)) => format!("aborted:{:?}", a.reason),
            Some(Outcome::InDoubt(_)) => format!("in-doubt, destination {}", short(d)),
            None => "pending".into(),
        },
    }
}

impl Report {
    pub fn of(sim: &Sim) -> Report {
        let cfg = &sim.cfg;
        let st = &sim.stats;
        let page_log2 = cfg.guest.page_log2;
        let end = end_ns(sim);
        Report {
            seed: cfg.seed,
            profile: cfg.profile.name.clone(),
            transport: cfg.profile.transport,
            link_gbps: cfg.profile.link_gbps,
            ram_bytes: cfg.guest.ram_bytes,
            page_bytes: 1 << page_log2,
            dirty_bytes_per_s: cfg.guest.dirty_bytes_per_s,
            pattern: cfg.guest.pattern.to_string(),
            zero_fraction: cfg.guest.zero_ppm as f64 / 1e6,
            mode: if cfg.migration.pin_all {
                "pin-all"
            } else {
                "dynamic"
            },
            chunk_bytes: 1 << cfg.migration.chunk_log2,
            channels: sim.src.params().channels,
            pin_budget_bytes: cfg.pin_budget(),
            faults_enabled: cfg.faults.kinds().iter().map(|k| k.name()).collect(),
            faults_injected: faults_injected(st),
            outcome: outcome_report(sim),
            total_ms: ms(end),
            setup_ms: st.setup_done_ns.map(ms),
            downtime_ms: st.paused_ns.zip(st.dst_started_ns).map(|(p, s)| ms(s - p)),
            downtime: downtime_parts(st),
            device_state: device_state_report(sim),
            predicted_downtime_ms: st.predicted_downtime_ns.map(ms),
            downtime_limit_ms: cfg.migration.downtime_limit_ms,
            bytes: byte_counts(sim),
            rounds: round_reports(sim),
            registration: registration_report(sim),
            cpu_source: (&st.cpu[SRC]).into(),
            cpu_destination: (&st.cpu[DST]).into(),
            link_utilisation: link_utilisation(sim, end),
            effective_throughput_gbps: st.data_placed_bytes as f64 * 8.0 / end as f64,
            idle_gaps_ms: idle_gaps(st),
            memory_verified: st.memory_verified,
            guest_pages_written: st.guest_pages_written,
            events: sim.trace.events,
            trace_digest: format!("{:016x}", sim.trace.digest()),
            throughput: throughput_series(&st.bins, 400),
            timeline: st
                .phases
                .iter()
                .map(|(t, side, p)| (ms(*t), ["source", "destination"][*side], p.clone()))
                .collect(),
        }
    }

    /// Readable summary. Lines only for what happened, so a fault-free run stays short.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s += &l;
            s.push('\n');
        };
        self.summarise_setup(&mut line);
        self.summarise_outcome(&mut line);
        self.summarise_traffic(&mut line);
        self.summarise_costs(&mut line);
        s
    }

    /// What ran: the guest and link, the protocol's settings, and the faults (if any).
    fn summarise_setup(&self, line: &mut impl FnMut(String)) {
        line(format!(
            "seed {}  profile {} ({:?}, {} Gb/s)  guest {} pages of {}  dirty {}/s {}  zero {:.0}%",
            self.seed,
            self.profile,
            self.transport,
            self.link_gbps,
            fmt_bytes(self.ram_bytes),
            fmt_bytes(self.page_bytes),
            fmt_bytes(self.dirty_bytes_per_s),
            self.pattern,
            self.zero_fraction * 100.0
        ));
        line(format!(
            "protocol {} registration, {} chunks, {} channel(s), pin budget {}",
            self.mode,
            fmt_bytes(self.chunk_bytes),
            self.channels,
            fmt_bytes(self.pin_budget_bytes)
        ));
        if !self.faults_enabled.is_empty() {
            line(format!(
                "faults enabled: {}",
                self.faults_enabled.join(", ")
            ));
            let inj: Vec<String> = self
                .faults_injected
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect();
            line(format!(
                "faults injected: {}",
                if inj.is_empty() {
                    "none".to_string()
                } else {
                    inj.join(", ")
                }
            ));
        }
    }

    /// How it ended: each side's outcome, the times, and the downtime's parts if it had any.
    fn summarise_outcome(&self, line: &mut impl FnMut(String)) {
        let o = &self.outcome;
        line(format!(
            "outcome {}  (source {}{}, destination {}{})",
            o.class,
            o.source,
            o.source_detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
            o.destination,
            o.destination_detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        ));
        line(format!(
            "total {:.3} ms, setup {}, downtime {} (predicted {}, limit {} ms)",
            self.total_ms,
            opt_ms(self.setup_ms),
            opt_ms(self.downtime_ms),
            opt_ms(self.predicted_downtime_ms),
            self.downtime_limit_ms
        ));
        if self.downtime_ms.is_some() {
            line(format!(
                "downtime parts: final round {}, device state + digests + prepare {}, commit to start {}",
                opt_ms(self.downtime.final_round_ms),
                opt_ms(self.downtime.verify_ms),
                opt_ms(self.downtime.commit_to_start_ms)
            ));
        }
        let d = &self.device_state;
        if d.path == "area" {
            let rel = |t: Option<f64>| {
                t.map(|t| format!("{t:+.3} ms"))
                    .unwrap_or_else(|| "-".into())
            };
            line(format!(
                "device state {} over the data channels into a {} state area: {} written in {} writes ({} with headers), {} fed to the consumer",
                fmt_bytes(d.bytes),
                fmt_bytes(d.area_bytes),
                fmt_bytes(d.written_bytes),
                d.writes,
                fmt_bytes(d.wire_bytes),
                fmt_bytes(d.fed_bytes)
            ));
            line(format!(
                "device state in the downtime: final ROUND_ACK to PREPARE {} (from the ROUND_ACK: produced {}, loaded {})",
                opt_ms(self.downtime.ack_to_prepare_ms),
                rel(d.produced_after_ack_ms),
                rel(d.loaded_after_ack_ms)
            ));
        }
    }

    /// What crossed the wire: bytes by kind, registration traffic, and a line per round.
    fn summarise_traffic(&self, line: &mut impl FnMut(String)) {
        let b = &self.bytes;
        line(format!(
            "wire: data {} placed ({} posted, with headers), zero {} pages = {} elided in {} ZERO frames ({}), control {} in {} frames{}",
            fmt_bytes(b.data_payload),
            fmt_bytes(b.data_wire),
            b.zero_pages,
            fmt_bytes(b.zero_page_bytes),
            b.zero_frames,
            fmt_bytes(b.zero_frame_bytes),
            fmt_bytes(b.control_bytes),
            b.control_frames,
            if b.frames_lost > 0 {
                format!(", {} frames lost", b.frames_lost)
            } else {
                String::new()
            }
        ));
        line(format!(
            "rounds {}, registration round trips {} ({} chunks, {} unreg requests), max registered {}, registration busy {:.3} ms",
            self.rounds.len(),
            self.registration.requests,
            self.registration.chunks,
            self.registration.unreg_requests,
            fmt_bytes(self.registration.max_registered_bytes),
            self.registration.busy_ms
        ));
        for r in &self.rounds {
            line(round_line(r));
        }
    }

    /// What it cost: CPU on each side, how busy the link was and why it idled, and the
    /// verification and trace that make the run checkable.
    fn summarise_costs(&self, line: &mut impl FnMut(String)) {
        line(format!(
            "cpu: source {:.4} s (transport {:.4}, requests {:.4}, scan {:.4}, digests {:.4}), destination {:.4} s (transport {:.4}, registration {:.4}, zero fill {:.4}, digests {:.4})",
            self.cpu_source.total_s,
            self.cpu_source.transport_s,
            self.cpu_source.requests_s,
            self.cpu_source.scan_s,
            self.cpu_source.digest_s,
            self.cpu_destination.total_s,
            self.cpu_destination.transport_s,
            self.cpu_destination.registration_s,
            self.cpu_destination.zero_fill_s,
            self.cpu_destination.digest_s
        ));
        line(format!(
            "link utilisation {:.1}%, effective payload throughput {:.2} Gb/s over the whole run",
            self.link_utilisation * 100.0,
            self.effective_throughput_gbps
        ));
        if !self.idle_gaps_ms.is_empty() {
            let g: Vec<String> = self
                .idle_gaps_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.3} ms"))
                .collect();
            line(format!(
                "link idle between writes, ended by: {}",
                g.join(", ")
            ));
        }
        line(format!(
            "memory verified at start: {}",
            if self.memory_verified { "yes" } else { "no" }
        ));
        line(format!(
            "trace: {} events, digest {}",
            self.events, self.trace_digest
        ));
    }
}

/// One round of the summary; `*` marks the final round.
fn round_line(r: &RoundReport) -> String {
    format!(
        "  round {:>3}{} dirty {:>12} zero {:>12} sent {:>12} in {:>6} writes, {} ms{}",
        r.round,
        if r.last { "*" } else { " " },
        fmt_bytes(r.dirty_bytes),
        fmt_bytes(r.zero_bytes),
        fmt_bytes(r.sent_bytes),
        r.writes,
        r.duration_ms
            .map(|d| format!("{d:.3}"))
            .unwrap_or_else(|| "-".into()),
        r.throughput_gbps
            .map(|g| format!(", {g:.1} Gb/s"))
            .unwrap_or_default()
    )
}

/// When the run ended: the last side's outcome, or now if a side never reached one. At least
/// 1 ns, as rates divide by it.
fn end_ns(sim: &Sim) -> u64 {
    let end = sim
        .stats
        .finished_ns
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(sim.now_ns());
    end.max(1)
}

/// How many times each fault kind struck.
fn faults_injected(st: &Stats) -> BTreeMap<&'static str, u64> {
    let mut injected = BTreeMap::new();
    for (_, k, _) in &st.faults {
        *injected.entry(k.name()).or_insert(0) += 1;
    }
    injected
}

fn outcome_report(sim: &Sim) -> OutcomeReport {
    let s_out = sim.src.outcome();
    let d_out = sim.lsn.outcome();
    OutcomeReport {
        class: classify(s_out, d_out, [sim.crashed(SRC), sim.crashed(DST)]),
        source: outcome_name(s_out, sim.crashed(SRC)),
        destination: match (d_out, sim.crashed(DST), sim.lsn.session()) {
            (None, false, None) => "listening (no session)".into(),
            (d, crashed, _) => outcome_name(d, crashed),
        },
        source_detail: detail(s_out),
        destination_detail: detail(d_out),
    }
}

/// The downtime's parts, each present only if both events that bound it happened.
fn downtime_parts(st: &Stats) -> Downtime {
    let final_ack = st.rounds.last().and_then(|r| r.end_ns);
    Downtime {
        final_round_ms: st
            .paused_ns
            .zip(final_ack)
            .filter(|(p, a)| a >= p)
            .map(|(p, a)| ms(a - p)),
        verify_ms: final_ack
            .zip(st.commit_sent_ns)
            .map(|(a, c)| ms(c.saturating_sub(a))),
        commit_to_start_ms: st
            .commit_sent_ns
            .zip(st.dst_started_ns)
            .map(|(c, s)| ms(s - c)),
        ack_to_prepare_ms: st
            .final_ack_ns
            .zip(st.prepare_sent_ns)
            .map(|(a, p)| ms(p.saturating_sub(a))),
    }
}

fn device_state_report(sim: &Sim) -> DeviceStateReport {
    let (cfg, st) = (&sim.cfg, &sim.stats);
    let area = cfg.state_area_bytes();
    let after_ack = |t: Option<u64>| {
        t.zip(st.final_ack_ns)
            .map(|(t, a)| (t as f64 - a as f64) / 1e6)
    };
    DeviceStateReport {
        path: if cfg.guest.state_area {
            "area"
        } else {
            "control"
        },
        bytes: cfg.guest.device_state_bytes,
        area_bytes: area,
        written_bytes: sim.src_stats.state_bytes,
        writes: sim.src_stats.state_writes,
        wire_bytes: st.state_wire_bytes,
        placed_by_channel: st.state_placed_by_channel.clone(),
        fed_bytes: st.state_fed_bytes,
        save_bytes_per_s: cfg.guest.state_save_bytes_per_s,
        load_bytes_per_s: cfg.guest.state_load_bytes_per_s,
        produced_after_ack_ms: after_ack(st.state_done_ns),
        loaded_after_ack_ms: after_ack(st.state_loaded_ns),
    }
}

fn byte_counts(sim: &Sim) -> Bytes {
    let st = &sim.stats;
    Bytes {
        data_payload: st.data_placed_bytes,
        data_wire: st.data_wire_bytes,
        zero_pages: sim.src_stats.zero_pages,
        zero_page_bytes: sim.src_stats.zero_pages << sim.cfg.guest.page_log2,
        zero_frame_bytes: st.zero_frame_bytes,
        zero_frames: st.zero_frames,
        control_bytes: st.control_bytes,
        control_frames: st.control_frames,
        frames_lost: st.frames_lost,
    }
}

/// Each round as the source counted it, timed by the simulator (a round the run cut short
/// has no duration).
fn round_reports(sim: &Sim) -> Vec<RoundReport> {
    let page_log2 = sim.cfg.guest.page_log2;
    sim.src_stats
        .rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let t = sim.stats.rounds.get(i);
            let dur = t.and_then(|t| t.end_ns.map(|e| e - t.start_ns));
            RoundReport {
                round: r.round,
                last: r.last,
                dirty_bytes: r.dirty_pages << page_log2,
                zero_bytes: r.zero_pages << page_log2,
                sent_bytes: r.data_bytes,
                writes: r.writes,
                duration_ms: dur.map(ms),
                throughput_gbps: dur
                    .filter(|&d| d > 0)
                    .map(|d| r.data_bytes as f64 * 8.0 / d as f64),
            }
        })
        .collect()
}

fn registration_report(sim: &Sim) -> Registration {
    Registration {
        requests: sim.src_stats.reg_requests,
        chunks: sim.src_stats.reg_chunks,
        unreg_requests: sim.src_stats.unreg_requests,
        unreg_chunks: sim.src_stats.unreg_chunks,
        registrations: sim.stats.registrations,
        max_registered_bytes: sim.dst_stats.max_registered_bytes,
        busy_ms: ms(sim.stats.reg_busy_ns),
    }
}

/// Time the link transmitted over the run's `end`.
fn link_utilisation(sim: &Sim, end: u64) -> f64 {
    // Writes queued behind the end of the run never reached the wire.
    sim.stats
        .link_busy_ns
        .saturating_sub(sim.link_free_ns().saturating_sub(end)) as f64
        / end as f64
}

/// Idle gaps by the cause that ended them, only the causes that occurred.
fn idle_gaps(st: &Stats) -> BTreeMap<&'static str, f64> {
    let mut idle = BTreeMap::new();
    for (i, name) in CAUSES.iter().enumerate() {
        if st.idle_gap_ns[i] > 0 {
            idle.insert(*name, ms(st.idle_gap_ns[i]));
        }
    }
    idle
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3} ms"))
        .unwrap_or_else(|| "-".into())
}

/// Bins merged to at most `max_points` (ms, Gb/s) points.
pub fn throughput_series(bins: &[u64], max_points: usize) -> Vec<[f64; 2]> {
    if bins.is_empty() {
        return Vec::new();
    }
    let per = bins.len().div_ceil(max_points).max(1);
    bins.chunks(per)
        .enumerate()
        .map(|(i, c)| {
            let bytes: u64 = c.iter().sum();
            let t_ns = (c.len() as u64 * BIN_NS) as f64;
            [
                (i * per) as f64 * BIN_NS as f64 / 1e6,
                bytes as f64 * 8.0 / t_ns,
            ]
        })
        .collect()
}
