//! End-to-end tests with real processes over loopback TCP: a writing workload, a destination
//! and a source, as an operator runs them; plus kill -9 and hostile-peer cases.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

fn live_migration(channels: &str, pin_all: bool) {
    let d = dir(&format!("live-{channels}-{pin_all}"));
    let w = workload(&d.0, "32MiB", "40");
    let budget = if pin_all { "32MiB" } else { "8MiB" };
    let mut extra = vec!["--channels", channels];
    if pin_all {
        extra.push("--pin-all");
    }
    let sr = migrate_live_and_compare(&d.0, &w, &["--pin-budget", budget], &extra);
    if !pin_all {
        assert!(
            sr["chunks_evicted"].as_u64().unwrap() > 0,
            "8 MiB budget for 32 MiB must evict"
        );
    }
}

/// Migrates the writing workload `w` (32 MiB) live with `--verify` and a 20 ms downtime
/// limit, `recv_extra` and `send_extra` added: both sides complete, verified, in several
/// rounds; the source stays stopped and its memory equals the destination's, which is no
/// longer marked incomplete. Returns the source's report.
fn migrate_live_and_compare(
    d: &std::path::Path,
    w: &Workload,
    recv_extra: &[&str],
    send_extra: &[&str],
) -> serde_json::Value {
    let k = key(d, "psk", "0123456789abcdef0123");
    let (r, addr, dst) = recv(d, &k, "32MiB", recv_extra);
    let mut extra = vec!["--verify", "--downtime-limit", "20"];
    extra.extend_from_slice(send_extra);
    let s = send(&addr, &k, w, &extra).wait_with_output().unwrap();
    let r = r.wait_with_output().unwrap();
    let (sr, rr) = (report(&s), report(&r));
    let logs = format!(
        "source stderr: {}\ndestination stderr: {}",
        String::from_utf8_lossy(&s.stderr),
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(sr["status"], "completed", "{sr}\n{rr}\n{logs}");
    assert_eq!(rr["status"], "completed", "{rr}\n{logs}");
    assert_eq!(s.status.code(), Some(0));
    assert!(sr["verified"].as_bool().unwrap());
    assert!(
        sr["rounds"].as_array().unwrap().len() >= 2,
        "a writing workload needs several rounds: {sr}"
    );
    // Committed: the source workload stays stopped, so its memory is as at the pause.
    assert_eq!(state(w.child.id()), 'T');
    assert_eq!(digest(&w.ram), digest(&dst));
    assert!(!PathBuf::from(format!("{}.rdmig-incomplete", dst.display())).exists());
    sr
}

/// spec: INV-MEM-1 over real TCP with a concurrently writing workload, one channel, dynamic
/// registration under a pin budget that forces eviction.
#[test]
fn inv_mem_1_live_tcp_one_channel_dynamic() {
    live_migration("1", false);
}

/// spec: INV-MEM-1 with two data channels and pin-all registration.
#[test]
fn inv_mem_1_live_tcp_two_channels_pin_all() {
    live_migration("2", true);
}

/// spec: INV-MEM-1 with several channels and dynamic registration.
#[test]
fn inv_mem_1_live_tcp_four_channels_dynamic() {
    live_migration("4", false);
}

/// True once the first MiB of `path` holds a non-zero byte: data has landed there.
/// spec: SCAN-1, INV-MEM-1. The `scan` dirty log over real TCP, two channels, with a
/// workload whose writes often put a page back to its previous content, on a small hot set
/// so that pages change and change back between scans while writes carry them: what the
/// destination holds must equal the source's memory at pause (checked by `--verify` and by
/// comparing the files).
#[test]
fn scan_1_live_tcp_scan_log_loses_no_undone_write() {
    let d = dir("live-scan-undo");
    let w = workload_with(
        &d.0,
        "32MiB",
        "60",
        &["--pattern", "hot:0.02", "--undo-fraction", "0.5"],
    );
    migrate_live_and_compare(&d.0, &w, &[], &["--dirty-log", "scan", "--channels", "2"]);
}

/// spec: SCAN-2: an RDMA NIC does not tell which bytes a write carried, so `send` refuses the
/// scan dirty log over verbs before it touches the workload (still running afterwards).
#[test]
fn scan_2_rdma_refuses_the_scan_log_before_anything_starts() {
    let d = dir("rdma-scan");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "4MiB", "10");
    let o = send(
        "127.0.0.1:9",
        &k,
        &w,
        &["--transport", "rdma", "--dirty-log", "scan"],
    )
    .wait_with_output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        err.contains("scan dirty log") && err.contains("--transport tcp"),
        "{err}"
    );
    assert_ne!(state(w.child.id()), 'T', "the workload keeps running");
}

fn has_data(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut b = vec![0u8; 1 << 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut b))
        .is_ok_and(|n| b[..n].iter().any(|&x| x != 0))
}

/// spec: INV-OWN-2: the destination killed during pre-copy, or after the source paused its
/// workload, leaves the source workload running and its memory its own.
#[test]
fn inv_own_2_kill_destination_source_resumes() {
    for after_pause in [false, true] {
        let d = dir(&format!("killdst-{after_pause}"));
        let k = key(&d.0, "psk", "0123456789abcdef0123");
        let w = workload(&d.0, "64MiB", "80");
        let (mut r, addr, dst) = recv(&d.0, &k, "64MiB", &[]);
        let s = send(&addr, &k, &w, &["--max-bandwidth", "100MB/s", "--verify"]);
        let reached = if after_pause {
            wait_until(Duration::from_secs(60), || state(w.child.id()) == 'T')
        } else {
            wait_until(Duration::from_secs(60), || has_data(&dst))
        };
        assert!(reached, "the migration never got there");
        r.kill().unwrap();
        r.wait().unwrap();
        let s = s.wait_with_output().unwrap();
        let sr = report(&s);
        assert_eq!(sr["status"], "aborted", "{sr}");
        assert_eq!(s.status.code(), Some(2));
        // The workload runs again (not stopped) and keeps writing.
        assert!(
            wait_until(Duration::from_secs(5), || state(w.child.id()) != 'T'),
            "source workload left paused"
        );
        let a = digest(&w.ram);
        assert!(
            wait_until(Duration::from_secs(10), || digest(&w.ram) != a),
            "source workload is not writing after the abort"
        );
    }
}

/// spec: SW-7: the source killed mid-migration never lets the destination start; its memory
/// stays marked incomplete.
#[test]
fn sw_7_kill_source_destination_never_starts() {
    let d = dir("killsrc");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "64MiB", "80");
    let started = d.0.join("started");
    let start_cmd = format!("touch {}", started.display());
    let (r, addr, dst) = recv(&d.0, &k, "64MiB", &["--start-cmd", &start_cmd]);
    let mut s = send(&addr, &k, &w, &["--max-bandwidth", "100MB/s"]);
    assert!(wait_until(Duration::from_secs(60), || has_data(&dst)));
    s.kill().unwrap();
    s.wait().unwrap();
    let r = r.wait_with_output().unwrap();
    let rr = report(&r);
    assert_eq!(rr["status"], "aborted", "{rr}");
    assert_eq!(r.status.code(), Some(2));
    assert!(!started.exists(), "destination started without a commit");
    assert!(PathBuf::from(format!("{}.rdmig-incomplete", dst.display())).exists());
}

/// spec: AUTH-5, LIVE-5: a wrong key is rejected before any memory is registered or sent; it
/// ends that connection only, and the destination listens on until the operator stops it.
#[test]
fn auth_5_wrong_key_rejected_before_memory_is_exposed() {
    let d = dir("wrongkey");
    let good = key(&d.0, "good", "0123456789abcdef0123");
    let bad = key(&d.0, "bad", "fedcba9876543210fedc");
    let w = workload(&d.0, "8MiB", "10");
    let (mut r, addr, dst) = recv(&d.0, &good, "8MiB", &[]);
    let s = send(&addr, &bad, &w, &[]).wait_with_output().unwrap();
    let sr = report(&s);
    assert_eq!(sr["status"], "aborted");
    assert_eq!(sr["reason"], "AuthFailed", "{sr}");
    assert_eq!(sr["bytes"]["data"], 0);
    assert_eq!(s.status.code(), Some(2));
    assert!(
        r.try_wait().unwrap().is_none(),
        "a wrong key ended the listening destination"
    );
    terminate(&r);
    let r = r.wait_with_output().unwrap();
    let rr = report(&r);
    assert_eq!(rr["status"], "aborted");
    assert_eq!(rr["reason"], "Cancelled", "{rr}");
    assert_eq!(rr["chunks_registered"], 0);
    assert_eq!(r.status.code(), Some(2));
    let zero = std::fs::read(&dst).unwrap().iter().all(|&b| b == 0);
    assert!(zero, "destination memory was written");
    assert_ne!(state(w.child.id()), 'T');
}

/// spec: WIRE-4, LIVE-5: a connection that sends garbage is closed; it neither ends the
/// listening destination nor stops the source that comes next from migrating.
#[test]
fn wire_4_garbage_connection_does_not_end_the_destination() {
    let d = dir("garbage");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "8MiB", "10");
    let (r, addr, dst) = recv(&d.0, &k, "8MiB", &[]);
    let mut c = TcpStream::connect(addr.trim()).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let s = send(&addr, &k, &w, &["--verify"])
        .wait_with_output()
        .unwrap();
    let r = r.wait_with_output().unwrap();
    let (sr, rr) = (report(&s), report(&r));
    assert_eq!(sr["status"], "completed", "{sr}");
    assert_eq!(rr["status"], "completed", "{rr}");
    assert_eq!(digest(&w.ram), digest(&dst));
}

/// Bad input: missing RAM file, block table mismatch.
#[test]
fn bad_input_missing_file_and_block_mismatch_are_clear_errors() {
    let d = dir("badinput");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let o = Command::new(BIN)
        .args(["send", "--connect", "127.0.0.1:9", "--ram"])
        .arg(format!("ram={}", d.0.join("missing").display()))
        .arg("--psk-file")
        .arg(&k)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let w = workload(&d.0, "8MiB", "0");
    let (r, addr, _) = recv(&d.0, &k, "16MiB", &[]);
    let s = send(&addr, &k, &w, &[]).wait_with_output().unwrap();
    let r = r.wait_with_output().unwrap();
    assert_eq!(report(&s)["reason"], "BlockMismatch");
    assert_eq!(report(&r)["reason"], "BlockMismatch");
}

/// spec: INV-MEM-1, RND-2: memory whose every other page is zero travels as single-page
/// writes, sent many to a system call and acknowledged together: every page lands, over 1
/// and 2 channels, in clear; the report counts one write per page.
#[test]
fn inv_mem_1_scattered_single_page_writes_land_whole() {
    let d = dir("scattered");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let src = d.0.join("src.ram");
    let mut data = vec![0u8; 16 << 20];
    let mut rng = rdmig_check::rng::Rng::new(0x5ca7_7e2d);
    for page in data.chunks_mut(4096).step_by(2) {
        rng.fill(page);
    }
    std::fs::write(&src, &data).unwrap();
    for channels in ["1", "2"] {
        let (r, addr, dst) = recv(&d.0, &k, "16MiB", &[]);
        let s = rdmig(None)
            .args(["send", "--connect", &addr, "--json", "--verify"])
            .args(["--channels", channels, "--dirty-log", "none"])
            .arg("--psk-file")
            .arg(&k)
            .arg("--ram")
            .arg(format!("ram={}", src.display()))
            .output()
            .unwrap();
        let r = r.wait_with_output().unwrap();
        let sr = report(&s);
        assert_eq!(sr["status"], "completed", "{sr}");
        assert_eq!(report(&r)["status"], "completed");
        let writes: u64 = sr["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["writes"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            writes >= 2048,
            "{writes} writes for 2048 scattered pages: {sr}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), data, "{channels} channels");
    }
}
