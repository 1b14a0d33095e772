//! The operations the drivers need from a transport, whatever carries the bytes (TCP, RDMA
//! verbs). Transports report what happens asynchronously as events on a channel the driver
//! owns; everything else is a direct call. A transport decides nothing: admission, deadlines
//! and outcomes are the machines' (`rdmig-model`); the transport bounds every wait it does
//! itself (spec: LIVE-1 .. LIVE-6) and reports what it saw.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use rdmig_model::listener::ConnId;
use rdmig_model::wire::DataHello;

pub mod completions;
pub mod file;
pub mod regtable;
pub mod tcp;
pub mod tls;
pub mod verbs;

/// What a source-side transport tells the driver.
#[derive(Debug)]
pub enum SrcEvent {
    /// A complete control frame (header and payload), not yet decoded.
    Control(Vec<u8>),
    /// The control connection ended or broke.
    ControlClosed(String),
    /// The destination admitted data channel `n`.
    DataOpened(u8),
    /// Data channel `n` could not be opened, failed, or was closed.
    DataLost(u8, String),
    /// A write is placed at the destination.
    WriteDone(u64),
    /// The operator asked the process to stop (SIGINT, SIGTERM).
    Signal(i32),
    /// Not the transport's: the driver's own background work, the source memory's chunk
    /// digests, done.
    Digests(Vec<u64>),
    /// Not the transport's: a dirty scan the driver ran in the background, done.
    Scanned(Result<rdmig_model::DirtyScan, String>),
    /// Not the transport's: the device state streaming into the state buffer has reached
    /// this many bytes (spec: STATE-3).
    StateProduced(u64),
    /// Not the transport's: the device state is complete: its length and XXH3-64 digest.
    StateDone(u64, u64),
    /// Not the transport's: the device state could not be produced.
    StateFailed(String),
}

/// What a destination-side transport tells the driver.
///
/// Per connection, `Accepted` comes before every other event of that connection (the
/// listener closes a connection it does not know): a transport whose events come from
/// several threads reports the accept before the peer can send anything.
#[derive(Debug)]
pub enum DstEvent {
    /// A connection was accepted (its TLS handshake done, when the listener uses TLS, with
    /// the session's channel binding).
    Accepted(ConnId, Option<[u8; 32]>),
    /// `conn` sent a complete control frame (header and payload), not yet decoded.
    Frame(ConnId, Vec<u8>),
    /// `conn` opened with DATA_HELLO (the 56 bytes, not yet decoded).
    DataHello(ConnId, [u8; rdmig_model::wire::DATA_HELLO_LEN]),
    /// `conn` closed or failed; for an admitted data connection also a data frame an RDMA
    /// NIC would refuse.
    Closed(ConnId, String),
    /// The operator asked the process to stop (SIGINT, SIGTERM).
    Signal(i32),
}

/// One write as the source driver posts it.
#[derive(Debug, Clone, Copy)]
pub struct WriteReq {
    pub wr_id: u64,
    pub block: u16,
    pub offset: u64,
    pub len: u64,
    pub rkey: u32,
    pub remote_offset: u64,
}

/// The source's end of a migration.
pub trait SourceLink {
    /// Sends one encoded control frame, in order.
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Opens a data channel presenting `hello` (spec: AUTH-6). The outcome arrives as
    /// `SrcEvent::DataOpened` or `SrcEvent::DataLost`.
    fn open_data(&mut self, hello: DataHello) -> io::Result<()>;
    /// From now on, send every write from a private copy of its bytes whose pages are hashed
    /// into `sent` before they go (spec: SCAN-2); returns whether this transport can. A NIC
    /// reads memory behind the CPU's back, at a time no one learns, so the verbs transport
    /// cannot.
    fn hash_sent_pages(
        &mut self,
        _sent: std::sync::Arc<crate::memory::sent_pages::SentPages>,
    ) -> bool {
        false
    }
    /// Posts a one-sided write; its completion arrives as `SrcEvent::WriteDone` once placed.
    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()>;
    /// Closes everything; outstanding operations are abandoned.
    fn shutdown(&mut self);
    /// Short name for reports (`tcp`, `rdma`).
    fn name(&self) -> &'static str;
}

/// The destination's end of a migration: every connection the listener accepts.
pub trait DestLink {
    /// Sends one encoded control frame on `conn`, in order.
    fn send(&mut self, conn: ConnId, frame: &[u8]) -> io::Result<()>;
    /// Closes `conn` (after what was sent on it).
    fn close(&mut self, conn: ConnId);
    /// `conn` joins the session as data channel `channel`.
    fn admit(&mut self, conn: ConnId, channel: u8) -> io::Result<()>;
    /// Exposes `[offset, offset+len)` of local block `block` for remote writes, least
    /// privilege: remote write on exactly that range. Returns the remote key.
    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32>;
    /// Revokes a key; no write under it lands after this returns.
    fn unregister(&mut self, key: u32) -> bool;
    /// Keep `cache` current as data lands, where this transport sees the data; returns
    /// whether it does. TCP does; an RDMA NIC writes memory behind the CPU's back, so the
    /// verbs transport cannot, and a cache nobody invalidates would keep digests of pages the
    /// NIC has since overwritten: the driver then digests all memory (spec: SW-5).
    fn set_digest_cache(
        &mut self,
        _cache: std::sync::Arc<crate::memory::digest_cache::DigestCache>,
    ) -> bool {
        false
    }
    /// Closes everything.
    fn shutdown(&mut self);
    fn name(&self) -> &'static str;
}

/// How long the transport itself may wait on the peer (spec: LIVE-2, LIVE-3): every bound
/// derives from the machines' idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The idle timeout the machines use.
    pub idle: Duration,
}

impl Deadlines {
    pub fn new(idle: Duration) -> Deadlines {
        Deadlines {
            idle: idle.max(Duration::from_millis(100)),
        }
    }

    /// A frame whose first byte arrived must arrive whole within this (spec: LIVE-3).
    pub fn frame(&self) -> Duration {
        self.idle
    }

    /// Opening a connection, or the answer to a join (spec: LIVE-4).
    pub fn connect(&self) -> Duration {
        self.idle.min(Duration::from_secs(10))
    }
}

/// Socket settings every TCP connection of rdmig carries (spec: LIVE-2, the TCP binding):
/// data left unacknowledged by the peer fails the connection after the idle timeout
/// (TCP_USER_TIMEOUT), an idle connection to a host that vanished fails within about the idle
/// timeout (keepalive probes), and a blocking send gives up after it (SO_SNDTIMEO).
pub fn tune(s: &TcpStream, d: Deadlines) {
    use rustix::net::sockopt;
    let idle = d.idle;
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(idle));
    let _ = sockopt::set_tcp_user_timeout(s, idle.as_millis().min(u32::MAX as u128) as u32);
    let _ = sockopt::set_socket_keepalive(s, true);
    let probe = (idle / 6).max(Duration::from_secs(1));
    let _ = sockopt::set_tcp_keepidle(s, (idle / 3).max(Duration::from_secs(1)));
    let _ = sockopt::set_tcp_keepintvl(s, probe);
    let _ = sockopt::set_tcp_keepcnt(s, 3);
}

/// Delivers SIGINT and SIGTERM to the driver as events, so a signal is an input like any
/// other (spec: section 7.3, operator cancel).
pub fn watch_signals<E: Send + 'static>(
    events: std::sync::mpsc::Sender<E>,
    event: fn(i32) -> E,
) -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if events.send(event(sig)).is_err() {
                return;
            }
        }
    });
    Ok(())
}
