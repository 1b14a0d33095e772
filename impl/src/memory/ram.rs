//! RAM blocks: memory mapped shared from a file (regular file, `/dev/shm`, hugetlbfs) so that
//! another process (a VMM, `rdmig workload`) keeps writing while rdmig migrates it, or
//! anonymous memory for tests.
//!
//! The mapping is shared with writers rdmig does not control, so Rust references into it would
//! be unsound (another process may change bytes under a `&[u8]`). All access goes through raw
//! pointer copies in this module; a torn read of a page that is being written is harmless
//! because the write marks the page dirty and it is sent again, and the final round runs with
//! the workload paused.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MemError {
    #[error("RAM file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("RAM file {path} is {have} bytes, expected {want}")]
    Size { path: PathBuf, have: u64, want: u64 },
    #[error("RAM file {path} is empty or not a multiple of the page size ({page} bytes)")]
    Shape { path: PathBuf, page: u64 },
    #[error("mapping {what}: {source}")]
    Map {
        what: String,
        source: std::io::Error,
    },
    #[error("block name {0:?} is not 1..=64 bytes of [A-Za-z0-9._:/-]")]
    Name(String),
}

/// One named, page-aligned region of memory.
pub struct RamBlock {
    name: String,
    page_log2: u8,
    len: u64,
    ptr: *mut u8,
    path: Option<PathBuf>,
    /// The file behind a block that may have holes (not pre-faulted), and where the block
    /// starts in it: a zero range over a hole costs nothing.
    holes: Option<Holes>,
    _map: Mapping,
}

enum Mapping {
    File(#[allow(dead_code)] MmapRaw),
    Anon(#[allow(dead_code)] memmap2::MmapMut),
}

/// A block's backing file, when it may have holes.
struct Holes {
    file: File,
    base: u64,
    /// Zero ranges over data become holes too (a save file), instead of zero bytes.
    punch: bool,
}

/// What a block mapped from a region of a save file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionUse {
    /// The save's destination: shared with the file, not pre-faulted (the file is sparse and
    /// stays so), zero ranges punched as holes.
    SaveTarget,
    /// The restore's source: a private copy-on-write view; nothing is ever written back.
    SavedImage,
}

// SAFETY: the pointer refers to a mapping owned by the block for its whole life; every access
// goes through bounds-checked raw copies, which are safe to perform from several threads
// (concurrent writers to the same bytes produce unspecified bytes, never undefined behaviour
// in rdmig's own data structures).
unsafe impl Send for RamBlock {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for RamBlock {}

impl std::fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamBlock")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("path", &self.path)
            .finish()
    }
}

fn check_name(name: &str) -> Result<(), MemError> {
    if rdmig_model::wire::valid_name(name.as_bytes()) {
        Ok(())
    } else {
        Err(MemError::Name(name.to_string()))
    }
}

impl RamBlock {
    /// Maps an existing file shared. Its size must be a non-zero multiple of the page size.
    pub fn open(name: &str, path: &Path, page_log2: u8) -> Result<Self, MemError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| MemError::Open {
                path: path.into(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| MemError::Open {
                path: path.into(),
                source,
            })?
            .len();
        if len == 0 || !len.is_multiple_of(1 << page_log2) {
            return Err(MemError::Shape {
                path: path.into(),
                page: 1 << page_log2,
            });
        }
        // Populated so the copy loop does not take a page fault per page during the migration.
        Self::map_file(name, path, file, len, page_log2, true)
    }

    /// Creates (or truncates to `len`) a file and maps it shared, pre-faulting every page so
    /// that arriving data does not pay page faults (setup cost, reported separately).
    pub fn create(name: &str, path: &Path, len: u64, page_log2: u8) -> Result<Self, MemError> {
        Self::create_with(name, path, len, page_log2, true)
    }

    /// As [`create`](Self::create), without pre-faulting: pages are allocated as data lands
    /// (by the writers, in parallel) and zero ranges over holes cost nothing, so memory that
    /// stays zero is never allocated. For a destination that writes every page once, in
    /// large pieces (a restore).
    pub fn create_sparse(
        name: &str,
        path: &Path,
        len: u64,
        page_log2: u8,
    ) -> Result<Self, MemError> {
        Self::create_with(name, path, len, page_log2, false)
    }

    fn create_with(
        name: &str,
        path: &Path,
        len: u64,
        page_log2: u8,
        populate: bool,
    ) -> Result<Self, MemError> {
        check_name(name)?;
        if len == 0 || !len.is_multiple_of(1 << page_log2) {
            return Err(MemError::Shape {
                path: path.into(),
                page: 1 << page_log2,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| MemError::Open {
                path: path.into(),
                source,
            })?;
        file.set_len(len).map_err(|source| MemError::Open {
            path: path.into(),
            source,
        })?;
        let holes = match populate {
            true => None,
            false => Some(Holes {
                file: file.try_clone().map_err(|source| MemError::Open {
                    path: path.into(),
                    source,
                })?,
                base: 0,
                punch: false,
            }),
        };
        let mut b = Self::map_file(name, path, file, len, page_log2, populate)?;
        b.holes = holes;
        Ok(b)
    }

    fn map_file(
        name: &str,
        path: &Path,
        file: File,
        len: u64,
        page_log2: u8,
        populate: bool,
    ) -> Result<Self, MemError> {
        let mut opts = MmapOptions::new();
        opts.len(len as usize);
        if populate {
            opts.populate();
        }
        let map = opts.map_raw(&file).map_err(|source| MemError::Map {
            what: path.display().to_string(),
            source,
        })?;
        Ok(RamBlock {
            name: name.to_string(),
            page_log2,
            len,
            ptr: map.as_mut_ptr(),
            path: Some(path.into()),
            holes: None,
            _map: Mapping::File(map),
        })
    }

    /// Maps `[offset, offset+len)` of `file` (a save file) as a block; `offset` is page
    /// aligned (the save file's layout aligns blocks to 1 MiB).
    pub fn file_region(
        name: &str,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
        page_log2: u8,
        role: RegionUse,
    ) -> Result<Self, MemError> {
        check_name(name)?;
        if len == 0 || !len.is_multiple_of(1 << page_log2) || !offset.is_multiple_of(4096) {
            return Err(MemError::Shape {
                path: path.into(),
                page: 1 << page_log2,
            });
        }
        let what = |source| MemError::Map {
            what: format!("{} at {offset}", path.display()),
            source,
        };
        let mut opts = MmapOptions::new();
        opts.offset(offset).len(len as usize);
        let (ptr, map, holes) = match role {
            RegionUse::SaveTarget => {
                let map = opts.map_raw(file).map_err(what)?;
                let f = file.try_clone().map_err(what)?;
                let holes = Holes {
                    file: f,
                    base: offset,
                    punch: true,
                };
                (map.as_mut_ptr(), Mapping::File(map), Some(holes))
            }
            RegionUse::SavedImage => {
                // SAFETY: a private (copy-on-write) mapping: writes through it never reach the
                // file, and changes to the file by another process only change the values the
                // block reads, which every access here tolerates (module comment).
                let mut map = unsafe { opts.map_copy(file) }.map_err(what)?;
                (map.as_mut_ptr(), Mapping::Anon(map), None)
            }
        };
        Ok(RamBlock {
            name: name.to_string(),
            page_log2,
            len,
            ptr,
            path: Some(path.into()),
            holes,
            _map: map,
        })
    }

    /// Private anonymous memory for a device state streamed through it (the source's state
    /// buffer, the destination's staging area, spec: STATE-2): zero-filled, taken only as it
    /// is written or [populated](Self::populate).
    pub fn staging(name: &str, len: u64) -> Result<Self, MemError> {
        let b = Self::anonymous(name, len, rdmig_model::wire::STATE_PAGE_LOG2)?;
        // Huge pages where the kernel gives them (transparent huge pages, "madvise" or
        // "always"): gigabytes of state fault in and clear 2 MiB at a time, and the copies
        // into it miss the TLB 512 times less often. A kernel without them ignores it.
        if let Mapping::Anon(m) = &b._map {
            let _ = m.advise(memmap2::Advice::HugePage);
        }
        Ok(b)
    }

    /// Faults in `[0, len)` of anonymous memory ahead of its use (`MADV_POPULATE_WRITE`), so
    /// that a device state streamed into it later pays no page faults then. A file-backed
    /// block, or a kernel without it, is left as it is.
    pub fn populate(&self, len: u64) -> std::io::Result<()> {
        match &self._map {
            Mapping::Anon(m) => m.advise_range(
                memmap2::Advice::PopulateWrite,
                0,
                len.min(self.len) as usize,
            ),
            Mapping::File(_) => Ok(()),
        }
    }

    /// Private anonymous memory, zero-filled.
    pub fn anonymous(name: &str, len: u64, page_log2: u8) -> Result<Self, MemError> {
        check_name(name)?;
        let mut map = MmapOptions::new()
            .len(len as usize)
            .map_anon()
            .map_err(|source| MemError::Map {
                what: format!("{len} anonymous bytes"),
                source,
            })?;
        Ok(RamBlock {
            name: name.to_string(),
            page_log2,
            len,
            ptr: map.as_mut_ptr(),
            path: None,
            holes: None,
            _map: Mapping::Anon(map),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn page_log2(&self) -> u8 {
        self.page_log2
    }
    pub fn pages(&self) -> u64 {
        self.len >> self.page_log2
    }
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The block as the protocol describes it.
    pub fn desc(&self) -> rdmig_model::wire::BlockDesc {
        rdmig_model::wire::BlockDesc {
            name: self.name.as_bytes().to_vec(),
            length: self.len,
            page_log2: self.page_log2,
        }
    }

    fn check(&self, offset: u64, len: usize) {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= self.len),
            "access {offset}+{len} outside block {} of {}",
            self.name,
            self.len
        );
    }

    /// Copies `buf.len()` bytes at `offset` out of the block.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the range is inside the mapping (checked above) and `buf` is a distinct
        // allocation; the source bytes may change concurrently, which only affects their values.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Copies `data` into the block at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: the range is inside the mapping (checked above) and `data` does not alias it
        // (callers never pass slices of a mapping: there is no API that yields one).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset as usize), data.len())
        }
    }

    /// Writes zeros over `[offset, offset+len)`; nothing where the backing file has a hole
    /// there already, and in a save file whole pages become holes.
    pub fn zero(&self, offset: u64, len: u64) {
        self.check(offset, len as usize);
        let page = 1u64 << self.page_log2;
        if let Some(h) = &self.holes {
            use rustix::fs::{fallocate, seek, FallocateFlags, SeekFrom};
            if offset.is_multiple_of(page) && len.is_multiple_of(page) {
                // Already a hole (a fresh file is all holes): asking costs a lookup, punching
                // a journal transaction, writing zeros an allocation per page.
                let at = h.base + offset;
                match seek(&h.file, SeekFrom::Data(at)) {
                    Ok(d) if d >= at + len => return,
                    Err(rustix::io::Errno::NXIO) => return,
                    _ => {}
                }
                let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                if h.punch && fallocate(&h.file, flags, at, len).is_ok() {
                    return;
                }
            }
        }
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(self.ptr.add(offset as usize), 0, len as usize) }
    }

    /// Calls `f` with a private copy of `[offset, offset+len)` in pieces of at most 1 MiB, so
    /// hashing and zero checks never hold a reference into shared memory.
    pub fn visit(&self, offset: u64, len: u64, mut f: impl FnMut(&[u8])) {
        self.check(offset, len as usize);
        // Small enough to stay in a core's cache between the copy and `f`, and below the
        // allocator's mmap threshold, so a call costs no page faults.
        let mut buf = vec![0u8; len.min(VISIT_PIECE) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            self.read(at, &mut buf[..n]);
            f(&buf[..n]);
            at += n as u64;
        }
    }

    /// True if every byte of the range is zero. Reads the mapping in place, 64 bytes per step
    /// (zero detection runs over all memory in the first round, so it must not copy).
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        self.check(offset, len as usize);
        let start = offset as usize;
        let end = start + len as usize;
        let mut i = start;
        // SAFETY: every read below is inside [start, end), which `check` bounded by the
        // mapping; unaligned reads are used, and values changing concurrently only change the
        // answer, which the caller treats as a snapshot (the page is rescanned if written).
        unsafe {
            while i < end && !(self.ptr as usize + i).is_multiple_of(8) {
                if std::ptr::read_volatile(self.ptr.add(i)) != 0 {
                    return false;
                }
                i += 1;
            }
            while i + 64 <= end {
                let p = self.ptr.add(i) as *const u64;
                let mut acc = 0u64;
                for k in 0..8 {
                    acc |= std::ptr::read(p.add(k));
                }
                if acc != 0 {
                    return false;
                }
                i += 64;
            }
            while i < end {
                if std::ptr::read_volatile(self.ptr.add(i)) != 0 {
                    return false;
                }
                i += 1;
            }
        }
        true
    }

    /// xxh3-64 of the range: the protocol's chunk digest (spec: SW-4).
    pub fn digest(&self, offset: u64, len: u64) -> u64 {
        if len <= VISIT_PIECE {
            let mut h = 0;
            self.visit(offset, len, |b| h = rdmig_model::digest::chunk_digest(b));
            return h;
        }
        // The streaming form of the same hash (equal to the one-shot xxh3-64 of the range).
        let mut st = xxhash_rust::xxh3::Xxh3::new();
        self.visit(offset, len, |b| st.update(b));
        st.digest()
    }

    /// xxh3-64 of each page of `[offset, offset+len)` (pages of `1 << page_log2` bytes, a
    /// short last one over its length), appended to `out`, through one cache-sized buffer
    /// (spec: SW-4, `Xxh3PageTree`).
    pub fn page_hashes(&self, offset: u64, len: u64, page_log2: u8, out: &mut Vec<u64>) {
        let page = 1u64 << page_log2;
        if page > VISIT_PIECE {
            let mut at = offset;
            while at < offset + len {
                let n = page.min(offset + len - at);
                out.push(self.digest(at, n));
                at += n;
            }
            return;
        }
        // Every piece but the last is a whole number of pages (VISIT_PIECE is a multiple of
        // the page size, and `offset` is page-aligned); the last may end with a short page.
        self.visit(offset, len, |piece| {
            out.extend(
                piece
                    .chunks(page as usize)
                    .map(rdmig_model::digest::chunk_digest),
            );
        });
    }

    /// Sends `header` followed by `[offset, offset+len)` of the block on a socket with
    /// `writev`, straight from the mapping: no intermediate copy on the source's data path.
    pub fn send_range(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        header: &[u8],
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        send_frames(
            fd,
            &[FramePart {
                header,
                block: self,
                offset,
                len,
            }],
        )
    }

    /// Reads exactly `len` bytes from a socket into `[offset, offset+len)` of the block:
    /// received data goes from the kernel straight into destination memory. All of it must
    /// arrive by `deadline` (a whole-frame bound, not one per read: spec LIVE-3), or the read
    /// fails with `TimedOut`.
    ///
    /// One `recv(MSG_WAITALL)` normally takes the whole range, with the socket's receive
    /// timeout set to the time left: Linux counts that timeout down across the call, so it
    /// bounds the whole receive. The socket keeps that timeout afterwards; its other readers
    /// treat a timeout as "nothing yet".
    pub fn recv_range(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: u64,
        deadline: std::time::Instant,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        self.check(offset, len as usize);
        let mut done = 0u64;
        while done < len {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            // At least a millisecond: a zero timeout would mean "wait for ever".
            let left = left.max(std::time::Duration::from_millis(1));
            rustix::net::sockopt::set_socket_timeout(
                fd,
                rustix::net::sockopt::Timeout::Recv,
                Some(left),
            )?;
            // SAFETY: the destination range is inside the mapping (checked above) and nothing
            // else in this process holds a reference into it.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    self.ptr.add((offset + done) as usize) as *mut libc::c_void,
                    (len - done) as usize,
                    libc::MSG_WAITALL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    // Interrupted, or the timeout ran out: the deadline check above decides.
                    std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut => continue,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Writes `[offset, offset+len)` of the block to `fd` at `file_offset` (one `pwrite`
    /// per kernel limit, straight from the mapping: with `O_DIRECT` the device reads the
    /// block's pages, which are page aligned).
    pub fn write_to_file(
        &self,
        offset: u64,
        len: u64,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> std::io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let at_end = || std::io::ErrorKind::WriteZero.into();
        self.transfer(offset, len, file_offset, at_end, |at, n, off| {
            // SAFETY: `[at, at+n)` lies inside the mapping (`transfer` checked the range),
            // which the block keeps mapped for the call; the kernel only reads it.
            unsafe { libc::pwrite(fd, at as *const libc::c_void, n, off) }
        })
    }

    /// Reads `len` bytes of `fd` at `file_offset` into the block at `offset`; the file
    /// ending first is an error.
    pub fn read_from_file(
        &self,
        offset: u64,
        len: u64,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> std::io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let at_end = || {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file ends inside a block",
            )
        };
        self.transfer(offset, len, file_offset, at_end, |at, n, off| {
            // SAFETY: `[at, at+n)` lies inside the mapping (`transfer` checked the range),
            // which the block keeps mapped and writable for the call; no reference into it
            // exists (the module's rule), so the kernel writing it aliases nothing.
            unsafe { libc::pread(fd, at as *mut libc::c_void, n, off) }
        })
    }

    /// One positioned transfer between `[offset, offset+len)` of the block and a file at
    /// `file_offset`, in calls of `call(address, length, file offset)` (a `pread` or a
    /// `pwrite`) of at most 1 GiB each; a call that moves nothing is `at_end()`.
    fn transfer(
        &self,
        offset: u64,
        len: u64,
        file_offset: u64,
        at_end: impl Fn() -> std::io::Error,
        mut call: impl FnMut(*mut u8, usize, libc::off_t) -> isize,
    ) -> std::io::Result<()> {
        self.check(offset, len as usize);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 30) as usize;
            // SAFETY: offset + done < offset + len, which `check` placed inside the mapping.
            let at = unsafe { self.ptr.add((offset + done) as usize) };
            match call(at, n, (file_offset + done) as libc::off_t) {
                r if r > 0 => done += r as u64,
                0 => return Err(at_end()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Raw base address, for transports that register memory with a NIC.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

/// Starts writing `[offset, offset+len)` of `file` back to its device without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later `fsync` finds little left.
/// Advisory: a failure only means the `fsync` does the work.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor `file` keeps open for the call; it takes no
    // pointers.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Waits until `fd` has data (or its end) to read, at most until `deadline`.
/// Piece size of [`RamBlock::visit`].
const VISIT_PIECE: u64 = 64 << 10;

/// One frame for [`send_frames`]: a header, then a range of a block.
pub struct FramePart<'a> {
    pub header: &'a [u8],
    pub block: &'a RamBlock,
    pub offset: u64,
    pub len: u64,
}

/// Sends frames back to back on a socket with as few `writev` calls as the kernel allows,
/// straight from the mappings: many small frames (a round's scattered pages) cost one system
/// call instead of one each.
pub fn send_frames(
    fd: std::os::fd::BorrowedFd<'_>,
    frames: &[FramePart<'_>],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// Iovecs per call at most (Linux's IOV_MAX).
    const IOV_MAX: usize = 1024;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(frames.len() * 2);
    for f in frames {
        f.block.check(f.offset, f.len as usize);
        iov.push(libc::iovec {
            iov_base: f.header.as_ptr() as *mut libc::c_void,
            iov_len: f.header.len(),
        });
        iov.push(libc::iovec {
            // SAFETY: offset + len is inside the block's mapping (checked above).
            iov_base: unsafe { f.block.ptr.add(f.offset as usize) } as *mut libc::c_void,
            iov_len: f.len as usize,
        });
    }
    let mut at = 0;
    while at < iov.len() {
        if iov[at].iov_len == 0 {
            at += 1;
            continue;
        }
        let count = (iov.len() - at).min(IOV_MAX);
        // SAFETY: every iovec describes readable memory that outlives the call: the headers
        // borrowed for the call, and checked ranges of mappings the blocks keep mapped; a
        // partly sent iovec was advanced within its own range below.
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov[at..].as_ptr(), count as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        while n > 0 {
            let v = &mut iov[at];
            if n >= v.iov_len {
                n -= v.iov_len;
                v.iov_len = 0;
                at += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the same range.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

pub fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    deadline: std::time::Instant,
) -> std::io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the frame did not arrive whole in time",
            ));
        }
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let t = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        match poll(&mut fds, Some(&t)) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Digests of every chunk of `blocks` in order, computed on up to `threads` threads.
pub fn chunk_digests(
    blocks: &[std::sync::Arc<RamBlock>],
    chunk_log2: u8,
    threads: usize,
) -> Vec<u64> {
    let chunk = 1u64 << chunk_log2;
    let spans: Vec<(usize, u64, u64)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(b, blk)| {
            (0..blk.len().div_ceil(chunk))
                .map(move |c| (b, c * chunk, chunk.min(blk.len() - c * chunk)))
        })
        .collect();
    let mut out = vec![0u64; spans.len()];
    let threads = threads.clamp(1, 64);
    let per = spans.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (outs, ins) in out.chunks_mut(per).zip(spans.chunks(per)) {
            s.spawn(move || {
                for (o, &(b, off, len)) in outs.iter_mut().zip(ins) {
                    *o = blocks[b].digest(off, len);
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames from two blocks, more than one `writev` takes (the socket's buffer fills while
    /// the reader drains it), arrive whole and in order: headers, then their ranges.
    #[test]
    fn send_frames_sends_every_frame_in_order_across_partial_writes() {
        use std::io::Read;
        let a = RamBlock::anonymous("a", 2 << 20, 12).unwrap();
        let b = RamBlock::anonymous("b", 1 << 20, 12).unwrap();
        for (i, blk) in [&a, &b].into_iter().enumerate() {
            let mut v = vec![0u8; blk.len() as usize];
            v.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (j / 4096 * 7 + i * 3 + j) as u8);
            blk.write(0, &v);
        }
        // 600 frames: a 3-byte header and 4 KiB (every other frame from b), 2.4 MiB in all.
        let headers: Vec<[u8; 3]> = (0..600u32)
            .map(|i| [i as u8, (i >> 8) as u8, 0xAB])
            .collect();
        let frames: Vec<FramePart<'_>> = headers
            .iter()
            .enumerate()
            .map(|(i, h)| FramePart {
                header: h,
                block: if i % 2 == 0 { &a } else { &b },
                offset: (i as u64 * 4096) % (1 << 20),
                len: 4096,
            })
            .collect();
        let mut expected = Vec::new();
        for f in &frames {
            expected.extend_from_slice(f.header);
            let mut v = vec![0u8; 4096];
            f.block.read(f.offset, &mut v);
            expected.extend_from_slice(&v);
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut r, _) = l.accept().unwrap();
        // A small send buffer and a slow reader: the kernel takes each writev in parts.
        let small: libc::c_int = 16 << 10;
        // SAFETY: a valid socket, and an int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&w),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &small as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        // A blocking send returns early, with what it sent, only at its timeout (as the
        // transport's SO_SNDTIMEO does).
        // The reader stops once for longer than that and less than twice it, so a call
        // returns part way and the next one finishes.
        w.set_write_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let want = expected.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; want];
            let mut at = 0;
            let mut paused = false;
            while at < want {
                let n = r.read(&mut got[at..]).unwrap();
                assert!(n > 0, "closed early");
                at += n;
                if !paused && at > 256 << 10 {
                    paused = true;
                    std::thread::sleep(std::time::Duration::from_millis(150));
                }
            }
            got
        });
        send_frames(std::os::fd::AsFd::as_fd(&w), &frames).unwrap();
        assert!(
            reader.join().unwrap() == expected,
            "frames arrived out of order or changed"
        );
    }

    #[test]
    fn file_block_is_shared_between_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        let a = RamBlock::create("ram", &p, 64 << 10, 12).unwrap();
        let b = RamBlock::open("ram", &p, 12).unwrap();
        a.write(4096, b"hello");
        let mut buf = [0u8; 5];
        b.read(4096, &mut buf);
        assert_eq!(&buf, b"hello");
        assert!(!b.is_zero(4096, 4096));
        b.zero(4096, 4096);
        assert!(a.is_zero(0, 64 << 10));
        for at in [0u64, 7, 63, 64, 4095, 65535] {
            a.write(at, &[1]);
            assert!(!a.is_zero(0, 64 << 10), "byte {at} missed");
            assert!(!a.is_zero(at, 1));
            assert!(a.is_zero(0, at), "range before {at} holds only zeros");
            a.write(at, &[0]);
        }
    }

    #[test]
    #[should_panic(expected = "outside block")]
    fn access_outside_block_panics_before_touching_memory() {
        let a = RamBlock::anonymous("ram", 8192, 12).unwrap();
        a.write(8190, b"xyz");
    }

    #[test]
    fn open_rejects_files_not_multiple_of_page() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        std::fs::write(&p, vec![1u8; 5000]).unwrap();
        assert!(matches!(
            RamBlock::open("ram", &p, 12),
            Err(MemError::Shape { .. })
        ));
        assert!(matches!(
            RamBlock::open("ram", &dir.path().join("missing"), 12),
            Err(MemError::Open { .. })
        ));
    }

    #[test]
    fn digests_match_model_digest_of_the_same_bytes() {
        let a = std::sync::Arc::new(RamBlock::anonymous("ram", 3 << 20, 12).unwrap());
        a.write(1 << 20, &[7u8; 100]);
        let d = chunk_digests(std::slice::from_ref(&a), 20, 2);
        let mut bytes = vec![0u8; 3 << 20];
        a.read(0, &mut bytes);
        assert_eq!(d, rdmig_model::digest::digests(&[bytes], 20));
    }
}
