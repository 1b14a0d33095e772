//! `rdmig save` and `rdmig restore`: a migration into a save file and one out of it, both
//! machines in this process over the file binding (spec: section 13).

use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use rdmig::driver::{self, DestRun, KnownDigests, SourceRun};
use rdmig::memory::ram::RamBlock;
use rdmig::report::{FileReport, Report, Status};
use rdmig::savefile::{SaveTarget, SavedImage};
use rdmig::transport::file::{self, FileSide};
use rdmig::transport::{self, SrcEvent};
use rdmig::vmm::control::{DestWorkload, SourceWorkload, StateConsumer};
use rdmig_model::wire::{self, DigestAlg};
use rdmig_model::{DestConfig, DirtyScan, ListenerConfig, PageBitmap, SourceConfig};

use super::args::{RestoreArgs, SaveArgs};
use super::{finish, page_log2};

type Blocks = Arc<Vec<Arc<RamBlock>>>;

/// A fresh key both machines share: the file binding authenticates like any other.
fn session_key() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    getrandom::fill(&mut k).expect("OS random source");
    k
}

fn idle_ms(secs: u64) -> (u64, u64) {
    let idle = secs.max(1).saturating_mul(1000);
    (idle, (idle / 4).max(100).min(idle / 2))
}

/// The source's configuration: every chunk verified, so the file carries the digests of
/// memory both machines agreed on.
fn source_config(
    blocks: &[Arc<RamBlock>],
    key: Vec<u8>,
    channels: u8,
    chunk_log2: u8,
    digest: DigestAlg,
    idle_timeout: u64,
) -> Result<SourceConfig, String> {
    let mut session = [0u8; 8];
    getrandom::fill(&mut session).expect("OS random source");
    let mut cfg = SourceConfig::with_defaults(
        u64::from_le_bytes(session),
        blocks.iter().map(|b| b.desc()).collect(),
        Some(key),
    );
    cfg.params.chunk_log2 = chunk_log2;
    cfg.params.channels = channels.clamp(1, wire::MAX_CHANNELS);
    cfg.params.digest = digest;
    (cfg.idle_timeout_ms, cfg.keepalive_ms) = idle_ms(idle_timeout);
    rdmig_model::Source::new(cfg.clone(), [0; 32])
        .map_err(|e| format!("{e} (check --chunk-size, --channels)"))?;
    Ok(cfg)
}

fn dest_config(blocks: &[Arc<RamBlock>], key: Vec<u8>, idle_timeout: u64) -> ListenerConfig {
    let total: u64 = blocks.iter().map(|b| b.len()).sum();
    let mut cfg =
        DestConfig::with_defaults(blocks.iter().map(|b| b.desc()).collect(), Some(key), total);
    cfg.max_channels = wire::MAX_CHANNELS;
    (cfg.idle_timeout_ms, cfg.keepalive_ms) = idle_ms(idle_timeout);
    ListenerConfig::new(cfg)
}

/// Runs both machines to their outcomes over the file binding: the destination on a thread
/// of its own, the source here. Returns (source, destination) reports.
fn run_pair(
    src: SourceRun,
    dst: DestRun,
    side: FileSide,
    direct_io: bool,
    (stx, srx): (mpsc::Sender<SrcEvent>, mpsc::Receiver<SrcEvent>),
) -> (Report, Report) {
    let (dtx, drx) = mpsc::channel();
    let (fsrc, fdst) = file::pair(
        src.blocks.clone(),
        dst.blocks.clone(),
        side,
        direct_io,
        stx,
        dtx,
    );
    let d = std::thread::spawn(move || driver::run_destination(fdst, drx, dst));
    let s = driver::run_source(fsrc, srx, src);
    let d = d.join().unwrap_or_else(|_| Report {
        role: "destination",
        status: Status::Aborted,
        reason: Some("LocalError".into()),
        detail: Some("the destination's driver panicked".into()),
        ..Default::default()
    });
    (s, d)
}

fn file_report(path: &std::path::Path, direct_io: bool) -> Option<FileReport> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileReport {
        path: path.display().to_string(),
        logical_bytes: m.len(),
        allocated_bytes: m.blocks() * 512,
        direct_io,
    })
}

pub fn save(a: SaveArgs) -> Result<ExitCode, String> {
    let log2 = page_log2(a.common.page_size)?;
    if !a.chunk_size.is_power_of_two() || !(4096..=1 << 30).contains(&a.chunk_size) {
        return Err("--chunk-size must be a power of two from 4 KiB to 1 GiB".into());
    }
    let chunk_log2 = a.chunk_size.trailing_zeros() as u8;
    if chunk_log2 < log2 {
        return Err("--chunk-size must be at least the page size".into());
    }
    let digest = match a.digest.as_str() {
        "bytes" => DigestAlg::Xxh3_64,
        _ => DigestAlg::Xxh3PageTree,
    };
    let mut blocks = Vec::new();
    for r in &a.ram {
        if r.size.is_some() {
            return Err(format!("--ram {}: save takes NAME=PATH", r.name));
        }
        blocks.push(Arc::new(
            // Pre-faulted: mapping the pages in one call costs less than a fault per page
            // in the first pass (measured: about 110 ms against 200-500 ms per GiB).
            RamBlock::open(&r.name, &r.path, log2).map_err(|e| e.to_string())?,
        ));
    }
    let blocks: Blocks = Arc::new(blocks);
    let key = session_key();
    let mut cfg = source_config(
        &blocks,
        key.clone(),
        a.channels,
        chunk_log2,
        digest,
        a.common.idle_timeout,
    )?;
    cfg.downtime_limit_ms = a.downtime_limit;
    cfg.max_rounds = if a.live { a.max_rounds.max(1) } else { 1 };
    // spec: SAVE-1: paused before the machine starts, the workload is the machine's to resume
    // on any abort.
    cfg.paused_at_start = !a.live;
    // A save file keeps the device state whole (at most 64 MiB): no private RAM in it.
    let qemu = super::send::attach_qemu(a.qemu_qmp.as_deref(), &a.ram, &blocks, 0)?;
    let (workload, resume) = super::send::source_workload(
        a.pid,
        a.pause_cmd.as_deref(),
        a.resume_cmd.as_deref(),
        a.qemu_qmp.as_deref(),
        &qemu,
    )?;
    let writer_pid = a.pid.or_else(|| qemu.as_ref().and_then(|q| q.pid()));
    // Paused first unless live: nothing writes the memory while it is copied.
    let dirty_log = match (&a.dirty_log, a.live) {
        (Some(d), true) => d.clone(),
        (None, true) if writer_pid.is_some() => "auto".into(),
        _ => "none".into(),
    };
    let target = Arc::new(
        SaveTarget::create(
            &a.to,
            &blocks
                .iter()
                .map(|b| (b.name().to_string(), b.len()))
                .collect::<Vec<_>>(),
            log2,
            chunk_log2,
            digest,
            a.direct_io,
        )
        .map_err(|e| e.to_string())?,
    );
    // Everything that can fail before the workload is paused, the partial file removed if it
    // does.
    let setup = (|| {
        let dst_blocks: Blocks = Arc::new(target.blocks().map_err(|e| e.to_string())?);
        let tracker = super::open_dirty_log(&dirty_log, writer_pid, &blocks, a.common.threads)?;
        let guard = resume.map(|r| super::send::spawn_guard(&r)).transpose()?;
        let (stx, srx) = mpsc::channel();
        transport::watch_signals(stx.clone(), SrcEvent::Signal)
            .map_err(|e| format!("watching signals: {e}"))?;
        Ok::<_, String>((dst_blocks, tracker, guard, (stx, srx)))
    })();
    let (dst_blocks, tracker, mut guard, (stx, srx)) = setup.inspect_err(|_| target.discard())?;
    let (scan, page_hashes, sent_pages) = super::dirty_log_fns(tracker);
    let t0 = Instant::now();
    let mut workload = workload;
    if !a.live {
        // Paused before the first pass: memory crosses once and nothing writes it meanwhile.
        let paused = match (&workload, &qemu) {
            (_, Some(q)) => q.stop().map(|_| None).map_err(|e| e.to_string()),
            (SourceWorkload::Pid(_), _) => {
                workload.pause().map(|_| None).map_err(|e| e.to_string())
            }
            // The pause hook runs once, here; its output is the device state.
            (SourceWorkload::Hooks { .. }, _) => workload
                .pause()
                .map(|s| Some(Arc::new(s)))
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        };
        let paused = paused.map(|state| {
            workload = SourceWorkload::PausedBefore {
                state,
                then: Box::new(workload.clone()),
            }
        });
        if let Err(e) = paused {
            target.discard();
            let _ = workload.resume();
            return Err(format!("pausing the workload: {e}"));
        }
        // Should this process die before the machine pauses the workload itself, the guard
        // resumes it (spec: LIVE-6).
        if let Some(g) = guard.as_mut() {
            if let Err(e) = g.arm() {
                tracing::warn!("arming the guard: {e}");
            }
        }
    }
    let src = SourceRun {
        cfg,
        blocks: blocks.clone(),
        scan,
        page_hashes,
        workload: workload.clone(),
        guard,
        state_in: a.state_in.clone(),
        threads: a.common.threads,
        progress: super::send::progress_bar(a.common.json),
        background: Some(stx.clone()),
        // Paused before the first pass, the memory is final now: its digests are computed
        // beside the transfer instead of after it.
        known_digests: (!a.live)
            .then(|| KnownDigests::computing(blocks.clone(), digest, chunk_log2, a.common.threads)),
        sent_pages,
        state_buffer: None,
    };
    let dst = DestRun {
        cfg: dest_config(&dst_blocks, key, a.common.idle_timeout),
        blocks: dst_blocks,
        workload: DestWorkload {
            save: Some(target.clone()),
            ..Default::default()
        },
        state: StateConsumer::memory(),
        state_area: None,
        threads: a.common.threads,
    };
    let (fd, base, direct) = target.data();
    let side = FileSide::Destination { file: fd, base };
    let (mut report, dreport) = run_pair(src, dst, side, direct, (stx, srx));
    report.role = "save";
    report.total_time_ms = t0.elapsed().as_millis() as u64;
    if !a.live {
        // Paused from before the first pass to the end.
        report.downtime_ms = Some(report.total_time_ms);
    }
    if report.status != Status::Completed || dreport.status != Status::Completed {
        // A file that could not be made valid at commit aborts the destination, whose ABORT
        // resumes the source's workload (spec: SW-7, SAVE-3); either way no file is left.
        target.discard();
    } else {
        report.file = file_report(&a.to, a.direct_io);
    }
    if let Some(q) = &qemu {
        // The guest may be continued later and migrated by QEMU itself: its capabilities go
        // back as they were, whatever the outcome.
        q.restore();
        report.guest = Some(super::send::guest_after(q, report.status, a.qemu_quit));
    }
    Ok(finish(&report, a.common.json))
}

/// The restore's dirty log: the file's pages, once: present pages are data, holes are zero
/// ranges (spec: SAVE-4); nothing changes afterwards.
fn saved_pages(present: Vec<PageBitmap>) -> driver::ScanFn {
    let lens: Vec<u64> = present.iter().map(|p| p.len()).collect();
    let mut first = Some(present);
    Box::new(move |_all| {
        Ok(match first.take() {
            Some(present) => {
                let dirty: Vec<PageBitmap> =
                    present.iter().map(|p| PageBitmap::full(p.len())).collect();
                let zero = present
                    .iter()
                    .map(|p| {
                        let mut z = PageBitmap::full(p.len());
                        z.subtract(p);
                        z
                    })
                    .collect();
                DirtyScan { dirty, zero }
            }
            None => DirtyScan {
                dirty: lens.iter().map(|&n| PageBitmap::new(n)).collect(),
                zero: lens.iter().map(|&n| PageBitmap::new(n)).collect(),
            },
        })
    })
}

pub fn restore(a: RestoreArgs) -> Result<ExitCode, String> {
    let t0 = Instant::now();
    // The targets are about to be overwritten: incomplete until the restore commits, whatever
    // is wrong with the file (spec: SAVE-3).
    for r in &a.ram {
        std::fs::write(
            super::recv::incomplete_marker(&r.path),
            b"rdmig: restore not committed\n",
        )
        .map_err(|e| format!("marking {}: {e}", r.path.display()))?;
    }
    let img = SavedImage::open(&a.from, a.direct_io).map_err(|e| e.to_string())?;
    let h = img.header.clone();
    let want: Vec<(String, u64)> = a
        .ram
        .iter()
        .map(|r| {
            r.size
                .map(|s| (r.name.clone(), s))
                .ok_or_else(|| format!("--ram {}: restore needs NAME=PATH:SIZE", r.name))
        })
        .collect::<Result<_, _>>()?;
    img.match_blocks(&want).map_err(|e| e.to_string())?;
    let src_blocks: Blocks = Arc::new(img.blocks().map_err(|e| e.to_string())?);
    // Not pre-faulted: every page is written once, in large pieces, by the channels in
    // parallel, and the file's holes stay holes where the save had them.
    let dst_blocks = super::recv::create_blocks_with(&a.ram, h.page_log2, RamBlock::create_sparse)?;
    let qemu = super::recv::attach_qemu(
        a.qemu_qmp.as_deref(),
        &a.ram,
        a.qemu_start.as_deref(),
        a.qemu_log.as_deref(),
    )?;
    let key = session_key();
    let cfg = source_config(
        &src_blocks,
        key.clone(),
        a.channels,
        h.chunk_log2,
        h.digest,
        30,
    )?;
    let (stx, srx) = mpsc::channel();
    transport::watch_signals(stx.clone(), SrcEvent::Signal)
        .map_err(|e| format!("watching signals: {e}"))?;
    let src = SourceRun {
        cfg,
        blocks: src_blocks,
        scan: saved_pages(img.present()),
        page_hashes: Box::new(|| None),
        workload: SourceWorkload::Saved(Arc::new(img.trailer.state.clone())),
        guard: None,
        state_in: None,
        threads: a.threads,
        progress: None,
        background: Some(stx.clone()),
        // spec: SAVE-4: the file's digests are the source's: what lands is checked against
        // what was saved, before anything starts.
        known_digests: Some(KnownDigests::ready(
            h.digest,
            h.chunk_log2,
            img.trailer.digests.clone(),
        )),
        sent_pages: None,
        state_buffer: None,
    };
    let dst = DestRun {
        cfg: dest_config(&dst_blocks, key, 30),
        blocks: dst_blocks,
        workload: DestWorkload {
            start_cmd: a.start_cmd.clone(),
            start_pid: a.start_pid,
            qemu: qemu.clone(),
            save: None,
        },
        state: super::recv::consumer(&qemu, a.state_out.as_deref()),
        state_area: None,
        threads: a.threads,
    };
    let (fd, base, direct) = img.data();
    let side = FileSide::Source { file: fd, base };
    let (sreport, mut report) = run_pair(src, dst, side, direct, (stx, srx));
    report.role = "restore";
    report.total_time_ms = t0.elapsed().as_millis() as u64;
    report.rounds = sreport.rounds.clone();
    report.bytes = sreport.bytes.clone();
    report.throughput_mb_s = sreport.throughput_mb_s;
    report.file = Some(FileReport {
        path: a.from.display().to_string(),
        logical_bytes: std::fs::metadata(&a.from).map_or(0, |m| m.len()),
        allocated_bytes: img.allocated_bytes(),
        direct_io: a.direct_io,
    });
    if report.status != Status::Completed {
        if report.reason.is_none() {
            report.reason = sreport.reason.clone();
            report.detail = sreport.detail.clone();
        }
        if report.reason.as_deref() == Some("DigestMismatch") {
            report.detail = Some(format!(
                "{}: the memory read from the file does not match the digests saved with it: \
                 the file is corrupted",
                a.from.display()
            ));
        }
    }
    super::recv::settle(&mut report, &a.ram, a.state_out.as_deref(), &qemu);
    Ok(finish(&report, a.json))
}
