//! Device state larger than the control channel carries, over the data channels into the
//! destination's staging area (spec: section 7.4, STATE-1 .. STATE-5), with real processes
//! over loopback TCP: it arrives whole and in order, and every way it can fail before the
//! commit aborts cleanly, the source workload running again.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A device-state file of `len` pseudo-random bytes (incompressible, reproducible).
fn state_file(d: &Path, len: usize) -> PathBuf {
    let p = d.join("state.in");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&p, bytes).unwrap();
    p
}

/// 96 MiB and a partial page: more than the control channel's 64 MiB.
const LARGE: usize = (96 << 20) + 1234;

/// spec: STATE-1 .. STATE-5, INV-MEM-1: a device state of 96 MiB (the control channel takes
/// at most 64) streams over two data channels beside a live migration with `--verify`, and
/// the destination's `--state-out` holds exactly it once committed.
#[test]
fn state_3_a_device_state_over_64_mib_streams_over_the_data_channels() {
    let d = dir("state-large");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "32MiB", "40");
    let state = state_file(&d.0, LARGE);
    let out = d.0.join("state.out");
    let out_arg = out.display().to_string();
    let state_arg = state.display().to_string();
    let (r, addr, dst) = recv(&d.0, &k, "32MiB", &["--state-out", &out_arg]);
    let s = send(
        &addr,
        &k,
        &w,
        &["--state-in", &state_arg, "--channels", "2", "--verify"],
    )
    .wait_with_output()
    .unwrap();
    let r = r.wait_with_output().unwrap();
    let (sr, rr) = (report(&s), report(&r));
    assert_eq!(sr["status"], "completed", "{sr}\n{rr}");
    assert_eq!(rr["status"], "completed", "{rr}");
    assert_eq!(sr["bytes"]["device_state"], LARGE as u64, "{sr}");
    assert_eq!(sr["bytes"]["device_state_path"], "data channels");
    assert_eq!(rr["bytes"]["device_state"], LARGE as u64, "{rr}");
    assert_eq!(digest(&state), digest(&out), "the state arrives whole");
    assert_eq!(digest(&w.ram), digest(&dst));
    assert!(!PathBuf::from(format!("{}.partial", out.display())).exists());
}

/// Runs a migration with the large device state that must abort before the commit; returns
/// both reports after checking what every such abort leaves: exit 2 on both sides, the
/// source workload running again, no state file, the destination's RAM marked incomplete.
fn aborted_migration(
    tag: &str,
    recv_extra: &[&str],
    out: &Path,
) -> (serde_json::Value, serde_json::Value) {
    let d = dir(tag);
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "32MiB", "40");
    let state_in = state_file(&d.0, LARGE);
    let state_arg = state_in.display().to_string();
    let (r, addr, dst) = recv(&d.0, &k, "32MiB", recv_extra);
    let s = send(
        &addr,
        &k,
        &w,
        &["--state-in", &state_arg, "--channels", "2"],
    )
    .wait_with_output()
    .unwrap();
    let r = r.wait_with_output().unwrap();
    let (sr, rr) = (report(&s), report(&r));
    assert_eq!(sr["status"], "aborted", "{sr}\n{rr}");
    assert_eq!(rr["status"], "aborted", "{rr}");
    assert_eq!((s.status.code(), r.status.code()), (Some(2), Some(2)));
    assert!(
        wait_until(Duration::from_secs(5), || state(w.child.id()) != 'T'),
        "source workload left paused"
    );
    assert!(!out.exists(), "no device state kept");
    assert!(!PathBuf::from(format!("{}.partial", out.display())).exists());
    assert!(PathBuf::from(format!("{}.rdmig-incomplete", dst.display())).exists());
    (sr, rr)
}

/// spec: STATE-1, STATE-3: a destination whose staging area is smaller than the device state
/// takes none of it: the source finds it exceeds the agreed area, aborts and resumes.
#[test]
fn state_3_a_destination_without_room_for_the_state_aborts_before_the_commit() {
    let d = dir("state-room-out");
    let out = d.0.join("state.out");
    let out_arg = out.display().to_string();
    let (sr, _) = aborted_migration(
        "state-room",
        &["--max-state-size", "16MiB", "--state-out", &out_arg],
        &out,
    );
    assert_eq!(sr["reason"], "LocalError", "{sr}");
    assert!(
        sr["detail"]
            .as_str()
            .unwrap()
            .contains("larger than the negotiated state area"),
        "{sr}"
    );
}

/// spec: STATE-4: a consumer that cannot take the state (here `--state-out` in a directory
/// that does not exist) aborts the destination before its vote: nothing starts, and the
/// source resumes.
#[test]
fn state_4_a_consumer_that_refuses_the_state_aborts_before_the_vote() {
    let d = dir("state-refused-out");
    let out = d.0.join("no-such-dir").join("state.out");
    let out_arg = out.display().to_string();
    let (sr, rr) = aborted_migration("state-refused", &["--state-out", &out_arg], &out);
    assert_eq!(sr["reason"], "WorkloadFailed", "{sr}");
    assert_eq!(rr["reason"], "WorkloadFailed", "{rr}");
    assert!(
        rr["detail"].as_str().unwrap().contains("consumer refused"),
        "{rr}"
    );
}
