//! Driver loops: feed a machine its inputs (frames, completions, scans, timers, signals, hook
//! results) and carry out its commands. Every decision is the machine's; a driver only does
//! I/O, waits until the machine's next deadline, and reports.

mod destination;
mod source;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub use destination::{run_destination, DestRun};
pub use source::{run_source, KnownDigests, PageHashesFn, Progress, ScanFn, SourceRun};

use rdmig_model::Millis;

/// Milliseconds since the driver started: the machines' clock.
struct Clock(Instant);

impl Clock {
    fn new() -> Clock {
        Clock(Instant::now())
    }
    fn now(&self) -> Millis {
        self.0.elapsed().as_millis() as Millis
    }
}

/// What woke the driver.
enum Wake<E, T> {
    Event(E),
    /// The machine's timer `T` is due.
    Timer(T),
    /// The transport's channel closed: every sender is gone.
    Gone,
}

/// Waits for the next transport event, or until the machine's earliest deadline.
fn wait<E, T: Copy>(rx: &Receiver<E>, clock: &Clock, next: Option<(Millis, T)>) -> Wake<E, T> {
    let r = match next {
        Some((at, _)) => {
            let left = at.saturating_sub(clock.now());
            if left == 0 {
                return Wake::Timer(next.expect("some").1);
            }
            rx.recv_timeout(Duration::from_millis(left))
        }
        // Nothing armed: the machine waits on local work or on nothing; a transport event,
        // a driver answer or a signal comes eventually.
        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
    };
    match r {
        Ok(e) => Wake::Event(e),
        Err(RecvTimeoutError::Timeout) => match next {
            Some((at, kind)) if at <= clock.now() => Wake::Timer(kind),
            // Woken a little early: the deadline is checked again on the next turn.
            Some((_, kind)) => Wake::Timer(kind),
            None => unreachable!("no deadline, no timeout"),
        },
        Err(RecvTimeoutError::Disconnected) => Wake::Gone,
    }
}
