//! The data-channel frame of the TCP binding: a 24-byte header {magic u32 LE `0x574d4452`
//! ("RDMW"), rkey u32, remote offset u64, length u32 (1..=16 MiB), reserved u32 = 0} followed
//! by `length` bytes, checked against the registration table before a byte of it is read, as
//! an RDMA NIC would check a one-sided write (spec: DATA-1, INV-REG-1).

use std::sync::Arc;

use crate::memory::ram::RamBlock;
use crate::transport::regtable::{AccessError, RegTable};

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
    keys: [u32; 3],
    allowed: Vec<Vec<bool>>,
}

impl Default for FuzzMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl FuzzMemory {
    pub fn new() -> FuzzMemory {
        use crate::transport::regtable::Region;
        let blocks = vec![
            Arc::new(RamBlock::anonymous("ram0", 64 << 10, 12).expect("anonymous memory")),
            Arc::new(RamBlock::anonymous("ram1", 16 << 10, 12).expect("anonymous memory")),
        ];
        let table = RegTable::new();
        // (block, offset, len) of the live registrations.
        let live = [(0u16, 16u64 << 10, 16u64 << 10), (1, 0, 8 << 10)];
        let keys: Vec<u32> = live
            .iter()
            .map(|&(block, offset, len)| table.register(Region { block, offset, len }, 0))
            .collect();
        let revoked = table.register(
            Region {
                block: 0,
                offset: 0,
                len: 64 << 10,
            },
            0,
        );
        table.unregister(revoked);
        let mut allowed: Vec<Vec<bool>> = blocks
            .iter()
            .map(|b| vec![false; b.len() as usize])
            .collect();
        for &(b, off, len) in &live {
            allowed[b as usize][off as usize..(off + len) as usize]
                .iter_mut()
                .for_each(|a| *a = true);
        }
        FuzzMemory {
            blocks,
            table,
            keys: [keys[0], keys[1], revoked],
            allowed,
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
        for (b, (x, y)) in before.iter().zip(after).enumerate() {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!(
                    p == q || self.allowed[b][i],
                    "INV-REG-1: byte {i} of block {b} written outside a registration"
                );
            }
        }
    }

    /// The frames of a fuzz input: repeated `[selector u8][24-byte header][payload]`; an odd
    /// selector replaces the header's key with one of the table's keys (registered, or
    /// registered then revoked), so the fuzzer reaches the apply path without guessing keys.
    /// The payload is what the input still holds, up to the header's length.
    pub fn frames<'a>(&self, mut data: &'a [u8]) -> Vec<([u8; DATA_HEADER_LEN], &'a [u8])> {
        let mut out = Vec::new();
        while data.len() > DATA_HEADER_LEN {
            let sel = data[0];
            let mut hb = [0u8; DATA_HEADER_LEN];
            hb.copy_from_slice(&data[1..1 + DATA_HEADER_LEN]);
            data = &data[1 + DATA_HEADER_LEN..];
            if sel & 1 == 1 {
                let key = self.keys[(sel >> 1) as usize % self.keys.len()];
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
/// [`FuzzMemory::frames`]) applied to a small registered memory. Panics if any byte outside a
/// live registration changes (spec: INV-REG-1).
pub fn fuzz_data_frames(data: &[u8]) {
    let m = FuzzMemory::new();
    for (hb, payload) in m.frames(data) {
        let Ok(h) = parse_data_header(&hb) else {
            return;
        };
        let before = m.snapshot();
        let r = apply_data_frame(&m.table, &m.blocks, &h, payload);
        m.assert_inside(&before, &m.snapshot());
        if r.is_ok() {
            assert_eq!(payload.len(), h.len as usize);
        }
    }
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
