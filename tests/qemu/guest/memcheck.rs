//! memcheck: the in-guest oracle of the QEMU live-migration tests.
//!
//! Usage: `memcheck SIZE_MB RATE_MB_S`. Allocates SIZE_MB MiB as 4 KiB pages, keeps the current
//! version of every page in `versions` and fills each page with a pattern that is a pure
//! function of (page, version, word index). Then, forever, every second of CLOCK_MONOTONIC:
//! rewrites RATE_MB_S MiB worth of pseudo-randomly chosen pages at their next version, spread
//! in 10 ms slices across the second, and in between verifies pages round-robin against the
//! pattern of their recorded version. Once per second it prints
//!
//! `MEMCHECK tick=N dirtied_mb=D verified_mb=V passes=P VERIFY OK`
//!
//! (N increases by exactly 1 per line; D and V are MiB dirtied and verified during that second;
//! P counts complete verification passes over all pages). If a page did not hold the pattern
//! of its version, the tick line ends with `VERIFY BAD` and is preceded by
//!
//! `VERIFY BAD page=I version=V word=W expected=X found=Y` (the first mismatch of that second).
//!
//! The pages, the version array and the counters all live in this process's memory, so they
//! move with the guest: a write lost by a migration shows up as a mismatch.
//!
//! Build: `rustc --edition 2021 -O -C target-feature=+crt-static -o memcheck memcheck.rs`.

use std::io::Write;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Dirtying happens in this many slices per second (every 10 ms).
const SLICES: u64 = 100;
/// Pages verified between two looks at the clock.
const VERIFY_CHUNK: usize = 16;

/// The base of page `page` at version `version`; word `w` of the page holds `base ^ w`.
#[inline]
fn base(page: usize, version: u32) -> u64 {
    (((page as u64) << 32) | version as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

struct Mismatch {
    page: usize,
    version: u32,
    word: usize,
    expected: u64,
    found: u64,
}

/// One page of memory, page-aligned like the guest's own pages.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u64; WORDS]);

struct Memory {
    pages: Vec<Page>,
    versions: Vec<u32>,
}

impl Memory {
    fn new(pages: usize) -> Memory {
        let mut mem = Vec::new();
        if mem.try_reserve_exact(pages).is_err() {
            eprintln!("memcheck: cannot allocate {pages} pages");
            std::process::exit(2);
        }
        mem.resize(pages, Page([0; WORDS]));
        // Version 1 first: a zero page never matches a pattern (page 0 version 0 would).
        let mut m = Memory {
            pages: mem,
            versions: vec![1; pages],
        };
        for page in 0..pages {
            m.write(page);
        }
        m
    }

    fn pages(&self) -> usize {
        self.versions.len()
    }

    /// Writes the whole page with the pattern of its current version.
    fn write(&mut self, page: usize) {
        let b = base(page, self.versions[page]);
        let words = &mut self.pages[page].0;
        for (w, x) in words.iter_mut().enumerate() {
            *x = b ^ w as u64;
        }
    }

    /// Moves the page to its next version and rewrites it.
    fn dirty(&mut self, page: usize) {
        self.versions[page] = self.versions[page].wrapping_add(1);
        self.write(page);
    }

    /// Compares the page with the pattern of its current version.
    fn verify(&self, page: usize) -> Option<Mismatch> {
        let version = self.versions[page];
        let b = base(page, version);
        let words = &self.pages[page].0;
        let mut diff = 0u64;
        for (w, &x) in words.iter().enumerate() {
            diff |= x ^ (b ^ w as u64);
        }
        if diff == 0 {
            return None;
        }
        let word = (0..WORDS).find(|&w| words[w] != b ^ w as u64).unwrap_or(0);
        Some(Mismatch {
            page,
            version,
            word,
            expected: b ^ word as u64,
            found: words[word],
        })
    }
}

fn arg(n: usize, name: &str) -> u64 {
    let v = std::env::args().nth(n).unwrap_or_else(|| {
        eprintln!("usage: memcheck SIZE_MB RATE_MB_S");
        std::process::exit(2);
    });
    v.trim().parse().unwrap_or_else(|_| {
        eprintln!("memcheck: bad {}: {:?}", name, v);
        std::process::exit(2);
    })
}

fn main() {
    let size_mb = arg(1, "SIZE_MB");
    let rate_mb = arg(2, "RATE_MB_S");
    if size_mb == 0 {
        eprintln!("memcheck: SIZE_MB must be at least 1");
        std::process::exit(2);
    }
    let pages_per_mb = (1 << 20) / PAGE as u64;
    let pages = (size_mb * pages_per_mb) as usize;
    let rate_pages = rate_mb * pages_per_mb; // pages dirtied per second
    let mut mem = Memory::new(pages);
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "MEMCHECK READY size_mb={} rate_mb_s={}",
        size_mb, rate_mb
    );
    let _ = out.flush();

    let mut rng: u64 = 0x2545_F491_4F6C_DD1D; // xorshift64 state, never 0
    let mut tick: u64 = 0;
    let mut passes: u64 = 0;
    let mut cursor: usize = 0; // next page to verify
    let slice = Duration::from_secs(1) / SLICES as u32;
    let mut second_start = Instant::now();
    loop {
        // One second: dirtied counts pages dirtied so far, slice k (0-based) may start at
        // second_start + k * 10 ms and brings the total to rate_pages * (k + 1) / SLICES.
        let mut dirtied: u64 = 0;
        let mut verified: u64 = 0;
        let mut slices_done: u64 = 0;
        let mut first_bad: Option<Mismatch> = None;
        let end = second_start + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            // Dirty: at most one due slice per round, so verification always progresses.
            if slices_done < SLICES && now >= second_start + slice * slices_done as u32 {
                slices_done += 1;
                let target = rate_pages * slices_done / SLICES;
                while dirtied < target {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    mem.dirty((rng % pages as u64) as usize);
                    dirtied += 1;
                }
            }
            // Verify a few pages round-robin.
            for _ in 0..VERIFY_CHUNK {
                if let Some(m) = mem.verify(cursor) {
                    if first_bad.is_none() {
                        first_bad = Some(m);
                    }
                }
                verified += 1;
                cursor += 1;
                if cursor == mem.pages() {
                    cursor = 0;
                    passes += 1;
                }
            }
        }
        tick += 1;
        let status = match &first_bad {
            None => "VERIFY OK",
            Some(m) => {
                let _ = writeln!(
                    out,
                    "VERIFY BAD page={} version={} word={} expected={:#018x} found={:#018x}",
                    m.page, m.version, m.word, m.expected, m.found
                );
                "VERIFY BAD"
            }
        };
        let _ = writeln!(
            out,
            "MEMCHECK tick={} dirtied_mb={} verified_mb={} passes={} {}",
            tick,
            dirtied / pages_per_mb,
            verified / pages_per_mb,
            passes,
            status
        );
        let _ = out.flush();
        // The next second starts where this one ended; after a clock jump (the guest was
        // paused longer than a second), start afresh from now instead of catching up.
        let now = Instant::now();
        second_start = if now < end + Duration::from_secs(1) {
            end
        } else {
            now
        };
    }
}
