//! `rdmig-sim`: run, compare, sweep and swarm-test rdmig migrations on simulated hardware.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use rdmig_sim::faults::FaultKind;
use rdmig_sim::guest::{GuestConfig, Pattern, ScanBase};
use rdmig_sim::plot::{self, Series};
use rdmig_sim::profile::{Profile, PROFILE_NAMES};
use rdmig_sim::rng::parse_seed;
use rdmig_sim::units::{fmt_bytes, parse_rate, parse_size};
use rdmig_sim::{bench, run, swarm, Report, RunResult, SimConfig, SwarmSummary};

/// Deterministic simulator for rdmig live migration: the production source and destination
/// state machines against simulated RDMA/TCP hardware, a simulated guest and injected faults,
/// on a virtual clock. One seed reproduces a run exactly.
#[derive(Parser)]
#[command(
    name = "rdmig-sim",
    version,
    after_help = "Examples:\n  \
    rdmig-sim run --seed 7 --ram 4GiB --dirty 500MB/s --pattern hot:0.1 --plot-dir out\n  \
    rdmig-sim run --seed 7 --faults                 (faults drawn from the seed)\n  \
    rdmig-sim run --ram 8GiB --device-state 2GiB --state-area --state-save-rate 4GB/s\n  \
    rdmig-sim compare --profiles rdma-100g,tcp-100g --ram 64GiB --dirty 2GB/s\n  \
    rdmig-sim sweep --ram 8GiB --downtime-ms 100 --dirty-to 4GB/s --out sweep.svg\n  \
    rdmig-sim swarm --seeds 1000 --ram 16MiB\n  \
    rdmig-sim bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate one migration and print its report.
    Run {
        /// A u64, 0x-hex, or a 40-hex commit hash.
        #[arg(long, default_value = "1")]
        seed: String,
        #[command(flatten)]
        w: Workload,
        /// Inject faults drawn from the seed (swarm strengths).
        #[arg(long)]
        faults: bool,
        /// Inject only this fault kind, often (connection-loss, completion-delay,
        /// completion-reorder, registration-failure, pin-budget, slow-receiver, source-crash,
        /// destination-crash, cancel, wrong-key).
        #[arg(long, value_name = "KIND")]
        fault: Option<String>,
        /// Draw the whole configuration from the seed, as `swarm` does (replays a swarm seed).
        #[arg(long)]
        swarm: bool,
        /// Print the report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Write rounds.svg and throughput.svg here.
        #[arg(long, value_name = "DIR")]
        plot_dir: Option<PathBuf>,
        /// Trace records shown if an invariant is violated.
        #[arg(long, default_value_t = 48)]
        trace_tail: usize,
    },
    /// Run one workload on several profiles side by side ("RDMA vs NIC").
    Compare {
        #[arg(long, default_value = "rdma-100g,tcp-100g", value_delimiter = ',')]
        profiles: Vec<String>,
        #[arg(long, default_value = "1")]
        seed: String,
        #[command(flatten)]
        w: Workload,
        #[arg(long)]
        json: bool,
    },
    /// Total time and downtime against dirty rate, for several profiles; writes an SVG.
    Sweep {
        #[arg(
            long,
            default_value = "rdma-25g,rdma-100g,tcp-25g,tcp-100g",
            value_delimiter = ','
        )]
        profiles: Vec<String>,
        #[arg(long, default_value = "0")]
        dirty_from: String,
        #[arg(long, default_value = "3GB/s")]
        dirty_to: String,
        #[arg(long, default_value_t = 7)]
        steps: u32,
        #[arg(long, default_value = "1")]
        seed: String,
        #[command(flatten)]
        w: Workload,
        #[arg(long, default_value = "sweep.svg")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run N seeds with swarm-drawn configurations and faults; count outcomes, report failures.
    Swarm {
        #[arg(long, default_value_t = 500)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        start: u64,
        #[command(flatten)]
        w: Workload,
        /// Print one line per run.
        #[arg(long)]
        verbose: bool,
    },
    /// Print the performance figures: simulated migrations per second of one core, and the
    /// rdma-100g transfer efficiency on a 16 GiB idle guest with where the time goes.
    Bench {
        /// Fewer runs and a 4 GiB guest instead of 16 GiB.
        #[arg(long)]
        quick: bool,
        /// Seeds per speed case (default 300, or 40 with --quick).
        #[arg(long)]
        runs: Option<u64>,
        /// Only the simulator-speed figures.
        #[arg(long)]
        speed_only: bool,
    },
    /// List the transport profiles and their parameters.
    Profiles,
    /// Predicted against measured: real runs (`make qemu-bench`'s results.jsonl) simulated on
    /// a loopback profile calibrated from `rdmig bench --json`.
    Validate {
        /// `rdmig bench --json` output, measured with the runs' guest load (`--busy N`).
        #[arg(long)]
        bench: PathBuf,
        /// `make qemu-bench`'s results (target/qemu-cache/results.jsonl).
        #[arg(long)]
        results: PathBuf,
        /// The VMM's pause and device-state save, ms (QEMU 10, TCG: about 4).
        #[arg(long, default_value_t = 4.0)]
        pause_ms: f64,
        /// The VMM's state load and start, ms (QEMU 10, TCG: about 8).
        #[arg(long, default_value_t = 8.0)]
        start_ms: f64,
    },
}

/// The workload and protocol knobs shared by every command.
#[derive(Args, Clone)]
struct Workload {
    /// Transport profile (see `profiles`).
    #[arg(long, default_value = "rdma-100g")]
    profile: String,
    /// Override a profile parameter, e.g. --set link_gbps=40 --set reg_threads=8.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Guest RAM, e.g. 1GiB, 64GiB.
    #[arg(long, default_value = "1GiB")]
    ram: String,
    /// Guest dirty rate, e.g. 100MB/s.
    #[arg(long, default_value = "0")]
    dirty: String,
    /// uniform, hot:F[:P], seq, burst:ON_MS:OFF_MS.
    #[arg(long, default_value = "uniform")]
    pattern: String,
    /// Fraction of pages initially zero.
    #[arg(long, default_value_t = 0.1)]
    zero: f64,
    /// Fraction of guest writes that leave a page zero.
    #[arg(long, default_value_t = 0.0)]
    zero_writes: f64,
    /// Fraction of guest writes that put a page back to its content before its last write
    /// (a lock released, a counter decremented).
    #[arg(long, default_value_t = 0.0)]
    revert_writes: f64,
    /// Guest page size (4KiB, or 2MiB for huge pages).
    #[arg(long, default_value = "4KiB")]
    page_size: String,
    /// RAM blocks.
    #[arg(long, default_value_t = 1)]
    blocks: u8,
    /// Device state handed over at switchover (at most 64MiB on the control channel, 16GiB
    /// with --state-area).
    #[arg(long, default_value = "256KiB")]
    device_state: String,
    /// The device state travels over the data channels into a state area at the destination
    /// (spec: STATE-1) instead of in DEVICE_STATE frames on the control channel.
    #[arg(long)]
    state_area: bool,
    /// With --state-area: the rate at which the VMM writes its device state into the state
    /// buffer, e.g. 2GB/s (0 = all of it at once when captured).
    #[arg(long, default_value = "0")]
    state_save_rate: String,
    /// With --state-area: the rate at which the destination's VMM loads the device state as
    /// it is placed, e.g. 1GB/s (0 = at once).
    #[arg(long, default_value = "0")]
    state_load_rate: String,
    /// With --state-area: the destination's capacity for it (whole 4KiB pages; default: what
    /// the source proposes). Below the device state, the source aborts and resumes.
    #[arg(long, value_name = "SIZE")]
    state_capacity: Option<String>,
    /// Destination memory pre-faulted (no first-touch cost when pinning or receiving).
    #[arg(long)]
    pretouched: bool,
    /// Chunk size (registration and digest unit).
    #[arg(long, default_value = "1MiB")]
    chunk: String,
    /// dynamic or pin-all.
    #[arg(long, default_value = "dynamic")]
    mode: String,
    /// Data channels (default: the profile's).
    #[arg(long)]
    channels: Option<u8>,
    /// Writes in flight per channel (default: the profile's send-queue depth).
    #[arg(long)]
    sq_depth: Option<u16>,
    /// Chunks per REG_REQUEST.
    #[arg(long, default_value_t = 64)]
    reg_batch: u16,
    /// REG_REQUESTs outstanding at once.
    #[arg(long, default_value_t = 4)]
    max_reg_inflight: u8,
    /// Destination pin budget (default: all of RAM).
    #[arg(long)]
    pin_budget: Option<String>,
    /// Downtime limit the source converges to (spec: CONV-1).
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Rounds before switching over (or aborting) regardless (spec: CONV-2).
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// At the round limit abort instead of switching over.
    #[arg(long)]
    abort_on_limit: bool,
    /// Abort when the peer is silent this long (spec: ERR-4).
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// Send a NOP after this long without sending (0 = off; spec: ERR-5).
    #[arg(long, default_value_t = 5_000)]
    keepalive_ms: u64,
    /// Send zero pages as data instead of ZERO ranges.
    #[arg(long)]
    no_zero_elision: bool,
    /// Skip the end-of-migration digest verification.
    #[arg(long)]
    no_verify: bool,
    /// No pre-shared key (both sides insecure).
    #[arg(long)]
    insecure: bool,
    /// The dirty log hashes all memory at every scan (`rdmig send --dirty-log scan`).
    #[arg(long)]
    hash_scan: bool,
    /// What the hash log compares a page against: held (the content sent and the content at
    /// the previous scan), last-scan (loses a page changed back after it was sent) or
    /// held-only (loses a page the switchover merge keeps as zero).
    #[arg(long, default_value = "held")]
    scan_base: String,
    /// Time to pause the workload and save its device state (a QEMU `stop` and state save).
    #[arg(long, default_value_t = 0.2)]
    pause_ms: f64,
    /// Time to load the device state and start the workload at the destination.
    #[arg(long, default_value_t = 0.2)]
    start_ms: f64,
}

fn log2_of(bytes: u64, what: &str) -> Result<u8, String> {
    if bytes.is_power_of_two() {
        Ok(bytes.trailing_zeros() as u8)
    } else {
        Err(format!("{what} must be a power of two"))
    }
}

impl Workload {
    fn profile(&self, name: &str) -> Result<Profile, String> {
        let mut p = Profile::named(name).ok_or_else(|| {
            format!(
                "unknown profile {name:?}; known: {}",
                PROFILE_NAMES.join(", ")
            )
        })?;
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            p.set(k.trim(), v.trim())?;
        }
        Ok(p)
    }

    fn config(&self, seed: u64, profile: &str) -> Result<SimConfig, String> {
        let mut g = GuestConfig::new(parse_size(&self.ram)?);
        g.dirty_bytes_per_s = parse_rate(&self.dirty)?;
        g.pattern = self.pattern.parse::<Pattern>()?;
        let frac = |x: f64, what: &str| -> Result<u32, String> {
            if (0.0..=1.0).contains(&x) {
                Ok((x * 1e6).round() as u32)
            } else {
                Err(format!("{what} must be within 0..=1"))
            }
        };
        g.zero_ppm = frac(self.zero, "--zero")?;
        g.zero_write_ppm = frac(self.zero_writes, "--zero-writes")?;
        g.revert_write_ppm = frac(self.revert_writes, "--revert-writes")?;
        g.page_log2 = log2_of(parse_size(&self.page_size)?, "--page-size")?;
        g.blocks = self.blocks;
        g.device_state_bytes = parse_size(&self.device_state)?;
        g.state_area = self.state_area;
        g.state_save_bytes_per_s = parse_rate(&self.state_save_rate)?;
        g.state_load_bytes_per_s = parse_rate(&self.state_load_rate)?;
        g.dst_pretouched = self.pretouched;
        g.hash_scan = self.hash_scan;
        g.scan_base = self.scan_base.parse::<ScanBase>()?;
        let ms = |x: f64, what: &str| -> Result<u64, String> {
            if x.is_finite() && x >= 0.0 {
                Ok((x * 1e6).round() as u64)
            } else {
                Err(format!(
                    "{what} must be a non-negative number of milliseconds"
                ))
            }
        };
        g.pause_ns = ms(self.pause_ms, "--pause-ms")?;
        g.start_ns = ms(self.start_ms, "--start-ms")?;
        let mut c = SimConfig::new(seed, self.profile(profile)?, g);
        let m = &mut c.migration;
        m.chunk_log2 = log2_of(parse_size(&self.chunk)?, "--chunk")?;
        m.pin_all = match self.mode.as_str() {
            "dynamic" => false,
            "pin-all" | "pinall" => true,
            o => return Err(format!("--mode {o:?}: dynamic or pin-all")),
        };
        m.channels = self.channels;
        m.writes_per_channel = self.sq_depth;
        m.reg_batch = self.reg_batch;
        m.max_reg_inflight = self.max_reg_inflight;
        m.pin_budget = self.pin_budget.as_deref().map(parse_size).transpose()?;
        m.downtime_limit_ms = self.downtime_ms;
        m.max_rounds = self.max_rounds;
        m.on_limit_abort = self.abort_on_limit;
        m.idle_timeout_ms = self.idle_timeout_ms;
        m.keepalive_ms = self.keepalive_ms;
        m.zero_elision = !self.no_zero_elision;
        m.verify_digests = !self.no_verify;
        m.authenticate = !self.insecure;
        m.state_capacity = self.state_capacity.as_deref().map(parse_size).transpose()?;
        c.validate()?;
        Ok(c)
    }

    /// The flags that rebuild this workload, for replay commands.
    fn args(&self) -> String {
        let mut a = format!(
            "--profile {} --ram {} --dirty {} --pattern {} --zero {} --zero-writes {} --revert-writes {} --scan-base {} --page-size {} --blocks {} --device-state {} --chunk {} --mode {} --reg-batch {} --max-reg-inflight {} --downtime-ms {} --max-rounds {} --idle-timeout-ms {} --keepalive-ms {}",
            self.profile, self.ram, self.dirty, self.pattern, self.zero, self.zero_writes,
            self.revert_writes, self.scan_base, self.page_size, self.blocks, self.device_state, self.chunk, self.mode,
            self.reg_batch, self.max_reg_inflight, self.downtime_ms, self.max_rounds,
            self.idle_timeout_ms, self.keepalive_ms
        );
        for s in &self.set {
            a += &format!(" --set {s}");
        }
        if let Some(c) = self.channels {
            a += &format!(" --channels {c}");
        }
        if let Some(d) = self.sq_depth {
            a += &format!(" --sq-depth {d}");
        }
        if let Some(p) = &self.pin_budget {
            a += &format!(" --pin-budget {p}");
        }
        if self.state_area {
            a += &format!(
                " --state-area --state-save-rate {} --state-load-rate {}",
                self.state_save_rate, self.state_load_rate
            );
        }
        if let Some(c) = &self.state_capacity {
            a += &format!(" --state-capacity {c}");
        }
        a += &format!(" --pause-ms {} --start-ms {}", self.pause_ms, self.start_ms);
        for (on, flag) in [
            (self.hash_scan, "--hash-scan"),
            (self.pretouched, "--pretouched"),
            (self.abort_on_limit, "--abort-on-limit"),
            (self.no_zero_elision, "--no-zero-elision"),
            (self.no_verify, "--no-verify"),
            (self.insecure, "--insecure"),
        ] {
            if on {
                a += " ";
                a += flag;
            }
        }
        a
    }
}

fn write_plots(r: &Report, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    plot::rounds(r, &dir.join("rounds.svg"))?;
    plot::throughput(r, &dir.join("throughput.svg"))?;
    eprintln!(
        "wrote {} and {}",
        dir.join("rounds.svg").display(),
        dir.join("throughput.svg").display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            seed,
            w,
            faults,
            fault,
            swarm: drawn,
            json,
            plot_dir,
            trace_tail,
        } => {
            let choice = FaultChoice {
                drawn,
                fault,
                faults,
            };
            let out = RunOutput {
                json,
                plot_dir,
                trace_tail,
            };
            cmd_run(parse_seed(&seed)?, &w, &choice, &out)
        }
        Cmd::Compare {
            profiles,
            seed,
            w,
            json,
        } => cmd_compare(parse_seed(&seed)?, &profiles, &w, json),
        Cmd::Sweep {
            profiles,
            dirty_from,
            dirty_to,
            steps,
            seed,
            w,
            out,
            json,
        } => {
            // The seed is parsed before the rates, so a command with both wrong names the seed.
            let seed = parse_seed(&seed)?;
            let rates = DirtyRates::parse(&dirty_from, &dirty_to, steps)?;
            cmd_sweep(seed, &profiles, &rates, &w, &out, json)
        }
        Cmd::Swarm {
            seeds,
            start,
            w,
            verbose,
        } => cmd_swarm(start, seeds, &w, verbose),
        Cmd::Bench {
            quick,
            runs,
            speed_only,
        } => {
            print!("{}", bench::run_all(quick, runs, speed_only)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Profiles => {
            print_profiles();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate {
            bench,
            results,
            pause_ms,
            start_ms,
        } => cmd_validate(&bench, &results, pause_ms, start_ms),
    }
}

/// Prints `v` as pretty JSON on stdout.
fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Runs `cfg` to its report; a violated invariant is printed and gives `None`, so that the
/// commands that run many configurations stop at the first.
fn run_checked(cfg: SimConfig) -> Result<Option<Report>, String> {
    let res = run(cfg)?;
    if let Some(f) = &res.failure {
        eprint!("{f}");
        return Ok(None);
    }
    Ok(Some(res.report))
}

// ---------------------------------------------------------------------------------------------
// run

/// Which faults `run` injects. The flags are checked in this order and the first set wins, so
/// `--swarm` (whose drawn configuration includes its faults) overrides the other two.
struct FaultChoice {
    /// `--swarm`: the whole configuration drawn from the seed.
    drawn: bool,
    /// `--fault KIND`: only this kind, often.
    fault: Option<String>,
    /// `--faults`: faults drawn from the seed.
    faults: bool,
}

impl FaultChoice {
    fn apply(&self, seed: u64, cfg: SimConfig) -> Result<SimConfig, String> {
        Ok(if self.drawn {
            SimConfig::swarm(seed, &cfg)
        } else if let Some(k) = &self.fault {
            let kind = FaultKind::parse(k).ok_or_else(|| format!("unknown fault kind {k:?}"))?;
            cfg.with_fault(kind)
        } else if self.faults {
            cfg.with_random_faults()
        } else {
            cfg
        })
    }

    /// The flag that makes the same choice again, for the replay command.
    fn replay_flag(&self) -> String {
        if self.drawn {
            " --swarm".to_string()
        } else if let Some(k) = &self.fault {
            format!(" --fault {k}")
        } else if self.faults {
            " --faults".to_string()
        } else {
            String::new()
        }
    }
}

/// How `run` reports: JSON or the summary, the plots, and how much trace a failure shows.
struct RunOutput {
    json: bool,
    plot_dir: Option<PathBuf>,
    trace_tail: usize,
}

/// `run`: one migration and its report; on a violated invariant, the failure and the command
/// that replays it.
fn cmd_run(
    seed: u64,
    w: &Workload,
    choice: &FaultChoice,
    out: &RunOutput,
) -> Result<ExitCode, String> {
    let mut cfg = w.config(seed, &w.profile)?;
    cfg.trace_tail = out.trace_tail;
    let res = run(choice.apply(seed, cfg)?)?;
    if out.json {
        print_json(&res.report)?;
    } else {
        print!("{}", res.report.summary());
    }
    if let Some(d) = &out.plot_dir {
        write_plots(&res.report, d)?;
    }
    if let Some(f) = res.failure {
        eprint!("{f}");
        eprintln!(
            "replay: rdmig-sim run --seed {seed}{} {}",
            choice.replay_flag(),
            w.args()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// compare and sweep

/// `compare`: the same workload on each profile, side by side.
fn cmd_compare(
    seed: u64,
    profiles: &[String],
    w: &Workload,
    json: bool,
) -> Result<ExitCode, String> {
    let mut reports = Vec::new();
    for p in profiles {
        let Some(r) = run_checked(w.config(seed, p)?)? else {
            return Ok(ExitCode::FAILURE);
        };
        reports.push(r);
    }
    if json {
        print_json(&reports)?;
    } else {
        print!("{}", bench::compare_table(&reports));
    }
    Ok(ExitCode::SUCCESS)
}

/// The dirty rates a sweep visits: `steps` (at least two) evenly spaced from `lo` to `hi`,
/// both ends included.
struct DirtyRates {
    lo: u64,
    hi: u64,
    steps: u32,
}

impl DirtyRates {
    fn parse(from: &str, to: &str, steps: u32) -> Result<DirtyRates, String> {
        Ok(DirtyRates {
            lo: parse_rate(from)?,
            hi: parse_rate(to)?,
            steps: steps.max(2),
        })
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.steps)
            .map(move |i| self.lo + (self.hi - self.lo) * i as u64 / (self.steps - 1) as u64)
    }
}

/// `sweep`: a table row per profile and rate, then the SVG (and the reports as JSON).
fn cmd_sweep(
    seed: u64,
    profiles: &[String],
    rates: &DirtyRates,
    w: &Workload,
    out: &Path,
    json: bool,
) -> Result<ExitCode, String> {
    let mut total = Vec::new();
    let mut down = Vec::new();
    let mut rows = Vec::new();
    println!(
        "{:<12} {:>12} {:>24} {:>11} {:>13} {:>7}",
        "profile", "dirty", "outcome", "total s", "downtime ms", "rounds"
    );
    for p in profiles {
        let Some((t, d)) = sweep_profile(seed, p, rates, w, &mut rows)? else {
            return Ok(ExitCode::FAILURE);
        };
        total.push(t);
        down.push(d);
    }
    plot::sweep(&total, &down, out)?;
    eprintln!("wrote {}", out.display());
    if json {
        print_json(&rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One profile of a sweep: prints a row per rate and appends its report to `rows`. Returns
/// the total-time and downtime series, which plot completed runs only (an aborted run's times
/// say nothing about the rate), or `None` at the first violated invariant.
fn sweep_profile(
    seed: u64,
    profile: &str,
    rates: &DirtyRates,
    w: &Workload,
    rows: &mut Vec<Report>,
) -> Result<Option<(Series, Series)>, String> {
    let mut t = Series {
        label: profile.to_string(),
        points: Vec::new(),
    };
    let mut d = Series {
        label: profile.to_string(),
        points: Vec::new(),
    };
    for rate in rates.iter() {
        let mut cfg = w.config(seed, profile)?;
        cfg.guest.dirty_bytes_per_s = rate;
        let Some(r) = run_checked(cfg)? else {
            return Ok(None);
        };
        let x = rate as f64 / 1e9;
        print_sweep_row(profile, x, &r);
        if r.outcome.class == "completed" {
            t.points.push((x, r.total_ms / 1e3));
            if let Some(dt) = r.downtime_ms {
                d.points.push((x, dt));
            }
        }
        rows.push(r);
    }
    Ok(Some((t, d)))
}

/// One row of the sweep table, at `gbps` gigabytes per second dirtied.
fn print_sweep_row(profile: &str, gbps: f64, r: &Report) {
    println!(
        "{:<12} {:>10.2}GB/s {:>24} {:>11.3} {:>13} {:>7}",
        profile,
        gbps,
        r.outcome.class,
        r.total_ms / 1e3,
        r.downtime_ms
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into()),
        r.rounds.len()
    );
}

// ---------------------------------------------------------------------------------------------
// swarm and profiles

/// `swarm`: `seeds` runs from `start` with drawn configurations; the outcome counts, and every
/// failing seed with its replay command.
fn cmd_swarm(start: u64, seeds: u64, w: &Workload, verbose: bool) -> Result<ExitCode, String> {
    let base = w.config(start, &w.profile)?;
    // Machines' own assertions surface as PANIC failures with their seed; the default
    // hook would print each one mid-table.
    std::panic::set_hook(Box::new(|_| {}));
    let s = swarm(&base, start..start + seeds, |cfg, res| {
        if verbose || res.failure.is_some() {
            print_swarm_run(cfg, res);
        }
    });
    let _ = std::panic::take_hook();
    print_swarm_counts(&s);
    if s.failures.is_empty() {
        println!("no invariant violated");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} FAILING SEEDS:", s.failures.len());
        for (_, f) in &s.failures {
            print!("{f}");
            println!(
                "replay: rdmig-sim run --seed {} --swarm {}",
                f.seed,
                w.args()
            );
        }
        Ok(ExitCode::FAILURE)
    }
}

/// One line of the swarm table: the seed, its drawn RAM, the outcome and the faults that struck.
fn print_swarm_run(cfg: &SimConfig, res: &RunResult) {
    println!(
        "seed {:>8}  {:>10}  {:<40} faults [{}]{}",
        cfg.seed,
        fmt_bytes(cfg.guest.ram_bytes),
        res.report.outcome.class,
        res.report
            .faults_injected
            .keys()
            .copied()
            .collect::<Vec<_>>()
            .join(","),
        if res.failure.is_some() {
            "  FAILED"
        } else {
            ""
        }
    );
}

/// The swarm's totals: runs, events, runs per outcome, and runs in which each fault struck.
fn print_swarm_counts(s: &SwarmSummary) {
    println!("{} runs, {} events", s.runs, s.events);
    println!("outcomes:");
    for (k, n) in &s.outcomes {
        println!("  {n:>6}  {k}");
    }
    println!("runs in which each fault struck:");
    for (k, n) in &s.faults_hit {
        println!("  {n:>6}  {k}");
    }
}

/// `profiles`: every transport profile with its parameters.
fn print_profiles() {
    for n in PROFILE_NAMES {
        let p = Profile::named(n).expect("listed");
        println!("{n}:");
        print!("{}", p.describe());
    }
}

/// Prints the simulator's predictions next to the measured runs.
fn cmd_validate(
    bench: &Path,
    results: &Path,
    pause_ms: f64,
    start_ms: f64,
) -> Result<ExitCode, String> {
    use rdmig_sim::validate::{qemu_cases, table, Calibration};
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let b: serde_json::Value =
        serde_json::from_str(&read(bench)?).map_err(|e| format!("{}: {e}", bench.display()))?;
    let cal = Calibration::from_bench(&b, pause_ms, start_ms)?;
    let cases = qemu_cases(&read(results)?)?;
    if cases.is_empty() {
        return Err(format!("{}: no completed rdmig runs", results.display()));
    }
    println!(
        "calibration: data {:.2} GB/s (2 channels), {:.0} ns per data frame, hash scan {:.1} GB/s ({:.1} GB/s paused), {} busy cores; VMM pause {pause_ms} ms, start {start_ms} ms",
        cal.data_gb_s,
        cal.recv_write_ns,
        cal.scan_gb_s,
        cal.paused_scan_gb_s,
        b["busy_cores"].as_u64().unwrap_or(0)
    );
    let (t, worst_t, worst_d) = table(&cases, &cal)?;
    print!("{t}");
    println!(
        "largest error: total {:.0} % (target 25 %), downtime {:.0} % (target 35 %)",
        100.0 * worst_t,
        100.0 * worst_d
    );
    Ok(ExitCode::SUCCESS)
}
