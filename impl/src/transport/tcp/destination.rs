//! The destination's end of the TCP binding: every connection the listening socket accepts,
//! each read by its own thread, so a silent, slow or hostile connection never delays another
//! (spec: LIVE-4, LIVE-5). Which connection becomes what is the listener machine's decision;
//! this end reports what each connection sends first and carries the decisions out.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdmig_model::listener::ConnId;
use rdmig_model::wire;

use super::{parse_data_header, DataFrameError, DATA_HEADER_LEN};
use super::{read_control_frame, read_exact_by, read_first_byte, Stream};
use crate::memory::digest_cache::DigestCache;
use crate::memory::ram::RamBlock;
use crate::transport::regtable::{RegTable, Region};
use crate::transport::tls::ServerTls;

/// The digest cache data connections keep current, once the driver set one.
type DigestSlot = Arc<Mutex<Option<Arc<DigestCache>>>>;
use crate::transport::{tune, Deadlines, DestLink, DstEvent};

/// What the listener decided for a data connection that presented DATA_HELLO.
enum Decision {
    Admit,
    Refuse,
}

/// One accepted connection.
struct Conn {
    /// A handle for closing it (wakes its reader).
    tcp: TcpStream,
    /// For sends, once its TLS handshake (if any) is done.
    stream: Option<Stream>,
    /// Set while its reader waits for the listener's decision on its DATA_HELLO.
    decide: Option<SyncSender<Decision>>,
}

type Conns = Arc<Mutex<HashMap<ConnId, Conn>>>;

/// How long a closed connection may still drain before it is cut: the peer reads what was
/// sent last (STARTED, ABORT) and closes its end; after this the socket is shut regardless.
const LINGER: Duration = Duration::from_secs(1);

/// The destination's end: the listening socket, every connection it accepted, and the
/// registration table data connections write through.
pub struct DestTcp {
    conns: Conns,
    table: Arc<RegTable>,
    digests: DigestSlot,
    closing: Arc<AtomicBool>,
    local: SocketAddr,
    salt: u32,
    /// Connections closed for sending, to shut completely once they lingered.
    reaper: Sender<(Instant, TcpStream)>,
}

impl DestTcp {
    /// Starts accepting on `listener`; connections and what they send arrive on `tx`.
    pub fn listen(
        listener: TcpListener,
        tls: Option<ServerTls>,
        blocks: Arc<Vec<Arc<RamBlock>>>,
        salt: u32,
        deadlines: Deadlines,
        tx: Sender<DstEvent>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
        let table = Arc::new(RegTable::new());
        let digests: DigestSlot = Arc::new(Mutex::new(None));
        let closing = Arc::new(AtomicBool::new(false));
        {
            let (conns, table, closing) = (conns.clone(), table.clone(), closing.clone());
            let digests = digests.clone();
            let ends = Ends {
                conns,
                table,
                digests,
                blocks,
                tls,
                handshaking: Arc::new(AtomicUsize::new(0)),
            };
            std::thread::spawn(move || acceptor(listener, ends, closing, tx, deadlines));
        }
        let (reaper, reap) = mpsc::channel::<(Instant, TcpStream)>();
        std::thread::spawn(move || {
            for (at, s) in reap {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let _ = s.shutdown(Shutdown::Both);
            }
        });
        Ok(DestTcp {
            conns,
            table,
            digests,
            closing,
            local,
            salt,
            reaper,
        })
    }

    /// Registrations held.
    pub fn registered(&self) -> usize {
        self.table.len()
    }
}

/// What every connection's thread shares.
#[derive(Clone)]
struct Ends {
    conns: Conns,
    table: Arc<RegTable>,
    digests: DigestSlot,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    tls: Option<ServerTls>,
    /// TLS handshakes in progress: they run before the listener hears of a connection, so
    /// they are bounded here (spec: TLS-2), as the listener bounds what it holds.
    handshaking: Arc<AtomicUsize>,
}

/// TLS handshakes in progress at most; one more cuts the oldest.
const MAX_HANDSHAKES: usize = rdmig_model::listener::MAX_PENDING;

fn acceptor(
    listener: TcpListener,
    ends: Ends,
    closing: Arc<AtomicBool>,
    events: Sender<DstEvent>,
    d: Deadlines,
) {
    let mut next: ConnId = 1;
    for s in listener.incoming() {
        if closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(s) = s else { continue };
        tune(&s, d);
        let conn = next;
        next += 1;
        let Ok(handle) = s.try_clone() else { continue };
        // Counted here, before its thread exists; uncounted when its handshake ends. Full:
        // the oldest handshake is cut, so connections that stall their handshake cannot keep
        // a source out (as the listener evicts its oldest pending connection).
        if ends.tls.is_some() && ends.handshaking.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            let conns = ends.conns.lock().unwrap();
            let oldest = conns
                .iter()
                .filter(|(_, c)| c.stream.is_none())
                .min_by_key(|(id, _)| **id);
            if let Some((id, c)) = oldest {
                tracing::debug!("{MAX_HANDSHAKES} TLS handshakes in progress: connection {id} cut");
                let _ = c.tcp.shutdown(Shutdown::Both);
            }
        }
        ends.conns.lock().unwrap().insert(
            conn,
            Conn {
                tcp: handle,
                stream: None,
                decide: None,
            },
        );
        let (ends, events) = (ends.clone(), events.clone());
        std::thread::spawn(move || {
            let why = open(s, conn, &ends, &events, d);
            ends.conns.lock().unwrap().remove(&conn);
            if let Some(why) = why {
                let _ = events.send(DstEvent::Closed(conn, why));
            }
        });
    }
}

/// Runs the TLS handshake (when configured) within the connect deadline, reports the
/// connection accepted, and serves it. `None`: the handshake failed and the listener never
/// heard of the connection.
fn open(
    tcp: TcpStream,
    conn: ConnId,
    ends: &Ends,
    events: &Sender<DstEvent>,
    d: Deadlines,
) -> Option<String> {
    let s = Stream::server(tcp, ends.tls.as_ref(), Instant::now() + d.connect());
    if ends.tls.is_some() {
        ends.handshaking.fetch_sub(1, Ordering::SeqCst);
    }
    let s = match s {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("connection {conn}: TLS handshake failed: {e}");
            return None;
        }
    };
    match ends.conns.lock().unwrap().get_mut(&conn) {
        Some(c) => c.stream = s.try_clone().ok(),
        None => return None,
    }
    if events.send(DstEvent::Accepted(conn, s.binding())).is_err() {
        return None;
    }
    let land = Landing {
        table: &ends.table,
        digests: &ends.digests,
        blocks: &ends.blocks,
    };
    Some(serve(s, conn, &ends.conns, &land, events, d))
}

/// Reads what `conn` sends first and serves it as a control or a data connection; returns
/// why it ended.
/// Where a data connection's frames land.
struct Landing<'a> {
    table: &'a RegTable,
    digests: &'a DigestSlot,
    blocks: &'a [Arc<RamBlock>],
}

fn serve(
    mut s: Stream,
    conn: ConnId,
    conns: &Conns,
    land: &Landing<'_>,
    events: &Sender<DstEvent>,
    d: Deadlines,
) -> String {
    let first = match read_first_byte(&mut s) {
        Ok(Some(b)) => b,
        Ok(None) => return "closed by the peer".into(),
        Err(e) => return e.to_string(),
    };
    if first != wire::DATA_HELLO_MAGIC[0] {
        return control(s, first, conn, events, d);
    }
    let mut hello = [0u8; wire::DATA_HELLO_LEN];
    hello[0] = first;
    if let Err(e) = read_exact_by(&mut s, &mut hello[1..], Instant::now() + d.frame()) {
        return format!("incomplete data hello: {e}");
    }
    let (tx, rx) = mpsc::sync_channel(1);
    match conns.lock().unwrap().get_mut(&conn) {
        Some(c) => c.decide = Some(tx),
        None => return "closed".into(),
    }
    if events.send(DstEvent::DataHello(conn, hello)).is_err() {
        return "the driver is gone".into();
    }
    // The listener answers at once; its handshake deadline closes a connection it forgets.
    match rx.recv() {
        Ok(Decision::Admit) => {}
        Ok(Decision::Refuse) | Err(_) => return "data channel refused".into(),
    }
    if let Err(e) = s.write_all(&wire::DATA_JOIN_ACK) {
        return format!("answering the join: {e}");
    }
    data_receiver(s, land, d)
}

/// A control connection: frames, each whole within the frame deadline once begun.
fn control(
    mut s: Stream,
    mut first: u8,
    conn: ConnId,
    events: &Sender<DstEvent>,
    d: Deadlines,
) -> String {
    loop {
        let f = match read_control_frame(&mut s, first, d.frame()) {
            Ok(f) => f,
            Err(e) => return e.to_string(),
        };
        let bad = wire::decode_header(&f).is_err();
        if events.send(DstEvent::Frame(conn, f)).is_err() {
            return "the driver is gone".into();
        }
        if bad {
            return "malformed frame".into();
        }
        first = match read_first_byte(&mut s) {
            Ok(Some(b)) => b,
            Ok(None) => return "closed by the peer".into(),
            Err(e) => return e.to_string(),
        };
    }
}

/// Applies data frames straight into registered memory (spec: DATA-1, INV-REG-1), and
/// acknowledges each once placed.
/// Bytes a data connection reads ahead of the frame it is applying: the headers and
/// payloads of small frames (a round's scattered pages) come in one system call; a large
/// payload's rest goes from the socket straight into memory.
const DATA_READ_AHEAD: usize = 64 << 10;

/// Frames applied at most before their acknowledgement goes out: acknowledgements are
/// cumulative and sent once nothing more is waiting, or after this many frames, so the
/// source's window (64 writes a channel) keeps moving.
const ACK_EVERY: u64 = 16;

/// Whether to acknowledge before reading on: when frames are unacknowledged and either
/// nothing more has arrived (the source may be waiting for the acknowledgement) or
/// `ACK_EVERY` went by while the stream kept coming.
fn ack_before_read(applied: u64, acked: u64, input_waiting: impl FnOnce() -> bool) -> bool {
    acked < applied && (applied - acked >= ACK_EVERY || !input_waiting())
}

/// Bytes read off a data connection and not yet consumed.
struct ReadAhead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }

    /// Reads what the socket has (at least a byte) by `deadline` (None: as long as it
    /// takes); `Ok(0)` is the end of the stream.
    fn fill(&mut self, s: &mut Stream, deadline: Option<Instant>) -> io::Result<usize> {
        self.fill_upto(s, deadline, self.buf.len())
    }

    /// As `fill`, reading at most `most` bytes.
    fn fill_upto(
        &mut self,
        s: &mut Stream,
        deadline: Option<Instant>,
        most: usize,
    ) -> io::Result<usize> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let end = self.buf.len().min(self.end + most);
        let n = s.read_some(&mut self.buf[self.end..end], deadline)?;
        self.end += n;
        Ok(n)
    }

    /// Takes exactly `out.len()` bytes, reading more by `deadline` as needed.
    fn take(&mut self, s: &mut Stream, out: &mut [u8], deadline: Instant) -> io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            if self.start == self.end && self.fill(s, Some(deadline))? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = (out.len() - got).min(self.end - self.start);
            out[got..got + n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.consume(n);
            got += n;
        }
        Ok(())
    }
}

fn data_receiver(mut s: Stream, land: &Landing<'_>, d: Deadlines) -> String {
    let mut applied: u64 = 0;
    let mut acked: u64 = 0;
    let mut last_large = false;
    let mut ahead = ReadAhead {
        buf: vec![0u8; DATA_READ_AHEAD],
        start: 0,
        end: 0,
    };
    // Set by the driver once the chunk size is negotiated, before any channel is admitted.
    let cache = land.digests.lock().unwrap().clone();
    loop {
        // Nothing read ahead: acknowledge what was applied before waiting (the source may be
        // waiting for it), then wait. An idle channel (between rounds) is normal; a frame,
        // once begun, is bounded.
        if ahead.available().is_empty() {
            // Streaming (the next frame already waiting): acknowledged every ACK_EVERY
            // frames only, so that a stream of large frames costs the source few wakeups.
            if ack_before_read(applied, acked, || s.has_input()) {
                if let Err(e) = s.write_all(&applied.to_le_bytes()) {
                    return format!("acknowledging: {e}");
                }
                acked = applied;
            }
            // After a large payload, which went straight into memory, the next frame is
            // likely large too: its header alone is read, so that its payload is not copied
            // through the read-ahead buffer.
            let most = match last_large {
                true => DATA_HEADER_LEN,
                false => DATA_READ_AHEAD,
            };
            match ahead.fill_upto(&mut s, None, most) {
                Ok(0) => return "closed by the source".into(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        let deadline = Instant::now() + d.frame();
        let mut hb = [0u8; DATA_HEADER_LEN];
        if let Err(e) = ahead.take(&mut s, &mut hb, deadline) {
            return format!("data frame header: {e}");
        }
        // Checked and received under the table's read lock: the payload goes into memory
        // from what was read ahead and then straight from the socket, and an unregister waits
        // until it has landed, which the frame deadline bounds (INV-REG-1, LIVE-3).
        let r = parse_data_header(&hb).and_then(|h| {
            land.table
                .with_write(h.rkey, h.remote_offset, h.len as u64, |block, off| {
                    let block = block as usize;
                    let ticket = cache.as_ref().map(|c| c.begin(block, off, h.len as u64));
                    let mem = &land.blocks[block];
                    let have = ahead.available();
                    let n = have.len().min(h.len as usize);
                    mem.write(off, &have[..n]);
                    ahead.consume(n);
                    let rest = h.len as u64 - n as u64;
                    last_large = h.len as usize >= DATA_READ_AHEAD;
                    let landed = match rest {
                        0 => Ok(()),
                        _ => s.recv_into(mem, off + n as u64, rest, deadline),
                    };
                    landed.map(|()| (block, ticket))
                })
                .map_err(DataFrameError::from)
        });
        let landed = match r {
            Ok(Ok(landed)) => landed,
            Ok(Err(e)) => return format!("data channel failed mid-frame: {e}"),
            Err(e) => return format!("refused a data frame: {e}"),
        };
        applied += 1;
        // Acknowledged when enough frames went by; else before the next wait for input.
        if applied - acked >= ACK_EVERY {
            if let Err(e) = s.write_all(&applied.to_le_bytes()) {
                return format!("acknowledging: {e}");
            }
            acked = applied;
        }
        // While the bytes are still in cache: the digests of the units this frame covered
        // (spec: SW-5, verification digests only what is unknown).
        if let (Some(c), (block, Some(ticket))) = (&cache, landed) {
            c.end(ticket, &land.blocks[block]);
        }
    }
}

impl DestLink for DestTcp {
    fn send(&mut self, conn: ConnId, frame: &[u8]) -> io::Result<()> {
        // A handle of its own, so a slow send never holds the table.
        let s = self
            .conns
            .lock()
            .unwrap()
            .get(&conn)
            .and_then(|c| c.stream.as_ref().map(Stream::try_clone));
        match s {
            Some(s) => s?.write_all(frame),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection gone",
            )),
        }
    }

    /// Ends what this side sends on `conn` (the peer reads everything sent, then the end),
    /// and cuts the connection after `LINGER`, so a peer that never closes costs nothing more.
    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.lock().unwrap().get_mut(&conn) {
            if let Some(d) = c.decide.take() {
                let _ = d.try_send(Decision::Refuse);
            }
            match &c.stream {
                Some(s) => s.shutdown(Shutdown::Write),
                None => {
                    let _ = c.tcp.shutdown(Shutdown::Write);
                }
            }
            if let Ok(s) = c.tcp.try_clone() {
                let _ = self.reaper.send((Instant::now() + LINGER, s));
            }
        }
    }

    fn admit(&mut self, conn: ConnId, _channel: u8) -> io::Result<()> {
        let mut conns = self.conns.lock().unwrap();
        let decide = conns
            .get_mut(&conn)
            .and_then(|c| c.decide.take())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection gone"))?;
        decide
            .try_send(Decision::Admit)
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "connection gone"))
    }

    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32> {
        Ok(self
            .table
            .register(Region { block, offset, len }, self.salt))
    }

    fn unregister(&mut self, key: u32) -> bool {
        self.table.unregister(key)
    }

    fn set_digest_cache(&mut self, cache: Arc<DigestCache>) -> bool {
        *self.digests.lock().unwrap() = Some(cache);
        true
    }

    fn shutdown(&mut self) {
        self.table.clear();
        self.closing.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().values_mut() {
            if let Some(d) = c.decide.take() {
                let _ = d.try_send(Decision::Refuse);
            }
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        // Wake the acceptor so it sees `closing`.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

/// The client half of `tls_data_frame`: a TLS 1.3 session with `client`, `plain` sealed into
/// records, one byte of them flipped (mode 1) or the records cut (mode 2) at `at`, sent, and
/// the connection half-closed. Returns the socket.
fn fuzz_tls_client_sends(
    addr: SocketAddr,
    client: &crate::transport::tls::ClientTls,
    plain: &[u8],
    mode: u8,
    at: usize,
) -> TcpStream {
    use std::io::Write;
    let mut sock = TcpStream::connect(addr).expect("connected");
    let mut c = client.connection().expect("client session");
    while c.is_handshaking() {
        c.complete_io(&mut sock).expect("handshake");
    }
    c.writer().write_all(plain).expect("sealed");
    let mut sealed = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut sealed).expect("sealed");
    }
    match mode {
        1 if !sealed.is_empty() => {
            let i = at % sealed.len();
            sealed[i] ^= 0x80;
        }
        2 => sealed.truncate(at % (sealed.len() + 1)),
        _ => {}
    }
    let _ = sock.write_all(&sealed);
    let _ = sock.shutdown(Shutdown::Write);
    sock
}

/// Fuzz target body for `tls_data_frame`: the frames of a `tcp_data_frame` input (after a
/// 3-byte prefix: tamper mode u8, position u16 LE) sealed by a real TLS 1.3 client and read by
/// the destination's data receiver through its TLS stream, the records optionally changed or
/// cut on the wire (mode 1: one byte flipped, mode 2: cut short). Panics if any byte outside a
/// live registration changes (spec: INV-REG-1), if the receiver does not end once the client
/// closes, or if, with the records untouched, memory differs from the frames applied in the
/// clear (decrypted frames reach the same parser and land the same).
pub fn fuzz_tls_data_frames(data: &[u8]) {
    use super::frames::{apply_data_frame, parse_data_header, FuzzMemory};
    use crate::transport::tls::{ClientTls, ServerTls};
    use std::sync::OnceLock;
    static CREDS: OnceLock<(ClientTls, ServerTls)> = OnceLock::new();
    if data.len() < 3 {
        return;
    }
    let (mode, at) = (data[0] % 3, u16::from_le_bytes([data[1], data[2]]) as usize);
    let creds = CREDS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rdmig-fuzz-tls-{}", std::process::id()));
        crate::transport::tls::init(&dir, &[]).expect("credentials");
        let pair = (
            ClientTls::load(&dir, "localhost").expect("client credentials"),
            ServerTls::load(&dir).expect("server credentials"),
        );
        let _ = std::fs::remove_dir_all(&dir);
        pair
    });
    // What the frames do in the clear: applied in order until one is refused.
    let m = FuzzMemory::new();
    let reference = FuzzMemory::new();
    let mut plain = Vec::new();
    for (hb, payload) in m.frames(&data[3..]) {
        if payload.len() < u32::from_le_bytes([hb[16], hb[17], hb[18], hb[19]]) as usize {
            break; // A frame the input cuts short: the stream ends before it.
        }
        plain.extend_from_slice(&hb);
        plain.extend_from_slice(payload);
        let applied = parse_data_header(&hb)
            .and_then(|h| apply_data_frame(&reference.table, &reference.blocks, &h, payload));
        if applied.is_err() {
            break;
        }
    }
    let before = m.snapshot();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback");
    let addr = listener.local_addr().expect("bound");
    let deadlines = Deadlines::new(std::time::Duration::from_secs(2));
    let ended = std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let (tcp, _) = listener.accept().expect("accepted");
            let deadline = Instant::now() + deadlines.connect();
            let Ok(s) = Stream::server(tcp, Some(&creds.1), deadline) else {
                return;
            };
            let digests: DigestSlot = Arc::new(Mutex::new(None));
            let land = Landing {
                table: &m.table,
                digests: &digests,
                blocks: &m.blocks,
            };
            data_receiver(s, &land, deadlines);
        });
        let sock = fuzz_tls_client_sends(addr, &creds.0, &plain, mode, at);
        let t = Instant::now();
        while !server.is_finished() && t.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let ended = server.is_finished();
        // Unblocks a receiver that did not end, so the scope can close and report it.
        let _ = sock.shutdown(Shutdown::Both);
        ended
    });
    assert!(
        ended,
        "LIVE-3: the data receiver did not end after the client closed"
    );
    let after = m.snapshot();
    m.assert_inside(&before, &after);
    if mode == 0 {
        assert!(
            after == reference.snapshot(),
            "frames decrypted from TLS landed differently from the same frames in the clear"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of frames is acknowledged every ACK_EVERY frames while it keeps coming, and
    /// at once when it stops: the source's window (64 writes a channel) never waits on an
    /// acknowledgement held back.
    #[test]
    fn acknowledgements_are_batched_while_frames_stream_and_sent_when_they_stop() {
        assert!(!ack_before_read(5, 0, || true), "streaming: held back");
        assert!(
            ack_before_read(ACK_EVERY, 0, || true),
            "streaming: every ACK_EVERY"
        );
        assert!(ack_before_read(5, 0, || false), "stopped: sent at once");
        assert!(
            !ack_before_read(5, 5, || false),
            "nothing new: nothing sent"
        );
        const { assert!(ACK_EVERY < 64) };
    }
}
