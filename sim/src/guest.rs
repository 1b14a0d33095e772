//! The guest: memory as a version number per page, and a workload that dirties it.
//!
//! Page bytes are never stored. A page's content is a u32 version: 0 means all-zero bytes,
//! any other value a distinct non-zero content. A write of the guest assigns a fresh version,
//! an RDMA write copies versions, and a digest hashes the versions' bytes, so the machines'
//! verification works exactly as it would on real memory while a 64 GiB guest costs
//! 64 MiB of simulator memory.

use std::str::FromStr;

use rdmig_check::env::{HashCompare, HashLog};
use rdmig_model::wire::BlockDesc;
use rdmig_model::{DirtyScan, PageBitmap};
use serde::Serialize;

use crate::bits::Bits;
use crate::rng::Rng;

/// Content of destination memory before anything arrives: distinct from every version the
/// guest produces, so a page the migration forgets never compares equal by accident.
pub const GARBAGE: u32 = u32::MAX;

/// Content of a page of the source's state buffer before the VMM produced it: distinct from
/// every version the device state's pages take, so a write that reads a page too early
/// carries a stale version and is caught (spec: STATE-3).
pub const UNPRODUCED: u32 = GARBAGE - 1;

/// The state area's page size, as log2 of bytes (spec: STATE-2).
pub const STATE_PAGE_LOG2: u8 = rdmig_model::wire::STATE_PAGE_LOG2;

/// Largest device state the simulator streams into a state area. Its pages cost 4 bytes
/// each on either side, so 16 GiB of device state is 16 MiB of simulator memory per side.
pub const MAX_STATE_AREA_BYTES: u64 = 16 << 30;

/// Where the guest's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Pattern {
    /// Every page equally likely.
    Uniform,
    /// `hit_ppm` of writes go to a hot set of `fraction_ppm` of memory, the rest anywhere.
    Hot { fraction_ppm: u32, hit_ppm: u32 },
    /// A cursor sweeps memory page by page, wrapping around.
    Sequential,
    /// `on_ms` of writing at the rate scaled by (on+off)/on, then `off_ms` of silence: the
    /// same average rate, delivered in bursts.
    Burst { on_ms: u32, off_ms: u32 },
}

impl FromStr for Pattern {
    type Err = String;
    /// `uniform`, `hot:F[:P]` (F of memory gets P of writes, default 0.9), `seq`,
    /// `burst:ON_MS:OFF_MS`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let frac = |v: &str| -> Result<u32, String> {
            let x: f64 = v.parse().map_err(|_| format!("{v:?} is not a fraction"))?;
            if (0.0..=1.0).contains(&x) {
                Ok((x * 1e6).round() as u32)
            } else {
                Err(format!("{v:?} must be within 0..=1"))
            }
        };
        match parts.as_slice() {
            ["uniform"] => Ok(Pattern::Uniform),
            ["seq"] | ["sequential"] => Ok(Pattern::Sequential),
            ["hot", f] => Ok(Pattern::Hot {
                fraction_ppm: frac(f)?.max(1),
                hit_ppm: 900_000,
            }),
            ["hot", f, p] => Ok(Pattern::Hot {
                fraction_ppm: frac(f)?.max(1),
                hit_ppm: frac(p)?,
            }),
            ["burst", on, off] => {
                let on: u32 = on.parse().map_err(|_| "burst:ON_MS:OFF_MS".to_string())?;
                let off: u32 = off.parse().map_err(|_| "burst:ON_MS:OFF_MS".to_string())?;
                if on == 0 {
                    return Err("burst on time must be positive".into());
                }
                Ok(Pattern::Burst {
                    on_ms: on,
                    off_ms: off,
                })
            }
            _ => Err(format!(
                "pattern {s:?}: expected uniform, hot:F[:P], seq or burst:ON_MS:OFF_MS"
            )),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Uniform => write!(f, "uniform"),
            Pattern::Sequential => write!(f, "seq"),
            Pattern::Hot {
                fraction_ppm,
                hit_ppm,
            } => write!(
                f,
                "hot:{}:{}",
                *fraction_ppm as f64 / 1e6,
                *hit_ppm as f64 / 1e6
            ),
            Pattern::Burst { on_ms, off_ms } => write!(f, "burst:{on_ms}:{off_ms}"),
        }
    }
}

/// What the content-hash dirty log (`hash_scan`) compares a page's current content against:
/// a page is dirty when it differs.
///
/// Two contents are at stake. What this log saw at its previous scan: the source relies on
/// every page that changed since then being reported (at switchover it merges the scan that
/// converged into the final one, keeping the earlier scan's zero pages that the final scan
/// does not report). And what the destination holds once every transfer posted so far is
/// placed: the bytes each write read from memory, and zeros for each ZERO range; a page that
/// changed after its write read it must be sent again, whatever it held at the previous scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanBase {
    /// Both: dirty when the page differs from the previous scan or from what the
    /// destination holds.
    #[default]
    Held,
    /// The previous scan only. A page that changes after the scan, is sent with the new
    /// content, and changes back before the next scan (a lock taken and released, a counter
    /// up and down) compares equal there: the destination keeps the intermediate content
    /// (an ABA).
    LastScan,
    /// What the destination holds only. The scan that converges may run beside the round's
    /// last writes (RND-3) and find a page zero; if the page is then written and one of those
    /// writes reads the new content, the final scan finds the page equal to what was sent and
    /// does not report it, while the switchover merge keeps the earlier scan's zero: the
    /// final round sends zeros over it.
    HeldOnly,
}

impl ScanBase {
    /// The comparison of the environment the model checker uses too.
    pub fn compare(self) -> HashCompare {
        match self {
            ScanBase::Held => HashCompare::Both,
            ScanBase::LastScan => HashCompare::LastScanOnly,
            ScanBase::HeldOnly => HashCompare::SentOnly,
        }
    }
}

impl FromStr for ScanBase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "held" => Ok(ScanBase::Held),
            "last-scan" => Ok(ScanBase::LastScan),
            "held-only" => Ok(ScanBase::HeldOnly),
            _ => Err(format!(
                "scan base {s:?}: expected held, last-scan or held-only"
            )),
        }
    }
}

impl std::fmt::Display for ScanBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScanBase::Held => "held",
            ScanBase::LastScan => "last-scan",
            ScanBase::HeldOnly => "held-only",
        })
    }
}

/// The guest being migrated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestConfig {
    pub ram_bytes: u64,
    pub page_log2: u8,
    /// RAM blocks the memory is split into (1..=64); the first is the bulk of RAM.
    pub blocks: u8,
    pub dirty_bytes_per_s: u64,
    pub pattern: Pattern,
    /// Fraction of pages that start all-zero (in runs, as free memory is).
    pub zero_ppm: u32,
    /// Fraction of guest writes that leave a page all-zero (freed memory).
    pub zero_write_ppm: u32,
    /// Fraction of guest writes that put a page back to the content it had before its last
    /// write (a lock word released, a counter decremented).
    pub revert_write_ppm: u32,
    /// The device state handed over at switchover: at most 64 MiB on the control channel,
    /// up to `MAX_STATE_AREA_BYTES` with `state_area`.
    pub device_state_bytes: u64,
    /// The device state travels over the data channels into a state area at the
    /// destination (spec: STATE-1) instead of in DEVICE_STATE frames.
    pub state_area: bool,
    /// With `state_area`: the rate at which the VMM writes its device state into the
    /// source's state buffer, bytes per second, after `capture_ns`; 0 = all of it at once
    /// `capture_ns` after the request.
    pub state_save_bytes_per_s: u64,
    /// With `state_area`: the rate at which the destination's consumer (the VMM loading
    /// its devices) takes the device state as it is placed, bytes per second; 0 = at once.
    pub state_load_bytes_per_s: u64,
    /// Virtual time between two batches of guest writes.
    pub tick_ns: u64,
    /// Time from a pause request to stopped vCPUs, and from a start request to running ones.
    pub pause_ns: u64,
    pub start_ns: u64,
    /// Time to capture device state (with `state_area`: until the first bytes of it are in
    /// the state buffer).
    pub capture_ns: u64,
    /// The destination's memory was pre-faulted (e.g. -mem-prealloc), so pinning it and
    /// receiving into it costs no first-touch faults.
    pub dst_pretouched: bool,
    /// The dirty log is content hashing (`rdmig send --dirty-log scan`): every scan after the
    /// first reads all of memory, and TCP sends hash what they carry. Otherwise a bitmap or
    /// soft-dirty log, whose scans cost little.
    pub hash_scan: bool,
    /// What the content-hash log compares against (with `hash_scan` only).
    pub scan_base: ScanBase,
    /// The pause lands inside a write, between its data and the mark after it (a writer
    /// stopped with SIGSTOP at any instruction; spec section 11).
    pub stop_mid_write: bool,
    /// The writer marks a page before its data as well as after (what a writer that can be
    /// stopped mid-write must do), so a write the pause interrupts stays in the log.
    pub marks_before: bool,
}

impl GuestConfig {
    pub fn new(ram_bytes: u64) -> GuestConfig {
        GuestConfig {
            ram_bytes,
            page_log2: 12,
            blocks: 1,
            dirty_bytes_per_s: 0,
            pattern: Pattern::Uniform,
            zero_ppm: 100_000,
            zero_write_ppm: 0,
            revert_write_ppm: 0,
            device_state_bytes: 256 << 10,
            state_area: false,
            state_save_bytes_per_s: 0,
            state_load_bytes_per_s: 0,
            tick_ns: 1_000_000,
            pause_ns: 200_000,
            start_ns: 200_000,
            capture_ns: 1_000_000,
            dst_pretouched: false,
            hash_scan: false,
            scan_base: ScanBase::Held,
            stop_mid_write: false,
            marks_before: true,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let page = 1u64 << self.page_log2;
        if !(12..=30).contains(&self.page_log2) {
            return Err("page size must be 4 KiB ..= 1 GiB".into());
        }
        if self.ram_bytes < page * self.blocks as u64 || !self.ram_bytes.is_multiple_of(page) {
            return Err(
                "RAM must be a positive multiple of the page size, a page per block".into(),
            );
        }
        if self.ram_bytes >> self.page_log2 > (u32::MAX / 2) as u64 {
            return Err("too many pages for the simulator's u32 page versions".into());
        }
        if self.blocks == 0 || self.blocks as usize > rdmig_model::wire::MAX_BLOCKS {
            return Err("blocks must be 1..=64".into());
        }
        if self.state_area {
            if self.device_state_bytes == 0 || self.device_state_bytes > MAX_STATE_AREA_BYTES {
                return Err("device state over the data channels must be 1 byte ..= 16 GiB".into());
            }
        } else if self.device_state_bytes == 0
            || self.device_state_bytes > rdmig_model::wire::MAX_DEVICE_STATE as u64
        {
            return Err("device state must be 1 byte ..= 64 MiB (more needs a state area)".into());
        }
        if self.tick_ns == 0 {
            return Err("tick must be positive".into());
        }
        if self.zero_ppm > 1_000_000
            || self.zero_write_ppm > 1_000_000
            || self.revert_write_ppm > 1_000_000
        {
            return Err("fractions must be within 0..=1".into());
        }
        Ok(())
    }

    /// The block table: the first block holds most of RAM; further blocks get random page
    /// multiples of up to a quarter of RAM divided among them (so chunks at block ends are
    /// short, as with real VGA and ROM blocks).
    pub fn layout(&self, rng: &mut Rng) -> Vec<BlockDesc> {
        const NAMES: [&str; 8] = [
            "pc.ram",
            "vga.vram",
            "pc.bios",
            "virtio-mem0",
            "ram-node1",
            "nvdimm:0",
            "rom/etc.acpi",
            "ram.x",
        ];
        let pages = self.ram_bytes >> self.page_log2;
        let n = self.blocks as u64;
        let mut sizes = vec![0u64; n as usize];
        let cap = (pages / (4 * n)).max(1);
        let mut rest = pages;
        for s in sizes.iter_mut().skip(1) {
            *s = rng.between(1, cap).min(rest - 1);
            rest -= *s;
        }
        sizes[0] = rest;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &p)| BlockDesc {
                name: if i < NAMES.len() {
                    NAMES[i].as_bytes().to_vec()
                } else {
                    format!("ram{i}").into_bytes()
                },
                length: p << self.page_log2,
                page_log2: self.page_log2,
            })
            .collect()
    }
}

/// Source memory, its dirty log, and the workload that writes it.
#[derive(Debug, Clone)]
pub struct Guest {
    cfg: GuestConfig,
    rng: Rng,
    /// Page versions per block, in source block order.
    pub mem: Vec<Vec<u32>>,
    dirty: Vec<Bits>,
    /// Pages whose version is 0, kept current so a scan finds zero pages word by word.
    zero: Vec<Bits>,
    /// Per page, the version before its last write: what a reverting write restores. Empty
    /// without reverting writes.
    prev: Vec<Vec<u32>>,
    /// The content-hash log (with `hash_scan`): what its previous scan read and what the
    /// destination holds once every transfer posted so far is placed, per page.
    hash_log: Option<HashLog<u32>>,
    /// First global page of each block, and the total.
    first_page: Vec<u64>,
    total_pages: u64,
    next_version: u32,
    carry_bytes: u64,
    hot_start: u64,
    hot_pages: u64,
    cursor: u64,
    pub writes: u64,
}

impl Guest {
    pub fn new(cfg: &GuestConfig, blocks: &[BlockDesc], mut rng: Rng) -> Guest {
        let mut first_page = Vec::with_capacity(blocks.len());
        let mut total = 0;
        for b in blocks {
            first_page.push(total);
            total += b.length >> b.page_log2;
        }
        // Zero pages come in runs (free memory is contiguous): alternate non-zero and zero
        // runs whose mean lengths give the configured fraction.
        const ZERO_RUN_MEAN: u64 = 64;
        let z = cfg.zero_ppm as u64;
        let mut mem = Vec::with_capacity(blocks.len());
        let mut zero = Vec::with_capacity(blocks.len());
        let mut version: u32 = 1;
        let mut in_zero = rng.chance(cfg.zero_ppm);
        let mut run_left = 0u64;
        for b in blocks {
            let pages = b.length >> b.page_log2;
            let mut v = vec![0u32; pages as usize];
            let mut zb = Bits::new(pages);
            let mut p = 0u64;
            while p < pages {
                if run_left == 0 {
                    in_zero = !in_zero;
                    run_left = run_length(&mut rng, in_zero, z, ZERO_RUN_MEAN);
                    if run_left == 0 {
                        continue;
                    }
                }
                let n = run_left.min(pages - p);
                if in_zero {
                    zb.set_range(p, n);
                } else {
                    for x in &mut v[p as usize..(p + n) as usize] {
                        *x = version;
                        version += 1;
                    }
                }
                p += n;
                run_left -= n;
            }
            mem.push(v);
            zero.push(zb);
        }
        let (hot_start, hot_pages) = match cfg.pattern {
            Pattern::Hot { fraction_ppm, .. } => {
                let hp = (total * fraction_ppm as u64 / 1_000_000).clamp(1, total);
                (rng.below(total - hp + 1), hp)
            }
            _ => (0, total),
        };
        let prev = if cfg.revert_write_ppm > 0 {
            mem.clone()
        } else {
            Vec::new()
        };
        let hash_log = cfg
            .hash_scan
            .then(|| HashLog::new(cfg.scan_base.compare(), &mem, GARBAGE));
        Guest {
            dirty: blocks
                .iter()
                .map(|b| Bits::new(b.length >> b.page_log2))
                .collect(),
            zero,
            prev,
            hash_log,
            mem,
            first_page,
            total_pages: total,
            next_version: version.max(1),
            carry_bytes: 0,
            hot_start,
            hot_pages,
            cursor: 0,
            writes: 0,
            cfg: cfg.clone(),
            rng,
        }
    }

    /// Dirties memory for `dt_ns` of virtual time ending at `now_ns`; returns pages written.
    pub fn tick(&mut self, now_ns: u64, dt_ns: u64) -> u64 {
        let rate = match self.cfg.pattern {
            Pattern::Burst { on_ms, off_ms } => {
                let period = (on_ms as u64 + off_ms as u64) * 1_000_000;
                if now_ns % period < on_ms as u64 * 1_000_000 {
                    self.cfg.dirty_bytes_per_s * (on_ms as u64 + off_ms as u64) / on_ms as u64
                } else {
                    0
                }
            }
            _ => self.cfg.dirty_bytes_per_s,
        };
        let bytes = (rate as u128 * dt_ns as u128 / 1_000_000_000) as u64 + self.carry_bytes;
        let pages = bytes >> self.cfg.page_log2;
        self.carry_bytes = bytes - (pages << self.cfg.page_log2);
        for _ in 0..pages {
            let g = match self.cfg.pattern {
                Pattern::Uniform | Pattern::Burst { .. } => self.rng.below(self.total_pages),
                Pattern::Sequential => {
                    let g = self.cursor;
                    self.cursor = (self.cursor + 1) % self.total_pages;
                    g
                }
                Pattern::Hot { hit_ppm, .. } => {
                    if self.rng.chance(hit_ppm) {
                        self.hot_start + self.rng.below(self.hot_pages)
                    } else {
                        self.rng.below(self.total_pages)
                    }
                }
            };
            self.write_page(g);
        }
        pages
    }

    /// The write the pause interrupts (`stop_mid_write`): its data is stored, its mark after
    /// the data never happens; only a mark before the data (`marks_before`) logs it. The
    /// content hash log reads memory itself, so it sees the write either way.
    pub fn write_interrupted(&mut self) {
        let g = self.rng.below(self.total_pages);
        let b = self.first_page.partition_point(|&f| f <= g) - 1;
        let p = g - self.first_page[b];
        let logged = self.dirty[b].get(p);
        self.write_page(g);
        if !self.cfg.marks_before && !self.cfg.hash_scan && !logged {
            self.dirty[b].clear(p);
        }
    }

    fn write_page(&mut self, g: u64) {
        let b = self.first_page.partition_point(|&f| f <= g) - 1;
        let p = g - self.first_page[b];
        let i = p as usize;
        let old = self.mem[b][i];
        let v = if self.rng.chance(self.cfg.revert_write_ppm) {
            // Back to the content before the last write; the content left becomes the one
            // the next revert restores (a lock word toggling between free and taken).
            std::mem::replace(&mut self.prev[b][i], old)
        } else {
            if let Some(prev) = self.prev.get_mut(b) {
                prev[i] = old;
            }
            if self.rng.chance(self.cfg.zero_write_ppm) {
                0
            } else {
                let v = self.next_version;
                self.next_version += 1;
                assert!(
                    self.next_version < GARBAGE,
                    "page versions exhausted; simulate a shorter run"
                );
                v
            }
        };
        self.mem[b][i] = v;
        if v == 0 {
            self.zero[b].set(p);
        } else {
            self.zero[b].clear(p);
        }
        self.dirty[b].set(p);
        self.writes += 1;
    }

    /// A write read pages `[first, first + n)` of source block `b` from memory: the
    /// destination holds their current versions.
    pub fn sent(&mut self, b: usize, first: usize, n: usize) {
        if let Some(log) = self.hash_log.as_mut() {
            log.sent(b, first, &self.mem[b][first..first + n]);
        }
    }

    /// The source posted pages `[first, first + n)` of source block `b` as a ZERO range: the
    /// destination holds zeros there. A range outside the block is ignored (the destination
    /// refuses it).
    pub fn zeroed(&mut self, b: usize, first: u64, n: u64) {
        if let Some(log) = self.hash_log.as_mut() {
            log.zeroed(b, first, n);
        }
    }

    /// Fetches and clears the dirty log; with `all`, reports every page. With `hash_scan` the
    /// log is content comparison: a page is dirty when its version differs from what the
    /// log compares it with (`ScanBase`), whatever was written in between. The zero subset
    /// is the dirty pages whose version is 0.
    pub fn scan(&mut self, all: bool) -> DirtyScan {
        if let Some(log) = self.hash_log.as_mut() {
            // The writes' marks are not what this log reads.
            for d in &mut self.dirty {
                d.take();
            }
            return log.scan(&self.mem, all);
        }
        let mut dirty = Vec::with_capacity(self.dirty.len());
        let mut zero = Vec::with_capacity(self.dirty.len());
        for (log, z) in self.dirty.iter_mut().zip(&self.zero) {
            let mut d = log.take();
            if all {
                let n = d.len();
                d = PageBitmap::from_words(vec![!0; n.div_ceil(64) as usize], n)
                    .expect("word count matches length");
            }
            zero.push(z.and(&d));
            dirty.push(d);
        }
        DirtyScan { dirty, zero }
    }

    pub fn page_log2(&self) -> u8 {
        self.cfg.page_log2
    }

    /// The page size of source block `b`, as log2 of bytes: the guest's for RAM, 4 KiB for
    /// the state buffer that follows the RAM blocks (spec: STATE-2).
    pub fn block_page_log2(&self, b: usize) -> u8 {
        if b < self.mem.len() {
            self.cfg.page_log2
        } else {
            STATE_PAGE_LOG2
        }
    }

    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }
}

/// Length of the next run of zero (`zero`) or non-zero pages when `z_ppm` of pages are zero
/// and zero runs average `mean` pages: 0 for a kind that does not occur, unbounded for the
/// only kind that does.
fn run_length(rng: &mut Rng, zero: bool, z_ppm: u64, mean: u64) -> u64 {
    let mean = match (zero, z_ppm) {
        (true, 0) | (false, 1_000_000..) => return 0,
        (false, 0) | (true, 1_000_000..) => return u64::MAX,
        (true, _) => mean,
        (false, z) => (mean * (1_000_000 - z) / z).max(1),
    };
    rng.between(1, 2 * mean - 1)
}

/// xxh3 digests of every chunk of `mem` (blocks in the given order), computed over the
/// little-endian bytes of the page versions: what `ComputeDigests` answers.
pub fn digests(
    mem: &[Vec<u32>],
    alg: rdmig_model::wire::DigestAlg,
    page_log2: u8,
    chunk_log2: u8,
    scratch: &mut Vec<u8>,
) -> Vec<u64> {
    use rdmig_model::digest::{chunk_digest, tree_digest};
    let ppc = 1usize << (chunk_log2 - page_log2);
    let mut out = Vec::new();
    for b in mem {
        for c in b.chunks(ppc) {
            if alg == rdmig_model::wire::DigestAlg::Xxh3PageTree {
                // Each page stands for its version's 4 bytes.
                let pages: Vec<u64> = c.iter().map(|v| chunk_digest(&v.to_le_bytes())).collect();
                out.push(tree_digest(&pages));
                continue;
            }
            scratch.resize(c.len() * 4, 0);
            for (d, v) in scratch.chunks_exact_mut(4).zip(c) {
                d.copy_from_slice(&v.to_le_bytes());
            }
            out.push(chunk_digest(&scratch[..c.len() * 4]));
        }
    }
    out
}

/// XXH3-64 of page versions as bytes (each page its version's 4 little-endian bytes): the
/// digest of a device state held as page versions, the same encoding at the source
/// (`StateDone`) and at the destination's consumer (`StateLoaded`) (spec: STATE-5).
pub fn versions_digest(versions: &[u32]) -> u64 {
    let bytes: Vec<u8> = versions.iter().flat_map(|v| v.to_le_bytes()).collect();
    rdmig_model::digest::chunk_digest(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(cfg: &GuestConfig) -> Guest {
        let mut r = Rng::new(5);
        let blocks = cfg.layout(&mut r);
        Guest::new(cfg, &blocks, r)
    }

    #[test]
    fn zero_fraction_is_respected() {
        let mut c = GuestConfig::new(64 << 20);
        c.zero_ppm = 300_000;
        let g = guest(&c);
        let zeros: usize = g
            .mem
            .iter()
            .map(|b| b.iter().filter(|&&v| v == 0).count())
            .sum();
        let frac = zeros as f64 / g.total_pages() as f64;
        assert!((0.2..0.4).contains(&frac), "zero fraction {frac}");
        c.zero_ppm = 0;
        assert!(guest(&c).mem.iter().all(|b| b.iter().all(|&v| v != 0)));
        c.zero_ppm = 1_000_000;
        assert!(guest(&c).mem.iter().all(|b| b.iter().all(|&v| v == 0)));
    }

    #[test]
    fn tick_dirties_at_rate_and_scan_clears() {
        let mut c = GuestConfig::new(64 << 20);
        c.dirty_bytes_per_s = 100_000_000;
        c.blocks = 3;
        let mut g = guest(&c);
        let mut n = 0;
        for i in 1..=10 {
            n += g.tick(i * 1_000_000, 1_000_000);
        }
        // 100 MB/s for 10 ms = 1 MB = 244 pages.
        assert_eq!(n, 244);
        let s = g.scan(false);
        let dirty: u64 = s.dirty.iter().map(|d| d.count_ones()).sum();
        assert!(dirty > 200 && dirty <= 244);
        let s2 = g.scan(false);
        assert_eq!(s2.dirty.iter().map(|d| d.count_ones()).sum::<u64>(), 0);
        let all = g.scan(true);
        assert_eq!(
            all.dirty.iter().map(|d| d.count_ones()).sum::<u64>(),
            g.total_pages()
        );
    }

    /// The ABA at the level of the log: scanned at A, written B, B sent, written back to A.
    /// Compared with the previous scan the page is clean (and lost); compared with what the
    /// destination holds it is dirty.
    #[test]
    fn hash_scan_sees_a_page_changed_back_after_it_was_sent_only_against_held() {
        let aba = |base: ScanBase| {
            let mut c = GuestConfig::new(1 << 20);
            c.zero_ppm = 0;
            c.hash_scan = true;
            c.scan_base = base;
            c.revert_write_ppm = 1;
            let mut g = guest(&c);
            g.cfg.revert_write_ppm = 0;
            let a = g.mem[0][5];
            let all = g.scan(true);
            g.sent(0, 0, all.dirty[0].len() as usize);
            assert_eq!(g.scan(false).dirty[0].count_ones(), 0);
            // Reported by the scan, the page is written before its write reads it.
            g.write_page(5);
            let b = g.mem[0][5];
            assert_ne!(a, b);
            g.sent(0, 5, 1);
            g.cfg.revert_write_ppm = 1_000_000;
            g.write_page(5);
            assert_eq!(
                g.mem[0][5], a,
                "a revert restores the content before the write"
            );
            assert_eq!(
                g.prev[0][5], b,
                "and the next revert restores the reverted-from one"
            );
            g.scan(false).dirty[0].count_ones()
        };
        assert_eq!(aba(ScanBase::LastScan), 0);
        assert_eq!(aba(ScanBase::Held), 1);
        assert_eq!(aba(ScanBase::HeldOnly), 1);
    }

    /// Scanned zero, written, and read by a write that lands after that: the page equals what
    /// the destination holds but changed since the previous scan, which reported it zero.
    /// Only a log that compares with the previous scan too reports it again.
    #[test]
    fn hash_scan_reports_a_page_changed_since_the_previous_scan_unless_held_only() {
        let changed = |base: ScanBase| {
            let mut c = GuestConfig::new(1 << 20);
            c.zero_ppm = 0;
            c.hash_scan = true;
            c.scan_base = base;
            let mut g = guest(&c);
            let all = g.scan(true);
            g.sent(0, 0, all.dirty[0].len() as usize);
            g.cfg.zero_write_ppm = 1_000_000;
            g.write_page(3);
            let s = g.scan(false);
            assert!(s.dirty[0].get(3) && s.zero[0].get(3));
            g.cfg.zero_write_ppm = 0;
            g.write_page(3);
            g.sent(0, 3, 1);
            g.scan(false).dirty[0].get(3)
        };
        assert!(changed(ScanBase::Held));
        assert!(changed(ScanBase::LastScan));
        assert!(!changed(ScanBase::HeldOnly));
    }

    /// Reverts keep the zero map current, and a ZERO range makes zeros the held content.
    #[test]
    fn reverting_to_zero_is_a_zero_page_and_zero_ranges_are_held() {
        let mut c = GuestConfig::new(1 << 20);
        c.zero_ppm = 0;
        c.hash_scan = true;
        c.revert_write_ppm = 1;
        let mut g = guest(&c);
        g.cfg.revert_write_ppm = 0;
        g.cfg.zero_write_ppm = 1_000_000;
        g.write_page(9);
        assert_eq!(g.mem[0][9], 0);
        g.cfg.zero_write_ppm = 0;
        g.write_page(9);
        let s = g.scan(false);
        assert!(s.dirty[0].get(9) && !s.zero[0].get(9));
        g.cfg.revert_write_ppm = 1_000_000;
        g.write_page(9);
        assert_eq!(g.mem[0][9], 0);
        let s = g.scan(false);
        assert!(s.zero[0].get(9), "a page reverted to zero is reported zero");
        g.zeroed(0, 9, 1);
        assert!(!g.scan(false).dirty[0].get(9), "the ZERO range sent it");
        // Beyond the block: refused by the destination, ignored here.
        g.zeroed(0, g.total_pages() - 1, 2);
    }

    #[test]
    fn patterns_parse() {
        assert_eq!("uniform".parse::<Pattern>().unwrap(), Pattern::Uniform);
        assert_eq!(
            "hot:0.1".parse::<Pattern>().unwrap(),
            Pattern::Hot {
                fraction_ppm: 100_000,
                hit_ppm: 900_000
            }
        );
        assert_eq!(
            "burst:10:90".parse::<Pattern>().unwrap(),
            Pattern::Burst {
                on_ms: 10,
                off_ms: 90
            }
        );
        assert!("hot:2".parse::<Pattern>().is_err());
        let p: Pattern = "hot:0.25:0.5".parse().unwrap();
        assert_eq!(p.to_string().parse::<Pattern>().unwrap(), p);
    }
}
