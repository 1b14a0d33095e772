//! Dirty-page tracking: which pages of the RAM blocks changed since the previous scan.
//!
//! rdmig does not write the memory it migrates, so it needs the writer's help or must look for
//! itself. `--dirty-log` picks one of four trackers ([`DirtyLogSpec`]):
//!
//! * `none`: nothing writes the memory while it migrates (a paused workload, a file). The first
//!   scan reports every page, later scans nothing.
//! * `bitmap:PATH`: the writer keeps a shared-memory log ([`crate::memory::mapped_bitmap`]); a scan
//!   fetches and clears it. Exact and cheap: the interface a VMM implements.
//! * `soft-dirty:PID`: the kernel's soft-dirty bits of the writing process (`/proc/PID/pagemap`
//!   bit 55, cleared by writing `4` to `/proc/PID/clear_refs`). Needs a kernel built with
//!   `CONFIG_MEM_SOFT_DIRTY`, checked when the tracker opens.
//! * `scan`: no help from the writer at all; rdmig keeps an xxh3-64 hash of every page and
//!   reports the pages whose hash differs from the bytes they were last sent with or from the
//!   previous scan (spec: section 11.2). Costs a full read of memory per scan after the first
//!   (see [`scan_rate`] for its throughput), so it suits small memories or low round counts;
//!   the transport hashes what it sends ([`crate::memory::sent_pages`]).
//!
//! Every scan also says which of the dirty pages read as all zeros, so the source can send a
//! zero marker instead of the page. That check reads each dirty page once more (the `scan`
//! tracker does it on the copy it already hashed), in parallel for large scans.
//!
//! Pages are read through private copies ([`RamBlock::read`]) because another process may be
//! writing them; a torn copy is harmless for the same reason as in [`crate::memory::ram`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use rdmig_model::{DirtyScan, PageBitmap};
use thiserror::Error;

use crate::memory::mapped_bitmap::{BitmapError, SharedBitmap};
use crate::memory::ram::{MemError, RamBlock};
use crate::memory::sent_pages::SentPages;

/// Where dirty pages come from (`--dirty-log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyLogSpec {
    /// Nothing writes the memory during the migration.
    None,
    /// A shared-memory dirty log file kept by the writer.
    Bitmap(PathBuf),
    /// The kernel's soft-dirty bits of this process.
    SoftDirty(u32),
    /// Compare page hashes between scans.
    Scan,
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DirtyError {
    #[error("dirty log {spec:?}: {why} (expected none, scan, bitmap:PATH or soft-dirty:PID)")]
    Spec { spec: String, why: &'static str },
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error(
        "soft-dirty tracking is not available: after clearing soft-dirty bits and writing a page, \
         /proc/self/pagemap bit 55 stayed 0, so this kernel is built without CONFIG_MEM_SOFT_DIRTY; \
         use --dirty-log bitmap:PATH or --dirty-log scan"
    )]
    SoftDirtyUnsupported,
    #[error("{path}: {source}")]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unexpected contents: {why}")]
    ProcFormat { path: PathBuf, why: &'static str },
    #[error(
        "soft-dirty: block {block} is not backed by a file, so it cannot be found in process {pid}"
    )]
    NoFile { block: String, pid: u32 },
    #[error(
        "soft-dirty: process {pid} does not map RAM file {path} shared over its whole length \
         ({len} bytes from offset {offset} are not in any shared mapping of it in /proc/{pid}/maps)"
    )]
    NotMapped {
        pid: u32,
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    #[error(transparent)]
    Mem(#[from] MemError),
}

impl FromStr for DirtyLogSpec {
    type Err = DirtyError;

    fn from_str(s: &str) -> Result<Self, DirtyError> {
        let bad = |why| DirtyError::Spec {
            spec: s.to_string(),
            why,
        };
        match s.split_once(':') {
            None if s == "none" => Ok(DirtyLogSpec::None),
            None if s == "scan" => Ok(DirtyLogSpec::Scan),
            None if s == "bitmap" => Err(bad("bitmap needs the log file: bitmap:PATH")),
            None if s == "soft-dirty" => Err(bad(
                "soft-dirty needs the writer's process id: soft-dirty:PID",
            )),
            Some(("bitmap", "")) => Err(bad("empty bitmap path")),
            Some(("bitmap", path)) => Ok(DirtyLogSpec::Bitmap(path.into())),
            Some(("soft-dirty", pid)) => match pid.parse::<u32>() {
                Ok(p) if p > 0 => Ok(DirtyLogSpec::SoftDirty(p)),
                _ => Err(bad("the process id must be a positive integer")),
            },
            Some(("none" | "scan", _)) => Err(bad("none and scan take no argument")),
            _ => Err(bad("unknown kind")),
        }
    }
}

/// Source of dirty pages for the source side's rounds.
pub trait DirtyTracker: Send {
    /// Fetches and clears the pages dirtied since the previous scan. With `all`, reports every
    /// page as dirty and resets the log (the first round, or a restart). The returned bitmaps
    /// have one entry per block, in block order; `zero` is the subset that read as zeros.
    fn scan(&mut self, all: bool) -> Result<DirtyScan, DirtyError>;
    /// One line for logs and reports.
    fn describe(&self) -> String;
    /// The xxh3-64 hash of every page as the last scan read it, per block, if this log
    /// hashes pages (spec: SW-4, `Xxh3PageTree`); after a scan of paused memory they are the
    /// hashes of memory as it is.
    fn page_hashes(&self) -> Option<Vec<Vec<u64>>> {
        None
    }
    /// The table of what was sent, for a log that compares memory with it (`scan`): every
    /// write's bytes must then be hashed into it as they are sent, and every posted ZERO
    /// range recorded (spec: SCAN-2).
    fn sent_pages(&self) -> Option<Arc<SentPages>> {
        None
    }
}

/// Opens the tracker `spec` names for `blocks` (in block-table order); large scans use up to
/// `threads` threads.
pub fn open_tracker(
    spec: &DirtyLogSpec,
    blocks: Vec<Arc<RamBlock>>,
    threads: usize,
) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    let threads = threads.clamp(1, 64);
    Ok(match spec {
        DirtyLogSpec::None => Box::new(NoneTracker {
            blocks,
            threads,
            first: true,
        }),
        DirtyLogSpec::Bitmap(path) => {
            let pages: Vec<u64> = blocks.iter().map(|b| b.pages()).collect();
            let log = SharedBitmap::open(path, &pages)?;
            Box::new(BitmapTracker {
                blocks,
                threads,
                log,
            })
        }
        DirtyLogSpec::SoftDirty(pid) => {
            probe_soft_dirty()?;
            Box::new(SoftDirtyTracker::open_at(
                Path::new("/proc"),
                *pid,
                blocks,
                threads,
                system_page_size()?,
            )?)
        }
        DirtyLogSpec::Scan => Box::new(ScanTracker::new(blocks, threads)),
    })
}

/// Throughput of the `scan` tracker over `blocks` in GB/s (10^9 bytes per second): the time of
/// one steady-state scan (every page hashed and compared, nothing changed), after an untimed
/// first scan. Divide by `threads` for the rate per core.
pub fn scan_rate(blocks: Vec<Arc<RamBlock>>, threads: usize) -> f64 {
    let bytes: u64 = blocks.iter().map(|b| b.len()).sum();
    let mut t = ScanTracker::new(blocks, threads);
    t.scan_now(true);
    t.scan_now(false);
    // As if every page had been sent as it reads, so the timed scan finds nothing changed.
    if let Some(h) = t.page_hashes() {
        for (b, hs) in h.iter().enumerate() {
            for (p, &x) in hs.iter().enumerate() {
                t.sent.set(b, p as u64, x);
            }
        }
    }
    let start = Instant::now();
    t.scan_now(false);
    bytes as f64 / start.elapsed().as_secs_f64().max(1e-9) / 1e9
}

// ---------------------------------------------------------------------------------------------
// Parallel page visits over a global word space.

/// Bytes of memory a thread should have to read before another thread is worth starting.
const MIN_BYTES_PER_THREAD: u64 = 8 << 20;
/// Size of each thread's copy buffer: small enough to stay in cache between copy and check.
const COPY_BUF: usize = 256 << 10;

/// The dirty bitmaps of all blocks seen as one sequence of 64-page words, so work can be cut
/// into equal pieces across blocks of any size.
struct WordSpace {
    /// Global index of each block's first word, then the total.
    first: Vec<usize>,
    pages: Vec<u64>,
}

impl WordSpace {
    fn new(blocks: &[Arc<RamBlock>]) -> Self {
        let mut first = vec![0];
        for b in blocks {
            first.push(first.last().unwrap() + b.pages().div_ceil(64) as usize);
        }
        WordSpace {
            first,
            pages: blocks.iter().map(|b| b.pages()).collect(),
        }
    }
    fn total(&self) -> usize {
        *self.first.last().unwrap()
    }
    /// Block holding global word `g` (`g < total`).
    fn block_of(&self, g: usize) -> usize {
        self.first.partition_point(|&f| f <= g) - 1
    }
    fn flatten(&self, maps: &[PageBitmap]) -> Vec<u64> {
        maps.iter()
            .flat_map(|m| m.words().iter().copied())
            .collect()
    }
    fn split(&self, words: &[u64]) -> Vec<PageBitmap> {
        (0..self.pages.len())
            .map(|b| {
                let w = words[self.first[b]..self.first[b + 1]].to_vec();
                PageBitmap::from_words(w, self.pages[b]).expect("word count matches pages")
            })
            .collect()
    }
    fn full(&self) -> Vec<PageBitmap> {
        self.pages.iter().map(|&p| PageBitmap::full(p)).collect()
    }
    fn empty(&self) -> Vec<PageBitmap> {
        self.pages.iter().map(|&p| PageBitmap::new(p)).collect()
    }
}

/// Cuts `[0, weights.len())` into at most `parts` ranges of about equal total weight, but no
/// more ranges than `min_weight` per range allows. Returns the boundaries, first 0, last `len`.
fn cuts(
    weights: impl Iterator<Item = u64> + Clone,
    len: usize,
    parts: usize,
    min_weight: u64,
) -> Vec<usize> {
    let total: u64 = weights.clone().sum();
    let parts = (parts as u64).min(total / min_weight.max(1)).max(1);
    let mut out = vec![0];
    let mut acc = 0u64;
    for (i, w) in weights.enumerate() {
        acc += w;
        if out.len() < parts as usize && acc * parts >= total * out.len() as u64 {
            out.push(i + 1);
        }
    }
    out.retain(|&c| c < len);
    out.push(len);
    out.dedup();
    out
}

/// Runs `f(state, global_word, block, word_in_block, extra)` for every global word, the ranges
/// between `cuts` on separate threads. `extra` is per-word mutable state, `per_word` entries
/// per word. Returns each word's result in order.
fn par_words<T, S, O>(
    space: &WordSpace,
    cuts: &[usize],
    extra: &mut [T],
    per_word: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, usize, usize, &mut [T]) -> O + Sync,
) -> Vec<O>
where
    T: Send,
    O: Copy + Default + Send,
{
    let mut out = vec![O::default(); space.total()];
    let run = |lo: usize, out: &mut [O], extra: &mut [T]| {
        let mut st = init();
        let mut b = if lo < space.total() {
            space.block_of(lo)
        } else {
            0
        };
        for (i, o) in out.iter_mut().enumerate() {
            let g = lo + i;
            while g >= space.first[b + 1] {
                b += 1;
            }
            *o = f(
                &mut st,
                g,
                b,
                g - space.first[b],
                &mut extra[i * per_word..(i + 1) * per_word],
            );
        }
    };
    if cuts.len() <= 2 {
        run(0, &mut out, extra);
        return out;
    }
    std::thread::scope(|s| {
        let (mut out_rest, mut extra_rest) = (&mut out[..], extra);
        for w in cuts.windows(2) {
            let n = w[1] - w[0];
            let (o, or) = out_rest.split_at_mut(n);
            let (e, er) = extra_rest.split_at_mut(n * per_word);
            (out_rest, extra_rest) = (or, er);
            let run = &run;
            s.spawn(move || run(w[0], o, e));
        }
    });
    out
}

/// Calls `f(page, bytes)` for pages `[first, first+count)` of `block` with a private copy of
/// each whole page, copying up to `buf.len()` bytes at a time.
fn for_each_page(
    block: &RamBlock,
    first: u64,
    count: u64,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(u64, &[u8]),
) {
    let log2 = block.page_log2();
    let ps = 1usize << log2;
    if buf.len() < ps {
        buf.resize(ps, 0);
    }
    let per = (buf.len() / ps) as u64;
    let mut p = first;
    while p < first + count {
        let n = per.min(first + count - p);
        let bytes = &mut buf[..n as usize * ps];
        block.read(p << log2, bytes);
        for (i, page) in bytes.chunks_exact(ps).enumerate() {
            f(p + i as u64, page);
        }
        p += n;
    }
}

/// True if every byte is zero; ORs 64-byte pieces so the compiler can vectorise it.
fn is_zero_bytes(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// The subset of `dirty` whose pages read as all zeros, checked on up to `threads` threads
/// (cut so each gets about the same number of dirty pages).
fn zero_subset(blocks: &[Arc<RamBlock>], dirty: &[PageBitmap], threads: usize) -> Vec<PageBitmap> {
    let space = WordSpace::new(blocks);
    let words = space.flatten(dirty);
    let weights = (0..words.len()).map(|g| {
        let b = space.block_of(g);
        (words[g].count_ones() as u64) << blocks[b].page_log2()
    });
    let cuts = cuts(weights, words.len(), threads, MIN_BYTES_PER_THREAD);
    let zero: Vec<u64> = par_words(
        &space,
        &cuts,
        &mut [] as &mut [()],
        0,
        || (),
        |_, g, b, w, _| {
            // In place, without copying: zero detection covers all memory in the first round.
            let mut bits = words[g];
            let mut zero = 0u64;
            let base = w as u64 * 64;
            let log2 = blocks[b].page_log2();
            while bits != 0 {
                let i = bits.trailing_zeros();
                if blocks[b].is_zero((base + i as u64) << log2, 1 << log2) {
                    zero |= 1 << i;
                }
                bits &= bits - 1;
            }
            zero
        },
    );
    space.split(&zero)
}

fn with_zero(blocks: &[Arc<RamBlock>], dirty: Vec<PageBitmap>, threads: usize) -> DirtyScan {
    let zero = zero_subset(blocks, &dirty, threads);
    DirtyScan { dirty, zero }
}

// ---------------------------------------------------------------------------------------------
// none

struct NoneTracker {
    blocks: Vec<Arc<RamBlock>>,
    threads: usize,
    first: bool,
}

impl DirtyTracker for NoneTracker {
    fn scan(&mut self, all: bool) -> Result<DirtyScan, DirtyError> {
        let space = WordSpace::new(&self.blocks);
        let dirty = if all || self.first {
            space.full()
        } else {
            space.empty()
        };
        self.first = false;
        Ok(with_zero(&self.blocks, dirty, self.threads))
    }
    fn describe(&self) -> String {
        "none (memory assumed unchanging: every page once, then nothing)".into()
    }
}

// ---------------------------------------------------------------------------------------------
// bitmap

struct BitmapTracker {
    blocks: Vec<Arc<RamBlock>>,
    threads: usize,
    log: SharedBitmap,
}

impl DirtyTracker for BitmapTracker {
    fn scan(&mut self, all: bool) -> Result<DirtyScan, DirtyError> {
        // Fetch-and-clear before any page is read (the zero check, the caller's copies).
        let taken = self.log.take_all();
        let dirty = if all {
            WordSpace::new(&self.blocks).full()
        } else {
            taken
        };
        Ok(with_zero(&self.blocks, dirty, self.threads))
    }
    fn describe(&self) -> String {
        format!(
            "shared bitmap {} ({} pages)",
            self.log.path().display(),
            self.log.pages().iter().sum::<u64>()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// scan

/// Hash comparison: a page is dirty when its xxh3-64 hash differs from the hash of the bytes
/// it was last sent with ([`SentPages`]) or from the hash the previous scan read (spec:
/// SCAN-1). The first catches a page that changes and changes back between two scans while a
/// write carries the intermediate bytes; the second any change since the previous scan, as
/// every dirty log reports it. Its one blind spot, a change that keeps the hash (about 2^-64
/// per changed page), is caught end to end by `--verify` digests.
struct ScanTracker {
    blocks: Vec<Arc<RamBlock>>,
    threads: usize,
    space: WordSpace,
    /// Hash of each page as the last scan read it, 64 slots per global word (tail slots
    /// unused): the page hashes of paused memory after the final scan (SW-4).
    hashes: Vec<u64>,
    /// What the destination holds, kept by the transports and the driver.
    sent: Arc<SentPages>,
    /// xxh3-64 of an all-zero page, per block (only pages with this hash need a byte check).
    zero_hash: Vec<u64>,
    /// No scan yet: the first reports every page.
    first: bool,
    /// `hashes` hold the previous scan's reading: false before the first scan and after a
    /// scan of every page, which reports without hashing.
    hashed: bool,
}

impl ScanTracker {
    fn new(blocks: Vec<Arc<RamBlock>>, threads: usize) -> Self {
        let space = WordSpace::new(&blocks);
        let zero_hash = blocks
            .iter()
            .map(|b| xxhash_rust::xxh3::xxh3_64(&vec![0u8; 1usize << b.page_log2()]))
            .collect();
        ScanTracker {
            hashes: vec![0; space.total() * 64],
            sent: SentPages::new(&blocks),
            space,
            blocks,
            threads: threads.clamp(1, 64),
            zero_hash,
            first: true,
            hashed: false,
        }
    }

    fn scan_now(&mut self, all: bool) -> DirtyScan {
        if all || self.first {
            // Every page is reported, so nothing needs hashing now: the transport hashes
            // each page as it sends it (SCAN-2), and the next scan compares with that alone.
            // Only the zero check reads memory, and a page with data stops it at its first
            // non-zero word: the first pass starts after a few milliseconds, not after a read
            // of all memory.
            self.hashed = false;
            self.first = false;
            return with_zero(&self.blocks, self.space.full(), self.threads);
        }
        let compare_seen = self.hashed;
        self.hashed = true;
        let blocks = &self.blocks;
        let space = &self.space;
        let weights = (0..space.total()).map(|g| {
            let b = space.block_of(g);
            (space.pages[b] - (g - space.first[b]) as u64 * 64).min(64) << blocks[b].page_log2()
        });
        let cuts = cuts(weights, space.total(), self.threads, MIN_BYTES_PER_THREAD);
        let zero_hash = &self.zero_hash;
        let sent = &self.sent;
        let out: Vec<(u64, u64)> = par_words(
            space,
            &cuts,
            &mut self.hashes,
            64,
            || vec![0u8; COPY_BUF],
            |buf, _, b, w, hashes| {
                let base = w as u64 * 64;
                let n = (space.pages[b] - base).min(64);
                let (mut dirty, mut zero) = (0u64, 0u64);
                for_each_page(&blocks[b], base, n, buf, |p, bytes| {
                    let i = (p - base) as usize;
                    let h = xxhash_rust::xxh3::xxh3_64(bytes);
                    // spec: SCAN-1: against what was sent (a change undone after a write
                    // carried it), and against the previous scan (any change since it, which
                    // the zero bits carried from the scan that triggered switchover rely on).
                    if sent.get(b, p) != h || compare_seen && hashes[i] != h {
                        dirty |= 1 << i;
                        if h == zero_hash[b] && is_zero_bytes(bytes) {
                            zero |= 1 << i;
                        }
                    }
                    hashes[i] = h;
                });
                (dirty, zero)
            },
        );
        let dirty: Vec<u64> = out.iter().map(|o| o.0).collect();
        let zero: Vec<u64> = out.iter().map(|o| o.1).collect();
        DirtyScan {
            dirty: space.split(&dirty),
            zero: space.split(&zero),
        }
    }
}

impl DirtyTracker for ScanTracker {
    fn scan(&mut self, all: bool) -> Result<DirtyScan, DirtyError> {
        Ok(self.scan_now(all))
    }
    fn sent_pages(&self) -> Option<Arc<SentPages>> {
        Some(self.sent.clone())
    }
    fn page_hashes(&self) -> Option<Vec<Vec<u64>>> {
        if !self.hashed {
            return None; // no scan hashed memory since the last scan of every page
        }
        let s = &self.space;
        Some(
            (0..self.blocks.len())
                .map(|b| {
                    (0..s.pages[b])
                        .map(|p| {
                            self.hashes[(s.first[b] + (p / 64) as usize) * 64 + (p % 64) as usize]
                        })
                        .collect()
                })
                .collect(),
        )
    }
    fn describe(&self) -> String {
        format!(
            "page hashing (xxh3-64 per page, {} thread{})",
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// soft-dirty

/// Bits of a `/proc/PID/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_SWAPPED: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;
/// `AT_PAGESZ` in the auxiliary vector.
const AT_PAGESZ: u64 = 6;

/// True if a pagemap entry says the page was written since soft-dirty bits were last cleared.
/// A page that is neither present nor swapped counts as clean: the kernel reports bit 55 for
/// holes in a mapping created after the last clear, and such pages hold nothing written
/// through this mapping.
fn pagemap_soft_dirty(entry: u64) -> bool {
    entry & PM_SOFT_DIRTY != 0 && entry & (PM_PRESENT | PM_SWAPPED) != 0
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MapsEntry {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    inode: u64,
    path: String,
}

/// Parses `/proc/PID/maps`; lines that do not parse are skipped (none do on Linux).
fn parse_maps(text: &str) -> Vec<MapsEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start_matches(' ');
        let (f, r) = rest.split_once(' ').unwrap_or((rest, ""));
        rest = r;
        f
    };
    let (range, perms, offset, _dev, inode) = (field(), field(), field(), field(), field());
    let (start, end) = range.split_once('-')?;
    Some(MapsEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: rest.trim_start_matches(' ').to_string(),
    })
}

/// A piece of a RAM file mapped into the target: file bytes `[offset, offset+len)` at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileRange {
    addr: u64,
    offset: u64,
    len: u64,
}

/// The target's shared mappings of the file (`path`, `inode`) clipped to its first `len`
/// bytes, or the first byte range no shared mapping covers.
fn file_ranges(
    maps: &[MapsEntry],
    path: &str,
    inode: u64,
    len: u64,
) -> Result<Vec<FileRange>, (u64, u64)> {
    let mut ranges: Vec<FileRange> = maps
        .iter()
        .filter(|m| m.shared && m.inode == inode && m.path == path && m.offset < len)
        .map(|m| FileRange {
            addr: m.start,
            offset: m.offset,
            len: (m.end - m.start).min(len - m.offset),
        })
        .collect();
    ranges.sort_by_key(|r| r.offset);
    let mut covered = 0;
    for r in &ranges {
        if r.offset > covered {
            return Err((covered, r.offset - covered));
        }
        covered = covered.max(r.offset + r.len);
    }
    if covered < len {
        return Err((covered, len - covered));
    }
    Ok(ranges)
}

/// Marks in `dirty` the block pages overlapped by soft-dirty system pages: `entries[i]`
/// describes the system page at file offset `offset + i * sys_page`.
fn apply_entries(
    entries: &[u64],
    offset: u64,
    sys_page: u64,
    dirty: &mut PageBitmap,
    page_log2: u8,
) {
    for (i, &e) in entries.iter().enumerate() {
        if pagemap_soft_dirty(e) {
            let at = offset + i as u64 * sys_page;
            let first = at >> page_log2;
            let last = (at + sys_page - 1) >> page_log2;
            dirty.set_range(first, last - first + 1);
        }
    }
}

fn proc_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirtyError + '_ {
    move |source| DirtyError::Proc {
        path: path.into(),
        source,
    }
}

fn clear_soft_dirty(clear_refs: &Path) -> Result<(), DirtyError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(clear_refs)
        .map_err(proc_err(clear_refs))?;
    f.write_all(b"4").map_err(proc_err(clear_refs))
}

/// The system page size, from the auxiliary vector the kernel gave this process.
fn system_page_size() -> Result<u64, DirtyError> {
    let path = Path::new("/proc/self/auxv");
    let raw = std::fs::read(path).map_err(proc_err(path))?;
    const W: usize = std::mem::size_of::<usize>();
    raw.chunks_exact(2 * W)
        .map(|c| {
            let word = |b: &[u8]| usize::from_ne_bytes(b.try_into().expect("one word")) as u64;
            (word(&c[..W]), word(&c[W..]))
        })
        .find(|&(k, _)| k == AT_PAGESZ)
        .map(|(_, v)| v)
        .filter(|v| v.is_power_of_two())
        .ok_or(DirtyError::ProcFormat {
            path: path.into(),
            why: "no AT_PAGESZ entry",
        })
}

/// Checks that the kernel sets soft-dirty bits: clears this process's bits, writes a page of
/// our own memory, and reads the page's pagemap entry.
fn probe_soft_dirty() -> Result<(), DirtyError> {
    let sys_page = system_page_size()?;
    let probe = RamBlock::anonymous(
        "soft-dirty-probe",
        sys_page,
        sys_page.trailing_zeros() as u8,
    )?;
    probe.write(0, &[1]); // fault the page in, so the clear below applies to a present page
    clear_soft_dirty(Path::new("/proc/self/clear_refs"))?;
    probe.write(0, &[2]);
    let mut back = [0u8];
    probe.read(0, &mut back);
    let path = Path::new("/proc/self/pagemap");
    let f = File::open(path).map_err(proc_err(path))?;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, probe.as_ptr() as u64 / sys_page * 8)
        .map_err(proc_err(path))?;
    let entry = u64::from_ne_bytes(e);
    if back[0] != 2 || entry & PM_PRESENT == 0 {
        // We just wrote the page, so reading the wrong entry is the only explanation.
        return Err(DirtyError::ProcFormat {
            path: path.into(),
            why: "a page just written is not present",
        });
    }
    if pagemap_soft_dirty(entry) {
        Ok(())
    } else {
        Err(DirtyError::SoftDirtyUnsupported)
    }
}

/// Soft-dirty bits of the process that writes the RAM files.
///
/// Limits, which is why `bitmap:PATH` is preferred: the kernel offers no atomic
/// fetch-and-clear of these bits, so a write that lands between reading a page's pagemap entry
/// and writing `clear_refs` is forgotten (unless the page was already dirty in that scan); the
/// final round, taken with the writer stopped, is exact, but a page forgotten in an earlier
/// round is not sent again. Pages of a shared file mapping that the kernel unmaps (reclaim,
/// swap of tmpfs) lose their soft-dirty bit too. Use it for writers that cannot keep a bitmap,
/// with `--verify`.
struct SoftDirtyTracker {
    blocks: Vec<Arc<RamBlock>>,
    threads: usize,
    pid: u32,
    pagemap_path: PathBuf,
    pagemap: File,
    clear_refs: PathBuf,
    sys_page: u64,
    /// Per block, where the target maps its file.
    ranges: Vec<Vec<FileRange>>,
    first: bool,
    /// Stop the process around read-and-clear (off only for the fake `/proc` of unit tests).
    freeze: bool,
}

impl SoftDirtyTracker {
    /// Finds the blocks' files in `proc_root/PID/maps` (`proc_root` is `/proc` except in
    /// tests). Does not probe for kernel support.
    fn open_at(
        proc_root: &Path,
        pid: u32,
        blocks: Vec<Arc<RamBlock>>,
        threads: usize,
        sys_page: u64,
    ) -> Result<Self, DirtyError> {
        let dir = proc_root.join(pid.to_string());
        let maps_path = dir.join("maps");
        let maps = parse_maps(&std::fs::read_to_string(&maps_path).map_err(proc_err(&maps_path))?);
        let mut ranges = Vec::new();
        for b in &blocks {
            let path = b.path().ok_or_else(|| DirtyError::NoFile {
                block: b.name().into(),
                pid,
            })?;
            let canon = path.canonicalize().map_err(proc_err(path))?;
            let inode = std::fs::metadata(&canon).map_err(proc_err(&canon))?.ino();
            let r = file_ranges(&maps, &canon.to_string_lossy(), inode, b.len()).map_err(
                |(offset, len)| DirtyError::NotMapped {
                    pid,
                    path: canon.clone(),
                    offset,
                    len,
                },
            )?;
            ranges.push(r);
        }
        let pagemap_path = dir.join("pagemap");
        let pagemap = File::open(&pagemap_path).map_err(proc_err(&pagemap_path))?;
        Ok(SoftDirtyTracker {
            blocks,
            threads,
            pid,
            pagemap_path,
            pagemap,
            clear_refs: dir.join("clear_refs"),
            sys_page,
            ranges,
            first: true,
            freeze: proc_root == Path::new("/proc"),
        })
    }

    fn read_dirty(&self) -> Result<Vec<PageBitmap>, DirtyError> {
        const BATCH: u64 = 8192;
        let mut raw = vec![0u8; BATCH as usize * 8];
        let mut out = Vec::with_capacity(self.blocks.len());
        for (b, ranges) in self.blocks.iter().zip(&self.ranges) {
            let mut dirty = PageBitmap::new(b.pages());
            for r in ranges {
                let pages = r.len.div_ceil(self.sys_page);
                let mut done = 0;
                while done < pages {
                    let n = BATCH.min(pages - done);
                    let bytes = &mut raw[..n as usize * 8];
                    let at = (r.addr / self.sys_page + done) * 8;
                    self.pagemap
                        .read_exact_at(bytes, at)
                        .map_err(proc_err(&self.pagemap_path))?;
                    let entries: Vec<u64> = bytes
                        .chunks_exact(8)
                        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                        .collect();
                    apply_entries(
                        &entries,
                        r.offset + done * self.sys_page,
                        self.sys_page,
                        &mut dirty,
                        b.page_log2(),
                    );
                    done += n;
                }
            }
            out.push(dirty);
        }
        Ok(out)
    }
}

/// Holds a process stopped for the few milliseconds between reading its soft-dirty bits and
/// clearing them: the kernel has no atomic fetch-and-clear, and a write landing in that window
/// would be cleared without ever being seen. A process that was already stopped (paused for
/// switchover) is left as it is.
struct Frozen(Option<rustix::process::Pid>);

impl Frozen {
    fn new(pid: u32) -> Result<Self, DirtyError> {
        use rustix::process::{kill_process, Pid, Signal};
        let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
        let state = || -> Result<char, DirtyError> {
            let s = std::fs::read_to_string(&stat_path).map_err(|source| DirtyError::Proc {
                path: stat_path.clone(),
                source,
            })?;
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .ok_or_else(|| DirtyError::ProcFormat {
                    path: stat_path.clone(),
                    why: "no state field",
                })
        };
        if matches!(state()?, 'T' | 't') {
            return Ok(Frozen(None));
        }
        let p = Pid::from_raw(pid as i32).ok_or_else(|| DirtyError::ProcFormat {
            path: stat_path.clone(),
            why: "pid 0",
        })?;
        kill_process(p, Signal::STOP).map_err(|e| DirtyError::Proc {
            path: stat_path.clone(),
            source: e.into(),
        })?;
        let guard = Frozen(Some(p));
        let t = std::time::Instant::now();
        while !matches!(state()?, 'T' | 't') {
            if t.elapsed() > std::time::Duration::from_secs(2) {
                return Err(DirtyError::ProcFormat {
                    path: stat_path,
                    why: "process did not stop within 2 s",
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        Ok(guard)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::CONT);
        }
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn scan(&mut self, all: bool) -> Result<DirtyScan, DirtyError> {
        let frozen = if self.freeze {
            Some(Frozen::new(self.pid)?)
        } else {
            None
        };
        let read = self.read_dirty()?;
        clear_soft_dirty(&self.clear_refs)?;
        drop(frozen);
        let dirty = if all || self.first {
            WordSpace::new(&self.blocks).full()
        } else {
            read
        };
        self.first = false;
        Ok(with_zero(&self.blocks, dirty, self.threads))
    }
    fn describe(&self) -> String {
        format!("soft-dirty bits of process {}", self.pid)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_every_kind_and_explains_mistakes() {
        assert_eq!("none".parse::<DirtyLogSpec>().unwrap(), DirtyLogSpec::None);
        assert_eq!("scan".parse::<DirtyLogSpec>().unwrap(), DirtyLogSpec::Scan);
        assert_eq!(
            "bitmap:/dev/shm/a:b".parse::<DirtyLogSpec>().unwrap(),
            DirtyLogSpec::Bitmap("/dev/shm/a:b".into())
        );
        assert_eq!(
            "soft-dirty:42".parse::<DirtyLogSpec>().unwrap(),
            DirtyLogSpec::SoftDirty(42)
        );
        for (bad, why) in [
            ("bitmap", "bitmap:PATH"),
            ("bitmap:", "empty bitmap path"),
            ("soft-dirty", "soft-dirty:PID"),
            ("soft-dirty:x", "positive integer"),
            ("soft-dirty:0", "positive integer"),
            ("scan:3", "no argument"),
            ("kvm", "unknown kind"),
            ("", "unknown kind"),
        ] {
            let e = bad.parse::<DirtyLogSpec>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("expected none, scan"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn maps_lines_parse_including_paths_with_spaces() {
        let text = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
7f2c5e000000-7f2c6e000000 rw-s 00000000 00:1a 4242                       /dev/shm/guest ram
7f2c6e000000-7f2c6e100000 rw-s 00100000 00:1a 4242 /dev/shm/old (deleted)
7ffd3b8a2000-7ffd3b8c3000 rw-p 00000000 00:00 0                          [stack]
7ffd3b9f0000-7ffd3b9f2000 r--p 00000000 00:00 0
garbage
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[1],
            MapsEntry {
                start: 0x7f2c5e000000,
                end: 0x7f2c6e000000,
                shared: true,
                offset: 0,
                inode: 4242,
                path: "/dev/shm/guest ram".into()
            }
        );
        assert!(!m[0].shared);
        assert_eq!(m[2].offset, 0x100000);
        assert_eq!(m[2].path, "/dev/shm/old (deleted)");
        assert_eq!(m[4].path, "");
    }

    #[test]
    fn file_ranges_need_shared_mappings_covering_the_whole_file() {
        let e = |start: u64, len: u64, offset: u64, shared: bool, path: &str| MapsEntry {
            start,
            end: start + len,
            shared,
            offset,
            inode: 7,
            path: path.into(),
        };
        // Split in two VMAs (in reverse order), plus a private and an unrelated mapping.
        let maps = vec![
            e(0x20000, 0x3000, 0x1000, true, "/r"),
            e(0x10000, 0x1000, 0, true, "/r"),
            e(0x30000, 0x4000, 0, false, "/r"),
            e(0x40000, 0x4000, 0, true, "/other"),
        ];
        let r = file_ranges(&maps, "/r", 7, 0x4000).unwrap();
        assert_eq!(
            r,
            vec![
                FileRange {
                    addr: 0x10000,
                    offset: 0,
                    len: 0x1000
                },
                FileRange {
                    addr: 0x20000,
                    offset: 0x1000,
                    len: 0x3000
                }
            ]
        );
        // A larger mapping is clipped to the file.
        assert_eq!(
            file_ranges(&maps[1..2], "/r", 7, 0x800).unwrap()[0].len,
            0x800
        );
        assert_eq!(file_ranges(&maps, "/r", 7, 0x5000), Err((0x4000, 0x1000)));
        assert_eq!(file_ranges(&maps[..1], "/r", 7, 0x4000), Err((0, 0x1000)));
        // Private only, or the path now names another inode: not found.
        assert_eq!(file_ranges(&maps[2..3], "/r", 7, 0x1000), Err((0, 0x1000)));
        assert_eq!(file_ranges(&maps, "/r", 8, 0x1000), Err((0, 0x1000)));
    }

    #[test]
    fn pagemap_entries_mark_pages_written_and_present_or_swapped() {
        let pfn = 0x1234;
        assert!(pagemap_soft_dirty(PM_PRESENT | PM_SOFT_DIRTY | pfn));
        assert!(pagemap_soft_dirty(PM_SWAPPED | PM_SOFT_DIRTY));
        assert!(!pagemap_soft_dirty(PM_PRESENT | pfn));
        assert!(
            !pagemap_soft_dirty(PM_SOFT_DIRTY),
            "a hole is clean even with bit 55"
        );
        assert!(!pagemap_soft_dirty(0));

        let dirty_e = PM_PRESENT | PM_SOFT_DIRTY;
        // Block pages equal to system pages, starting at file offset 2 pages.
        let mut d = PageBitmap::new(8);
        apply_entries(
            &[0, dirty_e, PM_PRESENT, dirty_e],
            2 * 4096,
            4096,
            &mut d,
            12,
        );
        assert_eq!((0..8).filter(|&p| d.get(p)).collect::<Vec<_>>(), vec![3, 5]);
        // 16 KiB block pages: any dirty system page dirties its block page.
        let mut d = PageBitmap::new(4);
        apply_entries(&[0, 0, 0, 0, 0, dirty_e, 0, 0], 0, 4096, &mut d, 14);
        assert_eq!((0..4).filter(|&p| d.get(p)).collect::<Vec<_>>(), vec![1]);
        // 64 KiB system pages over 4 KiB block pages: all 16 covered pages.
        let mut d = PageBitmap::new(40);
        apply_entries(&[0, dirty_e], 0, 65536, &mut d, 12);
        assert_eq!(d.count_ones(), 16);
        assert_eq!(d.next_set(0), Some(16));
    }

    /// The whole soft-dirty scan against a fake `/proc`, since this kernel has no soft-dirty.
    #[test]
    fn soft_dirty_tracker_reads_pagemap_of_the_mapped_ranges_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        let block = Arc::new(RamBlock::create("ram", &ram, 8 * 4096, 12).unwrap());
        let canon = ram.canonicalize().unwrap();
        let ino = std::fs::metadata(&canon).unwrap().ino();
        let proc = dir.path().join("proc");
        std::fs::create_dir_all(proc.join("77")).unwrap();
        // The file is mapped as two VMAs: pages 0..4 at 0x10000, pages 4..8 at 0x40000.
        std::fs::write(
            proc.join("77/maps"),
            format!(
                "00010000-00014000 rw-s 00000000 00:1a {ino} {p}\n00040000-00044000 rw-s 00004000 00:1a {ino} {p}\n",
                p = canon.display()
            ),
        )
        .unwrap();
        let mut pagemap = vec![0u8; 0x50 * 8];
        let mut set = |vpage: usize, e: u64| {
            pagemap[vpage * 8..vpage * 8 + 8].copy_from_slice(&e.to_ne_bytes())
        };
        set(0x11, PM_PRESENT | PM_SOFT_DIRTY); // block page 1
        set(0x12, PM_SOFT_DIRTY); // not present: clean
        set(0x43, PM_SWAPPED | PM_SOFT_DIRTY); // block page 7
        std::fs::write(proc.join("77/pagemap"), &pagemap).unwrap();
        std::fs::write(proc.join("77/clear_refs"), "").unwrap();
        block.write(7 * 4096, &[9]);

        let mut t = SoftDirtyTracker::open_at(&proc, 77, vec![block.clone()], 2, 4096).unwrap();
        let first = t.scan(false).unwrap();
        assert_eq!(
            first.dirty[0].count_ones(),
            8,
            "the first scan reports everything"
        );
        assert_eq!(first.zero[0].count_ones(), 7);
        let s = t.scan(false).unwrap();
        assert_eq!(
            (0..8).filter(|&p| s.dirty[0].get(p)).collect::<Vec<_>>(),
            vec![1, 7]
        );
        assert_eq!(
            (0..8).filter(|&p| s.zero[0].get(p)).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(
            std::fs::read_to_string(proc.join("77/clear_refs")).unwrap(),
            "4"
        );
        assert_eq!(t.scan(true).unwrap().dirty[0].count_ones(), 8);

        std::fs::write(
            proc.join("77/maps"),
            format!(
                "00010000-00014000 rw-s 00000000 00:1a {ino} {}\n",
                canon.display()
            ),
        )
        .unwrap();
        let Err(e) = SoftDirtyTracker::open_at(&proc, 77, vec![block.clone()], 1, 4096) else {
            panic!("opened with half of the file unmapped");
        };
        assert!(
            matches!(
                e,
                DirtyError::NotMapped {
                    offset: 16384,
                    len: 16384,
                    ..
                }
            ),
            "{e}"
        );
        let anon = Arc::new(RamBlock::anonymous("anon", 4096, 12).unwrap());
        assert!(matches!(
            SoftDirtyTracker::open_at(&proc, 77, vec![anon], 1, 4096),
            Err(DirtyError::NoFile { .. })
        ));
        assert!(matches!(
            SoftDirtyTracker::open_at(&proc, 78, vec![block], 1, 4096),
            Err(DirtyError::Proc { .. })
        ));
    }

    #[test]
    fn cuts_balance_weight_and_respect_the_minimum() {
        let w = |v: Vec<u64>| v.into_iter();
        assert_eq!(cuts(w(vec![1; 10]), 10, 2, 1), vec![0, 5, 10]);
        assert_eq!(
            cuts(w(vec![1; 10]), 10, 2, 6),
            vec![0, 10],
            "not worth a second thread"
        );
        assert_eq!(cuts(w(vec![0, 0, 0, 9, 9, 0]), 6, 2, 1), vec![0, 4, 6]);
        assert_eq!(cuts(w(vec![]), 0, 4, 1), vec![0]);
        let c = cuts(w(vec![3; 100]), 100, 3, 1);
        assert_eq!(c.len(), 4);
        assert!(
            c.windows(2).all(|p| (30..=36).contains(&(p[1] - p[0]))),
            "{c:?}"
        );
    }

    #[test]
    fn zero_subset_checks_only_dirty_pages_across_blocks_and_threads() {
        let a = Arc::new(RamBlock::anonymous("a", 130 * 4096, 12).unwrap());
        let b = Arc::new(RamBlock::anonymous("b", 3 << 14, 14).unwrap());
        a.write(5 * 4096 + 4095, &[1]);
        a.write(129 * 4096, &[1]);
        b.write(1 << 14, &[1]);
        let blocks = vec![a, b];
        let dirty = vec![PageBitmap::full(130), PageBitmap::full(3)];
        for threads in [1, 2, 5] {
            let zero = zero_subset(&blocks, &dirty, threads);
            assert_eq!(zero[0].count_ones(), 128);
            assert!(!zero[0].get(5) && !zero[0].get(129) && zero[0].get(64));
            assert_eq!(
                (0..3).filter(|&p| zero[1].get(p)).collect::<Vec<_>>(),
                vec![0, 2]
            );
        }
        let mut some = PageBitmap::new(130);
        some.set_range(4, 3);
        let zero = zero_subset(&blocks, &[some, PageBitmap::new(3)], 2);
        assert_eq!(
            (0..130).filter(|&p| zero[0].get(p)).collect::<Vec<_>>(),
            vec![4, 6]
        );
        assert!(!zero[1].any());
    }

    #[test]
    fn is_zero_bytes_sees_a_single_bit_anywhere() {
        let mut v = vec![0u8; 4096 + 17];
        assert!(is_zero_bytes(&v));
        for i in [0, 63, 64, 4095, 4096 + 16] {
            v[i] = 0x80;
            assert!(!is_zero_bytes(&v), "{i}");
            v[i] = 0;
        }
    }
}
