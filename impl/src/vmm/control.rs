//! Workload control at switchover: pausing and resuming the source workload, starting the
//! destination's, and where device state comes from and goes to.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// How the source workload is paused and resumed.
#[derive(Debug, Clone, Default)]
pub enum SourceWorkload {
    /// Nothing to pause (a file, or a workload already stopped).
    #[default]
    None,
    /// SIGSTOP / SIGCONT to a process.
    Pid(i32),
    /// Shell commands; the pause command's standard output is the device state unless
    /// `--state-in` names a file.
    Hooks {
        pause: String,
        resume: Option<String>,
    },
    /// A QEMU guest over QMP: `stop` and save its device state; `cont` on abort.
    Qemu(Arc<crate::vmm::qemu::QemuSource>),
    /// A save file being restored: never running, its device state saved with it.
    Saved(Arc<Vec<u8>>),
    /// `then`, paused before the migration started (a save that is not live). Pausing it
    /// again gives `state` when its first pause produced the device state (a pause hook runs
    /// once), else pauses `then` again (a stopped QEMU saves its state, a stopped process
    /// stays stopped).
    PausedBefore {
        state: Option<Arc<Vec<u8>>>,
        then: Box<SourceWorkload>,
    },
}

/// Why a workload operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("process {0} does not exist")]
    NoProcess(i32),
    #[error("signal to process {pid}: {err}")]
    Signal { pid: i32, err: rustix::io::Errno },
    #[error("process {0} did not stop within 2 s")]
    NotStopped(i32),
    #[error("hook `{cmd}` failed: {why}")]
    Hook { cmd: String, why: String },
    #[error(transparent)]
    Qemu(#[from] crate::vmm::qemu::QemuError),
    #[error("finishing the save file: {0}")]
    Save(String),
}

fn run_hook(cmd: &str) -> Result<Vec<u8>, ControlError> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| ControlError::Hook {
            cmd: cmd.into(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ControlError::Hook {
            cmd: cmd.into(),
            why: format!("exit status {}", out.status),
        });
    }
    Ok(out.stdout)
}

fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name, which may itself contain spaces.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn signal(pid: i32, sig: Signal) -> Result<(), ControlError> {
    let p = Pid::from_raw(pid).ok_or(ControlError::NoProcess(pid))?;
    kill_process(p, sig).map_err(|err| ControlError::Signal { pid, err })
}

impl SourceWorkload {
    /// Pauses the workload and waits until it is really stopped; returns the pause hook's
    /// output (possible device state).
    pub fn pause(&self) -> Result<Vec<u8>, ControlError> {
        match self {
            SourceWorkload::None => Ok(Vec::new()),
            SourceWorkload::Pid(pid) => {
                signal(*pid, Signal::STOP)?;
                let t = Instant::now();
                loop {
                    match process_state(*pid) {
                        Some('T') | Some('t') => return Ok(Vec::new()),
                        None => return Err(ControlError::NoProcess(*pid)),
                        _ if t.elapsed() > Duration::from_secs(2) => {
                            return Err(ControlError::NotStopped(*pid))
                        }
                        _ => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            }
            SourceWorkload::Hooks { pause, .. } => run_hook(pause),
            SourceWorkload::Qemu(q) => Ok(q.stop_and_save()?),
            SourceWorkload::Saved(state) => Ok(state.to_vec()),
            SourceWorkload::PausedBefore {
                state: Some(state), ..
            } => Ok(state.to_vec()),
            SourceWorkload::PausedBefore { then, .. } => then.pause(),
        }
    }

    /// Pauses the workload whose device state will be streamed afterwards
    /// ([`streaming_qemu`](Self::streaming_qemu)): a QEMU guest is only stopped; the others pause
    /// as with [`pause`](Self::pause), whose output is then their state.
    pub fn pause_for_streaming(&self) -> Result<Vec<u8>, ControlError> {
        match self {
            SourceWorkload::Qemu(q) => {
                q.stop()?;
                Ok(Vec::new())
            }
            SourceWorkload::PausedBefore { state: None, then } => then.pause_for_streaming(),
            other => other.pause(),
        }
    }

    /// The QEMU that saves its device state into a stream (`sink`), when this workload is
    /// one paused by [`pause_for_streaming`](Self::pause_for_streaming).
    pub fn streaming_qemu(&self) -> Option<Arc<crate::vmm::qemu::QemuSource>> {
        match self {
            SourceWorkload::Qemu(q) => Some(q.clone()),
            SourceWorkload::PausedBefore { state: None, then } => then.streaming_qemu(),
            _ => None,
        }
    }

    /// Resumes the workload after an abort (spec: INV-OWN-2).
    pub fn resume(&self) -> Result<(), ControlError> {
        match self {
            SourceWorkload::None => Ok(()),
            SourceWorkload::Pid(pid) => signal(*pid, Signal::CONT),
            SourceWorkload::Hooks { resume, .. } => resume
                .as_deref()
                .map_or(Ok(()), |c| run_hook(c).map(|_| ())),
            SourceWorkload::Qemu(q) => Ok(q.resume()?),
            SourceWorkload::Saved(_) => Ok(()),
            SourceWorkload::PausedBefore { then, .. } => then.resume(),
        }
    }
}

/// How the destination starts its workload after COMMIT.
#[derive(Debug, Clone, Default)]
pub struct DestWorkload {
    pub start_cmd: Option<String>,
    /// SIGCONT to a process waiting stopped on the destination.
    pub start_pid: Option<i32>,
    /// A QEMU waiting for the device state.
    pub qemu: Option<Arc<crate::vmm::qemu::QemuDest>>,
    /// A save file, made valid on commit (its footer written).
    pub save: Option<Arc<crate::savefile::SaveTarget>>,
}

impl DestWorkload {
    /// Starts the workload with the device state received (in memory, for a save file; a
    /// QEMU has loaded it already); `digests` are the chunk digests of the memory received,
    /// when the migration verified them.
    pub fn start(&self, state: &[u8], digests: Option<&[u64]>) -> Result<(), ControlError> {
        if let Some(s) = &self.save {
            // spec: SAVE-3: the footer is what a commit makes of a save.
            let d = digests.ok_or_else(|| ControlError::Save("no verified digests".into()))?;
            s.finish(state, d)
                .map_err(|e| ControlError::Save(e.to_string()))?;
        }
        if let Some(q) = &self.qemu {
            q.run()?;
        }
        if let Some(pid) = self.start_pid {
            signal(pid, Signal::CONT)?;
        }
        if let Some(cmd) = &self.start_cmd {
            run_hook(cmd)?;
        }
        Ok(())
    }
}

/// Where the destination's device state goes, in order, as it arrives (spec: STATE-4): kept
/// in memory (for a start hook or a save file), written to `--state-out` (beside it until the
/// commit, then renamed over it), or loaded by the destination QEMU. Each byte is digested on
/// the way, so the consumer's digest is known once the last byte is in (spec: STATE-5).
#[derive(Default)]
pub struct StateConsumer {
    kind: ConsumerKind,
    len: u64,
    /// The bytes are digested (digests are negotiated, spec: STATE-5).
    hash: bool,
    hasher: Option<Box<xxhash_rust::xxh3::Xxh3>>,
    /// The first error, reported at `finish`.
    failed: Option<String>,
    /// The memory consumer's bytes.
    data: Vec<u8>,
}

impl std::fmt::Debug for StateConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateConsumer")
            .field("kind", &self.kind)
            .field("len", &self.len)
            .field("failed", &self.failed)
            .finish()
    }
}

#[derive(Debug, Default)]
enum ConsumerKind {
    /// Nothing keeps it: a workload started by a hook or a signal has no use for it, but its
    /// digest is still checked (spec: STATE-5).
    #[default]
    DigestOnly,
    Memory,
    File {
        path: PathBuf,
        partial: PathBuf,
        file: Option<std::fs::File>,
    },
    Qemu {
        q: Arc<crate::vmm::qemu::QemuDest>,
        writer: Option<StateWriter>,
    },
}

/// The thread that writes the state into QEMU's pipe, so that a QEMU loading slowly never
/// blocks the driver (which still has frames to answer).
#[derive(Debug)]
struct StateWriter {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl StateWriter {
    /// Starts the thread that writes what is queued into `pipe`, in order (at most
    /// `FEED_QUEUE` pieces wait in memory).
    fn spawn(mut pipe: impl std::io::Write + Send + 'static) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(FEED_QUEUE);
        let thread = std::thread::spawn(move || {
            for piece in rx {
                pipe.write_all(&piece)?;
            }
            Ok(())
        });
        StateWriter { tx, thread }
    }

    /// Queues `bytes` in pieces, waiting at most `stall` for room for each one: a reader
    /// that stops reading fails the feed instead of holding the destination.
    fn feed(&self, bytes: &[u8], stall: Duration) -> Result<(), String> {
        use std::sync::mpsc::TrySendError;
        for piece in bytes.chunks(FEED_PIECE) {
            let mut piece = piece.to_vec();
            let since = Instant::now();
            loop {
                match self.tx.try_send(piece) {
                    Ok(()) => break,
                    Err(TrySendError::Full(p)) if since.elapsed() < stall => {
                        piece = p;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(TrySendError::Full(_)) => {
                        return Err(format!("QEMU read none of the device state for {stall:?}"))
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        return Err("QEMU stopped reading the device state".into())
                    }
                }
            }
        }
        Ok(())
    }

    /// Closes the queue and waits at most `stall` for the writer to put the rest into the
    /// pipe; the writer's own result (a closed pipe) comes back as the inner result.
    fn close(self, stall: Duration) -> Result<std::io::Result<()>, String> {
        drop(self.tx);
        let since = Instant::now();
        while !self.thread.is_finished() {
            if since.elapsed() > stall {
                return Err(format!("QEMU read none of the device state for {stall:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self.thread.join().expect("the state writer does not panic"))
    }
}

/// Pieces the destination hands its consumer at a time.
const FEED_PIECE: usize = 1 << 20;
/// Pieces queued for the writer at most (64 MiB), so that the driver rarely waits for QEMU.
const FEED_QUEUE: usize = 64;
/// Longest a QEMU may leave the state pipe unread (full) before the consumer gives up on it:
/// a QEMU that stops loading must not hold the destination (spec: LIVE-1). The bound QEMU's
/// own load has.
const FEED_STALL: Duration = crate::vmm::qemu::STATE_TIMEOUT;

impl StateConsumer {
    /// Digested and dropped (a workload that takes no device state).
    pub fn digest_only() -> Self {
        Self::with(ConsumerKind::DigestOnly)
    }

    /// Kept in memory; `data()` has it.
    pub fn memory() -> Self {
        Self::with(ConsumerKind::Memory)
    }

    /// Written to `path` as it arrives (into a file beside it, renamed over it on commit).
    pub fn file(path: PathBuf) -> Self {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        Self::with(ConsumerKind::File {
            path,
            partial: PathBuf::from(partial),
            file: None,
        })
    }

    /// Loaded by the destination QEMU as it arrives.
    pub fn qemu(q: Arc<crate::vmm::qemu::QemuDest>) -> Self {
        Self::with(ConsumerKind::Qemu { q, writer: None })
    }

    fn with(kind: ConsumerKind) -> Self {
        StateConsumer {
            kind,
            len: 0,
            hash: true,
            hasher: Some(Box::default()),
            failed: None,
            data: Vec::new(),
        }
    }

    /// Bytes taken so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bytes are digested: only when the session negotiated digests.
    pub fn set_digest(&mut self, on: bool) {
        self.hash = on;
    }

    /// Whether the bytes must be handed over at all: a consumer that keeps nothing and
    /// digests nothing only counts them.
    pub fn wants_bytes(&self) -> bool {
        self.hash || !matches!(self.kind, ConsumerKind::DigestOnly)
    }

    /// Counts bytes up to `upto` without taking them (when it [wants no bytes](Self::wants_bytes)).
    pub fn skip_to(&mut self, upto: u64) {
        debug_assert!(!self.wants_bytes());
        self.len = self.len.max(upto);
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The state kept in memory (empty for the other consumers).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Takes the next bytes of the device state.
    pub fn append(&mut self, bytes: &[u8]) {
        if let Some(h) = self.hasher.as_mut().filter(|_| self.hash) {
            h.update(bytes);
        }
        self.len += bytes.len() as u64;
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.deliver(bytes) {
            self.failed = Some(e);
        }
    }

    fn deliver(&mut self, bytes: &[u8]) -> Result<(), String> {
        use std::io::Write;
        match &mut self.kind {
            ConsumerKind::DigestOnly => Ok(()),
            ConsumerKind::Memory => {
                self.data.extend_from_slice(bytes);
                Ok(())
            }
            ConsumerKind::File { partial, file, .. } => {
                if file.is_none() {
                    *file = Some(
                        std::fs::File::create(&*partial)
                            .map_err(|e| format!("creating {}: {e}", partial.display()))?,
                    );
                }
                let f = file.as_mut().expect("created above");
                f.write_all(bytes)
                    .map_err(|e| format!("writing {}: {e}", partial.display()))
            }
            ConsumerKind::Qemu { q, writer } => {
                if writer.is_none() {
                    let pipe = q.begin_load().map_err(|e| e.to_string())?;
                    *writer = Some(StateWriter::spawn(pipe));
                }
                let w = writer.as_ref().expect("started above");
                w.feed(bytes, FEED_STALL)
            }
        }
    }

    /// Every byte is in: lets the consumer finish taking it (QEMU loads the rest; the file is
    /// flushed) and returns the digest of all bytes taken (XXH3-64, spec: STATE-5).
    pub fn finish(&mut self) -> Result<u64, String> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if matches!(self.kind, ConsumerKind::Qemu { writer: None, .. }) {
            // An empty state still makes QEMU load (and check) its stream's end.
            self.deliver(&[])?;
        }
        match &mut self.kind {
            ConsumerKind::DigestOnly | ConsumerKind::Memory => {}
            ConsumerKind::File { partial, file, .. } => {
                let f = match file.take() {
                    Some(f) => f,
                    None => std::fs::File::create(&*partial)
                        .map_err(|e| format!("creating {}: {e}", partial.display()))?,
                };
                f.sync_all()
                    .map_err(|e| format!("writing {}: {e}", partial.display()))?;
            }
            ConsumerKind::Qemu { q, writer } => {
                let w = writer.take().expect("started above");
                // Bounded: a QEMU that stops reading leaves the writer blocked in the pipe.
                let written = w.close(FEED_STALL)?;
                // QEMU's own verdict first: it says why it stopped reading.
                q.finish_load().map_err(|e| e.to_string())?;
                written.map_err(|e| format!("writing the device state to QEMU: {e}"))?;
            }
        }
        let h = self
            .hasher
            .take()
            .ok_or("the device state was finished twice")?;
        Ok(if self.hash { h.digest() } else { 0 })
    }

    /// After COMMIT: a `--state-out` file takes its name.
    pub fn commit(&mut self) -> Result<(), String> {
        if let ConsumerKind::File { path, partial, .. } = &self.kind {
            std::fs::rename(partial, path).map_err(|e| {
                format!("renaming {} to {}: {e}", partial.display(), path.display())
            })?;
        }
        Ok(())
    }

    /// After an abort: nothing of the state is kept (a QEMU that was loading sees its pipe
    /// close and fails its incoming migration; the driver's discard then deals with it).
    pub fn discard(&mut self) {
        match &mut self.kind {
            ConsumerKind::DigestOnly => {}
            ConsumerKind::Memory => self.data.clear(),
            ConsumerKind::File { partial, file, .. } => {
                file.take();
                let _ = std::fs::remove_file(&*partial);
            }
            ConsumerKind::Qemu { writer, .. } => {
                // Not joined: a writer blocked in a pipe QEMU no longer reads ends when that
                // QEMU is stopped (or with this process), and nothing waits for it.
                if let Some(w) = writer.take() {
                    drop(w.tx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LIVE-1: a QEMU that stops reading its state pipe fails the feed within the bound,
    /// whether the queue fills (feed) or the last pieces never leave it (close).
    #[test]
    fn live_1_a_state_reader_that_stops_reading_fails_the_feed_within_the_bound() {
        let stall = Duration::from_millis(200);
        let (unread, pipe) = std::io::pipe().unwrap();
        let w = StateWriter::spawn(pipe);
        let t = Instant::now();
        let bytes = vec![7u8; (FEED_QUEUE + 4) * FEED_PIECE];
        let e = w.feed(&bytes, stall).unwrap_err();
        assert!(e.contains("read none"), "{e}");
        assert!(t.elapsed() < stall * 5, "{:?}", t.elapsed());
        let e = w.close(stall).unwrap_err();
        assert!(e.contains("read none"), "{e}");
        drop(unread);

        // A reader that went away: the writer's pipe breaks and the feed says so.
        let (gone, pipe) = std::io::pipe().unwrap();
        drop(gone);
        let w = StateWriter::spawn(pipe);
        let e = w.feed(&bytes, stall).unwrap_err();
        assert!(e.contains("stopped reading"), "{e}");

        // A reader that reads: everything arrives, in order.
        let (mut reader, pipe) = std::io::pipe().unwrap();
        let got = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut v).unwrap();
            v
        });
        let w = StateWriter::spawn(pipe);
        let bytes: Vec<u8> = (0..3 * FEED_PIECE + 5).map(|i| i as u8).collect();
        w.feed(&bytes, stall).unwrap();
        w.close(stall).unwrap().unwrap();
        assert!(got.join().unwrap() == bytes);
    }

    #[test]
    fn pid_pause_waits_for_stopped_state_and_resume_continues() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let w = SourceWorkload::Pid(child.id() as i32);
        w.pause().unwrap();
        assert_eq!(process_state(child.id() as i32), Some('T'));
        w.resume().unwrap();
        // SIGCONT is delivered asynchronously: the state leaves 'T' soon after.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while process_state(child.id() as i32) == Some('T') && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(process_state(child.id() as i32), Some('T'));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn failing_hook_is_an_error_and_output_is_the_state() {
        let w = SourceWorkload::Hooks {
            pause: "printf state-bytes".into(),
            resume: Some("false".into()),
        };
        assert_eq!(w.pause().unwrap(), b"state-bytes");
        assert!(matches!(w.resume(), Err(ControlError::Hook { .. })));
    }
}
