//! RDMA verbs transport (RoCE, InfiniBand, soft-RoCE) behind [`SourceLink`] and [`DestLink`].
//!
//! Resources per side: one protection domain; one send and one receive completion queue, each
//! drained by its own poller thread that routes every work completion by queue pair and
//! `wr_id` to its owner (no completion is ever dropped, and nothing assumes an order across
//! the two queues); one RC queue pair for control and one per data channel.
//!
//! - Control: SEND/RECV. Each side pre-posts `credit_window` receive buffers of
//!   `wire::MAX_FRAME_LEN` bytes (spec: FC-1; the machines enforce credits, so a buffer is
//!   always posted when a frame arrives). A receive completion becomes `Event::Control` with
//!   the received bytes and its buffer is re-posted at once. Sends are copied into one of a
//!   fixed set of send buffers, each freed by its (signalled) send completion.
//! - Data: RDMA WRITE from source memory (registered whole, local read only) into
//!   destination registrations (local + remote write on exactly the registered range, zero-
//!   based so remote offsets are registration-relative, spec 1.3). Writes larger than
//!   [`MAX_PIECE`] are split; only the last piece is signalled, and on an RC queue its
//!   completion also completes the earlier pieces, so `Event::WriteDone(wr_id)` means every
//!   byte of the write is placed. The send queue depth is respected: posting waits for room.
//! - Bootstrap: the source connects TCP to the destination's listen address; both exchange the
//!   control queue pair's endpoint (QPN, PSN, LID, MTU, GID), then run the protocol over the
//!   control queue pair. Bootstrap connections are read concurrently, each within the
//!   handshake deadline; the first that presents a valid CONNECT becomes the control channel
//!   and later ones are closed. When the machine asks, each data channel's endpoint is sent on
//!   the same TCP connection with its DATA_HELLO (spec AUTH-6); the listener machine admits it
//!   (a data queue pair is created and its endpoint returned) or refuses it (the bootstrap
//!   connection is closed).
//!
//! Bootstrap messages (all integers little-endian):
//! - CONNECT, S->D and D->S: magic `RDMGRDMA` (8) then an endpoint (32);
//! - JOIN, S->D: DATA_HELLO (56) then an endpoint (32); answered by CONNECT or by closing;
//! - endpoint: qpn u32, psn u32 (24 bits), lid u16, mtu u8 (`ibv_mtu`), reserved u8 = 0,
//!   gid (16), reserved (4) = 0.

pub mod res;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdmig_model::wire;

use rdmig_model::listener::ConnId;
use rdmig_model::wire::{DataHello, DATA_HELLO_LEN};

use crate::memory::ram::RamBlock;
use crate::transport::{Deadlines, DestLink, DstEvent, SourceLink, SrcEvent, WriteReq};
pub use res::{list_devices, DeviceInfo, Endpoint, GidInfo, PortInfo};
use res::{Completion, Cq, Device, DmaBuf, Mr, MrAccess, Qp, QpAccess, SendWr};

/// Largest single RDMA WRITE; longer writes are split.
pub const MAX_PIECE: u64 = 16 << 20;
/// Work requests per data queue pair's send queue.
pub const DATA_SQ_DEPTH: u32 = 256;
/// Control send buffers (each `MAX_FRAME_LEN`).
pub const CONTROL_SEND_SLOTS: usize = 32;
pub const ENDPOINT_LEN: usize = 32;
pub const CONNECT_LEN: usize = 8 + ENDPOINT_LEN;
pub const JOIN_LEN: usize = DATA_HELLO_LEN + ENDPOINT_LEN;
pub const BOOT_MAGIC: &[u8; 8] = b"RDMGRDMA";
/// How long a post waits for a send buffer or send queue room before failing.
const POST_WAIT: Duration = Duration::from_secs(10);
const FRAME: usize = wire::MAX_FRAME_LEN;

/// Which device, port and GID to use.
#[derive(Debug, Clone, Default)]
pub struct VerbsOptions {
    pub device: Option<String>,
    pub gid_index: Option<u8>,
}

/// `true` for an IPv4-mapped IPv6 address `::ffff:a.b.c.d` (RoCE v2 over IPv4).
pub fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

/// Picks the port and GID index: the first active port; the given GID index (which must
/// exist on that port), or else the port's first IPv4-mapped RoCE v2 GID (Ethernet link
/// layer) or GID 0 (InfiniBand).
pub fn choose_port(info: &DeviceInfo, gid_index: Option<u8>) -> Result<(u8, u8), String> {
    let port = info
        .ports
        .iter()
        .find(|p| p.active)
        .ok_or_else(|| "no active port".to_string())?;
    if let Some(i) = gid_index {
        return if port.gids.iter().any(|g| g.index == i) {
            Ok((port.num, i))
        } else {
            Err(format!("port {} has no GID at index {i}", port.num))
        };
    }
    if !port.ethernet {
        return port
            .gids
            .first()
            .map(|g| (port.num, g.index))
            .ok_or_else(|| format!("port {} has no GID", port.num));
    }
    port.gids
        .iter()
        .find(|g| g.gid_type == 2 && is_ipv4_mapped(&g.gid))
        .map(|g| (port.num, g.index))
        .ok_or_else(|| {
            format!(
                "port {} has no IPv4-mapped RoCE v2 GID (give --gid-index)",
                port.num
            )
        })
}

/// Opens the device for a migration.
pub fn open_device(o: &VerbsOptions) -> io::Result<Arc<Device>> {
    let dev = Device::open(o.device.as_deref(), |info| choose_port(info, o.gid_index))?;
    tracing::info!(
        "RDMA device {} port {} GID index {}",
        dev.name,
        dev.port,
        dev.gid_index
    );
    Ok(dev)
}

pub fn encode_endpoint(e: &Endpoint) -> [u8; ENDPOINT_LEN] {
    let mut b = [0u8; ENDPOINT_LEN];
    b[0..4].copy_from_slice(&e.qpn.to_le_bytes());
    b[4..8].copy_from_slice(&(e.psn & 0xff_ffff).to_le_bytes());
    b[8..10].copy_from_slice(&e.lid.to_le_bytes());
    b[10] = e.mtu;
    b[12..28].copy_from_slice(&e.gid);
    b
}

pub fn decode_endpoint(b: &[u8; ENDPOINT_LEN]) -> Option<Endpoint> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if b[11] != 0 || b[28..32] != [0; 4] || u32_at(4) > 0xff_ffff || !(1..=5).contains(&b[10]) {
        return None;
    }
    let mut gid = [0u8; 16];
    gid.copy_from_slice(&b[12..28]);
    Some(Endpoint {
        qpn: u32_at(0),
        psn: u32_at(4),
        lid: u16::from_le_bytes([b[8], b[9]]),
        mtu: b[10],
        gid,
    })
}

pub fn connect_msg(e: &Endpoint) -> [u8; CONNECT_LEN] {
    let mut b = [0u8; CONNECT_LEN];
    b[..8].copy_from_slice(BOOT_MAGIC);
    b[8..].copy_from_slice(&encode_endpoint(e));
    b
}

/// Decodes CONNECT: `None` for a wrong magic or an endpoint [`decode_endpoint`] refuses.
pub fn decode_connect(b: &[u8; CONNECT_LEN]) -> Option<Endpoint> {
    let mut e = [0u8; ENDPOINT_LEN];
    e.copy_from_slice(&b[8..]);
    if &b[..8] != BOOT_MAGIC {
        return None;
    }
    decode_endpoint(&e)
}

fn read_connect(s: &mut TcpStream) -> io::Result<Endpoint> {
    let mut b = [0u8; CONNECT_LEN];
    s.read_exact(&mut b)?;
    decode_connect(&b)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad RDMA bootstrap message"))
}

pub fn join_msg(hello: &DataHello, e: &Endpoint) -> [u8; JOIN_LEN] {
    let mut b = [0u8; JOIN_LEN];
    b[..DATA_HELLO_LEN].copy_from_slice(&hello.encode());
    b[DATA_HELLO_LEN..].copy_from_slice(&encode_endpoint(e));
    b
}

/// Splits JOIN into its DATA_HELLO and its endpoint, both still to be decoded.
pub fn split_join(m: &[u8; JOIN_LEN]) -> ([u8; DATA_HELLO_LEN], [u8; ENDPOINT_LEN]) {
    let mut hello = [0u8; DATA_HELLO_LEN];
    hello.copy_from_slice(&m[..DATA_HELLO_LEN]);
    let mut ep = [0u8; ENDPOINT_LEN];
    ep.copy_from_slice(&m[DATA_HELLO_LEN..]);
    (hello, ep)
}

fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS random source");
    u32::from_le_bytes(b) & 0xff_ffff
}

/// Splits a write into pieces of at most [`MAX_PIECE`] bytes: `(offset within the write,
/// len)`; only the last is signalled.
pub fn pieces(len: u64) -> Vec<(u64, u32)> {
    let mut v = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MAX_PIECE);
        v.push((done, n as u32));
        done += n;
    }
    v
}

/// The send queue of one data queue pair: work requests posted and not yet completed, in
/// order, grouped by write (the last of each group is the signalled one).
#[derive(Debug, Default)]
pub struct SendWindow {
    used: u32,
    inflight: VecDeque<(u64, u32)>,
    failed: bool,
}

impl SendWindow {
    /// Room for `n` more work requests under `depth`?
    pub fn has_room(&self, n: u32, depth: u32) -> bool {
        self.used + n <= depth
    }

    pub fn posted(&mut self, wr_id: u64, n: u32) {
        self.used += n;
        self.inflight.push_back((wr_id, n));
    }

    /// A successful signalled completion: it completes its write and, RC being ordered, the
    /// unsignalled pieces before it. `Err` if it matches no write in flight.
    pub fn completed(&mut self, wr_id: u64) -> Result<(), u64> {
        match self.inflight.front() {
            Some(&(id, n)) if id == wr_id => {
                self.inflight.pop_front();
                self.used -= n;
                Ok(())
            }
            _ => Err(wr_id),
        }
    }

    /// An error completion (the queue pair is broken; every work request, signalled or not,
    /// flushes with its own completion). Returns `true` for the first one.
    pub fn errored(&mut self) -> bool {
        let first = !self.failed;
        self.failed = true;
        self.used = self.used.saturating_sub(1);
        if self.used == 0 {
            self.inflight.clear();
        }
        first
    }

    pub fn outstanding(&self) -> usize {
        self.inflight.len()
    }
}

/// A buffer and its registration (which holds the buffer).
struct RegBuf {
    mr: Mr,
    buf: Arc<DmaBuf>,
}

impl RegBuf {
    fn new(dev: &Arc<Device>, len: usize, access: MrAccess) -> io::Result<RegBuf> {
        let buf = Arc::new(DmaBuf::new(len));
        let mr = Mr::on_buf(dev, &buf, access)?;
        Ok(RegBuf { mr, buf })
    }
}

/// The control queue pair with its buffers.
struct Control {
    qp: Qp,
    recv: RegBuf,
    send: RegBuf,
    free: Mutex<Vec<usize>>,
    freed: Condvar,
    failed: AtomicBool,
}

impl Control {
    fn new(dev: &Arc<Device>, scq: &Arc<Cq>, rcq: &Arc<Cq>, window: u16) -> io::Result<Control> {
        let window = window.max(1) as usize;
        let qp = Qp::new(
            dev,
            scq,
            rcq,
            CONTROL_SEND_SLOTS as u32,
            window as u32,
            QpAccess::None,
            random_psn(),
        )?;
        let recv = RegBuf::new(dev, window * FRAME, MrAccess::LocalWrite)?;
        let send = RegBuf::new(dev, CONTROL_SEND_SLOTS * FRAME, MrAccess::LocalRead)?;
        let c = Control {
            qp,
            recv,
            send,
            free: Mutex::new((0..CONTROL_SEND_SLOTS).rev().collect()),
            freed: Condvar::new(),
            failed: AtomicBool::new(false),
        };
        // Receive buffers are posted before the peer learns our endpoint.
        for slot in 0..window {
            c.post_recv(slot)?;
        }
        Ok(c)
    }

    /// Posts receive slot `slot`. Called only for a slot nobody holds: at setup, and after
    /// its frame was copied out.
    fn post_recv(&self, slot: usize) -> io::Result<()> {
        let addr = self.recv.buf.ptr().wrapping_add(slot * FRAME);
        // SAFETY: slot `slot` is not posted and nobody reads it until its completion (the
        // completion handler copies it out, then posts it again).
        unsafe {
            self.qp
                .post_recv(&self.recv.mr, addr, FRAME as u32, slot as u64)
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() > FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "control frame too long",
            ));
        }
        let deadline = Instant::now() + POST_WAIT;
        let mut free = self.free.lock().unwrap();
        let slot = loop {
            if self.failed.load(Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "control queue pair failed",
                ));
            }
            if let Some(s) = free.pop() {
                break s;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.failed.store(true, Ordering::SeqCst);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no control send buffer freed",
                ));
            }
            free = self.freed.wait_timeout(free, left).unwrap().0;
        };
        drop(free);
        // SAFETY: `slot` came off the free list, so no send uses it until its completion
        // returns it; it is written before the post and not again until then.
        unsafe { self.send.buf.write(slot * FRAME, frame) };
        // SAFETY: as above: the slot stays unwritten until its completion frees it.
        let r = unsafe {
            self.qp.post_send(
                &self.send.mr,
                &[SendWr {
                    wr_id: slot as u64,
                    addr: self.send.buf.ptr().wrapping_add(slot * FRAME),
                    len: frame.len() as u32,
                    signalled: true,
                    write: None,
                }],
            )
        };
        if r.is_err() {
            self.release(slot);
        }
        r
    }

    fn release(&self, slot: usize) {
        let mut f = self.free.lock().unwrap();
        if slot < CONTROL_SEND_SLOTS && !f.contains(&slot) {
            f.push(slot);
        }
        self.freed.notify_all();
    }

    /// Waits (bounded) until every posted send completed, so frames sent just before a
    /// shutdown (STARTED, ABORT) leave before the queue pair is destroyed.
    fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut f = self.free.lock().unwrap();
        while f.len() < CONTROL_SEND_SLOTS && !self.failed.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            f = self.freed.wait_timeout(f, left).unwrap().0;
        }
    }
}

/// One source data channel.
struct DataQp {
    channel: u8,
    qp: Qp,
    window: Mutex<SendWindow>,
    room: Condvar,
}

/// What the pollers report; each side turns it into its own events.
enum Note {
    Control(Vec<u8>),
    ControlClosed(String),
    WriteDone(u64),
    DataFailed(u8, String),
}

/// Where the pollers' notes go.
type Sink = Box<dyn Fn(Note) + Send + Sync>;

/// State shared by a side's link object and its two pollers.
struct Shared {
    control: Control,
    /// Source data queue pairs by QP number.
    data: RwLock<HashMap<u32, Arc<DataQp>>>,
    events: Sink,
    stop: AtomicBool,
}

impl Shared {
    fn on_send(&self, c: &Completion) {
        let ctl = &self.control;
        if c.qp_num == ctl.qp.num() {
            ctl.release(c.wr_id as usize);
            if !c.ok && !ctl.failed.swap(true, Ordering::SeqCst) {
                ctl.freed.notify_all();
                (self.events)(Note::ControlClosed(format!(
                    "control send failed (work completion status {})",
                    c.status
                )));
            }
            return;
        }
        let Some(d) = self.data.read().unwrap().get(&c.qp_num).cloned() else {
            tracing::warn!("completion for unknown queue pair {}", c.qp_num);
            return;
        };
        let mut w = d.window.lock().unwrap();
        if c.ok {
            match w.completed(c.wr_id) {
                Ok(()) => {
                    (self.events)(Note::WriteDone(c.wr_id));
                }
                Err(id) => {
                    (self.events)(Note::DataFailed(
                        d.channel,
                        format!("completion for write {id}, which is not the oldest in flight"),
                    ));
                }
            }
        } else if w.errored() {
            (self.events)(Note::DataFailed(
                d.channel,
                format!(
                    "RDMA write failed (work completion status {}, {} writes in flight)",
                    c.status,
                    w.outstanding()
                ),
            ));
        }
        d.room.notify_all();
    }

    fn on_recv(&self, c: &Completion) {
        let ctl = &self.control;
        if c.qp_num != ctl.qp.num() {
            tracing::warn!("receive completion for unknown queue pair {}", c.qp_num);
            return;
        }
        if !c.ok {
            if !ctl.failed.swap(true, Ordering::SeqCst) {
                ctl.freed.notify_all();
                (self.events)(Note::ControlClosed(format!(
                    "control receive failed (work completion status {})",
                    c.status
                )));
            }
            return;
        }
        let slot = c.wr_id as usize;
        // SAFETY: the receive of `slot` completed and the slot is posted again only below, so
        // the NIC no longer writes it and nobody else reads it.
        let bytes = unsafe {
            ctl.recv
                .buf
                .read(slot * FRAME, (c.byte_len as usize).min(FRAME))
        };
        (self.events)(Note::Control(bytes));
        if let Err(e) = ctl.post_recv(slot) {
            if !ctl.failed.swap(true, Ordering::SeqCst) {
                (self.events)(Note::ControlClosed(format!("re-posting a receive: {e}")));
            }
        }
    }
}

fn spawn_poller(
    cq: Arc<Cq>,
    shared: Arc<Shared>,
    handle: fn(&Shared, &Completion),
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut wcs = Vec::with_capacity(64);
        loop {
            // Drain fully before sleeping: the CQ is armed, so a completion that arrives after
            // the last poll wakes the wait.
            loop {
                wcs.clear();
                if let Err(e) = cq.poll(&mut wcs, 64) {
                    (shared.events)(Note::ControlClosed(format!("polling completions: {e}")));
                    return;
                }
                for c in &wcs {
                    handle(&shared, c);
                }
                if wcs.len() < 64 {
                    break;
                }
            }
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = cq.wait(Duration::from_millis(100)) {
                (shared.events)(Note::ControlClosed(format!("waiting for completions: {e}")));
                return;
            }
        }
    })
}

/// Device, queues, control queue pair and pollers of one side.
struct Base {
    dev: Arc<Device>,
    scq: Arc<Cq>,
    shared: Arc<Shared>,
    pollers: Vec<JoinHandle<()>>,
}

impl Base {
    fn new(dev: Arc<Device>, window: u16, channels_max: u32, events: Sink) -> io::Result<Base> {
        let scq = Cq::new(
            &dev,
            (CONTROL_SEND_SLOTS as u32 + channels_max * DATA_SQ_DEPTH) as i32,
        )?;
        let rcq = Cq::new(&dev, window.max(1) as i32)?;
        let control = Control::new(&dev, &scq, &rcq, window)?;
        let shared = Arc::new(Shared {
            control,
            data: RwLock::new(HashMap::new()),
            events,
            stop: AtomicBool::new(false),
        });
        let pollers = vec![
            spawn_poller(scq.clone(), shared.clone(), Shared::on_send),
            spawn_poller(rcq, shared.clone(), Shared::on_recv),
        ];
        Ok(Base {
            dev,
            scq,
            shared,
            pollers,
        })
    }

    fn stop(&mut self) {
        self.shared.control.drain(Duration::from_secs(2));
        self.shared.stop.store(true, Ordering::SeqCst);
        for p in self.pollers.drain(..) {
            let _ = p.join();
        }
        self.shared.control.qp.set_error();
        for d in self.shared.data.read().unwrap().values() {
            d.qp.set_error();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Source side

/// A sink that turns the pollers' notes into source events.
fn source_sink(tx: Sender<SrcEvent>) -> Sink {
    let tx = Mutex::new(tx);
    Box::new(move |n| {
        let e = match n {
            Note::Control(b) => SrcEvent::Control(b),
            Note::ControlClosed(w) => SrcEvent::ControlClosed(w),
            Note::WriteDone(id) => SrcEvent::WriteDone(id),
            Note::DataFailed(ch, w) => SrcEvent::DataLost(ch, w),
        };
        let _ = tx.lock().unwrap().send(e);
    })
}

/// Joins in progress and done: the bootstrap watcher starts once every join has its answer.
#[derive(Default)]
struct Joins {
    started: usize,
    done: usize,
}

/// The source's end: control queue pair, data queue pairs opened when the machine asks, and
/// its memory registered whole for local read.
pub struct SourceVerbs {
    base: Base,
    boot: Arc<Mutex<TcpStream>>,
    events: Sender<SrcEvent>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    mrs: Vec<Mr>,
    channels: Arc<RwLock<HashMap<u8, Arc<DataQp>>>>,
    joins: Arc<Mutex<Joins>>,
}

impl SourceVerbs {
    /// Connects the bootstrap TCP connection to `addr` and the control queue pair over it.
    pub fn connect(
        addr: SocketAddr,
        blocks: Arc<Vec<Arc<RamBlock>>>,
        opts: &VerbsOptions,
        credit_window: u16,
        deadlines: Deadlines,
        tx: Sender<SrcEvent>,
    ) -> io::Result<Self> {
        let dev = open_device(opts)?;
        let mut mrs = Vec::new();
        for b in blocks.iter() {
            // Least privilege: the NIC only reads source memory (spec 5.3).
            mrs.push(Mr::on_block(
                &dev,
                b,
                0,
                b.len(),
                MrAccess::LocalRead,
                false,
            )?);
        }
        let base = Base::new(
            dev,
            credit_window,
            wire::MAX_CHANNELS as u32,
            source_sink(tx.clone()),
        )?;
        let mut boot = TcpStream::connect_timeout(&addr, deadlines.connect())?;
        crate::transport::tune(&boot, deadlines);
        boot.set_read_timeout(Some(deadlines.connect()))?;
        boot.write_all(&connect_msg(&base.shared.control.qp.endpoint()))?;
        let remote = read_connect(&mut boot)?;
        base.shared.control.qp.connect(&remote)?;
        Ok(SourceVerbs {
            base,
            boot: Arc::new(Mutex::new(boot)),
            events: tx,
            blocks,
            mrs,
            channels: Arc::new(RwLock::new(HashMap::new())),
            joins: Arc::new(Mutex::new(Joins::default())),
        })
    }
}

/// How long a closed bootstrap connection waits before it counts as a failure: a destination
/// that ends normally drains its control sends first (STARTED is then already in our receive
/// queue), so the frame is delivered before the closure is reported.
const BOOTSTRAP_GRACE: Duration = Duration::from_millis(500);

/// After the data channels joined, the destination sends nothing more on the bootstrap
/// connection; its end closes when its process or host goes. Reporting that at once detects a
/// dead destination even when no work request is outstanding to time out (an idle queue pair
/// never learns its peer is gone).
fn watch_bootstrap(boot: &TcpStream, events: Sender<SrcEvent>) -> io::Result<()> {
    let mut watch = boot.try_clone()?;
    watch.set_read_timeout(None)?;
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let why = match watch.read(&mut b) {
            Ok(0) => "closed".to_string(),
            Ok(_) => "carried unexpected bytes".to_string(),
            Err(e) => e.to_string(),
        };
        std::thread::sleep(BOOTSTRAP_GRACE);
        let _ = events.send(SrcEvent::ControlClosed(format!(
            "bootstrap connection {why}: destination gone"
        )));
    });
    Ok(())
}

impl SourceLink for SourceVerbs {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        self.base.shared.control.send(frame)
    }

    /// Sends JOIN for the channel on the bootstrap connection and connects its queue pair
    /// once the destination answers with its endpoint (spec: AUTH-6, LIVE-4: the answer
    /// comes within the bootstrap read timeout).
    fn open_data(&mut self, hello: DataHello) -> io::Result<()> {
        let ch = hello.channel;
        let qp = Qp::new(
            &self.base.dev,
            &self.base.scq,
            &self.base.scq,
            DATA_SQ_DEPTH,
            1,
            QpAccess::None,
            random_psn(),
        )?;
        self.joins.lock().unwrap().started += 1;
        let (boot, events, shared) = (
            self.boot.clone(),
            self.events.clone(),
            self.base.shared.clone(),
        );
        let (channels, joins) = (self.channels.clone(), self.joins.clone());
        std::thread::spawn(move || {
            let join = join_msg(&hello, &qp.endpoint());
            let r = {
                let mut b = boot.lock().unwrap();
                b.write_all(&join).and_then(|_| read_connect(&mut b))
            }
            .and_then(|remote| qp.connect(&remote).map(|_| ()));
            let e = match r {
                Ok(()) => {
                    let d = Arc::new(DataQp {
                        channel: ch,
                        qp,
                        window: Mutex::new(SendWindow::default()),
                        room: Condvar::new(),
                    });
                    shared.data.write().unwrap().insert(d.qp.num(), d.clone());
                    channels.write().unwrap().insert(ch, d);
                    SrcEvent::DataOpened(ch)
                }
                Err(e) => {
                    SrcEvent::DataLost(ch, format!("destination refused data channel {ch}: {e}"))
                }
            };
            let _ = events.send(e);
            let mut j = joins.lock().unwrap();
            j.done += 1;
            if j.done == j.started {
                if let Err(e) = watch_bootstrap(&boot.lock().unwrap(), events.clone()) {
                    tracing::warn!("watching the bootstrap connection: {e}");
                }
            }
        });
        Ok(())
    }

    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()> {
        let d = self
            .channels
            .read()
            .unwrap()
            .get(&channel)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "data channel not open"))?;
        let block = self
            .blocks
            .get(w.block as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such block"))?;
        if w.offset.checked_add(w.len).is_none_or(|e| e > block.len()) || w.len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write outside the block",
            ));
        }
        let parts = pieces(w.len);
        let n = parts.len() as u32;
        if n > DATA_SQ_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write larger than a send queue",
            ));
        }
        let base = block.as_ptr().wrapping_add(w.offset as usize);
        let wrs: Vec<SendWr> = parts
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| SendWr {
                wr_id: w.wr_id,
                addr: base.wrapping_add(off as usize),
                len,
                signalled: i + 1 == parts.len(),
                write: Some((w.remote_offset + off, w.rkey)),
            })
            .collect();
        let deadline = Instant::now() + POST_WAIT;
        let mut win = d.window.lock().unwrap();
        if win.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "data channel failed",
            ));
        }
        while !win.has_room(n, DATA_SQ_DEPTH) {
            if win.failed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "data channel failed",
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // No completion for that long: the channel is dead; later posts fail at once
                // instead of each waiting again.
                win.failed = true;
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "data send queue stayed full",
                ));
            }
            win = d.room.wait_timeout(win, left).unwrap().0;
        }
        // Accounted before posting, under the lock, so the completion always finds it.
        win.posted(w.wr_id, n);
        // SAFETY: the ranges are source memory inside the block's region (checked by
        // post_send). The workload may write them while the NIC reads: that is the protocol's
        // premise (the page is dirty and resent, spec section 11), and no Rust reference into
        // the mapping exists.
        let r = unsafe { d.qp.post_send(&self.mrs[w.block as usize], &wrs) };
        if r.is_err() {
            win.inflight.pop_back();
            win.used -= n;
        }
        r
    }

    fn shutdown(&mut self) {
        self.base.stop();
        let _ = self.boot.lock().unwrap().shutdown(Shutdown::Both);
    }

    fn name(&self) -> &'static str {
        "rdma"
    }
}

// ---------------------------------------------------------------------------------------------
// Destination side

/// The control channel's connection id at the listener.
const CONTROL_CONN: ConnId = 1;

/// A sink that turns the pollers' notes into destination events.
fn destination_sink(tx: Sender<DstEvent>) -> Sink {
    let tx = Mutex::new(tx);
    Box::new(move |n| {
        let e = match n {
            Note::Control(b) => DstEvent::Frame(CONTROL_CONN, b),
            Note::ControlClosed(w) => DstEvent::Closed(CONTROL_CONN, w),
            // The destination posts no writes.
            Note::WriteDone(_) | Note::DataFailed(..) => return,
        };
        let _ = tx.lock().unwrap().send(e);
    })
}

/// The listener's decisions on the joins waiting for one, by connection id.
type Decisions = Arc<Mutex<HashMap<ConnId, mpsc::SyncSender<bool>>>>;

/// The destination's end: control queue pair, a bootstrap thread that takes data queue pairs
/// through the listener machine's admission, and memory registrations per key.
pub struct DestVerbs {
    base: Base,
    boot: Arc<Mutex<Option<TcpStream>>>,
    blocks: Arc<Vec<Arc<RamBlock>>>,
    decisions: Decisions,
    data_qps: Arc<Mutex<Vec<Qp>>>,
    regs: HashMap<u32, Mr>,
}

impl DestVerbs {
    /// Opens the device (so a missing device fails at once) and starts accepting bootstrap
    /// connections on `listener`: each is read on its own thread within the handshake
    /// deadline, and the first valid CONNECT connects the control queue pair.
    pub fn listen(
        listener: TcpListener,
        blocks: Arc<Vec<Arc<RamBlock>>>,
        opts: &VerbsOptions,
        credit_window: u16,
        deadlines: Deadlines,
        tx: Sender<DstEvent>,
    ) -> io::Result<Self> {
        let dev = open_device(opts)?;
        let base = Base::new(dev, credit_window, 0, destination_sink(tx.clone()))?;
        let boot: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
        let decisions: Decisions = Arc::new(Mutex::new(HashMap::new()));
        let data_qps = Arc::new(Mutex::new(Vec::new()));
        let bound = Arc::new(AtomicBool::new(false));
        {
            let shared = base.shared.clone();
            let (dev, scq) = (base.dev.clone(), base.scq.clone());
            let (boot, decisions, data_qps) = (boot.clone(), decisions.clone(), data_qps.clone());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    let Ok(s) = s else { continue };
                    if bound.load(Ordering::SeqCst) {
                        let _ = s.shutdown(Shutdown::Both);
                        continue;
                    }
                    let (shared, bound, tx) = (shared.clone(), bound.clone(), tx.clone());
                    let (dev, scq) = (dev.clone(), scq.clone());
                    let (boot, decisions, data_qps) =
                        (boot.clone(), decisions.clone(), data_qps.clone());
                    std::thread::spawn(move || {
                        let b = Bootstrap {
                            shared,
                            dev,
                            scq,
                            decisions,
                            data_qps,
                            events: tx,
                            deadlines,
                        };
                        b.serve(s, &bound, &boot)
                    });
                }
            });
        }
        Ok(DestVerbs {
            base,
            boot,
            blocks,
            decisions,
            data_qps,
            regs: HashMap::new(),
        })
    }

    pub fn registered(&self) -> usize {
        self.regs.len()
    }
}

/// What a bootstrap connection's thread needs.
struct Bootstrap {
    shared: Arc<Shared>,
    dev: Arc<Device>,
    scq: Arc<Cq>,
    decisions: Decisions,
    data_qps: Arc<Mutex<Vec<Qp>>>,
    events: Sender<DstEvent>,
    deadlines: Deadlines,
}

impl Bootstrap {
    /// Reads CONNECT within the handshake deadline; the first connection to do so connects
    /// the control queue pair, then carries the joins.
    fn serve(self, mut s: TcpStream, bound: &AtomicBool, slot: &Mutex<Option<TcpStream>>) {
        crate::transport::tune(&s, self.deadlines);
        let _ = s.set_read_timeout(Some(self.deadlines.connect()));
        let Ok(remote) = read_connect(&mut s) else {
            let _ = s.shutdown(Shutdown::Both);
            return;
        };
        if bound.swap(true, Ordering::SeqCst) {
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        let ctl = &self.shared.control.qp;
        // Ready to receive before the source learns our endpoint, and the connection reported
        // accepted before that too: its first frame (HELLO) can complete on the poller thread
        // as soon as the source has our endpoint, and the listener must already know the
        // connection (an input for an unknown connection closes it).
        if let Err(e) = ctl.connect(&remote) {
            tracing::warn!("connecting the control queue pair: {e}");
            return;
        }
        if self
            .events
            .send(DstEvent::Accepted(CONTROL_CONN, None))
            .is_err()
        {
            return;
        }
        if let Err(e) = s.write_all(&connect_msg(&ctl.endpoint())) {
            let _ = self
                .events
                .send(DstEvent::Closed(CONTROL_CONN, e.to_string()));
            return;
        }
        if let Ok(c) = s.try_clone() {
            *slot.lock().unwrap() = Some(c);
        }
        self.joins(s);
    }

    /// JOINs on the bootstrap connection, each through the listener's admission (spec:
    /// AUTH-6): a refused or unanswered join closes the connection.
    fn joins(&self, mut s: TcpStream) {
        let mut next: ConnId = 100;
        loop {
            let mut m = [0u8; JOIN_LEN];
            let _ = s.set_read_timeout(None);
            if s.read_exact(&mut m[..1]).is_err() {
                return;
            }
            let _ = s.set_read_timeout(Some(self.deadlines.frame()));
            if s.read_exact(&mut m[1..]).is_err() {
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            let conn = next;
            next += 1;
            let (hello, ep) = split_join(&m);
            let (tx, rx) = mpsc::sync_channel(1);
            self.decisions.lock().unwrap().insert(conn, tx);
            let sent = self.events.send(DstEvent::Accepted(conn, None)).is_ok()
                && self.events.send(DstEvent::DataHello(conn, hello)).is_ok();
            let admitted = sent
                && rx.recv_timeout(self.deadlines.connect()) == Ok(true)
                && decode_endpoint(&ep).is_some();
            self.decisions.lock().unwrap().remove(&conn);
            if !admitted {
                tracing::warn!("refused a data channel that did not prove the session key");
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            let remote = decode_endpoint(&ep).expect("checked above");
            let r = Qp::new(
                &self.dev,
                &self.scq,
                &self.scq,
                1,
                1,
                QpAccess::RemoteWrite,
                random_psn(),
            )
            .and_then(|qp| {
                qp.connect(&remote)?;
                s.write_all(&connect_msg(&qp.endpoint()))?;
                Ok(qp)
            });
            match r {
                Ok(qp) => self.data_qps.lock().unwrap().push(qp),
                Err(e) => {
                    tracing::warn!("creating a data queue pair: {e}");
                    let _ = s.shutdown(Shutdown::Both);
                    let _ = self.events.send(DstEvent::Closed(conn, e.to_string()));
                    return;
                }
            }
        }
    }
}

impl DestLink for DestVerbs {
    fn send(&mut self, conn: ConnId, frame: &[u8]) -> io::Result<()> {
        if conn != CONTROL_CONN {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "only the control channel carries frames",
            ));
        }
        self.base.shared.control.send(frame)
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(d) = self.decisions.lock().unwrap().remove(&conn) {
            let _ = d.try_send(false);
        }
    }

    fn admit(&mut self, conn: ConnId, _channel: u8) -> io::Result<()> {
        let d = self
            .decisions
            .lock()
            .unwrap()
            .remove(&conn)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "join gone"))?;
        d.try_send(true)
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "join gone"))
    }

    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32> {
        let b = self
            .blocks
            .get(block as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such block"))?;
        let mr = Mr::on_block(&self.base.dev, b, offset, len, MrAccess::RemoteWrite, true)?;
        let key = mr.rkey();
        if self.regs.contains_key(&key) {
            return Err(io::Error::other(
                "device returned a remote key already in use",
            ));
        }
        self.regs.insert(key, mr);
        Ok(key)
    }

    fn unregister(&mut self, key: u32) -> bool {
        // Dropping deregisters: no write under the key lands after this returns.
        self.regs.remove(&key).is_some()
    }

    fn shutdown(&mut self) {
        self.regs.clear();
        self.base.stop();
        for qp in self.data_qps.lock().unwrap().iter() {
            qp.set_error();
        }
        if let Some(b) = self.boot.lock().unwrap().as_ref() {
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn name(&self) -> &'static str {
        "rdma"
    }
}

/// Text for `rdmig devices`.
pub fn describe_devices(devs: &[DeviceInfo]) -> String {
    let mut s = String::new();
    for d in devs {
        for p in &d.ports {
            s.push_str(&format!(
                "{} port {}: {} ({}, lid {}, mtu {})\n",
                d.name,
                p.num,
                p.state,
                if p.ethernet { "Ethernet" } else { "InfiniBand" },
                p.lid,
                128u32 << p.active_mtu.clamp(1, 5),
            ));
            for g in &p.gids {
                let kind = match g.gid_type {
                    0 => "IB",
                    1 => "RoCE v1",
                    2 => "RoCE v2",
                    _ => "?",
                };
                let addr = std::net::Ipv6Addr::from(g.gid);
                let v4 = if is_ipv4_mapped(&g.gid) {
                    format!(" ({})", addr.to_ipv4_mapped().expect("mapped"))
                } else {
                    String::new()
                };
                s.push_str(&format!("  gid {:>3} {kind:<7} {addr}{v4}\n", g.index));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gid(v4: Option<[u8; 4]>) -> [u8; 16] {
        let mut g = [0u8; 16];
        match v4 {
            Some(a) => {
                g[10] = 0xff;
                g[11] = 0xff;
                g[12..].copy_from_slice(&a);
            }
            None => {
                g[0] = 0xfe;
                g[1] = 0x80;
                g[15] = 1;
            }
        }
        g
    }

    fn dev(active: bool, ethernet: bool) -> DeviceInfo {
        let g = |index, gid_type, v4| GidInfo {
            port: 1,
            index,
            gid: gid(v4),
            gid_type,
        };
        DeviceInfo {
            name: "rxe0".into(),
            ports: vec![PortInfo {
                num: 1,
                active,
                state: if active { "active" } else { "down" }.into(),
                ethernet,
                lid: 0,
                active_mtu: 3,
                gids: vec![
                    g(0, 1, None),
                    g(1, 2, None),
                    g(2, 1, Some([10, 0, 2, 15])),
                    g(3, 2, Some([10, 0, 2, 15])),
                ],
            }],
        }
    }

    #[test]
    fn default_gid_is_the_ipv4_mapped_roce_v2_entry() {
        assert_eq!(choose_port(&dev(true, true), None), Ok((1, 3)));
        assert_eq!(choose_port(&dev(true, true), Some(1)), Ok((1, 1)));
        assert!(choose_port(&dev(true, true), Some(9)).is_err());
        assert!(choose_port(&dev(false, true), None).is_err());
        assert_eq!(choose_port(&dev(true, false), None), Ok((1, 0)));
        let mut d = dev(true, true);
        d.ports[0].gids.retain(|g| g.gid_type != 2);
        assert!(choose_port(&d, None).unwrap_err().contains("--gid-index"));
    }

    #[test]
    fn endpoint_roundtrip_and_checks() {
        let e = Endpoint {
            qpn: 0x11,
            psn: 0xabcdef,
            lid: 7,
            mtu: 3,
            gid: gid(Some([10, 0, 2, 15])),
        };
        assert_eq!(decode_endpoint(&encode_endpoint(&e)), Some(e));
        let mut b = encode_endpoint(&e);
        b[11] = 1;
        assert_eq!(decode_endpoint(&b), None);
        let mut b = encode_endpoint(&e);
        b[10] = 9;
        assert_eq!(decode_endpoint(&b), None);
        let mut b = encode_endpoint(&e);
        b[7] = 1;
        assert_eq!(decode_endpoint(&b), None, "PSN is 24 bits");
    }

    #[test]
    fn writes_split_with_only_the_last_piece_signalled() {
        assert_eq!(pieces(4096), vec![(0, 4096)]);
        let p = pieces(MAX_PIECE * 2 + 1);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], (MAX_PIECE * 2, 1));
        assert_eq!(p.iter().map(|x| x.1 as u64).sum::<u64>(), MAX_PIECE * 2 + 1);
    }

    #[test]
    fn send_window_completes_in_order_and_respects_depth() {
        let mut w = SendWindow::default();
        assert!(w.has_room(4, 4));
        w.posted(10, 3);
        w.posted(11, 1);
        assert!(!w.has_room(1, 4));
        assert_eq!(w.completed(11), Err(11), "not the oldest");
        assert_eq!(w.completed(10), Ok(()));
        assert!(w.has_room(3, 4));
        assert_eq!(w.completed(11), Ok(()));
        assert_eq!(w.outstanding(), 0);
        w.posted(12, 2);
        assert!(w.errored());
        assert!(!w.errored(), "reported once");
        assert_eq!(w.outstanding(), 0);
    }

    #[test]
    fn ipv4_mapped() {
        assert!(is_ipv4_mapped(&gid(Some([1, 2, 3, 4]))));
        assert!(!is_ipv4_mapped(&gid(None)));
    }

    /// On a machine without RDMA (this one: the kernel has none) opening fails with the
    /// message users see, never a panic.
    #[test]
    fn no_device_is_a_clean_error() {
        if std::path::Path::new("/sys/class/infiniband").exists() {
            return;
        }
        let e = open_device(&VerbsOptions::default())
            .err()
            .expect("no device here");
        assert!(e.to_string().contains("no RDMA device found"), "{e}");
        assert!(list_devices().map_or(true, |d| d.is_empty()));
    }
}
