//! TCP transport: one control connection carrying protocol frames, and N data connections
//! carrying one-sided writes as frames that the destination applies straight into registered
//! memory, refusing anything an RDMA NIC would refuse (spec: DATA-1, INV-REG-1).
//!
//! Data connection, source to destination:
//! - once: DATA_HELLO, 56 bytes: magic `RDMGDATA`, session id u64 LE, channel u8, 7 zero bytes,
//!   token (32 bytes, `auth::data_token`); the destination closes the connection unless the
//!   session is authenticated and the token verifies (spec: AUTH-6);
//! - then frames: header of 24 bytes {magic u32 LE `0x574d4452` ("RDMW"), rkey u32, remote
//!   offset u64, length u32 (1..=16 MiB), reserved u32 = 0} followed by `length` bytes.
//!
//! Destination to source, on the same connection: after applying each frame, the cumulative
//! number of frames applied as u64 LE. A write completes at the source only when its frames
//! are acknowledged, so "complete" means "placed", as with RDMA (spec: RND-2).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdmig_model::auth;
use rdmig_model::wire;

use crate::memory::ram::RamBlock;
use crate::transport::completions::ChannelCompletions;
use crate::transport::regtable::{AccessError, RegTable};
use crate::transport::{hello_bytes, DataAuth, Event, WriteReq, DATA_HELLO_LEN};

/// Largest data frame payload; larger writes are split.
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

/// Reads one control frame; a header that fails to decode is returned as-is so the machine
/// sees the malformed bytes and aborts.
fn read_control_frame(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; wire::HEADER_LEN];
    s.read_exact(&mut buf)?;
    if let Ok(h) = wire::decode_header(&buf) {
        buf.resize(wire::HEADER_LEN + h.payload_len, 0);
        s.read_exact(&mut buf[wire::HEADER_LEN..])?;
    }
    Ok(buf)
}

fn spawn_control_reader(mut s: TcpStream, events: Sender<Event>) -> JoinHandle<()> {
    std::thread::spawn(move || loop {
        match read_control_frame(&mut s) {
            Ok(f) => {
                let bad = wire::decode_header(&f).is_err();
                if events.send(Event::Control(f)).is_err() || bad {
                    return;
                }
            }
            Err(e) => {
                let _ = events.send(Event::ControlClosed(e.to_string()));
                return;
            }
        }
    })
}

/// Data connections keep the kernel's buffer autotuning (setting SO_SNDBUF/SO_RCVBUF would
/// switch it off and cap the window); only Nagle is disabled so acknowledgements go at once.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
}

// ---------------------------------------------------------------------------------------------
// Source side

/// The source's end: control connection plus data channels opened after authentication.
pub struct SourceTcp {
    addr: SocketAddr,
    control: TcpStream,
    events: Sender<Event>,
    channels: Vec<SyncSender<WriteReq>>,
    data_streams: Vec<TcpStream>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    /// Bytes per second across all channels, 0 for unlimited.
    max_bandwidth: u64,
}

impl SourceTcp {
    /// Connects the control channel; frames arrive on the returned receiver.
    pub fn connect(
        addr: SocketAddr,
        blocks: Arc<Vec<Arc<RamBlock>>>,
        max_bandwidth: u64,
        timeout: Duration,
    ) -> io::Result<(Self, Receiver<Event>)> {
        let control = TcpStream::connect_timeout(&addr, timeout)?;
        let _ = control.set_nodelay(true);
        let (tx, rx) = mpsc::channel();
        spawn_control_reader(control.try_clone()?, tx.clone());
        Ok((
            SourceTcp {
                addr,
                control,
                events: tx,
                channels: Vec::new(),
                data_streams: Vec::new(),
                blocks,
                max_bandwidth,
            },
            rx,
        ))
    }

    pub fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        self.control.write_all(frame)
    }

    /// Opens `n` data channels for `session_id`, each proving the key (spec: AUTH-6).
    pub fn open_data(
        &mut self,
        n: u8,
        session_id: u64,
        key: Option<&[u8]>,
        dst_nonce: &[u8; 32],
    ) -> io::Result<()> {
        let per_channel_rate = if self.max_bandwidth == 0 {
            0
        } else {
            (self.max_bandwidth / n as u64).max(1)
        };
        for ch in 0..n {
            let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
            tune(&s);
            let token = auth::data_token(key, session_id, ch, dst_nonce);
            s.write_all(&hello_bytes(session_id, ch, &token))?;
            let comps = Arc::new(ChannelCompletions::new());
            // Deep enough for the machine's per-channel window; the machine never exceeds it.
            let (tx, rx) = mpsc::sync_channel::<WriteReq>(4096);
            let reader = s.try_clone()?;
            let events = self.events.clone();
            let c2 = comps.clone();
            std::thread::spawn(move || ack_reader(reader, c2, events));
            let writer = s.try_clone()?;
            let blocks = self.blocks.clone();
            let events = self.events.clone();
            std::thread::spawn(move || {
                data_sender(writer, rx, comps, blocks, events, per_channel_rate)
            });
            self.channels.push(tx);
            self.data_streams.push(s);
        }
        Ok(())
    }

    pub fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()> {
        let tx = self
            .channels
            .get(channel as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "data channel not open"))?;
        tx.send(w)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "data channel closed"))
    }

    pub fn channels_open(&self) -> usize {
        self.channels.len()
    }

    /// Closes every connection; threads exit on their own.
    pub fn shutdown(&mut self) {
        let _ = self.control.flush();
        let _ = self.control.shutdown(Shutdown::Both);
        for s in &self.data_streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.channels.clear();
    }
}

fn ack_reader(mut s: TcpStream, comps: Arc<ChannelCompletions>, events: Sender<Event>) {
    let mut acked = 0u64;
    let mut b = [0u8; 8];
    loop {
        if let Err(e) = s.read_exact(&mut b) {
            if comps.outstanding() > 0 {
                let _ = events.send(Event::DataFailed(format!(
                    "data channel closed with writes in flight: {e}"
                )));
            }
            return;
        }
        let total = u64::from_le_bytes(b);
        let Some(n) = total.checked_sub(acked) else {
            let _ = events.send(Event::DataViolation(
                "acknowledgement count went backwards".into(),
            ));
            return;
        };
        match comps.acked(n) {
            Ok(done) => {
                acked = total;
                for id in done {
                    if events.send(Event::WriteDone(id)).is_err() {
                        return;
                    }
                }
            }
            Err(_) => {
                let _ = events.send(Event::DataViolation(
                    "acknowledgement for frames never sent".into(),
                ));
                return;
            }
        }
    }
}

fn data_sender(
    s: TcpStream,
    rx: Receiver<WriteReq>,
    comps: Arc<ChannelCompletions>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    events: Sender<Event>,
    rate: u64,
) {
    let start = Instant::now();
    let mut sent: u64 = 0;
    while let Ok(w) = rx.recv() {
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
            let fd = std::os::fd::AsFd::as_fd(&s);
            if let Err(e) = blocks[w.block as usize].send_range(
                fd,
                &encode_data_header(&h),
                w.offset + done,
                n as u64,
            ) {
                let _ = events.send(Event::DataFailed(format!("data channel write failed: {e}")));
                return;
            }
            done += n as u64;
            sent += n as u64;
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Destination side

/// The destination's end: the accepted control connection, a registration table that data
/// threads enforce, and an acceptor for data connections.
pub struct DestTcp {
    control: TcpStream,
    table: Arc<RegTable>,
    data_auth: Arc<Mutex<Option<DataAuth>>>,
    closing: Arc<AtomicBool>,
    local: SocketAddr,
    salt: u32,
}

impl DestTcp {
    /// Waits for the source's control connection on `listener`.
    pub fn accept(
        listener: TcpListener,
        blocks: Arc<Vec<Arc<RamBlock>>>,
        salt: u32,
    ) -> io::Result<(Self, Receiver<Event>)> {
        let (control, _) = listener.accept()?;
        let _ = control.set_nodelay(true);
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        spawn_control_reader(control.try_clone()?, tx.clone());
        let table = Arc::new(RegTable::new());
        let data_auth: Arc<Mutex<Option<DataAuth>>> = Arc::new(Mutex::new(None));
        let closing = Arc::new(AtomicBool::new(false));
        {
            let (table, data_auth, closing) = (table.clone(), data_auth.clone(), closing.clone());
            std::thread::spawn(move || acceptor(listener, table, blocks, data_auth, closing, tx));
        }
        Ok((
            DestTcp {
                control,
                table,
                data_auth,
                closing,
                local,
                salt,
            },
            rx,
        ))
    }

    pub fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        self.control.write_all(frame)
    }

    /// Data connections are refused until the session is authenticated (spec: AUTH-2).
    pub fn allow_data(&mut self, auth: DataAuth) {
        *self.data_auth.lock().unwrap() = Some(auth);
    }

    pub fn register(&mut self, block: u16, offset: u64, len: u64) -> u32 {
        self.table.register(
            crate::transport::regtable::Region { block, offset, len },
            self.salt,
        )
    }

    pub fn unregister(&mut self, key: u32) -> bool {
        self.table.unregister(key)
    }

    pub fn registered(&self) -> usize {
        self.table.len()
    }

    pub fn shutdown(&mut self) {
        self.table.clear();
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.control.flush();
        let _ = self.control.shutdown(Shutdown::Both);
        // Wake the acceptor so it sees `closing`.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
    }
}

fn acceptor(
    listener: TcpListener,
    table: Arc<RegTable>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    data_auth: Arc<Mutex<Option<DataAuth>>>,
    closing: Arc<AtomicBool>,
    events: Sender<Event>,
) {
    let mut joined = std::collections::BTreeSet::new();
    for conn in listener.incoming() {
        if closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut s) = conn else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut hello = [0u8; DATA_HELLO_LEN];
        if s.read_exact(&mut hello).is_err() {
            continue;
        }
        let auth = data_auth.lock().unwrap().clone();
        let ok = auth.is_some_and(|a| a.admit(&hello, &mut joined).is_some());
        if !ok {
            tracing::warn!("refused a data connection that did not prove the session key");
            let _ = s.shutdown(Shutdown::Both);
            continue;
        }
        let _ = s.set_read_timeout(None);
        tune(&s);
        let (table, blocks, events) = (table.clone(), blocks.clone(), events.clone());
        std::thread::spawn(move || data_receiver(s, table, blocks, events));
    }
}

/// Longest a data frame's payload may take to arrive. The payload is read straight into
/// registered memory while the registration is held, so this also bounds how long an
/// unregister can wait for a frame in progress.
const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a frame header; an idle channel (no frame for a while between rounds) is normal, so a
/// read timeout before the first header byte just waits again. Ok(false) means end of stream.
fn read_header(s: &mut TcpStream, hb: &mut [u8; DATA_HEADER_LEN]) -> io::Result<bool> {
    let mut got = 0;
    while got < hb.len() {
        match s.read(&mut hb[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e)
                if got == 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn data_receiver(
    mut s: TcpStream,
    table: Arc<RegTable>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    events: Sender<Event>,
) {
    let mut applied: u64 = 0;
    let _ = s.set_read_timeout(Some(FRAME_READ_TIMEOUT));
    loop {
        let mut hb = [0u8; DATA_HEADER_LEN];
        match read_header(&mut s, &mut hb) {
            Ok(true) => {}
            // The source closed the channel (normal at the end, or a failure it reports).
            Ok(false) | Err(_) => return,
        }
        // Checked and received under the table's read lock: the payload goes from the socket
        // straight into memory, and an unregister waits until it has landed (INV-REG-1).
        let fd = std::os::fd::AsFd::as_fd(&s);
        let r = parse_data_header(&hb).and_then(|h| {
            table
                .with_write(h.rkey, h.remote_offset, h.len as u64, |block, off| {
                    blocks[block as usize].recv_range(fd, off, h.len as u64)
                })
                .map_err(DataFrameError::from)
        });
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = events.send(Event::DataFailed(format!(
                    "data channel failed mid-frame: {e}"
                )));
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            Err(e) => {
                let _ = events.send(Event::DataViolation(e.to_string()));
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        }
        applied += 1;
        if s.write_all(&applied.to_le_bytes()).is_err() {
            return;
        }
    }
}

/// Fuzz target body for `tcp_data_frame`: a stream of data frames against a small registered
/// memory. Panics if any byte outside a live registration changes (spec: INV-REG-1).
///
/// Input: repeated `[selector u8][24-byte header][payload]`; an odd selector replaces the
/// header's key with one of the table's keys (registered, or registered then revoked), so the
/// fuzzer reaches the apply path without guessing keys.
pub fn fuzz_data_frames(mut data: &[u8]) {
    let blocks = vec![
        Arc::new(RamBlock::anonymous("ram0", 64 << 10, 12).expect("anonymous memory")),
        Arc::new(RamBlock::anonymous("ram1", 16 << 10, 12).expect("anonymous memory")),
    ];
    let table = RegTable::new();
    let live = [
        (
            table.register(
                crate::transport::regtable::Region {
                    block: 0,
                    offset: 16 << 10,
                    len: 16 << 10,
                },
                0,
            ),
            0u16,
            16u64 << 10,
            16u64 << 10,
        ),
        (
            table.register(
                crate::transport::regtable::Region {
                    block: 1,
                    offset: 0,
                    len: 8 << 10,
                },
                0,
            ),
            1,
            0,
            8 << 10,
        ),
    ];
    let revoked = table.register(
        crate::transport::regtable::Region {
            block: 0,
            offset: 0,
            len: 64 << 10,
        },
        0,
    );
    table.unregister(revoked);
    let keys = [live[0].0, live[1].0, revoked];
    let mut allowed: Vec<Vec<bool>> = blocks
        .iter()
        .map(|b| vec![false; b.len() as usize])
        .collect();
    for &(_, b, off, len) in &live {
        allowed[b as usize][off as usize..(off + len) as usize]
            .iter_mut()
            .for_each(|a| *a = true);
    }
    let snapshot = |blocks: &[Arc<RamBlock>]| -> Vec<Vec<u8>> {
        blocks
            .iter()
            .map(|b| {
                let mut v = vec![0u8; b.len() as usize];
                b.read(0, &mut v);
                v
            })
            .collect()
    };
    while data.len() > DATA_HEADER_LEN {
        let sel = data[0];
        let mut hb = [0u8; DATA_HEADER_LEN];
        hb.copy_from_slice(&data[1..1 + DATA_HEADER_LEN]);
        data = &data[1 + DATA_HEADER_LEN..];
        if sel & 1 == 1 {
            hb[4..8].copy_from_slice(&keys[(sel >> 1) as usize % keys.len()].to_le_bytes());
        }
        let Ok(h) = parse_data_header(&hb) else {
            return;
        };
        let n = (h.len as usize).min(data.len());
        let before = snapshot(&blocks);
        let r = apply_data_frame(&table, &blocks, &h, &data[..n]);
        let after = snapshot(&blocks);
        for (b, (x, y)) in before.iter().zip(&after).enumerate() {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!(
                    p == q || allowed[b][i],
                    "INV-REG-1: byte {i} of block {b} written outside a registration"
                );
            }
        }
        if r.is_ok() {
            assert_eq!(n, h.len as usize);
        }
        data = &data[n..];
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
