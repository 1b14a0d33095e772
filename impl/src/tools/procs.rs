//! Child processes for the tools: the `rdmig` executable itself, a work folder, a key, a
//! destination on an ephemeral port, and the JSON report a finished run prints.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) fn exe() -> PathBuf {
    std::env::current_exe().expect("the running executable has a path")
}

pub(crate) fn wait_file(p: &Path, timeout: Duration, child: &mut Child) -> Result<(), String> {
    let t = Instant::now();
    while !p.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            return Err(format!(
                "process exited ({s}) before creating {}",
                p.display()
            ));
        }
        if t.elapsed() > timeout {
            return Err(format!("timed out waiting for {}", p.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn work_dir(dir: Option<PathBuf>, tag: &str) -> Result<PathBuf, String> {
    let base = dir.unwrap_or_else(|| {
        if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        }
    });
    let d = base.join(format!("rdmig-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    Ok(d)
}

pub(crate) fn write_key(dir: &Path) -> Result<PathBuf, String> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).expect("OS random source");
    let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
    let p = dir.join("psk");
    std::fs::write(&p, hex).map_err(|e| e.to_string())?;
    Ok(p)
}

/// Starts a destination on an ephemeral loopback port; returns it and its address.
pub(crate) fn start_recv(
    dir: &Path,
    key: &Path,
    rams: &[(String, PathBuf, u64)],
    extra: &[&str],
) -> Result<(Child, String), String> {
    let addr_file = dir.join(format!("addr-{}", rams[0].0));
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(exe());
    cmd.args(["recv", "--listen", "127.0.0.1:0", "--json", "--psk-file"])
        .arg(key)
        .arg("--addr-file")
        .arg(&addr_file);
    for (name, path, size) in rams {
        cmd.arg("--ram")
            .arg(format!("{name}={}:{size}", path.display()));
    }
    cmd.args(extra).stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting rdmig recv: {e}"))?;
    wait_file(&addr_file, Duration::from_secs(60), &mut child)?;
    let addr = std::fs::read_to_string(&addr_file).map_err(|e| e.to_string())?;
    Ok((child, addr))
}

pub(crate) fn report_of(child: Child, what: &str) -> Result<(i32, Value), String> {
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    let code = out.status.code().unwrap_or(-1);
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{what} exited {code} without a JSON report: {e}"))?;
    Ok((code, v))
}

pub(crate) fn field(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}
