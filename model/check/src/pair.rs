//! A source and a destination stepped against each other in memory.
//!
//! This is the smallest complete environment for the machines: byte-encoded control frames in
//! two ordered queues, data channels as FIFOs of writes that land in destination memory only
//! through a registration table (as a NIC would check them), completions delivered out of
//! order across channels, and a deterministic guest that keeps writing while the source
//! workload runs. Tests, fuzz corpus generation and the in-memory demo use it; the simulator
//! and the real transports are richer drivers of the same machines.

use std::collections::VecDeque;

use rdmig_model::destination::{DestConfig, DestStats, Destination, DstCommand, DstInput};
use rdmig_model::digest::digests_by;
use rdmig_model::source::{Source, SourceConfig, SourceStats, SrcCommand, SrcInput, WriteCmd};
use rdmig_model::table::{DstPhase, SrcPhase};
use rdmig_model::types::*;
use rdmig_model::wire::{self, BlockDesc, DigestAlg, Frame, Message};
use rdmig_model::PageBitmap;

use crate::env::{self, ByteMem, Nic};
use crate::rng::Rng;

/// Guest behaviour while the source workload runs.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Pages the guest writes per step of the pair.
    pub pages_per_step: u32,
    /// Steps during which the guest writes at all (afterwards it idles, so rounds converge).
    pub active_steps: u64,
    /// One in `zero_one_in` writes stores an all-zero page.
    pub zero_one_in: u32,
    pub seed: u64,
}

/// Totals a run produces, for summaries.
#[derive(Debug, Clone, Default)]
pub struct PairReport {
    pub steps: u64,
    pub source: Option<Outcome>,
    pub destination: Option<Outcome>,
    pub rounds: u32,
    pub data_bytes: u64,
    pub zero_pages: u64,
    pub control_frames: u64,
    pub control_bytes: u64,
    pub reg_chunks: u64,
    pub unreg_chunks: u64,
    pub max_registered_bytes: u64,
    pub memory_equal_at_start: Option<bool>,
    pub guest_writes: u64,
}

/// Both machines, their memories and the fabric between them.
pub struct Pair {
    pub src: Source,
    pub dst: Destination,
    pub src_mem: Vec<Vec<u8>>,
    /// Destination memory, in the destination's block order.
    pub dst_mem: Vec<Vec<u8>>,
    /// Destination block index -> source block index.
    dst_order: Vec<usize>,
    page_log2: Vec<u8>,
    dirty_log: Vec<PageBitmap>,
    s2d: VecDeque<Vec<u8>>,
    d2s: VecDeque<Vec<u8>>,
    channels: Vec<VecDeque<WriteCmd>>,
    completions: Vec<u64>,
    nic: Nic,
    src_inputs: VecDeque<SrcInput>,
    dst_inputs: VecDeque<DstInput>,
    src_running: bool,
    dst_running: bool,
    snapshot: Option<Vec<Vec<u8>>>,
    device_state: Vec<u8>,
    received_state: Vec<u8>,
    /// The state area both sides will agree on (spec: STATE-1); its buffer and staging area
    /// are one more block after the RAM blocks of `src_mem` and `dst_mem`.
    state_area: u64,
    guest: Guest,
    rng: Rng,
    now: Millis,
    pub report: PairReport,
    pub src_stats: SourceStats,
    pub dst_stats: DestStats,
    /// The source gave up its workload (RelinquishWorkload) before sending COMMIT.
    pub relinquished: bool,
    /// Every frame the source sent, encoded, in order (the control stream a fuzzer can replay).
    pub source_stream: Vec<Vec<u8>>,
    pub dest_stream: Vec<Vec<u8>>,
    /// Frames delivered so far to the destination and to the source.
    pub delivered_to_dst: usize,
    pub delivered_to_src: usize,
    /// Run the checks every step (INV-REG-1, INV-PIN-1, INV-FC-1); a failure panics.
    pub check: bool,
    /// The control link from the destination goes silent: its frames stop reaching the
    /// source, and nothing says so.
    pub silent_control: bool,
    /// The data channels go silent: writes neither land nor complete.
    pub silent_data: bool,
}

impl Pair {
    /// Chunk digests `alg` of `mem`, each block with its own page size (spec: SW-4).
    fn digests(&self, mem: &[Vec<u8>], alg: DigestAlg, chunk_log2: u8) -> Vec<u64> {
        mem.iter()
            .zip(&self.page_log2)
            .flat_map(|(b, &pl)| digests_by(alg, std::slice::from_ref(b), pl, chunk_log2))
            .collect()
    }

    /// Builds a pair over `blocks`, filling the source memory with a pattern that includes
    /// zero pages. `device_state` is what the source workload hands over at switchover.
    pub fn new(
        scfg: SourceConfig,
        dcfg: DestConfig,
        guest: Guest,
        device_state: Vec<u8>,
    ) -> Result<Self, rdmig_model::source::ConfigError> {
        let blocks: Vec<BlockDesc> = scfg.blocks.clone();
        let state_area = scfg.state_max.min(dcfg.state_capacity);
        // Destination memory is in the destination's own block order.
        let dst_order: Vec<usize> = dcfg
            .blocks
            .iter()
            .map(|d| rdmig_model::wire::block_index(&blocks, &d.name).unwrap_or(0))
            .collect();
        let mut dst_mem: Vec<Vec<u8>> = dcfg
            .blocks
            .iter()
            .map(|b| vec![0xAA; b.length as usize])
            .collect();
        let src = Source::new(scfg, [7; wire::NONCE_LEN])?;
        let dst = Destination::new(dcfg, [9; wire::NONCE_LEN])?;
        let mut rng = Rng::new(guest.seed);
        let mut src_mem: Vec<Vec<u8>> = blocks
            .iter()
            .map(|b| {
                let mut m = vec![0u8; b.length as usize];
                for (i, page) in m.chunks_mut(1 << b.page_log2).enumerate() {
                    if i % 3 != 2 {
                        let v = rng.next_u64();
                        page.iter_mut()
                            .enumerate()
                            .for_each(|(j, x)| *x = (v >> (j % 8 * 8)) as u8 ^ j as u8);
                    }
                }
                m
            })
            .collect();
        if state_area > 0 {
            src_mem.push(vec![0xCC; state_area as usize]);
            dst_mem.push(vec![0xAA; state_area as usize]);
        }
        let channels = src.params().channels as usize;
        Ok(Pair {
            state_area,
            dst_mem,
            dst_order,
            page_log2: blocks.iter().map(|b| b.page_log2).collect(),
            dirty_log: blocks
                .iter()
                .map(|b| PageBitmap::new(b.length >> b.page_log2))
                .collect(),
            src_mem,
            src,
            dst,
            s2d: VecDeque::new(),
            d2s: VecDeque::new(),
            channels: vec![VecDeque::new(); channels],
            completions: Vec::new(),
            nic: Nic::default(),
            src_inputs: VecDeque::new(),
            dst_inputs: VecDeque::new(),
            src_running: true,
            dst_running: false,
            snapshot: None,
            device_state,
            received_state: Vec::new(),
            guest,
            rng,
            now: 0,
            report: PairReport::default(),
            src_stats: SourceStats::default(),
            dst_stats: DestStats::default(),
            relinquished: false,
            source_stream: Vec::new(),
            dest_stream: Vec::new(),
            delivered_to_dst: 0,
            delivered_to_src: 0,
            check: true,
            silent_control: false,
            silent_data: false,
        })
    }

    /// Runs until both sides have an outcome or `max_steps` pass; returns the report.
    pub fn run(&mut self, max_steps: u64) -> PairReport {
        self.start();
        while self.report.steps < max_steps
            && (self.src.outcome().is_none() || self.dst.outcome().is_none())
        {
            self.step();
        }
        self.finish_report()
    }

    /// Runs until the source reaches `phase` (or ends), for tests that need a mid-migration state.
    pub fn run_until_source(&mut self, phase: SrcPhase, max_steps: u64) {
        self.start();
        while self.report.steps < max_steps
            && self.src.phase() != phase
            && self.src.outcome().is_none()
        {
            self.step();
        }
    }

    fn start(&mut self) {
        if self.src.phase() == SrcPhase::Idle && !self.src_inputs.contains(&SrcInput::Start) {
            self.src_inputs.push_back(SrcInput::Start);
        }
    }

    fn finish_report(&mut self) -> PairReport {
        let r = &mut self.report;
        r.source = self.src.outcome();
        r.destination = self.dst.outcome();
        r.rounds = self.src.round();
        r.data_bytes = self.src_stats.data_bytes;
        r.zero_pages = self.src_stats.zero_pages;
        r.reg_chunks = self.src_stats.reg_chunks;
        r.unreg_chunks = self.src_stats.unreg_chunks;
        r.max_registered_bytes = self.dst_stats.max_registered_bytes;
        r.clone()
    }

    /// One step: the guest writes, then each queue moves by at most one item.
    pub fn step(&mut self) {
        self.report.steps += 1;
        self.now += 1;
        if self.src_running && self.report.steps <= self.guest.active_steps {
            for _ in 0..self.guest.pages_per_step {
                self.guest_write();
            }
        }
        if let Some(i) = self.src_inputs.pop_front() {
            self.feed_src(i);
        }
        if let Some(i) = self.dst_inputs.pop_front() {
            self.feed_dst(i);
        }
        if let Some(bytes) = self.s2d.pop_front() {
            self.delivered_to_dst += 1;
            let i = match wire::decode(&bytes) {
                Ok(f) => DstInput::Frame(f),
                Err(e) => DstInput::Malformed(e),
            };
            self.feed_dst(i);
        }
        if self.silent_control {
            self.d2s.clear();
        }
        if let Some(bytes) = self.d2s.pop_front() {
            self.delivered_to_src += 1;
            let i = match wire::decode(&bytes) {
                Ok(f) => SrcInput::Frame(f),
                Err(e) => SrcInput::Malformed(e),
            };
            self.feed_src(i);
        }
        if !self.silent_data {
            for ch in 0..self.channels.len() {
                if let Some(w) = self.channels[ch].pop_front() {
                    self.land(w);
                }
            }
            // Completions arrive newest first: no order across queues (spec: section
            // "Transport").
            if let Some(wr_id) = self.completions.pop() {
                self.feed_src(SrcInput::WriteDone { wr_id });
            }
        }
        if self.check {
            self.check_invariants();
        }
    }

    fn guest_write(&mut self) {
        let b = (self.rng.next_u64() % self.dirty_log.len() as u64) as usize;
        let pages = self.src_mem[b].len() as u64 >> self.page_log2[b];
        let p = self.rng.next_u64() % pages;
        let ps = 1usize << self.page_log2[b];
        let v = self.rng.next_u64();
        let zero = self.guest.zero_one_in > 0 && v.is_multiple_of(self.guest.zero_one_in as u64);
        let page = &mut self.src_mem[b][p as usize * ps..(p as usize + 1) * ps];
        if zero {
            page.fill(0);
        } else {
            page[(v as usize >> 8) % ps] = v as u8 | 1;
            page[0] = page[0].wrapping_add(1);
        }
        self.dirty_log[b].set(p);
        self.report.guest_writes += 1;
    }

    fn land(&mut self, w: WriteCmd) {
        // The NIC's check (spec: INV-REG-1): the key must be registered and the range inside.
        match self.nic.place(w.rkey, w.remote_offset, w.len) {
            Ok((lb, at)) => {
                let src =
                    &self.src_mem[w.block as usize][w.offset as usize..(w.offset + w.len) as usize];
                let at = at as usize;
                self.dst_mem[lb as usize][at..at + w.len as usize].copy_from_slice(src);
            }
            Err(env::Refusal::UnknownKey) => assert!(
                self.dst.outcome().is_some(),
                "INV-REG-1: write to unregistered key {:#x} while the destination is live",
                w.rkey
            ),
            Err(env::Refusal::OutOfBounds) => panic!("INV-REG-1: write beyond its registration"),
        }
        self.completions.push(w.wr_id);
    }

    fn check_invariants(&self) {
        // spec: INV-FC-1: frames queued towards a side never exceed its posted receive buffers.
        assert!(
            self.s2d.len() <= self.dst.credits().window as usize,
            "INV-FC-1: destination overrun"
        );
        assert!(
            self.d2s.len() <= self.src.credits().window as usize,
            "INV-FC-1: source overrun"
        );
        assert!(
            self.dst.registered_bytes() <= self.dst.pin_budget(),
            "INV-PIN-1: pin budget exceeded"
        );
        assert!(
            !(self.src_running && self.dst_running),
            "INV-OWN-1: both workloads running"
        );
    }

    fn feed_src(&mut self, i: SrcInput) {
        if let SrcInput::Frame(_) = &i {
            self.report.control_frames += 1;
        }
        let mut out = rdmig_model::SrcOut {
            cmds: Vec::new(),
            stats: std::mem::take(&mut self.src_stats),
        };
        self.src.handle(self.now, i, &mut out);
        self.src_stats = out.stats;
        for c in out.cmds {
            self.exec_src(c);
        }
    }

    fn feed_dst(&mut self, i: DstInput) {
        if let DstInput::Frame(_) = &i {
            self.report.control_frames += 1;
        }
        let mut out = rdmig_model::DstOut {
            cmds: Vec::new(),
            stats: std::mem::take(&mut self.dst_stats),
        };
        self.dst.handle(self.now, i, &mut out);
        self.dst_stats = out.stats;
        for c in out.cmds {
            self.exec_dst(c);
        }
    }

    fn encode(&mut self, f: &Frame) -> Vec<u8> {
        let b = wire::encode_to_vec(f).expect("machines send only valid frames");
        self.report.control_bytes += b.len() as u64;
        b
    }

    fn exec_src(&mut self, c: SrcCommand) {
        match c {
            SrcCommand::Send(f) => {
                // spec: SW-6, LIVE-6: COMMIT leaves only once nothing may resume the workload.
                assert!(
                    f.msg != Message::Commit || self.relinquished,
                    "COMMIT sent before RelinquishWorkload"
                );
                let b = self.encode(&f);
                self.source_stream.push(b.clone());
                self.s2d.push_back(b);
            }
            SrcCommand::OpenData { hello } => {
                // spec: AUTH-6: the destination machine admits the channel or refuses it.
                match self.dst.admit_data(&hello) {
                    Ok(channel) => self.src_inputs.push_back(SrcInput::DataOpened { channel }),
                    Err(_) => self.src_inputs.push_back(SrcInput::TransportFailed),
                }
            }
            SrcCommand::PostWrite(w) => self.channels[w.channel as usize].push_back(w),
            SrcCommand::ScanDirty { all } => {
                let mem = ByteMem {
                    mem: &self.src_mem,
                    page_log2: &self.page_log2,
                };
                let scan = env::scan(&mem, &mut self.dirty_log, all);
                self.src_inputs.push_back(SrcInput::Dirty(scan));
            }
            SrcCommand::PauseWorkload => {
                self.src_running = false;
                self.snapshot = Some(self.src_mem.clone());
                self.src_inputs.push_back(SrcInput::WorkloadPaused);
            }
            SrcCommand::ResumeWorkload => self.src_running = true,
            SrcCommand::RelinquishWorkload => self.relinquished = true,
            SrcCommand::CaptureDeviceState { area: 0 } => self
                .src_inputs
                .push_back(SrcInput::DeviceState(self.device_state.clone())),
            SrcCommand::CaptureDeviceState { area } => {
                // spec: STATE-3: produced in two steps, the first half before the rest.
                assert_eq!(area, self.state_area, "the negotiated state area");
                let n = self.device_state.len();
                let sb = self.dirty_log.len();
                self.src_mem[sb][..n].copy_from_slice(&self.device_state);
                let digest = rdmig_model::digest::chunk_digest(&self.device_state);
                self.src_inputs
                    .push_back(SrcInput::StateProduced { len: n as u64 / 2 });
                self.src_inputs.push_back(SrcInput::StateDone {
                    len: n as u64,
                    digest,
                });
            }
            SrcCommand::ComputeDigests => {
                let p = self.src.params();
                let d = self.digests(&self.src_mem, p.digest, p.chunk_log2);
                self.src_inputs.push_back(SrcInput::Digests(d));
            }
            SrcCommand::Finish(_) => {}
        }
    }

    fn exec_dst(&mut self, c: DstCommand) {
        match c {
            DstCommand::Send(f) => {
                let b = self.encode(&f);
                self.dest_stream.push(b.clone());
                self.d2s.push_back(b);
            }
            DstCommand::Register {
                target,
                block,
                offset,
                len,
            } => {
                assert!(
                    offset + len <= self.dst_mem[block as usize].len() as u64,
                    "registration outside its block"
                );
                let rkey = self.nic.register(block, offset, len);
                self.dst_inputs
                    .push_back(DstInput::Registered { target, rkey });
            }
            DstCommand::Unregister { rkey, .. } => {
                assert!(self.nic.unregister(rkey), "unregister of an unknown key");
            }
            DstCommand::ZeroFill { block, offset, len } => {
                self.dst_mem[block as usize][offset as usize..(offset + len) as usize].fill(0)
            }
            DstCommand::StoreDeviceState { offset, data } => {
                assert_eq!(offset as usize, self.received_state.len());
                self.received_state.extend_from_slice(&data);
            }
            DstCommand::FeedState { upto } => {
                let area = self.dst_mem.last().expect("a state area");
                let from = self.received_state.len();
                assert!(upto as usize > from && upto <= self.state_area, "STATE-4");
                self.received_state
                    .extend_from_slice(&area[from..upto as usize]);
            }
            DstCommand::FinishState { len } => {
                assert_eq!(len as usize, self.received_state.len(), "STATE-4");
                let digest = rdmig_model::digest::chunk_digest(&self.received_state);
                self.dst_inputs.push_back(DstInput::StateLoaded { digest });
            }
            DstCommand::ComputeDigests => {
                let p = self.dst.params().expect("negotiated");
                let d = self.digests(&self.dst_mem, p.digest, p.chunk_log2);
                self.dst_inputs.push_back(DstInput::Digests(d));
            }
            DstCommand::StartWorkload => {
                // spec: INV-MEM-1
                let snap = self
                    .snapshot
                    .as_ref()
                    .expect("INV-OWN-1: destination starts before the source paused");
                let equal = self
                    .dst_order
                    .iter()
                    .enumerate()
                    .all(|(d, &s)| snap[s] == self.dst_mem[d]);
                self.report.memory_equal_at_start =
                    Some(equal && self.received_state == self.device_state);
                assert!(
                    self.nic.is_empty(),
                    "SW-8: memory still registered at start"
                );
                self.dst_running = true;
                self.dst_inputs.push_back(DstInput::WorkloadStarted);
            }
            DstCommand::Finish(_) => {}
        }
    }

    pub fn source_running(&self) -> bool {
        self.src_running
    }
    pub fn destination_running(&self) -> bool {
        self.dst_running
    }
    pub fn destination_phase(&self) -> DstPhase {
        self.dst.phase()
    }
}
