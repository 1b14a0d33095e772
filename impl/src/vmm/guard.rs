//! The guard of a paused workload (spec: section 7.3, "the source process dies").
//!
//! `rdmig send` starts the guard, a small `rdmig guard` process of its own process group, and
//! holds a pipe to its standard input. Before pausing the workload the source arms it; before
//! COMMIT leaves it disarms it (the source relinquished the workload: nothing may resume it any
//! more, spec: SW-6); after resuming the workload itself, or at the end, it releases it. When
//! the pipe closes (the source exited, or was killed with -9) an armed guard resumes the
//! workload; a disarmed or released one does nothing. Bytes written to a pipe before the writer
//! dies are still read, so a disarm that was written is never missed.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

/// How the guard resumes the workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// SIGCONT to a process.
    Pid(i32),
    /// A shell command.
    Command(String),
    /// `cont` over QMP, then the migration capabilities put back (JSON arguments of
    /// `migrate-set-capabilities`).
    Qemu { qmp: PathBuf, caps: String },
}

impl Resume {
    /// The `rdmig guard` arguments that describe it.
    fn args(&self) -> Vec<String> {
        match self {
            Resume::Pid(p) => vec!["--pid".into(), p.to_string()],
            Resume::Command(c) => vec!["--resume-cmd".into(), c.clone()],
            Resume::Qemu { qmp, caps } => vec![
                "--qemu-qmp".into(),
                qmp.display().to_string(),
                "--qemu-caps".into(),
                caps.clone(),
            ],
        }
    }

    /// Resumes the workload (what the guard does when its source died armed).
    pub fn run(&self) -> Result<(), String> {
        match self {
            Resume::Pid(pid) => super::control::SourceWorkload::Pid(*pid)
                .resume()
                .map_err(|e| e.to_string()),
            Resume::Command(c) => super::control::SourceWorkload::Hooks {
                pause: String::new(),
                resume: Some(c.clone()),
            }
            .resume()
            .map_err(|e| e.to_string()),
            Resume::Qemu { qmp, caps } => {
                let caps: serde_json::Value =
                    serde_json::from_str(caps).map_err(|e| format!("--qemu-caps: {e}"))?;
                super::qemu::resume_orphaned(qmp, &caps).map_err(|e| e.to_string())
            }
        }
    }
}

/// What the source tells its guard, one byte each.
const ARM: u8 = b'A';
const DISARM: u8 = b'D';
const RELEASE: u8 = b'R';

/// The source's handle on its guard.
pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Guard {
    /// Starts `exe guard ...` (the running `rdmig`) in a process group of its own, so the
    /// terminal's SIGINT does not reach it.
    pub fn spawn(exe: &std::path::Path, resume: &Resume) -> io::Result<Guard> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(exe)
            .arg("guard")
            .args(resume.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take();
        Ok(Guard { child, pipe })
    }

    fn tell(&mut self, b: u8) -> io::Result<()> {
        match &mut self.pipe {
            Some(p) => p.write_all(&[b]),
            None => Ok(()),
        }
    }

    /// The workload is about to be paused: resume it should the source die.
    pub fn arm(&mut self) -> io::Result<()> {
        self.tell(ARM)
    }

    /// COMMIT is about to leave: never resume (spec: SW-6). Written before COMMIT is sent, so
    /// a source that dies after it leaves the guard disarmed.
    pub fn disarm(&mut self) -> io::Result<()> {
        self.tell(DISARM)
    }

    /// The source resumed the workload itself, or the migration ended: nothing to do.
    pub fn release(&mut self) -> io::Result<()> {
        self.tell(RELEASE)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing the pipe ends the guard; it acts only if it is still armed.
        self.pipe.take();
        let _ = self.child.wait();
    }
}

/// The guard process: reads its orders until the pipe closes, then resumes the workload if it
/// is armed. Returns what it did, for its log line.
pub fn run(resume: &Resume, mut orders: impl Read) -> Result<&'static str, String> {
    let mut armed = false;
    let mut buf = [0u8; 64];
    loop {
        let n = match orders.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for &b in &buf[..n] {
            match b {
                ARM => armed = true,
                DISARM | RELEASE => return Ok("released"),
                _ => {}
            }
        }
    }
    if !armed {
        return Ok("not armed");
    }
    resume.run()?;
    Ok("resumed the workload of a source that died")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(b: &[u8]) -> &[u8] {
        b
    }

    #[test]
    fn an_armed_guard_resumes_when_its_source_dies() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("resumed");
        let r = Resume::Command(format!("touch {}", mark.display()));
        assert_eq!(
            run(&r, orders(b"A")),
            Ok("resumed the workload of a source that died")
        );
        assert!(mark.exists());
    }

    #[test]
    fn a_disarmed_or_released_guard_never_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("resumed");
        let r = Resume::Command(format!("touch {}", mark.display()));
        assert_eq!(run(&r, orders(b"AD")), Ok("released"));
        assert_eq!(run(&r, orders(b"AR")), Ok("released"));
        assert_eq!(run(&r, orders(b"")), Ok("not armed"));
        assert!(
            !mark.exists(),
            "the guard resumed a workload it had given up"
        );
    }
}
