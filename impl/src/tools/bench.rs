//! `rdmig bench`: throughput and overhead of rdmig on loopback, side by side with a raw
//! stream between two processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::procs::*;

/// A plain copy loop between two processes: the reference rdmig is measured against.
fn raw_stream(src: &crate::memory::ram::RamBlock) -> Result<f64, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    drop(listener);
    let mut sink = Command::new(exe())
        .args(["bench", "--sink-port", &addr.port().to_string()])
        .spawn()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(format!("raw sink: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let t = Instant::now();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < src.len() {
        let n = (src.len() - off).min(buf.len() as u64) as usize;
        src.read(off, &mut buf[..n]);
        s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        off += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    let _ = sink.wait();
    if u64::from_le_bytes(ack) != src.len() {
        return Err("raw sink received a different byte count".into());
    }
    Ok(src.len() as f64 / secs / 1e9)
}

/// The receiving half of the raw stream benchmark.
pub fn raw_sink(port: u16) -> Result<ExitCode, String> {
    let l = TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_le_bytes())
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn rdmig_run(
    d: &Path,
    key: &Path,
    src: &Path,
    size: u64,
    channels: u8,
    tag: &str,
) -> Result<(Value, Value), String> {
    let dst = d.join(format!("dst-{tag}.ram"));
    let (recv, addr) = start_recv(d, key, &[(format!("ram{tag}"), dst.clone(), size)], &[])?;
    let send = Command::new(exe())
        .args([
            "send",
            "--connect",
            &addr,
            "--json",
            "--channels",
            &channels.to_string(),
        ])
        .arg("--ram")
        .arg(format!("ram{tag}={}", src.display()))
        .arg("--psk-file")
        .arg(key)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (sc, s) = report_of(send, "rdmig send")?;
    let (dc, r) = report_of(recv, "rdmig recv")?;
    let _ = std::fs::remove_file(&dst);
    if sc != 0 || dc != 0 {
        return Err(format!(
            "benchmark migration failed: source {sc}, destination {dc}"
        ));
    }
    Ok((s, r))
}

/// Side-by-side throughput of a raw stream and rdmig with 1 and 2 channels, plus overheads.
pub fn bench(size: u64, dir: Option<PathBuf>) -> Result<ExitCode, String> {
    let d = work_dir(dir, "bench")?;
    let result = (|| {
        let key = write_key(&d)?;
        let src_path = d.join("src.ram");
        let src = crate::memory::ram::RamBlock::create("bench", &src_path, size, 12)
            .map_err(|e| e.to_string())?;
        // Every page written once by the workload's generator: no zero pages to elide.
        let mut chunk = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < size {
            for (i, page) in chunk.chunks_mut(4096).enumerate() {
                crate::tools::workload::page_content(7, (off >> 12) + i as u64, 1, page);
            }
            let n = (size - off).min(chunk.len() as u64) as usize;
            src.write(off, &chunk[..n]);
            off += n as u64;
        }
        println!(
            "rdmig bench: {} MiB of non-zero memory, loopback TCP, one run each, side by side",
            size >> 20
        );
        let raw = raw_stream(&src)?;
        println!("  raw single stream (copy loop, 2 processes)   {raw:6.2} GB/s");
        let mut ratios = Vec::new();
        for ch in [1u8, 2] {
            let (s, r) = rdmig_run(&d, &key, &src_path, size, ch, &ch.to_string())?;
            let secs =
                (field(&s, "total_time_ms") - field(&s, "setup_time_ms")).max(1) as f64 / 1e3;
            let gbs = size as f64 / secs / 1e9;
            ratios.push(gbs / raw);
            let limit = size / 100 + (64 << 20);
            println!(
                "  rdmig, {ch} channel{}                            {gbs:6.2} GB/s  ({:.2}x raw; total {} ms incl. setup {} ms)",
                if ch > 1 { "s" } else { " " },
                gbs / raw,
                field(&s, "total_time_ms"),
                field(&s, "setup_time_ms"),
            );
            println!(
                "    memory overhead: source {} MiB, destination {} MiB (limit 1% of RAM + 64 MiB = {} MiB)",
                field(&s, "rss_anon_bytes") >> 20,
                field(&r, "rss_anon_bytes") >> 20,
                limit >> 20
            );
        }
        let blocks = vec![std::sync::Arc::new(src)];
        for threads in [1usize, 2] {
            let mut t = crate::memory::dirty::open_tracker(
                &crate::memory::dirty::DirtyLogSpec::Scan,
                blocks.clone(),
                threads,
            )
            .map_err(|e| e.to_string())?;
            t.scan(true).map_err(|e| e.to_string())?;
            let start = Instant::now();
            t.scan(false).map_err(|e| e.to_string())?;
            let gbs = size as f64 / start.elapsed().as_secs_f64() / 1e9;
            println!("  dirty-log scan, {threads} thread{}                     {gbs:6.2} GB/s ({:.2} GB/s per core)", if threads > 1 { "s" } else { " " }, gbs / threads as f64);
        }
        println!(
            "  target: rdmig with 1 channel >= 0.9x raw: {}",
            if ratios[0] >= 0.9 { "met" } else { "not met" }
        );
        Ok(ExitCode::SUCCESS)
    })();
    let _ = std::fs::remove_dir_all(&d);
    result
}
