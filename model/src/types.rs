//! Small types both machines share: time, outcomes, what the destination registers, what a
//! dirty scan reports, and the sink a machine writes its commands and statistics into.

use crate::detail::Detail;
use crate::geometry::PageBitmap;
use crate::wire::{AbortReason, ChunkRef};

/// Virtual or real time in milliseconds, supplied by the driver; the machines never read a clock.
pub type Millis = u64;

/// What the destination registers: one chunk (dynamic mode) or a whole block (pin-all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegTarget {
    Chunk(ChunkRef),
    Block(u16),
}

/// Pages dirtied since the previous scan, per block, with the subset that reads as all zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirtyScan {
    pub dirty: Vec<PageBitmap>,
    /// Subset of `dirty` whose contents are entirely zero bytes.
    pub zero: Vec<PageBitmap>,
}

/// Why a migration ended without completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AbortInfo {
    /// The class carried by ABORT on the wire (spec: ERR-2).
    pub reason: AbortReason,
    /// The peer sent ABORT (as opposed to this side deciding).
    pub by_peer: bool,
    /// What exactly went wrong.
    pub detail: Detail,
}

/// Final outcome of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Completed,
    /// Source: the workload runs again at the source and nothing is lost. Destination: nothing
    /// was started and received memory is to be discarded.
    Aborted(AbortInfo),
    /// Source only: COMMIT was sent but STARTED never arrived; the operator must find out
    /// whether the destination started before resuming anything (spec: INV-DOUBT-1).
    InDoubt(Detail),
}

impl Outcome {
    /// The abort class, if the side aborted.
    pub fn abort_reason(&self) -> Option<AbortReason> {
        match self {
            Outcome::Aborted(a) => Some(a.reason),
            _ => None,
        }
    }
}

/// Where a machine puts what one input made it do: the commands, in the order the driver must
/// carry them out, and the statistics it observed. Statistics never influence a decision, so
/// they live here, outside the machine's hashed state; a model checker that only wants
/// commands hands in a fresh sink every time and drops it.
#[derive(Debug, Clone, Default)]
pub struct Out<C, S> {
    pub cmds: Vec<C>,
    pub stats: S,
}

impl<C, S: Default> Out<C, S> {
    pub fn new() -> Self {
        Out {
            cmds: Vec::new(),
            stats: S::default(),
        }
    }
}
