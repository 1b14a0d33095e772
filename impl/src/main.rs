//! `rdmig`: live migration of memory between processes or hosts.

use std::io::IsTerminal;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rdmig::cli::{self, RamSpec};
use rdmig::driver::{self, DestRun, Progress, SourceRun};
use rdmig::memory::ram::RamBlock;
use rdmig::report::Report;
use rdmig::transport::tcp::{DestTcp, SourceTcp};
use rdmig::vmm::control::{DestWorkload, SourceWorkload, StateSink};
use rdmig_model::wire::{self, DigestAlg, RegMode};
use rdmig_model::{DestConfig, LimitPolicy, SourceConfig};

#[derive(Parser)]
#[command(
    name = "rdmig",
    version,
    about = "Live migration of memory over RDMA or TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive a migration: listen, take the memory, start the workload on commit.
    Recv(RecvArgs),
    /// Send a migration: connect, pre-copy live, switch over, commit.
    Send(SendArgs),
    /// A synthetic guest: maps a RAM file, fills it, keeps writing at a given rate.
    Workload(WorkloadArgs),
    /// Print the xxh3-64 digest of a file (e.g. a RAM file).
    Digest {
        /// Files to digest.
        files: Vec<PathBuf>,
    },
    /// A complete local live migration between separate processes, with a report.
    Demo(DemoArgs),
    /// Throughput and overhead benchmark on loopback (raw TCP stream vs rdmig).
    Bench(BenchArgs),
    /// List RDMA devices, their ports, port states and GIDs.
    Devices,
}

#[derive(clap::Args, Clone)]
struct TransportArgs {
    /// Transport: tcp, or rdma (verbs; control and data over RC queue pairs, bootstrapped
    /// over a TCP connection to the same address).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    transport: String,
    /// RDMA device (default: the first with an active port).
    #[arg(long)]
    rdma_device: Option<String>,
    /// GID index (default: the port's IPv4-mapped RoCE v2 GID).
    #[arg(long)]
    gid_index: Option<u8>,
}

impl TransportArgs {
    fn verbs(&self) -> Option<rdmig::transport::verbs::VerbsOptions> {
        (self.transport == "rdma").then(|| rdmig::transport::verbs::VerbsOptions {
            device: self.rdma_device.clone(),
            gid_index: self.gid_index,
        })
    }
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Pre-shared key file (at least 16 bytes), same on both sides.
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Run without authentication (explicit; required for non-loopback addresses without a key).
    #[arg(long)]
    insecure: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Page size of the RAM blocks.
    #[arg(long, default_value = "4KiB", value_parser = cli::parse_size)]
    page_size: u64,
    /// Seconds without a frame from the peer before giving up.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Threads for digests and dirty scans.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(clap::Args, Clone)]
struct RecvArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// RAM block NAME=PATH:SIZE (repeatable); files are created or resized and pre-faulted.
    #[arg(long = "ram", required = true, value_parser = cli::parse_ram)]
    ram: Vec<RamSpec>,
    /// Most bytes registered for remote writes at once (default: all memory).
    #[arg(long, value_parser = cli::parse_size)]
    pin_budget: Option<u64>,
    /// Most data channels accepted.
    #[arg(long, default_value_t = 16)]
    max_channels: u8,
    /// Command run to start the workload after commit.
    #[arg(long)]
    start_cmd: Option<String>,
    /// Process (stopped) to continue after commit.
    #[arg(long)]
    start_pid: Option<i32>,
    /// Where to write the received device state.
    #[arg(long)]
    state_out: Option<PathBuf>,
    /// QMP socket of the destination QEMU, waiting with `-incoming defer` on the --ram files
    /// (memory-backend-file, share=on). After commit rdmig loads the received device state
    /// into it (x-ignore-shared) and runs the guest.
    #[arg(long)]
    qemu_qmp: Option<PathBuf>,
    /// Command that starts the destination QEMU (with `-incoming defer` and `-qmp
    /// unix:SOCK,server=on,wait=off` for the --qemu-qmp socket); run before the migration
    /// starts, stopped again if the migration aborts.
    #[arg(long, requires = "qemu_qmp")]
    qemu_start: Option<String>,
    /// Where the QEMU started by --qemu-start writes its output (default: the QMP socket's
    /// path with `.log` appended).
    #[arg(long, requires = "qemu_start")]
    qemu_log: Option<PathBuf>,
    /// Write the listening address to this file once listening (for scripts).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Clone)]
struct SendArgs {
    /// Destination address.
    #[arg(long)]
    connect: String,
    /// RAM block NAME=PATH (repeatable).
    #[arg(long = "ram", required = true, value_parser = cli::parse_ram)]
    ram: Vec<RamSpec>,
    /// Data channels.
    #[arg(long, default_value_t = 1)]
    channels: u8,
    /// Registration and digest unit.
    #[arg(long, default_value = "1MiB", value_parser = cli::parse_size)]
    chunk_size: u64,
    /// Register all memory at setup instead of chunk by chunk.
    #[arg(long)]
    pin_all: bool,
    /// Target downtime in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Cap on data throughput, e.g. 500MB/s (default: none).
    #[arg(long, value_parser = cli::parse_rate)]
    max_bandwidth: Option<u64>,
    /// Pre-copy rounds before the limit policy applies.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Seconds of pre-copy before the limit policy applies.
    #[arg(long)]
    max_time: Option<u64>,
    /// What to do at the round or time limit: switchover or abort.
    #[arg(long, default_value = "switchover")]
    on_limit: String,
    /// Verify every chunk with a digest before commit.
    #[arg(long)]
    verify: bool,
    /// Dirty tracking: none, bitmap:PATH, soft-dirty:PID, scan, or auto (soft-dirty on the
    /// --pid or QEMU process where the kernel supports it, else scan). Default: auto with
    /// --qemu-qmp or --pid, none otherwise.
    #[arg(long)]
    dirty_log: Option<String>,
    /// Pause/resume the workload with SIGSTOP/SIGCONT to this process.
    #[arg(long)]
    pid: Option<i32>,
    /// Command that pauses the workload (its stdout is the device state unless --state-in).
    #[arg(long)]
    pause_cmd: Option<String>,
    /// Command that resumes the workload after an abort.
    #[arg(long)]
    resume_cmd: Option<String>,
    /// Device state file sent at switchover.
    #[arg(long)]
    state_in: Option<PathBuf>,
    /// QMP socket of the source QEMU, whose guest RAM is the --ram files
    /// (memory-backend-file, share=on): rdmig stops the guest at switchover, sends its device
    /// state (x-ignore-shared) and continues it if the migration aborts.
    #[arg(long, conflicts_with_all = ["pid", "pause_cmd", "resume_cmd", "state_in"])]
    qemu_qmp: Option<PathBuf>,
    /// Quit the source QEMU after commit (default: leave it stopped).
    #[arg(long, requires = "qemu_qmp")]
    qemu_quit: bool,
    /// Disable zero-page elision.
    #[arg(long)]
    no_zero_elision: bool,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Clone)]
struct WorkloadArgs {
    /// RAM file to create and keep writing.
    #[arg(long)]
    ram: PathBuf,
    #[arg(long, default_value = "256MiB", value_parser = cli::parse_size)]
    size: u64,
    /// Write rate in MB/s.
    #[arg(long, default_value_t = 50.0)]
    dirty_rate: f64,
    /// uniform, hot:FRACTION, sweep, bursts.
    #[arg(long, default_value = "uniform")]
    pattern: String,
    /// Fraction of pages kept zero.
    #[arg(long, default_value_t = 0.1)]
    zero_fraction: f64,
    /// Shared dirty bitmap file to maintain.
    #[arg(long)]
    bitmap: Option<PathBuf>,
    /// File created once the memory is filled.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "4KiB", value_parser = cli::parse_size)]
    page_size: u64,
}

#[derive(clap::Args, Clone)]
struct DemoArgs {
    #[arg(long, default_value = "256MiB", value_parser = cli::parse_size)]
    size: u64,
    /// Workload write rate in MB/s during the migration.
    #[arg(long, default_value_t = 64.0)]
    dirty_rate: f64,
    #[arg(long, default_value_t = 2)]
    channels: u8,
    /// Directory for the RAM files (default: /dev/shm if present, else a temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct BenchArgs {
    #[arg(long, default_value = "1GiB", value_parser = cli::parse_size)]
    size: u64,
    /// Internal: run as the receiving half of the raw stream measurement.
    #[arg(long, hide = true)]
    sink_port: Option<u16>,
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn page_log2(page: u64) -> Result<u8, String> {
    if !page.is_power_of_two() || !(4096..=1 << 30).contains(&page) {
        return Err(format!(
            "page size {page} must be a power of two from 4 KiB to 1 GiB"
        ));
    }
    Ok(page.trailing_zeros() as u8)
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr} resolves to nothing"))
}

fn finish(report: &Report, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("report serialises")
        );
    } else {
        eprintln!("{}", report.summary());
    }
    ExitCode::from(report.exit_code() as u8)
}

fn incomplete_marker(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".rdmig-incomplete");
    PathBuf::from(s)
}

fn recv(a: RecvArgs) -> Result<ExitCode, String> {
    let log2 = page_log2(a.common.page_size)?;
    let listen = resolve(&a.listen)?;
    let key = cli::resolve_key(a.common.psk_file.as_deref(), a.common.insecure, listen)?;
    let mut blocks = Vec::new();
    for r in &a.ram {
        let size = r
            .size
            .ok_or_else(|| format!("--ram {}: the destination needs NAME=PATH:SIZE", r.name))?;
        // Marked incomplete until commit, so a crash never leaves memory that looks migrated.
        std::fs::write(
            incomplete_marker(&r.path),
            b"rdmig: migration not committed\n",
        )
        .map_err(|e| format!("marking {}: {e}", r.path.display()))?;
        blocks.push(Arc::new(
            RamBlock::create(&r.name, &r.path, size, log2).map_err(|e| e.to_string())?,
        ));
    }
    let blocks = Arc::new(blocks);
    let total: u64 = blocks.iter().map(|b| b.len()).sum();
    let qemu = match &a.qemu_qmp {
        Some(sock) => {
            let files: Vec<_> = a
                .ram
                .iter()
                .map(|r| rdmig::vmm::qemu::RamFile {
                    path: r.path.clone(),
                    size: r.size.unwrap_or(0),
                })
                .collect();
            let log = a.qemu_log.clone().unwrap_or_else(|| {
                let mut l = sock.as_os_str().to_owned();
                l.push(".log");
                PathBuf::from(l)
            });
            let q = rdmig::vmm::qemu::QemuDest::attach(sock, &files, a.qemu_start.as_deref(), &log)
                .map_err(|e| format!("destination QEMU: {e}"))?;
            tracing::info!("destination QEMU {} waiting for the guest", q.version());
            Some(Arc::new(q))
        }
        None => None,
    };
    let listener = TcpListener::bind(listen).map_err(|e| format!("listening on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some(f) = &a.addr_file {
        std::fs::write(f, local.to_string())
            .map_err(|e| format!("writing {}: {e}", f.display()))?;
    }
    tracing::info!("listening on {local}");
    let mut cfg = DestConfig::with_defaults(
        blocks.iter().map(|b| b.desc()).collect(),
        key,
        a.pin_budget.unwrap_or(total),
    );
    cfg.max_channels = a.max_channels.clamp(1, wire::MAX_CHANNELS);
    cfg.idle_timeout_ms = a.common.idle_timeout * 1000;
    let run = DestRun {
        cfg,
        blocks: blocks.clone(),
        workload: DestWorkload {
            start_cmd: a.start_cmd.clone(),
            start_pid: a.start_pid,
            qemu: qemu.clone(),
        },
        state: StateSink {
            path: a.state_out.clone(),
            data: Vec::new(),
        },
        threads: a.common.threads,
    };
    let mut report = match a.transport.verbs() {
        Some(o) => {
            let (link, rx) = rdmig::transport::verbs::DestVerbs::accept(
                listener,
                blocks,
                &o,
                run.cfg.credit_window,
            )
            .map_err(|e| format!("rdma: {e}"))?;
            driver::run_destination(link, rx, run)
        }
        None => {
            let (link, rx) = DestTcp::accept(listener, blocks, rand_u32())
                .map_err(|e| format!("accepting: {e}"))?;
            driver::run_destination(link, rx, run)
        }
    };
    if report.status == "completed" {
        for r in &a.ram {
            let _ = std::fs::remove_file(incomplete_marker(&r.path));
        }
        if qemu.is_some() {
            report.guest = Some("running".into());
        }
    } else {
        if let Some(p) = &a.state_out {
            let _ = std::fs::remove_file(p);
        }
        if let Some(q) = &qemu {
            q.discard();
            report.guest = Some("not started".into());
        }
    }
    Ok(finish(&report, a.common.json))
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS random source");
    u32::from_le_bytes(b)
}

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn update(&mut self, round: u32, sent: u64, remaining: u64, rate_mb_s: f64, downtime_ms: u64) {
        self.0.set_message(format!(
            "round {round}: sent {} MiB, remaining {} MiB, {rate_mb_s:.0} MB/s, expected downtime {downtime_ms} ms",
            sent >> 20,
            remaining >> 20
        ));
        self.0.tick();
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

fn send(a: SendArgs) -> Result<ExitCode, String> {
    let log2 = page_log2(a.common.page_size)?;
    if !a.chunk_size.is_power_of_two() || !(4096..=1 << 30).contains(&a.chunk_size) {
        return Err("--chunk-size must be a power of two from 4 KiB to 1 GiB".into());
    }
    let addr = resolve(&a.connect)?;
    let key = cli::resolve_key(a.common.psk_file.as_deref(), a.common.insecure, addr)?;
    let mut blocks = Vec::new();
    for r in &a.ram {
        blocks.push(Arc::new(
            RamBlock::open(&r.name, &r.path, log2).map_err(|e| e.to_string())?,
        ));
    }
    let blocks = Arc::new(blocks);
    let qemu = match &a.qemu_qmp {
        Some(sock) => {
            let files: Vec<_> = blocks
                .iter()
                .zip(&a.ram)
                .map(|(b, r)| rdmig::vmm::qemu::RamFile {
                    path: r.path.clone(),
                    size: b.len(),
                })
                .collect();
            let q = rdmig::vmm::qemu::QemuSource::attach(sock, &files)
                .map_err(|e| format!("source QEMU: {e}"))?;
            tracing::info!("source QEMU {} (pid {:?}) ready", q.version(), q.pid());
            Some(Arc::new(q))
        }
        None => None,
    };
    let mut restore = RestoreCaps(qemu.clone());
    let writer_pid = a.pid.or_else(|| qemu.as_ref().and_then(|q| q.pid()));
    let dirty_log = a.dirty_log.clone().unwrap_or_else(|| {
        if writer_pid.is_some() {
            "auto".into()
        } else {
            "none".into()
        }
    });
    let mut tracker = open_dirty_log(&dirty_log, writer_pid, &blocks, a.common.threads)?;
    let workload = match (a.pid, &a.pause_cmd, &qemu) {
        (Some(_), Some(_), _) => return Err("--pid and --pause-cmd exclude each other".into()),
        (_, _, Some(q)) => SourceWorkload::Qemu(q.clone()),
        (Some(pid), None, None) => SourceWorkload::Pid(pid),
        (None, Some(p), None) => SourceWorkload::Hooks {
            pause: p.clone(),
            resume: a.resume_cmd.clone(),
        },
        (None, None, None) => SourceWorkload::None,
    };
    let mut session = [0u8; 8];
    getrandom::fill(&mut session).expect("OS random source");
    let mut cfg = SourceConfig::with_defaults(
        u64::from_le_bytes(session),
        blocks.iter().map(|b| b.desc()).collect(),
        key,
    );
    cfg.params.chunk_log2 = a.chunk_size.trailing_zeros() as u8;
    cfg.params.channels = a.channels.clamp(1, wire::MAX_CHANNELS);
    cfg.params.mode = if a.pin_all {
        RegMode::PinAll
    } else {
        RegMode::Dynamic
    };
    cfg.params.digest = if a.verify {
        DigestAlg::Xxh3_64
    } else {
        DigestAlg::None
    };
    if a.no_zero_elision {
        cfg.params.flags &= !wire::flag::ZERO_ELISION;
    }
    cfg.downtime_limit_ms = a.downtime_limit;
    cfg.max_rounds = a.max_rounds.max(1);
    cfg.max_time_ms = a.max_time.map(|s| s * 1000);
    cfg.on_limit = match a.on_limit.as_str() {
        "switchover" => LimitPolicy::Switchover,
        "abort" => LimitPolicy::Abort,
        other => {
            return Err(format!(
                "--on-limit {other:?}: expected switchover or abort"
            ))
        }
    };
    cfg.idle_timeout_ms = a.common.idle_timeout * 1000;
    cfg.keepalive_ms = (cfg.idle_timeout_ms / 4).max(100);
    rdmig_model::Source::new(cfg.clone(), [0; 32]).map_err(|e| e.to_string())?;
    let progress: Option<Box<dyn Progress>> = if std::io::stderr().is_terminal() && !a.common.json {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(200));
        Some(Box::new(Bar(pb)))
    } else {
        None
    };
    let run = SourceRun {
        cfg,
        blocks,
        scan: Box::new(move |all| tracker.scan(all).map_err(|e| e.to_string())),
        workload,
        state_in: a.state_in.clone(),
        threads: a.common.threads,
        progress,
    };
    let mut report = match a.transport.verbs() {
        Some(o) => {
            if a.max_bandwidth.is_some() {
                return Err("--max-bandwidth is not supported with --transport rdma".into());
            }
            let (link, rx) = rdmig::transport::verbs::SourceVerbs::connect(
                addr,
                run.blocks.clone(),
                &o,
                run.cfg.credit_window,
                Duration::from_secs(10),
            )
            .map_err(|e| format!("rdma: {e}"))?;
            driver::run_source(link, rx, run)
        }
        None => {
            let (link, rx) = SourceTcp::connect(
                addr,
                run.blocks.clone(),
                a.max_bandwidth.unwrap_or(0),
                Duration::from_secs(10),
            )
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
            driver::run_source(link, rx, run)
        }
    };
    if report.status == "completed" {
        restore.0 = None;
    }
    if let Some(q) = &qemu {
        report.guest = Some(match report.status {
            "completed" if a.qemu_quit => match q.quit() {
                Ok(()) => "quit".into(),
                Err(e) => format!("stopped (quit failed: {e})"),
            },
            "completed" => "stopped".into(),
            "in-doubt" => "stopped (in doubt: check the destination before continuing it)".into(),
            _ => "resumed".into(),
        });
    }
    Ok(finish(&report, a.common.json))
}

/// Unless the migration completed, puts the source QEMU's migration capabilities back as they
/// were (whatever path `send` leaves by).
struct RestoreCaps(Option<Arc<rdmig::vmm::qemu::QemuSource>>);

impl Drop for RestoreCaps {
    fn drop(&mut self) {
        if let Some(q) = &self.0 {
            q.restore();
        }
    }
}

/// Opens the dirty log `spec` names; `auto` picks soft-dirty on the writer's process where
/// the kernel supports it, else scanning.
fn open_dirty_log(
    spec: &str,
    writer_pid: Option<i32>,
    blocks: &Arc<Vec<Arc<RamBlock>>>,
    threads: usize,
) -> Result<Box<dyn rdmig::memory::dirty::DirtyTracker>, String> {
    use rdmig::memory::dirty::{open_tracker, DirtyError, DirtyLogSpec};
    let parsed: DirtyLogSpec = match spec {
        "auto" => match writer_pid {
            Some(pid) => DirtyLogSpec::SoftDirty(pid as u32),
            None => return Err("--dirty-log auto needs --pid or --qemu-qmp".into()),
        },
        s => s.parse().map_err(|e| format!("--dirty-log: {e}"))?,
    };
    let t = match open_tracker(&parsed, blocks.to_vec(), threads) {
        Err(DirtyError::SoftDirtyUnsupported) if spec == "auto" => {
            tracing::info!("soft-dirty unsupported by this kernel: scanning for changes");
            open_tracker(&DirtyLogSpec::Scan, blocks.to_vec(), threads)
        }
        t => t,
    }
    .map_err(|e| format!("--dirty-log: {e}"))?;
    tracing::info!("dirty tracking: {}", t.describe());
    Ok(t)
}

fn workload(a: WorkloadArgs) -> Result<ExitCode, String> {
    let opts = rdmig::tools::workload::WorkloadOptions {
        ram: a.ram,
        size: a.size,
        page_log2: page_log2(a.page_size)?,
        dirty_rate_mb_s: a.dirty_rate,
        pattern: a.pattern.parse().map_err(|e| format!("--pattern: {e}"))?,
        zero_fraction: a.zero_fraction,
        bitmap: a.bitmap,
        seed: a.seed,
        duration: a.duration.map(Duration::from_secs_f64),
        ready_file: a.ready_file,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stats = rdmig::tools::workload::run(&opts, &stop).map_err(|e| e.to_string())?;
    eprintln!("workload: {stats:?}");
    Ok(ExitCode::SUCCESS)
}

fn devices() -> Result<ExitCode, String> {
    let devs = rdmig::transport::verbs::list_devices().map_err(|e| e.to_string())?;
    if devs.is_empty() {
        return Err("no RDMA device found".into());
    }
    print!("{}", rdmig::transport::verbs::describe_devices(&devs));
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RDMIG_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Recv(a) => recv(a),
        Cmd::Send(a) => send(a),
        Cmd::Workload(a) => workload(a),
        Cmd::Digest { files } => files
            .iter()
            .try_for_each(|f| {
                let d = rdmig::tools::workload::file_digest(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?;
                println!("{d:016x}  {}", f.display());
                Ok::<(), String>(())
            })
            .map(|_| ExitCode::SUCCESS),
        Cmd::Demo(a) => rdmig::tools::demo::demo(a.size, a.dirty_rate, a.channels, a.dir),
        Cmd::Bench(a) => match a.sink_port {
            Some(p) => rdmig::tools::bench::raw_sink(p),
            None => rdmig::tools::bench::bench(a.size, a.dir),
        },
        Cmd::Devices => devices(),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rdmig: {e}");
            ExitCode::from(1)
        }
    }
}
