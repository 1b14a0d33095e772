//! The binary's documented commands, end to end, on tiny guests.

use std::process::Command;

fn sim(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rdmig-sim"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rdmig-sim-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_documents_every_command() {
    let (ok, out, _) = sim(&["--help"]);
    assert!(ok);
    for c in ["run", "compare", "sweep", "swarm", "bench", "profiles"] {
        assert!(out.contains(c), "--help lacks {c}:\n{out}");
    }
    let (ok, out, _) = sim(&["run", "--help"]);
    assert!(ok && out.contains("--seed") && out.contains("--plot-dir") && out.contains("--faults"));
}

#[test]
fn run_prints_json_and_plots() {
    let dir = tmp("run");
    let (ok, out, err) = sim(&[
        "run",
        "--seed",
        "3",
        "--ram",
        "8MiB",
        "--dirty",
        "200MB/s",
        "--pattern",
        "hot:0.1",
        "--json",
        "--plot-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["outcome"]["class"], "completed");
    assert!(v["rounds"].as_array().unwrap().len() >= 2);
    for f in ["rounds.svg", "throughput.svg"] {
        let svg = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("polyline"), "{f}");
    }
}

#[test]
fn run_with_faults_and_overrides() {
    let (ok, out, err) = sim(&[
        "run",
        "--seed",
        "3",
        "--ram",
        "8MiB",
        "--fault",
        "cancel",
        "--profile",
        "tcp-25g",
        "--set",
        "link_gbps=10",
        "--set",
        "recv_cpu_s_per_gb=0.5",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tcp-25g (Tcp, 10 Gb/s)"), "{out}");
    assert!(out.contains("faults enabled: cancel"), "{out}");
    let (ok, _, err) = sim(&["run", "--ram", "8MiB", "--set", "nope=1"]);
    assert!(!ok && err.contains("unknown profile parameter"));
}

#[test]
fn compare_puts_profiles_side_by_side() {
    let (ok, out, err) = sim(&[
        "compare",
        "--profiles",
        "rdma-100g,tcp-100g",
        "--ram",
        "16MiB",
        "--dirty",
        "1GB/s",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("rdma-100g") && out.contains("tcp-100g") && out.contains("source CPU"));
}

#[test]
fn sweep_writes_an_svg() {
    let dir = tmp("sweep");
    let svg = dir.join("sweep.svg");
    let (ok, out, err) = sim(&[
        "sweep",
        "--profiles",
        "rdma-100g,tcp-25g",
        "--ram",
        "8MiB",
        "--steps",
        "2",
        "--dirty-to",
        "1GB/s",
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(std::fs::read_to_string(svg).unwrap().contains("downtime"));
}

#[test]
fn swarm_counts_outcomes() {
    let (ok, out, err) = sim(&["swarm", "--seeds", "20", "--ram", "4MiB"]);
    assert!(ok, "{err}{out}");
    assert!(
        out.contains("20 runs") && out.contains("no invariant violated"),
        "{out}"
    );
}

#[test]
fn profiles_lists_parameters() {
    let (ok, out, _) = sim(&["profiles"]);
    assert!(ok && out.contains("rdma-100g:") && out.contains("reg_us_per_mib"));
}
