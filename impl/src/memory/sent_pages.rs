//! What the destination holds, as the source knows it: the hash of the bytes each page was
//! last sent with (spec: section 11.2, SCAN-1 .. SCAN-3).
//!
//! The `scan` dirty log finds changed pages by hashing memory. Comparing a page's hash with
//! the hash the *previous scan* read loses an update whenever the page changes and changes
//! back between two scans while a write sends the intermediate bytes: scan k reads A, the
//! guest stores B, round k sends B, the guest stores A again (a lock taken and released, a
//! counter up and down), scan k+1 reads A and calls the page clean, and the destination keeps
//! B. So the log compares with what was *sent*: every transport that carries writes for a
//! hashing log reads each write's bytes once into a private copy, hashes its pages into this
//! table, and sends the copy; the driver records the pages of every ZERO range it posts as
//! all-zero. A scan then reports a page dirty exactly when memory differs from what the
//! destination will hold once every posted transfer lands.
//!
//! Stores happen in round order (a round's writes are sent before its ROUND_END, the next
//! round's ZERO ranges and writes after ROUND_ACK, RND-2, RND-3), so after a round completes
//! the table is exact. A scan taken early, beside the round's writes (RND-3), may read a
//! page's entry before or after that round sends it: either way it errs only towards sending
//! the page again, and the final scan, which no write overlaps, compares with the exact table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::memory::ram::RamBlock;

/// Per block, per page: xxh3-64 of the bytes the destination holds or will hold.
pub struct SentPages {
    hashes: Vec<Vec<AtomicU64>>,
    page_log2: Vec<u8>,
    zero_hash: Vec<u64>,
}

impl SentPages {
    /// A table for `blocks`, every entry unknown (the first scan reports every page anyway).
    pub fn new(blocks: &[Arc<RamBlock>]) -> Arc<SentPages> {
        Arc::new(SentPages {
            hashes: blocks
                .iter()
                .map(|b| (0..b.pages()).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            page_log2: blocks.iter().map(|b| b.page_log2()).collect(),
            zero_hash: blocks
                .iter()
                .map(|b| xxhash_rust::xxh3::xxh3_64(&vec![0u8; 1usize << b.page_log2()]))
                .collect(),
        })
    }

    /// The hash of the bytes last sent for `page` of `block`.
    pub fn get(&self, block: usize, page: u64) -> u64 {
        // Relaxed: a store of a round happens before its completion event, which the driver
        // receives before it asks for the final scan (a channel send and receive order them).
        self.hashes[block][page as usize].load(Ordering::Relaxed)
    }

    /// Sets the entry of `page` of `block` to `hash`.
    pub fn set(&self, block: usize, page: u64, hash: u64) {
        self.hashes[block][page as usize].store(hash, Ordering::Relaxed);
    }

    /// `bytes` (whole pages from `offset` of `block`) are about to be sent: records each
    /// page's hash. The bytes must be the very ones sent, a private copy no one else writes.
    /// A block the table does not cover (the device state's buffer, spec: STATE-2) records
    /// nothing: no dirty log scans it.
    pub fn record(&self, block: u16, offset: u64, bytes: &[u8]) {
        let b = block as usize;
        let Some(&log2) = self.page_log2.get(b) else {
            return;
        };
        debug_assert_eq!(offset & ((1 << log2) - 1), 0, "writes cover whole pages");
        let first = offset >> log2;
        for (i, page) in bytes.chunks(1 << log2).enumerate() {
            let h = xxhash_rust::xxh3::xxh3_64(page);
            self.hashes[b][first as usize + i].store(h, Ordering::Relaxed);
        }
    }

    /// A ZERO range is posted: the destination will hold zeros on `[first, first+count)`.
    pub fn zeroed(&self, block: u16, first: u64, count: u64) {
        let b = block as usize;
        let z = self.zero_hash[b];
        for p in first..first + count {
            self.hashes[b][p as usize].store(z, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sent_bytes_and_zero_ranges_per_page() {
        let b = Arc::new(RamBlock::anonymous("b", 4 * 4096, 12).unwrap());
        let s = SentPages::new(&[b]);
        let mut bytes = vec![7u8; 2 * 4096];
        bytes[4096] = 8;
        s.record(0, 4096, &bytes);
        assert_eq!(s.get(0, 1), xxhash_rust::xxh3::xxh3_64(&bytes[..4096]));
        assert_eq!(s.get(0, 2), xxhash_rust::xxh3::xxh3_64(&bytes[4096..]));
        assert_eq!(s.get(0, 0), 0);
        s.zeroed(0, 2, 2);
        assert_eq!(s.get(0, 2), xxhash_rust::xxh3::xxh3_64(&[0u8; 4096]));
        assert_eq!(s.get(0, 3), s.get(0, 2));
        assert_eq!(s.get(0, 1), xxhash_rust::xxh3::xxh3_64(&bytes[..4096]));
    }
}
