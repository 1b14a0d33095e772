//! One global state of the model: both machines and everything between and around them, and
//! what the environment observed on the way (for the properties).

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;

use rdmig_model::listener::{ConnId, Listener};
use rdmig_model::source::Source;
use rdmig_model::types::*;
use rdmig_model::wire::{self, DataHello, Message};
use rdmig_model::PageBitmap;

use crate::env::Nic;

/// One side of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Src,
    Dst,
}

/// A link between the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    Up,
    /// Failed loudly: both sides learn it (a reset, an error completion).
    Down,
    /// Silent: nothing crosses it any more, in either direction, and nobody is told (a cut
    /// cable, a dead host, a firewall dropping everything).
    Silent,
}

/// A request a machine issued to its driver that awaits an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SrcReq {
    Scan {
        all: bool,
    },
    Pause,
    DeviceState,
    /// The state area's device state: its first page, then the rest (spec: STATE-3).
    StateFirst,
    StateRest,
    Digests,
}

/// A request the destination issued to its driver that awaits an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DstReq {
    Register {
        target: RegTarget,
        block: u16,
        offset: u64,
        len: u64,
    },
    Digests,
    /// The consumer finishes taking the device state (spec: STATE-4).
    FinishState,
    Start,
}

/// A one-sided write on a data channel. It carries the page versions it read when posted:
/// the NIC reads source memory at some point before completion, and for a writer's bitmap log
/// the earliest point is the adversarial one (a late write then carries stale data); for a
/// content-hash log the latest is, and the write reads when it lands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Write {
    pub wr_id: u64,
    pub rkey: u32,
    pub remote_offset: u64,
    pub len: u64,
    pub data: Vec<u8>,
    /// With a content-hash dirty log: the source block and first page the write reads when
    /// it lands (`data` is then empty until it does).
    pub reads_at_landing: Option<(u16, u64)>,
}

/// One data channel: its link, the connection the listener admitted, the writes in flight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataChannel {
    pub link: Link,
    pub conn: Option<ConnId>,
    pub writes: VecDeque<Write>,
}

/// Whether a side has been told its connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notice {
    None,
    Pending,
    /// Delivered, or moot because the side has ended.
    Done,
}

/// A connection that is not the source's (spec: LIVE-4, LIVE-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stray {
    /// Connects and sends nothing.
    HalfOpen,
    /// Sends bytes that are no frame, then waits.
    Garbage,
    /// Replays the source's HELLO and waits (it cannot prove the key).
    ReplayHello,
    /// Sends a DATA_HELLO with a token it cannot have computed.
    BadDataHello,
    /// Replays the source's HELLO and hangs up.
    HelloThenClose,
}

/// A peer that sends well-formed frames of its own choosing besides the honest ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Adversary {
    Source,
    Destination,
}

/// The kind of input that ended the source in doubt (spec: INV-DOUBT-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    Frame,
    Malformed,
    WriteDone,
    WriteFailed,
    Driver,
    Timer,
    TransportFailed,
    Cancel,
    Start,
}

/// What the environment saw happen, for the properties. Determined by the path taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Observed {
    /// The source emitted COMMIT.
    pub commit_sent: bool,
    /// A COMMIT frame reached the destination (from the source, or a hostile one).
    pub commit_delivered: bool,
    /// The source's AUTH reached the destination (spec: AUTH-2).
    pub auth_delivered: bool,
    /// COMMIT left before the source relinquished its workload (spec: SW-6).
    pub commit_before_relinquish: bool,
    /// A STARTED frame reached the source.
    pub started_received: bool,
    /// The source sent an UNREG_REQUEST (an eviction).
    pub evicted: bool,
    /// A link went silent.
    pub silenced: bool,
    /// A stray connection was made.
    pub stray: bool,
    /// The guard resumed the workload of a dead source.
    pub guard_resumed: bool,
    /// What ended the source in doubt.
    pub doubt_cause: Option<Cause>,
    /// INV-MEM-1 verdict at the moment the destination workload started.
    pub memory_equal_at_start: Option<bool>,
    /// SW-8: a registration was still live when the destination workload started.
    pub registered_at_start: bool,
    /// FC-3: a frame spent the sender's last credit without granting any back.
    pub last_credit_misused: bool,
    /// INV-REG-1: the first write the NIC had to reject while it should not have happened.
    pub reg_violation: Option<&'static str>,
    /// AUTH-2: memory registered by something other than an authenticated session.
    pub unauthenticated_registration: bool,
    /// A command the driver could not carry out (frame that does not encode, range outside
    /// memory, a command for a connection that does not exist).
    pub driver_violation: Option<&'static str>,
    /// A machine panicked (a production assertion fired); the state is terminal.
    pub panic: Option<String>,
    /// STATE-3: the destination fed its consumer device state that was not placed.
    pub fed_unplaced: bool,
}

/// One global state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    pub src: Source,
    pub lsn: Listener,
    /// Encoded control frames in flight, source to destination.
    pub s2d: VecDeque<Vec<u8>>,
    pub d2s: VecDeque<Vec<u8>>,
    pub ctrl: Link,
    /// The destination closed the control connection (after its last frame).
    pub ctrl_closed: bool,
    pub data: Vec<DataChannel>,
    /// Data channels the source asked to open, not yet at the listener.
    pub joins: Vec<DataHello>,
    /// Channels the listener admitted, not yet reported to the source.
    pub opened: Vec<u8>,
    /// Data channels that failed or closed, not yet reported to the source.
    pub data_lost: Vec<u8>,
    /// Completions not yet delivered, sorted: delivery order is the checker's choice.
    pub completions: Vec<(u64, bool)>,
    /// The destination NIC's registration table.
    pub nic: Nic,
    /// Page versions per block (source order).
    pub src_mem: Vec<Vec<u8>>,
    /// Page versions per block (destination order).
    pub dst_mem: Vec<Vec<u8>>,
    /// The source's dirty log.
    pub dirty: Vec<PageBitmap>,
    pub src_pending: Vec<SrcReq>,
    pub dst_pending: Vec<DstReq>,
    pub src_notice: Notice,
    pub dst_notice: Notice,
    pub src_running: bool,
    pub dst_running: bool,
    pub src_crashed: bool,
    pub dst_crashed: bool,
    /// The source relinquished its workload (nothing may resume it any more).
    pub relinquished: bool,
    /// Source memory when the pause completed.
    pub snapshot: Option<Vec<Vec<u8>>>,
    /// Device state the destination stored.
    pub state_received: Vec<u8>,
    /// Stray connections still to come, and those open.
    pub strays_left: BTreeSet<Stray>,
    pub strays_open: BTreeSet<ConnId>,
    pub faults_left: u8,
    pub guest_left: u8,
    pub keepalives_left: u8,
    pub hostile_left: u8,
    pub obs: Observed,
    /// Per page, its version before the guest's last write (with reverting guests).
    pub prev: Vec<Vec<u8>>,
    /// The content-hash dirty log, when the configuration has it instead of the bitmap.
    pub hash_log: Option<crate::env::HashLog<u8>>,
}

impl State {
    pub fn src_live(&self) -> bool {
        !self.src_crashed && self.src.outcome().is_none()
    }
    pub fn dst_live(&self) -> bool {
        !self.dst_crashed && self.lsn.outcome().is_none()
    }
    pub fn live(&self, side: Side) -> bool {
        match side {
            Side::Src => self.src_live(),
            Side::Dst => self.dst_live(),
        }
    }
    pub fn completed(&self) -> bool {
        self.src.outcome() == Some(Outcome::Completed)
            && self.lsn.outcome() == Some(Outcome::Completed)
    }

    /// A few lines describing the state, for traces.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        self.write_sides(&mut s);
        self.write_links(&mut s);
        let _ = writeln!(
            s,
            "  mem src {:?} dst {:?} snapshot {:?}",
            self.src_mem, self.dst_mem, self.snapshot
        );
        let _ = write!(
            s,
            "  budgets: faults {} guest {} keepalives {} hostile {} strays {:?} | observed: {}",
            self.faults_left,
            self.guest_left,
            self.keepalives_left,
            self.hostile_left,
            self.strays_left,
            self.observed().join(", ")
        );
        s
    }

    /// Both machines: phase or outcome, round, registrations, workload.
    fn write_sides(&self, s: &mut String) {
        let side = |outcome: Option<Outcome>, crashed: bool, phase: String| {
            if crashed {
                "CRASHED".to_string()
            } else {
                match outcome {
                    Some(o) => format!("{o:?}"),
                    None => phase,
                }
            }
        };
        let dst_phase = self
            .lsn
            .session()
            .map_or("listening".to_string(), |d| format!("{:?}", d.phase()));
        let _ =
            writeln!(
            s,
            "src {} round {} credits {} reg {}B workload {} | dst {} round {} reg {}B workload {}",
            side(
                self.src.outcome(),
                self.src_crashed,
                format!("{:?}", self.src.phase())
            ),
            self.src.round(),
            self.src.credits().send,
            self.src.registered_bytes(),
            if self.src_running { "RUNNING" } else { "paused" },
            side(self.lsn.outcome(), self.dst_crashed, dst_phase),
            self.lsn.session().map_or(0, |d| d.round()),
            self.lsn.session().map_or(0, |d| d.registered_bytes()),
            if self.dst_running { "RUNNING" } else { "stopped" },
        );
    }

    /// What is in flight: frames, data writes, joins, completions, driver work, the NIC.
    fn write_links(&self, s: &mut String) {
        let frames = |q: &VecDeque<Vec<u8>>| {
            q.iter()
                .map(|b| frame_brief(b))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "  ctrl {:?}{}: s2d [{}] d2s [{}]",
            self.ctrl,
            if self.ctrl_closed { " (closed)" } else { "" },
            frames(&self.s2d),
            frames(&self.d2s)
        );
        for (i, ch) in self.data.iter().enumerate() {
            let ws: Vec<String> = ch
                .writes
                .iter()
                .map(|w| {
                    format!(
                        "w{} key {:#x} @{}+{} {:?}",
                        w.wr_id, w.rkey, w.remote_offset, w.len, w.data
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "  data{i} {:?} conn {:?}: [{}]",
                ch.link,
                ch.conn,
                ws.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  joins {} opened {:?} completions {:?} | src driver {:?} | dst driver {:?} | notices src {:?} dst {:?}",
            self.joins.len(),
            self.opened,
            self.completions,
            self.src_pending,
            self.dst_pending,
            self.src_notice,
            self.dst_notice
        );
        let nic: Vec<String> = self
            .nic
            .regs()
            .map(|(k, m)| format!("{k:#x}=b{}@{}+{}", m.block, m.offset, m.len))
            .collect();
        let _ = writeln!(
            s,
            "  nic [{}] | handshaking {} strays open {:?}",
            nic.join(", "),
            self.lsn.handshaking(),
            self.strays_open
        );
    }

    /// The observations set so far (upper case: a property violation).
    fn observed(&self) -> Vec<String> {
        let o = &self.obs;
        let mut seen: Vec<String> = [
            (o.commit_sent, "COMMIT sent"),
            (self.relinquished, "relinquished"),
            (o.started_received, "STARTED received"),
            (o.evicted, "evicted"),
            (o.silenced, "silenced"),
            (o.stray, "stray"),
            (o.guard_resumed, "guard resumed"),
            (o.registered_at_start, "REGISTERED AT START"),
            (o.last_credit_misused, "LAST CREDIT MISUSED"),
            (o.commit_before_relinquish, "COMMIT BEFORE RELINQUISH"),
            (o.fed_unplaced, "UNPLACED STATE FED"),
            (
                o.unauthenticated_registration,
                "UNAUTHENTICATED REGISTRATION",
            ),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
        .collect();
        if let Some(eq) = o.memory_equal_at_start {
            seen.push(format!("memory equal at start: {eq}"));
        }
        if let Some(c) = o.doubt_cause {
            seen.push(format!("in doubt by {c:?}"));
        }
        for v in [o.reg_violation, o.driver_violation].into_iter().flatten() {
            seen.push(format!("VIOLATION: {v}"));
        }
        if let Some(p) = &o.panic {
            seen.push(format!("PANIC: {p}"));
        }
        seen
    }
}

/// Message name plus the fields that matter for reading a trace.
pub fn frame_brief(bytes: &[u8]) -> String {
    match wire::decode(bytes) {
        Ok(f) => {
            let m = match &f.msg {
                Message::RegRequest { req_id, chunks } => {
                    format!("REG_REQUEST#{req_id} {chunks:?}")
                }
                Message::RegResult { req_id, rkeys } => format!("REG_RESULT#{req_id} {rkeys:x?}"),
                Message::UnregRequest { req_id, chunks } => {
                    format!("UNREG_REQUEST#{req_id} {chunks:?}")
                }
                Message::UnregDone { req_id, count } => format!("UNREG_DONE#{req_id} n={count}"),
                Message::Zero { round, ranges } => format!("ZERO r{round} {ranges:?}"),
                Message::RoundEnd { round, last, .. } => format!("ROUND_END r{round} last={last}"),
                Message::RoundAck { round } => format!("ROUND_ACK r{round}"),
                Message::DeviceState { offset, data, .. } => {
                    format!("DEVICE_STATE @{offset}+{}", data.len())
                }
                Message::Digests {
                    first_chunk,
                    digests,
                } => format!("DIGESTS @{first_chunk} n={}", digests.len()),
                Message::Prepare {
                    state_len,
                    digest_count,
                    ..
                } => format!("PREPARE state={state_len} digests={digest_count}"),
                Message::Abort { reason } => format!("ABORT {reason:?}"),
                other => other.name().to_string(),
            };
            format!("{m} +{}", f.credits)
        }
        Err(e) => format!("<malformed: {e}>"),
    }
}
