//! Inputs, commands, outcomes and memory geometry shared by both state machines.

use crate::wire::{AbortReason, BlockDesc, ChunkRef, Frame, WireError};

/// Virtual or real time in milliseconds, supplied by the driver; the machines never read a clock.
pub type Millis = u64;

/// Which of a machine's two timers fired (see `timers()` on each machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKind {
    /// No frame from the peer for the idle timeout while waiting on it (spec: ERR-4).
    Idle,
    /// Nothing sent for the keepalive interval (spec: ERR-5).
    Keepalive,
}

/// Armed deadlines; the driver fires `Input::Timer(kind)` once `now >= deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timers {
    pub idle: Option<Millis>,
    pub keepalive: Option<Millis>,
}

/// What the destination registers: one chunk (dynamic mode) or a whole block (pin-all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegTarget {
    Chunk(ChunkRef),
    Block(u16),
}

/// Pages dirtied since the previous scan, per block, with the subset that reads as all zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirtyScan {
    pub dirty: Vec<PageBitmap>,
    /// Subset of `dirty` whose contents are entirely zero bytes.
    pub zero: Vec<PageBitmap>,
}

/// Everything that can happen to a machine. The driver feeds control frames in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Operator starts the migration (source only).
    Start,
    /// A control frame arrived and decoded.
    Frame(Frame),
    /// A control frame arrived and failed to decode.
    Malformed(WireError),
    /// A one-sided write completed: its bytes are placed at the destination (source).
    WriteDone {
        wr_id: u64,
    },
    /// A one-sided write completed with an error (source).
    WriteFailed {
        wr_id: u64,
    },
    /// Registration finished (destination).
    Registered {
        target: RegTarget,
        rkey: u32,
    },
    RegisterFailed {
        target: RegTarget,
    },
    /// Result of `Command::ScanDirty` (source).
    Dirty(DirtyScan),
    WorkloadPaused,
    WorkloadStarted,
    /// Pausing (source) or starting (destination) the workload failed.
    WorkloadFailed,
    /// Result of `Command::CaptureDeviceState` (source).
    DeviceState(Vec<u8>),
    /// Result of `Command::ComputeDigests`: one digest per chunk in global chunk order.
    Digests(Vec<u64>),
    Timer(TimerKind),
    /// The control channel or any data channel failed (spec: ERR-3).
    TransportFailed,
    /// Operator cancels (spec: ERR-1).
    Cancel,
}

/// What a machine asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Command {
    Send(Frame),
    /// Destination: register `len` bytes at `offset` of `block` for remote write; answer with
    /// `Input::Registered` or `Input::RegisterFailed`.
    Register {
        target: RegTarget,
        block: u16,
        offset: u64,
        len: u64,
    },
    /// Destination: revoke a registration immediately.
    Unregister {
        target: RegTarget,
        rkey: u32,
    },
    /// Source: one-sided write of local `block[offset..offset+len]` to `rkey` at `remote_offset`.
    PostWrite {
        channel: u8,
        wr_id: u64,
        block: u16,
        offset: u64,
        len: u64,
        rkey: u32,
        remote_offset: u64,
    },
    /// Destination: write zeros over `block[offset..offset+len]`.
    ZeroFill {
        block: u16,
        offset: u64,
        len: u64,
    },
    /// Source: fetch and clear the dirty log; with `all`, report every page as dirty.
    ScanDirty {
        all: bool,
    },
    PauseWorkload,
    ResumeWorkload,
    /// Source: produce the device-state blob (answer `Input::DeviceState`).
    CaptureDeviceState,
    /// Destination: store device-state bytes at `offset`.
    StoreDeviceState {
        offset: u32,
        data: Vec<u8>,
    },
    /// Digest every chunk of local memory (answer `Input::Digests`).
    ComputeDigests,
    /// Destination: start the workload (answer `Input::WorkloadStarted`).
    StartWorkload,
    /// The machine reached its final outcome; it accepts no further input.
    Finish(Outcome),
}

/// Why a migration ended without completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AbortInfo {
    pub reason: AbortReason,
    /// The peer sent ABORT (as opposed to this side deciding).
    pub by_peer: bool,
    /// What exactly went wrong, for the operator.
    pub detail: &'static str,
}

/// Final outcome of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Completed,
    /// Source: the workload runs again at the source and nothing is lost. Destination: nothing
    /// was started and received memory is to be discarded.
    Aborted(AbortInfo),
    /// Source only: COMMIT was sent but STARTED never arrived; the operator must find out
    /// whether the destination started before resuming anything (spec: INV-DOUBT-1).
    InDoubt(&'static str),
}

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
    pub blocks: Vec<BlockGeom>,
    pub total_chunks: u32,
    pub total_bytes: u64,
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
    pub fn new(blocks: &[BlockDesc], chunk_log2: u8) -> Result<Self, &'static str> {
        let mut out = Vec::with_capacity(blocks.len());
        let mut total: u64 = 0;
        let mut bytes: u64 = 0;
        for b in blocks {
            if b.page_log2 > chunk_log2 {
                return Err("block page size larger than chunk size"); // spec: BLK-3
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
                return Err("too many chunks");
            }
        }
        Ok(Geometry {
            chunk_log2,
            blocks: out,
            total_chunks: total as u32,
            total_bytes: bytes,
        })
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
    /// Page range `[first, first+count)` of a chunk.
    pub fn chunk_pages(&self, c: ChunkRef) -> (u64, u64) {
        let b = &self.blocks[c.block as usize];
        let ppc = self.pages_per_chunk(c.block as usize);
        let first = c.chunk as u64 * ppc;
        (first, ppc.min(b.pages - first))
    }
}

/// Credit accounting for the control channel, identical on both sides (spec: FC-1 .. FC-5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Credits {
    /// Frames this side may still send.
    pub send: u16,
    /// The peer's receive window, once known.
    pub peer_window: u16,
    /// This side's receive window.
    pub window: u16,
    /// Frames received whose buffers were re-posted but not yet granted back.
    pub ungranted: u16,
    /// Frames the peer may still send, as this side accounts them.
    pub peer_may_send: u16,
}

/// Frames either side may send before it learns the peer's window (spec: FC-1).
pub const INITIAL_CREDITS: u16 = crate::wire::MIN_CREDIT_WINDOW;

impl Credits {
    pub fn new(window: u16) -> Self {
        Credits {
            send: INITIAL_CREDITS,
            peer_window: INITIAL_CREDITS,
            window,
            ungranted: 0,
            peer_may_send: INITIAL_CREDITS,
        }
    }
    /// This side announced its full window in HELLO or HELLO_ACK.
    pub fn announce_window(&mut self) {
        self.peer_may_send += self.window - INITIAL_CREDITS;
    }
    /// The peer announced its window.
    pub fn learn_peer_window(&mut self, w: u16) {
        self.send += w - INITIAL_CREDITS;
        self.peer_window = w;
    }
    /// spec: FC-3: the last credit is kept for a frame that returns credits, so two sides
    /// that are both down to one credit can always unblock each other.
    pub fn can_send(&self) -> bool {
        self.send >= 2 || (self.send == 1 && self.ungranted >= 1)
    }
    /// Takes a credit and returns the grant to put in the frame.
    pub fn take(&mut self) -> u16 {
        assert!(self.can_send(), "INV-FC-1: sending without credit");
        self.send -= 1;
        let g = self.ungranted;
        self.ungranted = 0;
        self.peer_may_send += g;
        g
    }
    /// Accounts a received frame; `Err` if the peer overran its credits or over-granted.
    pub fn on_receive(&mut self, grant: u16) -> Result<(), &'static str> {
        if self.peer_may_send == 0 {
            return Err("peer sent a frame without credit"); // spec: FC-5
        }
        self.peer_may_send -= 1;
        self.ungranted += 1;
        let send = self.send as u32 + grant as u32;
        if send > self.peer_window as u32 {
            return Err("credit grant exceeds the peer's window"); // spec: FC-5
        }
        self.send = send as u16;
        Ok(())
    }
    /// spec: FC-4: return credits with a NOP once half the window is ungranted.
    pub fn wants_nop(&self) -> bool {
        self.ungranted >= 1 && self.ungranted >= self.window / 2 && self.can_send()
    }
}
