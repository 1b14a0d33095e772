//! Everything one run depends on. A run is a pure function of its `SimConfig`, and a swarm
//! configuration is a pure function of the seed and the base it varies.

use serde::Serialize;

use crate::faults::{FaultConfig, FaultKind};
use crate::guest::{GuestConfig, Pattern, ScanBase};
use crate::profile::{ns, Profile};
use crate::rng::Rng;

/// Protocol knobs: what the two machines are configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationConfig {
    /// Register every block at setup instead of chunks on demand (spec: REG-1).
    pub pin_all: bool,
    pub chunk_log2: u8,
    /// Data channels the source proposes; `None` takes the profile's.
    pub channels: Option<u8>,
    /// Writes in flight per channel; `None` takes the profile's send-queue depth.
    pub writes_per_channel: Option<u16>,
    pub reg_batch: u16,
    pub max_reg_inflight: u8,
    pub src_credit_window: u16,
    pub dst_credit_window: u16,
    /// The destination's own maxima, to which it narrows the proposal (spec: HS-3).
    pub dst_max_channels: u8,
    pub dst_max_reg_inflight: u8,
    pub downtime_limit_ms: u64,
    pub max_rounds: u32,
    /// At the round limit: abort (NotConverged) instead of switching over (spec: CONV-2).
    pub on_limit_abort: bool,
    pub idle_timeout_ms: u64,
    pub keepalive_ms: u64,
    pub zero_elision: bool,
    pub verify_digests: bool,
    pub authenticate: bool,
    /// The destination's pin budget; `None` means all of RAM (no eviction).
    pub pin_budget: Option<u64>,
    /// The destination lists its blocks in another order than the source (spec: BLK-2).
    pub permute_dst_blocks: bool,
    /// With a state area: the destination's capacity for it (whole 4 KiB pages); `None`
    /// offers what the source proposes (the device state rounded up to pages). Below the
    /// device state, the source aborts at capture and resumes (spec: STATE-1, STATE-3).
    pub state_capacity: Option<u64>,
}

impl Default for MigrationConfig {
    /// The machines' own defaults (`SourceConfig::with_defaults`), dynamic registration with
    /// 1 MiB chunks.
    fn default() -> Self {
        MigrationConfig {
            pin_all: false,
            chunk_log2: 20,
            channels: None,
            writes_per_channel: None,
            reg_batch: 64,
            max_reg_inflight: 4,
            src_credit_window: 64,
            dst_credit_window: 64,
            dst_max_channels: rdmig_model::wire::MAX_CHANNELS,
            dst_max_reg_inflight: rdmig_model::wire::MAX_REG_INFLIGHT,
            downtime_limit_ms: 300,
            max_rounds: 30,
            on_limit_abort: false,
            idle_timeout_ms: 30_000,
            keepalive_ms: 5_000,
            zero_elision: true,
            verify_digests: true,
            authenticate: true,
            pin_budget: None,
            permute_dst_blocks: false,
            state_capacity: None,
        }
    }
}

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimConfig {
    pub seed: u64,
    pub profile: Profile,
    pub guest: GuestConfig,
    pub migration: MigrationConfig,
    pub faults: FaultConfig,
    /// Trace records kept for a failure report.
    pub trace_tail: usize,
    /// Hard bound on events, so a livelock ends as a reported failure.
    pub max_events: u64,
    /// Drawn by `swarm` (the replay command needs `--swarm`).
    pub swarm: bool,
}

/// Independent generators forked, in a fixed order, from the one seeded generator.
pub struct Streams {
    pub config: Rng,
    pub guest: Rng,
    pub faults: Rng,
    pub keys: Rng,
}

impl Streams {
    pub fn new(seed: u64) -> Streams {
        let mut master = Rng::new(seed);
        Streams {
            config: master.fork(),
            guest: master.fork(),
            faults: master.fork(),
            keys: master.fork(),
        }
    }
}

impl SimConfig {
    pub fn new(seed: u64, profile: Profile, guest: GuestConfig) -> SimConfig {
        SimConfig {
            seed,
            profile,
            guest,
            migration: MigrationConfig::default(),
            faults: FaultConfig::none(),
            trace_tail: 48,
            max_events: 500_000_000,
            swarm: false,
        }
    }

    pub fn channels(&self) -> u8 {
        self.migration.channels.unwrap_or(self.profile.channels)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.profile.validate()?;
        self.guest.validate()?;
        let m = &self.migration;
        if m.chunk_log2 < self.guest.page_log2 || m.chunk_log2 > 30 {
            return Err("chunk size must be between the page size and 1 GiB".into());
        }
        let state_chunks = self.state_area_bytes().div_ceil(1 << m.chunk_log2);
        if (self.guest.ram_bytes >> m.chunk_log2) + state_chunks > rdmig_model::MAX_TOTAL_CHUNKS {
            return Err("too many chunks: raise the chunk size".into());
        }
        if let Some(cap) = m.state_capacity {
            if !self.guest.state_area {
                return Err("a state capacity needs the state area".into());
            }
            let page = 1u64 << crate::guest::STATE_PAGE_LOG2;
            if cap == 0 || !cap.is_multiple_of(page) || cap > rdmig_model::wire::MAX_STATE_AREA {
                return Err("the state capacity must be whole 4 KiB pages, 4 KiB ..= 1 TiB".into());
            }
        }
        Ok(())
    }

    /// The state area the source proposes (`state_max`): the device state rounded up to whole
    /// 4 KiB pages; 0 without a state area (spec: STATE-1).
    pub fn state_max(&self) -> u64 {
        if !self.guest.state_area {
            return 0;
        }
        let page = 1u64 << crate::guest::STATE_PAGE_LOG2;
        self.guest.device_state_bytes.div_ceil(page) * page
    }

    /// The destination's capacity for a state area (`state_capacity`); 0 without one.
    pub fn state_capacity(&self) -> u64 {
        if !self.guest.state_area {
            return 0;
        }
        self.migration.state_capacity.unwrap_or(self.state_max())
    }

    /// The state area the handshake settles on: the smaller of the two (spec: STATE-1).
    pub fn state_area_bytes(&self) -> u64 {
        self.state_max().min(self.state_capacity())
    }

    /// The destination's area is smaller than the device state: the source must abort when
    /// the VMM reports more than fits (spec: STATE-3).
    pub fn state_exceeds_area(&self) -> bool {
        self.guest.state_area && self.guest.device_state_bytes > self.state_area_bytes()
    }

    /// Rough fault-free duration: everything sent once at link rate plus registration; used
    /// to place the safety phase and bound the liveness phase.
    pub fn estimate_ns(&self) -> u64 {
        let c = self.profile.costs();
        let ram = self.guest.ram_bytes;
        let chunks = ram.div_ceil(1 << self.migration.chunk_log2);
        let per_chunk = c.reg_fixed_ns
            + ns(
                1 << self.migration.chunk_log2,
                c.reg_fs_per_byte + c.touch_fs_per_byte,
            );
        let cpu = ns(ram, c.send_fs_per_byte.max(c.recv_fs_per_byte)) / self.channels() as u64;
        let base = c.wire_ns(ram).max(cpu) + chunks * per_chunk / c.reg_threads as u64 + 5_000_000;
        base + self.state_estimate_ns()
    }

    /// What a state area adds to the estimate: capture, production, registration of its
    /// chunks, the transfer and the consumer, one after the other; 0 without one.
    fn state_estimate_ns(&self) -> u64 {
        let area = self.state_area_bytes();
        if area == 0 {
            return 0;
        }
        let c = self.profile.costs();
        let g = &self.guest;
        let at_rate = |bytes: u64, rate: u64| match rate {
            0 => 0,
            r => (bytes as u128 * 1_000_000_000 / r as u128) as u64,
        };
        let chunk = 1u64 << self.migration.chunk_log2;
        let per_chunk = c.reg_fixed_ns + ns(chunk, c.reg_fs_per_byte + c.touch_fs_per_byte);
        let cpu = ns(area, c.send_fs_per_byte.max(c.recv_fs_per_byte)) / self.channels() as u64;
        g.capture_ns
            + at_rate(g.device_state_bytes, g.state_save_bytes_per_s)
            + at_rate(g.device_state_bytes, g.state_load_bytes_per_s)
            + area.div_ceil(chunk) * per_chunk / c.reg_threads as u64
            + c.wire_ns(area).max(cpu)
    }

    /// Virtual time after the safety phase within which every live side must have an
    /// outcome: the whole migration `max_rounds + 1` times over at a quarter of the
    /// estimated speed, plus three idle timeouts and the longest stall.
    pub fn liveness_bound_ns(&self) -> u64 {
        let rounds = self.migration.max_rounds as u64 + 1;
        rounds * 4 * self.estimate_ns()
            + 3 * self.migration.idle_timeout_ms * 1_000_000
            + self.faults.stall_max_ns
            + 1_000_000_000
    }

    /// The pin budget the destination announces; by default all of RAM and the state area
    /// (which pin-all registers whole, spec: STATE-2).
    pub fn pin_budget(&self) -> u64 {
        self.migration
            .pin_budget
            .unwrap_or(self.guest.ram_bytes + self.state_area_bytes())
    }

    /// Applies one kind's configuration-level effect (pin starvation), drawing the budget
    /// from `rng`.
    fn starve_pin_budget(&mut self, rng: &mut Rng) {
        let chunk = 1u64 << self.migration.chunk_log2;
        let ram = self.guest.ram_bytes;
        let all = ram + self.state_area_bytes();
        self.migration.pin_budget = Some(if self.migration.pin_all {
            all - rng.between(1, ram.min(chunk))
        } else {
            match rng.below(3) {
                0 => rng.between(1, chunk.min(ram) - 1).max(1),
                _ => rng.between(chunk, 3 * chunk).min(ram),
            }
        });
    }

    /// This configuration with faults of one kind only (the per-kind test scenarios).
    pub fn with_fault(mut self, kind: FaultKind) -> SimConfig {
        self.faults = FaultConfig::only(kind, self.estimate_ns());
        if kind == FaultKind::PinBudget {
            let mut rng = Streams::new(self.seed).config;
            self.starve_pin_budget(&mut rng);
        }
        self
    }

    /// This configuration with swarm-drawn faults.
    pub fn with_random_faults(mut self) -> SimConfig {
        let mut rng = Streams::new(self.seed).config;
        self.faults = FaultConfig::draw(&mut rng, self.estimate_ns());
        if self.faults.pin_starved {
            self.starve_pin_budget(&mut rng);
        }
        self
    }

    /// Swarm testing: protocol knobs, guest shape and faults all drawn from the seed, around
    /// the base's profile and RAM size.
    pub fn swarm(seed: u64, base: &SimConfig) -> SimConfig {
        let mut rng = Streams::new(seed).config;
        let mut c = base.clone();
        c.seed = seed;
        c.swarm = true;
        let g = &mut c.guest;
        g.blocks = rng.between(1, 4) as u8;
        g.page_log2 = if rng.chance(100_000) { 13 } else { 12 };
        let page = 1u64 << g.page_log2;
        g.ram_bytes = (base.guest.ram_bytes / 2 + rng.below(base.guest.ram_bytes)).max(page * 16)
            / page
            * page;
        g.zero_ppm = rng.pick(&[0, 50_000, 300_000, 900_000, 1_000_000]);
        g.zero_write_ppm = rng.pick(&[0, 0, 10_000, 300_000]);
        let goodput = c.profile.costs().goodput_bytes_per_s() as u64;
        g.dirty_bytes_per_s = rng.pick(&[0, goodput / 100, goodput / 10, goodput / 2, goodput * 2]);
        g.pattern = match rng.below(4) {
            0 => Pattern::Uniform,
            1 => Pattern::Hot {
                fraction_ppm: rng.between(1_000, 300_000) as u32,
                hit_ppm: rng.between(500_000, 1_000_000) as u32,
            },
            2 => Pattern::Sequential,
            _ => Pattern::Burst {
                on_ms: rng.between(1, 20) as u32,
                off_ms: rng.between(0, 50) as u32,
            },
        };
        g.device_state_bytes = rng.between(1, 200_000);
        g.dst_pretouched = rng.chance(500_000);
        let m = &mut c.migration;
        m.pin_all = rng.chance(200_000);
        m.chunk_log2 = rng.between(c.guest.page_log2.max(14) as u64, 21) as u8;
        m.channels = Some(rng.between(1, 4) as u8);
        m.writes_per_channel = Some(rng.pick(&[1, 2, 8, 64]));
        m.reg_batch = rng.pick(&[1, 4, 64, 1024]);
        m.max_reg_inflight = rng.between(1, 4) as u8;
        m.src_credit_window = rng.pick(&[4, 5, 8, 64]);
        m.dst_credit_window = rng.pick(&[4, 5, 8, 64]);
        m.dst_max_channels = rng.between(1, 16) as u8;
        m.dst_max_reg_inflight = rng.between(1, 16) as u8;
        m.downtime_limit_ms = rng.pick(&[1, 10, 100, 300]);
        m.max_rounds = rng.pick(&[1, 2, 5, 30]);
        m.on_limit_abort = rng.chance(300_000);
        m.idle_timeout_ms = rng.pick(&[200, 1_000, 5_000]);
        m.keepalive_ms = if rng.chance(100_000) {
            0
        } else {
            rng.between(5, m.idle_timeout_ms / 3)
        };
        m.zero_elision = rng.chance(750_000);
        m.verify_digests = rng.chance(750_000);
        m.authenticate = rng.chance(750_000);
        m.pin_budget = if rng.chance(500_000) || m.pin_all {
            None
        } else {
            let chunk = 1u64 << m.chunk_log2;
            Some(rng.between(chunk, c.guest.ram_bytes.max(chunk)))
        };
        m.permute_dst_blocks = rng.chance(500_000);
        c.faults = FaultConfig::draw(&mut rng, c.estimate_ns());
        if c.faults.pin_starved {
            c.starve_pin_budget(&mut rng);
        }
        // The dirty log's kind, and writes that undo the previous one (lock words, counters):
        // with content hashing, a page changed back after its write read it must still be
        // sent again.
        let g = &mut c.guest;
        g.revert_write_ppm = rng.pick(&[0, 0, 10_000, 300_000]);
        g.hash_scan = base.guest.hash_scan || rng.chance(300_000);
        g.scan_base = ScanBase::Held;
        c.draw_state_area(&mut rng, base);
        c
    }

    /// The device state over the data channels (spec: STATE-1 .. STATE-5), in a quarter of
    /// the seeds (all with a base that has it): a few KiB to several MiB, produced and
    /// consumed at drawn rates (slow ones keep it in flight for a while), now and then a
    /// destination whose area is too small; the faults' window grows by what the state
    /// takes, so they strike while it crosses. Drawn after everything else, so the draws
    /// above keep their values for every seed.
    fn draw_state_area(&mut self, rng: &mut Rng, base: &SimConfig) {
        let goodput = self.profile.costs().goodput_bytes_per_s() as u64;
        let g = &mut self.guest;
        g.state_area = base.guest.state_area || rng.chance(250_000);
        if !g.state_area {
            self.migration.state_capacity = None;
            return;
        }
        g.device_state_bytes = match rng.below(3) {
            0 => rng.between(1, 64 << 10),
            1 => rng.between(64 << 10, 1 << 20),
            _ => rng.between(1 << 20, 8 << 20),
        };
        g.state_save_bytes_per_s = rng.pick(&[0, goodput / 32, goodput / 4, goodput * 2]);
        g.state_load_bytes_per_s = rng.pick(&[0, goodput / 16, goodput * 4]);
        g.capture_ns = rng.pick(&[0, 100_000, 1_000_000, 5_000_000]);
        let max = self.state_max();
        self.migration.state_capacity = match rng.below(20) {
            // Smaller than the state: the source aborts at capture.
            0 if max > 4096 => Some(rng.between(1, max / 4096 - 1) * 4096),
            // Larger than proposed: the area is the proposal.
            1 => Some(max + rng.between(1, 16) * 4096),
            _ => None,
        };
        if self.migration.pin_all && self.migration.pin_budget.is_some() {
            // A starved pin-all budget stays short of RAM and area together.
            let short = (1u64 << self.migration.chunk_log2).min(self.guest.ram_bytes);
            self.migration.pin_budget =
                Some(self.guest.ram_bytes + self.state_area_bytes() - short);
        }
        if self.faults.any() {
            self.faults.safety_ns += rng.between(0, 2 * self.state_estimate_ns());
        }
    }
}
