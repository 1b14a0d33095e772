//! `rdmig send`: connect, pre-copy live, switch over, commit.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rdmig::driver::{self, Progress, SourceRun};
use rdmig::memory::ram::RamBlock;
use rdmig::report::Status;
use rdmig::transport::tcp::SourceTcp;
use rdmig::transport::{self, Deadlines, SrcEvent};
use rdmig::vmm::control::SourceWorkload;
use rdmig::vmm::guard::{Guard, Resume};
use rdmig::vmm::qemu::{QemuSource, RamFile};
use rdmig_model::wire::{self, DigestAlg, RegMode};
use rdmig_model::{LimitPolicy, SourceConfig};

use super::args::SendArgs;
use super::{finish, page_log2, resolve};

type Blocks = Arc<Vec<Arc<RamBlock>>>;

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

/// Unless the migration completed, puts the source QEMU's migration capabilities back as they
/// were (whatever path `send` leaves by).
struct RestoreCaps(Option<Arc<QemuSource>>);

impl Drop for RestoreCaps {
    fn drop(&mut self) {
        if let Some(q) = &self.0 {
            q.restore();
        }
    }
}

fn open_blocks(a: &SendArgs, log2: u8) -> Result<Blocks, String> {
    let mut blocks = Vec::new();
    for r in &a.ram {
        blocks.push(Arc::new(
            RamBlock::open(&r.name, &r.path, log2).map_err(|e| e.to_string())?,
        ));
    }
    Ok(Arc::new(blocks))
}

/// The source QEMU at `sock`, whose guest RAM must be exactly the `--ram` files `ram`, mapped
/// as `blocks`.
pub(super) fn attach_qemu(
    sock: Option<&std::path::Path>,
    ram: &[rdmig::cli::RamSpec],
    blocks: &Blocks,
    max_private: u64,
) -> Result<Option<Arc<QemuSource>>, String> {
    let Some(sock) = sock else {
        return Ok(None);
    };
    let files: Vec<_> = blocks
        .iter()
        .zip(ram)
        .map(|(b, r)| RamFile {
            path: r.path.clone(),
            size: b.len(),
        })
        .collect();
    let q =
        QemuSource::attach(sock, &files, max_private).map_err(|e| format!("source QEMU: {e}"))?;
    tracing::info!(
        "source QEMU {} (pid {:?}) ready, {} bytes of private RAM",
        q.version(),
        q.pid(),
        q.private_ram()
    );
    Ok(Some(Arc::new(q)))
}

/// How the workload is paused and resumed, and the guard that resumes it should this process
/// die while it is paused.
fn workload(
    a: &SendArgs,
    qemu: &Option<Arc<QemuSource>>,
) -> Result<(SourceWorkload, Option<Resume>), String> {
    source_workload(
        a.pid,
        a.pause_cmd.as_deref(),
        a.resume_cmd.as_deref(),
        a.qemu_qmp.as_deref(),
        qemu,
    )
}

/// The source workload from `--pid`, `--pause-cmd`/`--resume-cmd` or the QEMU attached
/// through `--qemu-qmp` (`sock`), and the guard's way to resume it.
pub(super) fn source_workload(
    pid: Option<i32>,
    pause_cmd: Option<&str>,
    resume_cmd: Option<&str>,
    sock: Option<&std::path::Path>,
    qemu: &Option<Arc<QemuSource>>,
) -> Result<(SourceWorkload, Option<Resume>), String> {
    Ok(match (pid, pause_cmd, qemu) {
        (Some(_), Some(_), _) => return Err("--pid and --pause-cmd exclude each other".into()),
        (_, _, Some(q)) => {
            let caps = q.capabilities_before().to_string();
            let qmp = sock
                .expect("QEMU attached through --qemu-qmp")
                .to_path_buf();
            (
                SourceWorkload::Qemu(q.clone()),
                Some(Resume::Qemu { qmp, caps }),
            )
        }
        (Some(pid), None, None) => (SourceWorkload::Pid(pid), Some(Resume::Pid(pid))),
        (None, Some(p), None) => (
            SourceWorkload::Hooks {
                pause: p.to_string(),
                resume: resume_cmd.map(str::to_string),
            },
            resume_cmd.map(|c| Resume::Command(c.to_string())),
        ),
        (None, None, None) => (SourceWorkload::None, None),
    })
}

fn config(a: &SendArgs, blocks: &Blocks, key: Option<Vec<u8>>) -> Result<SourceConfig, String> {
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
    cfg.params.digest = match (a.verify, a.digest.as_str()) {
        (false, _) => DigestAlg::None,
        (true, "bytes") => DigestAlg::Xxh3_64,
        (true, _) => DigestAlg::Xxh3PageTree,
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
    cfg.idle_timeout_ms = a.common.idle_timeout.saturating_mul(1000);
    cfg.keepalive_ms = (cfg.idle_timeout_ms / 4)
        .max(100)
        .min(cfg.idle_timeout_ms / 2);
    rdmig_model::Source::new(cfg.clone(), [0; 32])
        .map_err(|e| format!("{e} (check --idle-timeout, --chunk-size, --channels)"))?;
    Ok(cfg)
}

/// Bytes of device state beyond a QEMU guest's private RAM that its stream may carry (device
/// sections, page headers).
const STATE_SLACK: u64 = 64 << 20;

/// The largest device state to propose for the data channels (spec: STATE-1): as given, or
/// what this workload's state can reach when it may exceed the control channel's 64 MiB.
fn state_max(a: &SendArgs, qemu: &Option<Arc<QemuSource>>) -> Result<u64, String> {
    let page = 1u64 << wire::STATE_PAGE_LOG2;
    let want = match (a.max_state_size, qemu, &a.state_in) {
        (Some(n), _, _) => n,
        (None, Some(q), _) if q.private_ram() > 0 => {
            // QEMU sends each page with a header of its own: 1/512 more, rounded up.
            q.private_ram() + q.private_ram() / 256 + STATE_SLACK
        }
        (None, None, Some(p)) => {
            let len = std::fs::metadata(p)
                .map_err(|e| format!("--state-in {}: {e}", p.display()))?
                .len();
            if len > wire::MAX_DEVICE_STATE as u64 {
                len
            } else {
                0
            }
        }
        _ => 0,
    };
    let n = want.div_ceil(page) * page;
    if n > wire::MAX_STATE_AREA {
        return Err(format!(
            "--max-state-size {n}: at most {} bytes",
            wire::MAX_STATE_AREA
        ));
    }
    Ok(n)
}

/// The transport's blocks: the RAM blocks, then the device state's buffer if there is one
/// (spec: STATE-2).
pub(super) fn with_state_block(blocks: &Blocks, state: Option<&Arc<RamBlock>>) -> Blocks {
    let mut v: Vec<Arc<RamBlock>> = blocks.iter().cloned().collect();
    v.extend(state.cloned());
    Arc::new(v)
}

pub fn send(a: SendArgs) -> Result<ExitCode, String> {
    let log2 = page_log2(a.common.page_size)?;
    if !a.chunk_size.is_power_of_two() || !(4096..=1 << 30).contains(&a.chunk_size) {
        return Err("--chunk-size must be a power of two from 4 KiB to 1 GiB".into());
    }
    if a.common.idle_timeout == 0 {
        return Err("--idle-timeout must be at least 1 second".into());
    }
    let addr = resolve(&a.connect)?;
    let tls = a.transport.client_tls(&a.connect)?;
    // Inside mutual TLS the certificates authenticate both ends: a key is optional.
    let key = rdmig::cli::resolve_key(
        a.common.psk_file.as_deref(),
        a.common.insecure || (tls.is_some() && a.common.psk_file.is_none()),
        addr,
    )?;
    let blocks = open_blocks(&a, log2)?;
    let mut cfg = config(&a, &blocks, key)?;
    let qemu = attach_qemu(a.qemu_qmp.as_deref(), &a.ram, &blocks, a.max_private_ram)?;
    let mut restore = RestoreCaps(qemu.clone());
    let writer_pid = a.pid.or_else(|| qemu.as_ref().and_then(|q| q.pid()));
    let dirty_log = a.dirty_log.clone().unwrap_or_else(|| {
        if writer_pid.is_some() {
            "auto".into()
        } else {
            "none".into()
        }
    });
    let (scan, page_hashes, sent_pages) = super::dirty_log_fns(super::open_dirty_log(
        &dirty_log,
        writer_pid,
        &blocks,
        a.common.threads,
    )?);
    if sent_pages.is_some() && a.transport.verbs().is_some() {
        // spec: SCAN-2, before anything is started or paused.
        return Err(
            "the scan dirty log (--dirty-log scan, or auto on a kernel without \
             soft-dirty) finds changed pages by comparing memory with the bytes each page was \
             sent with, and an RDMA NIC reads memory at a time no one learns: with --transport \
             rdma use --dirty-log soft-dirty:PID (a kernel with CONFIG_MEM_SOFT_DIRTY), \
             bitmap:PATH, or none for a paused workload; or use --transport tcp"
                .into(),
        );
    }
    cfg.state_max = state_max(&a, &qemu)?;
    let state_buffer = match cfg.state_max {
        0 => None,
        n => Some(Arc::new(
            RamBlock::staging("device-state", n)
                .map_err(|e| format!("the device state's buffer: {e}"))?,
        )),
    };
    if let Some(b) = &state_buffer {
        // Faulted in while the rounds run, so the state streams into it without page faults
        // inside the downtime.
        let b = b.clone();
        std::thread::spawn(move || {
            if let Err(e) = b.populate(b.len()) {
                tracing::info!("pre-faulting the device state's buffer: {e}");
            }
        });
    }
    let (workload, resume) = workload(&a, &qemu)?;
    let guard = resume.map(|r| spawn_guard(&r)).transpose()?;
    let progress = progress_bar(a.common.json);
    let deadlines = Deadlines::new(Duration::from_secs(a.common.idle_timeout));
    let (tx, rx) = mpsc::channel();
    transport::watch_signals(tx.clone(), SrcEvent::Signal)
        .map_err(|e| format!("watching signals: {e}"))?;
    let run = SourceRun {
        cfg,
        blocks,
        scan,
        page_hashes,
        workload,
        guard,
        state_in: a.state_in.clone(),
        threads: a.common.threads,
        progress,
        background: Some(tx.clone()),
        known_digests: None,
        sent_pages,
        state_buffer,
    };
    let mut report = migrate(&a, addr, tls, run, deadlines, (tx, rx))?;
    if report.status == Status::Completed {
        restore.0 = None;
    }
    if let Some(q) = &qemu {
        report.guest = Some(guest_after(q, report.status, a.qemu_quit));
    }
    Ok(finish(&report, a.common.json))
}

/// Connects over the chosen transport and runs the source to its outcome.
fn migrate(
    a: &SendArgs,
    addr: std::net::SocketAddr,
    tls: Option<rdmig::transport::tls::ClientTls>,
    mut run: SourceRun,
    deadlines: Deadlines,
    (tx, rx): (mpsc::Sender<SrcEvent>, mpsc::Receiver<SrcEvent>),
) -> Result<rdmig::report::Report, String> {
    let (channels, credit_window) = (run.cfg.params.channels, run.cfg.credit_window);
    let link_blocks = with_state_block(&run.blocks, run.state_buffer.as_ref());
    match a.transport.verbs() {
        Some(o) => {
            if a.max_bandwidth.is_some() {
                return Err("--max-bandwidth is not supported with --transport rdma".into());
            }
            assert!(run.sent_pages.is_none(), "refused in `send` (spec: SCAN-2)");
            let link = rdmig::transport::verbs::SourceVerbs::connect(
                addr,
                link_blocks,
                &o,
                credit_window,
                deadlines,
                tx,
            )
            .map_err(|e| format!("rdma: {e}"))?;
            Ok(driver::run_source(link, rx, run))
        }
        None => {
            let link = SourceTcp::connect(
                addr,
                tls,
                link_blocks,
                a.max_bandwidth.unwrap_or(0),
                channels,
                deadlines,
                tx,
            )
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
            // spec: AUTH-1: inside TLS, the key's proofs cover the TLS session.
            run.cfg.channel_binding = link.channel_binding();
            Ok(driver::run_source(link, rx, run))
        }
    }
}

/// The guard that resumes the workload should this process die while it is paused (spec:
/// LIVE-6).
pub(super) fn spawn_guard(resume: &Resume) -> Result<Guard, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating rdmig: {e}"))?;
    Guard::spawn(&exe, resume).map_err(|e| format!("starting the guard: {e}"))
}

/// A spinner on an interactive terminal, none for scripts and JSON output.
pub(super) fn progress_bar(json: bool) -> Option<Box<dyn Progress>> {
    if !std::io::stderr().is_terminal() || json {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(Duration::from_millis(200));
    Some(Box::new(Bar(pb)))
}

/// What became of the source QEMU guest.
pub(super) fn guest_after(q: &QemuSource, status: Status, quit: bool) -> String {
    match status {
        Status::Completed if quit => match q.quit() {
            Ok(()) => "quit".into(),
            Err(e) => format!("stopped (quit failed: {e})"),
        },
        Status::Completed => "stopped".into(),
        Status::InDoubt => "stopped (in doubt: check the destination before continuing it)".into(),
        Status::Aborted => "resumed".into(),
    }
}
