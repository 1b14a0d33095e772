//! The event trace: a running digest of every event (for the determinism check) and the last
//! few records in full (for a failure report). Records are small copies, formatted only when
//! a failure is printed, so tracing costs a few nanoseconds per event.

use std::collections::VecDeque;

use rdmig_model::destination::DstInput;
use rdmig_model::listener::LsnInput;
use rdmig_model::source::SrcInput;
use serde::Serialize;

/// What happened. `a` and `b` in [`Rec`] carry the numbers named in each comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// a = pages written.
    GuestTick,
    /// a = side (0 source, 1 destination), b = input kind (see `INPUT_KINDS`).
    Input,
    /// a = direction (0 source to destination), b = type code.
    FrameSent,
    /// a = direction, b = type code (frame lost on a broken channel).
    FrameLost,
    /// a = channel, b = wr_id.
    WritePosted,
    /// a = wr_id, b = length.
    WritePlaced,
    /// a = wr_id, b = 1 if it failed.
    WriteRejected,
    /// a = local block, b = byte offset.
    Register,
    /// a = rkey, b = length.
    Registered,
    /// a = rkey.
    Unregister,
    /// a = local block, b = length.
    ZeroFill,
    /// a = 1 for a full scan, b = dirty pages.
    Scan,
    Paused,
    Resumed,
    /// a = device state bytes, b = 1 if it streams into the state area.
    DeviceState,
    /// a = device-state bytes in the state buffer, b = 1 once complete.
    StateProduced,
    /// a = the placed prefix fed to the consumer, b = pages fed now.
    StateFed,
    /// a = device-state bytes the consumer holds, b = ns until it has loaded them.
    StateLoaded,
    /// a = side.
    Digests,
    StartWorkload,
    Started,
    /// a = side, b = 0 idle / 1 keepalive.
    Timer,
    /// a = fault kind index, b = detail (side or channel).
    Fault,
    /// a = side, b = outcome code (0 completed, 1 aborted, 2 in doubt).
    Finish,
    SafetyEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    pub t_ns: u64,
    pub tag: Tag,
    pub a: u64,
    pub b: u64,
}

impl std::fmt::Display for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |x: u64| if x == 0 { "src" } else { "dst" };
        let dir = |x: u64| if x == 0 { "src->dst" } else { "dst->src" };
        let code = |x: u64| rdmig_model::wire::code_name(x as u8).unwrap_or("?");
        write!(f, "{:>14.6} ms  ", self.t_ns as f64 / 1e6)?;
        match self.tag {
            Tag::GuestTick => write!(f, "guest wrote {} pages", self.a),
            Tag::Input => write!(f, "{} <- {}", side(self.a), INPUT_KINDS[self.b as usize]),
            Tag::FrameSent => write!(f, "{} {}", dir(self.a), code(self.b)),
            Tag::FrameLost => write!(f, "{} {} lost", dir(self.a), code(self.b)),
            Tag::WritePosted => write!(f, "post write ch{} wr{}", self.a, self.b),
            Tag::WritePlaced => write!(f, "placed wr{} ({} bytes)", self.a, self.b),
            Tag::WriteRejected => write!(f, "write wr{} rejected by the NIC", self.a),
            Tag::Register => write!(f, "register block {} @ {}", self.a, self.b),
            Tag::Registered => write!(f, "registered rkey {:#x} ({} bytes)", self.a, self.b),
            Tag::Unregister => write!(f, "unregister rkey {:#x}", self.a),
            Tag::ZeroFill => write!(f, "zero fill block {} ({} bytes)", self.a, self.b),
            Tag::Scan => write!(f, "dirty scan (all={}) {} pages", self.a, self.b),
            Tag::Paused => write!(f, "source workload paused"),
            Tag::Resumed => write!(f, "source workload resumed"),
            Tag::DeviceState if self.b == 1 => {
                write!(
                    f,
                    "device state requested into the state area ({} bytes)",
                    self.a
                )
            }
            Tag::DeviceState => write!(f, "device state captured ({} bytes)", self.a),
            Tag::StateProduced => write!(
                f,
                "device state produced up to {} bytes{}",
                self.a,
                if self.b == 1 { " (complete)" } else { "" }
            ),
            Tag::StateFed => write!(
                f,
                "consumer fed device state up to {} bytes ({} pages)",
                self.a, self.b
            ),
            Tag::StateLoaded => write!(
                f,
                "consumer finishes {} bytes of device state in {} ns",
                self.a, self.b
            ),
            Tag::Digests => write!(f, "{} digests computed", side(self.a)),
            Tag::StartWorkload => write!(f, "destination start requested"),
            Tag::Started => write!(f, "destination workload running"),
            Tag::Timer => write!(
                f,
                "{} timer {}",
                side(self.a),
                if self.b == 0 { "idle" } else { "keepalive" }
            ),
            Tag::Fault => write!(
                f,
                "FAULT {} ({})",
                crate::faults::ALL_KINDS[self.a as usize].name(),
                self.b
            ),
            Tag::Finish => write!(
                f,
                "{} finished: {}",
                side(self.a),
                ["completed", "aborted", "in doubt"][self.b as usize]
            ),
            Tag::SafetyEnd => write!(f, "safety phase ends: no more faults"),
        }
    }
}

/// Names of input kinds, indexed by `src_input_kind` and `lsn_input_kind`.
pub const INPUT_KINDS: [&str; 25] = [
    "Start",
    "Frame",
    "Malformed",
    "WriteDone",
    "WriteFailed",
    "Registered",
    "RegisterFailed",
    "Dirty",
    "WorkloadPaused",
    "WorkloadStarted",
    "WorkloadFailed",
    "DeviceState",
    "Digests",
    "Timer",
    "TransportFailed",
    "Cancel",
    "DataOpened",
    "DataLost",
    "Accepted",
    "DataHello",
    "Closed",
    "StateProduced",
    "StateDone",
    "StateLoaded",
    "StateFailed",
];

pub fn src_input_kind(i: &SrcInput) -> u64 {
    match i {
        SrcInput::Start => 0,
        SrcInput::Frame(_) => 1,
        SrcInput::Malformed(_) => 2,
        SrcInput::WriteDone { .. } => 3,
        SrcInput::WriteFailed { .. } => 4,
        SrcInput::Dirty(_) => 7,
        SrcInput::WorkloadPaused => 8,
        SrcInput::WorkloadFailed => 10,
        SrcInput::DeviceState(_) => 11,
        SrcInput::Digests(_) => 12,
        SrcInput::Timer(_) => 13,
        SrcInput::TransportFailed => 14,
        SrcInput::Cancel => 15,
        SrcInput::DataOpened { .. } => 16,
        SrcInput::DataLost { .. } => 17,
        SrcInput::StateProduced { .. } => 21,
        SrcInput::StateDone { .. } => 22,
    }
}

pub fn lsn_input_kind(i: &LsnInput) -> u64 {
    match i {
        LsnInput::Frame { frame: Ok(_), .. } => 1,
        LsnInput::Frame { frame: Err(_), .. } => 2,
        LsnInput::Local(DstInput::Registered { .. }) => 5,
        LsnInput::Local(DstInput::RegisterFailed { .. }) => 6,
        LsnInput::Local(DstInput::WorkloadStarted) => 9,
        LsnInput::Local(DstInput::WorkloadFailed) => 10,
        LsnInput::Local(DstInput::Digests(_)) => 12,
        LsnInput::Local(DstInput::StateLoaded { .. }) => 23,
        LsnInput::Local(DstInput::StateFailed) => 24,
        LsnInput::Timer(_) | LsnInput::Local(DstInput::Timer(_)) => 13,
        LsnInput::Local(DstInput::TransportFailed) => 14,
        LsnInput::Cancel | LsnInput::Local(DstInput::Cancel) => 15,
        LsnInput::Local(DstInput::DataLost { .. }) => 17,
        LsnInput::Accepted { .. } => 18,
        LsnInput::DataHello { .. } => 19,
        LsnInput::Closed { .. } => 20,
        LsnInput::Local(DstInput::Frame(_) | DstInput::Malformed(_)) => 1,
    }
}

pub struct Trace {
    tail: VecDeque<Rec>,
    cap: usize,
    digest: u64,
    pub events: u64,
}

impl Trace {
    pub fn new(cap: usize) -> Trace {
        Trace {
            tail: VecDeque::with_capacity(cap + 1),
            cap,
            digest: 0x5EED_0FD1_6E57,
            events: 0,
        }
    }

    pub fn rec(&mut self, t_ns: u64, tag: Tag, a: u64, b: u64) {
        // A multiply-xorshift fold: order-sensitive, so any change in what happened, when,
        // or in what order changes the digest.
        for v in [t_ns, tag as u64, a, b] {
            self.digest = (self.digest ^ v)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(29);
        }
        self.events += 1;
        if self.cap > 0 {
            if self.tail.len() == self.cap {
                self.tail.pop_front();
            }
            self.tail.push_back(Rec { t_ns, tag, a, b });
        }
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().map(|r| r.to_string()).collect()
    }
}

/// The numbers summarised for the report.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    pub records: u64,
    pub digest: String,
}
