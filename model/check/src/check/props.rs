//! The properties the checker verifies, named after the spec's IDs.

use std::collections::VecDeque;

use rdmig_model::types::*;
use rdmig_model::wire::{self, AbortReason};
use rdmig_model::Credits;
use stateright::Property;

use super::state::*;
use super::{CheckConfig, ProtocolModel, CTRL_CONN};

pub const P_MEM: &str = "INV-MEM-1 destination memory equals the source at pause when it starts";
pub const P_MEM_DIGEST: &str = "INV-MEM-1 digests never mismatch (no update is lost)";
pub const P_REG: &str = "INV-REG-1 writes land only in live registrations, within bounds";
pub const P_AUTH2: &str = "AUTH-2 nothing is registered before the source proved the key";
pub const P_SW8: &str = "SW-8 nothing is registered when the destination starts";
pub const P_SW7: &str = "SW-7 the destination starts only after a COMMIT arrived";
pub const P_OWN1: &str = "INV-OWN-1 source and destination workloads never both run";
pub const P_SW6: &str = "SW-6 the source never resumes once in doubt";
pub const P_RELINQUISH: &str = "SW-6 COMMIT leaves only after the source relinquished its workload";
pub const P_OWN2: &str = "INV-OWN-2 an aborted migration leaves the source running";
pub const P_GUARD: &str =
    "INV-GUARD-1 a source that dies before relinquishing its workload leaves it running";
pub const P_FC: &str = "INV-FC-1 frames outstanding never exceed the receiver's window";
pub const P_FC3: &str = "FC-3 the last credit is spent only by a frame that grants credits";
pub const P_PIN: &str = "INV-PIN-1 registered bytes never exceed the pin budget";
pub const P_DOUBT: &str = "INV-DOUBT-1 in doubt only after COMMIT, before STARTED, on a failure";
pub const P_DOUBT_HOSTILE: &str = "INV-DOUBT-1 in doubt only after COMMIT, before STARTED";
pub const P_STRAY: &str = "INV-ADMIT-1 only the source's own connection becomes the session";
pub const P_SANE: &str = "machine assertions and driver checks hold";
pub const P_HONEST: &str =
    "INV-HONEST-1 an honest pair never ends in ProtocolViolation, DigestMismatch, BlockMismatch or LocalError";
pub const P_LIVE_CLEAN: &str = "LIVE without faults both sides complete";
pub const P_LIVE_END: &str = "INV-LIVE-1 both sides eventually reach an outcome";
pub const P_DONE: &str = "sometimes a migration completes";
pub const P_DONE_ROUNDS: &str = "sometimes a migration completes after 2 pre-copy rounds";
pub const P_DONE_EVICT: &str = "sometimes a migration completes after an eviction";
pub const P_DONE_STRAY: &str = "sometimes a migration completes beside a stray connection";
pub const P_ABORT_RESUME: &str = "sometimes an abort after pausing resumes the source";
pub const P_GUARD_REACH: &str = "sometimes the guard resumes the workload of a dead source";
pub const P_ABORT_RESUME_EARLY: &str =
    "SAVE-1 sometimes an abort before the switchover resumes a workload paused at the start";
pub const P_SILENT_END: &str = "LIVE sometimes a silent link ends both sides by their timers";
pub const P_NOP: &str = "FC-4 sometimes a NOP returns credits";
pub const P_LATE_WRITE: &str =
    "INV-REG-1 sometimes a write is rejected because the destination has ended";
pub const P_DOUBT_REACH: &str = "INV-DOUBT-1 sometimes the source ends in doubt";
pub const P_HOSTILE_ABORT: &str = "sometimes the hostile peer's frames end the session";
pub const P_STATE3: &str = "STATE-3 the destination feeds its consumer only placed device state";
pub const P_DONE_STATE: &str =
    "STATE-3 sometimes a migration completes with its device state in the state area";

/// An outcome only a hostile peer or a bug can cause.
fn dishonest(o: Option<Outcome>) -> bool {
    matches!(o, Some(Outcome::Aborted(a)) if matches!(
        a.reason,
        AbortReason::ProtocolViolation
            | AbortReason::DigestMismatch
            | AbortReason::BlockMismatch
            | AbortReason::LocalError
    ))
}

fn mismatch(o: Option<Outcome>) -> bool {
    matches!(o, Some(Outcome::Aborted(a)) if a.reason == AbortReason::DigestMismatch)
}

/// Both sides are done: the source has an outcome or died; the destination has an outcome,
/// died, or, having never bound a session, waits with no connection in its handshake.
fn ended(s: &State) -> bool {
    let idle_listener = s.lsn.session().is_none() && s.lsn.handshaking() == 0;
    !s.src_live() && (!s.dst_live() || idle_listener)
}

/// The properties for a configuration: all of them against honest peers; against a hostile
/// peer, those the honest side guarantees alone.
pub fn properties(cfg: &CheckConfig) -> Vec<Property<ProtocolModel>> {
    let mut p: Vec<Property<ProtocolModel>> = vec![
        Property::always(P_SANE, |_, s: &State| {
            s.obs.panic.is_none() && s.obs.driver_violation.is_none()
        }),
        Property::eventually(P_LIVE_END, |_, s: &State| ended(s)),
    ];
    let source_side = || -> Vec<Property<ProtocolModel>> {
        vec![
            Property::always(P_SW6, |_, s: &State| {
                !(matches!(s.src.outcome(), Some(Outcome::InDoubt(_))) && s.src_running)
            }),
            Property::always(P_RELINQUISH, |_, s: &State| !s.obs.commit_before_relinquish),
            Property::always(P_GUARD, |_, s: &State| {
                !s.src_crashed || s.relinquished || s.src_running
            }),
            Property::always(P_OWN2, |_, s: &State| {
                !matches!(s.src.outcome(), Some(Outcome::Aborted(_))) || s.src_running
            }),
        ]
    };
    let destination_side = || -> Vec<Property<ProtocolModel>> {
        vec![
            Property::always(P_AUTH2, |_, s: &State| !s.obs.unauthenticated_registration),
            Property::always(P_SW8, |_, s: &State| !s.obs.registered_at_start),
            Property::always(P_PIN, |_, s: &State| {
                let budget = s.lsn.config().dest.pin_budget;
                let dst = s.lsn.session().map_or(0, |d| d.registered_bytes());
                dst <= budget && s.nic.bytes() <= budget
            }),
            Property::always(P_STRAY, |_, s: &State| {
                s.lsn.session_conn().is_none_or(|c| c == CTRL_CONN)
            }),
            Property::always(P_SW7, |_, s: &State| {
                !s.dst_running || s.obs.commit_sent || s.obs.commit_delivered
            }),
            Property::always(
                "INV-OWN-2 an aborted destination never runs its workload",
                |_, s: &State| {
                    !matches!(s.lsn.outcome(), Some(Outcome::Aborted(_))) || !s.dst_running
                },
            ),
        ]
    };
    match cfg.adversary {
        Some(Adversary::Destination) => {
            p.extend(source_side());
            p.push(Property::always(P_DOUBT_HOSTILE, |_, s: &State| {
                !matches!(s.src.outcome(), Some(Outcome::InDoubt(_)))
                    || (s.obs.commit_sent && !s.obs.started_received)
            }));
            p.push(Property::sometimes(P_DONE, |_, s: &State| s.completed()));
            p.push(Property::sometimes(P_HOSTILE_ABORT, |_, s: &State| {
                matches!(s.src.outcome(), Some(Outcome::Aborted(a)) if a.reason == AbortReason::ProtocolViolation)
            }));
        }
        Some(Adversary::Source) => {
            p.extend(destination_side());
            p.push(Property::sometimes(P_DONE, |_, s: &State| s.completed()));
            p.push(Property::sometimes(P_HOSTILE_ABORT, |_, s: &State| {
                matches!(s.lsn.outcome(), Some(Outcome::Aborted(a)) if a.reason == AbortReason::ProtocolViolation)
            }));
        }
        None => {
            p.extend(source_side());
            p.extend(destination_side());
            p.extend(honest(cfg));
        }
    }
    p
}

/// Properties of an honest pair: a flat list, one entry per property.
fn honest(cfg: &CheckConfig) -> Vec<Property<ProtocolModel>> {
    let mut p = vec![
        Property::always(P_MEM, |_, s: &State| {
            s.obs.memory_equal_at_start != Some(false)
        }),
        Property::always(P_MEM_DIGEST, |_, s: &State| {
            // The environment never corrupts data, so a digest mismatch is a lost update.
            !mismatch(s.src.outcome()) && !mismatch(s.lsn.outcome())
        }),
        Property::always(P_REG, |_, s: &State| s.obs.reg_violation.is_none()),
        Property::always(P_STATE3, |_, s: &State| !s.obs.fed_unplaced),
        Property::always(P_HONEST, |_, s: &State| {
            !dishonest(s.src.outcome()) && !dishonest(s.lsn.outcome())
        }),
        Property::always(P_OWN1, |_, s: &State| !(s.src_running && s.dst_running)),
        Property::always(P_FC, |_, s: &State| fc_ok(s)),
        Property::always(P_FC3, |_, s: &State| !s.obs.last_credit_misused),
        Property::always(P_PIN, |_, s: &State| {
            s.src.registered_bytes() <= s.lsn.config().dest.pin_budget
        }),
        Property::always(P_DOUBT, |_, s: &State| match s.src.outcome() {
            Some(Outcome::InDoubt(_)) => {
                s.obs.commit_sent
                    && !s.obs.started_received
                    && matches!(
                        s.obs.doubt_cause,
                        Some(
                            Cause::TransportFailed
                                | Cause::WriteFailed
                                | Cause::Timer
                                | Cause::Cancel
                        )
                    )
            }
            _ => true,
        }),
        Property::always(P_LIVE_CLEAN, |m: &ProtocolModel, s: &State| {
            // Without any fault, nothing may end other than Completed: a timeout here means
            // the protocol got stuck on its own. Stray connections are no fault.
            s.faults_left < m.cfg.faults
                || (!s.src_crashed
                    && !s.dst_crashed
                    && matches!(s.src.outcome(), None | Some(Outcome::Completed))
                    && matches!(s.lsn.outcome(), None | Some(Outcome::Completed)))
        }),
        Property::sometimes(P_DONE, |_, s: &State| s.completed()),
        Property::sometimes(P_DONE_EVICT, |_, s: &State| s.completed() && s.obs.evicted),
        Property::sometimes(P_NOP, |_, s: &State| {
            s.s2d
                .iter()
                .chain(s.d2s.iter())
                .any(|b| b.first() == Some(&wire::code::NOP))
        }),
    ];
    if cfg.state_pages > 0 {
        p.push(Property::sometimes(P_DONE_STATE, |_, s: &State| {
            s.completed() && s.state_received.len() > 1
        }));
    }
    // Rounds beyond the first need a guest that writes.
    if cfg.guest_writes > 0 {
        p.push(Property::sometimes(P_DONE_ROUNDS, |_, s: &State| {
            s.completed() && s.src.round() >= 3
        }));
    }
    if cfg.src_paused_at_start && cfg.faults > 0 {
        // The machine never paused the workload itself (no snapshot), yet resumed it.
        p.push(Property::sometimes(P_ABORT_RESUME_EARLY, |_, s: &State| {
            matches!(s.src.outcome(), Some(Outcome::Aborted(_)))
                && s.src_running
                && s.snapshot.is_none()
        }));
    }
    if !cfg.strays.is_empty() {
        p.push(Property::sometimes(P_DONE_STRAY, |_, s: &State| {
            s.completed() && s.obs.stray
        }));
    }
    if cfg.faults > 0 {
        p.push(Property::sometimes(P_ABORT_RESUME, |_, s: &State| {
            matches!(s.src.outcome(), Some(Outcome::Aborted(_)))
                && s.src_running
                && s.snapshot.is_some()
        }));
        p.push(Property::sometimes(P_LATE_WRITE, |_, s: &State| {
            s.src_live() && !s.dst_live() && s.completions.iter().any(|&(_, ok)| !ok)
        }));
        p.push(Property::sometimes(P_DOUBT_REACH, |_, s: &State| {
            matches!(s.src.outcome(), Some(Outcome::InDoubt(_)))
        }));
        p.push(Property::sometimes(P_GUARD_REACH, |_, s: &State| {
            s.obs.guard_resumed
        }));
    }
    if cfg.faults > 0 && cfg.silence {
        p.push(Property::sometimes(P_SILENT_END, |_, s: &State| {
            s.obs.silenced && s.src.outcome().is_some() && s.lsn.outcome().is_some()
        }));
    }
    p
}

/// The destination's credits on the source's control connection.
fn dst_credits(s: &State) -> Option<&Credits> {
    s.lsn
        .session()
        .or_else(|| s.lsn.candidate(CTRL_CONN))
        .map(|d| d.credits())
}

/// Frames the sender on `from` has outstanding: in flight, received but not yet granted back,
/// or granted back in a frame still in flight. Frames lost with a connection or dropped by a
/// side that has ended are not counted, so this never exceeds what the sender accounts.
fn outstanding(s: &State, from: Side) -> u32 {
    let grants = |q: &VecDeque<Vec<u8>>| -> u32 {
        q.iter()
            .map(|b| wire::decode_header(b).map_or(0, |h| h.credits as u32))
            .sum()
    };
    let dst_ungranted = dst_credits(s).map_or(0, |c| c.ungranted as u32);
    match from {
        Side::Src => s.s2d.len() as u32 + dst_ungranted + grants(&s.d2s),
        Side::Dst => s.d2s.len() as u32 + s.src.credits().ungranted as u32 + grants(&s.s2d),
    }
}

/// spec: INV-FC-1: outstanding frames never exceed the receiver's window.
fn fc_ok(s: &State) -> bool {
    let Some(dc) = dst_credits(s) else {
        return true;
    };
    outstanding(s, Side::Src) <= dc.window as u32
        && outstanding(s, Side::Dst) <= s.src.credits().window as u32
}

/// spec: FC-3: called after a frame from `from` was queued. If the sender now has the
/// receiver's whole window outstanding, the frame took its last credit and must grant some,
/// or both sides could end up out of credits with nothing left to return them.
pub(super) fn check_last_credit(s: &mut State, from: Side, grant: u16) {
    let window = match from {
        Side::Src => match dst_credits(s) {
            Some(c) => c.window,
            None => return,
        },
        Side::Dst => s.src.credits().window,
    };
    if grant == 0 && outstanding(s, from) >= window as u32 {
        s.obs.last_credit_misused = true;
    }
}
