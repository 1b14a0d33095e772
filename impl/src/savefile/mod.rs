//! Save files (spec: section 13): the memory of a migration's destination kept in a file
//! (`rdmig save`), and read back as a migration's source (`rdmig restore`).
//!
//! A save is written to `FILE.rdmig-partial` and renamed over `FILE` only after its footer is
//! on disk, so an existing save is never replaced by an unfinished one, and a file without a
//! valid footer is never restored (spec: SAVE-3).

pub mod format;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rdmig_model::wire::DigestAlg;
use rdmig_model::PageBitmap;

use crate::memory::ram::{RamBlock, RegionUse};
use format::{Footer, FormatError, Header, Trailer, FOOTER_LEN, MAX_HEADER_LEN};

/// Why a save or a restore cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Format { path: PathBuf, source: FormatError },
    #[error("{}: the file system does not support O_DIRECT ({source}); run without --direct-io", .path.display())]
    NoDirectIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", .path.display())]
    Mismatch { path: PathBuf, what: String },
    #[error(transparent)]
    Mem(#[from] crate::memory::ram::MemError),
}

impl SaveError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SaveError + '_ {
        move |source| SaveError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Where an unfinished save of `path` is written.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".rdmig-partial");
    PathBuf::from(s)
}

/// Opens `path` for `O_DIRECT` data transfer, refusing file systems that do not support it.
fn open_direct(path: &Path, write: bool) -> Result<File, SaveError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| SaveError::NoDirectIo {
            path: path.into(),
            source,
        })
}

/// The block regions of a save file `file` at `path` laid out as `header` says, mapped for
/// `role`.
fn regions(
    header: &Header,
    file: &File,
    path: &Path,
    role: RegionUse,
) -> Result<Vec<Arc<RamBlock>>, SaveError> {
    header
        .blocks
        .iter()
        .map(|b| {
            RamBlock::file_region(&b.name, file, path, b.offset, b.len, header.page_log2, role)
                .map(Arc::new)
                .map_err(SaveError::from)
        })
        .collect()
}

/// The descriptor a file's data moves through (its `O_DIRECT` one when there is one), where
/// each block starts, and whether it is `O_DIRECT`.
fn data_fd(header: &Header, file: &File, direct: Option<&File>) -> (File, Vec<u64>, bool) {
    let f = direct
        .unwrap_or(file)
        .try_clone()
        .expect("a descriptor can be duplicated");
    let base = header.blocks.iter().map(|b| b.offset).collect();
    (f, base, direct.is_some())
}

/// A save being written: the destination's memory is the file's block regions.
pub struct SaveTarget {
    path: PathBuf,
    partial: PathBuf,
    file: File,
    direct: Option<File>,
    header: Header,
}

impl std::fmt::Debug for SaveTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveTarget")
            .field("path", &self.path)
            .finish()
    }
}

impl SaveTarget {
    /// Creates the partial file with its header, sized to the end of its block data (all
    /// holes until pages land).
    pub fn create(
        path: &Path,
        blocks: &[(String, u64)],
        page_log2: u8,
        chunk_log2: u8,
        digest: DigestAlg,
        direct_io: bool,
    ) -> Result<SaveTarget, SaveError> {
        let header = Header::layout(blocks, page_log2, chunk_log2, digest);
        let partial = partial_path(path);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(SaveError::io(&partial))?;
        file.write_all(&header.encode())
            .and_then(|_| file.set_len(header.trailer_offset()))
            .map_err(SaveError::io(&partial))?;
        let direct = if direct_io {
            let d = Self::probe_direct(&partial, &header, &file)
                .inspect_err(|_| drop(std::fs::remove_file(&partial)))?;
            Some(d)
        } else {
            None
        };
        Ok(SaveTarget {
            path: path.into(),
            partial,
            file,
            direct,
            header,
        })
    }

    /// Opens `partial` with `O_DIRECT` and writes one page through it, since some file
    /// systems accept the flag at open and refuse the first write; the page is a hole again
    /// afterwards.
    fn probe_direct(partial: &Path, header: &Header, file: &File) -> Result<File, SaveError> {
        let d = open_direct(partial, true)?;
        let b = &header.blocks[0];
        let probe = RamBlock::anonymous("probe", 4096, 12)?;
        probe
            .write_to_file(0, 4096, d.as_fd(), b.offset)
            .map_err(|source| SaveError::NoDirectIo {
                path: partial.into(),
                source,
            })?;
        // A file system without holes keeps a zero page there, which restores as zeros.
        let _ = rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            b.offset,
            4096,
        );
        Ok(d)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file's block regions as the destination's memory (read for digests, punched for
    /// zero ranges; the data itself is written by the file transport).
    pub fn blocks(&self) -> Result<Vec<Arc<RamBlock>>, SaveError> {
        regions(
            &self.header,
            &self.file,
            &self.partial,
            RegionUse::SaveTarget,
        )
    }

    /// The descriptor data is written through (`O_DIRECT` with `--direct-io`) and where each
    /// block starts in the file.
    pub fn data(&self) -> (File, Vec<u64>, bool) {
        data_fd(&self.header, &self.file, self.direct.as_ref())
    }

    /// Which pages hold data: the file system's own record (`SEEK_DATA`, `SEEK_HOLE`), since
    /// zero ranges were punched as holes and every other page was written.
    fn present(&self) -> Result<Vec<Vec<u64>>, SaveError> {
        use rustix::fs::{seek, SeekFrom as S};
        let page_log2 = self.header.page_log2;
        let mut out = Vec::new();
        for b in &self.header.blocks {
            let pages = b.len >> page_log2;
            let mut bm = PageBitmap::new(pages);
            let end = b.offset + b.len;
            let mut at = b.offset;
            while at < end {
                let data = match seek(&self.file, S::Data(at)) {
                    Ok(d) => d,
                    // ENXIO: no data after `at`.
                    Err(rustix::io::Errno::NXIO) => break,
                    Err(e) => return Err(SaveError::io(&self.partial)(e.into())),
                };
                if data >= end {
                    break;
                }
                let hole = seek(&self.file, S::Hole(data))
                    .map_err(|e| SaveError::io(&self.partial)(e.into()))?
                    .min(end);
                let first = (data - b.offset) >> page_log2;
                let last = (hole - b.offset).div_ceil(1 << page_log2);
                bm.set_range(first, last - first);
                at = hole;
            }
            out.push(bm.words().to_vec());
        }
        Ok(out)
    }

    /// Makes the save valid: data flushed, trailer (present pages, `digests` of the saved
    /// memory, device `state`) written and flushed, then the footer, flushed, and the file
    /// renamed into place (spec: SAVE-3). Called when the migration commits.
    pub fn finish(&self, state: &[u8], digests: &[u64]) -> Result<(), SaveError> {
        let h = &self.header;
        if digests.len() as u64 != h.chunk_count() {
            return Err(SaveError::Mismatch {
                path: self.partial.clone(),
                what: format!(
                    "{} chunk digests for {} chunks",
                    digests.len(),
                    h.chunk_count()
                ),
            });
        }
        if state.len() as u64 > format::MAX_STATE_LEN {
            return Err(SaveError::Mismatch {
                path: self.partial.clone(),
                what: format!("{} bytes of device state", state.len()),
            });
        }
        let io = SaveError::io(&self.partial);
        let trailer = Trailer {
            present: self.present()?,
            digests: digests.to_vec(),
            state: state.to_vec(),
        }
        .encode();
        let footer = Footer {
            trailer_offset: h.trailer_offset(),
            bitmap_len: h.bitmap_len(),
            digests_len: digests.len() as u64 * 8,
            state_len: state.len() as u64,
            trailer_hash: xxhash_rust::xxh3::xxh3_64(&trailer),
        };
        let r = self
            .file
            .write_all_at(&trailer, footer.trailer_offset)
            .and_then(|_| self.file.sync_all())
            .and_then(|_| {
                self.file.write_all_at(
                    &footer.encode(h.hash()),
                    footer.trailer_offset + trailer.len() as u64,
                )
            })
            .and_then(|_| self.file.sync_all())
            .and_then(|_| std::fs::rename(&self.partial, &self.path));
        r.map_err(io)?;
        // The rename itself is durable once the directory is.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Removes the partial file (a save that did not commit).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// A finished save, checked: header, footer and trailer (spec: SAVE-2, SAVE-3).
pub struct SavedImage {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    pub header: Header,
    pub trailer: Trailer,
}

impl SavedImage {
    /// Opens and checks `path`; reads only the header, the footer and the trailer.
    pub fn open(path: &Path, direct_io: bool) -> Result<SavedImage, SaveError> {
        let io = SaveError::io(path);
        let fmt = |source| SaveError::Format {
            path: path.into(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(SaveError::io(path))?.len();
        let mut head = Vec::with_capacity(MAX_HEADER_LEN);
        (&mut file)
            .take(MAX_HEADER_LEN as u64)
            .read_to_end(&mut head)
            .map_err(SaveError::io(path))?;
        let (header, header_len) = Header::decode(&head, len).map_err(fmt)?;
        let min = header.trailer_offset() + FOOTER_LEN as u64;
        if len < min {
            return Err(fmt(if len > header_len as u64 {
                FormatError::NoFooter
            } else {
                FormatError::Truncated {
                    what: "footer",
                    have: len,
                    need: min,
                }
            }));
        }
        let mut f = [0u8; FOOTER_LEN];
        file.seek(SeekFrom::Start(len - FOOTER_LEN as u64))
            .and_then(|_| file.read_exact(&mut f))
            .map_err(SaveError::io(path))?;
        let footer = Footer::decode(&f, &header, len).map_err(fmt)?;
        // Bounded by the footer's checks: bitmaps and digests by the block table, the state
        // by MAX_STATE_LEN.
        let mut t = vec![0u8; footer.trailer_len() as usize];
        file.read_exact_at(&mut t, footer.trailer_offset)
            .map_err(SaveError::io(path))?;
        let trailer = Trailer::decode(&t, &header, &footer).map_err(fmt)?;
        let direct = if direct_io {
            Some(open_direct(path, false)?)
        } else {
            None
        };
        Ok(SavedImage {
            path: path.into(),
            file,
            direct,
            header,
            trailer,
        })
    }

    /// Checks that the save holds exactly the blocks `want` (name, length), in any order,
    /// and returns, per wanted block, its index in the file.
    pub fn match_blocks(&self, want: &[(String, u64)]) -> Result<Vec<usize>, SaveError> {
        let mismatch = |what: String| SaveError::Mismatch {
            path: self.path.clone(),
            what,
        };
        let have = &self.header.blocks;
        if have.len() != want.len() {
            let names: Vec<_> = have.iter().map(|b| b.name.as_str()).collect();
            return Err(mismatch(format!(
                "the save holds {} block(s) ({}), {} given with --ram",
                have.len(),
                names.join(", "),
                want.len()
            )));
        }
        want.iter()
            .map(|(name, len)| {
                let i = have
                    .iter()
                    .position(|b| &b.name == name)
                    .ok_or_else(|| mismatch(format!("the save holds no block named {name:?}")))?;
                if have[i].len != *len {
                    return Err(mismatch(format!(
                        "block {name:?} is {} bytes in the save, {len} given with --ram",
                        have[i].len
                    )));
                }
                Ok(i)
            })
            .collect()
    }

    /// The file's block regions as the source's memory, in the file's block order.
    pub fn blocks(&self) -> Result<Vec<Arc<RamBlock>>, SaveError> {
        regions(&self.header, &self.file, &self.path, RegionUse::SavedImage)
    }

    /// The present pages of each block, in the file's block order.
    pub fn present(&self) -> Vec<PageBitmap> {
        self.trailer
            .present
            .iter()
            .enumerate()
            .map(|(i, w)| {
                PageBitmap::from_words(w.clone(), self.header.pages(i))
                    .expect("sizes checked by the footer")
            })
            .collect()
    }

    /// The descriptor data is read through and where each block starts in the file.
    pub fn data(&self) -> (File, Vec<u64>, bool) {
        data_fd(&self.header, &self.file, self.direct.as_ref())
    }

    /// Bytes of the file that hold data (the rest are holes).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_3_present_pages_follow_holes_and_the_file_is_valid_only_after_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.rdmig");
        let t = SaveTarget::create(
            &path,
            &[("ram".into(), 64 << 12)],
            12,
            16,
            DigestAlg::Xxh3_64,
            false,
        )
        .unwrap();
        let blocks = t.blocks().unwrap();
        let (fd, base, _) = t.data();
        let src = RamBlock::anonymous("ram", 64 << 12, 12).unwrap();
        src.write(3 << 12, &[7u8; 8192]);
        src.write_to_file(3 << 12, 8192, fd.as_fd(), base[0] + (3 << 12))
            .unwrap();
        // A page written then zeroed is a hole again.
        src.write_to_file(9 << 12, 4096, fd.as_fd(), base[0] + (9 << 12))
            .unwrap();
        blocks[0].zero(9 << 12, 4096);
        assert!(matches!(
            SavedImage::open(&partial_path(&path), false),
            Err(SaveError::Format {
                source: FormatError::NoFooter,
                ..
            })
        ));
        assert!(!path.exists(), "nothing at the final path before finish");
        t.finish(b"state", &[1, 2, 3, 4]).unwrap();
        let img = SavedImage::open(&path, false).unwrap();
        let present = img.present();
        let pages: Vec<u64> = (0..64).filter(|&p| present[0].get(p)).collect();
        assert_eq!(pages, vec![3, 4]);
        assert_eq!(img.trailer.state, b"state");
        assert_eq!(img.trailer.digests, vec![1, 2, 3, 4]);
        assert_eq!(img.match_blocks(&[("ram".into(), 64 << 12)]).unwrap(), [0]);
        assert!(img.match_blocks(&[("ram".into(), 32 << 12)]).is_err());
        assert!(img.match_blocks(&[("rom".into(), 64 << 12)]).is_err());
        let mut buf = [0u8; 4096];
        img.blocks().unwrap()[0].read(4 << 12, &mut buf);
        assert_eq!(buf, [7u8; 4096]);
    }
}
