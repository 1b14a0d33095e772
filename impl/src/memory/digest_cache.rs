//! Verification digests kept current while a migration runs, so that after the pause (source)
//! or after PREPARE (destination) only what is not known is digested (spec: SW-4, SW-5).
//!
//! The cache holds one value per *unit*: per chunk for the `Xxh3_64` digest (the chunk's
//! bytes hashed whole), per page for `Xxh3PageTree` (each page hashed; a chunk's digest is the
//! hash of its pages' hashes). Units are grouped under one lock per chunk.
//!
//! A write announces itself before it touches memory ([`DigestCache::begin`]): every unit it
//! touches forgets its value and moves to a new generation. When the write has landed
//! ([`DigestCache::end`]), each unit it covered whole gets the hash of its bytes, read back
//! from memory, but only if no other write began on that unit meanwhile. The source uses the
//! same two steps for what its dirty scans report ([`DigestCache::invalidate_pages`]) and a
//! background [`DigestCache::fill`]. So a cached value is always the hash of the unit's bytes
//! as the last write left them; anything uncertain is computed again at the end. The digests
//! are the protocol's whichever way they were obtained.

use std::sync::{Arc, Mutex};

use rdmig_model::digest::tree_digest;
use rdmig_model::wire::DigestAlg;

use super::ram::RamBlock;

/// One chunk's units.
#[derive(Debug, Clone, Default)]
struct Units {
    generation: Vec<u32>,
    hash: Vec<Option<u64>>,
}

/// A write in progress: the units it touches and their generations at its start.
#[derive(Debug)]
pub struct Ticket {
    block: usize,
    offset: u64,
    len: u64,
    generations: Vec<(usize, usize, u32)>,
}

pub struct DigestCache {
    alg: DigestAlg,
    chunk_log2: u8,
    /// log2 of a unit: the chunk (Xxh3_64) or the page (Xxh3PageTree).
    unit_log2: u8,
    /// Global index of each block's first chunk, and each block's length.
    first_chunk: Vec<usize>,
    block_len: Vec<u64>,
    chunks: Vec<Mutex<Units>>,
}

impl DigestCache {
    /// A cache for digests `alg` (Xxh3_64 or Xxh3PageTree) of `blocks` in chunks of
    /// `1 << chunk_log2` bytes.
    pub fn new(blocks: &[Arc<RamBlock>], alg: DigestAlg, chunk_log2: u8) -> DigestCache {
        assert!(alg != DigestAlg::None, "nothing to cache");
        let chunk = 1u64 << chunk_log2;
        let page_log2 = blocks.iter().map(|b| b.page_log2()).min().unwrap_or(12);
        let unit_log2 = match alg {
            DigestAlg::Xxh3PageTree => page_log2.min(chunk_log2),
            _ => chunk_log2,
        };
        let mut first_chunk = Vec::with_capacity(blocks.len());
        let mut chunks = Vec::new();
        for b in blocks {
            first_chunk.push(chunks.len());
            for c in 0..b.len().div_ceil(chunk) {
                let len = chunk.min(b.len() - c * chunk);
                let n = len.div_ceil(1 << unit_log2) as usize;
                chunks.push(Mutex::new(Units {
                    generation: vec![0; n],
                    hash: vec![None; n],
                }));
            }
        }
        DigestCache {
            alg,
            chunk_log2,
            unit_log2,
            first_chunk,
            block_len: blocks.iter().map(|b| b.len()).collect(),
            chunks,
        }
    }

    pub fn alg(&self) -> DigestAlg {
        self.alg
    }

    pub fn chunk_log2(&self) -> u8 {
        self.chunk_log2
    }

    /// The units `[offset, offset+len)` of `block` touches: (global chunk, first unit, end).
    /// Nothing for a block the cache does not cover: the state area is no RAM, and its
    /// device state has a digest of its own (spec: STATE-2, STATE-5).
    fn touched(&self, block: usize, offset: u64, len: u64) -> Vec<(usize, usize, usize)> {
        if len == 0 || block >= self.first_chunk.len() {
            return Vec::new();
        }
        let (first, last) = (
            offset >> self.chunk_log2,
            (offset + len - 1) >> self.chunk_log2,
        );
        (first..=last)
            .map(|c| {
                let base = c << self.chunk_log2;
                let a = offset.max(base) - base;
                let b = (offset + len).min(base + (1 << self.chunk_log2)) - base;
                let u0 = (a >> self.unit_log2) as usize;
                let u1 = ((b - 1) >> self.unit_log2) as usize + 1;
                (self.first_chunk[block] + c as usize, u0, u1)
            })
            .collect()
    }

    /// Byte range of unit `u` of global chunk `c` within its block.
    fn unit_span(&self, block: usize, c: usize, u: usize) -> (u64, u64) {
        let chunk_off = ((c - self.first_chunk[block]) as u64) << self.chunk_log2;
        let off = chunk_off + ((u as u64) << self.unit_log2);
        let chunk_end = (chunk_off + (1 << self.chunk_log2)).min(self.block_len[block]);
        (off, (1u64 << self.unit_log2).min(chunk_end - off))
    }

    /// A write of `[offset, offset+len)` of `block` is about to land.
    pub fn begin(&self, block: usize, offset: u64, len: u64) -> Ticket {
        let mut generations = Vec::new();
        for (c, u0, u1) in self.touched(block, offset, len) {
            let mut units = self.chunks[c].lock().unwrap();
            for u in u0..u1 {
                units.generation[u] = units.generation[u].wrapping_add(1);
                units.hash[u] = None;
                generations.push((c, u, units.generation[u]));
            }
        }
        Ticket {
            block,
            offset,
            len,
            generations,
        }
    }

    /// The write of `t` landed in `memory` (the block it named): units it covered whole, and
    /// that no other write began on since, get the hash of their bytes.
    pub fn end(&self, t: Ticket, memory: &RamBlock) {
        let at = t.offset;
        self.end_with(t, memory, at)
    }

    /// As [`end`](Self::end), with the bytes read from `memory` at `at` onwards instead of
    /// from the block the write named: the buffer a write was made from, where the bytes
    /// that landed cannot be read back cheaply (a file written with `O_DIRECT`).
    pub fn end_with(&self, t: Ticket, memory: &RamBlock, at: u64) {
        // Where the unit at block offset `off` is in `memory`.
        let src = |off: u64| off - t.offset + at;
        let spans: Vec<(u64, u64)> = t
            .generations
            .iter()
            .map(|&(c, u, _)| self.unit_span(t.block, c, u))
            .collect();
        // A unit covered in part: its other bytes are not this write's to vouch for.
        let whole = |&(off, len): &(u64, u64)| off >= t.offset && off + len <= t.offset + t.len;
        let hashes: Vec<Option<u64>> = if self.alg == DigestAlg::Xxh3PageTree {
            // The pages this write covered whole, in one pass (they are contiguous).
            let covered: Vec<&(u64, u64)> = spans.iter().filter(|s| whole(s)).collect();
            let mut h = Vec::with_capacity(covered.len());
            if let (Some(first), Some(last)) = (covered.first(), covered.last()) {
                memory.page_hashes(
                    src(first.0),
                    last.0 + last.1 - first.0,
                    self.unit_log2,
                    &mut h,
                );
            }
            let mut h = h.into_iter();
            spans
                .iter()
                .map(|s| if whole(s) { h.next() } else { None })
                .collect()
        } else {
            spans
                .iter()
                .map(|s| whole(s).then(|| self.hash_unit(memory, src(s.0), s.1)))
                .collect()
        };
        self.store(&t, hashes);
    }

    /// A zero fill of `t` landed: units it covered whole hash as zero bytes, without reading
    /// them back (a save file's zero ranges are holes, which a read would allocate on some
    /// file systems).
    pub fn end_zero(&self, t: Ticket) {
        // Units have one length but for a block's last chunk: hash each length once.
        let mut known: Vec<(u64, u64)> = Vec::new();
        let mut zero_hash = |len: u64| match known.iter().find(|k| k.0 == len) {
            Some(&(_, h)) => h,
            None => {
                let h = rdmig_model::digest::chunk_digest(&vec![0u8; len as usize]);
                known.push((len, h));
                h
            }
        };
        let hashes = t
            .generations
            .iter()
            .map(|&(c, u, _)| {
                let (off, len) = self.unit_span(t.block, c, u);
                (off >= t.offset && off + len <= t.offset + t.len).then(|| zero_hash(len))
            })
            .collect();
        self.store(&t, hashes);
    }

    /// Sets the hashes of `t`'s units (`None`: unknown), where no other write began since.
    fn store(&self, t: &Ticket, hashes: Vec<Option<u64>>) {
        let mut held: Option<(usize, std::sync::MutexGuard<'_, Units>)> = None;
        for (&(c, u, generation), h) in t.generations.iter().zip(hashes) {
            let Some(h) = h else { continue };
            if held.as_ref().is_none_or(|(hc, _)| *hc != c) {
                held = Some((c, self.chunks[c].lock().unwrap()));
            }
            let units = &mut held.as_mut().expect("held").1;
            if units.generation[u] == generation {
                units.hash[u] = Some(h);
            }
        }
    }

    /// Pages `[first, first+count)` of `block` may have changed (a dirty scan said so): their
    /// units forget their hashes.
    pub fn invalidate_pages(&self, block: usize, first: u64, count: u64, page_log2: u8) {
        drop(self.begin(block, first << page_log2, count << page_log2));
    }

    /// Every unit as (block, global chunk, unit).
    fn units(&self) -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for (b, &first) in self.first_chunk.iter().enumerate() {
            let end = self
                .first_chunk
                .get(b + 1)
                .copied()
                .unwrap_or(self.chunks.len());
            for c in first..end {
                let n = self.chunks[c].lock().unwrap().hash.len();
                v.extend((0..n).map(|u| (b, c, u)));
            }
        }
        v
    }

    /// Hashes every unit that has none yet, from memory as it is now, with `threads` threads;
    /// a unit invalidated meanwhile stays without one. Returns how many it stored.
    pub fn fill(&self, blocks: &[Arc<RamBlock>], threads: usize) -> usize {
        let todo: Vec<(usize, usize, usize, u32)> = self
            .units()
            .into_iter()
            .filter_map(|(b, c, u)| {
                let units = self.chunks[c].lock().unwrap();
                units.hash[u]
                    .is_none()
                    .then_some((b, c, u, units.generation[u]))
            })
            .collect();
        let stored = std::sync::atomic::AtomicUsize::new(0);
        let per = todo.len().div_ceil(threads.clamp(1, 64)).max(1);
        std::thread::scope(|sc| {
            for part in todo.chunks(per) {
                let stored = &stored;
                sc.spawn(move || {
                    for &(b, c, u, generation) in part {
                        let (off, len) = self.unit_span(b, c, u);
                        let h = blocks[b].digest(off, len);
                        let mut units = self.chunks[c].lock().unwrap();
                        if units.generation[u] == generation {
                            units.hash[u] = Some(h);
                            stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        stored.into_inner()
    }

    /// The hash of one unit's bytes: a page's, or a whole chunk's.
    fn hash_unit(&self, memory: &RamBlock, off: u64, len: u64) -> u64 {
        memory.digest(off, len)
    }

    /// The chunk digests of `blocks` (the blocks this cache was made for), hashing the units
    /// not known with `threads` threads (memory must be quiescent); also how many units that
    /// was.
    pub fn digests(&self, blocks: &[Arc<RamBlock>], threads: usize) -> (Vec<u64>, usize) {
        // Every chunk as (block, global index), split evenly across the threads.
        let all: Vec<(usize, usize)> = self
            .first_chunk
            .iter()
            .enumerate()
            .flat_map(|(b, &first)| {
                let end = self
                    .first_chunk
                    .get(b + 1)
                    .copied()
                    .unwrap_or(self.chunks.len());
                (first..end).map(move |c| (b, c))
            })
            .collect();
        let mut out = vec![0u64; all.len()];
        let computed = std::sync::atomic::AtomicUsize::new(0);
        let per = all.len().div_ceil(threads.clamp(1, 64)).max(1);
        std::thread::scope(|sc| {
            for (outs, ins) in out.chunks_mut(per).zip(all.chunks(per)) {
                let computed = &computed;
                sc.spawn(move || {
                    let mut page_hashes = Vec::new();
                    for (o, &(b, c)) in outs.iter_mut().zip(ins) {
                        let units = self.chunks[c].lock().unwrap().hash.clone();
                        let missing = units.iter().filter(|h| h.is_none()).count();
                        computed.fetch_add(missing, std::sync::atomic::Ordering::Relaxed);
                        let hashes: Vec<u64> = if missing == units.len() && units.len() > 1 {
                            // Nothing known: hash the chunk's pages in one pass.
                            let (off, _) = self.unit_span(b, c, 0);
                            let (last, len) = self.unit_span(b, c, units.len() - 1);
                            page_hashes.clear();
                            blocks[b].page_hashes(
                                off,
                                last + len - off,
                                self.unit_log2,
                                &mut page_hashes,
                            );
                            page_hashes.clone()
                        } else {
                            (0..units.len())
                                .map(|u| {
                                    units[u].unwrap_or_else(|| {
                                        let (off, len) = self.unit_span(b, c, u);
                                        self.hash_unit(&blocks[b], off, len)
                                    })
                                })
                                .collect()
                        };
                        *o = match self.alg {
                            DigestAlg::Xxh3PageTree => tree_digest(&hashes),
                            _ => hashes[0],
                        };
                    }
                });
            }
        });
        (out, computed.into_inner())
    }
}

/// Digests `alg` of every chunk of `blocks`, computed from memory.
pub fn all_digests(
    blocks: &[Arc<RamBlock>],
    alg: DigestAlg,
    chunk_log2: u8,
    threads: usize,
) -> Vec<u64> {
    match alg {
        DigestAlg::Xxh3PageTree => {
            DigestCache::new(blocks, alg, chunk_log2)
                .digests(blocks, threads)
                .0
        }
        _ => super::ram::chunk_digests(blocks, chunk_log2, threads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram::chunk_digests;

    fn blocks() -> Vec<Arc<RamBlock>> {
        // 5 chunks of 64 KiB and a short sixth; a second block of 2 chunks.
        vec![
            Arc::new(RamBlock::anonymous("a", (5 << 16) + 4096, 12).unwrap()),
            Arc::new(RamBlock::anonymous("b", 2 << 16, 12).unwrap()),
        ]
    }

    fn land(cache: &DigestCache, blocks: &[Arc<RamBlock>], b: usize, off: u64, data: &[u8]) {
        let t = cache.begin(b, off, data.len() as u64);
        blocks[b].write(off, data);
        cache.end(t, &blocks[b]);
    }

    /// The page-tree digests from memory, page by page (the definition, spec: SW-4).
    fn tree_from_memory(bs: &[Arc<RamBlock>], chunk_log2: u8) -> Vec<u64> {
        let mut v = Vec::new();
        for b in bs {
            let chunk = 1u64 << chunk_log2;
            for c in 0..b.len().div_ceil(chunk) {
                let end = ((c + 1) * chunk).min(b.len());
                let pages: Vec<u64> = (c * chunk..end)
                    .step_by(4096)
                    .map(|off| b.digest(off, 4096))
                    .collect();
                v.push(tree_digest(&pages));
            }
        }
        v
    }

    /// spec: SW-5: whatever lands, the cache's digests are the digests of the memory, for
    /// both algorithms; pages written whole are not hashed again in the page tree.
    #[test]
    fn sw_5_cached_digests_equal_the_memory_digests() {
        for alg in [DigestAlg::Xxh3_64, DigestAlg::Xxh3PageTree] {
            let bs = blocks();
            let cache = DigestCache::new(&bs, alg, 16);
            land(&cache, &bs, 0, 0, &vec![1u8; 2 << 16]); // chunks 0 and 1 whole
            land(&cache, &bs, 0, (5 << 16) - 4096, &vec![2u8; 8192]); // end of 4, short 5
            land(&cache, &bs, 0, 4096, &[3u8; 4096]); // chunk 0 in part
            land(&cache, &bs, 1, 0, &vec![4u8; 2 << 16]);
            let (d, computed) = cache.digests(&bs, 2);
            match alg {
                DigestAlg::Xxh3_64 => {
                    assert_eq!(d, chunk_digests(&bs, 16, 2));
                    // Known: chunk 1, the short chunk 5, both of block b.
                    assert_eq!(computed, 4);
                }
                _ => {
                    assert_eq!(d, tree_from_memory(&bs, 16));
                    // 81 + 32 pages, of which 32 + 2 + 32 landed whole.
                    assert_eq!(computed, 81 + 32 - 66);
                }
            }
        }
    }

    /// The source's use: hashes filled from memory, then invalidated by a dirty scan's
    /// pages; what remains known is still the memory's.
    #[test]
    fn sw_4_filled_digests_survive_only_until_their_pages_are_dirty() {
        let bs = blocks();
        let cache = DigestCache::new(&bs, DigestAlg::Xxh3PageTree, 16);
        bs[0].write(0, &vec![5u8; 3 << 16]);
        assert_eq!(cache.fill(&bs, 2), 113);
        bs[0].write(1 << 16, &[6u8; 4096]);
        bs[1].write(1 << 16, &[7u8; 4096]);
        cache.invalidate_pages(0, 16, 1, 12);
        cache.invalidate_pages(1, 16, 1, 12);
        let (d, computed) = cache.digests(&bs, 2);
        assert_eq!(d, tree_from_memory(&bs, 16));
        assert_eq!(computed, 2);
    }

    /// A write that began while another was landing on the same unit voids the other's hash,
    /// even if the other finishes last.
    #[test]
    fn a_concurrent_write_voids_the_digest() {
        let bs = blocks();
        let cache = DigestCache::new(&bs, DigestAlg::Xxh3_64, 16);
        let first = cache.begin(0, 0, 1 << 16);
        bs[0].write(0, &vec![1u8; 1 << 16]);
        let second = cache.begin(0, 0, 4096);
        bs[0].write(0, &[9u8; 4096]);
        cache.end(first, &bs[0]); // would cache the digest of bytes the second write changed
        cache.end(second, &bs[0]);
        let (d, computed) = cache.digests(&bs, 1);
        assert_eq!(d, chunk_digests(&bs, 16, 1));
        assert_eq!(computed, 8, "nothing cached");
    }
}
