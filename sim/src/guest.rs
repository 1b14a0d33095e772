//! The guest: memory as a version number per page, and a workload that dirties it.
//!
//! Page bytes are never stored. A page's content is a u32 version: 0 means all-zero bytes,
//! any other value a distinct non-zero content. A write of the guest assigns a fresh version,
//! an RDMA write copies versions, and a digest hashes the versions' bytes, so the machines'
//! verification works exactly as it would on real memory while a 64 GiB guest costs
//! 64 MiB of simulator memory.

use std::str::FromStr;

use rdmig_model::wire::BlockDesc;
use rdmig_model::{DirtyScan, PageBitmap};
use serde::Serialize;

use crate::bits::Bits;
use crate::rng::Rng;

/// Content of destination memory before anything arrives: distinct from every version the
/// guest produces, so a page the migration forgets never compares equal by accident.
pub const GARBAGE: u32 = u32::MAX;

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
    pub device_state_bytes: u32,
    /// Virtual time between two batches of guest writes.
    pub tick_ns: u64,
    /// Time from a pause request to stopped vCPUs, and from a start request to running ones.
    pub pause_ns: u64,
    pub start_ns: u64,
    /// Time to capture device state.
    pub capture_ns: u64,
    /// The destination's memory was pre-faulted (e.g. -mem-prealloc), so pinning it and
    /// receiving into it costs no first-touch faults.
    pub dst_pretouched: bool,
    /// The dirty log is content hashing (`rdmig send --dirty-log scan`): every scan reads all
    /// of memory. Otherwise a bitmap or soft-dirty log, whose scans cost little.
    pub hash_scan: bool,
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
            device_state_bytes: 256 << 10,
            tick_ns: 1_000_000,
            pause_ns: 200_000,
            start_ns: 200_000,
            capture_ns: 1_000_000,
            dst_pretouched: false,
            hash_scan: false,
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
        if self.device_state_bytes == 0
            || self.device_state_bytes > rdmig_model::wire::MAX_DEVICE_STATE
        {
            return Err("device state must be 1 byte ..= 64 MiB".into());
        }
        if self.tick_ns == 0 {
            return Err("tick must be positive".into());
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
        Guest {
            dirty: blocks
                .iter()
                .map(|b| Bits::new(b.length >> b.page_log2))
                .collect(),
            zero,
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
        let zero = self.rng.chance(self.cfg.zero_write_ppm);
        if zero {
            self.mem[b][p as usize] = 0;
            self.zero[b].set(p);
        } else {
            self.mem[b][p as usize] = self.next_version;
            self.zero[b].clear(p);
            self.next_version += 1;
            assert!(
                self.next_version < GARBAGE,
                "page versions exhausted; simulate a shorter run"
            );
        }
        self.dirty[b].set(p);
        self.writes += 1;
    }

    /// Fetches and clears the dirty log; with `all`, reports every page. Returns the scan and
    /// the number of zero pages in it.
    pub fn scan(&mut self, all: bool) -> DirtyScan {
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
