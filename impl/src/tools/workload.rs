//! A synthetic guest (`rdmig workload`): keeps writing pages of a shared RAM file at a set rate
//! while rdmig migrates it, and keeps the shared dirty log ([`crate::memory::mapped_bitmap`]) the way a
//! VMM would.
//!
//! Content is deterministic so that a failed migration can be told apart from a lucky one: the
//! `n`-th write of page `p` stores [`page_content`]`(seed, p, n)`, whose first 8 bytes are `n`
//! (little-endian) and whose rest is derived from `(seed, p, n)`. Every write of data produces bytes
//! the page never held before, so a lost update always shows in an end-to-end digest
//! ([`file_digest`]).
//!
//! Pausing is done from outside: rdmig stops the process with SIGSTOP and resumes it with
//! SIGCONT. The rate limiter caps its backlog at 10 ms of writes, so a resumed workload does not
//! catch up with a burst a paused guest would never have produced.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::memory::mapped_bitmap::{BitmapError, SharedBitmap};
use crate::memory::ram::{MemError, RamBlock};

/// Which pages the workload writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Any page, uniformly at random.
    Uniform,
    /// Only the first `fraction` of the pages (a working set that keeps getting dirty again).
    Hot { fraction: f64 },
    /// Every page in order, wrapping around (the worst case for convergence at high rates).
    Sweep,
    /// Every 100 ms, 10 ms of writes at ten times the rate (same average), each burst
    /// sequential from a random page.
    Bursts,
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Pattern::Uniform),
            "sweep" => Ok(Pattern::Sweep),
            "bursts" => Ok(Pattern::Bursts),
            _ => match s.strip_prefix("hot:") {
                Some(f) => match f.parse::<f64>() {
                    Ok(fraction) if fraction > 0.0 && fraction <= 1.0 => {
                        Ok(Pattern::Hot { fraction })
                    }
                    _ => Err(format!(
                        "{s:?}: the hot fraction must be a number in (0, 1], e.g. hot:0.1"
                    )),
                },
                None => Err(format!(
                    "{s:?}: expected uniform, hot:FRACTION, sweep or bursts"
                )),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// RAM file to create (or resize) and map shared.
    pub ram: PathBuf,
    /// Bytes of RAM; a multiple of the page size.
    pub size: u64,
    pub page_log2: u8,
    /// Bytes written per second, in MB/s (10^6 bytes); 0 only fills memory.
    pub dirty_rate_mb_s: f64,
    pub pattern: Pattern,
    /// Fraction of pages left zero by the fill, and of writes that store zeros, in `[0, 1]`.
    pub zero_fraction: f64,
    /// Fraction of writes, in `[0, 1]`, that put a page back to its previous content (a lock
    /// released, a counter brought back) instead of new content.
    pub undo_fraction: f64,
    /// Dirty log to create for the single block and keep up to date.
    pub bitmap: Option<PathBuf>,
    pub seed: u64,
    /// Stop writing after this long (counted from the end of the fill); `None` runs until
    /// `stop` is set.
    pub duration: Option<Duration>,
    /// Written (atomically, containing this process id and a newline) once memory is filled
    /// and the dirty log exists.
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadStats {
    pub pages: u64,
    /// Pages the fill left zero.
    pub zero_pages_filled: u64,
    pub fill_time: Duration,
    pub pages_written: u64,
    /// Writes that stored zeros (included in `pages_written`).
    pub zero_writes: u64,
    pub bytes_written: u64,
    /// Time spent in the write loop.
    pub run_time: Duration,
    /// `bytes_written` over `run_time`, in MB/s.
    pub achieved_mb_s: f64,
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WorkloadError {
    #[error("workload {option}: {why}")]
    Invalid { option: &'static str, why: String },
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error("ready file {path}: {source}")]
    Ready {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// splitmix64's output function: a cheap, well-mixed hash of a u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (one page) with the content of the `counter`-th write of `page`: the counter as
/// 8 little-endian bytes, then a stream derived from `(seed, page, counter)`. `counter` 0 is
/// reserved for "never written" and must not be passed here.
pub fn page_content(seed: u64, page: u64, counter: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&counter.to_le_bytes());
    let mut x = mix(seed ^ mix(page ^ mix(counter)));
    let mut words = out[8..].chunks_exact_mut(8);
    for w in &mut words {
        // A 64-bit LCG with an xorshift on output: fast enough to fill memory at several GB/s.
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        w.copy_from_slice(&(x ^ (x >> 29)).to_le_bytes());
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&x.to_le_bytes()[..n]);
}

/// True if the fill leaves `page` zero.
fn starts_zero(seed: u64, page: u64, zero_fraction: f64) -> bool {
    below_fraction(mix(seed ^ 0x5eed_0000_0000_0000 ^ mix(page)), zero_fraction)
}

/// True for about `fraction` of uniformly distributed `x`.
fn below_fraction(x: u64, fraction: f64) -> bool {
    fraction > 0.0 && (fraction >= 1.0 || x < (fraction * 18_446_744_073_709_551_616.0) as u64)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    /// Uniform in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

fn validate(o: &WorkloadOptions) -> Result<(), WorkloadError> {
    let bad = |option, why: String| Err(WorkloadError::Invalid { option, why });
    if !(12..=30).contains(&o.page_log2) {
        return bad(
            "page size",
            format!("2^{} bytes; expected 4 KiB to 1 GiB", o.page_log2),
        );
    }
    if o.size == 0 || o.size & ((1 << o.page_log2) - 1) != 0 {
        return bad(
            "size",
            format!(
                "{} bytes is not a non-zero multiple of the page size",
                o.size
            ),
        );
    }
    if !(o.dirty_rate_mb_s.is_finite() && o.dirty_rate_mb_s >= 0.0) {
        return bad(
            "dirty rate",
            format!("{} MB/s; expected a finite number >= 0", o.dirty_rate_mb_s),
        );
    }
    if !(0.0..=1.0).contains(&o.zero_fraction) {
        return bad(
            "zero fraction",
            format!("{}; expected a number in [0, 1]", o.zero_fraction),
        );
    }
    if !(0.0..=1.0).contains(&o.undo_fraction) {
        return bad(
            "undo fraction",
            format!("{}; expected a number in [0, 1]", o.undo_fraction),
        );
    }
    if let Pattern::Hot { fraction } = o.pattern {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return bad(
                "pattern",
                format!("hot fraction {fraction}; expected (0, 1]"),
            );
        }
    }
    Ok(())
}

/// Fills memory on all cores: page contents for counter 1, zeros for the pages that start zero.
fn fill(ram: &RamBlock, opts: &WorkloadOptions, counters: &mut [u64]) -> u64 {
    let page = 1usize << opts.page_log2;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let per = counters.len().div_ceil(threads).max(1);
    let zeros = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for (i, part) in counters.chunks_mut(per).enumerate() {
            let zeros = &zeros;
            s.spawn(move || {
                let mut buf = vec![0u8; page];
                let mut z = 0;
                for (j, c) in part.iter_mut().enumerate() {
                    let p = (i * per + j) as u64;
                    let off = p << opts.page_log2;
                    if starts_zero(opts.seed, p, opts.zero_fraction) {
                        ram.zero(off, page as u64);
                        *c = 0;
                        z += 1;
                    } else {
                        page_content(opts.seed, p, 1, &mut buf);
                        ram.write(off, &buf);
                        *c = 1;
                    }
                }
                zeros.fetch_add(z, Ordering::Relaxed);
            });
        }
    });
    zeros.into_inner()
}

fn write_ready(path: &Path) -> Result<(), WorkloadError> {
    let err = |source| WorkloadError::Ready {
        path: path.into(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Picks the pages to write.
struct Picker {
    pattern: Pattern,
    pages: u64,
    rng: Rng,
    cursor: u64,
    burst: u64,
}

const BURST_PERIOD: Duration = Duration::from_millis(100);
const BURST_ON: Duration = Duration::from_millis(10);

impl Picker {
    fn next(&mut self, since_start: Duration) -> u64 {
        match self.pattern {
            Pattern::Uniform => self.rng.below(self.pages),
            Pattern::Hot { fraction } => self
                .rng
                .below(((fraction * self.pages as f64) as u64).clamp(1, self.pages)),
            Pattern::Sweep | Pattern::Bursts => {
                if self.pattern == Pattern::Bursts {
                    let period = since_start.as_nanos() as u64 / BURST_PERIOD.as_nanos() as u64;
                    if period != self.burst {
                        self.burst = period;
                        self.cursor = self.rng.below(self.pages);
                    }
                }
                let p = self.cursor;
                self.cursor = (p + 1) % self.pages;
                p
            }
        }
    }

    /// Write rate multiplier at this moment (the bursts pattern concentrates its writes).
    fn rate_factor(&self, since_start: Duration) -> f64 {
        match self.pattern {
            Pattern::Bursts => {
                let into = since_start.as_nanos() % BURST_PERIOD.as_nanos();
                if into < BURST_ON.as_nanos() {
                    (BURST_PERIOD.as_nanos() / BURST_ON.as_nanos()) as f64
                } else {
                    0.0
                }
            }
            _ => 1.0,
        }
    }
}

/// Runs the workload: creates and fills the RAM file, creates the dirty log, writes the ready
/// file, then writes pages at the configured rate until `stop` is set or `duration` passes.
pub fn run(opts: &WorkloadOptions, stop: &AtomicBool) -> Result<WorkloadStats, WorkloadError> {
    validate(opts)?;
    let page = 1u64 << opts.page_log2;
    let ram = RamBlock::create("ram", &opts.ram, opts.size, opts.page_log2)?;
    let pages = ram.pages();
    let log = opts
        .bitmap
        .as_deref()
        .map(|p| SharedBitmap::create(p, &[pages]))
        .transpose()?;
    let started = Instant::now();
    let mut counters = vec![0u64; pages as usize];
    let zero_pages_filled = fill(&ram, opts, &mut counters);
    if let Some(log) = &log {
        // The fill changed every page; a reader that does not ask for "all" still sees it.
        log.mark_all();
    }
    let fill_time = started.elapsed();
    if let Some(r) = &opts.ready_file {
        write_ready(r)?;
    }

    let bytes_per_s = opts.dirty_rate_mb_s * 1e6;
    let mut picker = Picker {
        pattern: opts.pattern,
        pages,
        rng: Rng(mix(opts.seed ^ 0x77)),
        cursor: 0,
        burst: u64::MAX,
    };
    let mut zero_rng = Rng(mix(opts.seed ^ 0x2e70));
    let mut undo_rng = Rng(mix(opts.seed ^ 0x04d0));
    let mut buf = vec![0u8; page as usize];
    let mut stats = WorkloadStats {
        pages,
        zero_pages_filled,
        fill_time,
        ..Default::default()
    };
    let start = Instant::now();
    let mut last = start;
    let mut tokens = 0.0f64;
    loop {
        let now = Instant::now();
        let since = now - start;
        if stop.load(Ordering::Relaxed) || opts.duration.is_some_and(|d| since >= d) {
            break;
        }
        let rate = bytes_per_s * picker.rate_factor(since);
        // At most 10 ms of writes owed: after a SIGSTOP the guest does not catch up.
        tokens = (tokens + rate * (now - last).as_secs_f64()).min((rate * 0.01).max(page as f64));
        last = now;
        if tokens < page as f64 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        while tokens >= page as f64 {
            let p = picker.next(since);
            let off = p << opts.page_log2;
            let c = &mut counters[p as usize];
            if *c > 1 && below_fraction(undo_rng.next(), opts.undo_fraction) {
                // The previous write's content again.
                *c -= 1;
            } else {
                *c += 1;
            }
            // Before the data as well: `--pid` pauses with SIGSTOP, which can land between
            // the data and the mark after it; this mark keeps such a write in the final scan
            // (spec: section 11, a writer that can be stopped at any instruction).
            if let Some(log) = &log {
                log.mark(0, p);
            }
            if below_fraction(zero_rng.next(), opts.zero_fraction) {
                ram.zero(off, page);
                stats.zero_writes += 1;
            } else {
                page_content(opts.seed, p, counters[p as usize], &mut buf);
                ram.write(off, &buf);
            }
            // After the data: see crate::memory::mapped_bitmap for why the order matters.
            if let Some(log) = &log {
                log.mark(0, p);
            }
            stats.pages_written += 1;
            tokens -= page as f64;
        }
    }
    stats.run_time = start.elapsed();
    stats.bytes_written = stats.pages_written * page;
    stats.achieved_mb_s = stats.bytes_written as f64 / stats.run_time.as_secs_f64().max(1e-9) / 1e6;
    Ok(stats)
}

/// xxh3-64 of a whole file, read in 1 MiB pieces (`rdmig digest`). Equal to
/// [`RamBlock::digest`] over the whole file mapped as one block.
pub fn file_digest(path: &Path) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.digest());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use rdmig_model::PageBitmap;

    fn opts(dir: &Path, pages: u64) -> WorkloadOptions {
        WorkloadOptions {
            ram: dir.join("ram"),
            size: pages * 4096,
            page_log2: 12,
            dirty_rate_mb_s: 0.0,
            pattern: Pattern::Uniform,
            zero_fraction: 0.0,
            undo_fraction: 0.0,
            bitmap: None,
            seed: 1,
            duration: Some(Duration::ZERO),
            ready_file: None,
        }
    }

    /// Every page holds either zeros or exactly the content of its counter's write.
    fn check_contents(o: &WorkloadOptions) -> Vec<u64> {
        let bytes = std::fs::read(&o.ram).unwrap();
        let mut want = vec![0u8; 1 << o.page_log2];
        bytes
            .chunks(1 << o.page_log2)
            .enumerate()
            .map(|(p, got)| {
                let c = u64::from_le_bytes(got[..8].try_into().unwrap());
                if c == 0 {
                    assert!(
                        got.iter().all(|&b| b == 0),
                        "page {p}: counter 0 but not zero"
                    );
                } else {
                    page_content(o.seed, p as u64, c, &mut want);
                    assert!(got == want, "page {p}: content does not match counter {c}");
                }
                c
            })
            .collect()
    }

    #[test]
    fn patterns_parse() {
        assert_eq!("uniform".parse(), Ok(Pattern::Uniform));
        assert_eq!("sweep".parse(), Ok(Pattern::Sweep));
        assert_eq!("bursts".parse(), Ok(Pattern::Bursts));
        assert_eq!("hot:0.1".parse(), Ok(Pattern::Hot { fraction: 0.1 }));
        for bad in ["hot:0", "hot:1.5", "hot:x", "hot", "random", ""] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn page_content_is_deterministic_nonzero_and_distinct() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        page_content(3, 10, 1, &mut a);
        page_content(3, 10, 1, &mut b);
        assert_eq!(a, b);
        assert_eq!(&a[..8], &1u64.to_le_bytes());
        for (seed, page, counter) in [(4, 10, 1), (3, 11, 1), (3, 10, 2)] {
            page_content(seed, page, counter, &mut b);
            assert_ne!(a[8..], b[8..], "{seed} {page} {counter}");
        }
        let mut odd = vec![0u8; 21];
        page_content(3, 10, 1, &mut odd);
        assert!(odd[8..].iter().any(|&x| x != 0));
    }

    #[test]
    fn fill_is_deterministic_with_the_requested_zero_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), 2000);
        o.zero_fraction = 0.3;
        let stop = AtomicBool::new(false);
        let s = run(&o, &stop).unwrap();
        assert_eq!(s.pages_written, 0);
        assert!(
            (500..700).contains(&s.zero_pages_filled),
            "{}",
            s.zero_pages_filled
        );
        let counters = check_contents(&o);
        assert_eq!(
            counters.iter().filter(|&&c| c == 0).count() as u64,
            s.zero_pages_filled
        );
        let d1 = file_digest(&o.ram).unwrap();
        // The fill overwrites whatever the file held before.
        std::fs::write(&o.ram, vec![0xffu8; 2000 * 4096]).unwrap();
        run(&o, &stop).unwrap();
        assert_eq!(file_digest(&o.ram).unwrap(), d1);
        o.seed = 2;
        run(&o, &stop).unwrap();
        assert_ne!(file_digest(&o.ram).unwrap(), d1);
    }

    #[test]
    fn writes_are_rate_limited_and_every_changed_page_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), 256);
        o.dirty_rate_mb_s = 8.0; // about 1950 pages/s
        o.zero_fraction = 0.2;
        o.bitmap = Some(dir.path().join("log"));
        o.ready_file = Some(dir.path().join("ready"));
        o.duration = Some(Duration::from_millis(500));
        let ready = o.ready_file.clone().unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| run(&o, &stop).unwrap());
            while !ready.exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                std::fs::read_to_string(&ready).unwrap(),
                format!("{}\n", std::process::id())
            );
            let log = SharedBitmap::open(o.bitmap.as_ref().unwrap(), &[256]).unwrap();
            // Everything is marked after the fill; take it, then snapshot the contents.
            let _ = log.take_block(0);
            let before = std::fs::read(&o.ram).unwrap();
            let stats = h.join().unwrap();
            let expected = 8e6 * 0.5 / 4096.0;
            let n = stats.pages_written as f64;
            assert!(
                n > expected * 0.3 && n < expected * 1.3,
                "{n} pages written, expected about {expected}"
            );
            assert!(
                stats.zero_writes > 0 && stats.zero_writes < stats.pages_written / 2,
                "{stats:?}"
            );
            let after = std::fs::read(&o.ram).unwrap();
            let marked = log.take_block(0);
            let changed = (0..256u64).filter(|&p| {
                let r = (p as usize * 4096)..(p as usize + 1) * 4096;
                before[r.clone()] != after[r]
            });
            let mut want = PageBitmap::new(256);
            for p in changed {
                assert!(marked.get(p), "page {p} changed but is not marked");
                want.set(p);
            }
            assert!(want.count_ones() > 10);
            check_contents(&o);
        });
    }

    #[test]
    fn stop_flag_ends_the_loop_and_patterns_stay_in_range() {
        let dir = tempfile::tempdir().unwrap();
        for pattern in [
            Pattern::Sweep,
            Pattern::Bursts,
            Pattern::Hot { fraction: 0.25 },
        ] {
            let mut o = opts(dir.path(), 64);
            o.dirty_rate_mb_s = 50.0;
            o.pattern = pattern;
            o.duration = None;
            let stop = AtomicBool::new(false);
            let stats = std::thread::scope(|s| {
                let h = s.spawn(|| run(&o, &stop).unwrap());
                std::thread::sleep(Duration::from_millis(250));
                stop.store(true, Ordering::Relaxed);
                h.join().unwrap()
            });
            assert!(stats.pages_written > 100, "{pattern:?}: {stats:?}");
            let counters = check_contents(&o);
            if let Pattern::Hot { .. } = pattern {
                assert!(
                    counters[16..].iter().all(|&c| c == 1),
                    "writes outside the hot set"
                );
                assert!(counters[..16].iter().all(|&c| c > 1));
            }
            if pattern == Pattern::Sweep {
                // In order: counters never increase along the pages (one sweep front).
                let wraps = counters.windows(2).filter(|w| w[1] > w[0]).count();
                assert_eq!(wraps, 0, "{counters:?}");
            }
        }
    }

    #[test]
    fn bad_options_are_rejected_with_the_option_named() {
        let dir = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(false);
        type Change = fn(&mut WorkloadOptions);
        let cases: [(&str, Change); 6] = [
            ("size", |o| o.size = 5000),
            ("page size", |o| o.page_log2 = 40),
            ("dirty rate", |o| o.dirty_rate_mb_s = f64::NAN),
            ("zero fraction", |o| o.zero_fraction = 1.5),
            ("undo fraction", |o| o.undo_fraction = -0.1),
            ("pattern", |o| o.pattern = Pattern::Hot { fraction: 0.0 }),
        ];
        for (name, change) in cases {
            let mut o = opts(dir.path(), 4);
            change(&mut o);
            let e = run(&o, &stop).unwrap_err();
            assert!(
                matches!(e, WorkloadError::Invalid { option, .. } if option == name),
                "{e}"
            );
        }
    }

    #[test]
    fn file_digest_matches_the_block_digest() {
        let dir = tempfile::tempdir().unwrap();
        for len in [4096u64, 3 << 20] {
            let p = dir.path().join(format!("f{len}"));
            let b = RamBlock::create("f", &p, len, 12).unwrap();
            let mut content = vec![0u8; len as usize];
            page_content(9, 0, 1, &mut content);
            b.write(0, &content);
            let d = file_digest(&p).unwrap();
            assert_eq!(d, b.digest(0, len));
            assert_eq!(d, xxhash_rust::xxh3::xxh3_64(&content));
        }
        assert!(file_digest(&dir.path().join("missing")).is_err());
    }
}
