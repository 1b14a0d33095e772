//! The save file's layout (spec: section 13): a header with the block table at offset 0,
//! each block's pages at a fixed aligned offset (a zero page is a hole), then the trailer
//! (present-page bitmaps, chunk digests, device state) and a footer written last.
//!
//! Everything here parses bytes read from a file that may be truncated, corrupted or not a
//! save file at all: every length is bounded before anything is allocated, every offset is
//! checked against the file's size, and every failure is a typed error.

use rdmig_model::wire::{self, DigestAlg};
use xxhash_rust::xxh3::xxh3_64;

/// The first 8 bytes of every save file.
pub const MAGIC: &[u8; 8] = b"RDMIGSAV";
/// The first 8 bytes of the footer.
pub const FOOTER_MAGIC: &[u8; 8] = b"RDMIGEND";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// The fixed part of the header, before the block entries.
pub const HEADER_FIXED: usize = 24;
/// A block entry without its name: name length (1), length (8), offset (8).
const ENTRY_FIXED: usize = 17;
/// The longest header: the fixed part, 64 entries with 64-byte names, the header's hash.
pub const MAX_HEADER_LEN: usize = HEADER_FIXED + wire::MAX_BLOCKS * (ENTRY_FIXED + 64) + 8;
/// The footer's size; it ends the file.
pub const FOOTER_LEN: usize = 64;
/// Block data starts at multiples of 1 MiB: aligned for `O_DIRECT` on every file system and
/// for huge pages, and the same alignment as QEMU's mapped-ram.
pub const DEFAULT_ALIGN_LOG2: u8 = 20;
/// Device state a save file may carry (the protocol's own bound, spec: section 2.2).
pub const MAX_STATE_LEN: u64 = wire::MAX_DEVICE_STATE as u64;
/// The trailer starts at a multiple of this after the last block.
pub const TRAILER_ALIGN: u64 = 4096;

/// Why a file is not a save file this build can restore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not an rdmig save file (no RDMIGSAV magic)")]
    Foreign,
    #[error("save file version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error("the file ends at {have} bytes, before its {what} (at least {need} bytes)")]
    Truncated {
        what: &'static str,
        have: u64,
        need: u64,
    },
    #[error(
        "the save is incomplete: no valid footer (the save never finished, or the file was cut)"
    )]
    NoFooter,
    #[error("the file is corrupted: {0}")]
    Corrupt(String),
}

fn corrupt(what: impl Into<String>) -> FormatError {
    FormatError::Corrupt(what.into())
}

/// One block as the header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub name: String,
    pub len: u64,
    /// Where the block's first page is in the file.
    pub offset: u64,
}

/// The header: geometry and block table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub page_log2: u8,
    pub chunk_log2: u8,
    pub digest: DigestAlg,
    pub align_log2: u8,
    pub blocks: Vec<BlockEntry>,
}

fn digest_code(a: DigestAlg) -> u8 {
    a as u8
}

fn digest_alg(c: u8) -> Option<DigestAlg> {
    match c {
        1 => Some(DigestAlg::Xxh3_64),
        2 => Some(DigestAlg::Xxh3PageTree),
        _ => None,
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl Header {
    /// A header for `blocks` (name, length) laid out one after another at `align_log2`
    /// alignment after the header itself.
    pub fn layout(
        blocks: &[(String, u64)],
        page_log2: u8,
        chunk_log2: u8,
        digest: DigestAlg,
    ) -> Header {
        let align = 1u64 << DEFAULT_ALIGN_LOG2;
        let header_len: usize = HEADER_FIXED
            + blocks
                .iter()
                .map(|(n, _)| ENTRY_FIXED + n.len())
                .sum::<usize>()
            + 8;
        let mut at = align_up(header_len as u64, align).expect("small");
        let mut entries = Vec::with_capacity(blocks.len());
        for (name, len) in blocks {
            entries.push(BlockEntry {
                name: name.clone(),
                len: *len,
                offset: at,
            });
            at = align_up(at + len, align).expect("block lengths are bounded");
        }
        Header {
            page_log2,
            chunk_log2,
            digest,
            align_log2: DEFAULT_ALIGN_LOG2,
            blocks: entries,
        }
    }

    /// Where block data ends (the trailer starts at the next [`TRAILER_ALIGN`] boundary).
    pub fn data_end(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.offset + b.len)
            .max()
            .unwrap_or(0)
    }

    pub fn trailer_offset(&self) -> u64 {
        align_up(self.data_end(), TRAILER_ALIGN).expect("checked at parse")
    }

    /// Pages of block `i`.
    pub fn pages(&self, i: usize) -> u64 {
        self.blocks[i].len >> self.page_log2
    }

    /// Bytes of the present-page bitmaps: per block, one bit per page in little-endian u64
    /// words.
    pub fn bitmap_len(&self) -> u64 {
        (0..self.blocks.len())
            .map(|i| self.pages(i).div_ceil(64) * 8)
            .sum()
    }

    /// Chunk digests the file carries: per block, one per chunk (the last one may be short).
    pub fn chunk_count(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.len.div_ceil(1 << self.chunk_log2))
            .sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_HEADER_LEN);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.push(self.page_log2);
        v.push(self.chunk_log2);
        v.push(digest_code(self.digest));
        v.push(0);
        v.extend_from_slice(&(self.blocks.len() as u16).to_le_bytes());
        v.push(self.align_log2);
        v.extend_from_slice(&[0; 7]);
        debug_assert_eq!(v.len(), HEADER_FIXED);
        for b in &self.blocks {
            v.push(b.name.len() as u8);
            v.extend_from_slice(b.name.as_bytes());
            v.extend_from_slice(&b.len.to_le_bytes());
            v.extend_from_slice(&b.offset.to_le_bytes());
        }
        let h = xxh3_64(&v);
        v.extend_from_slice(&h.to_le_bytes());
        assert!(v.len() <= MAX_HEADER_LEN);
        v
    }

    /// Parses a header from the first bytes of a file of `file_len` bytes (`b` holds at most
    /// [`MAX_HEADER_LEN`] of them). Returns the header and its length in bytes.
    pub fn decode(b: &[u8], file_len: u64) -> Result<(Header, usize), FormatError> {
        let need = |what, need: usize| {
            if b.len() < need {
                Err(FormatError::Truncated {
                    what,
                    have: b.len() as u64,
                    need: need as u64,
                })
            } else {
                Ok(())
            }
        };
        if b.len() < MAGIC.len() || &b[..8] != MAGIC {
            return Err(FormatError::Foreign);
        }
        need("header", HEADER_FIXED)?;
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let (page_log2, chunk_log2, digest_c, flags) = (b[10], b[11], b[12], b[13]);
        let count = u16::from_le_bytes([b[14], b[15]]) as usize;
        let align_log2 = b[16];
        if flags != 0 || b[17..24].iter().any(|&x| x != 0) {
            return Err(corrupt("reserved header bytes are not zero"));
        }
        if !(wire::MIN_PAGE_LOG2..=wire::MAX_PAGE_LOG2).contains(&page_log2) {
            return Err(corrupt(format!("page size 2^{page_log2}")));
        }
        if !(wire::MIN_CHUNK_LOG2..=wire::MAX_CHUNK_LOG2).contains(&chunk_log2)
            || chunk_log2 < page_log2
        {
            return Err(corrupt(format!("chunk size 2^{chunk_log2}")));
        }
        let digest = digest_alg(digest_c).ok_or_else(|| corrupt("unknown digest algorithm"))?;
        if !(12..=30).contains(&align_log2) {
            return Err(corrupt(format!("alignment 2^{align_log2}")));
        }
        if count == 0 || count > wire::MAX_BLOCKS {
            return Err(corrupt(format!("{count} blocks")));
        }
        let align = 1u64 << align_log2;
        let page = 1u64 << page_log2;
        let mut at = HEADER_FIXED;
        let mut blocks: Vec<BlockEntry> = Vec::with_capacity(count);
        for i in 0..count {
            need("block table", at + 1)?;
            let n = b[at] as usize;
            need("block table", at + 1 + n + 16)?;
            let name = &b[at + 1..at + 1 + n];
            if !wire::valid_name(name) {
                return Err(corrupt(format!("block {i} has an invalid name")));
            }
            let name = String::from_utf8(name.to_vec()).expect("valid names are ASCII");
            if blocks.iter().any(|x| x.name == name) {
                return Err(corrupt(format!("block {name:?} appears twice")));
            }
            let rd = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
            let len = rd(at + 1 + n);
            let offset = rd(at + 1 + n + 8);
            at += ENTRY_FIXED + n;
            if len == 0 || len % page != 0 || len > wire::MAX_BLOCK_LEN {
                return Err(corrupt(format!("block {name:?} length {len}")));
            }
            let prev_end = blocks.last().map_or(0, |x| x.offset + x.len);
            if offset % align != 0 || offset < prev_end {
                return Err(corrupt(format!("block {name:?} offset {offset}")));
            }
            let end = offset
                .checked_add(len)
                .ok_or_else(|| corrupt(format!("block {name:?} offset {offset}")))?;
            if end > file_len {
                return Err(FormatError::Truncated {
                    what: "block data",
                    have: file_len,
                    need: end,
                });
            }
            blocks.push(BlockEntry { name, len, offset });
        }
        need("header digest", at + 8)?;
        let want = u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if xxh3_64(&b[..at]) != want {
            return Err(corrupt("the header's digest does not match"));
        }
        let header_len = at + 8;
        if blocks[0].offset < header_len as u64 {
            return Err(corrupt("the first block overlaps the header"));
        }
        Ok((
            Header {
                page_log2,
                chunk_log2,
                digest,
                align_log2,
                blocks,
            },
            header_len,
        ))
    }

    /// xxh3-64 of the encoded header: the footer is bound to it.
    pub fn hash(&self) -> u64 {
        let e = self.encode();
        u64::from_le_bytes(e[e.len() - 8..].try_into().expect("8 bytes"))
    }
}

/// Where the trailer's parts are; the footer that says so is the file's last 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub trailer_offset: u64,
    pub bitmap_len: u64,
    pub digests_len: u64,
    pub state_len: u64,
    /// xxh3-64 of the trailer's bytes (bitmaps, digests, state, in that order).
    pub trailer_hash: u64,
}

impl Footer {
    pub fn encode(&self, header_hash: u64) -> [u8; FOOTER_LEN] {
        let mut f = [0u8; FOOTER_LEN];
        f[..8].copy_from_slice(FOOTER_MAGIC);
        f[8..10].copy_from_slice(&VERSION.to_le_bytes());
        for (i, v) in [
            self.trailer_offset,
            self.bitmap_len,
            self.digests_len,
            self.state_len,
            self.trailer_hash,
        ]
        .iter()
        .enumerate()
        {
            f[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let h = footer_hash(&f[..56], header_hash);
        f[56..].copy_from_slice(&h.to_le_bytes());
        f
    }

    /// Parses the footer (the file's last [`FOOTER_LEN`] bytes) of a file of `file_len`
    /// bytes with header `h`, and checks that it describes exactly the rest of the file.
    pub fn decode(f: &[u8; FOOTER_LEN], h: &Header, file_len: u64) -> Result<Footer, FormatError> {
        if &f[..8] != FOOTER_MAGIC {
            return Err(FormatError::NoFooter);
        }
        let want = u64::from_le_bytes(f[56..].try_into().expect("8 bytes"));
        if footer_hash(&f[..56], h.hash()) != want {
            return Err(FormatError::NoFooter);
        }
        let version = u16::from_le_bytes([f[8], f[9]]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let rd = |i: usize| u64::from_le_bytes(f[16 + 8 * i..24 + 8 * i].try_into().expect("8"));
        let ft = Footer {
            trailer_offset: rd(0),
            bitmap_len: rd(1),
            digests_len: rd(2),
            state_len: rd(3),
            trailer_hash: rd(4),
        };
        if ft.trailer_offset != h.trailer_offset() {
            return Err(corrupt("the trailer is not where the block table ends"));
        }
        if ft.bitmap_len != h.bitmap_len() {
            return Err(corrupt("the page bitmaps' size does not match the blocks"));
        }
        if ft.digests_len != h.chunk_count() * 8 {
            return Err(corrupt("the digests' size does not match the blocks"));
        }
        if ft.state_len > MAX_STATE_LEN {
            return Err(corrupt(format!(
                "{} bytes of device state (at most {MAX_STATE_LEN})",
                ft.state_len
            )));
        }
        let end = ft.trailer_offset + ft.bitmap_len + ft.digests_len + ft.state_len;
        if end + FOOTER_LEN as u64 != file_len {
            return Err(corrupt(format!(
                "the file is {file_len} bytes, its footer describes {}",
                end + FOOTER_LEN as u64
            )));
        }
        Ok(ft)
    }

    pub fn trailer_len(&self) -> u64 {
        self.bitmap_len + self.digests_len + self.state_len
    }
}

fn footer_hash(body: &[u8], header_hash: u64) -> u64 {
    let mut v = body.to_vec();
    v.extend_from_slice(&header_hash.to_le_bytes());
    xxh3_64(&v)
}

/// The trailer's contents, checked against the footer's hash and split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// Present pages, one bitmap word vector per block.
    pub present: Vec<Vec<u64>>,
    pub digests: Vec<u64>,
    pub state: Vec<u8>,
}

impl Trailer {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for b in &self.present {
            for w in b {
                v.extend_from_slice(&w.to_le_bytes());
            }
        }
        for d in &self.digests {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(&self.state);
        v
    }

    /// Splits trailer bytes `t` (exactly `ft.trailer_len()` of them) as header `h` lays them
    /// out.
    pub fn decode(t: &[u8], h: &Header, ft: &Footer) -> Result<Trailer, FormatError> {
        if t.len() as u64 != ft.trailer_len() {
            return Err(corrupt("the trailer's size does not match the footer"));
        }
        if xxh3_64(t) != ft.trailer_hash {
            return Err(corrupt(
                "the trailer's digest does not match (bitmaps, digests or device state)",
            ));
        }
        let words = |b: &[u8]| -> Vec<u64> {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        };
        let mut at = 0usize;
        let mut present = Vec::with_capacity(h.blocks.len());
        for i in 0..h.blocks.len() {
            let n = (h.pages(i).div_ceil(64) * 8) as usize;
            present.push(words(&t[at..at + n]));
            at += n;
        }
        let n = ft.digests_len as usize;
        let digests = words(&t[at..at + n]);
        at += n;
        Ok(Trailer {
            present,
            digests,
            state: t[at..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header::layout(
            &[("pc.ram".into(), 8 << 20), ("vga".into(), 1 << 20)],
            12,
            20,
            DigestAlg::Xxh3PageTree,
        )
    }

    #[test]
    fn save_1_blocks_sit_at_aligned_offsets_after_the_header() {
        let h = sample();
        assert_eq!(h.blocks[0].offset, 1 << 20);
        assert_eq!(h.blocks[1].offset, 9 << 20);
        assert_eq!(h.trailer_offset(), 10 << 20);
        assert_eq!(h.bitmap_len(), (2048 / 64 + 256 / 64) * 8);
        assert_eq!(h.chunk_count(), 9);
    }

    #[test]
    fn save_2_header_round_trips_and_every_single_byte_change_is_refused() {
        let h = sample();
        let e = h.encode();
        let file_len = 16 << 20;
        assert_eq!(Header::decode(&e, file_len), Ok((h, e.len())));
        for i in 0..e.len() {
            let mut bad = e.clone();
            bad[i] ^= 0x40;
            assert!(Header::decode(&bad, file_len).is_err(), "byte {i}");
        }
        for n in 0..e.len() {
            assert!(Header::decode(&e[..n], file_len).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn save_2_foreign_version_and_truncated_files_are_told_apart() {
        let h = sample();
        let e = h.encode();
        assert_eq!(
            Header::decode(b"\x7fELF\x02\x01\x01\0\0\0\0\0", 1 << 30),
            Err(FormatError::Foreign)
        );
        let mut v2 = e.clone();
        v2[8] = 2;
        assert_eq!(Header::decode(&v2, 16 << 20), Err(FormatError::Version(2)));
        assert!(matches!(
            Header::decode(&e, (9 << 20) + 4096),
            Err(FormatError::Truncated {
                what: "block data",
                ..
            })
        ));
    }

    #[test]
    fn save_3_footer_describes_exactly_the_rest_of_the_file() {
        let h = sample();
        let tr = Trailer {
            present: vec![vec![u64::MAX; 32], vec![0b1011; 4]],
            digests: (0..9).collect(),
            state: b"device state".to_vec(),
        };
        let t = tr.encode();
        let ft = Footer {
            trailer_offset: h.trailer_offset(),
            bitmap_len: h.bitmap_len(),
            digests_len: 72,
            state_len: 12,
            trailer_hash: xxh3_64(&t),
        };
        let len = h.trailer_offset() + t.len() as u64 + FOOTER_LEN as u64;
        let f = ft.encode(h.hash());
        assert_eq!(Footer::decode(&f, &h, len), Ok(ft));
        assert_eq!(Trailer::decode(&t, &h, &ft), Ok(tr));
        // A longer or shorter file than the footer describes.
        assert!(Footer::decode(&f, &h, len + 4096).is_err());
        assert!(Footer::decode(&f, &h, len - 1).is_err());
        // Any changed footer byte: no valid footer, or a refused one.
        for i in 0..FOOTER_LEN {
            let mut bad = f;
            bad[i] ^= 1;
            assert!(Footer::decode(&bad, &h, len).is_err(), "byte {i}");
        }
        // A footer of another header (same sizes, other names) is not this file's.
        let other = Header::layout(
            &[("pc.ram".into(), 8 << 20), ("vgb".into(), 1 << 20)],
            12,
            20,
            DigestAlg::Xxh3PageTree,
        );
        assert_eq!(Footer::decode(&f, &other, len), Err(FormatError::NoFooter));
        // Any changed trailer byte.
        let mut bad = t.clone();
        bad[100] ^= 1;
        assert!(Trailer::decode(&bad, &h, &ft).is_err());
    }
}
