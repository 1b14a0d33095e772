//! `rdmig recv`: listen, take the memory, start the workload on commit.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rdmig::driver::{self, DestRun};
use rdmig::memory::ram::RamBlock;
use rdmig::report::Status;
use rdmig::transport::tcp::DestTcp;
use rdmig::transport::{self, Deadlines, DstEvent};
use rdmig::vmm::control::{DestWorkload, StateConsumer};
use rdmig::vmm::qemu::{QemuDest, RamFile};
use rdmig_model::{wire, DestConfig, ListenerConfig};

use super::args::RecvArgs;
use super::{finish, page_log2, rand_u32, resolve};

/// Marks a RAM file as not migrated until commit, so a crash never leaves memory that looks
/// migrated.
pub fn incomplete_marker(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".rdmig-incomplete");
    PathBuf::from(s)
}

/// Creates (or resizes) and pre-faults the destination RAM files.
pub(super) fn create_blocks(
    ram: &[rdmig::cli::RamSpec],
    log2: u8,
) -> Result<Arc<Vec<Arc<RamBlock>>>, String> {
    create_blocks_with(ram, log2, RamBlock::create)
}

/// [`create_blocks`] with `create` making each block.
pub(super) fn create_blocks_with(
    ram: &[rdmig::cli::RamSpec],
    log2: u8,
    create: fn(&str, &Path, u64, u8) -> Result<RamBlock, rdmig::memory::ram::MemError>,
) -> Result<Arc<Vec<Arc<RamBlock>>>, String> {
    let mut blocks = Vec::new();
    for r in ram {
        let size = r
            .size
            .ok_or_else(|| format!("--ram {}: the destination needs NAME=PATH:SIZE", r.name))?;
        std::fs::write(
            incomplete_marker(&r.path),
            b"rdmig: migration not committed\n",
        )
        .map_err(|e| format!("marking {}: {e}", r.path.display()))?;
        blocks.push(Arc::new(
            create(&r.name, &r.path, size, log2).map_err(|e| e.to_string())?,
        ));
    }
    Ok(Arc::new(blocks))
}

/// The destination QEMU at `sock` (started by `start`, output to `log`), waiting for a
/// guest whose RAM is `ram`.
pub(super) fn attach_qemu(
    sock: Option<&Path>,
    ram: &[rdmig::cli::RamSpec],
    start: Option<&str>,
    log: Option<&Path>,
) -> Result<Option<Arc<QemuDest>>, String> {
    let Some(sock) = sock else {
        return Ok(None);
    };
    let files: Vec<_> = ram
        .iter()
        .map(|r| RamFile {
            path: r.path.clone(),
            size: r.size.unwrap_or(0),
        })
        .collect();
    let log = log.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut l = sock.as_os_str().to_owned();
        l.push(".log");
        PathBuf::from(l)
    });
    // The destination moves no private RAM itself: QEMU loads it from the stream.
    let q = QemuDest::attach(sock, &files, start, &log, u64::MAX)
        .map_err(|e| format!("destination QEMU: {e}"))?;
    tracing::info!("destination QEMU {} waiting for the guest", q.version());
    Ok(Some(Arc::new(q)))
}

/// Writes `text` to `path` atomically: a reader sees the whole file or none (written beside
/// it, then renamed over it).
pub fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The listener's configuration from the arguments, checked before anything is listened on.
fn config(
    a: &RecvArgs,
    blocks: &[Arc<RamBlock>],
    key: Option<Vec<u8>>,
) -> Result<ListenerConfig, String> {
    let total: u64 = blocks.iter().map(|b| b.len()).sum();
    let capacity = state_capacity(a.max_state_size)?;
    // By default every byte may be registered at once: the RAM and the state area (spec:
    // REG-4; only what the source uses is ever registered).
    let mut cfg = DestConfig::with_defaults(
        blocks.iter().map(|b| b.desc()).collect(),
        key,
        a.pin_budget.unwrap_or(total + capacity),
    );
    cfg.max_channels = a.max_channels.clamp(1, wire::MAX_CHANNELS);
    cfg.state_capacity = capacity;
    cfg.idle_timeout_ms = a.common.idle_timeout.saturating_mul(1000);
    cfg.keepalive_ms = (cfg.idle_timeout_ms / 4)
        .max(100)
        .min(cfg.idle_timeout_ms / 2);
    cfg.validate()
        .map_err(|e| format!("{e} (check --idle-timeout, --max-channels, --pin-budget)"))?;
    Ok(ListenerConfig::new(cfg))
}

/// Default cap of the destination's staging area for device state.
const DEFAULT_STATE_CAPACITY: u64 = 16 << 30;

/// The staging area the destination offers (spec: STATE-1): as given, or 16 GiB or half the
/// memory available now, whichever is smaller; whole 4 KiB pages.
fn state_capacity(given: Option<u64>) -> Result<u64, String> {
    let page = 1u64 << wire::STATE_PAGE_LOG2;
    let n = match given {
        Some(n) if n > wire::MAX_STATE_AREA => {
            return Err(format!(
                "--max-state-size {n}: at most {} bytes",
                wire::MAX_STATE_AREA
            ))
        }
        Some(n) => n.div_ceil(page) * page,
        None => {
            let available = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| {
                    let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
                    l.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .map_or(0, |kib| kib << 10);
            DEFAULT_STATE_CAPACITY.min(available / 2) / page * page
        }
    };
    Ok(n)
}

/// The staging area for a capacity (its memory is taken only as state lands).
pub(super) fn state_area(capacity: u64) -> Result<Option<Arc<RamBlock>>, String> {
    if capacity == 0 {
        return Ok(None);
    }
    RamBlock::staging("device-state", capacity)
        .map(|b| Some(Arc::new(b)))
        .map_err(|e| format!("the device state's staging area: {e}"))
}

/// Where the device state goes: the destination QEMU, the `--state-out` file, or nowhere
/// (digested only: a workload started by a hook or a signal takes none).
pub(super) fn consumer(qemu: &Option<Arc<QemuDest>>, state_out: Option<&Path>) -> StateConsumer {
    match (qemu, state_out) {
        (Some(q), _) => StateConsumer::qemu(q.clone()),
        (None, Some(p)) => StateConsumer::file(p.to_path_buf()),
        (None, None) => StateConsumer::digest_only(),
    }
}

pub fn recv(a: RecvArgs) -> Result<ExitCode, String> {
    let log2 = page_log2(a.common.page_size)?;
    let listen = resolve(&a.listen)?;
    let tls = a.transport.server_tls()?;
    // Inside mutual TLS the certificates authenticate both ends: a key is optional.
    let key = rdmig::cli::resolve_key(
        a.common.psk_file.as_deref(),
        a.common.insecure || (tls.is_some() && a.common.psk_file.is_none()),
        listen,
    )?;
    if a.common.idle_timeout == 0 {
        return Err("--idle-timeout must be at least 1 second".into());
    }
    let blocks = create_blocks(&a.ram, log2)?;
    let cfg = config(&a, &blocks, key)?;
    let qemu = attach_qemu(
        a.qemu_qmp.as_deref(),
        &a.ram,
        a.qemu_start.as_deref(),
        a.qemu_log.as_deref(),
    )?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("listening on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let deadlines = Deadlines::new(Duration::from_secs(a.common.idle_timeout));
    let (tx, rx) = mpsc::channel();
    transport::watch_signals(tx.clone(), DstEvent::Signal)
        .map_err(|e| format!("watching signals: {e}"))?;
    let credit_window = cfg.dest.credit_window;
    let area = state_area(cfg.dest.state_capacity)?;
    let link_blocks = super::send::with_state_block(&blocks, area.as_ref());
    let run = DestRun {
        cfg,
        blocks: blocks.clone(),
        workload: DestWorkload {
            start_cmd: a.start_cmd.clone(),
            start_pid: a.start_pid,
            qemu: qemu.clone(),
            save: None,
        },
        state: consumer(&qemu, a.state_out.as_deref()),
        state_area: area,
        threads: a.common.threads,
    };
    let link_up = |what: &str| {
        if let Some(f) = &a.addr_file {
            write_atomically(f, &local.to_string())?;
        }
        tracing::info!("listening on {local} ({what})");
        Ok::<(), String>(())
    };
    let mut report = match a.transport.verbs() {
        Some(o) => {
            let link = rdmig::transport::verbs::DestVerbs::listen(
                listener,
                link_blocks,
                &o,
                credit_window,
                deadlines,
                tx,
            )
            .map_err(|e| format!("rdma: {e}"))?;
            link_up("rdma")?;
            driver::run_destination(link, rx, run)
        }
        None => {
            let link = DestTcp::listen(listener, tls, link_blocks, rand_u32(), deadlines, tx)
                .map_err(|e| format!("accepting: {e}"))?;
            link_up("tcp")?;
            driver::run_destination(link, rx, run)
        }
    };
    settle(&mut report, &a.ram, a.state_out.as_deref(), &qemu);
    Ok(finish(&report, a.common.json))
}

/// After the destination's outcome: committed, the RAM files lose their incomplete marks;
/// otherwise the state file goes and a waiting QEMU is stopped (nothing started).
pub(super) fn settle(
    report: &mut rdmig::report::Report,
    ram: &[rdmig::cli::RamSpec],
    state_out: Option<&Path>,
    qemu: &Option<Arc<QemuDest>>,
) {
    if report.status == Status::Completed {
        for r in ram {
            let _ = std::fs::remove_file(incomplete_marker(&r.path));
        }
        if qemu.is_some() {
            report.guest = Some("running".into());
        }
    } else {
        if let Some(p) = state_out {
            let _ = std::fs::remove_file(p);
        }
        if let Some(q) = qemu {
            q.discard();
            report.guest = Some("not started".into());
        }
    }
}
