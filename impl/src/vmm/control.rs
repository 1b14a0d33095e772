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
    /// Starts the workload with the device state received; `digests` are the chunk digests
    /// of the memory received, when the migration verified them.
    pub fn start(&self, state: &[u8], digests: Option<&[u64]>) -> Result<(), ControlError> {
        if let Some(s) = &self.save {
            // spec: SAVE-3: the footer is what a commit makes of a save.
            let d = digests.ok_or_else(|| ControlError::Save("no verified digests".into()))?;
            s.finish(state, d)
                .map_err(|e| ControlError::Save(e.to_string()))?;
        }
        if let Some(q) = &self.qemu {
            q.load_and_run(state)?;
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

/// Where the destination writes device state.
#[derive(Debug, Clone, Default)]
pub struct StateSink {
    pub path: Option<PathBuf>,
    pub data: Vec<u8>,
}

impl StateSink {
    pub fn store(&mut self, offset: u32, bytes: &[u8]) {
        let end = offset as usize + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[offset as usize..end].copy_from_slice(bytes);
    }

    /// Writes the state file once the migration is committed.
    pub fn persist(&self) -> std::io::Result<()> {
        match &self.path {
            Some(p) => std::fs::write(p, &self.data),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
