//! What the requirement tests share: crafted frames, a guest that writes nothing, and the
//! reading of a machine's commands (its outcome, the frames it sent).
#![allow(dead_code)]

use rdmig_check::pair::Guest;
use rdmig_model::wire::*;
use rdmig_model::*;

pub fn quiet() -> Guest {
    Guest {
        pages_per_step: 0,
        active_steps: 0,
        zero_one_in: 0,
        seed: 1,
    }
}

pub fn frame<I: From<Frame>>(msg: Message) -> I {
    I::from(Frame { credits: 0, msg })
}

pub trait Cmd {
    fn outcome(&self) -> Option<Outcome>;
    fn message(&self) -> Option<&Message>;
    fn exposes_memory(&self) -> bool;
}

impl Cmd for DstCommand {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            DstCommand::Finish(o) => Some(*o),
            _ => None,
        }
    }
    fn message(&self) -> Option<&Message> {
        match self {
            DstCommand::Send(f) => Some(&f.msg),
            _ => None,
        }
    }
    fn exposes_memory(&self) -> bool {
        matches!(
            self,
            DstCommand::Register { .. } | DstCommand::ZeroFill { .. } | DstCommand::StartWorkload
        )
    }
}

impl Cmd for SrcCommand {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            SrcCommand::Finish(o) => Some(*o),
            _ => None,
        }
    }
    fn message(&self) -> Option<&Message> {
        match self {
            SrcCommand::Send(f) => Some(&f.msg),
            _ => None,
        }
    }
    fn exposes_memory(&self) -> bool {
        matches!(self, SrcCommand::PostWrite(_) | SrcCommand::OpenData { .. })
    }
}

pub fn aborted(cmds: &[impl Cmd]) -> Option<AbortInfo> {
    cmds.iter().find_map(|c| match c.outcome() {
        Some(Outcome::Aborted(a)) => Some(a),
        _ => None,
    })
}

pub fn assert_abort(cmds: &[impl Cmd], reason: AbortReason, detail: Detail) {
    let a = aborted(cmds).unwrap_or_else(|| panic!("expected abort {reason:?} ({detail})"));
    assert_eq!((a.reason, a.detail), (reason, detail), "{}", a.detail);
}
