//! What the process tests share: a scratch folder, keys, the synthetic workload, `rdmig recv`
//! and `rdmig send` as an operator starts them (optionally inside a network namespace), and
//! their reports.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_rdmig");

pub struct Dir(pub PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("rdmig-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

pub fn key(d: &Path, name: &str, content: &str) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

pub fn wait_file(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Workload {
    pub child: Child,
    pub ram: PathBuf,
    pub bitmap: PathBuf,
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn workload(d: &Path, size: &str, rate: &str) -> Workload {
    workload_with(d, size, rate, &[])
}

/// `rdmig workload` with more options.
pub fn workload_with(d: &Path, size: &str, rate: &str, extra: &[&str]) -> Workload {
    let ram = d.join("src.ram");
    let bitmap = d.join("src.dirty");
    let ready = d.join("ready");
    let child = Command::new(BIN)
        .args(["workload", "--size", size, "--dirty-rate", rate])
        .args(extra)
        .arg("--ram")
        .arg(&ram)
        .arg("--bitmap")
        .arg(&bitmap)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .unwrap();
    wait_file(&ready);
    Workload { child, ram, bitmap }
}

/// `rdmig`, run inside network namespace `ns` when given.
pub fn rdmig(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    }
}

/// `rdmig recv` on `listen` (in `ns` when given) with `--idle-timeout 5`; returns it, the
/// address it listens on (from `--addr-file`) and its RAM file.
pub fn recv_at(
    d: &Path,
    key: &Path,
    size: &str,
    listen: &str,
    ns: Option<&str>,
    extra: &[&str],
) -> (Child, String, PathBuf) {
    let addr_file = d.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let dst = d.join("dst.ram");
    let child = rdmig(ns)
        .args(["recv", "--listen", listen, "--json", "--idle-timeout", "5"])
        .arg("--psk-file")
        .arg(key)
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--ram")
        .arg(format!("ram={}:{size}", dst.display()))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&addr_file);
    (child, std::fs::read_to_string(&addr_file).unwrap(), dst)
}

pub fn recv(d: &Path, key: &Path, size: &str, extra: &[&str]) -> (Child, String, PathBuf) {
    recv_at(d, key, size, "127.0.0.1:0", None, extra)
}

/// `rdmig send` of the workload's RAM (in `ns` when given) with `--idle-timeout 5`, pausing
/// it with SIGSTOP, dirty log from its bitmap.
pub fn send_at(addr: &str, key: &Path, w: &Workload, ns: Option<&str>, extra: &[&str]) -> Child {
    rdmig(ns)
        .args(["send", "--connect", addr, "--json", "--idle-timeout", "5"])
        .arg("--psk-file")
        .arg(key)
        .arg("--ram")
        .arg(format!("ram={}", w.ram.display()))
        .args(if extra.contains(&"--dirty-log") {
            vec![]
        } else {
            vec![
                "--dirty-log".to_string(),
                format!("bitmap:{}", w.bitmap.display()),
            ]
        })
        .args(["--pid", &w.child.id().to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn send(addr: &str, key: &Path, w: &Workload, extra: &[&str]) -> Child {
    send_at(addr, key, w, None, extra)
}

/// Waits until `f` holds, polling every millisecond, for at most `limit`; returns whether it
/// held.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

/// Waits for a child to exit, for at most `limit`; kills it if it does not.
pub fn exit_within(c: Child, limit: Duration) -> (Output, Duration, bool) {
    let t = Instant::now();
    let mut c = c;
    let ended = wait_until(limit, || c.try_wait().ok().flatten().is_some());
    if !ended {
        let _ = c.kill();
    }
    let took = t.elapsed();
    (c.wait_with_output().unwrap(), took, ended)
}

/// Sends SIGTERM to a child (the operator's cancel).
pub fn terminate(c: &Child) {
    signal(c.id(), "TERM");
}

pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

pub fn report(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

pub fn digest(p: &Path) -> String {
    let o = Command::new(BIN).arg("digest").arg(p).output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn state(pid: u32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit_once(')')
        .unwrap()
        .1
        .trim_start()
        .chars()
        .next()
        .unwrap()
}
