//! Liveness regressions, pinned to explicit machine states (not to simulator seeds, which stop
//! reproducing a bug when the generator changes): wherever the source waits on its peer, its
//! progress deadline is armed, and firing it ends the migration with the workload resumed.

use rdmig_check::pair::{Guest, Pair};
use rdmig_model::table::SrcPhase;
use rdmig_model::wire::{BlockDesc, Message};
use rdmig_model::*;

fn blocks() -> Vec<BlockDesc> {
    vec![BlockDesc {
        name: b"ram".to_vec(),
        length: 256 << 10,
        page_log2: 12,
    }]
}

/// Windows of four frames on both sides, so a burst of frames uses the credits up.
fn pair(device_state: usize) -> Pair {
    let mut s = SourceConfig::with_defaults(9, blocks(), Some(b"key".to_vec()));
    s.params.chunk_log2 = 14;
    s.credit_window = 4;
    s.reg_batch = 1;
    let mut d = DestConfig::with_defaults(blocks(), Some(b"key".to_vec()), 1 << 20);
    d.credit_window = 4;
    let quiet = Guest {
        pages_per_step: 0,
        active_steps: 0,
        zero_one_in: 0,
        seed: 3,
    };
    let mut p = Pair::new(s, d, quiet, vec![7; device_state]).unwrap();
    p.run_until_source(SrcPhase::AwaitHelloAck, 10);
    p
}

/// Steps the pair until `stop` holds.
fn run_until(p: &mut Pair, stop: impl Fn(&Pair) -> bool) {
    for _ in 0..100_000 {
        if stop(p) {
            return;
        }
        p.step();
        assert!(p.src.outcome().is_none(), "the run ended early");
    }
    panic!("the state was never reached");
}

/// Runs until the source reaches `phase`, then silences the destination (it died without a
/// word, or its link went silent) and runs until `stop` holds.
fn silence_in(p: &mut Pair, phase: SrcPhase, stop: impl Fn(&Pair) -> bool) {
    run_until(p, |p| p.src.phase() == phase);
    p.silent_control = true;
    p.silent_data = true;
    run_until(p, stop);
}

fn assert_deadline_ends_it(p: &Pair) {
    let mut s = p.src.clone();
    let t = s
        .timers()
        .progress
        .unwrap_or_else(|| panic!("no deadline in {:?} while waiting on the peer", s.phase()));
    let cmds = s.step(t, SrcInput::Timer(SrcTimer::Progress));
    assert!(
        matches!(s.outcome(), Some(Outcome::Aborted(a)) if a.reason == wire::AbortReason::Timeout),
        "{:?}",
        s.outcome()
    );
    if p.src.workload_paused() {
        assert!(cmds.contains(&SrcCommand::ResumeWorkload));
    }
}

/// The source ran out of credits while sending the device state in Finalizing (the
/// destination had died silently): it waits for a grant that never comes, so the wait needs
/// its deadline (spec: ERR-4).
#[test]
fn err_4_out_of_credits_in_finalizing() {
    let mut p = pair(200_000);
    silence_in(&mut p, SrcPhase::Finalizing, |p| {
        !p.src.credits().can_send()
    });
    assert!(p.src.waiting());
    assert_deadline_ends_it(&p);
}

/// The same while a round is being sent, with nothing else to wait for: pin-all (no
/// registrations), every write completed, keepalives that used the credits up while the
/// destination's frames stopped arriving; ROUND_END waits for a credit.
#[test]
fn err_4_out_of_credits_in_sending() {
    let mut s = SourceConfig::with_defaults(9, blocks(), Some(b"key".to_vec()));
    s.params.chunk_log2 = 14;
    s.params.mode = wire::RegMode::PinAll;
    s.credit_window = 4;
    s.writes_per_channel = 1;
    let mut d = DestConfig::with_defaults(blocks(), Some(b"key".to_vec()), 1 << 20);
    d.credit_window = 4;
    let quiet = Guest {
        pages_per_step: 0,
        active_steps: 0,
        zero_one_in: 0,
        seed: 3,
    };
    let mut p = Pair::new(s, d, quiet, vec![]).unwrap();
    p.run_until_source(SrcPhase::Sending, 10_000);
    p.silent_control = true;
    let mut now = 1_000;
    for _ in 0..10_000 {
        if p.src.phase() != SrcPhase::Sending
            || (p.src.writes_in_flight() == 0 && !p.src.credits().can_send())
        {
            break;
        }
        if p.src.credits().can_send() {
            // A keepalive whose NOP never arrives: it only spends a credit.
            now += 10_000;
            p.src.step(now, SrcInput::Timer(SrcTimer::Keepalive));
        } else {
            p.step(); // the data path still works: writes land and complete
        }
    }
    assert_eq!(
        p.src.phase(),
        SrcPhase::Sending,
        "ROUND_END is waiting for a credit"
    );
    assert_eq!(p.src.writes_in_flight(), 0);
    assert!(p.src.waiting());
    assert_deadline_ends_it(&p);
}

/// Writes in flight and nothing else outstanding: only completions are progress.
#[test]
fn err_4_writes_in_flight_alone() {
    let mut p = pair(0);
    run_until(&mut p, |p| {
        p.src.phase() == SrcPhase::Sending && p.src.writes_in_flight() > 0
    });
    p.silent_data = true;
    assert!(p.src.waiting());
    // A keepalive from the destination changes nothing.
    let mut s = p.src.clone();
    let t = s.timers().progress.expect("armed");
    s.step(
        t - 1,
        SrcInput::Frame(wire::Frame {
            credits: 0,
            msg: Message::Nop,
        }),
    );
    assert_eq!(s.timers().progress, Some(t));
    assert_deadline_ends_it(&p);
}
