//! The source driver: runs the source machine over a transport, a dirty log and the workload.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use rdmig_model::source::{RoundStats, SrcCommand, SrcInput, SrcOut};
use rdmig_model::wire::{self, DigestAlg};
use rdmig_model::*;

use super::{wait, Clock, Wake};
use crate::memory::digest_cache::all_digests;
use crate::memory::ram::RamBlock;
use crate::memory::sent_pages::SentPages;
use crate::report::{PhaseReport, Report, RoundReport, Status};
use crate::transport::{SourceLink, SrcEvent, WriteReq};
use crate::vmm::control::SourceWorkload;
use crate::vmm::guard::Guard;

/// Fetch-and-clear of the dirty log; `true` asks for every page.
pub type ScanFn = Box<dyn FnMut(bool) -> Result<DirtyScan, String> + Send>;
/// The dirty log's page hashes as of its last scan, per block, if it keeps any (the `scan`
/// log does).
pub type PageHashesFn = Box<dyn FnMut() -> Option<Vec<Vec<u64>>> + Send>;

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

/// Everything the source driver needs besides the transport.
pub struct SourceRun {
    pub cfg: SourceConfig,
    pub blocks: Arc<Vec<Arc<RamBlock>>>,
    pub scan: ScanFn,
    pub page_hashes: PageHashesFn,
    pub workload: SourceWorkload,
    /// Resumes the workload should this process die while it is paused (spec: SW-6).
    pub guard: Option<Guard>,
    pub state_in: Option<PathBuf>,
    pub threads: usize,
    pub progress: Option<Box<dyn Progress>>,
    /// Where background work reports (the transport's event channel): digests are then
    /// computed beside the final round instead of blocking the driver.
    pub background: Option<Sender<SrcEvent>>,
    /// The chunk digests of source memory, when they are known without reading it at the
    /// switchover: a save file carries the digests of the memory it holds, and the memory of
    /// a workload paused before the migration started can be digested beside the first pass.
    pub known_digests: Option<KnownDigests>,
    /// The dirty log's table of what was sent, when it compares memory with it (`scan`): the
    /// transport hashes every write's bytes into it, and the driver records every ZERO range
    /// it posts (spec: SCAN-2). The caller picks a transport that can.
    pub sent_pages: Option<Arc<SentPages>>,
    /// The buffer the device state streams into when it travels over the data channels: the
    /// transport's block after the RAM blocks, at least `cfg.state_max` bytes (spec: STATE-2).
    pub state_buffer: Option<Arc<RamBlock>>,
}

/// Chunk digests of source memory, known in advance or being computed.
#[derive(Debug)]
pub struct KnownDigests {
    pub alg: DigestAlg,
    pub chunk_log2: u8,
    /// Delivers the digests once (a closed channel: compute them as usual).
    pub digests: std::sync::mpsc::Receiver<Vec<u64>>,
}

impl KnownDigests {
    /// Digests known now.
    pub fn ready(alg: DigestAlg, chunk_log2: u8, digests: Vec<u64>) -> KnownDigests {
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = tx.send(digests);
        KnownDigests {
            alg,
            chunk_log2,
            digests: rx,
        }
    }

    /// Digests of `blocks` computed on a thread of their own from now on: for memory that
    /// nothing writes any more (a workload paused before the migration started).
    pub fn computing(
        blocks: Arc<Vec<Arc<RamBlock>>>,
        alg: DigestAlg,
        chunk_log2: u8,
        threads: usize,
    ) -> KnownDigests {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(all_digests(&blocks, alg, chunk_log2, threads));
        });
        KnownDigests {
            alg,
            chunk_log2,
            digests: rx,
        }
    }
}

fn to_input(e: SrcEvent) -> SrcInput {
    match e {
        SrcEvent::Control(bytes) => match wire::decode(&bytes) {
            Ok(f) => SrcInput::Frame(f),
            Err(e) => {
                tracing::warn!("malformed control frame: {e}");
                SrcInput::Malformed(e)
            }
        },
        SrcEvent::ControlClosed(why) => {
            tracing::info!("control connection closed: {why}");
            SrcInput::TransportFailed
        }
        SrcEvent::DataOpened(ch) => SrcInput::DataOpened { channel: ch },
        SrcEvent::DataLost(ch, why) => {
            tracing::info!("data channel {ch}: {why}");
            SrcInput::DataLost { channel: ch }
        }
        SrcEvent::WriteDone(id) => SrcInput::WriteDone { wr_id: id },
        SrcEvent::Signal(sig) => {
            tracing::warn!("signal {sig}: cancelling the migration");
            SrcInput::Cancel
        }
        SrcEvent::Digests(d) => SrcInput::Digests(d),
        SrcEvent::Scanned(r) => scanned(r),
        SrcEvent::StateProduced(len) => SrcInput::StateProduced { len },
        SrcEvent::StateDone(len, digest) => SrcInput::StateDone { len, digest },
        SrcEvent::StateFailed(why) => {
            tracing::error!("device state: {why}");
            SrcInput::WorkloadFailed
        }
    }
}

/// How often the producer of a streamed device state reports its progress.
const STATE_REPORT_STEP: u64 = 1 << 20;
/// Bytes of a `--state-in` file read into the state buffer per call.
const STATE_FILE_PIECE: u64 = 4 << 20;

/// Where a streamed device state comes from (spec: STATE-3).
enum StateFrom {
    /// A stopped QEMU saving it into a pipe.
    Qemu(Arc<crate::vmm::qemu::QemuSource>),
    /// A `--state-in` file, read into the state buffer as it is sent.
    File(PathBuf),
    /// What the pause produced (a pause hook's output).
    Bytes(Vec<u8>),
}

/// Fills `buf` with the device state from `from`, reporting its length every
/// `STATE_REPORT_STEP` bytes and, at the end, its length and (with `hash`) its XXH3-64
/// digest (spec: STATE-3, STATE-5). A state larger than `buf` fails.
fn stream_state(
    buf: &RamBlock,
    from: StateFrom,
    hash: bool,
    report: &mut (dyn FnMut(SrcEvent) + Send),
) {
    let too_large = || {
        format!(
            "the device state exceeds the {} bytes of its state area (--max-state-size)",
            buf.len()
        )
    };
    let mut len = 0u64;
    let mut reported = 0u64;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut grown = |len: u64, report: &mut (dyn FnMut(SrcEvent) + Send)| {
        if len - reported >= STATE_REPORT_STEP {
            reported = len;
            report(SrcEvent::StateProduced(len));
        }
    };
    let r: Result<(), String> = match from {
        // Straight from the page cache into the buffer: one copy, in the kernel.
        StateFrom::File(p) => (|| {
            let what = |e: std::io::Error| format!("reading device state {}: {e}", p.display());
            let f = std::fs::File::open(&p).map_err(what)?;
            let size = f.metadata().map_err(what)?.len();
            if size > buf.len() {
                return Err(too_large());
            }
            while len < size {
                let n = (size - len).min(STATE_FILE_PIECE);
                buf.read_from_file(len, n, std::os::fd::AsFd::as_fd(&f), len)
                    .map_err(what)?;
                if hash {
                    buf.visit(len, n, |b| hasher.update(b));
                }
                len += n;
                grown(len, report);
            }
            Ok(())
        })(),
        StateFrom::Qemu(_) | StateFrom::Bytes(_) => {
            let mut sink = |bytes: &[u8]| -> std::io::Result<()> {
                if len + bytes.len() as u64 > buf.len() {
                    return Err(std::io::Error::other(too_large()));
                }
                buf.write(len, bytes);
                if hash {
                    hasher.update(bytes);
                }
                len += bytes.len() as u64;
                grown(len, report);
                Ok(())
            };
            match from {
                StateFrom::Qemu(q) => q
                    .save_with(Box::new(|b: &[u8]| sink(b)))
                    .map_err(|e| e.to_string()),
                StateFrom::Bytes(b) => b
                    .chunks(STATE_REPORT_STEP as usize)
                    .try_for_each(&mut sink)
                    .map_err(|e| e.to_string()),
                StateFrom::File(_) => unreachable!("matched above"),
            }
        }
    };
    match r {
        Ok(()) => report(SrcEvent::StateDone(
            len,
            if hash { hasher.digest() } else { 0 },
        )),
        Err(e) => report(SrcEvent::StateFailed(e)),
    }
}

/// The phase that times the device state's production when it streams (STATE-3).
const STATE_SAVE_PHASE: &str = "device state save (streamed beside the final scan and round)";

fn scanned(r: Result<DirtyScan, String>) -> SrcInput {
    match r {
        Ok(scan) => SrcInput::Dirty(scan),
        Err(e) => {
            tracing::error!("dirty tracking failed: {e}");
            SrcInput::WorkloadFailed
        }
    }
}

/// What the scanner thread is asked for.
enum ScanReq {
    Scan(bool),
    /// The chunk digests of source memory as the last scan saw it (after the final scan, the
    /// workload paused: memory as it is).
    Digests {
        alg: DigestAlg,
        chunk_log2: u8,
        threads: usize,
    },
}

/// Runs the dirty log's scans on a thread of its own, so that a scan the machine asks for
/// while a round's writes travel (spec: RND-3) overlaps them; results come back as
/// `SrcEvent::Scanned` and `SrcEvent::Digests`.
fn scanner(
    mut scan: ScanFn,
    mut hashes: PageHashesFn,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    events: Sender<SrcEvent>,
) -> Sender<ScanReq> {
    let (tx, rx) = std::sync::mpsc::channel::<ScanReq>();
    std::thread::spawn(move || {
        for req in rx {
            let e = match req {
                ScanReq::Scan(all) => SrcEvent::Scanned(scan(all)),
                ScanReq::Digests {
                    alg,
                    chunk_log2,
                    threads,
                } => SrcEvent::Digests(match (alg, hashes()) {
                    (DigestAlg::Xxh3PageTree, Some(h)) => tree_digests(&blocks, &h, chunk_log2),
                    _ => all_digests(&blocks, alg, chunk_log2, threads),
                }),
            };
            if events.send(e).is_err() {
                return;
            }
        }
    });
    tx
}

/// Page-tree chunk digests from per-block page hashes (spec: SW-4).
fn tree_digests(blocks: &[Arc<RamBlock>], hashes: &[Vec<u64>], chunk_log2: u8) -> Vec<u64> {
    let mut v = Vec::new();
    for (b, h) in blocks.iter().zip(hashes) {
        let per = 1usize << (chunk_log2 - b.page_log2().min(chunk_log2));
        v.extend(h.chunks(per).map(rdmig_model::digest::tree_digest));
    }
    v
}

/// The driver's own state around the machine.
struct Driver<'a, L: SourceLink> {
    link: L,
    run: SourceRun,
    clock: &'a Clock,
    pending: VecDeque<SrcInput>,
    /// The transport failed a send or post: the machine heard it once; nothing more is
    /// handed to the transport, so a batch of frames never waits out one failure each.
    link_down: bool,
    /// The first connection failure the transport reported, for the report.
    transport_error: Option<String>,
    paused_state: Vec<u8>,
    control_bytes: u64,
    chunk_log2: u8,
    /// Local work timed by the driver, in order.
    timeline: Vec<PhaseReport>,
    /// Background work under way, for the timeline.
    background_phase: Option<(PhaseReport, Instant)>,
    /// The negotiated digest algorithm.
    digest_alg: DigestAlg,
    /// The scanner thread, when scans run in the background, and the scan under way.
    scanner: Option<Sender<ScanReq>>,
    scan_phase: Option<(PhaseReport, Instant)>,
    /// Dirty scans run so far, to name them.
    scans: u32,
    paused: bool,
    /// The negotiated state area: the device state streams over the data channels.
    state_area: u64,
    /// The streamed device state under way, for the timeline.
    state_phase: Option<(PhaseReport, Instant)>,
    /// A stopped QEMU's state save, started at the pause: its reports wait here until the
    /// machine asks for the state (CaptureDeviceState), with the phase that times it.
    early_state: Option<(Receiver<SrcEvent>, PhaseReport, Instant)>,
    /// The device state's length, once known.
    state_len: u64,
}

impl<L: SourceLink> Driver<'_, L> {
    /// Runs `f` and records it as phase `name`.
    fn timed<T>(&mut self, name: String, f: impl FnOnce(&mut Self) -> T) -> T {
        let start = self.clock.now();
        let t = Instant::now();
        let r = f(self);
        let ms = t.elapsed().as_millis() as u64;
        tracing::info!("{name} took {ms} ms");
        self.timeline.push(PhaseReport {
            name,
            start_ms: start,
            duration_ms: ms,
            downtime: self.paused,
        });
        r
    }

    fn link_failed(&mut self) {
        if !self.link_down {
            self.link_down = true;
            self.pending.push_back(SrcInput::TransportFailed);
        }
    }

    fn exec(&mut self, c: SrcCommand) {
        match c {
            SrcCommand::Send(f) => {
                if let (wire::Message::Zero { ranges, .. }, Some(t)) =
                    (&f.msg, &self.run.sent_pages)
                {
                    // spec: SCAN-2: the destination will hold zeros there.
                    for r in ranges {
                        t.zeroed(r.block, r.first_page as u64, r.page_count as u64);
                    }
                }
                let bytes = wire::encode_to_vec(&f).expect("machines send valid frames");
                self.control_bytes += bytes.len() as u64;
                if self.link_down || self.link.send_control(&bytes).is_err() {
                    self.link_failed();
                }
            }
            SrcCommand::OpenData { hello } => {
                if self.link_down || self.link.open_data(hello).is_err() {
                    self.pending.push_back(SrcInput::DataLost {
                        channel: hello.channel,
                    });
                }
            }
            SrcCommand::PostWrite(w) => {
                let req = WriteReq {
                    wr_id: w.wr_id,
                    block: w.block,
                    offset: w.offset,
                    len: w.len,
                    rkey: w.rkey,
                    remote_offset: w.remote_offset,
                };
                if self.link_down || self.link.post_write(w.channel, req).is_err() {
                    self.link_failed();
                }
            }
            SrcCommand::ScanDirty { all } => self.scan(all),
            SrcCommand::PauseWorkload => self.pause(),
            SrcCommand::ResumeWorkload => self.resume(),
            SrcCommand::RelinquishWorkload => self.relinquish(),
            SrcCommand::CaptureDeviceState { area: 0 } => self.capture_state(),
            SrcCommand::CaptureDeviceState { .. } => self.stream_state(),
            SrcCommand::ComputeDigests => self.digests(),
            SrcCommand::Finish(_) => {}
        }
    }

    /// The source memory's chunk digests, beside the final round (memory is final once
    /// paused and scanned, spec: SW-2). With the page tree and a dirty log that hashes pages
    /// (`scan`), the scanner thread derives them from the final scan's page hashes without
    /// reading memory again; otherwise they are computed from memory, on a thread of their own
    /// when the driver has a channel for background work, else inline.
    fn digests(&mut self) {
        let (alg, log2, threads) = (self.digest_alg, self.chunk_log2, self.run.threads);
        if let Some(k) = self.run.known_digests.take() {
            if k.alg == alg && k.chunk_log2 == log2 {
                let known = self.timed("digests of source memory (known)".into(), |_| {
                    k.digests.recv()
                });
                if let Ok(d) = known {
                    return self.pending.push_back(SrcInput::Digests(d));
                }
            }
        }
        let name = "digests of source memory (beside the final round)";
        if let Some(tx) = &self.scanner {
            if tx
                .send(ScanReq::Digests {
                    alg,
                    chunk_log2: log2,
                    threads,
                })
                .is_ok()
            {
                self.background_phase = Some((self.phase(name), Instant::now()));
                return;
            }
        }
        let Some(tx) = self.run.background.clone() else {
            let d = self.timed(name.into(), |d| {
                all_digests(&d.run.blocks, alg, log2, threads)
            });
            return self.pending.push_back(SrcInput::Digests(d));
        };
        let blocks = self.run.blocks.clone();
        self.background_phase = Some((self.phase(name), Instant::now()));
        std::thread::spawn(move || {
            let _ = tx.send(SrcEvent::Digests(all_digests(&blocks, alg, log2, threads)));
        });
    }

    /// A phase that starts now, its duration filled in when it ends.
    fn phase(&self, name: &str) -> PhaseReport {
        PhaseReport {
            name: name.to_string(),
            start_ms: self.clock.now(),
            duration_ms: 0,
            downtime: self.paused,
        }
    }

    fn scan(&mut self, all: bool) {
        self.scans += 1;
        let name = match (self.scans, self.paused) {
            (_, true) => "final dirty scan".to_string(),
            (1, _) => "first dirty scan".to_string(),
            (n, _) => format!("dirty scan {n}"),
        };
        if let Some(tx) = &self.scanner {
            if tx.send(ScanReq::Scan(all)).is_ok() {
                let phase = PhaseReport {
                    name,
                    start_ms: self.clock.now(),
                    duration_ms: 0,
                    downtime: self.paused,
                };
                self.scan_phase = Some((phase, Instant::now()));
                return;
            }
            return self
                .pending
                .push_back(scanned(Err("the scanner thread is gone".into())));
        }
        let r = self.timed(name, |d| (d.run.scan)(all));
        self.pending.push_back(scanned(r));
    }

    fn pause(&mut self) {
        // Armed first: should this process die once the workload is paused, the guard
        // resumes it (spec: LIVE-6).
        if let Some(g) = self.run.guard.as_mut() {
            if let Err(e) = g.arm() {
                tracing::warn!("arming the guard: {e}");
            }
        }
        // The workload stops at the start of this step: it is downtime.
        self.paused = true;
        // A QEMU whose state streams is only stopped here: it saves its state while the
        // final round runs (spec: STATE-3).
        let streaming = self.state_area > 0 && self.run.state_in.is_none();
        let name = if streaming {
            "pause"
        } else {
            "pause (and device state save)"
        };
        let r = self.timed(name.into(), |d| {
            if streaming {
                d.run.workload.pause_for_streaming()
            } else {
                d.run.workload.pause()
            }
        });
        let input = match r {
            Ok(out) => {
                self.paused_state = out;
                if streaming {
                    self.start_qemu_state_save();
                }
                SrcInput::WorkloadPaused
            }
            Err(e) => {
                tracing::error!("pausing the workload: {e}");
                SrcInput::WorkloadFailed
            }
        };
        self.pending.push_back(input);
    }

    fn resume(&mut self) {
        self.paused = false;
        if let Err(e) = self.run.workload.resume() {
            tracing::error!("resuming the workload: {e}");
        }
        if let Some(g) = self.run.guard.as_mut() {
            let _ = g.release();
        }
    }

    fn relinquish(&mut self) {
        // Written before COMMIT is handed to the transport (spec: SW-6, LIVE-6).
        if let Some(g) = self.run.guard.as_mut() {
            if let Err(e) = g.disarm() {
                // A guard that cannot be told is gone, and resumes nothing.
                tracing::warn!("disarming the guard: {e}");
            }
        }
    }

    /// A stopped QEMU starts saving its state into the state buffer at once, beside the final
    /// dirty scan: the guest no longer runs, so the state is final, and the save is downtime
    /// either way. Only the buffer, the driver's own memory, sees it before the machine asks
    /// for the state; its reports are held until then (spec: STATE-3, the machine's inputs
    /// come only after CaptureDeviceState).
    fn start_qemu_state_save(&mut self) {
        let (Some(buf), Some(q), Some(_)) = (
            self.run.state_buffer.clone(),
            self.run.workload.streaming_qemu(),
            self.run.background.as_ref(),
        ) else {
            return;
        };
        let hash = self.digest_alg != DigestAlg::None;
        let (tx, rx) = std::sync::mpsc::channel();
        let phase = self.phase(STATE_SAVE_PHASE);
        self.early_state = Some((rx, phase, Instant::now()));
        std::thread::spawn(move || {
            stream_state(&buf, StateFrom::Qemu(q), hash, &mut |e| {
                let _ = tx.send(e);
            })
        });
    }

    /// The device state, streamed into the state buffer while the final round runs: saved
    /// by QEMU into it (from the pause on), or copied from what the pause produced or
    /// `--state-in` holds. On a thread of its own when the driver has a channel for
    /// background work.
    fn stream_state(&mut self) {
        if let Some((early, phase, t)) = self.early_state.take() {
            let Some(tx) = self.run.background.clone() else {
                unreachable!("started only with a channel for background work");
            };
            self.state_phase = Some((phase, t));
            std::thread::spawn(move || {
                for e in early {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            });
            return;
        }
        let Some(buf) = self.run.state_buffer.clone() else {
            tracing::error!("a state area was negotiated but the driver has no state buffer");
            return self.pending.push_back(SrcInput::WorkloadFailed);
        };
        let from = match (&self.run.state_in, self.run.workload.streaming_qemu()) {
            (Some(p), _) => StateFrom::File(p.clone()),
            (None, Some(q)) => StateFrom::Qemu(q),
            (None, None) => StateFrom::Bytes(std::mem::take(&mut self.paused_state)),
        };
        // The digest travels only when digests are negotiated (spec: STATE-5).
        let hash = self.digest_alg != DigestAlg::None;
        let name = STATE_SAVE_PHASE;
        match self.run.background.clone() {
            Some(tx) => {
                self.state_phase = Some((self.phase(name), Instant::now()));
                std::thread::spawn(move || {
                    stream_state(&buf, from, hash, &mut |e| {
                        let _ = tx.send(e);
                    })
                });
            }
            None => {
                let mut events = Vec::new();
                self.timed(name.into(), |_| {
                    stream_state(&buf, from, hash, &mut |e| events.push(e))
                });
                self.pending.extend(events.into_iter().map(to_input));
            }
        }
    }

    fn capture_state(&mut self) {
        let state = match &self.run.state_in {
            Some(p) => match std::fs::read(p) {
                Ok(b) => SrcInput::DeviceState(b),
                Err(e) => {
                    tracing::error!("reading device state {}: {e}", p.display());
                    SrcInput::WorkloadFailed
                }
            },
            None => SrcInput::DeviceState(std::mem::take(&mut self.paused_state)),
        };
        self.pending.push_back(state);
    }
}

/// Runs the source to its outcome over any transport.
pub fn run_source(mut link: impl SourceLink, rx: Receiver<SrcEvent>, mut run: SourceRun) -> Report {
    if let Some(t) = &run.sent_pages {
        assert!(
            link.hash_sent_pages(t.clone()),
            "the caller pairs a hashing dirty log only with a transport that hashes what it sends"
        );
    }
    let clock = Clock::new();
    let mut nonce = [0u8; wire::NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the OS random source is available");
    let memory: u64 = run.blocks.iter().map(|b| b.len()).sum();
    let mut src =
        Source::new(run.cfg.clone(), nonce).expect("configuration validated by the caller");
    let mut progress = run.progress.take();
    let scanner = run.background.clone().map(|events| {
        let scan = std::mem::replace(
            &mut run.scan,
            Box::new(|_| Err("the scanner thread owns the dirty log".to_string())),
        );
        let hashes = std::mem::replace(&mut run.page_hashes, Box::new(|| None));
        scanner(scan, hashes, run.blocks.clone(), events)
    });
    let mut d = Driver {
        link,
        chunk_log2: run.cfg.params.chunk_log2,
        run,
        clock: &clock,
        pending: VecDeque::from([SrcInput::Start]),
        link_down: false,
        transport_error: None,
        paused_state: Vec::new(),
        control_bytes: 0,
        timeline: Vec::new(),
        background_phase: None,
        scanner,
        scan_phase: None,
        digest_alg: DigestAlg::None,
        scans: 0,
        paused: false,
        state_area: 0,
        state_phase: None,
        early_state: None,
        state_len: 0,
    };
    let mut out = SrcOut::new();
    let mut last_round = 0;
    while src.outcome().is_none() {
        let input = match d.pending.pop_front() {
            Some(i) => i,
            None => match wait(&rx, d.clock, src.timers().next()) {
                Wake::Event(e) => {
                    if let SrcEvent::ControlClosed(why) | SrcEvent::DataLost(_, why) = &e {
                        d.transport_error.get_or_insert_with(|| why.clone());
                    }
                    let done = match &e {
                        SrcEvent::Digests(_) => d.background_phase.take(),
                        SrcEvent::Scanned(_) => d.scan_phase.take(),
                        SrcEvent::StateDone(..) | SrcEvent::StateFailed(_) => d.state_phase.take(),
                        _ => None,
                    };
                    if let Some((mut p, t)) = done {
                        p.duration_ms = t.elapsed().as_millis() as u64;
                        tracing::info!("{} took {} ms", p.name, p.duration_ms);
                        d.timeline.push(p);
                    }
                    to_input(e)
                }
                Wake::Timer(k) => SrcInput::Timer(k),
                Wake::Gone => SrcInput::TransportFailed,
            },
        };
        match &input {
            SrcInput::StateDone { len, .. } => d.state_len = *len,
            SrcInput::DeviceState(b) => d.state_len = b.len() as u64,
            _ => {}
        }
        src.handle(clock.now(), input, &mut out);
        d.chunk_log2 = src.params().chunk_log2;
        d.digest_alg = src.params().digest;
        let geo = src.geometry();
        d.state_area = geo.state_block().map_or(0, |b| geo.blocks[b].length);
        for c in std::mem::take(&mut out.cmds) {
            d.exec(c);
        }
        if let Some(p) = progress.as_mut() {
            if src.round() != last_round || src.outcome().is_some() {
                last_round = src.round();
                let rate = src.bandwidth().unwrap_or(0) as f64 / 1e6;
                let remaining = src.remaining_bytes();
                let downtime = src.bandwidth().map_or(0, |bw| remaining * 1000 / bw.max(1));
                p.update(src.round(), out.stats.data_bytes, remaining, rate, downtime);
            }
        }
    }
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    if let Some(g) = d.run.guard.as_mut() {
        // Resumed or relinquished already, or never paused: the guard has nothing left to do.
        let _ = g.release();
    }
    d.link.shutdown();
    report(&src, &out.stats, &d, memory, clock.now())
}

/// The source's timeline: the driver's timed local work, and the protocol's steps between
/// the machine's timestamps.
fn phases(
    st: &rdmig_model::source::SourceStats,
    local: &[PhaseReport],
    end: Millis,
) -> Vec<PhaseReport> {
    let mut v: Vec<PhaseReport> = local.to_vec();
    let paused = local
        .iter()
        .find(|p| p.name.starts_with("pause"))
        .map(|p| p.start_ms);
    let mut span = |name: &str, a: Option<Millis>, b: Option<Millis>| {
        if let (Some(a), Some(b)) = (a, b) {
            v.push(PhaseReport {
                name: name.to_string(),
                start_ms: a,
                duration_ms: b.saturating_sub(a),
                downtime: paused.is_some_and(|p| a >= p),
            });
        }
    };
    span("handshake", st.started_at_ms, st.setup_done_ms);
    span("data channels join", st.setup_done_ms, st.channels_open_ms);
    for r in &st.rounds {
        let name = if r.last {
            "final round".to_string()
        } else {
            format!("round {} transfer", r.round)
        };
        span(
            &name,
            Some(r.started_ms),
            Some(r.started_ms + r.duration_ms),
        );
    }
    span(
        "device state and digests sent",
        st.final_round_acked_ms,
        st.prepare_sent_ms,
    );
    span(
        "prepare (destination checks and verifies)",
        st.prepare_sent_ms,
        st.commit_sent_ms.or(Some(end)),
    );
    span(
        "commit (destination loads and starts)",
        st.commit_sent_ms,
        st.finished_at_ms.or(Some(end)),
    );
    v.sort_by_key(|p| p.start_ms);
    v
}

fn rounds(stats: &[RoundStats]) -> Vec<RoundReport> {
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

fn report<L: SourceLink>(
    src: &Source,
    st: &rdmig_model::source::SourceStats,
    d: &Driver<'_, L>,
    memory: u64,
    total_ms: Millis,
) -> Report {
    let mut r = Report {
        role: "source",
        transport: d.link.name(),
        channels: src.params().channels,
        memory_bytes: memory,
        total_time_ms: total_ms,
        setup_time_ms: st.setup_done_ms.unwrap_or(0),
        rounds: rounds(&st.rounds),
        registration_requests: st.reg_requests,
        chunks_registered: st.reg_chunks,
        chunks_evicted: st.unreg_chunks,
        verified: src.params().digest != DigestAlg::None,
        rss_anon_bytes: crate::report::rss_anon(),
        ..Default::default()
    };
    r.set_outcome(src.outcome());
    // What the transport said, so an operator sees why (a reset, a peer that wants TLS).
    if r.reason.as_deref() == Some("TransportFailed") {
        if let (Some(why), Some(detail)) = (&d.transport_error, r.detail.as_mut()) {
            *detail = format!("{detail}: {why}");
        }
    }
    r.phases = phases(st, &d.timeline, total_ms);
    if r.status == Status::Completed {
        // From the moment the pause was requested: stopping the workload is downtime too.
        let paused = d
            .timeline
            .iter()
            .find(|p| p.name.starts_with("pause"))
            .map(|p| p.start_ms)
            .or(st.paused_at_ms);
        r.downtime_ms = paused
            .zip(st.finished_at_ms)
            .map(|(p, f)| f.saturating_sub(p));
    } else {
        r.verified = false;
    }
    r.bytes.data = st.data_bytes;
    r.bytes.zero_pages = st.zero_pages;
    r.bytes.device_state = d.state_len;
    r.bytes.device_state_path = if d.state_area > 0 {
        "data channels"
    } else {
        "control channel"
    };
    r.bytes.control_frames = st.control_frames_sent + st.control_frames_received;
    r.bytes.control_bytes = d.control_bytes;
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
        let page = d.run.blocks.first().map_or(4096, |b| 1u64 << b.page_log2());
        r.dirty_rate_mb_s = (pages * page) as f64 / ms as f64 / 1e3;
    }
    r
}
