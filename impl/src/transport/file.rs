//! The file binding (spec: section 1.3, "File binding"): both machines in one process, one
//! side's memory a save file. `rdmig save` runs a migration whose destination memory is the
//! file's block regions; `rdmig restore` one whose source memory is.
//!
//! What the machines see is the same as over TCP or RDMA: a control connection (frames
//! handed over in order, in memory), data channels opened with DATA_HELLO and admitted by the
//! destination's machine, registrations that open exactly a range of a destination block,
//! and one-sided writes checked against them. A write is carried out by the channel's own
//! thread as one `pwrite` (save: from source memory into the file at the block's offset) or
//! one `pread` (restore: from the file into destination memory), with `O_DIRECT` when asked;
//! its completion is the system call's return. Channels are the parallel writers or readers.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use rdmig_model::listener::ConnId;
use rdmig_model::wire::DataHello;

use super::regtable::{RegTable, Region};
use super::{DestLink, DstEvent, SourceLink, SrcEvent, WriteReq};
use crate::memory::digest_cache::DigestCache;
use crate::memory::ram::RamBlock;
use crate::memory::sent_pages::SentPages;

/// The control connection's id at the destination; data channels follow.
const CONTROL: ConnId = 1;

/// Which side is the file.
pub enum FileSide {
    /// Save: writes go from source memory into `file`, block `i` at `base[i]`.
    Destination { file: File, base: Vec<u64> },
    /// Restore: writes come from `file`, source block `i` at `base[i]`, into destination
    /// memory.
    Source { file: File, base: Vec<u64> },
}

struct Shared {
    src_blocks: Arc<Vec<Arc<RamBlock>>>,
    dst_blocks: Arc<Vec<Arc<RamBlock>>>,
    side: FileSide,
    regs: RegTable,
    /// Kept current as writes land, once the destination's driver set one.
    digests: Mutex<Option<Arc<DigestCache>>>,
    direct_io: bool,
    to_src: Mutex<Sender<SrcEvent>>,
    to_dst: Mutex<Sender<DstEvent>>,
    /// Data channel number to its connection and its thread's queue, once admitted.
    channels: Mutex<HashMap<u8, (ConnId, Sender<WriteReq>)>>,
    /// Data connections opened and not yet admitted, by connection.
    opening: Mutex<HashMap<ConnId, u8>>,
    next_conn: Mutex<ConnId>,
    /// The source's dirty log's table of what was sent, when it keeps one (spec: SCAN-2).
    hashed: Mutex<Option<Arc<SentPages>>>,
}

/// Bytes per piece of a write carried out from a private copy.
const COPY_PIECE: usize = 4 << 20;

/// A channel thread's buffers for writes carried out from a private copy: the copy, and an
/// aligned one for `O_DIRECT`.
#[derive(Default)]
struct CopyBufs {
    bytes: Vec<u8>,
    aligned: Option<RamBlock>,
}

impl Shared {
    fn src(&self, e: SrcEvent) {
        let _ = self.to_src.lock().unwrap().send(e);
    }
    fn dst(&self, e: DstEvent) {
        let _ = self.to_dst.lock().unwrap().send(e);
    }

    /// One write: checked against the registration table and carried out while the
    /// registration is held (spec: INV-REG-1).
    fn apply(&self, w: &WriteReq, copy: &mut CopyBufs) -> Result<(), String> {
        let src = self
            .src_blocks
            .get(w.block as usize)
            .ok_or_else(|| format!("write from source block {}, which is not one", w.block))?;
        if w.offset.checked_add(w.len).is_none_or(|e| e > src.len()) {
            return Err(format!("write from outside source block {}", w.block));
        }
        self.regs
            .with_write(w.rkey, w.remote_offset, w.len, |block, off| {
                let dst = &self.dst_blocks[block as usize];
                let cache = self.digests.lock().unwrap().clone();
                let ticket = cache.as_ref().map(|c| c.begin(block as usize, off, w.len));
                let hashed = self.hashed.lock().unwrap().clone();
                let r = match &self.side {
                    FileSide::Destination { file, base } => {
                        let at = base[block as usize] + off;
                        match &hashed {
                            Some(h) => self.copy_to_file(src, w, h, copy, file, at),
                            None => src.write_to_file(w.offset, w.len, file.as_fd(), at),
                        }
                        .inspect(|_| {
                            if !self.direct_io {
                                // Start the write-back now, so the flush at commit
                                // finds little left to write.
                                crate::memory::ram::start_writeback(file, at, w.len);
                            }
                        })
                    }
                    FileSide::Source { file, base } => dst.read_from_file(
                        off,
                        w.len,
                        file.as_fd(),
                        base[w.block as usize] + w.offset,
                    ),
                };
                // A failed write left its units unknown; reading them back could fault on
                // space the file system does not have.
                if let (Some(c), Some(t), true) = (cache, ticket, r.is_ok()) {
                    match (&self.side, self.direct_io, &hashed) {
                        // The pages went to the device straight from source memory, which
                        // still holds them unless the workload wrote them since, and then
                        // its log reports them again; reading them back would pull every
                        // page into the page cache `O_DIRECT` avoids.
                        (FileSide::Destination { .. }, true, None) => c.end_with(t, src, w.offset),
                        // Otherwise what landed is read back: with a hashing log a page can
                        // change and change back after its copy, leaving source memory
                        // equal to neither the file nor the next scan's report (SCAN-1).
                        _ => c.end(t, dst),
                    }
                }
                r.map_err(|e| format!("{} bytes: {e}", w.len))
            })
            .map_err(|e| e.to_string())?
    }
}

impl Shared {
    /// Save of a write for a dirty log that compares memory with what was sent: the bytes
    /// read once into a private copy, hashed into `hashed`, and written to the file from the
    /// copy (spec: SCAN-2).
    fn copy_to_file(
        &self,
        src: &RamBlock,
        w: &WriteReq,
        hashed: &SentPages,
        copy: &mut CopyBufs,
        file: &File,
        at: u64,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0u64;
        while done < w.len {
            let n = ((w.len - done) as usize).min(COPY_PIECE);
            copy.bytes.resize(n, 0);
            src.read(w.offset + done, &mut copy.bytes);
            hashed.record(w.block, w.offset + done, &copy.bytes);
            if self.direct_io {
                // `O_DIRECT` wants an aligned buffer: a mapping is.
                if copy.aligned.is_none() {
                    copy.aligned = Some(
                        RamBlock::anonymous("copy", COPY_PIECE as u64, 12)
                            .map_err(|e| io::Error::other(e.to_string()))?,
                    );
                }
                let a = copy.aligned.as_ref().expect("set above");
                a.write(0, &copy.bytes);
                a.write_to_file(0, n as u64, file.as_fd(), at + done)?;
            } else {
                file.write_all_at(&copy.bytes, at + done)?;
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// Both ends of a migration through a file.
pub fn pair(
    src_blocks: Arc<Vec<Arc<RamBlock>>>,
    dst_blocks: Arc<Vec<Arc<RamBlock>>>,
    side: FileSide,
    direct_io: bool,
    to_src: Sender<SrcEvent>,
    to_dst: Sender<DstEvent>,
) -> (FileSource, FileDest) {
    let shared = Arc::new(Shared {
        src_blocks,
        dst_blocks,
        side,
        regs: RegTable::new(),
        digests: Mutex::new(None),
        direct_io,
        to_src: Mutex::new(to_src),
        to_dst: Mutex::new(to_dst),
        channels: Mutex::new(HashMap::new()),
        opening: Mutex::new(HashMap::new()),
        next_conn: Mutex::new(CONTROL + 1),
        hashed: Mutex::new(None),
    });
    // The control connection exists from the start, as after a TCP connect.
    shared.dst(DstEvent::Accepted(CONTROL, None));
    (
        FileSource {
            shared: shared.clone(),
        },
        FileDest { shared },
    )
}

/// The source's end.
pub struct FileSource {
    shared: Arc<Shared>,
}

impl SourceLink for FileSource {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        self.shared.dst(DstEvent::Frame(CONTROL, frame.to_vec()));
        Ok(())
    }

    fn open_data(&mut self, hello: DataHello) -> io::Result<()> {
        let conn = {
            let mut n = self.shared.next_conn.lock().unwrap();
            *n += 1;
            *n - 1
        };
        self.shared
            .opening
            .lock()
            .unwrap()
            .insert(conn, hello.channel);
        self.shared.dst(DstEvent::Accepted(conn, None));
        self.shared.dst(DstEvent::DataHello(conn, hello.encode()));
        Ok(())
    }

    fn hash_sent_pages(&mut self, sent: Arc<SentPages>) -> bool {
        match self.shared.side {
            FileSide::Destination { .. } => {
                *self.shared.hashed.lock().unwrap() = Some(sent);
                true
            }
            // The source is a save file, which no one writes.
            FileSide::Source { .. } => false,
        }
    }

    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()> {
        let ch = self.shared.channels.lock().unwrap();
        let (_, q) = ch
            .get(&channel)
            .ok_or_else(|| io::Error::other(format!("data channel {channel} is not open")))?;
        q.send(w)
            .map_err(|_| io::Error::other(format!("data channel {channel} is closed")))
    }

    fn shutdown(&mut self) {
        let conns: Vec<ConnId> = self
            .shared
            .channels
            .lock()
            .unwrap()
            .drain()
            .map(|(_, (c, _))| c)
            .collect();
        for c in conns {
            self.shared
                .dst(DstEvent::Closed(c, "the source closed".into()));
        }
        self.shared
            .dst(DstEvent::Closed(CONTROL, "the source closed".into()));
    }

    fn name(&self) -> &'static str {
        "file"
    }
}

/// The destination's end.
pub struct FileDest {
    shared: Arc<Shared>,
}

impl FileDest {
    /// A data channel's thread: carries out its writes in order, reports each completion,
    /// and closes the channel on the first write it cannot carry out (as a NIC would).
    fn spawn_channel(&self, conn: ConnId, channel: u8) -> Sender<WriteReq> {
        let (tx, rx) = mpsc::channel::<WriteReq>();
        let shared = self.shared.clone();
        std::thread::spawn(move || {
            let mut copy = CopyBufs::default();
            for w in rx {
                match shared.apply(&w, &mut copy) {
                    Ok(()) => shared.src(SrcEvent::WriteDone(w.wr_id)),
                    Err(why) => {
                        tracing::error!("data channel {channel}: {why}");
                        shared.channels.lock().unwrap().remove(&channel);
                        shared.dst(DstEvent::Closed(conn, why.clone()));
                        shared.src(SrcEvent::DataLost(channel, why));
                        return;
                    }
                }
            }
        });
        tx
    }
}

impl DestLink for FileDest {
    fn send(&mut self, conn: ConnId, frame: &[u8]) -> io::Result<()> {
        if conn == CONTROL {
            self.shared.src(SrcEvent::Control(frame.to_vec()));
        }
        Ok(())
    }

    fn close(&mut self, conn: ConnId) {
        if conn == CONTROL {
            self.shared
                .src(SrcEvent::ControlClosed("the destination closed".into()));
            return;
        }
        let mut ch = self.shared.channels.lock().unwrap();
        let lost: Vec<u8> = ch
            .iter()
            .filter(|(_, (c, _))| *c == conn)
            .map(|(n, _)| *n)
            .collect();
        for n in lost {
            ch.remove(&n);
            self.shared
                .src(SrcEvent::DataLost(n, "the destination closed it".into()));
        }
        if let Some(n) = self.shared.opening.lock().unwrap().remove(&conn) {
            self.shared
                .src(SrcEvent::DataLost(n, "the destination refused it".into()));
        }
    }

    fn admit(&mut self, conn: ConnId, channel: u8) -> io::Result<()> {
        let opened = self.shared.opening.lock().unwrap().remove(&conn);
        if opened != Some(channel) {
            return Err(io::Error::other(format!(
                "connection {conn} did not open data channel {channel}"
            )));
        }
        let q = self.spawn_channel(conn, channel);
        self.shared
            .channels
            .lock()
            .unwrap()
            .insert(channel, (conn, q));
        self.shared.src(SrcEvent::DataOpened(channel));
        Ok(())
    }

    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32> {
        let b = self
            .shared
            .dst_blocks
            .get(block as usize)
            .ok_or_else(|| io::Error::other(format!("no block {block}")))?;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > b.len()) {
            return Err(io::Error::other(format!(
                "{len} bytes at {offset} are outside block {block}"
            )));
        }
        Ok(self
            .shared
            .regs
            .register(Region { block, offset, len }, 0x5eed_f11e))
    }

    fn unregister(&mut self, key: u32) -> bool {
        self.shared.regs.unregister(key)
    }

    fn set_digest_cache(&mut self, cache: Arc<DigestCache>) -> bool {
        *self.shared.digests.lock().unwrap() = Some(cache);
        true
    }

    fn shutdown(&mut self) {
        self.shared.channels.lock().unwrap().clear();
        self.shared.regs.clear();
    }

    fn name(&self) -> &'static str {
        "file"
    }
}
