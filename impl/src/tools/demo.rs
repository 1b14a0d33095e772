//! `rdmig demo`: a complete live migration between three processes on loopback (a writing
//! workload, a destination and a source), the way an operator runs them, with verification.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use super::procs::*;

/// The main job: a live migration between three processes with verification. One straight
/// script (start, migrate, compare, report), kept whole so it reads like the README's steps.
pub fn demo(
    size: u64,
    dirty_rate: f64,
    channels: u8,
    dir: Option<PathBuf>,
    tls: bool,
) -> Result<ExitCode, String> {
    let d = work_dir(dir, "demo")?;
    let key = write_key(&d)?;
    let creds = d.join("tls");
    let mut tls_args: Vec<String> = Vec::new();
    if tls {
        crate::transport::tls::init(&creds, &[])?;
        tls_args = vec!["--tls-creds".into(), creds.display().to_string()];
    }
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let src_ram = d.join("source.ram");
    let dst_ram = d.join("destination.ram");
    let bitmap = d.join("source.dirty");
    let ready = d.join("ready");
    println!(
        "rdmig demo: {} MiB workload writing {dirty_rate} MB/s, {channels} TCP data channels{}, loopback",
        size >> 20,
        if tls { " inside TLS 1.3" } else { "" }
    );
    let mut wl = Command::new(exe())
        .args([
            "workload",
            "--size",
            &size.to_string(),
            "--dirty-rate",
            &dirty_rate.to_string(),
            "--pattern",
            "hot:0.25",
        ])
        .arg("--ram")
        .arg(&src_ram)
        .arg("--bitmap")
        .arg(&bitmap)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .map_err(|e| format!("starting workload: {e}"))?;
    let result = (|| {
        wait_file(&ready, Duration::from_secs(120), &mut wl)?;
        let (recv, addr) = start_recv(
            &d,
            &key,
            &[("ram".into(), dst_ram.clone(), size)],
            &tls_args,
        )?;
        println!(
            "workload pid {} running; destination listening on {addr}",
            wl.id()
        );
        let send = Command::new(exe())
            .args([
                "send",
                "--connect",
                &addr,
                "--json",
                "--verify",
                "--channels",
                &channels.to_string(),
            ])
            .arg("--ram")
            .arg(format!("ram={}", src_ram.display()))
            .arg("--psk-file")
            .arg(&key)
            .arg("--dirty-log")
            .arg(format!("bitmap:{}", bitmap.display()))
            .args(["--pid", &wl.id().to_string(), "--downtime-limit", "50"])
            .args(&tls_args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting rdmig send: {e}"))?;
        let (scode, srep) = report_of(send, "rdmig send")?;
        let (dcode, drep) = report_of(recv, "rdmig recv")?;
        println!(
            "{}",
            serde_json::to_string_pretty(&srep).expect("serialises")
        );
        println!(
            "source: {} in {} ms (setup {} ms, downtime {} ms), {} rounds, {} MiB data at {:.0} MB/s",
            srep["status"].as_str().unwrap_or("?"),
            field(&srep, "total_time_ms"),
            field(&srep, "setup_time_ms"),
            field(&srep, "downtime_ms"),
            srep["rounds"].as_array().map_or(0, |r| r.len()),
            srep["bytes"]["data"].as_u64().unwrap_or(0) >> 20,
            srep["throughput_mb_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "destination: {} (exit {dcode})",
            drep["status"].as_str().unwrap_or("?")
        );
        if scode != 0 || dcode != 0 {
            return Err(format!(
                "migration did not complete (source exit {scode}, destination exit {dcode})"
            ));
        }
        // The source workload is still paused (committed), so its memory is as at the pause.
        let a = crate::tools::workload::file_digest(&src_ram).map_err(|e| e.to_string())?;
        let b = crate::tools::workload::file_digest(&dst_ram).map_err(|e| e.to_string())?;
        if a != b {
            return Err(format!(
                "destination memory differs from the source: {a:016x} != {b:016x}"
            ));
        }
        println!("destination memory verified equal to source at pause (xxh3 {a:016x})");
        Ok(ExitCode::SUCCESS)
    })();
    let _ = wl.kill();
    let _ = wl.wait();
    let _ = std::fs::remove_dir_all(&d);
    result
}
