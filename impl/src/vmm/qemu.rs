//! Migrating a QEMU guest whose RAM lives in shared files.
//!
//! rdmig moves the RAM files live; QEMU moves only its device state, with the migration
//! capability `x-ignore-shared` on both sides, through a pipe whose end is passed over QMP
//! (`getfd`, then `migrate fd:` / `migrate-incoming fd:`). The state bytes travel inside the
//! rdmig session as its device state (spec: SW-3 on the control channel, or STATE-3 streamed
//! over the data channels), so the guest switches over inside the same two-phase commit as its
//! memory. RAM QEMU keeps privately (a `memory-backend-ram`, or a file mapped without
//! `share=on`) is part of that stream: it moves, but all of it inside the downtime, so a
//! guest whose private RAM exceeds the operator's limit is refused.
//!
//! The destination QEMU loads the state as it arrives, with its autostart turned off (`stop`
//! while in `inmigrate`), and runs only on `cont` after COMMIT (spec: STATE-4, SW-7).

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vmm::qmp::{Qmp, QmpError};

/// Name under which the state pipe is registered with QEMU.
const STATE_FD: &str = "rdmig-state";
/// Where [`QemuSource::save_with`] hands each piece of the device state, in order.
pub type StateSink<'a> = Box<dyn FnMut(&[u8]) -> std::io::Result<()> + Send + 'a>;

/// QEMU's migration bandwidth while it saves a stopped guest's state: no limit that matters.
const UNTHROTTLED: u64 = 1 << 40;
/// The state pipe's buffer: the kernel's default 64 KiB makes QEMU and rdmig switch turns
/// every 64 KiB of a state that may hold gigabytes of private RAM.
const STATE_PIPE_BYTES: usize = 1 << 20;

/// A pipe for the device state, its buffer enlarged where the system allows.
fn state_pipe() -> Result<(std::io::PipeReader, std::io::PipeWriter), QemuError> {
    let (rd, wr) = std::io::pipe().map_err(|err| QemuError::Io {
        what: "creating the state pipe",
        err,
    })?;
    // Only a hint: /proc/sys/fs/pipe-max-size may be lower, and the default works too.
    let _ = rustix::pipe::fcntl_setpipe_size(&wr, STATE_PIPE_BYTES);
    Ok((rd, wr))
}
/// How long a single QMP reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long saving or loading the device state may take.
pub(crate) const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest device state accepted from QEMU (the wire bound, spec: SW-3).
const MAX_STATE: usize = rdmig_model::wire::MAX_DEVICE_STATE as usize;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QEMU {0} has no x-ignore-shared migration capability: it cannot leave RAM out of its migration stream")]
    NoIgnoreShared(String),
    #[error("the guest has no memory backend objects: start QEMU with -object memory-backend-file,id=ID,size=SIZE,mem-path=FILE,share=on -machine memory-backend=ID")]
    NoBackend,
    #[error("the guest has {private} bytes of private RAM ({ids}), which QEMU moves inside its device state, all of it during the downtime; the limit is {limit} bytes (rdmig send --max-private-ram; a save file keeps none): give that RAM as shared files (-object memory-backend-file,...,share=on) that rdmig copies live, or raise the limit")]
    PrivateTooLarge {
        private: u64,
        ids: String,
        limit: u64,
    },
    #[error("guest RAM backend {id:?} ({path}) is not shared: add share=on, or writes stay private to QEMU and never reach the file")]
    NotShared { id: String, path: String },
    #[error("guest RAM backend {id:?} maps {path}, which is not given with --ram")]
    BackendNotGiven { id: String, path: String },
    #[error("--ram {0} is not a RAM backend of this guest")]
    RamNotBackend(String),
    #[error("guest RAM backend {id:?} holds {backend} bytes but {path} has {file}")]
    SizeMismatch {
        id: String,
        path: String,
        backend: u64,
        file: u64,
    },
    #[error("{who} QEMU is {status:?}; {need}")]
    BadStatus {
        who: &'static str,
        status: String,
        need: &'static str,
    },
    #[error("QEMU migration of the device state failed: {0}")]
    MigrateFailed(String),
    #[error("QEMU's device state exceeds {MAX_STATE} bytes")]
    StateTooLarge,
    #[error("destination QEMU exited while {0}")]
    Exited(String),
    #[error("{0} took longer than {STATE_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("{what}: {err}")]
    Io {
        what: &'static str,
        err: std::io::Error,
    },
}

/// A memory backend object of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub kind: String,
    pub mem_path: Option<String>,
    pub share: bool,
    pub size: u64,
}

impl Backend {
    /// The shared file it maps: none for RAM QEMU keeps privately (a `memory-backend-ram`,
    /// or a file without `share=on`), which travels inside its device state.
    pub fn shared_file(&self) -> Option<&String> {
        self.mem_path.as_ref().filter(|_| self.share)
    }
}

/// Lists the guest's memory backends (`/objects/*` of type `memory-backend-*`).
pub fn backends(q: &mut Qmp) -> Result<Vec<Backend>, QemuError> {
    let list = q.execute("qom-list", Some(json!({"path": "/objects"})))?;
    let mut out = Vec::new();
    for o in list.as_array().into_iter().flatten() {
        let (Some(name), Some(ty)) = (o["name"].as_str(), o["type"].as_str()) else {
            continue;
        };
        let Some(kind) = ty
            .strip_prefix("child<")
            .and_then(|t| t.strip_suffix('>'))
            .filter(|t| t.starts_with("memory-backend"))
        else {
            continue;
        };
        let path = format!("/objects/{name}");
        let mut get =
            |prop: &str| q.execute("qom-get", Some(json!({"path": path, "property": prop})));
        let size = get("size")?.as_u64().unwrap_or(0);
        let share = get("share")?.as_bool().unwrap_or(false);
        let mem_path = if kind == "memory-backend-file" {
            get("mem-path")?.as_str().map(str::to_string)
        } else {
            None
        };
        out.push(Backend {
            id: name.to_string(),
            kind: kind.to_string(),
            mem_path,
            share,
            size,
        });
    }
    Ok(out)
}

/// A RAM file given on the command line, with the size it must have.
#[derive(Debug, Clone)]
pub struct RamFile {
    pub path: PathBuf,
    pub size: u64,
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Checks that the guest's shared RAM is exactly the given files, each of the given size, and
/// that its private RAM (backends that are no shared file) is at most `max_private` bytes;
/// returns the private RAM's size.
pub fn check_backends(
    found: &[Backend],
    ram: &[RamFile],
    max_private: u64,
) -> Result<u64, QemuError> {
    if found.is_empty() {
        return Err(QemuError::NoBackend);
    }
    let mut used = vec![false; ram.len()];
    let (mut private, mut ids) = (0u64, Vec::new());
    for b in found {
        let Some(path) = b.shared_file() else {
            // A file given with --ram must be shared, or QEMU's writes never reach it.
            if let Some(path) = &b.mem_path {
                let c = canonical(Path::new(path));
                if ram.iter().any(|r| canonical(&r.path) == c) {
                    return Err(QemuError::NotShared {
                        id: b.id.clone(),
                        path: path.clone(),
                    });
                }
            }
            private += b.size;
            ids.push(format!("{} {}", b.kind, b.id));
            continue;
        };
        let c = canonical(Path::new(path));
        let Some(i) = ram.iter().position(|r| canonical(&r.path) == c) else {
            return Err(QemuError::BackendNotGiven {
                id: b.id.clone(),
                path: path.clone(),
            });
        };
        if ram[i].size != b.size {
            return Err(QemuError::SizeMismatch {
                id: b.id.clone(),
                path: path.clone(),
                backend: b.size,
                file: ram[i].size,
            });
        }
        used[i] = true;
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(QemuError::RamNotBackend(ram[i].path.display().to_string()));
    }
    if private > max_private {
        return Err(QemuError::PrivateTooLarge {
            private,
            ids: ids.join(", "),
            limit: max_private,
        });
    }
    Ok(private)
}

fn status(q: &mut Qmp) -> Result<String, QemuError> {
    let s = q.execute("query-status", None)?;
    Ok(s["status"].as_str().unwrap_or("unknown").to_string())
}

/// Turns on x-ignore-shared (and off what cannot go through one fd), after checking QEMU has it.
/// Returns the capabilities as they were, for [`restore_capabilities`]: a QEMU left with
/// x-ignore-shared on would leave its RAM out of any later migration of its own.
fn enable_ignore_shared(q: &mut Qmp) -> Result<Value, QemuError> {
    let caps = q.execute("query-migrate-capabilities", None)?;
    let caps = caps.as_array().cloned().unwrap_or_default();
    let has = |name: &str| caps.iter().any(|c| c["capability"] == name);
    let on = |name: &str| {
        caps.iter()
            .any(|c| c["capability"] == name && c["state"] == true)
    };
    if !has("x-ignore-shared") {
        let (a, b, c) = q.version;
        return Err(QemuError::NoIgnoreShared(format!("{a}.{b}.{c}")));
    }
    let mut set = vec![json!({"capability": "x-ignore-shared", "state": true})];
    let mut before = vec![json!({"capability": "x-ignore-shared", "state": on("x-ignore-shared")})];
    // The device state goes through one pipe: no multifd channels, no post-copy.
    for off in ["multifd", "postcopy-ram", "mapped-ram"] {
        if on(off) {
            set.push(json!({"capability": off, "state": false}));
            before.push(json!({"capability": off, "state": true}));
        }
    }
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": set })),
    )?;
    Ok(json!({ "capabilities": before }))
}

/// Puts back the capabilities [`enable_ignore_shared`] changed.
fn restore_capabilities(q: &Mutex<Qmp>, before: &Value) {
    let mut q = q.lock().expect("not poisoned");
    if let Err(e) = q.execute("migrate-set-capabilities", Some(before.clone())) {
        tracing::warn!("restoring QEMU's migration capabilities: {e}");
    }
}

/// Polls `query-migrate` until the migration completes or fails.
fn wait_migration(q: &mut Qmp, what: &'static str) -> Result<(), QemuError> {
    let t = Instant::now();
    loop {
        let m = q.execute("query-migrate", None)?;
        match m["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = m["error-desc"].as_str().unwrap_or("no reason given");
                return Err(QemuError::MigrateFailed(why.to_string()));
            }
            _ if t.elapsed() > STATE_TIMEOUT => return Err(QemuError::Timeout(what)),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// What the guard of a dead `rdmig send` does to its QEMU (spec: section 7.3): cancel the
/// device-state save if one is under way, let the guest run, and put the migration
/// capabilities back as they were.
pub fn resume_orphaned(sock: &Path, caps_before: &Value) -> Result<(), QemuError> {
    let mut q = Qmp::connect(sock, REPLY_TIMEOUT)?;
    let _ = q.execute("migrate_cancel", None);
    q.execute("cont", None)?;
    q.execute("migrate-set-capabilities", Some(caps_before.clone()))?;
    Ok(())
}

/// The source guest, driven over its QMP socket.
pub struct QemuSource {
    qmp: Mutex<Qmp>,
    pid: Option<i32>,
    version: String,
    caps_before: Value,
    /// Bytes of RAM QEMU keeps privately: they travel in its device state.
    private_ram: u64,
}

impl std::fmt::Debug for QemuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QemuSource(QEMU {}, pid {:?})", self.version, self.pid)
    }
}

impl QemuSource {
    /// Connects and checks everything that can be checked before any byte moves: the guest
    /// runs (or is paused), its RAM is exactly the given shared files, and QEMU can leave them
    /// out of its own stream. Then turns x-ignore-shared on.
    pub fn attach(sock: &Path, ram: &[RamFile], max_private: u64) -> Result<QemuSource, QemuError> {
        let mut q = Qmp::connect(sock, REPLY_TIMEOUT)?;
        let st = status(&mut q)?;
        if st != "running" && st != "paused" {
            return Err(QemuError::BadStatus {
                who: "the source",
                status: st,
                need: "it must be running or paused",
            });
        }
        let m = q.execute("query-migrate", None)?;
        if let Some(s @ ("setup" | "active" | "device" | "pre-switchover" | "cancelling")) =
            m["status"].as_str()
        {
            return Err(QemuError::BadStatus {
                who: "a migration of the source",
                status: s.into(),
                need: "finish or cancel it first",
            });
        }
        let private_ram = check_backends(&backends(&mut q)?, ram, max_private)?;
        let caps_before = enable_ignore_shared(&mut q)?;
        let (a, b, c) = q.version;
        Ok(QemuSource {
            private_ram,
            caps_before,
            pid: q.peer_pid(),
            version: format!("{a}.{b}.{c}"),
            qmp: Mutex::new(q),
        })
    }

    /// QEMU's process ID (for soft-dirty tracking of its mappings).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Bytes of guest RAM that are no shared file: QEMU sends them in its device state.
    pub fn private_ram(&self) -> u64 {
        self.private_ram
    }

    /// Stops the guest (a save that is not live stops it before copying its memory).
    pub fn stop(&self) -> Result<(), QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        q.execute("stop", None)?;
        Ok(())
    }

    /// Stops the guest and saves its device state (everything but the shared RAM).
    pub fn stop_and_save(&self) -> Result<Vec<u8>, QemuError> {
        self.stop()?;
        let mut buf = Vec::new();
        let mut too_large = false;
        self.save_with(Box::new(|bytes: &[u8]| {
            if buf.len() + bytes.len() > MAX_STATE {
                too_large = true;
                return Err(std::io::Error::other("device state too large"));
            }
            buf.extend_from_slice(bytes);
            Ok(())
        }))
        .map_err(|e| {
            if too_large {
                QemuError::StateTooLarge
            } else {
                e
            }
        })?;
        tracing::info!("saved {} bytes of QEMU device state", buf.len());
        Ok(buf)
    }

    /// Saves the device state of the stopped guest, handing each piece to `sink` as QEMU
    /// writes it (a reader thread drains the pipe while this thread waits for QEMU). An error
    /// of the sink ends the save: QEMU's migration is cancelled.
    pub fn save_with(&self, mut sink: StateSink<'_>) -> Result<(), QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        let (mut rd, wr) = state_pipe()?;
        q.execute_with_fd("getfd", Some(json!({ "fdname": STATE_FD })), wr.as_fd())?;
        drop(wr);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    match rd.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => sink(&buf[..n])?,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                // `rd` drops here on an error: QEMU's writes then fail and its save ends.
            });
            // The guest is stopped: QEMU's bandwidth limit (128 MiB/s by default) would only
            // stretch the downtime over the private RAM the state carries. Put back after.
            let limit = q
                .execute("query-migrate-parameters", None)
                .ok()
                .and_then(|p| p["max-bandwidth"].as_u64());
            if limit.is_some() {
                let _ = q.execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": UNTHROTTLED })),
                );
            }
            let waited = q
                .execute("migrate", Some(json!({ "uri": format!("fd:{STATE_FD}") })))
                .map_err(QemuError::from)
                .and_then(|_| wait_migration(&mut q, "saving the device state"));
            if waited.is_err() {
                let _ = q.execute("migrate_cancel", None);
                // A descriptor QEMU did not take stays open in it; closing it ends the reader.
                let _ = q.execute("closefd", Some(json!({ "fdname": STATE_FD })));
            }
            if let Some(l) = limit {
                let _ = q.execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": l })),
                );
            }
            let read = reader.join().expect("the reader does not panic");
            waited?;
            read.map_err(|err| QemuError::Io {
                what: "reading the device state",
                err,
            })
        })
    }

    /// Lets the guest run again after an abort (spec: INV-OWN-2).
    pub fn resume(&self) -> Result<(), QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        q.execute("cont", None)?;
        Ok(())
    }

    /// After an abort: QEMU's migration capabilities as they were before rdmig.
    pub fn restore(&self) {
        restore_capabilities(&self.qmp, &self.caps_before);
    }

    /// The capabilities to put back, as `migrate-set-capabilities` arguments (for the guard).
    pub fn capabilities_before(&self) -> &Value {
        &self.caps_before
    }

    /// Quits the source QEMU (after commit, when asked to).
    pub fn quit(&self) -> Result<(), QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        match q.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Checks that the destination QEMU waits for an incoming migration on exactly the given RAM
/// files, then turns x-ignore-shared on; returns QEMU's version and the capabilities before.
fn check_destination(
    q: &mut Qmp,
    ram: &[RamFile],
    max_private: u64,
) -> Result<(String, Value), QemuError> {
    let st = status(q)?;
    if st != "inmigrate" {
        return Err(QemuError::BadStatus {
            who: "the destination",
            status: st,
            need: "start it with -incoming defer",
        });
    }
    let found = backends(q)?;
    check_backends(&found, ram, max_private)?;
    preallocate_private(q, &found)?;
    let before = enable_ignore_shared(q)?;
    let (a, b, c) = q.version;
    Ok((format!("{a}.{b}.{c}"), before))
}

/// Has the destination QEMU allocate its private RAM now, while it waits for the migration.
/// That RAM arrives inside the device state, during the downtime, and every page QEMU touches
/// for the first time while loading it costs a page fault and a page clear there (measured: a
/// 128 MiB private node took 206 ms to load into fresh memory, 3 to 11 ms preallocated).
/// Setting `prealloc` on a backend that exists allocates it at once; one that QEMU refuses
/// stays as it is, which costs time, not correctness. No answer within the QMP reply bound
/// leaves the session unusable (a late reply would be taken for the next one's): an error.
fn preallocate_private(q: &mut Qmp, found: &[Backend]) -> Result<(), QemuError> {
    for b in found.iter().filter(|b| b.shared_file().is_none()) {
        let t = Instant::now();
        let args =
            json!({"path": format!("/objects/{}", b.id), "property": "prealloc", "value": true});
        match q.execute("qom-set", Some(args)) {
            Ok(_) => tracing::info!(
                "destination QEMU: {} {} ({} MiB of private RAM) preallocated in {:?}",
                b.kind,
                b.id,
                b.size >> 20,
                t.elapsed()
            ),
            Err(e @ QmpError::Command { .. }) => tracing::warn!(
                "destination QEMU: {} {} not preallocated ({e}): its pages are faulted in \
                 while the device state loads, inside the downtime",
                b.kind,
                b.id
            ),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The last lines of a QEMU log, for error messages.
fn log_tail(p: &Path) -> String {
    let text = std::fs::read(p).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => String::new(),
        n => format!(
            "; QEMU said: {} (log: {})",
            lines[n.saturating_sub(4)..].join(" | "),
            p.display()
        ),
    }
}

/// The destination guest: a QEMU waiting with `-incoming defer`, started by rdmig or not.
pub struct QemuDest {
    qmp: Mutex<Qmp>,
    child: Mutex<Option<Child>>,
    /// Where a QEMU that rdmig started writes its output.
    log: Option<PathBuf>,
    version: String,
    caps_before: Value,
}

impl std::fmt::Debug for QemuDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QemuDest(QEMU {})", self.version)
    }
}

impl QemuDest {
    /// Starts `start_cmd` (if given, its output appended to `log`) and connects to its QMP
    /// socket, then checks that QEMU waits for an incoming migration on exactly the given RAM
    /// files. The started QEMU outlives rdmig when the migration completes, so it must not
    /// hold rdmig's own output open.
    pub fn attach(
        sock: &Path,
        ram: &[RamFile],
        start_cmd: Option<&str>,
        log: &Path,
        max_private: u64,
    ) -> Result<QemuDest, QemuError> {
        let io = |what, err| QemuError::Io { what, err };
        let mut child = match start_cmd {
            Some(cmd) => {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map_err(|e| io("opening the QEMU log", e))?;
                let err = out.try_clone().map_err(|e| io("opening the QEMU log", e))?;
                Some(
                    Command::new("sh")
                        .arg("-c")
                        .arg(cmd)
                        .stdin(Stdio::null())
                        .stdout(out)
                        .stderr(err)
                        .spawn()
                        .map_err(|e| io("starting the destination QEMU", e))?,
                )
            }
            None => None,
        };
        let log = start_cmd.map(|_| log.to_path_buf());
        let connected = match child.as_mut() {
            None => Qmp::connect(sock, REPLY_TIMEOUT),
            Some(c) => {
                let t = Instant::now();
                loop {
                    if let Ok(Some(st)) = c.try_wait() {
                        let tail = log.as_deref().map(log_tail).unwrap_or_default();
                        return Err(QemuError::Exited(format!("starting ({st}){tail}")));
                    }
                    match Qmp::connect_retry(sock, REPLY_TIMEOUT, Duration::from_millis(200)) {
                        Err(QmpError::Connect { .. }) if t.elapsed() < REPLY_TIMEOUT => continue,
                        r => break r,
                    }
                }
            }
        };
        let checked = connected
            .map_err(QemuError::from)
            .and_then(|mut q| check_destination(&mut q, ram, max_private).map(|c| (q, c)));
        match checked {
            Ok((qmp, (version, caps_before))) => Ok(QemuDest {
                qmp: Mutex::new(qmp),
                child: Mutex::new(child),
                log,
                version,
                caps_before,
            }),
            Err(e) => {
                // A QEMU started here that is unusable has run no guest: stop it.
                if let Some(mut c) = child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                Err(e)
            }
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    fn exited(&self, what: &str) -> QemuError {
        let mut c = self.child.lock().expect("not poisoned");
        let st = c
            .as_mut()
            .and_then(|c| c.wait().ok())
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        let tail = self.log.as_deref().map(log_tail).unwrap_or_default();
        QemuError::Exited(format!("{what}{st}{tail}"))
    }

    /// Starts loading a guest's device state: turns QEMU's autostart off (`stop` while it
    /// waits in `inmigrate`: the guest must not run when loading ends, only on COMMIT, spec:
    /// STATE-4), hands it the read end of a pipe and starts `migrate-incoming`. The caller
    /// writes the state into the returned pipe, in order, then closes it and calls
    /// [`finish_load`](Self::finish_load).
    pub fn begin_load(&self) -> Result<std::io::PipeWriter, QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        let closed = |e: QmpError, what| match e {
            QmpError::Closed | QmpError::Io(_) => self.exited(what),
            e => e.into(),
        };
        q.execute("stop", None)
            .map_err(|e| closed(e, "turning its autostart off"))?;
        let (rd, wr) = state_pipe()?;
        q.execute_with_fd("getfd", Some(json!({ "fdname": STATE_FD })), rd.as_fd())
            .map_err(|e| closed(e, "receiving the state pipe"))?;
        drop(rd);
        q.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{STATE_FD}") })),
        )
        .map_err(|e| closed(e, "starting to load the device state"))?;
        Ok(wr)
    }

    /// Waits until QEMU has loaded the whole state written to the pipe (which the caller has
    /// closed): the guest is then ready, paused.
    pub fn finish_load(&self) -> Result<(), QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        match wait_migration(&mut q, "loading the device state") {
            Ok(()) => Ok(()),
            Err(QemuError::Qmp(QmpError::Closed | QmpError::Io(_))) => {
                Err(self.exited("loading the device state"))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the loaded guest (after COMMIT); returns once QEMU reports it running.
    pub fn run(&self) -> Result<(), QemuError> {
        let mut q = self.qmp.lock().expect("not poisoned");
        let closed = |e: QmpError, what| match e {
            QmpError::Closed | QmpError::Io(_) => self.exited(what),
            e => e.into(),
        };
        // QEMU leaves `inmigrate` once loading is done: paused, as its autostart is off.
        let t = Instant::now();
        loop {
            let st = status(&mut q).map_err(|e| match e {
                QemuError::Qmp(e) => closed(e, "starting the guest"),
                e => e,
            })?;
            match st.as_str() {
                "running" => break,
                "inmigrate" if t.elapsed() < STATE_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                "paused" | "prelaunch" => {
                    q.execute("cont", None)
                        .map_err(|e| closed(e, "starting the guest"))?;
                }
                other => {
                    return Err(QemuError::BadStatus {
                        who: "the destination",
                        status: other.into(),
                        need: "it should run after loading the device state",
                    })
                }
            }
        }
        tracing::info!("destination guest running (QEMU {})", self.version);
        Ok(())
    }

    /// After an abort: a QEMU that rdmig started is stopped; one it was given stays waiting,
    /// with its migration capabilities as they were.
    pub fn discard(&self) {
        let mut c = self.child.lock().expect("not poisoned");
        if c.is_none() {
            restore_capabilities(&self.qmp, &self.caps_before);
        }
        if let Some(child) = c.as_mut() {
            let _ = self
                .qmp
                .lock()
                .map(|mut q| q.execute("quit", None).map(|_| ()));
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::qmp::fake::{ret, serve, Handler, Log};
    use serde_json::Value;
    use std::collections::HashMap;

    fn file_backend(id: &str, path: &str, size: u64, share: bool) -> Backend {
        Backend {
            id: id.into(),
            kind: "memory-backend-file".into(),
            mem_path: Some(path.into()),
            share,
            size,
        }
    }

    fn ram(path: &str, size: u64) -> RamFile {
        RamFile {
            path: path.into(),
            size,
        }
    }

    #[test]
    fn guest_ram_must_be_exactly_the_given_shared_files() {
        let ok = [file_backend("mem", "/dev/shm/g.ram", 1 << 20, true)];
        check_backends(&ok, &[ram("/dev/shm/g.ram", 1 << 20)], 0).unwrap();
        let e = check_backends(&[], &[ram("/a", 1)], 0).unwrap_err();
        assert!(matches!(e, QemuError::NoBackend), "{e}");
        let private = [file_backend("mem", "/dev/shm/g.ram", 1 << 20, false)];
        let e = check_backends(&private, &[ram("/dev/shm/g.ram", 1 << 20)], 0).unwrap_err();
        assert!(matches!(e, QemuError::NotShared { .. }), "{e}");
        let e = check_backends(&ok, &[ram("/dev/shm/g.ram", 2 << 20)], 0).unwrap_err();
        assert!(
            matches!(
                e,
                QemuError::SizeMismatch {
                    backend: 1048576,
                    file: 2097152,
                    ..
                }
            ),
            "{e}"
        );
        let e = check_backends(&ok, &[ram("/dev/shm/other.ram", 1 << 20)], 0).unwrap_err();
        assert!(matches!(e, QemuError::BackendNotGiven { .. }), "{e}");
        let e = check_backends(
            &ok,
            &[ram("/dev/shm/g.ram", 1 << 20), ram("/dev/shm/x.ram", 1)],
            0,
        )
        .unwrap_err();
        assert!(matches!(e, QemuError::RamNotBackend(_)), "{e}");
    }

    /// RAM QEMU keeps privately travels in its device state (all of it downtime): allowed up
    /// to the operator's limit, refused above it with a message that says so.
    #[test]
    fn private_guest_ram_is_counted_and_refused_above_the_limit() {
        let shared = file_backend("mem", "/dev/shm/g.ram", 1 << 20, true);
        let anon = Backend {
            id: "priv".into(),
            kind: "memory-backend-ram".into(),
            mem_path: None,
            share: false,
            size: 3 << 20,
        };
        let unshared = file_backend("vram", "/dev/shm/other.ram", 1 << 20, false);
        let found = [shared, anon, unshared];
        let files = [ram("/dev/shm/g.ram", 1 << 20)];
        assert_eq!(check_backends(&found, &files, 4 << 20).unwrap(), 4 << 20);
        let e = check_backends(&found, &files, (4 << 20) - 1).unwrap_err();
        assert!(
            matches!(e, QemuError::PrivateTooLarge { private, .. } if private == 4 << 20),
            "{e}"
        );
        let m = e.to_string();
        assert!(
            m.contains("downtime") && m.contains("--max-private-ram"),
            "{m}"
        );
        assert!(m.contains("memory-backend-ram priv"), "{m}");
    }

    /// A QEMU with one shared file backend at `path`, in `status`, with or without
    /// x-ignore-shared; `migrate_status` answers query-migrate.
    fn guest(
        path: &str,
        status: &'static str,
        ignore_shared: bool,
        migrate_status: &'static str,
    ) -> HashMap<&'static str, Handler> {
        let mut h: HashMap<&'static str, Handler> = HashMap::new();
        h.insert(
            "query-status",
            ret(json!({"status": status, "running": status == "running"})),
        );
        h.insert(
            "qom-list",
            ret(
                json!([{"name": "mem", "type": "child<memory-backend-file>"},
                       {"name": "rng0", "type": "child<rng-random>"}]),
            ),
        );
        let path = path.to_string();
        h.insert(
            "qom-get",
            Box::new(move |a: &Value, _| {
                let v = match a["property"].as_str().unwrap() {
                    "size" => json!(1 << 20),
                    "share" => json!(true),
                    "mem-path" => json!(path.clone()),
                    _ => unreachable!(),
                };
                json!({ "return": v })
            }),
        );
        let mut caps = vec![json!({"capability": "multifd", "state": true})];
        if ignore_shared {
            caps.push(json!({"capability": "x-ignore-shared", "state": false}));
        }
        h.insert("query-migrate-capabilities", ret(json!(caps)));
        h.insert("migrate-set-capabilities", ret(json!({})));
        h.insert(
            "query-migrate",
            ret(json!({"status": migrate_status, "error-desc": "state save failed"})),
        );
        for c in [
            "stop",
            "cont",
            "getfd",
            "migrate",
            "migrate_cancel",
            "migrate-incoming",
        ] {
            h.insert(c, ret(json!({})));
        }
        h
    }

    fn commands(log: &Log) -> Vec<String> {
        log.lock().unwrap().iter().map(|(c, _)| c.clone()).collect()
    }

    fn setup() -> (tempfile::TempDir, String, Vec<RamFile>) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.ram");
        std::fs::write(&f, vec![0u8; 1 << 20]).unwrap();
        let p = f.display().to_string();
        let r = vec![ram(&p, 1 << 20)];
        (dir, p, r)
    }

    #[test]
    fn source_attach_enables_ignore_shared_and_turns_multifd_off() {
        let (dir, p, r) = setup();
        let (sock, log) = serve(dir.path(), guest(&p, "running", true, "none"));
        let q = QemuSource::attach(&sock, &r, 0).unwrap();
        assert_eq!(q.version(), "10.0.2");
        let l = log.lock().unwrap();
        let (_, set) = l
            .iter()
            .find(|(c, _)| c == "migrate-set-capabilities")
            .expect("capabilities set");
        assert_eq!(
            set["capabilities"],
            json!([{"capability": "x-ignore-shared", "state": true},
                   {"capability": "multifd", "state": false}])
        );
    }

    #[test]
    fn source_without_ignore_shared_capability_is_refused_before_anything_changes() {
        let (dir, p, r) = setup();
        let (sock, log) = serve(dir.path(), guest(&p, "running", false, "none"));
        let e = QemuSource::attach(&sock, &r, 0).unwrap_err();
        assert!(
            matches!(e, QemuError::NoIgnoreShared(ref v) if v == "10.0.2"),
            "{e}"
        );
        let c = commands(&log);
        assert!(
            !c.iter()
                .any(|c| c == "stop" || c == "migrate-set-capabilities"),
            "{c:?}"
        );
    }

    #[test]
    fn source_in_wrong_state_or_mid_migration_is_refused() {
        let (dir, p, r) = setup();
        let (sock, _) = serve(dir.path(), guest(&p, "inmigrate", true, "none"));
        let e = QemuSource::attach(&sock, &r, 0).unwrap_err();
        assert!(matches!(e, QemuError::BadStatus { .. }), "{e}");
        let (sock, _) = serve(dir.path(), guest(&p, "running", true, "active"));
        let e = QemuSource::attach(&sock, &r, 0).unwrap_err();
        assert!(e.to_string().contains("\"active\""), "{e}");
    }

    #[test]
    fn failed_state_save_is_an_error_and_resume_continues_the_guest() {
        let (dir, p, r) = setup();
        let mut g = guest(&p, "running", true, "none");
        // none while attaching, failed once saving.
        g.insert(
            "query-migrate",
            Box::new(|_, n| {
                let s = if n == 0 { "none" } else { "failed" };
                json!({"return": {"status": s, "error-desc": "disk full"}})
            }),
        );
        g.insert(
            "query-migrate-parameters",
            ret(json!({"max-bandwidth": 134217728})),
        );
        g.insert("migrate-set-parameters", ret(json!({})));
        let (sock, log) = serve(dir.path(), g);
        let q = QemuSource::attach(&sock, &r, 0).unwrap();
        let e = q.stop_and_save().unwrap_err();
        assert!(
            matches!(e, QemuError::MigrateFailed(ref d) if d == "disk full"),
            "{e}"
        );
        q.resume().unwrap();
        q.restore();
        let c = commands(&log);
        let tail: Vec<_> = c.iter().rev().take(11).rev().cloned().collect();
        assert_eq!(
            tail,
            [
                "stop",
                "getfd",
                "query-migrate-parameters",
                "migrate-set-parameters",
                "migrate",
                "query-migrate",
                "migrate_cancel",
                "closefd",
                "migrate-set-parameters",
                "cont",
                "migrate-set-capabilities"
            ]
        );
        let l = log.lock().unwrap();
        // The stopped guest saves unthrottled, and QEMU's own limit is put back after.
        let limits: Vec<&Value> = l
            .iter()
            .filter(|(c, _)| c == "migrate-set-parameters")
            .map(|(_, a)| &a["max-bandwidth"])
            .collect();
        assert_eq!(limits, [&json!(UNTHROTTLED), &json!(134217728)]);
        assert_eq!(
            l.last().unwrap().1["capabilities"],
            json!([{"capability": "x-ignore-shared", "state": false},
                   {"capability": "multifd", "state": true}]),
            "capabilities put back as they were"
        );
    }

    #[test]
    fn destination_must_wait_with_incoming_defer() {
        let (dir, p, r) = setup();
        let (sock, _) = serve(dir.path(), guest(&p, "running", true, "none"));
        let e = QemuDest::attach(&sock, &r, None, &dir.path().join("log"), 0).unwrap_err();
        assert!(e.to_string().contains("-incoming defer"), "{e}");
    }

    /// A destination QEMU waiting with `-incoming defer` on the shared file at `path` plus a
    /// private `memory-backend-ram` "priv" of 1 MiB.
    fn incoming_with_private_ram(path: &str) -> HashMap<&'static str, Handler> {
        let mut g = guest(path, "inmigrate", true, "none");
        g.insert(
            "qom-list",
            ret(
                json!([{"name": "mem", "type": "child<memory-backend-file>"},
                       {"name": "priv", "type": "child<memory-backend-ram>"}]),
            ),
        );
        let path = path.to_string();
        g.insert(
            "qom-get",
            Box::new(move |a: &Value, _| {
                let private = a["path"] == "/objects/priv";
                let v = match a["property"].as_str().unwrap() {
                    "size" => json!(1 << 20),
                    "share" => json!(!private),
                    "mem-path" => json!(path.clone()),
                    _ => unreachable!(),
                };
                json!({ "return": v })
            }),
        );
        g
    }

    /// A destination QEMU with a shared file and a private backend: only the private one is
    /// preallocated before the migration (its pages would otherwise be faulted in inside the
    /// downtime), and a QEMU that refuses still takes the migration.
    #[test]
    fn destination_private_ram_is_preallocated_before_the_migration() {
        for refuse in [false, true] {
            let (dir, p, r) = setup();
            let mut g = incoming_with_private_ram(&p);
            g.insert(
                "qom-set",
                Box::new(move |_, _| match refuse {
                    false => json!({"return": {}}),
                    true => json!({"error": {"class": "GenericError", "desc": "no"}}),
                }),
            );
            let (sock, log) = serve(dir.path(), g);
            QemuDest::attach(&sock, &r, None, &dir.path().join("log"), 1 << 20).unwrap();
            let l = log.lock().unwrap();
            let sets: Vec<&Value> = l
                .iter()
                .filter(|(c, _)| c == "qom-set")
                .map(|(_, a)| a)
                .collect();
            assert_eq!(
                sets,
                [&json!({"path": "/objects/priv", "property": "prealloc", "value": true})]
            );
        }
    }

    /// A QEMU that goes away instead of answering the preallocation leaves no usable QMP
    /// session: the attach fails with it, before any migration (a refusal only warns, above).
    #[test]
    fn destination_lost_while_preallocating_fails_the_attach() {
        let (dir, p, r) = setup();
        let mut g = incoming_with_private_ram(&p);
        g.insert("qom-set", Box::new(|_, _| json!({"close": true})));
        let (sock, _) = serve(dir.path(), g);
        let e = QemuDest::attach(&sock, &r, None, &dir.path().join("log"), 1 << 20).unwrap_err();
        assert!(matches!(e, QemuError::Qmp(QmpError::Closed)), "{e}");
    }

    #[test]
    fn destination_size_mismatch_is_refused_before_the_migration() {
        let (dir, p, _) = setup();
        let (sock, _) = serve(dir.path(), guest(&p, "inmigrate", true, "none"));
        let e = QemuDest::attach(&sock, &[ram(&p, 2 << 20)], None, &dir.path().join("log"), 0)
            .unwrap_err();
        assert!(matches!(e, QemuError::SizeMismatch { .. }), "{e}");
    }

    #[test]
    fn destination_qemu_exiting_while_loading_is_a_clear_error() {
        let (dir, p, r) = setup();
        let mut g = guest(&p, "inmigrate", true, "none");
        g.insert(
            "query-migrate",
            Box::new(|_, n| {
                if n == 0 {
                    json!({"return": {"status": "active"}})
                } else {
                    json!({"close": true})
                }
            }),
        );
        let (sock, _) = serve(dir.path(), g);
        let q = QemuDest::attach(&sock, &r, None, &dir.path().join("log"), 0).unwrap();
        let wr = q.begin_load().unwrap();
        drop(wr);
        let e = q.finish_load().unwrap_err();
        assert!(
            matches!(e, QemuError::Exited(ref w) if w.contains("loading")),
            "{e}"
        );
    }

    #[test]
    fn destination_started_by_rdmig_that_dies_is_reported_with_its_status() {
        let (dir, _, r) = setup();
        let sock = dir.path().join("never.sock");
        let log = dir.path().join("qemu.log");
        let cmd = "echo 'qemu: could not load kernel' >&2; exit 7";
        let e = QemuDest::attach(&sock, &r, Some(cmd), &log, 0).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("exit status: 7"), "{m}");
        assert!(m.contains("QEMU said: qemu: could not load kernel"), "{m}");
    }
}
