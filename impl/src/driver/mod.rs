//! Driver loops: feed a machine its inputs (frames, completions, scans, timers, hook results)
//! and carry out its commands. Every decision is the machine's; the driver only does I/O and
//! reports.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdmig_model::table::{DstPhase, SrcPhase};
use rdmig_model::wire::{self, Frame, Message};
use rdmig_model::*;

use crate::memory::ram::{chunk_digests, RamBlock};
use crate::report::{Report, RoundReport};
use crate::transport::{DataAuth, DestLink, Event, SourceLink, WriteReq};
use crate::vmm::control::{DestWorkload, SourceWorkload, StateSink};

/// Fetch-and-clear of the dirty log; `true` asks for every page.
pub type ScanFn = Box<dyn FnMut(bool) -> Result<DirtyScan, String> + Send>;

fn to_input(ev: Result<Event, RecvTimeoutError>, timers: Timers, now: Millis) -> Option<Input> {
    Some(match ev {
        Ok(Event::Control(bytes)) => match wire::decode(&bytes) {
            Ok(f) => Input::Frame(f),
            Err(e) => {
                tracing::warn!("malformed control frame: {e}");
                Input::Malformed(e)
            }
        },
        Ok(Event::ControlClosed(why)) => {
            tracing::info!("control connection closed: {why}");
            Input::TransportFailed
        }
        Ok(Event::WriteDone(id)) => Input::WriteDone { wr_id: id },
        Ok(Event::DataFailed(why)) | Ok(Event::DataViolation(why)) => {
            tracing::warn!("data channel: {why}");
            Input::TransportFailed
        }
        Err(RecvTimeoutError::Disconnected) => Input::TransportFailed,
        Err(RecvTimeoutError::Timeout) => {
            if timers.idle.is_some_and(|t| t <= now) {
                Input::Timer(TimerKind::Idle)
            } else if timers.keepalive.is_some_and(|t| t <= now) {
                Input::Timer(TimerKind::Keepalive)
            } else {
                return None;
            }
        }
    })
}

fn wait_for(rx: &Receiver<Event>, timers: Timers, now: Millis) -> Result<Event, RecvTimeoutError> {
    let next = [timers.idle, timers.keepalive].into_iter().flatten().min();
    match next {
        Some(t) => rx.recv_timeout(Duration::from_millis(t.saturating_sub(now).max(1))),
        None => rx.recv_timeout(Duration::from_secs(3600)),
    }
}

/// The next input: one the driver queued itself (results of its own commands) first, else the
/// next transport event, else a timer that has expired. `None` when woken with nothing to do.
fn next_input(
    pending: &mut VecDeque<Input>,
    rx: &Receiver<Event>,
    timers: Timers,
    now: impl Fn() -> Millis,
) -> Option<Input> {
    if let Some(i) = pending.pop_front() {
        return Some(i);
    }
    let ev = wait_for(rx, timers, now());
    to_input(ev, timers, now())
}

fn rounds(stats: &[source::RoundStats]) -> Vec<RoundReport> {
    stats
        .iter()
        .map(|r| RoundReport {
            round: r.round,
            last: r.last,
            dirty_pages: r.dirty_pages,
            zero_pages: r.zero_pages,
            data_bytes: r.data_bytes,
            writes: r.writes,
            duration_ms: r.duration_ms,
        })
        .collect()
}

/// Progress shown on a terminal while the source runs.
pub trait Progress {
    fn update(
        &mut self,
        round: u32,
        sent: u64,
        remaining: u64,
        rate_mb_s: f64,
        expected_downtime_ms: u64,
    );
    fn finish(&mut self);
}

/// A send or post failed: the transport is gone. The machine hears it once, and nothing more is
/// handed to the transport, so a batch of frames never waits out one post timeout each.
fn link_failed(down: &mut bool, pending: &mut VecDeque<Input>) {
    if !*down {
        *down = true;
        pending.push_back(Input::TransportFailed);
    }
}

/// Everything the source driver needs besides the transport.
pub struct SourceRun {
    pub cfg: SourceConfig,
    pub blocks: Arc<Vec<Arc<RamBlock>>>,
    pub scan: ScanFn,
    pub workload: SourceWorkload,
    pub state_in: Option<PathBuf>,
    pub threads: usize,
    pub progress: Option<Box<dyn Progress>>,
}

/// Runs the source to its outcome over any transport.
pub fn run_source(mut link: impl SourceLink, rx: Receiver<Event>, mut run: SourceRun) -> Report {
    let t0 = Instant::now();
    let now = || t0.elapsed().as_millis() as Millis;
    let mut nonce = [0u8; wire::NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the OS random source is available");
    let key = run.cfg.psk.clone();
    let session_id = run.cfg.session_id;
    let memory: u64 = run.blocks.iter().map(|b| b.len()).sum();
    let mut src = Source::new(run.cfg, nonce).expect("configuration validated by the caller");
    let mut pending: VecDeque<Input> = VecDeque::from([Input::Start]);
    let mut out = Vec::new();
    let mut dst_nonce = None;
    let mut paused_state: Vec<u8> = Vec::new();
    let mut link_down = false;
    let mut control_bytes = 0u64;
    let mut last_round = 0;
    loop {
        let Some(input) = next_input(&mut pending, &rx, src.timers(), now) else {
            continue;
        };
        if let Input::Frame(Frame {
            msg: Message::HelloAck(a),
            ..
        }) = &input
        {
            dst_nonce = Some(a.nonce);
        }
        src.handle(now(), input, &mut out);
        if src.phase() == SrcPhase::Scanning && link.channels_open() == 0 {
            // spec: AUTH-3, AUTH-6: data channels open only after the table is acknowledged.
            let n = src.params().channels;
            let nonce = dst_nonce.expect("HELLO_ACK precedes BLOCK_TABLE_ACK");
            let t = Instant::now();
            let opened = link.open_data(n, session_id, key.as_deref(), &nonce);
            tracing::info!("opened {n} data channels in {:?}", t.elapsed());
            if let Err(e) = opened {
                tracing::warn!("opening data channels: {e}");
                pending.push_back(Input::TransportFailed);
            }
        }
        for c in out.drain(..) {
            match c {
                Command::Send(f) => {
                    let bytes = wire::encode_to_vec(&f).expect("machines send valid frames");
                    control_bytes += bytes.len() as u64;
                    if link_down || link.send_control(&bytes).is_err() {
                        link_failed(&mut link_down, &mut pending);
                    }
                }
                Command::PostWrite {
                    channel,
                    wr_id,
                    block,
                    offset,
                    len,
                    rkey,
                    remote_offset,
                } => {
                    let w = WriteReq {
                        wr_id,
                        block,
                        offset,
                        len,
                        rkey,
                        remote_offset,
                    };
                    if link_down || link.post_write(channel, w).is_err() {
                        link_failed(&mut link_down, &mut pending);
                    }
                }
                Command::ScanDirty { all } => {
                    let t = Instant::now();
                    let scanned = (run.scan)(all);
                    tracing::info!("dirty scan (all: {all}) took {:?}", t.elapsed());
                    match scanned {
                        Ok(scan) => pending.push_back(Input::Dirty(scan)),
                        Err(e) => {
                            tracing::error!("dirty tracking failed: {e}");
                            pending.push_back(Input::WorkloadFailed);
                        }
                    }
                }
                Command::PauseWorkload => match run.workload.pause() {
                    Ok(out) => {
                        paused_state = out;
                        pending.push_back(Input::WorkloadPaused);
                    }
                    Err(e) => {
                        tracing::error!("pausing the workload: {e}");
                        pending.push_back(Input::WorkloadFailed);
                    }
                },
                Command::ResumeWorkload => {
                    if let Err(e) = run.workload.resume() {
                        tracing::error!("resuming the workload: {e}");
                    }
                }
                Command::CaptureDeviceState => {
                    let state = match &run.state_in {
                        Some(p) => match std::fs::read(p) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!("reading device state {}: {e}", p.display());
                                pending.push_back(Input::WorkloadFailed);
                                continue;
                            }
                        },
                        None => std::mem::take(&mut paused_state),
                    };
                    pending.push_back(Input::DeviceState(state));
                }
                Command::ComputeDigests => pending.push_back(Input::Digests(chunk_digests(
                    &run.blocks,
                    src.params().chunk_log2,
                    run.threads,
                ))),
                Command::Finish(_) => {}
                other => tracing::error!("source machine issued {other:?}"),
            }
        }
        if let Some(p) = run.progress.as_mut() {
            if src.round() != last_round || src.outcome().is_some() {
                last_round = src.round();
                let rate = src.bandwidth().unwrap_or(0) as f64 / 1e6;
                let remaining = src.remaining_bytes();
                let downtime = src.bandwidth().map_or(0, |bw| remaining * 1000 / bw.max(1));
                p.update(src.round(), src.stats.data_bytes, remaining, rate, downtime);
            }
        }
        if src.outcome().is_some() {
            break;
        }
    }
    if let Some(p) = run.progress.as_mut() {
        p.finish();
    }
    link.shutdown();
    let st = &src.stats;
    let mut r = Report {
        role: "source",
        transport: link.name(),
        channels: src.params().channels,
        memory_bytes: memory,
        total_time_ms: now(),
        setup_time_ms: st.setup_done_ms.unwrap_or(0),
        rounds: rounds(&st.rounds),
        registration_requests: st.reg_requests,
        chunks_registered: st.reg_chunks,
        chunks_evicted: st.unreg_chunks,
        verified: src.params().digest != wire::DigestAlg::None,
        rss_anon_bytes: crate::report::rss_anon(),
        ..Default::default()
    };
    r.set_outcome(src.outcome());
    if r.status == "completed" {
        r.downtime_ms = st.paused_at_ms.zip(st.finished_at_ms).map(|(p, f)| f - p);
    } else {
        r.verified = false;
    }
    r.bytes.data = st.data_bytes;
    r.bytes.zero_pages = st.zero_pages;
    r.bytes.control_frames = st.control_frames_sent + st.control_frames_received;
    r.bytes.control_bytes = control_bytes;
    let active = r.total_time_ms.saturating_sub(r.setup_time_ms).max(1);
    r.throughput_mb_s = st.data_bytes as f64 / active as f64 / 1e3;
    // Pages found dirty at the start of round k were written since the start of round k-1.
    let windows: Vec<_> = st
        .rounds
        .windows(2)
        .filter(|w| w[1].started_ms > w[0].started_ms)
        .collect();
    if !windows.is_empty() {
        let pages: u64 = windows.iter().map(|w| w[1].dirty_pages).sum();
        let ms: u64 = windows
            .iter()
            .map(|w| w[1].started_ms - w[0].started_ms)
            .sum();
        let page = run.blocks.first().map_or(4096, |b| 1u64 << b.page_log2());
        r.dirty_rate_mb_s = (pages * page) as f64 / ms as f64 / 1e3;
    }
    r
}

/// Everything the destination driver needs besides the transport.
pub struct DestRun {
    pub cfg: DestConfig,
    pub blocks: Arc<Vec<Arc<RamBlock>>>,
    pub workload: DestWorkload,
    pub state: StateSink,
    pub threads: usize,
}

/// Runs the destination to its outcome over any transport.
pub fn run_destination(mut link: impl DestLink, rx: Receiver<Event>, mut run: DestRun) -> Report {
    let t0 = Instant::now();
    let now = || t0.elapsed().as_millis() as Millis;
    let mut nonce = [0u8; wire::NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the OS random source is available");
    let key = run.cfg.psk.clone();
    let memory: u64 = run.blocks.iter().map(|b| b.len()).sum();
    let mut dst = Destination::new(run.cfg, nonce).expect("configuration validated by the caller");
    let mut pending: VecDeque<Input> = VecDeque::new();
    let mut out = Vec::new();
    let mut session_id = None;
    let mut data_allowed = false;
    let mut link_down = false;
    let mut setup_ms = 0;
    loop {
        let Some(input) = next_input(&mut pending, &rx, dst.timers(), now) else {
            continue;
        };
        if let Input::Frame(Frame {
            msg: Message::Hello(h),
            ..
        }) = &input
        {
            session_id = Some(h.session_id);
        }
        dst.handle(now(), input, &mut out);
        if !data_allowed && matches!(dst.phase(), DstPhase::Receiving) {
            // spec: AUTH-2: the key is proven; data connections may join.
            link.allow_data(DataAuth {
                session_id: session_id.expect("HELLO precedes the table"),
                key: key.clone(),
                nonce,
                channels: dst.params().map_or(1, |p| p.channels),
            });
            data_allowed = true;
            setup_ms = now();
        }
        for c in out.drain(..) {
            match c {
                Command::Send(f) => {
                    let bytes = wire::encode_to_vec(&f).expect("machines send valid frames");
                    if link_down || link.send_control(&bytes).is_err() {
                        link_failed(&mut link_down, &mut pending);
                    }
                }
                Command::Register {
                    target,
                    block,
                    offset,
                    len,
                } => match link.register(block, offset, len) {
                    Ok(rkey) => pending.push_back(Input::Registered { target, rkey }),
                    Err(e) => {
                        tracing::error!("registering {len} bytes of block {block}: {e}");
                        pending.push_back(Input::RegisterFailed { target });
                    }
                },
                Command::Unregister { rkey, .. } => {
                    link.unregister(rkey);
                }
                Command::ZeroFill { block, offset, len } => {
                    run.blocks[block as usize].zero(offset, len)
                }
                Command::StoreDeviceState { offset, data } => run.state.store(offset, &data),
                Command::ComputeDigests => {
                    let log2 = dst.params().expect("negotiated").chunk_log2;
                    pending.push_back(Input::Digests(chunk_digests(
                        &run.blocks,
                        log2,
                        run.threads,
                    )));
                }
                Command::StartWorkload => {
                    let started = run
                        .state
                        .persist()
                        .map_err(|e| e.to_string())
                        .and_then(|_| {
                            run.workload
                                .start(&run.state.data)
                                .map_err(|e| e.to_string())
                        });
                    match started {
                        Ok(()) => pending.push_back(Input::WorkloadStarted),
                        Err(e) => {
                            tracing::error!("starting the workload: {e}");
                            pending.push_back(Input::WorkloadFailed);
                        }
                    }
                }
                Command::Finish(_) => {}
                other => tracing::error!("destination machine issued {other:?}"),
            }
        }
        if dst.outcome().is_some() {
            break;
        }
    }
    link.shutdown();
    let mut r = Report {
        role: "destination",
        transport: link.name(),
        channels: dst.params().map_or(0, |p| p.channels),
        memory_bytes: memory,
        total_time_ms: now(),
        setup_time_ms: setup_ms,
        verified: dst.outcome() == Some(Outcome::Completed)
            && dst
                .params()
                .is_some_and(|p| p.digest != wire::DigestAlg::None),
        chunks_registered: dst.stats.reg_chunks,
        chunks_evicted: dst.stats.unreg_chunks,
        rss_anon_bytes: crate::report::rss_anon(),
        ..Default::default()
    };
    r.bytes.zero_pages = dst.stats.zero_pages;
    r.bytes.control_frames = dst.stats.control_frames_received;
    r.set_outcome(dst.outcome());
    r
}
