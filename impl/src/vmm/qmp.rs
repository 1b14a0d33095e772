//! A small QMP client: QEMU's JSON machine protocol on a unix socket.
//!
//! One command at a time, answered in order; events that arrive in between are skipped (rdmig
//! polls state with queries instead). QEMU is a local peer but its replies are still bounded: a line longer than
//! [`MAX_LINE`] or a reply that is not a JSON object ends the session with a typed error.

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Longest reply line accepted (QEMU's largest replies, e.g. `qom-list-types`, are far below).
pub const MAX_LINE: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("no reply from QEMU within {0:?}")]
    Timeout(Duration),
    #[error("malformed QMP reply: {0}")]
    Protocol(String),
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An open, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// QEMU's version from the greeting, `(major, minor, micro)`.
    pub version: (u64, u64, u64),
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|err| QmpError::Connect {
            path: path.display().to_string(),
            err,
        })?;
        Qmp::from_stream(stream, timeout)
    }

    /// Like [`Qmp::connect`], retrying while the socket does not exist or refuses, until
    /// `wait` has passed (for a QEMU that is still starting).
    pub fn connect_retry(path: &Path, timeout: Duration, wait: Duration) -> Result<Qmp, QmpError> {
        let t = Instant::now();
        loop {
            match Qmp::connect(path, timeout) {
                Err(QmpError::Connect { err, .. })
                    if t.elapsed() < wait
                        && matches!(
                            err.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r,
            }
        }
    }

    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            version: (0, 0, 0),
        };
        let greeting = q.read_message()?;
        let v = greeting
            .get("QMP")
            .and_then(|g| g.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| QmpError::Protocol("greeting without QMP.version.qemu".into()))?;
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        q.version = (num("major"), num("minor"), num("micro"));
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The process ID of QEMU, from the socket's peer credentials.
    pub fn peer_pid(&self) -> Option<i32> {
        rustix::net::sockopt::socket_peercred(&self.writer)
            .ok()
            .map(|c| c.pid.as_raw_nonzero().get())
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let (id, line) = self.encode(command, arguments);
        self.writer.write_all(line.as_bytes())?;
        self.reply(command, id)
    }

    /// Runs one command with a file descriptor attached (SCM_RIGHTS), as `getfd` and
    /// `add-fd` expect.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        use std::mem::MaybeUninit;
        let (id, line) = self.encode(command, arguments);
        let bytes = line.as_bytes();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        let fds = [fd];
        if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(QmpError::Protocol("no room for the descriptor".into()));
        }
        let sent = sendmsg(
            self.writer.as_fd(),
            &[IoSlice::new(bytes)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        )
        .map_err(std::io::Error::from)?;
        self.writer.write_all(&bytes[sent..])?;
        self.reply(command, id)
    }

    fn encode(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut m = Map::new();
        m.insert("execute".into(), json!(command));
        if let Some(a) = arguments {
            m.insert("arguments".into(), a);
        }
        m.insert("id".into(), json!(id));
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        (id, line)
    }

    fn reply(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        loop {
            let mut msg = self.read_message()?;
            if msg.get("event").is_some() {
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!(
                    "reply to {command} carries id {:?}, expected {id}",
                    msg.get("id")
                )));
            }
            if let Some(r) = msg.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = msg.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply to {command} has neither return nor error"
            )));
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    let t = self.writer.read_timeout().ok().flatten();
                    QmpError::Timeout(t.unwrap_or_default())
                }
                _ => QmpError::Io(e),
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if n > MAX_LINE {
                QmpError::Protocol(format!("reply longer than {MAX_LINE} bytes"))
            } else {
                QmpError::Closed
            });
        }
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| QmpError::Protocol(format!("not JSON: {e}")))?;
        if !v.is_object() {
            return Err(QmpError::Protocol("reply is not a JSON object".into()));
        }
        Ok(v)
    }
}

/// A scripted QMP peer for tests: answers each command by name from a table.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    /// Commands seen, with their arguments, in order.
    pub type Log = Arc<Mutex<Vec<(String, Value)>>>;

    /// How the fake answers a command: a reply object (`{"return": ..}` or `{"error": ..}`)
    /// computed from the arguments and the count of earlier calls of the same command.
    pub type Handler = Box<dyn FnMut(&Value, usize) -> Value + Send>;

    /// Serves one connection on a fresh socket; returns its path and the command log.
    pub fn serve(
        dir: &Path,
        mut handlers: HashMap<&'static str, Handler>,
    ) -> (std::path::PathBuf, Log) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("qmp-{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let log: Log = Arc::default();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(
                w,
                r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}, "package": ""}}, "capabilities": []}}}}"#
            )
            .unwrap();
            let mut counts: HashMap<String, usize> = HashMap::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let args = v.get("arguments").cloned().unwrap_or(Value::Null);
                log2.lock().unwrap().push((cmd.clone(), args.clone()));
                let n = counts.entry(cmd.clone()).or_default();
                let mut reply = match handlers.get_mut(cmd.as_str()) {
                    Some(h) => h(&args, *n),
                    None if cmd == "qmp_capabilities" => json!({"return": {}}),
                    None => json!({"error": {"class": "CommandNotFound",
                        "desc": format!("The command {cmd} has not been found")}}),
                };
                *n += 1;
                if reply.get("close").is_some() {
                    return;
                }
                reply["id"] = v["id"].clone();
                writeln!(w, r#"{{"event": "STOP", "data": {{}}}}"#).unwrap();
                writeln!(w, "{reply}").unwrap();
            }
        });
        (path, log)
    }

    pub fn ret(v: Value) -> Handler {
        Box::new(move |_, _| json!({ "return": v.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn negotiates_and_returns_values_skipping_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut h: HashMap<&'static str, Handler> = HashMap::new();
        h.insert(
            "query-status",
            ret(json!({"running": true, "status": "running"})),
        );
        let (p, log) = serve(dir.path(), h);
        let mut q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version, (10, 0, 2));
        let r = q.execute("query-status", None).unwrap();
        // The fake sends an event before every reply: it is skipped, not taken as the reply.
        assert_eq!(r["status"], "running");
        assert_eq!(log.lock().unwrap()[0].0, "qmp_capabilities");
    }

    #[test]
    fn command_error_carries_class_and_description() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = serve(dir.path(), HashMap::new());
        let mut q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        match q.execute("no-such-command", None) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("no-such-command"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn closed_connection_and_silence_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut h: HashMap<&'static str, Handler> = HashMap::new();
        h.insert("quit", Box::new(|_, _| json!({"close": true})));
        let (p, _) = serve(dir.path(), h);
        let mut q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        assert!(matches!(q.execute("quit", None), Err(QmpError::Closed)));

        // A peer that accepts but never greets.
        let path = dir.path().join("silent.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || l.accept().map(|(s, _)| s));
        let e = Qmp::connect(&path, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, QmpError::Timeout(_)), "{e}");
        drop(t.join());
    }

    #[test]
    fn oversized_or_non_object_replies_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "[1,2]\n".to_string(),
            format!("{}\n", "x".repeat(MAX_LINE + 10)),
        ] {
            let path = dir.path().join("bad.sock");
            let _ = std::fs::remove_file(&path);
            let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let _ = s.write_all(bad.as_bytes());
                s
            });
            let e = Qmp::connect(&path, Duration::from_secs(5)).unwrap_err();
            assert!(matches!(e, QmpError::Protocol(_)), "{e}");
            drop(t.join());
        }
    }

    #[test]
    fn descriptor_passing_reaches_the_peer() {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        use std::io::IoSliceMut;
        use std::mem::MaybeUninit;
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            writeln!(
                w,
                r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 2, "major": 9}}}}}}}}"#
            )
            .unwrap();
            let mut got_fd = None;
            for _ in 0..2 {
                let mut buf = [0u8; 4096];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut cmsg = RecvAncillaryBuffer::new(&mut space);
                let r = recvmsg(
                    &b,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut cmsg,
                    RecvFlags::empty(),
                )
                .unwrap();
                for m in cmsg.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = m {
                        got_fd = fds.into_iter().next();
                    }
                }
                let v: Value = serde_json::from_slice(&buf[..r.bytes]).unwrap();
                writeln!(w, "{}", json!({"return": {}, "id": v["id"]})).unwrap();
            }
            got_fd
        });
        let mut q = Qmp::from_stream(a, Duration::from_secs(5)).unwrap();
        let (mut rd, wr) = std::io::pipe().unwrap();
        q.execute_with_fd("getfd", Some(json!({"fdname": "x"})), wr.as_fd())
            .unwrap();
        drop(wr);
        let fd = server.join().unwrap().expect("descriptor received");
        let mut f = std::fs::File::from(fd);
        f.write_all(b"through the passed fd").unwrap();
        drop(f);
        let mut s = String::new();
        rd.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the passed fd");
    }
}
