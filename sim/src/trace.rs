//! The event trace: a running digest of every event (for the determinism check) and the last
//! few records in full (for a failure report). Records are small copies, formatted only when
//! a failure is printed, so tracing costs a few nanoseconds per event.

use std::collections::VecDeque;

use serde::Serialize;

/// What happened. `a` and `b` in [`Rec`] carry the numbers named in each comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// a = pages written.
    GuestTick,
    /// a = side (0 source, 1 destination), b = input kind (see `input_kind`).
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
    /// a = device state bytes.
    DeviceState,
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
            Tag::DeviceState => write!(f, "device state captured ({} bytes)", self.a),
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

/// Names of input kinds, indexed by `input_kind`.
pub const INPUT_KINDS: [&str; 16] = [
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
];

pub fn input_kind(i: &rdmig_model::Input) -> u64 {
    use rdmig_model::Input::*;
    match i {
        Start => 0,
        Frame(_) => 1,
        Malformed(_) => 2,
        WriteDone { .. } => 3,
        WriteFailed { .. } => 4,
        Registered { .. } => 5,
        RegisterFailed { .. } => 6,
        Dirty(_) => 7,
        WorkloadPaused => 8,
        WorkloadStarted => 9,
        WorkloadFailed => 10,
        DeviceState(_) => 11,
        Digests(_) => 12,
        Timer(_) => 13,
        TransportFailed => 14,
        Cancel => 15,
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
