//! A dirty log in shared memory: the interface between a writer of guest memory (a VMM, or
//! `rdmig workload`) and rdmig, in the style of vhost-user's shared log.
//!
//! # File layout
//!
//! The file holds one bit per page of every RAM block, blocks in the order both sides agree on
//! (the order of rdmig's block table). Block `b` with `pages[b]` pages owns
//! `ceil(pages[b] / 64)` consecutive 64-bit words, starting right after the previous block's
//! words; nothing else is in the file (no header, no padding), so its size is exactly
//! `8 * sum(ceil(pages[b] / 64))` bytes. Page `p` of a block is bit `p % 64` (bit 0 being the
//! least significant) of the block's word `p / 64`. Words are little-endian in the file on every
//! host. Bits past a block's last page are never set by writers and are ignored by readers.
//!
//! # Protocol
//!
//! * A writer stores a page's new data, then sets the page's bit with an atomic 64-bit
//!   fetch-or with release ordering ([`mark_page`]). Writers must use 64-bit atomic
//!   read-modify-write instructions on the aligned word (a plain store could erase bits that
//!   another writer or rdmig's clear just changed).
//! * rdmig fetches and clears each word with an atomic swap to zero with acquire ordering
//!   ([`take_word`]), and only then reads the pages whose bits were set.
//!
//! Why this order never loses an update: all read-modify-writes of one word are totally ordered
//! (the word's modification order), and each reads the value the previous one left. Take a
//! writer's mark `M` (after its data write `D`) and rdmig's swap `S` (before its page read `R`).
//! If `S` comes after `M`, `S` returns the bit, and since `S` acquires what `M` released, `D`
//! happens before `R`: rdmig reads `D`'s data (or newer). If `S` comes before `M`, the bit stays
//! set until the next swap, which reports the page again, and the round after that reads it (the
//! last round runs with the writer paused, so some swap is always after every mark). The two
//! wrong orders each lose data: a writer marking before writing can be cleared and read before
//! its data lands, and a reader clearing after reading discards a mark whose data it never
//! read. `tests/loom_bitmap.rs` checks both the right order and that the wrong ones fail.
//!
//! A page read while it is being written may be torn; that is harmless, because the write's mark
//! comes after it and makes the page dirty again.
//!
//! The algorithms are generic over [`LogWord`] so that loom (`--cfg loom`) can check them with
//! its own atomics; [`SharedBitmap`] always uses the standard atomics over the mapped file.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use rdmig_model::PageBitmap;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BitmapError {
    #[error("dirty bitmap {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dirty bitmap {path} is {have} bytes, but the RAM blocks need exactly {want} bytes ({pages:?} pages)")]
    Size {
        path: PathBuf,
        have: u64,
        want: u64,
        pages: Vec<u64>,
    },
    #[error("dirty bitmap {path}: no pages to track")]
    Empty { path: PathBuf },
    #[error("mapping dirty bitmap {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One 64-bit word of a dirty log, as seen by the two algorithms.
pub trait LogWord {
    /// Atomically ORs `bits` (host order) into the word, with release ordering.
    fn or_release(&self, bits: u64);
    /// Atomically replaces the word with zero and returns its bits (host order), with acquire
    /// ordering.
    fn take_acquire(&self) -> u64;
}

impl LogWord for AtomicU64 {
    fn or_release(&self, bits: u64) {
        self.fetch_or(bits.to_le(), Ordering::Release);
    }
    fn take_acquire(&self) -> u64 {
        u64::from_le(self.swap(0, Ordering::Acquire))
    }
}

#[cfg(loom)]
impl LogWord for loom::sync::atomic::AtomicU64 {
    fn or_release(&self, bits: u64) {
        self.fetch_or(bits.to_le(), loom::sync::atomic::Ordering::Release);
    }
    fn take_acquire(&self) -> u64 {
        u64::from_le(self.swap(0, loom::sync::atomic::Ordering::Acquire))
    }
}

/// Writer side: marks `page` of a block whose words are `words`. Call it after the page's new
/// data is fully written (see the module documentation for why).
pub fn mark_page<W: LogWord>(words: &[W], page: u64) {
    words[(page / 64) as usize].or_release(1 << (page % 64));
}

/// Reader side: fetches and clears word `i`. Read the pages it names only after this returns.
pub fn take_word<W: LogWord>(words: &[W], i: usize) -> u64 {
    words[i].take_acquire()
}

/// Number of 64-bit words a block of `pages` pages occupies.
pub fn block_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// A mapped dirty-log file (layout in the module documentation).
pub struct SharedBitmap {
    map: MmapRaw,
    path: PathBuf,
    pages: Vec<u64>,
    /// Index of each block's first word, plus the total word count at the end.
    first_word: Vec<usize>,
}

impl std::fmt::Debug for SharedBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBitmap")
            .field("path", &self.path)
            .field("pages", &self.pages)
            .finish()
    }
}

impl SharedBitmap {
    /// Size in bytes of the log for blocks of `pages` pages each.
    pub fn file_size(pages: &[u64]) -> u64 {
        pages.iter().map(|&p| block_words(p) as u64 * 8).sum()
    }

    /// Creates (or truncates) the log for blocks of `pages` pages and maps it, all bits clear.
    /// Used by the writer of the memory (the workload).
    pub fn create(path: &Path, pages: &[u64]) -> Result<Self, BitmapError> {
        let want = Self::file_size(pages);
        if want == 0 {
            return Err(BitmapError::Empty { path: path.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| BitmapError::Open {
                path: path.into(),
                source,
            })?;
        file.set_len(want).map_err(|source| BitmapError::Open {
            path: path.into(),
            source,
        })?;
        Self::map(path, &file, pages, want)
    }

    /// Opens an existing log, whose size must be exactly what `pages` needs (a mismatch means
    /// the writer and rdmig disagree about the blocks, and every bit would be misattributed).
    pub fn open(path: &Path, pages: &[u64]) -> Result<Self, BitmapError> {
        let want = Self::file_size(pages);
        if want == 0 {
            return Err(BitmapError::Empty { path: path.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| BitmapError::Open {
                path: path.into(),
                source,
            })?;
        let have = file
            .metadata()
            .map_err(|source| BitmapError::Open {
                path: path.into(),
                source,
            })?
            .len();
        if have != want {
            return Err(BitmapError::Size {
                path: path.into(),
                have,
                want,
                pages: pages.to_vec(),
            });
        }
        Self::map(path, &file, pages, want)
    }

    fn map(
        path: &Path,
        file: &std::fs::File,
        pages: &[u64],
        len: u64,
    ) -> Result<Self, BitmapError> {
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(file)
            .map_err(|source| BitmapError::Map {
                path: path.into(),
                source,
            })?;
        let mut first_word = Vec::with_capacity(pages.len() + 1);
        let mut at = 0;
        for &p in pages {
            first_word.push(at);
            at += block_words(p);
        }
        first_word.push(at);
        Ok(SharedBitmap {
            map,
            path: path.into(),
            pages: pages.to_vec(),
            first_word,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pages of each block, in file order.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Every word of the file.
    pub fn words(&self) -> &[AtomicU64] {
        let n = self.first_word[self.pages.len()];
        // SAFETY: the mapping is page-aligned (so 8-aligned) and `n * 8` bytes long (its length
        // was computed from the same `pages`), and it lives as long as `self`, which the
        // returned slice borrows. `AtomicU64` has the size and bit validity of `u64`, every bit
        // pattern is valid, and it permits shared mutation through `&`, which is what other
        // threads and processes mapping the file do. A process that truncates the file under us
        // makes accesses fault (SIGBUS), exactly as for the RAM file itself.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU64, n) }
    }

    /// Words of block `block`.
    pub fn block(&self, block: usize) -> &[AtomicU64] {
        &self.words()[self.first_word[block]..self.first_word[block + 1]]
    }

    /// Marks `page` of `block` dirty; call after writing the page (see the module docs).
    pub fn mark(&self, block: usize, page: u64) {
        assert!(
            page < self.pages[block],
            "page {page} beyond block {block} of {} pages",
            self.pages[block]
        );
        mark_page(self.block(block), page);
    }

    /// Marks every page of every block dirty (after filling memory before anyone scanned it).
    pub fn mark_all(&self) {
        for (b, &pages) in self.pages.iter().enumerate() {
            let full = PageBitmap::full(pages);
            for (w, &bits) in self.block(b).iter().zip(full.words()) {
                w.or_release(bits);
            }
        }
    }

    /// Fetches and clears block `block`'s bits. Read the pages only after this returns.
    pub fn take_block(&self, block: usize) -> PageBitmap {
        let words = self.block(block);
        let taken = (0..words.len()).map(|i| take_word(words, i)).collect();
        PageBitmap::from_words(taken, self.pages[block]).expect("word count matches page count")
    }

    /// Fetches and clears every block's bits.
    pub fn take_all(&self) -> Vec<PageBitmap> {
        (0..self.pages.len()).map(|b| self.take_block(b)).collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn layout_is_blocks_of_le_words_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let bm = SharedBitmap::create(&p, &[65, 64, 1]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 * (2 + 1 + 1));
        bm.mark(0, 64);
        bm.mark(1, 63);
        bm.mark(2, 0);
        bm.mark(0, 0);
        let bytes = std::fs::read(&p).unwrap();
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!([word(0), word(1), word(2), word(3)], [1, 1, 1 << 63, 1]);
    }

    #[test]
    fn take_returns_marks_once_and_ignores_tail_bits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let writer = SharedBitmap::create(&p, &[70, 3]).unwrap();
        let reader = SharedBitmap::open(&p, &[70, 3]).unwrap();
        writer.mark(0, 69);
        writer.mark(1, 2);
        // A sloppy writer setting a bit past the block's end must not leak into the scan.
        writer.block(1)[0].or_release(1 << 10);
        let got = reader.take_all();
        assert_eq!(got[0].next_set(0), Some(69));
        assert_eq!(got[0].count_ones(), 1);
        assert_eq!(got[1].count_ones(), 1);
        assert!(got[1].get(2));
        assert!(reader.take_all().iter().all(|b| !b.any()));
        writer.mark_all();
        let all = reader.take_all();
        assert_eq!((all[0].count_ones(), all[1].count_ones()), (70, 3));
    }

    #[test]
    fn open_checks_size_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        SharedBitmap::create(&p, &[128]).unwrap();
        assert!(SharedBitmap::open(&p, &[128]).is_ok());
        let e = SharedBitmap::open(&p, &[129]).unwrap_err();
        assert!(
            matches!(
                e,
                BitmapError::Size {
                    have: 16,
                    want: 24,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            SharedBitmap::open(&p, &[]),
            Err(BitmapError::Empty { .. })
        ));
        assert!(matches!(
            SharedBitmap::open(&dir.path().join("none"), &[1]),
            Err(BitmapError::Open { .. })
        ));
    }
}
