//! The source's end of the TCP binding: the control connection, and data connections opened
//! one per channel when the machine asks (spec: AUTH-6).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdmig_model::wire::{self, DataHello};

use super::{encode_data_header, DataHeader, DATA_HEADER_LEN, MAX_DATA_FRAME};
use super::{read_control_frame, read_exact_by, read_first_byte, Stream};
use crate::memory::ram::{FramePart, RamBlock};
use crate::memory::sent_pages::SentPages;
use crate::transport::completions::ChannelCompletions;
use crate::transport::tls::ClientTls;
use crate::transport::{tune, Deadlines, SourceLink, SrcEvent, WriteReq};

/// Writes queued per channel: deeper than the machine's per-channel window, which it never
/// exceeds.
const QUEUE_DEPTH: usize = 4096;

/// The source's end: control connection plus data channels opened after authentication.
pub struct SourceTcp {
    addr: SocketAddr,
    control: Stream,
    /// TLS for every connection, when configured.
    tls: Option<ClientTls>,
    events: Sender<SrcEvent>,
    /// Per channel: the queue of its sending thread, once admitted.
    channels: Arc<Mutex<Vec<Option<SyncSender<WriteReq>>>>>,
    /// Every data connection, for shutdown.
    streams: Arc<Mutex<Vec<Stream>>>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    /// Bytes per second per channel, 0 for unlimited.
    rate: u64,
    deadlines: Deadlines,
    /// The dirty log's table of what was sent, when it keeps one (spec: SCAN-2).
    hashed: Option<Arc<SentPages>>,
}

impl SourceTcp {
    /// The control connection's TLS channel binding, when it runs inside TLS (spec: AUTH-1).
    pub fn channel_binding(&self) -> Option<[u8; 32]> {
        self.control.binding()
    }

    /// Connects the control channel; what happens arrives on `tx`. `max_bandwidth` (bytes per
    /// second, 0 for none) is shared by the `channels` data channels.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        addr: SocketAddr,
        tls: Option<ClientTls>,
        blocks: Arc<Vec<Arc<RamBlock>>>,
        max_bandwidth: u64,
        channels: u8,
        deadlines: Deadlines,
        tx: Sender<SrcEvent>,
    ) -> io::Result<Self> {
        let control = connect(addr, tls.as_ref(), deadlines)?;
        let reader = control.try_clone()?;
        let events = tx.clone();
        std::thread::spawn(move || control_reader(reader, events, deadlines));
        Ok(SourceTcp {
            addr,
            control,
            tls,
            events: tx,
            channels: Arc::new(Mutex::new(Vec::new())),
            streams: Arc::new(Mutex::new(Vec::new())),
            blocks,
            rate: max_bandwidth / channels.max(1) as u64,
            deadlines,
            hashed: None,
        })
    }
}

/// A connection to the destination: TCP with the liveness options, then TLS when configured,
/// all within the connect deadline (spec: LIVE-4).
fn connect(addr: SocketAddr, tls: Option<&ClientTls>, d: Deadlines) -> io::Result<Stream> {
    let deadline = Instant::now() + d.connect();
    let tcp = TcpStream::connect_timeout(&addr, d.connect())?;
    tune(&tcp, d);
    Stream::client(tcp, tls, deadline)
}

fn control_reader(mut s: Stream, events: Sender<SrcEvent>, d: Deadlines) {
    let mut frames = 0u64;
    loop {
        let r = read_first_byte(&mut s).and_then(|first| match first {
            // A TLS destination closes a plaintext connection before answering anything.
            None if frames == 0 && !s.is_tls() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the control connection was closed before the destination's first frame \
                 (a destination with --tls-creds closes plaintext connections)",
            )),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by the peer",
            )),
            // 0x15 and 0x16 are TLS's alert and handshake records, and no type code of ours.
            Some(0x15 | 0x16) if frames == 0 && !s.is_tls() => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the destination answered with TLS: give --tls-creds",
            )),
            Some(b) => read_control_frame(&mut s, b, d.frame()),
        });
        frames += 1;
        match r {
            Ok(f) => {
                let bad = wire::decode_header(&f).is_err();
                if events.send(SrcEvent::Control(f)).is_err() || bad {
                    return;
                }
            }
            Err(e) => {
                let _ = events.send(SrcEvent::ControlClosed(e.to_string()));
                return;
            }
        }
    }
}

impl SourceLink for SourceTcp {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        self.control.write_all(frame)
    }

    fn open_data(&mut self, hello: DataHello) -> io::Result<()> {
        let ch = hello.channel;
        let (addr, d, rate, tls) = (self.addr, self.deadlines, self.rate, self.tls.clone());
        let (events, blocks) = (self.events.clone(), self.blocks.clone());
        let hashed = self.hashed.clone();
        let (channels, streams) = (self.channels.clone(), self.streams.clone());
        std::thread::spawn(move || {
            let opened = join(addr, tls.as_ref(), &hello, d).and_then(|s| {
                let comps = Arc::new(ChannelCompletions::new());
                let (tx, rx) = mpsc::sync_channel::<WriteReq>(QUEUE_DEPTH);
                let (reader, writer) = (s.try_clone()?, s.try_clone()?);
                streams.lock().unwrap().push(s);
                let (ev, c) = (events.clone(), comps.clone());
                std::thread::spawn(move || ack_reader(reader, ch, c, ev, d));
                let ctx = SenderCtx {
                    ch,
                    comps,
                    blocks,
                    events: events.clone(),
                    rate,
                    hashed,
                };
                std::thread::spawn(move || data_sender(writer, rx, ctx));
                let mut chans = channels.lock().unwrap();
                if chans.len() <= ch as usize {
                    chans.resize(ch as usize + 1, None);
                }
                chans[ch as usize] = Some(tx);
                Ok(())
            });
            let _ = events.send(match opened {
                Ok(()) => SrcEvent::DataOpened(ch),
                Err(e) => SrcEvent::DataLost(ch, format!("opening data channel {ch}: {e}")),
            });
        });
        Ok(())
    }

    fn hash_sent_pages(&mut self, sent: Arc<SentPages>) -> bool {
        self.hashed = Some(sent);
        true
    }

    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()> {
        let chans = self.channels.lock().unwrap();
        let tx = chans
            .get(channel as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "data channel not open"))?;
        tx.try_send(w)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "data channel closed"))
    }

    /// Closes every connection; the threads end on their own.
    fn shutdown(&mut self) {
        self.control.shutdown(Shutdown::Both);
        for s in self.streams.lock().unwrap().iter() {
            s.shutdown(Shutdown::Both);
        }
        self.channels.lock().unwrap().clear();
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

/// Connects a data channel and presents its DATA_HELLO; the destination's DATA_JOIN_ACK, within
/// the connect deadline, admits it (spec: AUTH-6, LIVE-4).
fn join(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    hello: &DataHello,
    d: Deadlines,
) -> io::Result<Stream> {
    let deadline = Instant::now() + d.connect();
    let mut s = connect(addr, tls, d)?;
    s.write_all(&hello.encode())?;
    let mut ack = [0u8; 8];
    read_exact_by(&mut s, &mut ack, deadline).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the destination did not admit the channel: {e}"),
        )
    })?;
    if ack != wire::DATA_JOIN_ACK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the destination answered the join with something else",
        ));
    }
    Ok(s)
}

/// Completes writes from the destination's cumulative placement counts. Waiting for the next
/// count is the machine's to bound (its progress deadline, spec: ERR-4); a count once begun
/// must arrive whole within the frame deadline.
fn ack_reader(
    mut s: Stream,
    ch: u8,
    comps: Arc<ChannelCompletions>,
    events: Sender<SrcEvent>,
    d: Deadlines,
) {
    let mut acked = 0u64;
    let lost = |why: String| SrcEvent::DataLost(ch, why);
    loop {
        let mut b = [0u8; 8];
        let r = read_first_byte(&mut s).and_then(|first| match first {
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by the peer",
            )),
            Some(x) => {
                b[0] = x;
                read_exact_by(&mut s, &mut b[1..], Instant::now() + d.frame())
            }
        });
        if let Err(e) = r {
            let _ = events.send(lost(format!("data channel {ch}: {e}")));
            return;
        }
        let total = u64::from_le_bytes(b);
        let Some(n) = total.checked_sub(acked) else {
            let _ = events.send(lost("acknowledgement count went backwards".into()));
            return;
        };
        match comps.acked(n) {
            Ok(done) => {
                acked = total;
                for id in done {
                    if events.send(SrcEvent::WriteDone(id)).is_err() {
                        return;
                    }
                }
            }
            Err(_) => {
                let _ = events.send(lost("acknowledgement for frames never sent".into()));
                return;
            }
        }
    }
}

/// Writes at most this long go out together with the small writes queued behind them.
const SMALL_WRITE: u64 = 64 << 10;
/// A batch of small writes: at most this many, and this many bytes.
const BATCH_WRITES: usize = 64;
const BATCH_BYTES: u64 = 1 << 20;

/// What a data channel's sending thread needs besides its queue.
struct SenderCtx {
    ch: u8,
    comps: Arc<ChannelCompletions>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    events: Sender<SrcEvent>,
    rate: u64,
    /// The dirty log's table of what was sent, when it compares memory with it: writes then
    /// go out from a private copy whose pages are hashed into it (spec: SCAN-2).
    hashed: Option<Arc<SentPages>>,
}

fn data_sender(mut s: Stream, rx: Receiver<WriteReq>, c: SenderCtx) {
    let SenderCtx {
        ch,
        comps,
        blocks,
        events,
        rate,
        hashed,
    } = c;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut next: Option<WriteReq> = None;
    let mut copy = CopyBuf::default();
    loop {
        let w = match next.take() {
            Some(w) => w,
            None => match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
        };
        let batched = |x: &WriteReq| hashed.is_some() || x.len <= SMALL_WRITE;
        let r = if batched(&w) {
            // The small writes queued behind it go in the same system call, in order; a large
            // one taken from the queue goes next. Copied writes are all batched: the copy
            // is cut into frames anyway.
            let mut batch = vec![w];
            let mut bytes = batch[0].len;
            while batch.len() < BATCH_WRITES && bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(x) if batched(&x) => {
                        bytes += x.len;
                        batch.push(x);
                    }
                    Ok(x) => {
                        next = Some(x);
                        break;
                    }
                    Err(_) => break,
                }
            }
            sent += bytes;
            match &hashed {
                Some(h) => copy.send(&mut s, &batch, &comps, &blocks, h),
                None => send_small(&mut s, &batch, &comps, &blocks),
            }
        } else {
            sent += w.len;
            send_large(&mut s, &w, &comps, &blocks)
        };
        if let Err(e) = r {
            let why = format!("data channel {ch} write failed: {e}");
            let _ = events.send(SrcEvent::DataLost(ch, why));
            return;
        }
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Bytes of page data per frame when writes go out from a private copy: the copy stays in
/// cache between the read, the hash and the send.
const COPY_FRAME: usize = 1 << 20;

/// A sending thread's buffer for writes sent from a private copy (spec: SCAN-2).
struct CopyBuf {
    buf: Vec<u8>,
    used: usize,
}

impl Default for CopyBuf {
    fn default() -> Self {
        CopyBuf {
            buf: vec![0; COPY_FRAME + DATA_HEADER_LEN],
            used: 0,
        }
    }
}

impl CopyBuf {
    /// Sends `batch` in order: each write's bytes read once from memory into the buffer, its
    /// pages hashed into `hashed`, and the frames sent from the buffer, so the hashes are
    /// those of the very bytes the destination receives.
    fn send(
        &mut self,
        s: &mut Stream,
        batch: &[WriteReq],
        comps: &ChannelCompletions,
        blocks: &[Arc<RamBlock>],
        hashed: &SentPages,
    ) -> io::Result<()> {
        for w in batch {
            let mut done = 0u64;
            while done < w.len {
                let n = ((w.len - done) as usize).min(COPY_FRAME);
                if self.used + DATA_HEADER_LEN + n > self.buf.len() {
                    self.flush(s)?;
                }
                let h = DataHeader {
                    rkey: w.rkey,
                    remote_offset: w.remote_offset + done,
                    len: n as u32,
                };
                let at = self.used + DATA_HEADER_LEN;
                self.buf[self.used..at].copy_from_slice(&encode_data_header(&h));
                let bytes = &mut self.buf[at..at + n];
                blocks[w.block as usize].read(w.offset + done, bytes);
                hashed.record(w.block, w.offset + done, bytes);
                self.used = at + n;
                done += n as u64;
                comps.posted((done == w.len).then_some(w.wr_id));
            }
        }
        self.flush(s)
    }

    fn flush(&mut self, s: &mut Stream) -> io::Result<()> {
        let r = s.write_all(&self.buf[..self.used]);
        self.used = 0;
        r
    }
}

/// Small writes, one frame each, in one go.
fn send_small(
    s: &mut Stream,
    batch: &[WriteReq],
    comps: &ChannelCompletions,
    blocks: &[Arc<RamBlock>],
) -> io::Result<()> {
    let headers: Vec<[u8; DATA_HEADER_LEN]> = batch
        .iter()
        .map(|w| {
            encode_data_header(&DataHeader {
                rkey: w.rkey,
                remote_offset: w.remote_offset,
                len: w.len as u32,
            })
        })
        .collect();
    let frames: Vec<FramePart<'_>> = batch
        .iter()
        .zip(&headers)
        .map(|(w, h)| FramePart {
            header: h,
            block: &blocks[w.block as usize],
            offset: w.offset,
            len: w.len,
        })
        .collect();
    for w in batch {
        comps.posted(Some(w.wr_id));
    }
    s.send_frames(&frames)
}

/// One write, split into frames of at most 16 MiB; it completes with its last frame.
fn send_large(
    s: &mut Stream,
    w: &WriteReq,
    comps: &ChannelCompletions,
    blocks: &[Arc<RamBlock>],
) -> io::Result<()> {
    let mut done = 0u64;
    while done < w.len {
        let n = (w.len - done).min(MAX_DATA_FRAME as u64) as usize;
        let last = done + n as u64 == w.len;
        let h = DataHeader {
            rkey: w.rkey,
            remote_offset: w.remote_offset + done,
            len: n as u32,
        };
        comps.posted(last.then_some(w.wr_id));
        s.send_from(
            &blocks[w.block as usize],
            &encode_data_header(&h),
            w.offset + done,
            n as u64,
        )?;
        done += n as u64;
    }
    Ok(())
}
