//! `rdmig save` and `rdmig restore` as an operator runs them (spec: section 13): memory saved
//! live or paused, restored exactly, bad files refused, a failed save resumes the workload
//! and replaces nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn save(w: &Workload, to: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", w.ram.display()))
        .arg("--to")
        .arg(to)
        .args(["--pid", &w.child.id().to_string(), "--json"])
        .args(extra);
    c.output().unwrap()
}

fn restore(from: &Path, dst: &Path, size: &str, extra: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("restore")
        .arg("--from")
        .arg(from)
        .arg("--ram")
        .arg(format!("pc.ram={}:{size}", dst.display()))
        .arg("--json")
        .args(extra);
    c.output().unwrap()
}

fn marker(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.rdmig-incomplete", p.display()))
}

/// Bytes of `path` in pages that are not all zero.
fn nonzero_bytes(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    b.chunks(4096).filter(|p| p.iter().any(|&x| x != 0)).count() as u64 * 4096
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// spec: SAVE-1, SAVE-4: a live save of a writing workload pre-copies into the file and
/// pauses it for the last round only; the restore gives back memory exactly as it was at the
/// pause, and the file allocates no more than the non-zero data (zero pages are holes).
#[test]
fn save_1_live_save_of_a_writing_workload_restores_memory_as_at_the_pause() {
    let d = dir("save-live");
    let w = workload(&d.0, "32MiB", "40");
    let file = d.0.join("guest.save");
    let o = save(
        &w,
        &file,
        &["--live", "--channels", "2", "--downtime-limit", "20"],
    );
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert!(
        r["rounds"].as_array().unwrap().len() >= 2,
        "live: several rounds\n{r}"
    );
    // Saved: the workload stays stopped, its memory as at the pause.
    assert_eq!(state(w.child.id()), 'T');
    assert!(!PathBuf::from(format!("{}.rdmig-partial", file.display())).exists());
    let allocated = r["file"]["allocated_bytes"].as_u64().unwrap();
    let data = nonzero_bytes(&w.ram);
    assert!(
        allocated <= data + data / 100 + (64 << 10),
        "allocated {allocated} for {data} bytes of non-zero pages"
    );
    let dst = d.0.join("dst.ram");
    let o = restore(&file, &dst, "32MiB", &["--channels", "2"]);
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert_eq!(digest(&w.ram), digest(&dst));
    assert!(!marker(&dst).exists());
}

/// spec: SCAN-1, SCAN-2 through the file binding: a live save with the `scan` dirty log of a
/// workload whose writes often undo the previous one, on a small hot set, with `--direct-io`
/// (the copy the binding hashes then goes out through an aligned buffer): the restore gives
/// back memory exactly as at the pause.
#[test]
fn scan_2_live_save_with_the_scan_log_loses_no_undone_write() {
    let d = dir("save-live-undo");
    let w = workload_with(
        &d.0,
        "32MiB",
        "60",
        &["--pattern", "hot:0.02", "--undo-fraction", "0.5"],
    );
    let file = d.0.join("guest.save");
    let mut extra = vec!["--live", "--dirty-log", "scan", "--channels", "2"];
    extra.extend(["--downtime-limit", "20"]);
    // ramfs and tmpfs refuse O_DIRECT: only where the file system takes it.
    let direct = probe_direct_io(&d.0);
    if direct {
        extra.push("--direct-io");
    }
    let o = save(&w, &file, &extra);
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert!(r["rounds"].as_array().unwrap().len() >= 2, "{r}");
    assert_eq!(state(w.child.id()), 'T');
    let dst = d.0.join("dst.ram");
    let o = restore(&file, &dst, "32MiB", &["--channels", "2"]);
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert_eq!(digest(&w.ram), digest(&dst), "direct I/O: {direct}");
}

/// Whether `O_DIRECT` opens work in `dir`.
fn probe_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("direct-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// spec: SAVE-1: without --live the workload is paused first and memory crosses once; with
/// --direct-io both the save's writes and the restore's reads bypass the page cache.
#[test]
fn save_1_paused_save_is_one_pass_and_direct_io_round_trips() {
    let d = dir("save-paused");
    let w = workload(&d.0, "16MiB", "40");
    let file = d.0.join("guest.save");
    let o = save(&w, &file, &["--direct-io", "--channels", "3"]);
    if stderr(&o).contains("does not support O_DIRECT") {
        eprintln!("skipped: {} has no O_DIRECT", d.0.display());
        return;
    }
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert_eq!(state(w.child.id()), 'T');
    let rounds = r["rounds"].as_array().unwrap();
    let dirty_after_first: u64 = rounds[1..]
        .iter()
        .map(|x| x["dirty_pages"].as_u64().unwrap())
        .sum();
    assert_eq!(dirty_after_first, 0, "paused: one pass\n{r}");
    assert_eq!(r["file"]["direct_io"], true);
    let dst = d.0.join("dst.ram");
    let o = restore(&file, &dst, "16MiB", &["--direct-io"]);
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert_eq!(digest(&w.ram), digest(&dst));
}

/// spec: SAVE-2, SAVE-3: every bad file is refused before anything starts, with one line
/// (or, for data that does not match its digests, an abort before commit), and the target
/// stays marked incomplete.
#[test]
fn save_3_bad_files_are_refused_and_targets_stay_marked_incomplete() {
    let d = dir("save-bad");
    let w = workload(&d.0, "8MiB", "0");
    let good = d.0.join("good.save");
    let o = save(&w, &good, &[]);
    assert_eq!(report(&o)["status"], "completed", "{}", stderr(&o));
    let bytes = std::fs::read(&good).unwrap();
    let len = bytes.len();
    let started = d.0.join("started");
    let start_cmd = format!("touch {}", started.display());
    let with = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let p = d.0.join(name);
        let mut b = bytes.clone();
        f(&mut b);
        std::fs::write(&p, b).unwrap();
        p
    };
    let foreign = with("foreign", &|b| {
        b[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00")
    });
    let cut = with("cut", &|b| b.truncate(len / 2));
    let no_footer = with("no-footer", &|b| b.truncate(len - 64));
    let version = with("version", &|b| b[8] = 9);
    let trailer = with("trailer", &|b| b[len - 70] ^= 1);
    // A byte of the first block's first page (1 MiB into the file).
    let data = with("data", &|b| b[(1 << 20) + 100] ^= 0xff);
    let cases: Vec<(&str, PathBuf, &str, &str)> = vec![
        ("foreign", foreign, "8MiB", "not an rdmig save file"),
        ("truncated", cut, "8MiB", "the file ends at"),
        ("no footer", no_footer, "8MiB", "no valid footer"),
        ("version", version, "8MiB", "version 9 is not supported"),
        (
            "trailer",
            trailer,
            "8MiB",
            "trailer's digest does not match",
        ),
        (
            "size",
            good.clone(),
            "4MiB",
            "bytes in the save, 4194304 given",
        ),
        (
            "data",
            data,
            "8MiB",
            "does not match the digests saved with it",
        ),
    ];
    for (what, file, size, want) in cases {
        let dst = d.0.join(format!("dst-{}.ram", what.replace(' ', "-")));
        let o = restore(&file, &dst, size, &["--start-cmd", &start_cmd]);
        assert_ne!(o.status.code(), Some(0), "{what}: must fail");
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(all.contains(want), "{what}: expected {want:?} in:\n{all}");
        if what != "data" {
            // Refused before anything moved: one line.
            assert_eq!(stderr(&o).trim().lines().count(), 1, "{what}: {all}");
        } else {
            assert_eq!(report(&o)["reason"], "DigestMismatch", "{all}");
        }
        assert!(marker(&dst).exists(), "{what}: target marked incomplete");
        assert!(!started.exists(), "{what}: nothing started");
    }
    // A wrong block name.
    let dst = d.0.join("dst-name.ram");
    let o = Command::new(BIN)
        .arg("restore")
        .arg("--from")
        .arg(&good)
        .arg("--ram")
        .arg(format!("rom={}:8MiB", dst.display()))
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("no block named \"rom\""),
        "{}",
        stderr(&o)
    );
    assert!(marker(&dst).exists());
    // The good file still restores.
    let dst = d.0.join("dst-good.ram");
    let o = restore(&good, &dst, "8MiB", &["--start-cmd", &start_cmd]);
    assert_eq!(report(&o)["status"], "completed", "{}", stderr(&o));
    assert!(started.exists());
    assert_eq!(digest(&w.ram), digest(&dst));
}

/// spec: SAVE-3, INV-OWN-2: a save cancelled before commit resumes the workload, leaves no
/// partial file and does not replace the save that was there.
#[test]
fn save_3_cancelled_save_resumes_the_workload_and_keeps_the_old_file() {
    let d = dir("save-cancel");
    let w = workload(&d.0, "64MiB", "400");
    let file = d.0.join("guest.save");
    std::fs::write(&file, b"the previous save").unwrap();
    // Live, a downtime limit the workload's rate never allows, many rounds: pre-copy goes
    // on until the signal.
    let c = Command::new(BIN)
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", w.ram.display()))
        .arg("--to")
        .arg(&file)
        .args(["--pid", &w.child.id().to_string(), "--json", "--live"])
        .args(["--downtime-limit", "0", "--max-rounds", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = PathBuf::from(format!("{}.rdmig-partial", file.display()));
    assert!(wait_until(Duration::from_secs(20), || partial.exists()));
    std::thread::sleep(Duration::from_millis(500));
    signal(c.id(), "TERM");
    let (o, _, in_time) = exit_within(c, Duration::from_secs(20));
    assert!(in_time, "the save ends after the signal");
    let r = report(&o);
    assert_eq!(r["status"], "aborted", "{r}\n{}", stderr(&o));
    assert_eq!(o.status.code(), Some(2));
    assert_ne!(state(w.child.id()), 'T', "the workload runs again");
    assert!(!partial.exists(), "no partial file left");
    assert_eq!(std::fs::read(&file).unwrap(), b"the previous save");
}

/// spec: SAVE-3: a save whose file cannot be made valid at commit (here: `--to` names a
/// directory, so the final rename fails) leaves no file and resumes the workload, which runs
/// nowhere else.
#[test]
fn save_3_a_save_that_cannot_be_finished_at_commit_resumes_the_workload() {
    let d = dir("save-unfinished");
    let w = workload(&d.0, "8MiB", "20");
    let to = d.0.join("taken");
    std::fs::create_dir_all(to.join("inside")).unwrap();
    let o = save(&w, &to, &[]);
    let r = report(&o);
    assert_eq!(r["status"], "aborted", "{r}\n{}", stderr(&o));
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("finishing the save file"),
        "{}",
        stderr(&o)
    );
    assert!(wait_until(Duration::from_secs(5), || state(w.child.id()) != 'T'));
    assert!(!PathBuf::from(format!("{}.rdmig-partial", to.display())).exists());
    assert!(to.join("inside").is_dir());
}

/// spec: SAVE-1: a paused save with hooks runs the pause hook once, before the first pass,
/// and the hook's output is the device state the file keeps and the restore gives back.
#[test]
fn save_1_paused_save_with_hooks_pauses_once_first_and_keeps_the_hooks_state() {
    let d = dir("save-hooks");
    let w = workload(&d.0, "8MiB", "80");
    let pid = w.child.id();
    let runs = d.0.join("pause-runs");
    let file = d.0.join("guest.save");
    let o = Command::new(BIN)
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", w.ram.display()))
        .arg("--to")
        .arg(&file)
        .arg("--json")
        .arg("--pause-cmd")
        .arg(format!(
            "kill -STOP {pid}; sleep 0.2; echo run >> {}; printf 'state of {pid}'",
            runs.display()
        ))
        .arg("--resume-cmd")
        .arg(format!("kill -CONT {pid}"))
        .output()
        .unwrap();
    let r = report(&o);
    assert_eq!(r["status"], "completed", "{r}\n{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    let dst = d.0.join("dst.ram");
    let state_out = d.0.join("state");
    let o = restore(
        &file,
        &dst,
        "8MiB",
        &["--state-out", state_out.to_str().unwrap()],
    );
    assert_eq!(report(&o)["status"], "completed", "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&state_out).unwrap(),
        format!("state of {pid}")
    );
    // Paused before the first pass: the memory is the workload's as it stands, stopped.
    assert_eq!(state(pid), 'T');
    assert_eq!(digest(&w.ram), digest(&dst));
}

/// A file system without `O_DIRECT` (ramfs): `--direct-io` is one line naming the fix, before
/// the workload is paused, and leaves no file.
#[test]
fn save_direct_io_where_the_file_system_refuses_it_is_one_line_and_leaves_nothing() {
    let d = dir("save-ramfs");
    let mnt = d.0.join("ramfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "ramfs", "none"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount ramfs (needs root)");
        return;
    }
    let w = workload(&d.0, "8MiB", "20");
    let file = mnt.join("guest.save");
    let o = save(&w, &file, &["--direct-io"]);
    let err = stderr(&o);
    let listing: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("does not support O_DIRECT"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(listing.is_empty(), "nothing left on the file system");
    assert_ne!(state(w.child.id()), 'T', "the workload was never paused");
}

/// A file system that fills up during the save (a 2 MiB tmpfs for 8 MiB of memory): the write
/// that fails closes its channel, the save aborts before commit, the workload runs again and
/// no partial file is left.
#[test]
fn save_on_a_full_file_system_aborts_and_resumes_the_workload() {
    let d = dir("save-full");
    let mnt = d.0.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "none"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount tmpfs (needs root)");
        return;
    }
    let w = workload(&d.0, "8MiB", "20");
    let file = mnt.join("guest.save");
    let o = save(&w, &file, &["--channels", "2"]);
    let listing: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
    let _ = Command::new("umount").arg(&mnt).status();
    let r = report(&o);
    assert_eq!(r["status"], "aborted", "{r}\n{}", stderr(&o));
    assert_eq!(o.status.code(), Some(2));
    assert!(listing.is_empty(), "nothing left on the file system");
    assert!(wait_until(Duration::from_secs(5), || state(w.child.id()) != 'T'));
}
