//! The destination driver: runs the listener machine (and the session it binds) over a
//! transport, the destination memory and the workload.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdmig_model::destination::{DstCommand, DstInput};
use rdmig_model::listener::{ConnId, LsnCommand, LsnInput, LsnOut};
use rdmig_model::wire::{self, DataHello, DigestAlg};
use rdmig_model::*;

use super::{wait, Clock, Wake};
use crate::memory::digest_cache::{all_digests, DigestCache};
use crate::memory::ram::RamBlock;
use crate::report::{PhaseReport, Report, Status};
use crate::transport::{DestLink, DstEvent};
use crate::vmm::control::{DestWorkload, StateConsumer};

/// Everything the destination driver needs besides the transport.
pub struct DestRun {
    pub cfg: ListenerConfig,
    /// The RAM blocks (what digests cover).
    pub blocks: Arc<Vec<Arc<RamBlock>>>,
    pub workload: DestWorkload,
    /// Where the device state goes as it arrives (spec: STATE-4).
    pub state: StateConsumer,
    /// The staging area for device state sent over the data channels: the transport's block
    /// after the RAM blocks, at least `cfg.session.state_capacity` bytes (spec: STATE-2).
    pub state_area: Option<Arc<RamBlock>>,
    pub threads: usize,
}

/// Memory left free beside a staging area the destination grows (spec: STATE-2).
const STAGING_MARGIN: u64 = 256 << 20;

/// Whether the staging area may take `grow` more bytes with `free` bytes available (unknown:
/// yes), leaving `STAGING_MARGIN` for everything else.
fn staging_fits(grow: u64, free: Option<u64>) -> bool {
    free.is_none_or(|f| {
        grow.checked_add(STAGING_MARGIN)
            .is_some_and(|need| f >= need)
    })
}

/// Bytes of memory the kernel can give without swapping (`MemAvailable`), if known.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// How long the driver lets the source read the last frame and close its end before it shuts
/// every connection (a close with unread data would reset the connection).
const LINGER: Duration = Duration::from_secs(1);

fn fresh_nonce() -> [u8; wire::NONCE_LEN] {
    let mut n = [0u8; wire::NONCE_LEN];
    getrandom::fill(&mut n).expect("the OS random source is available");
    n
}

fn to_input(e: DstEvent) -> LsnInput {
    match e {
        // spec: AUTH-1: every connection that may start a session gets a fresh nonce.
        DstEvent::Accepted(conn, binding) => LsnInput::Accepted {
            conn,
            nonce: fresh_nonce(),
            binding,
        },
        DstEvent::Frame(conn, bytes) => {
            let frame = wire::decode(&bytes);
            if let Err(e) = &frame {
                tracing::warn!("connection {conn}: malformed control frame: {e}");
            }
            LsnInput::Frame { conn, frame }
        }
        DstEvent::DataHello(conn, b) => LsnInput::DataHello {
            conn,
            hello: DataHello::decode(&b),
        },
        DstEvent::Closed(conn, why) => {
            tracing::debug!("connection {conn} ended: {why}");
            LsnInput::Closed { conn }
        }
        DstEvent::Signal(sig) => {
            tracing::warn!("signal {sig}: cancelling the migration");
            LsnInput::Cancel
        }
    }
}

struct Driver<L: DestLink> {
    link: L,
    run: DestRun,
    pending: VecDeque<LsnInput>,
    /// The session's parameters, once negotiated.
    params: Option<wire::Params>,
    /// Connections accepted and not yet closed, to check the transport's event order.
    open: HashSet<ConnId>,
    /// When the driver started (the listener's clock counts from here too).
    t0: Instant,
    /// Local work timed by the driver, in order.
    timeline: Vec<PhaseReport>,
    /// Chunk digests kept current as data lands, when digests are negotiated.
    digests: Option<Arc<DigestCache>>,
    /// The digests of received memory the last verification compared.
    verified: Option<Vec<u64>>,
    /// The staging area's registered end so far: memory the state may take (spec: STATE-2).
    staged: u64,
    /// The staging area is being faulted in ahead of the device state (once per session).
    populating: bool,
}

impl<L: DestLink> Driver<L> {
    /// Once the parameters are agreed, with digests: a cache the transport keeps current as
    /// data lands, so verification digests only what it must (spec: SW-5).
    fn start_digest_cache(&mut self, p: wire::Params) {
        if self.params.is_some() || p.digest == DigestAlg::None {
            return;
        }
        let c = Arc::new(DigestCache::new(&self.run.blocks, p.digest, p.chunk_log2));
        // Only a cache every landing write goes through; else all memory is digested.
        if self.link.set_digest_cache(c.clone()) {
            self.digests = Some(c);
        }
    }

    /// Runs `f` and records it as phase `name`; at the destination everything after the
    /// final round is inside the source's downtime.
    fn timed<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        let start = self.t0.elapsed().as_millis() as u64;
        let t = Instant::now();
        let r = f(self);
        let ms = t.elapsed().as_millis() as u64;
        tracing::info!("{name} took {ms} ms");
        self.timeline.push(PhaseReport {
            name: name.to_string(),
            start_ms: start,
            duration_ms: ms,
            downtime: true,
        });
        r
    }

    /// The transport reports `Accepted` before anything else of a connection (see
    /// [`DstEvent`]); an event of a connection it never reported is a transport bug, which
    /// the listener would answer by closing a legitimate connection.
    fn check_order(&mut self, e: &DstEvent) {
        let conn = match *e {
            DstEvent::Accepted(c, _) => {
                self.open.insert(c);
                return;
            }
            DstEvent::Closed(c, _) => {
                self.open.remove(&c);
                return;
            }
            DstEvent::Frame(c, _) | DstEvent::DataHello(c, _) => c,
            DstEvent::Signal(_) => return,
        };
        if !self.open.contains(&conn) {
            tracing::error!("transport bug: an event of connection {conn} before its accept");
            debug_assert!(false, "event of connection {conn} before its accept");
        }
    }
}

impl<L: DestLink> Driver<L> {
    /// The staging area may grow to `end` bytes: refused when the memory it would take is
    /// not available (with a margin), so a large device state fails cleanly at registration,
    /// before the source commits, rather than the process running out of memory (spec:
    /// STATE-2).
    fn stage(&mut self, end: u64) -> bool {
        if end <= self.staged {
            return true;
        }
        let grow = end - self.staged;
        let free = mem_available();
        if !staging_fits(grow, free) {
            tracing::error!(
                "no memory for the device state's staging area: {grow} more bytes needed, {} available",
                free.unwrap_or(0)
            );
            return false;
        }
        self.staged = end;
        true
    }

    /// Once the session's state area is known (its block table accepted, long before the
    /// switchover): faults the staging area in on a thread of its own, so the device state
    /// lands in memory that costs no page faults inside the downtime. Only when the memory is
    /// there to spare; otherwise pages are taken as the state lands.
    fn populate_staging(&mut self, area: u64) {
        if self.populating || area == 0 {
            return;
        }
        self.populating = true;
        let Some(block) = self.run.state_area.clone() else {
            return;
        };
        if mem_available().is_some_and(|free| free < area + STAGING_MARGIN) {
            tracing::info!("not pre-faulting the {area}-byte staging area: memory is short");
            return;
        }
        self.staged = self.staged.max(area);
        std::thread::spawn(move || {
            let t = Instant::now();
            match block.populate(area) {
                Ok(()) => tracing::info!(
                    "staging area of {area} bytes faulted in ({} ms)",
                    t.elapsed().as_millis()
                ),
                Err(e) => tracing::info!("pre-faulting the staging area: {e}"),
            }
        });
    }

    /// Hands the device state's newly placed bytes, `[fed, upto)` of the staging area, to the
    /// consumer in order (spec: STATE-4).
    fn feed_state(&mut self, upto: u64) {
        if !self.run.state.wants_bytes() {
            return self.run.state.skip_to(upto);
        }
        let Some(area) = self.run.state_area.clone() else {
            tracing::error!("device state placed without a staging area");
            return;
        };
        let mut buf = vec![0u8; (1usize << 20).min((upto - self.run.state.len()) as usize)];
        while self.run.state.len() < upto {
            let at = self.run.state.len();
            let n = buf.len().min((upto - at) as usize);
            area.read(at, &mut buf[..n]);
            self.run.state.append(&buf[..n]);
        }
    }

    fn exec(&mut self, c: LsnCommand) {
        match c {
            LsnCommand::Send { conn, frame } => {
                let bytes = wire::encode_to_vec(&frame).expect("machines send valid frames");
                if let Err(e) = self.link.send(conn, &bytes) {
                    tracing::info!("connection {conn}: send failed: {e}");
                    self.pending.push_back(LsnInput::Closed { conn });
                }
            }
            LsnCommand::Close { conn } => self.link.close(conn),
            LsnCommand::Admit { conn, channel } => {
                tracing::info!("data channel {channel} joined (connection {conn})");
                if let Err(e) = self.link.admit(conn, channel) {
                    tracing::info!("connection {conn}: admitting it failed: {e}");
                    self.pending.push_back(LsnInput::Closed { conn });
                }
            }
            LsnCommand::Session(c) => self.exec_session(c),
            LsnCommand::Finish(Outcome::Aborted(_)) => self.run.state.discard(),
            LsnCommand::Finish(_) => {}
        }
    }

    fn local(&mut self, i: DstInput) {
        self.pending.push_back(LsnInput::Local(i));
    }

    fn exec_session(&mut self, c: DstCommand) {
        match c {
            DstCommand::Register {
                target,
                block,
                offset,
                len,
            } if block as usize == self.run.blocks.len() && !self.stage(offset + len) => {
                self.local(DstInput::RegisterFailed { target });
            }
            DstCommand::Register {
                target,
                block,
                offset,
                len,
            } => match self.link.register(block, offset, len) {
                Ok(rkey) => self.local(DstInput::Registered { target, rkey }),
                Err(e) => {
                    tracing::error!("registering {len} bytes of block {block}: {e}");
                    self.local(DstInput::RegisterFailed { target });
                }
            },
            DstCommand::Unregister { rkey, .. } => {
                self.link.unregister(rkey);
            }
            DstCommand::ZeroFill { block, offset, len } => {
                let b = block as usize;
                let ticket = self.digests.as_ref().map(|c| c.begin(b, offset, len));
                self.run.blocks[b].zero(offset, len);
                if let (Some(c), Some(t)) = (&self.digests, ticket) {
                    c.end_zero(t);
                }
            }
            DstCommand::StoreDeviceState { offset, data } => {
                debug_assert_eq!(offset as u64, self.run.state.len(), "in order (SW-3)");
                self.run.state.append(&data)
            }
            DstCommand::FeedState { upto } => self.feed_state(upto),
            DstCommand::FinishState { len } => {
                let r = self.timed("device state: the consumer finishes loading it", |d| {
                    d.run.state.finish()
                });
                match r {
                    Ok(digest) => {
                        tracing::info!("device state: {len} bytes taken by its consumer");
                        self.local(DstInput::StateLoaded { digest })
                    }
                    Err(e) => {
                        tracing::error!("device state refused: {e}");
                        self.local(DstInput::StateFailed)
                    }
                }
            }
            DstCommand::ComputeDigests => {
                let log2 = self.params.map_or(20, |p| p.chunk_log2);
                let alg = self.params.map_or(DigestAlg::Xxh3_64, |p| p.digest);
                let d = self.timed("digests of received memory", |d| match &d.digests {
                    Some(c) if c.chunk_log2() == log2 && c.alg() == alg => {
                        let (v, computed) = c.digests(&d.run.blocks, d.run.threads);
                        tracing::info!(
                            "digests of {} chunks: {computed} pages or chunks hashed now, the rest kept as data landed",
                            v.len()
                        );
                        v
                    }
                    _ => all_digests(&d.run.blocks, alg, log2, d.run.threads),
                });
                self.verified = Some(d.clone());
                self.local(DstInput::Digests(d));
            }
            DstCommand::StartWorkload => {
                let started = self.timed("start the workload", |d| {
                    d.run.state.commit()?;
                    d.run
                        .workload
                        .start(d.run.state.data(), d.verified.as_deref())
                        .map_err(|e| e.to_string())
                });
                match started {
                    Ok(()) => self.local(DstInput::WorkloadStarted),
                    Err(e) => {
                        tracing::error!("starting the workload: {e}");
                        self.local(DstInput::WorkloadFailed);
                    }
                }
            }
            // The listener turns the session's frames and outcome into its own commands.
            DstCommand::Send(_) | DstCommand::Finish(_) => {}
        }
    }
}

/// Runs the listening destination to its outcome over any transport: until the session it
/// binds ends, or the operator cancels.
pub fn run_destination(link: impl DestLink, rx: Receiver<DstEvent>, run: DestRun) -> Report {
    let clock = Clock::new();
    let memory: u64 = run.blocks.iter().map(|b| b.len()).sum();
    let mut lsn = Listener::new(run.cfg.clone()).expect("configuration validated by the caller");
    let mut d = Driver {
        link,
        run,
        pending: VecDeque::new(),
        params: None,
        open: HashSet::new(),
        t0: Instant::now(),
        timeline: Vec::new(),
        digests: None,
        verified: None,
        staged: 0,
        populating: false,
    };
    let mut out = LsnOut::new();
    while lsn.outcome().is_none() {
        let input = match d.pending.pop_front() {
            Some(i) => i,
            None => match wait(&rx, &clock, lsn.timers().next()) {
                Wake::Event(e) => {
                    d.check_order(&e);
                    to_input(e)
                }
                Wake::Timer(k) => LsnInput::Timer(k),
                Wake::Gone => LsnInput::Cancel,
            },
        };
        lsn.handle(clock.now(), input, &mut out);
        if let Some(p) = lsn.session().and_then(|s| s.params()) {
            // Once, when the parameters are first agreed.
            d.start_digest_cache(p);
            d.run.state.set_digest(p.digest != DigestAlg::None);
            d.params = Some(p);
        }
        if let Some(area) = lsn.session().map(|s| s.state_area()) {
            d.populate_staging(area);
        }
        for c in std::mem::take(&mut out.cmds) {
            d.exec(c);
        }
    }
    // The session's control connection was closed for sending after its last frame: let the
    // source read it and hang up first.
    let session = lsn.session_conn();
    let until = Instant::now() + LINGER;
    while let Some(conn) = session {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(DstEvent::Closed(c, _)) if c == conn => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    d.link.shutdown();
    let total = clock.now();
    report(&lsn, &out.stats, &d, memory, total)
}

fn report<L: DestLink>(
    lsn: &Listener,
    st: &rdmig_model::destination::DestStats,
    d: &Driver<L>,
    memory: u64,
    total_ms: Millis,
) -> Report {
    let params = d.params;
    let mut r = Report {
        role: "destination",
        transport: d.link.name(),
        channels: params.map_or(0, |p| p.channels),
        memory_bytes: memory,
        total_time_ms: total_ms,
        setup_time_ms: st.authenticated_ms.unwrap_or(0),
        chunks_registered: st.reg_chunks,
        chunks_evicted: st.unreg_chunks,
        rss_anon_bytes: crate::report::rss_anon(),
        ..Default::default()
    };
    r.set_outcome(lsn.outcome());
    r.verified =
        r.status == Status::Completed && params.is_some_and(|p| p.digest != DigestAlg::None);
    r.bytes.zero_pages = st.zero_pages;
    r.bytes.device_state = st.state_bytes;
    r.bytes.device_state_path = if d.run.state_area.is_some() && d.staged > 0 {
        "data channels"
    } else {
        "control channel"
    };
    r.bytes.control_frames = st.control_frames_received;
    r.phases = d.timeline.clone();
    let mut span = |name: &str, a: Option<Millis>, b: Option<Millis>, downtime: bool| {
        if let (Some(a), Some(b)) = (a, b) {
            r.phases.push(PhaseReport {
                name: name.to_string(),
                start_ms: a,
                duration_ms: b.saturating_sub(a),
                downtime,
            });
        }
    };
    span(
        "listening until the source proved its key",
        Some(0),
        st.authenticated_ms,
        false,
    );
    span(
        "receiving rounds",
        st.authenticated_ms,
        st.final_round_ms,
        false,
    );
    span(
        "device state and digests received",
        st.final_round_ms,
        st.prepare_ms,
        true,
    );
    span(
        "PREPARE to COMMIT (verification, vote)",
        st.prepare_ms,
        st.commit_ms,
        true,
    );
    r.phases.sort_by_key(|p| p.start_ms);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// spec: STATE-2: the staging area grows only into memory that is there, a margin left.
    #[test]
    fn state_2_the_staging_area_grows_only_into_available_memory() {
        assert!(staging_fits(1 << 30, Some((1 << 30) + STAGING_MARGIN)));
        assert!(!staging_fits(1 << 30, Some((1 << 30) + STAGING_MARGIN - 1)));
        assert!(!staging_fits(u64::MAX, Some(u64::MAX)));
        assert!(staging_fits(1 << 40, None), "unknown memory is not refused");
        let free = mem_available().expect("/proc/meminfo has MemAvailable");
        assert!(free > 0);
    }
}
