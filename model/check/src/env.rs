//! The pieces of the world every test environment needs, written once for the in-memory pair,
//! the model checker and the simulator: a destination NIC that checks keys and bounds before
//! placing a write, and a dirty scan that reports the all-zero pages among the dirty ones.

use std::collections::BTreeMap;

use rdmig_model::{DirtyScan, PageBitmap};

/// A registration as the destination's NIC holds it: a range of a local block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mr {
    pub block: u16,
    pub offset: u64,
    pub len: u64,
}

/// Why the NIC refused a write (spec: INV-REG-1, section 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The key is not registered (never, or no longer).
    UnknownKey,
    /// `remote_offset + len` runs past the registration.
    OutOfBounds,
}

/// The destination NIC's registration table. Keys count up from a base, so a revoked key is
/// never handed out again in one run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nic {
    regs: BTreeMap<u32, Mr>,
    next_rkey: u32,
    bytes: u64,
}

impl Default for Nic {
    fn default() -> Self {
        Nic {
            regs: BTreeMap::new(),
            next_rkey: 0x100,
            bytes: 0,
        }
    }
}

impl Nic {
    /// Registers `[offset, offset+len)` of local `block`; returns the remote key.
    pub fn register(&mut self, block: u16, offset: u64, len: u64) -> u32 {
        let rkey = self.next_rkey;
        self.next_rkey += 1;
        self.regs.insert(rkey, Mr { block, offset, len });
        self.bytes += len;
        rkey
    }

    /// Revokes `rkey`; false if it was not registered.
    pub fn unregister(&mut self, rkey: u32) -> bool {
        match self.regs.remove(&rkey) {
            Some(mr) => {
                self.bytes -= mr.len;
                true
            }
            None => false,
        }
    }

    /// Where a write of `len` bytes at `remote_offset` under `rkey` lands: (local block,
    /// offset in the block), or why the NIC refuses it.
    pub fn place(&self, rkey: u32, remote_offset: u64, len: u64) -> Result<(u16, u64), Refusal> {
        let mr = self.regs.get(&rkey).ok_or(Refusal::UnknownKey)?;
        let end = remote_offset.checked_add(len).ok_or(Refusal::OutOfBounds)?;
        if end > mr.len {
            return Err(Refusal::OutOfBounds);
        }
        Ok((mr.block, mr.offset + remote_offset))
    }

    /// Drops every registration (the process holding them died).
    pub fn clear(&mut self) {
        self.regs.clear();
        self.bytes = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// Registered bytes (spec: INV-PIN-1).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn regs(&self) -> impl Iterator<Item = (&u32, &Mr)> {
        self.regs.iter()
    }
}

/// Source memory as a dirty scan sees it.
pub trait Pages {
    fn blocks(&self) -> usize;
    fn pages(&self, block: usize) -> u64;
    fn is_zero(&self, block: usize, page: u64) -> bool;
}

/// Fetches and clears the dirty log (every page with `all`), and reports which dirty pages
/// read as all zero (spec: section 11, DATA-4).
pub fn scan(mem: &impl Pages, log: &mut [PageBitmap], all: bool) -> DirtyScan {
    let mut dirty = Vec::with_capacity(mem.blocks());
    let mut zero = Vec::with_capacity(mem.blocks());
    for (b, l) in log.iter_mut().enumerate().take(mem.blocks()) {
        let n = mem.pages(b);
        let d = if all {
            PageBitmap::full(n)
        } else {
            std::mem::replace(l, PageBitmap::new(n))
        };
        if all {
            *l = PageBitmap::new(n);
        }
        let mut z = PageBitmap::new(n);
        let mut p = d.next_set(0);
        while let Some(i) = p {
            if mem.is_zero(b, i) {
                z.set(i);
            }
            p = d.next_set(i + 1);
        }
        dirty.push(d);
        zero.push(z);
    }
    DirtyScan { dirty, zero }
}

/// What a content-hash dirty log (`rdmig send --dirty-log scan`, spec section 11.2) compares
/// each page with; page versions stand for page hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashCompare {
    /// rdmig's log (SCAN-1): the previous scan's reading, and what the destination holds once
    /// every transfer posted so far lands.
    Both,
    /// The previous scan only: loses a page changed back after a write carried it.
    LastScanOnly,
    /// What the destination holds only: loses a page the switchover carries as zero.
    SentOnly,
}

/// A content-hash dirty log's memory of the pages: what the previous scan read and what the
/// destination holds, per block in source order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HashLog<T> {
    pub compare: HashCompare,
    pub seen: Vec<Vec<T>>,
    /// `seen` holds the previous scan's reading: false before any scan and after a scan of
    /// every page, which rdmig's log answers without reading memory.
    pub seen_valid: bool,
    pub held: Vec<Vec<T>>,
}

impl<T: Copy + Default + PartialEq> HashLog<T> {
    /// A log for `mem`, whose destination holds `unknown` everywhere (a value no page has).
    pub fn new(compare: HashCompare, mem: &[Vec<T>], unknown: T) -> Self {
        HashLog {
            compare,
            seen: mem.to_vec(),
            seen_valid: false,
            held: mem.iter().map(|b| vec![unknown; b.len()]).collect(),
        }
    }

    /// A write read `data` from pages `[first, ..)` of source block `b` (SCAN-2).
    pub fn sent(&mut self, b: usize, first: usize, data: &[T]) {
        self.held[b][first..first + data.len()].copy_from_slice(data);
    }

    /// A ZERO range of source block `b` was posted; a range outside the block is ignored (the
    /// destination refuses it).
    pub fn zeroed(&mut self, b: usize, first: u64, count: u64) {
        if let Some(h) = self.held.get_mut(b) {
            if first.saturating_add(count) <= h.len() as u64 {
                h[first as usize..(first + count) as usize].fill(T::default());
            }
        }
    }

    /// A scan of `mem` (every page with `all`): the dirty pages, and which of them are zero.
    pub fn scan(&mut self, mem: &[Vec<T>], all: bool) -> DirtyScan {
        let mut dirty = Vec::with_capacity(mem.len());
        let mut zero = Vec::with_capacity(mem.len());
        // rdmig's log does not read memory in a scan of every page; the previous-scan-only
        // log (the old one) did.
        let reads = !all || self.compare == HashCompare::LastScanOnly;
        for (b, m) in mem.iter().enumerate() {
            let n = m.len() as u64;
            let mut d = PageBitmap::new(n);
            let mut z = PageBitmap::new(n);
            for (p, &v) in m.iter().enumerate() {
                let since_scan = self.seen_valid && self.seen[b][p] != v;
                let unsent = self.held[b][p] != v;
                let is_dirty = all
                    || match self.compare {
                        HashCompare::Both => since_scan || unsent,
                        HashCompare::LastScanOnly => since_scan,
                        HashCompare::SentOnly => unsent,
                    };
                if is_dirty {
                    d.set(p as u64);
                    if v == T::default() {
                        z.set(p as u64);
                    }
                }
            }
            if reads {
                self.seen[b].copy_from_slice(m);
            }
            dirty.push(d);
            zero.push(z);
        }
        self.seen_valid = reads;
        DirtyScan { dirty, zero }
    }
}

/// Byte memory, one `Vec<u8>` per block, with a page size per block.
pub struct ByteMem<'a> {
    pub mem: &'a [Vec<u8>],
    pub page_log2: &'a [u8],
}

impl Pages for ByteMem<'_> {
    fn blocks(&self) -> usize {
        self.mem.len()
    }
    fn pages(&self, b: usize) -> u64 {
        (self.mem[b].len() >> self.page_log2[b]) as u64
    }
    fn is_zero(&self, b: usize, p: u64) -> bool {
        let ps = 1usize << self.page_log2[b];
        self.mem[b][p as usize * ps..(p as usize + 1) * ps]
            .iter()
            .all(|&x| x == 0)
    }
}

/// Versioned pages: one value per page, where version 0 reads as an all-zero page (the model
/// checker's and the simulator's abstraction of memory).
pub struct Versions<'a, T> {
    pub mem: &'a [Vec<T>],
}

impl<T: Copy + Default + PartialEq> Pages for Versions<'_, T> {
    fn blocks(&self) -> usize {
        self.mem.len()
    }
    fn pages(&self, b: usize) -> u64 {
        self.mem[b].len() as u64
    }
    fn is_zero(&self, b: usize, p: u64) -> bool {
        self.mem[b][p as usize] == T::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_refuses_unknown_keys_and_writes_past_the_registration() {
        let mut nic = Nic::default();
        let k = nic.register(1, 8192, 4096);
        assert_eq!(nic.place(k, 0, 4096), Ok((1, 8192)));
        assert_eq!(nic.place(k, 1, 4096), Err(Refusal::OutOfBounds));
        assert_eq!(nic.place(k, u64::MAX, 2), Err(Refusal::OutOfBounds));
        assert_eq!(nic.place(k + 1, 0, 1), Err(Refusal::UnknownKey));
        assert_eq!(nic.bytes(), 4096);
        assert!(nic.unregister(k));
        assert_eq!(nic.place(k, 0, 1), Err(Refusal::UnknownKey));
        assert!(!nic.unregister(k));
        assert_eq!(nic.bytes(), 0);
    }

    #[test]
    fn scan_reports_dirty_pages_and_clears_the_log() {
        let mem = vec![vec![1u8, 0, 3]];
        let mut log = vec![PageBitmap::new(3)];
        log[0].set(1);
        log[0].set(2);
        let s = scan(&Versions { mem: &mem }, &mut log, false);
        assert_eq!(s.dirty[0].count_ones(), 2);
        assert!(s.zero[0].get(1) && !s.zero[0].get(2));
        assert!(!log[0].any(), "the log is cleared");
        let s = scan(&Versions { mem: &mem }, &mut log, true);
        assert_eq!(s.dirty[0].count_ones(), 3);
        assert_eq!(s.zero[0].count_ones(), 1);
    }
}
