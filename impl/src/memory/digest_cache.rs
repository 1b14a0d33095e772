//! The destination's chunk digests, kept current as data lands, so that verification after
//! PREPARE (spec: SW-5) digests only the chunks whose digest is not known: those written in
//! pieces (later rounds write page runs), zero-filled in part, or never written.
//!
//! A write announces itself before it touches memory ([`DigestCache::begin`]): every chunk it
//! touches forgets its digest and moves to a new generation. When the write has landed
//! ([`DigestCache::end`]), each chunk it covered whole gets the digest of its bytes, read back
//! from memory, but only if no other write began on that chunk meanwhile. So a cached digest
//! is always the digest of the chunk's bytes as the last write left them; anything uncertain
//! is computed again at verification. The digests are the protocol's (xxh3-64 of the chunk's
//! bytes), whichever way they were obtained.

use std::sync::{Arc, Mutex};

use super::ram::RamBlock;

/// One chunk's cached digest.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    generation: u64,
    digest: Option<u64>,
}

/// A write in progress: the chunks it touches and their generations at its start.
#[derive(Debug)]
pub struct Ticket {
    block: usize,
    offset: u64,
    len: u64,
    generations: Vec<(usize, u64)>,
}

pub struct DigestCache {
    chunk_log2: u8,
    /// Global index of each block's first chunk, and each block's length.
    first_chunk: Vec<usize>,
    block_len: Vec<u64>,
    slots: Vec<Mutex<Slot>>,
}

impl DigestCache {
    pub fn new(blocks: &[Arc<RamBlock>], chunk_log2: u8) -> DigestCache {
        let chunk = 1u64 << chunk_log2;
        let mut first_chunk = Vec::with_capacity(blocks.len());
        let mut total = 0usize;
        for b in blocks {
            first_chunk.push(total);
            total += b.len().div_ceil(chunk) as usize;
        }
        DigestCache {
            chunk_log2,
            first_chunk,
            block_len: blocks.iter().map(|b| b.len()).collect(),
            slots: (0..total).map(|_| Mutex::new(Slot::default())).collect(),
        }
    }

    pub fn chunk_log2(&self) -> u8 {
        self.chunk_log2
    }

    /// The chunks of `block` that `[offset, offset+len)` touches, as global indices.
    fn touched(&self, block: usize, offset: u64, len: u64) -> std::ops::Range<usize> {
        let first = self.first_chunk[block];
        if len == 0 {
            return first..first;
        }
        let a = (offset >> self.chunk_log2) as usize;
        let b = ((offset + len - 1) >> self.chunk_log2) as usize;
        first + a..first + b + 1
    }

    /// Byte range of global chunk `c` within its block.
    fn span(&self, block: usize, c: usize) -> (u64, u64) {
        let off = ((c - self.first_chunk[block]) as u64) << self.chunk_log2;
        let len = (1u64 << self.chunk_log2).min(self.block_len[block] - off);
        (off, len)
    }

    /// A write of `[offset, offset+len)` of `block` is about to land.
    pub fn begin(&self, block: usize, offset: u64, len: u64) -> Ticket {
        let generations = self
            .touched(block, offset, len)
            .map(|c| {
                let mut s = self.slots[c].lock().unwrap();
                s.generation += 1;
                s.digest = None;
                (c, s.generation)
            })
            .collect();
        Ticket {
            block,
            offset,
            len,
            generations,
        }
    }

    /// The write of `t` landed in `memory` (the block it named): chunks it covered whole, and
    /// that no other write began on since, get their digest.
    pub fn end(&self, t: Ticket, memory: &RamBlock) {
        for (c, generation) in t.generations {
            let (off, len) = self.span(t.block, c);
            if off < t.offset || off + len > t.offset + t.len {
                continue; // covered in part: its other bytes are not this write's to vouch for
            }
            let d = memory.digest(off, len);
            let mut s = self.slots[c].lock().unwrap();
            if s.generation == generation {
                s.digest = Some(d);
            }
        }
    }

    /// Pages `[first, first+count)` of `block` may have changed (a dirty scan said so): their
    /// chunks forget their digests.
    pub fn invalidate_pages(&self, block: usize, first: u64, count: u64, page_log2: u8) {
        let t = self.begin(block, first << page_log2, count << page_log2);
        drop(t);
    }

    /// Digests every chunk that has none yet, from memory as it is now, with `threads`
    /// threads; a chunk invalidated while its digest was computed stays without one. Returns
    /// how many digests it stored.
    pub fn fill(&self, blocks: &[Arc<RamBlock>], threads: usize) -> usize {
        let todo: Vec<(usize, usize, u64)> = self
            .chunks()
            .filter_map(|(b, c)| {
                let s = self.slots[c].lock().unwrap();
                s.digest.is_none().then_some((b, c, s.generation))
            })
            .collect();
        let stored = std::sync::atomic::AtomicUsize::new(0);
        let per = todo.len().div_ceil(threads.clamp(1, 64)).max(1);
        std::thread::scope(|sc| {
            for part in todo.chunks(per) {
                let stored = &stored;
                sc.spawn(move || {
                    for &(b, c, generation) in part {
                        let (off, len) = self.span(b, c);
                        let d = blocks[b].digest(off, len);
                        let mut s = self.slots[c].lock().unwrap();
                        if s.generation == generation {
                            s.digest = Some(d);
                            stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        stored.into_inner()
    }

    /// Every chunk as (block, global index).
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.first_chunk
            .iter()
            .enumerate()
            .flat_map(move |(b, &first)| {
                let end = self
                    .first_chunk
                    .get(b + 1)
                    .copied()
                    .unwrap_or(self.slots.len());
                (first..end).map(move |c| (b, c))
            })
    }

    /// The chunk digests of `blocks` (the blocks this cache was made for), computing those not
    /// known with `threads` threads.
    pub fn digests(&self, blocks: &[Arc<RamBlock>], threads: usize) -> (Vec<u64>, usize) {
        let known: Vec<Option<u64>> = self
            .slots
            .iter()
            .map(|s| s.lock().unwrap().digest)
            .collect();
        let todo: Vec<(usize, usize)> =
            self.chunks().filter(|&(_, c)| known[c].is_none()).collect();
        let computed = todo.len();
        let mut fresh = vec![0u64; todo.len()];
        let per = todo.len().div_ceil(threads.clamp(1, 64)).max(1);
        std::thread::scope(|s| {
            for (outs, ins) in fresh.chunks_mut(per).zip(todo.chunks(per)) {
                s.spawn(move || {
                    for (o, &(b, c)) in outs.iter_mut().zip(ins) {
                        let (off, len) = self.span(b, c);
                        *o = blocks[b].digest(off, len);
                    }
                });
            }
        });
        let mut out: Vec<u64> = known.iter().map(|d| d.unwrap_or(0)).collect();
        for (&(_, c), d) in todo.iter().zip(fresh) {
            out[c] = d;
        }
        (out, computed)
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

    /// spec: SW-5: whatever lands, the cache's digests are the digests of the memory.
    #[test]
    fn sw_5_cached_digests_equal_the_memory_digests() {
        let bs = blocks();
        let cache = DigestCache::new(&bs, 16);
        land(&cache, &bs, 0, 0, &vec![1u8; 2 << 16]); // chunks 0 and 1 whole
        land(&cache, &bs, 0, (5 << 16) - 4096, &vec![2u8; 8192]); // end of chunk 4, short chunk 5
        land(&cache, &bs, 0, 4096, &[3u8; 4096]); // chunk 0 in part: forgotten
        land(&cache, &bs, 1, 0, &vec![4u8; 2 << 16]);
        let (d, computed) = cache.digests(&bs, 2);
        assert_eq!(d, chunk_digests(&bs, 16, 2));
        // Known: chunk 1, the short chunk 5, both of block b. Computed: 0, 2, 3, 4.
        assert_eq!(computed, 4);
    }

    /// The source's use: digests filled from memory, then invalidated by a dirty scan's
    /// pages; what remains known is still the memory's digest.
    #[test]
    fn sw_4_filled_digests_survive_only_until_their_pages_are_dirty() {
        let bs = blocks();
        let cache = DigestCache::new(&bs, 16);
        bs[0].write(0, &vec![5u8; 3 << 16]);
        assert_eq!(cache.fill(&bs, 2), 8);
        // The workload writes chunk 1 and 7 (block b's second); the next scan reports them.
        bs[0].write(1 << 16, &[6u8; 4096]);
        bs[1].write(1 << 16, &[7u8; 4096]);
        cache.invalidate_pages(0, 16, 1, 12);
        cache.invalidate_pages(1, 16, 1, 12);
        let (d, computed) = cache.digests(&bs, 2);
        assert_eq!(d, chunk_digests(&bs, 16, 2));
        assert_eq!(computed, 2);
    }

    /// A write that began while another was landing on the same chunk voids the other's
    /// digest, even if the other finishes last.
    #[test]
    fn a_concurrent_write_voids_the_digest() {
        let bs = blocks();
        let cache = DigestCache::new(&bs, 16);
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
