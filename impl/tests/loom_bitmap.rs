//! Exhaustive interleaving check of the shared dirty log's two algorithms
//! (`rdmig::memory::mapped_bitmap::{mark_page, take_word}`): a writer that writes a page and then marks
//! it, against a scanner that fetches-and-clears the log and then copies the marked pages.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p rdmig --test loom_bitmap --release`
//!
//! Page data is modelled as one relaxed atomic per page: in reality it is plain memory written
//! by another process, which rdmig copies without synchronisation (a torn copy is fine because
//! the page is marked again), so the only ordering it gets is what the log's release/acquire
//! pair provides, which is exactly what relaxed atomics leave to it. The models that use the
//! wrong order or the wrong orderings must fail, which shows the check has teeth.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering::Relaxed};
use loom::sync::Arc;
use rdmig::memory::mapped_bitmap::{mark_page, take_word};

const PAGES: usize = 2;

/// Guest memory and its dirty log (one word covers both pages).
struct Mem {
    data: [AtomicU64; PAGES],
    log: [AtomicU64; 1],
}

/// Page writes in program order: (page, value). Page 0 is written twice, so a scanner that
/// copied the first value must come back for the second.
const WRITES: &[(usize, u64)] = &[(0, 1), (1, 1), (0, 2)];

fn last_value(page: usize) -> u64 {
    WRITES.iter().rev().find(|w| w.0 == page).map_or(0, |w| w.1)
}

type Writer = fn(&Mem, usize, u64);
type Scanner = fn(&Mem, &mut [u64; PAGES]);

/// The protocol: write the data, then mark.
fn writer_ok(m: &Mem, page: usize, v: u64) {
    m.data[page].store(v, Relaxed);
    mark_page(&m.log, page as u64);
}

/// The protocol: fetch and clear, then copy the marked pages.
fn scanner_ok(m: &Mem, copy: &mut [u64; PAGES]) {
    let bits = take_word(&m.log, 0);
    for (p, c) in copy.iter_mut().enumerate() {
        if bits & (1 << p) != 0 {
            *c = m.data[p].load(Relaxed);
        }
    }
}

/// Runs the writer concurrently with `scans` scans, then one final scan after the writer is
/// done (the round taken with the workload paused), and checks that the copy is current.
fn check(writer: Writer, scanner: Scanner, scans: usize) {
    loom::model(move || {
        let m = Arc::new(Mem {
            data: [AtomicU64::new(0), AtomicU64::new(0)],
            log: [AtomicU64::new(0)],
        });
        let w = {
            let m = m.clone();
            loom::thread::spawn(move || {
                for &(p, v) in WRITES {
                    writer(&m, p, v);
                }
            })
        };
        // The destination starts with the memory as it was before the writer ran.
        let mut copy = [0u64; PAGES];
        for _ in 0..scans {
            scanner(&m, &mut copy);
        }
        w.join().unwrap();
        scanner(&m, &mut copy);
        for (p, &c) in copy.iter().enumerate() {
            assert_eq!(
                c,
                last_value(p),
                "lost update: page {p} copied as {c}, last written {}",
                last_value(p)
            );
        }
    });
}

#[test]
fn no_update_is_lost_with_one_concurrent_scan() {
    check(writer_ok, scanner_ok, 1);
}

#[test]
fn no_update_is_lost_with_two_concurrent_scans() {
    check(writer_ok, scanner_ok, 2);
}

#[test]
#[should_panic(expected = "lost update")]
fn marking_before_writing_loses_updates() {
    check(
        |m, page, v| {
            mark_page(&m.log, page as u64);
            m.data[page].store(v, Relaxed);
        },
        scanner_ok,
        1,
    );
}

#[test]
#[should_panic(expected = "lost update")]
fn copying_before_clearing_loses_updates() {
    check(
        writer_ok,
        |m, copy| {
            let before: Vec<u64> = m.data.iter().map(|d| d.load(Relaxed)).collect();
            let bits = take_word(&m.log, 0);
            for (p, c) in copy.iter_mut().enumerate() {
                if bits & (1 << p) != 0 {
                    *c = before[p];
                }
            }
        },
        1,
    );
}

#[test]
#[should_panic(expected = "lost update")]
fn relaxed_marking_loses_updates() {
    check(
        |m, page, v| {
            m.data[page].store(v, Relaxed);
            m.log[0].fetch_or(1 << page, Relaxed);
        },
        scanner_ok,
        1,
    );
}
