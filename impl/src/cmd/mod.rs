//! The `rdmig` subcommands, one module each, and what they share.

pub mod args;
pub mod file;
pub mod recv;
pub mod send;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rdmig::memory::ram::RamBlock;
use rdmig::report::Report;

use args::{GuardArgs, WorkloadArgs};

pub fn page_log2(page: u64) -> Result<u8, String> {
    if !page.is_power_of_two() || !(4096..=1 << 30).contains(&page) {
        return Err(format!(
            "page size {page} must be a power of two from 4 KiB to 1 GiB"
        ));
    }
    Ok(page.trailing_zeros() as u8)
}

pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr} resolves to nothing"))
}

pub fn finish(report: &Report, json: bool) -> ExitCode {
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

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS random source");
    u32::from_le_bytes(b)
}

/// Opens the dirty log `spec` names; `auto` picks soft-dirty on the writer's process where
/// the kernel supports it, else scanning.
pub fn open_dirty_log(
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

/// A dirty log as the source driver asks for it: its scans, the page hashes of its last
/// scan, both over the one log, and its table of what was sent when it keeps one.
pub fn dirty_log_fns(
    log: Box<dyn rdmig::memory::dirty::DirtyTracker>,
) -> (
    rdmig::driver::ScanFn,
    rdmig::driver::PageHashesFn,
    Option<Arc<rdmig::memory::sent_pages::SentPages>>,
) {
    let sent = log.sent_pages();
    let scan_log = Arc::new(std::sync::Mutex::new(log));
    let hashes_log = scan_log.clone();
    (
        Box::new(move |all| {
            scan_log
                .lock()
                .expect("not poisoned")
                .scan(all)
                .map_err(|e| e.to_string())
        }),
        Box::new(move || hashes_log.lock().expect("not poisoned").page_hashes()),
        sent,
    )
}

pub fn workload(a: WorkloadArgs) -> Result<ExitCode, String> {
    let opts = rdmig::tools::workload::WorkloadOptions {
        ram: a.ram,
        size: a.size,
        page_log2: page_log2(a.page_size)?,
        dirty_rate_mb_s: a.dirty_rate,
        pattern: a.pattern.parse().map_err(|e| format!("--pattern: {e}"))?,
        zero_fraction: a.zero_fraction,
        undo_fraction: a.undo_fraction,
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

pub fn devices() -> Result<ExitCode, String> {
    let devs = rdmig::transport::verbs::list_devices().map_err(|e| e.to_string())?;
    if devs.is_empty() {
        return Err("no RDMA device found".into());
    }
    print!("{}", rdmig::transport::verbs::describe_devices(&devs));
    Ok(ExitCode::SUCCESS)
}

/// `rdmig guard`: resumes the workload of a `rdmig send` that dies while it is paused.
pub fn guard(a: GuardArgs) -> Result<ExitCode, String> {
    use rdmig::vmm::guard::{run, Resume};
    let resume = match (a.pid, a.resume_cmd, a.qemu_qmp) {
        (Some(p), None, None) => Resume::Pid(p),
        (None, Some(c), None) => Resume::Command(c),
        (None, None, Some(qmp)) => Resume::Qemu {
            qmp,
            caps: a
                .qemu_caps
                .unwrap_or_else(|| "{\"capabilities\": []}".into()),
        },
        _ => return Err("rdmig guard needs exactly one of --pid, --resume-cmd, --qemu-qmp".into()),
    };
    let did = run(&resume, std::io::stdin().lock())?;
    tracing::info!("guard: {did}");
    Ok(ExitCode::SUCCESS)
}
