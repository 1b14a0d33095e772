//! Dirty trackers against a writer in another mapping of the same RAM file, the way a VMM or
//! `rdmig workload` writes while rdmig scans.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdmig::memory::dirty::{open_tracker, DirtyError, DirtyLogSpec, DirtyTracker};
use rdmig::memory::mapped_bitmap::{BitmapError, SharedBitmap};
use rdmig::memory::ram::RamBlock;
use rdmig::tools::workload::page_content;
use rdmig_check::rng::Rng;
use rdmig_model::{DirtyScan, PageBitmap};

const PAGE: u64 = 4096;

/// The writing side: its own mapping of the RAM file, and the dirty log if it keeps one.
struct Guest {
    ram: RamBlock,
    log: Option<SharedBitmap>,
}

impl Guest {
    fn new(dir: &Path, pages: u64, log: bool) -> Self {
        let ram = RamBlock::create("ram", &dir.join("ram"), pages * PAGE, 12).unwrap();
        let log = log.then(|| SharedBitmap::create(&dir.join("log"), &[pages]).unwrap());
        let g = Guest { ram, log };
        // Non-zero content everywhere except every 8th page.
        for p in 0..pages {
            if p & 7 != 0 {
                g.write(p, 1);
            }
        }
        g
    }

    /// Writes page `p` (zeros if `counter` is 0), then marks it.
    fn write(&self, p: u64, counter: u64) {
        if counter == 0 {
            self.ram.zero(p * PAGE, PAGE);
        } else {
            let mut buf = vec![0u8; PAGE as usize];
            page_content(7, p, counter, &mut buf);
            self.ram.write(p * PAGE, &buf);
        }
        if let Some(log) = &self.log {
            log.mark(0, p);
        }
    }
}

/// rdmig's side: a second mapping of the same file.
fn rdmig_blocks(dir: &Path) -> Vec<Arc<RamBlock>> {
    vec![Arc::new(
        RamBlock::open("ram", &dir.join("ram"), 12).unwrap(),
    )]
}

/// What a transport and the driver do with a scan's result: sends each reported page (a
/// ZERO range for the zero subset, the page's bytes otherwise), recording what was sent in
/// the log's table when it keeps one (spec: SCAN-2). Returns the bytes sent per page, zeros
/// for a zero range.
/// Block 0's pages only are returned.
fn send(t: &dyn DirtyTracker, blocks: &[Arc<RamBlock>], s: &DirtyScan) -> Vec<(u64, Vec<u8>)> {
    let sent = t.sent_pages();
    let mut out = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        let size = 1u64 << block.page_log2();
        for p in pages_of(&s.dirty[b]) {
            let mut bytes = vec![0u8; size as usize];
            if s.zero[b].get(p) {
                if let Some(x) = &sent {
                    x.zeroed(b as u16, p, 1);
                }
            } else {
                block.read(p * size, &mut bytes);
                if let Some(x) = &sent {
                    x.record(b as u16, p * size, &bytes);
                }
            }
            if b == 0 {
                out.push((p, bytes));
            }
        }
    }
    out
}

fn pages_of(b: &PageBitmap) -> Vec<u64> {
    (0..b.len()).filter(|&p| b.get(p)).collect()
}

/// Checks the zero subset against the file's actual bytes.
fn assert_zero_subset(scan: &DirtyScan, blocks: &[Arc<RamBlock>]) {
    for (b, block) in blocks.iter().enumerate() {
        for p in 0..block.pages() {
            let size = 1u64 << block.page_log2();
            let zero = block.is_zero(p * size, size);
            assert_eq!(
                scan.zero[b].get(p),
                scan.dirty[b].get(p) && zero,
                "page {p} of block {b}"
            );
        }
    }
}

/// Writes pages 3 (data), 8 (zeros, was zero), 9 (zeros, was data), 100 (data) from another
/// thread, and returns them.
fn write_some(g: &Guest) -> Vec<u64> {
    std::thread::scope(|s| {
        s.spawn(|| {
            g.write(3, 2);
            g.write(8, 0);
            g.write(9, 0);
            g.write(100, 5);
        });
    });
    vec![3, 8, 9, 100]
}

#[test]
fn none_reports_every_page_once() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guest::new(dir.path(), 130, false);
    let blocks = rdmig_blocks(dir.path());
    let mut t = open_tracker(&DirtyLogSpec::None, blocks.clone(), 2).unwrap();
    let first = t.scan(false).unwrap();
    assert_eq!(first.dirty[0].count_ones(), 130);
    assert_eq!(
        pages_of(&first.zero[0]),
        (0..130).step_by(8).collect::<Vec<_>>()
    );
    write_some(&g);
    assert!(!t.scan(false).unwrap().dirty[0].any());
    let all = t.scan(true).unwrap();
    assert_eq!(all.dirty[0].count_ones(), 130);
    assert_zero_subset(&all, &blocks);
}

#[test]
fn bitmap_reports_pages_marked_between_scans() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guest::new(dir.path(), 130, true);
    let blocks = rdmig_blocks(dir.path());
    let mut t = open_tracker(
        &DirtyLogSpec::Bitmap(dir.path().join("log")),
        blocks.clone(),
        2,
    )
    .unwrap();
    assert!(t.describe().contains("log"));
    // The guest marked the pages it filled; a plain scan reports them and clears them.
    assert_eq!(t.scan(false).unwrap().dirty[0].count_ones(), 130 - 17);
    assert!(!t.scan(false).unwrap().dirty[0].any());
    let written = write_some(&g);
    let s = t.scan(false).unwrap();
    assert_eq!(pages_of(&s.dirty[0]), written);
    assert_eq!(pages_of(&s.zero[0]), vec![8, 9]);
    assert_zero_subset(&s, &blocks);
    assert!(!t.scan(false).unwrap().dirty[0].any(), "fetch-and-clear");
    g.write(129, 3);
    let all = t.scan(true).unwrap();
    assert_eq!(all.dirty[0].count_ones(), 130);
    assert_zero_subset(&all, &blocks);
    assert!(
        !t.scan(false).unwrap().dirty[0].any(),
        "all also clears the log"
    );
}

#[test]
fn bitmap_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _g = Guest::new(dir.path(), 130, false);
    // Sized for 100 pages (2 words); the block has 130 (3 words).
    SharedBitmap::create(&dir.path().join("log"), &[100]).unwrap();
    let Err(e) = open_tracker(
        &DirtyLogSpec::Bitmap(dir.path().join("log")),
        rdmig_blocks(dir.path()),
        1,
    ) else {
        panic!("a bitmap for 100 pages was accepted for 130");
    };
    assert!(
        matches!(
            e,
            DirtyError::Bitmap(BitmapError::Size {
                have: 16,
                want: 24,
                ..
            })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("exactly 24 bytes"), "{e}");
    let Err(e) = open_tracker(
        &DirtyLogSpec::Bitmap(dir.path().join("missing")),
        rdmig_blocks(dir.path()),
        1,
    ) else {
        panic!("a missing bitmap was accepted");
    };
    assert!(
        matches!(e, DirtyError::Bitmap(BitmapError::Open { .. })),
        "{e}"
    );
}

#[test]
fn scan_reports_pages_whose_content_changed() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guest::new(dir.path(), 130, false);
    let blocks = rdmig_blocks(dir.path());
    let mut t = open_tracker(&DirtyLogSpec::Scan, blocks.clone(), 2).unwrap();
    let first = t.scan(false).unwrap();
    assert_eq!(
        first.dirty[0].count_ones(),
        130,
        "the first scan reports everything"
    );
    assert_zero_subset(&first, &blocks);
    // Nothing was sent yet: every page still differs from what the destination holds.
    assert_eq!(t.scan(false).unwrap().dirty[0].count_ones(), 130);
    send(t.as_ref(), &blocks, &first);
    assert!(!t.scan(false).unwrap().dirty[0].any());
    write_some(&g);
    let s = t.scan(false).unwrap();
    // Page 8 was zero and was written with zeros: unchanged, so not reported.
    assert_eq!(pages_of(&s.dirty[0]), vec![3, 9, 100]);
    assert_eq!(pages_of(&s.zero[0]), vec![9]);
    send(t.as_ref(), &blocks, &s);
    // A one-bit change at the end of a page is seen.
    g.ram.write(51 * PAGE + PAGE - 1, &[0x5a]);
    let s = t.scan(false).unwrap();
    assert_eq!(pages_of(&s.dirty[0]), vec![51]);
    // Until it is sent, the page stays dirty.
    assert_eq!(pages_of(&t.scan(false).unwrap().dirty[0]), vec![51]);
    send(t.as_ref(), &blocks, &s);
    let all = t.scan(true).unwrap();
    assert_eq!(all.dirty[0].count_ones(), 130);
    assert_zero_subset(&all, &blocks);
    assert!(!t.scan(false).unwrap().dirty[0].any());
}

/// spec: SCAN-1. A page that changes after a scan, is sent with its new bytes, and changes
/// back before the next scan (a lock taken and released) differs from what the destination
/// holds: the next scan reports it, although the page reads as the previous scan read it.
#[test]
fn scan_1_a_page_sent_between_a_change_and_its_undo_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guest::new(dir.path(), 16, false);
    let blocks = rdmig_blocks(dir.path());
    let mut t = open_tracker(&DirtyLogSpec::Scan, blocks.clone(), 1).unwrap();
    let first = t.scan(true).unwrap();
    send(t.as_ref(), &blocks, &first);
    assert!(!t.scan(false).unwrap().dirty[0].any());
    // Scan k reads A; the page becomes B; round k sends B; the page becomes A again.
    g.write(5, 2);
    let k = t.scan(false).unwrap();
    assert_eq!(pages_of(&k.dirty[0]), vec![5]);
    g.write(5, 3);
    let sent = send(t.as_ref(), &blocks, &k);
    g.write(5, 2);
    let mut now = vec![0u8; PAGE as usize];
    blocks[0].read(5 * PAGE, &mut now);
    assert_ne!(
        sent[0].1, now,
        "the destination holds the intermediate bytes"
    );
    let next = t.scan(false).unwrap();
    assert_eq!(
        pages_of(&next.dirty[0]),
        vec![5],
        "the undo is a change to resend"
    );
    send(t.as_ref(), &blocks, &next);
    assert!(!t.scan(false).unwrap().dirty[0].any());
}

/// Several blocks of different page sizes, large enough that scans run on two threads: the
/// results must be those of one thread.
#[test]
fn two_threads_find_the_same_pages_as_one_across_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let a_pages = 6000; // 23.4 MiB: split between threads
    let a = RamBlock::create("a", &dir.path().join("a"), a_pages * PAGE, 12).unwrap();
    let b = RamBlock::create("b", &dir.path().join("b"), 5 << 16, 16).unwrap();
    let mut buf = vec![0u8; PAGE as usize];
    for p in (0..a_pages).filter(|p| p % 5 > 0) {
        page_content(1, p, 1, &mut buf);
        a.write(p * PAGE, &buf);
    }
    b.write(3 << 16, &[1]);
    let blocks = vec![Arc::new(a), Arc::new(b)];
    let mut one = open_tracker(&DirtyLogSpec::Scan, blocks.clone(), 1).unwrap();
    let mut two = open_tracker(&DirtyLogSpec::Scan, blocks.clone(), 2).unwrap();
    let (s1, s2) = (one.scan(false).unwrap(), two.scan(false).unwrap());
    assert_eq!(s1, s2);
    assert_eq!(
        (s1.dirty[0].count_ones(), s1.zero[0].count_ones()),
        (a_pages, a_pages / 5)
    );
    assert_eq!(pages_of(&s1.zero[1]), vec![0, 1, 2, 4]);
    send(one.as_ref(), &blocks, &s1);
    send(two.as_ref(), &blocks, &s2);
    let mut changed = Vec::new();
    for p in (7..a_pages).step_by(97) {
        page_content(1, p, 2, &mut buf);
        blocks[0].write(p * PAGE, &buf);
        changed.push(p);
    }
    blocks[0].zero(7 * PAGE, PAGE);
    blocks[1].write(4 << 16, &[2]);
    let (s1, s2) = (one.scan(false).unwrap(), two.scan(false).unwrap());
    assert_eq!(s1, s2);
    assert_eq!(pages_of(&s1.dirty[0]), changed);
    assert_eq!(pages_of(&s1.zero[0]), vec![7]);
    assert_eq!(pages_of(&s1.dirty[1]), vec![4]);
    let mut none = open_tracker(&DirtyLogSpec::None, blocks.clone(), 2).unwrap();
    let n = none.scan(false).unwrap();
    assert_zero_subset(&n, &blocks);
    assert_eq!(
        n.zero,
        open_tracker(&DirtyLogSpec::None, blocks, 1)
            .unwrap()
            .scan(true)
            .unwrap()
            .zero
    );
}

/// A driver's rounds while the guest keeps writing: copy what each scan reports (zeros for the
/// zero subset, as zero elision sends them), then one last scan after the guest stops. The
/// copy must equal the memory: no update lost.
fn copy_while_writing(spec: fn(&Path) -> DirtyLogSpec, log: bool) {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let pages = 256;
    let g = Guest::new(dir.path(), pages, log);
    let blocks = rdmig_blocks(dir.path());
    let mut t = open_tracker(&spec, blocks.clone(), 2).unwrap();
    let mut copy = vec![0u8; (pages * PAGE) as usize];
    let apply = |t: &mut Box<dyn DirtyTracker>, copy: &mut [u8], all: bool| {
        let s = t.scan(all).unwrap();
        // The round's writes read memory a while after the scan, as a transport does.
        std::thread::yield_now();
        for (p, bytes) in send(t.as_ref(), &blocks, &s) {
            copy[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&bytes);
        }
        s.dirty[0].count_ones()
    };
    // The writer keeps writing until 20 of the driver's scans found pages it wrote (at most
    // 30 s): the scans overlap the writes however fast either side runs.
    const ROUNDS: usize = 20;
    let done = AtomicBool::new(false);
    let busy = AtomicUsize::new(0);
    let limit = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut counters = vec![1u64; pages as usize];
            let mut rng = Rng::new(12345);
            while busy.load(Ordering::Acquire) < ROUNDS && Instant::now() < limit {
                let p = rng.below(pages);
                let c = &mut counters[p as usize];
                // A quarter of the writes undo the previous one (a lock released, a counter
                // brought back), the pattern that hides a change from a log comparing scans.
                if rng.below(4) == 0 && *c > 1 {
                    *c -= 1;
                } else {
                    *c += 1;
                }
                let zero = rng.below(10) == 0;
                g.write(p, if zero { 0 } else { *c });
            }
            done.store(true, Ordering::Release);
        });
        apply(&mut t, &mut copy, true);
        while !done.load(Ordering::Acquire) {
            if apply(&mut t, &mut copy, false) > 0 {
                busy.fetch_add(1, Ordering::AcqRel);
            }
        }
    });
    let rounds = busy.load(Ordering::Acquire);
    assert!(
        rounds >= ROUNDS,
        "{spec:?}: only {rounds} scans saw the writer's pages in 30 s"
    );
    apply(&mut t, &mut copy, false);
    let mut mem = vec![0u8; copy.len()];
    blocks[0].read(0, &mut mem);
    let bad: Vec<u64> = (0..pages)
        .filter(|&p| {
            copy[(p * PAGE) as usize..((p + 1) * PAGE) as usize]
                != mem[(p * PAGE) as usize..((p + 1) * PAGE) as usize]
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{spec:?}: pages {bad:?} differ after {rounds} rounds"
    );
    assert_eq!(
        apply(&mut t, &mut copy, false),
        0,
        "nothing written after the writer stopped"
    );
}

#[test]
fn bitmap_copy_while_writing_loses_nothing() {
    copy_while_writing(|dir| DirtyLogSpec::Bitmap(dir.join("log")), true);
}

#[test]
fn scan_copy_while_writing_loses_nothing() {
    copy_while_writing(|_| DirtyLogSpec::Scan, false);
}

#[test]
fn soft_dirty_is_refused_with_the_reason_when_the_kernel_lacks_it() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guest::new(dir.path(), 16, false);
    // This process maps the RAM file (through `g`), so it is its own target.
    let spec: DirtyLogSpec = format!("soft-dirty:{}", std::process::id())
        .parse()
        .unwrap();
    match open_tracker(&spec, rdmig_blocks(dir.path()), 1) {
        Err(DirtyError::SoftDirtyUnsupported) => {
            let msg = DirtyError::SoftDirtyUnsupported.to_string();
            assert!(
                msg.contains("CONFIG_MEM_SOFT_DIRTY") && msg.contains("bitmap:PATH"),
                "{msg}"
            );
        }
        Ok(mut t) => {
            // A kernel with soft-dirty: the real thing must work.
            assert_eq!(t.scan(false).unwrap().dirty[0].count_ones(), 16);
            g.write(5, 9);
            assert_eq!(pages_of(&t.scan(false).unwrap().dirty[0]), vec![5]);
        }
        Err(e) => panic!("soft-dirty probe failed for another reason: {e}"),
    }
}

/// Throughput of the `scan` tracker and of the zero check on a 256 MiB file, 1 and 2 threads:
/// `cargo test -p rdmig --release --test dirty -- --ignored --nocapture scan_rate`
#[test]
#[ignore = "benchmark: run in release"]
fn scan_rate_on_a_256_mib_file() {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let pages = 65536;
    let ram = RamBlock::create("ram", &dir.path().join("ram"), pages * PAGE, 12).unwrap();
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..pages {
        page_content(3, p, 1, &mut buf);
        ram.write(p * PAGE, &buf);
    }
    let blocks = vec![Arc::new(ram)];
    for threads in [1, 2] {
        let best = (0..3)
            .map(|_| rdmig::memory::dirty::scan_rate(blocks.clone(), threads))
            .fold(0.0, f64::max);
        let mut none = open_tracker(&DirtyLogSpec::None, blocks.clone(), threads).unwrap();
        let start = Instant::now();
        let all = none.scan(true).unwrap();
        let zero_rate = (pages * PAGE) as f64 / start.elapsed().as_secs_f64() / 1e9;
        assert!(!all.zero[0].any());
        println!(
            "{threads} thread(s): scan tracker {best:.2} GB/s ({:.2} per core), zero check of every page {zero_rate:.2} GB/s",
            best / threads as f64
        );
        assert!(best > 0.2, "scan rate {best} GB/s");
    }
}
