//! Pages and chunks: page bitmaps and the chunk geometry of an agreed block table (spec:
//! section "Chunk geometry").

use crate::wire::{BlockDesc, ChunkRef};

/// One bit per page, packed in u64 words.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
}

impl PageBitmap {
    pub fn new(len: u64) -> Self {
        PageBitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }
    pub fn full(len: u64) -> Self {
        let mut b = Self::new(len);
        b.set_range(0, len);
        b
    }
    pub fn from_words(words: Vec<u64>, len: u64) -> Option<Self> {
        if words.len() as u64 != len.div_ceil(64) {
            return None;
        }
        let mut b = PageBitmap { words, len };
        b.clear_tail();
        Some(b)
    }
    fn clear_tail(&mut self) {
        if !self.len.is_multiple_of(64) {
            if let Some(w) = self.words.last_mut() {
                *w &= (1u64 << (self.len % 64)) - 1;
            }
        }
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    pub fn set(&mut self, i: u64) {
        assert!(i < self.len, "page {i} beyond bitmap of {}", self.len);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }
    pub fn set_range(&mut self, start: u64, count: u64) {
        for i in start..(start + count).min(self.len) {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }
    pub fn clear_range(&mut self, start: u64, count: u64) {
        for i in start..(start + count).min(self.len) {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    pub fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
    }
    /// True if any bit in `[start, start+count)` is set.
    pub fn any_in(&self, start: u64, count: u64) -> bool {
        self.next_set(start).is_some_and(|i| i < start + count)
    }
    /// First set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + w.trailing_zeros() as u64;
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }
    /// First clear bit at or after `from`, or `len`.
    pub fn next_clear(&self, from: u64) -> u64 {
        let mut i = from;
        while i < self.len {
            let w = !self.words[(i / 64) as usize] & (!0u64 << (i % 64));
            if w != 0 {
                return (i / 64 * 64 + w.trailing_zeros() as u64).min(self.len);
            }
            i = (i / 64 + 1) * 64;
        }
        self.len
    }
    /// `self |= other`; lengths must match.
    pub fn union_with(&mut self, other: &PageBitmap) {
        assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }
    /// `self &= !other`; lengths must match.
    pub fn subtract(&mut self, other: &PageBitmap) {
        assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }
}

/// Chunk geometry of the agreed block table (spec: BLK-3, section "Chunk geometry").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Geometry {
    pub chunk_log2: u8,
    /// The RAM blocks in table order, then the state area when the session has one.
    pub blocks: Vec<BlockGeom>,
    /// Chunks and bytes of every block, the state area included.
    pub total_chunks: u32,
    pub total_bytes: u64,
    /// The RAM blocks alone: what dirty scans, ZERO and digests cover (spec: STATE-2).
    pub ram_blocks: usize,
    pub ram_chunks: u32,
    pub ram_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockGeom {
    pub length: u64,
    pub page_log2: u8,
    pub pages: u64,
    pub chunks: u32,
    /// Global index of this block's first chunk.
    pub first_chunk: u32,
}

/// Most chunks in a migration; keeps per-chunk tables bounded (spec: BLK-1).
pub const MAX_TOTAL_CHUNKS: u64 = 1 << 24;

impl Geometry {
    /// Builds the geometry, or says why the table is unusable with this chunk size.
    pub fn new(blocks: &[BlockDesc], chunk_log2: u8) -> Result<Self, crate::Detail> {
        let mut out = Vec::with_capacity(blocks.len());
        let mut total: u64 = 0;
        let mut bytes: u64 = 0;
        for b in blocks {
            if b.page_log2 > chunk_log2 {
                return Err(crate::Detail::PageOverChunk); // spec: BLK-3
            }
            let chunks = b.length.div_ceil(1u64 << chunk_log2);
            out.push(BlockGeom {
                length: b.length,
                page_log2: b.page_log2,
                pages: b.length >> b.page_log2,
                chunks: chunks as u32,
                first_chunk: total as u32,
            });
            total += chunks;
            bytes += b.length;
            if total > MAX_TOTAL_CHUNKS {
                return Err(crate::Detail::TooManyChunks);
            }
        }
        Ok(Geometry {
            chunk_log2,
            ram_blocks: out.len(),
            blocks: out,
            total_chunks: total as u32,
            total_bytes: bytes,
            ram_chunks: total as u32,
            ram_bytes: bytes,
        })
    }

    /// This geometry with a state area of `len` bytes appended as one more block of
    /// `STATE_PAGE_LOG2` pages, its chunks numbered after every RAM chunk (spec: STATE-2).
    /// `len` 0 adds nothing.
    pub fn with_state_area(&self, len: u64) -> Result<Self, crate::Detail> {
        let mut g = self.clone();
        if len == 0 {
            return Ok(g);
        }
        let log2 = crate::wire::STATE_PAGE_LOG2;
        debug_assert!(len.is_multiple_of(1 << log2) && log2 <= self.chunk_log2);
        let chunks = len.div_ceil(1u64 << self.chunk_log2);
        let total = self.total_chunks as u64 + chunks;
        if total > MAX_TOTAL_CHUNKS {
            return Err(crate::Detail::TooManyChunks);
        }
        g.blocks.push(BlockGeom {
            length: len,
            page_log2: log2,
            pages: len >> log2,
            chunks: chunks as u32,
            first_chunk: self.total_chunks,
        });
        g.total_chunks = total as u32;
        g.total_bytes += len;
        Ok(g)
    }

    /// The state area's block index, when the session has one.
    pub fn state_block(&self) -> Option<usize> {
        (self.blocks.len() > self.ram_blocks).then_some(self.ram_blocks)
    }
    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunk_log2
    }
    pub fn pages_per_chunk(&self, block: usize) -> u64 {
        1u64 << (self.chunk_log2 - self.blocks[block].page_log2)
    }
    /// Byte offset and length of a chunk within its block (the last chunk may be short).
    pub fn chunk_span(&self, c: ChunkRef) -> (u64, u64) {
        let b = &self.blocks[c.block as usize];
        let off = (c.chunk as u64) << self.chunk_log2;
        (off, self.chunk_size().min(b.length - off))
    }
    pub fn valid_chunk(&self, c: ChunkRef) -> bool {
        (c.block as usize) < self.blocks.len() && c.chunk < self.blocks[c.block as usize].chunks
    }
    pub fn global(&self, c: ChunkRef) -> u32 {
        self.blocks[c.block as usize].first_chunk + c.chunk
    }
    pub fn chunk_of_global(&self, g: u32) -> ChunkRef {
        let block = self.blocks.partition_point(|b| b.first_chunk <= g) - 1;
        ChunkRef {
            block: block as u16,
            chunk: g - self.blocks[block].first_chunk,
        }
    }
    /// Bytes of the chunk with global index `g` (the last chunk of a block may be short).
    pub fn chunk_len(&self, g: u32) -> u64 {
        self.chunk_span(self.chunk_of_global(g)).1
    }

    /// A dirty scan has one bitmap per block, each with one bit per page, and reports as zero
    /// only pages it reports dirty.
    pub fn scan_fits(&self, scan: &crate::DirtyScan) -> bool {
        let fits = |v: &[PageBitmap]| {
            v.len() == self.ram_blocks
                && v.iter().zip(&self.blocks).all(|(d, b)| d.len() == b.pages)
        };
        // The all-zero pages are a subset of the dirty ones.
        let subset = || {
            scan.dirty.iter().zip(&scan.zero).all(|(d, z)| {
                d.words()
                    .iter()
                    .zip(z.words())
                    .all(|(dw, zw)| zw & !dw == 0)
            })
        };
        fits(&scan.dirty) && fits(&scan.zero) && subset()
    }

    /// Bytes a scan asks to send as data: every dirty page, less the all-zero ones when zero
    /// elision is negotiated (spec: CONV-1, DATA-4).
    pub fn dirty_bytes(&self, scan: &crate::DirtyScan, elide: bool) -> u64 {
        scan.dirty
            .iter()
            .zip(&scan.zero)
            .zip(&self.blocks)
            .map(|((d, z), b)| {
                d.count_ones()
                    .saturating_sub(if elide { z.count_ones() } else { 0 })
                    << b.page_log2
            })
            .sum()
    }

    /// Page range `[first, first+count)` of a chunk.
    pub fn chunk_pages(&self, c: ChunkRef) -> (u64, u64) {
        let b = &self.blocks[c.block as usize];
        let ppc = self.pages_per_chunk(c.block as usize);
        let first = c.chunk as u64 * ppc;
        (first, ppc.min(b.pages - first))
    }
}
