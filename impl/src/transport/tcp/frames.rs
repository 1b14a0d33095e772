//! The data-channel frame of the TCP binding: a 24-byte header {magic u32 LE `0x574d4452`
//! ("RDMW"), rkey u32, remote offset u64, length u32 (1..=16 MiB), reserved u32 = 0} followed
//! by `length` bytes, checked against the registration table before a byte of it is read, as
//! an RDMA NIC would check a one-sided write (spec: DATA-1, INV-REG-1).

use std::sync::Arc;

use crate::memory::ram::RamBlock;
use crate::transport::regtable::{AccessError, RegTable, Region};

pub const MAX_DATA_FRAME: u32 = 16 << 20;
pub const DATA_HEADER_LEN: usize = 24;
const DATA_MAGIC: u32 = 0x574d_4452;

/// A parsed data-frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub rkey: u32,
    pub remote_offset: u64,
    pub len: u32,
}

/// Why a data frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataFrameError {
    #[error("bad data frame magic {0:#x}")]
    Magic(u32),
    #[error("data frame length {0} outside 1..=16 MiB")]
    Length(u32),
    #[error("reserved data frame field is not zero")]
    Reserved,
    #[error(transparent)]
    Access(#[from] AccessError),
}

pub fn encode_data_header(h: &DataHeader) -> [u8; DATA_HEADER_LEN] {
    let mut b = [0u8; DATA_HEADER_LEN];
    b[0..4].copy_from_slice(&DATA_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&h.rkey.to_le_bytes());
    b[8..16].copy_from_slice(&h.remote_offset.to_le_bytes());
    b[16..20].copy_from_slice(&h.len.to_le_bytes());
    b
}

/// Parses and bounds-checks a data frame header.
pub fn parse_data_header(b: &[u8; DATA_HEADER_LEN]) -> Result<DataHeader, DataFrameError> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let magic = u32_at(0);
    if magic != DATA_MAGIC {
        return Err(DataFrameError::Magic(magic));
    }
    let len = u32_at(16);
    if len == 0 || len > MAX_DATA_FRAME {
        return Err(DataFrameError::Length(len));
    }
    if u32_at(20) != 0 {
        return Err(DataFrameError::Reserved);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[8..16]);
    Ok(DataHeader {
        rkey: u32_at(4),
        remote_offset: u64::from_le_bytes(off),
        len,
    })
}

/// Checks a frame against the registration table without applying it (early rejection before
/// reading the payload).
pub fn check_data_frame(table: &RegTable, h: &DataHeader) -> Result<(), DataFrameError> {
    table.with_write(h.rkey, h.remote_offset, h.len as u64, |_, _| ())?;
    Ok(())
}

/// Applies a frame's payload into registered memory, or refuses it (spec: INV-REG-1).
pub fn apply_data_frame(
    table: &RegTable,
    blocks: &[Arc<RamBlock>],
    h: &DataHeader,
    payload: &[u8],
) -> Result<(), DataFrameError> {
    if payload.len() != h.len as usize {
        return Err(DataFrameError::Length(payload.len() as u32));
    }
    table.with_write(h.rkey, h.remote_offset, h.len as u64, |block, off| {
        // The table only holds regions inside blocks (the driver registers only what the
        // machine asks, and the machine asks only within the block table).
        blocks[block as usize].write(off, payload)
    })?;
    Ok(())
}

/// What the data-frame fuzz targets write into: two small blocks, two live registrations and
/// one revoked, and which bytes a frame may change (spec: INV-REG-1).
pub struct FuzzMemory {
    pub blocks: Vec<Arc<RamBlock>>,
    pub table: RegTable,
    /// The live registrations, then the revoked key.
    live: [(u32, Region); 2],
    revoked: u32,
    /// `(block, offset, len)` of every range outside the live registrations.
    outside: Vec<(u16, u64, u64)>,
}

impl Default for FuzzMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl FuzzMemory {
    pub fn new() -> FuzzMemory {
        let blocks = vec![
            Arc::new(RamBlock::anonymous("ram0", 64 << 10, 12).expect("anonymous memory")),
            Arc::new(RamBlock::anonymous("ram1", 16 << 10, 12).expect("anonymous memory")),
        ];
        let table = RegTable::new();
        let regions = [
            Region {
                block: 0,
                offset: 16 << 10,
                len: 16 << 10,
            },
            Region {
                block: 1,
                offset: 0,
                len: 8 << 10,
            },
        ];
        let live = regions.map(|r| (table.register(r, 0), r));
        let revoked = table.register(
            Region {
                block: 0,
                offset: 0,
                len: 64 << 10,
            },
            0,
        );
        table.unregister(revoked);
        // Live regions are sorted and disjoint per block: what lies between them is outside.
        let mut outside = Vec::new();
        for (b, block) in blocks.iter().enumerate() {
            let mut at = 0;
            for (_, r) in live.iter().filter(|(_, r)| r.block as usize == b) {
                if r.offset > at {
                    outside.push((b as u16, at, r.offset - at));
                }
                at = r.offset + r.len;
            }
            if block.len() > at {
                outside.push((b as u16, at, block.len() - at));
            }
        }
        FuzzMemory {
            blocks,
            table,
            live,
            revoked,
            outside,
        }
    }

    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.blocks
            .iter()
            .map(|b| {
                let mut v = vec![0u8; b.len() as usize];
                b.read(0, &mut v);
                v
            })
            .collect()
    }

    /// Panics if a byte outside a live registration differs between the snapshots.
    pub fn assert_inside(&self, before: &[Vec<u8>], after: &[Vec<u8>]) {
        for &(b, off, len) in &self.outside {
            let r = off as usize..(off + len) as usize;
            let (x, y) = (&before[b as usize][r.clone()], &after[b as usize][r]);
            // Whole ranges compare at once; the loop only names the first changed byte.
            if x != y {
                let i = off as usize + x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
                panic!("INV-REG-1: byte {i} of block {b} written outside a registration");
            }
        }
    }

    /// Panics if a byte outside a live registration is not zero: the memory starts zeroed,
    /// so this is [`FuzzMemory::assert_inside`] against the start without a snapshot.
    pub fn assert_outside_zero(&self) {
        for &(b, off, len) in &self.outside {
            if !self.blocks[b as usize].is_zero(off, len) {
                let mut v = vec![0u8; len as usize];
                self.blocks[b as usize].read(off, &mut v);
                let i = off as usize + v.iter().position(|&x| x != 0).unwrap_or(0);
                panic!("INV-REG-1: byte {i} of block {b} written outside a registration");
            }
        }
    }

    /// Zeroes both blocks: every input starts from the same memory.
    fn reset(&self) {
        for b in &self.blocks {
            b.zero(0, b.len());
        }
    }

    /// Panics unless the `len` bytes at `remote_offset` of registration `rkey` hold `payload`.
    fn assert_landed(&self, rkey: u32, remote_offset: u64, payload: &[u8]) {
        let (_, r) = self
            .live
            .iter()
            .find(|(k, _)| *k == rkey)
            .expect("an applied frame carries a live key");
        let mut got = vec![0u8; payload.len()];
        self.blocks[r.block as usize].read(r.offset + remote_offset, &mut got);
        assert!(
            got == payload,
            "an applied frame did not land at its registration offset"
        );
    }

    /// The frames of a fuzz input: repeated `[selector u8][24-byte header][payload]`; an odd
    /// selector replaces the header's key with one of the table's keys (registered, or
    /// registered then revoked), so the fuzzer reaches the apply path without guessing keys.
    /// The payload is what the input still holds, up to the header's length.
    pub fn frames<'a>(&self, mut data: &'a [u8]) -> Vec<([u8; DATA_HEADER_LEN], &'a [u8])> {
        let keys = [self.live[0].0, self.live[1].0, self.revoked];
        let mut out = Vec::new();
        while data.len() > DATA_HEADER_LEN {
            let sel = data[0];
            let mut hb = [0u8; DATA_HEADER_LEN];
            hb.copy_from_slice(&data[1..1 + DATA_HEADER_LEN]);
            data = &data[1 + DATA_HEADER_LEN..];
            if sel & 1 == 1 {
                let key = keys[(sel >> 1) as usize % keys.len()];
                hb[4..8].copy_from_slice(&key.to_le_bytes());
            }
            let len = u32::from_le_bytes([hb[16], hb[17], hb[18], hb[19]]) as usize;
            let n = len.min(data.len());
            out.push((hb, &data[..n]));
            data = &data[n..];
        }
        out
    }
}

/// Fuzz target body for `tcp_data_frame`: a stream of data frames (see
/// [`FuzzMemory::frames`]) applied to a small registered memory. Panics if after any frame a
/// byte outside a live registration has changed (spec: INV-REG-1), if a frame that was
/// applied did not land exactly at its registration offset, if the early check before the
/// payload is read disagrees with applying it, or if a header does not encode back to its
/// bytes.
pub fn fuzz_data_frames(data: &[u8]) {
    thread_local! {
        // Mapping fresh memory for every input would cost more than the frames themselves.
        static MEMORY: FuzzMemory = FuzzMemory::new();
    }
    MEMORY.with(|m| {
        m.reset();
        for (hb, payload) in m.frames(data) {
            let Ok(h) = parse_data_header(&hb) else {
                return;
            };
            assert_eq!(
                encode_data_header(&h),
                hb,
                "header decoding is not canonical"
            );
            let early = check_data_frame(&m.table, &h);
            let r = apply_data_frame(&m.table, &m.blocks, &h, payload);
            m.assert_outside_zero();
            if payload.len() == h.len as usize {
                assert_eq!(
                    early, r,
                    "the early check disagrees with applying the frame"
                );
            }
            if r.is_ok() {
                assert_eq!(payload.len(), h.len as usize);
                m.assert_landed(h.rkey, h.remote_offset, payload);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_header_roundtrip_and_bounds() {
        let h = DataHeader {
            rkey: 5,
            remote_offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(parse_data_header(&encode_data_header(&h)), Ok(h));
        let mut b = encode_data_header(&h);
        b[16..20].copy_from_slice(&(MAX_DATA_FRAME + 1).to_le_bytes());
        assert_eq!(
            parse_data_header(&b),
            Err(DataFrameError::Length(MAX_DATA_FRAME + 1))
        );
        let mut b = encode_data_header(&h);
        b[0] ^= 1;
        assert!(matches!(
            parse_data_header(&b),
            Err(DataFrameError::Magic(_))
        ));
        let mut b = encode_data_header(&h);
        b[23] = 1;
        assert_eq!(parse_data_header(&b), Err(DataFrameError::Reserved));
    }

    #[test]
    fn inv_reg_1_frames_outside_registrations_are_refused() {
        let blocks = vec![Arc::new(RamBlock::anonymous("ram", 64 << 10, 12).unwrap())];
        let t = RegTable::new();
        let k = t.register(
            crate::transport::regtable::Region {
                block: 0,
                offset: 16 << 10,
                len: 16 << 10,
            },
            1,
        );
        let ok = DataHeader {
            rkey: k,
            remote_offset: 4096,
            len: 4096,
        };
        apply_data_frame(&t, &blocks, &ok, &[9u8; 4096]).unwrap();
        assert!(!blocks[0].is_zero(20 << 10, 4096));
        let beyond = DataHeader {
            rkey: k,
            remote_offset: 12 << 10,
            len: 8192,
        };
        assert!(apply_data_frame(&t, &blocks, &beyond, &[1u8; 8192]).is_err());
        t.unregister(k);
        assert!(apply_data_frame(&t, &blocks, &ok, &[1u8; 4096]).is_err());
        // Nothing outside the registered range was touched.
        assert!(blocks[0].is_zero(0, 16 << 10));
        assert!(blocks[0].is_zero(32 << 10, 32 << 10));
    }
}
