//! `rdmig bench`: rdmig's data path on loopback, side by side with the wire's limit in the
//! same run: iperf3 (`-l 1M`) when it is installed, else an in-tree stream that does what
//! iperf3 does (one hot 1 MiB buffer written over and over, read into one hot buffer), for one
//! stream and for two pairs at once; then rdmig moving the same amount of non-zero memory with
//! 1 and 2 channels, in the clear and inside TLS 1.3. Every figure is the median of three runs; the machine is shared.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::procs::*;

/// Runs per figure; the median is reported.
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn iperf3_installed() -> bool {
    Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Seconds each iperf3 client sends for. Time-based, so that pairs started a few
/// milliseconds apart overlap for nearly all of it and the sum of their rates is their rate
/// together (with fixed byte counts, a pair that starts late runs partly alone and the sum
/// overstates it).
const IPERF3_SECONDS: &str = "2";

/// `pairs` iperf3 client/server pairs at once, each sending for `IPERF3_SECONDS` with 1 MiB
/// writes; the sum of their received rates in GB/s.
fn iperf3(pairs: usize) -> Result<f64, String> {
    let ports: Vec<u16> = (0..pairs).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut servers = Vec::new();
    for p in &ports {
        let s = Command::new("iperf3")
            .args(["-s", "-1", "-B", "127.0.0.1", "-p", &p.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("iperf3: {e}"))?;
        servers.push(s);
    }
    let t0 = Instant::now();
    let clients: Vec<_> = ports
        .iter()
        .map(|p| {
            let p = *p;
            std::thread::spawn(move || loop {
                let o = Command::new("iperf3")
                    .args(["-c", "127.0.0.1", "-p", &p.to_string(), "-l", "1M", "-J"])
                    .args(["-t", IPERF3_SECONDS])
                    .output();
                let rate = o.ok().and_then(|o| {
                    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
                    v["end"]["sum_received"]["bits_per_second"].as_f64()
                });
                match rate {
                    Some(bits) => break Ok(bits / 8e9),
                    // The server may not listen yet.
                    None if t0.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    None => break Err(format!("iperf3 client on port {p} failed")),
                }
            })
        })
        .collect();
    let mut total = 0.0;
    for c in clients {
        total += c.join().map_err(|_| "iperf3 client thread")??;
    }
    for mut s in servers {
        let _ = s.wait();
    }
    Ok(total)
}

/// Runs `send(i, connection)` for every sink port at once: all connections are made first
/// and the senders start together; the rate of all `bytes` together in GB/s, over the time
/// from the first start to the last end (not the sum of each sender's rate, which a late
/// start inflates).
fn together(
    ports: &[u16],
    bytes: u64,
    send: impl Fn(usize, &mut TcpStream) -> Result<(), String> + Send + Sync + 'static,
) -> Result<f64, String> {
    let conns: Vec<TcpStream> = ports
        .iter()
        .map(|p| connect_sink(*p))
        .collect::<Result<_, _>>()?;
    let go = Arc::new(std::sync::Barrier::new(conns.len()));
    let send = Arc::new(send);
    let senders: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let (go, send) = (go.clone(), send.clone());
            std::thread::spawn(move || {
                go.wait();
                let t = Instant::now();
                send(i, &mut c)?;
                Ok::<_, String>((t, Instant::now()))
            })
        })
        .collect();
    let mut spans = Vec::new();
    for s in senders {
        spans.push(s.join().map_err(|_| "stream sender thread")??);
    }
    let first = spans.iter().map(|s| s.0).min().ok_or("no sender")?;
    let last = spans.iter().map(|s| s.1).max().ok_or("no sender")?;
    Ok(bytes as f64 / (last - first).as_secs_f64() / 1e9)
}

/// The in-tree stand-in for iperf3: `pairs` sender/receiver process pairs at once, each
/// sender writing one hot 1 MiB buffer until `bytes` are out; their rate together in GB/s.
fn stream(pairs: usize, bytes: u64) -> Result<f64, String> {
    let ports: Vec<u16> = (0..pairs).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut sinks = Vec::new();
    for p in &ports {
        let s = Command::new(exe())
            .args(["bench", "--sink-port", &p.to_string()])
            .spawn()
            .map_err(|e| e.to_string())?;
        sinks.push(s);
    }
    let rate = together(&ports, bytes * pairs as u64, move |_, s| {
        let buf = vec![0x5au8; 1 << 20];
        let mut off = 0;
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            off += n as u64;
        }
        finish_stream(s, bytes)
    });
    for mut s in sinks {
        let _ = s.wait();
    }
    rate
}

/// The memory-to-memory stream: what rdmig's data path does without its protocol. `pairs`
/// sender/receiver pairs at once; sender `i` writes its share of the source file's mapping
/// (1 MiB per system call, straight from the mapping as rdmig's TCP binding does) and its
/// receiver reads it into a fresh pre-faulted mapping of that size in `d` (as `rdmig recv`
/// creates it). The sum of their rates in GB/s. Both ends touch memory that is not in any
/// cache, which a hot 1 MiB buffer never does.
fn memory_stream(d: &Path, src: &Path, pairs: usize, bytes: u64) -> Result<f64, String> {
    let share = (bytes / pairs as u64) & !((1 << 20) - 1);
    let ports: Vec<u16> = (0..pairs).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut sinks = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let s = Command::new(exe())
            .args(["bench", "--sink-port", &p.to_string()])
            .arg("--sink-into")
            .arg(d.join(format!("sink-{i}.ram")))
            .args(["--size", &share.to_string()])
            .spawn()
            .map_err(|e| e.to_string())?;
        sinks.push(s);
    }
    let block =
        Arc::new(crate::memory::ram::RamBlock::open("bench", src, 12).map_err(|e| e.to_string())?);
    let rate = together(&ports, share * pairs as u64, move |i, s| {
        let mut off = 0u64;
        while off < share {
            let n = (share - off).min(1 << 20);
            block
                .send_range(s.as_fd(), &[], i as u64 * share + off, n)
                .map_err(|e| e.to_string())?;
            off += n;
        }
        finish_stream(s, share)
    });
    for mut s in sinks {
        let _ = s.wait();
    }
    for i in 0..pairs {
        let _ = std::fs::remove_file(d.join(format!("sink-{i}.ram")));
    }
    rate
}

/// Connects to a sink on loopback `port`, waiting up to 10 s for it to listen.
fn connect_sink(port: u16) -> Result<TcpStream, String> {
    let t0 = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(format!("stream sink: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Ends a stream: half-close, then the sink's byte count must be `bytes`.
fn finish_stream(s: &mut TcpStream, bytes: u64) -> Result<(), String> {
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).map_err(|e| e.to_string())?;
    if u64::from_le_bytes(ack) != bytes {
        return Err("stream sink received a different byte count".into());
    }
    Ok(())
}

/// The receiving half of the memory-to-memory stream: a pre-faulted mapping of `size` bytes
/// at `path`, filled in order from the connection, then the byte count answered.
pub fn memory_sink(port: u16, path: &Path, size: u64) -> Result<ExitCode, String> {
    // Mapped and pre-faulted before listening, so the sender's clock starts after it.
    let ram =
        crate::memory::ram::RamBlock::create("sink", path, size, 12).map_err(|e| e.to_string())?;
    let l = TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    ram.recv_range(s.as_fd(), 0, size, deadline)
        .map_err(|e| e.to_string())?;
    let mut rest = [0u8; 1];
    if s.read(&mut rest).map_err(|e| e.to_string())? != 0 {
        return Err("memory stream: more bytes than announced".into());
    }
    s.write_all(&size.to_le_bytes())
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// The receiving half of the in-tree stream: reads into one hot 1 MiB buffer, then answers
/// the byte count.
pub fn raw_sink(port: u16) -> Result<ExitCode, String> {
    let l = TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
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

/// One rdmig migration of the source file with `channels` channels, inside TLS with the
/// credentials in `tls` when given: both reports.
fn rdmig_run(
    d: &Path,
    key: &Path,
    src: &Path,
    size: u64,
    channels: u8,
    tls: Option<&Path>,
) -> Result<(Value, Value), String> {
    let tag = channels.to_string();
    let dst = d.join(format!("dst-{tag}.ram"));
    let creds = tls.map(|p| p.display().to_string());
    let tls_args: Vec<&str> = match &creds {
        Some(c) => vec!["--tls-creds", c],
        None => vec![],
    };
    let (recv, addr) = start_recv(
        d,
        key,
        &[(format!("ram{tag}"), dst.clone(), size)],
        &tls_args,
    )?;
    let send = Command::new(exe())
        .args(["send", "--connect", &addr, "--json", "--channels", &tag])
        .arg("--ram")
        .arg(format!("ram{tag}={}", src.display()))
        .arg("--psk-file")
        .arg(key)
        .args(&tls_args)
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

/// RAM migrated beside the device state in the state measurements.
const STATE_RAM: u64 = 64 << 20;
/// The largest device state the control channel carries (spec: SW-3).
const CONTROL_STATE: u64 = rdmig_model::wire::MAX_DEVICE_STATE as u64;

/// One migration of `ram` (STATE_RAM bytes) with 2 channels and the device state in `state`
/// (none when `None`), over the control channel when `control`: the source's report.
fn state_run(
    d: &Path,
    key: &Path,
    ram: &Path,
    state: Option<&Path>,
    control: bool,
) -> Result<Value, String> {
    let dst = d.join("state-dst.ram");
    let (recv, addr) = start_recv(d, key, &[("ram".into(), dst.clone(), STATE_RAM)], &[])?;
    let mut send = Command::new(exe());
    send.args(["send", "--connect", &addr, "--json", "--channels", "2"])
        .arg("--ram")
        .arg(format!("ram={}", ram.display()))
        .arg("--psk-file")
        .arg(key);
    if let Some(p) = state {
        send.arg("--state-in").arg(p);
        let len = std::fs::metadata(p).map_err(|e| e.to_string())?.len();
        let max = if control { 0 } else { len };
        send.args(["--max-state-size", &max.to_string()]);
    }
    let send = send
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (sc, s) = report_of(send, "rdmig send")?;
    let (dc, _) = report_of(recv, "rdmig recv")?;
    let _ = std::fs::remove_file(&dst);
    if sc != 0 || dc != 0 {
        return Err(format!(
            "device state migration failed: source {sc}, destination {dc}"
        ));
    }
    Ok(s)
}

/// Milliseconds from the final round's acknowledgement to PREPARE: the device state's
/// transfer (no digests are negotiated).
fn tail_ms(s: &Value) -> f64 {
    s["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "device state and digests sent")
        .and_then(|p| p["duration_ms"].as_u64())
        .unwrap_or(0)
        .max(1) as f64
}

/// A file of `len` random bytes (xorshift: incompressible, cheap).
fn random_file(path: &Path, len: u64) -> Result<(), String> {
    let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    Ok(())
}

/// The device state figures: medians of [`RUNS`] runs each.
struct StateFigures {
    size: u64,
    /// The large state over the data channels: transfer ms (final ROUND_ACK to PREPARE) and
    /// downtime ms; the same migration without device state: downtime ms.
    big_ms: f64,
    big_downtime_ms: f64,
    none_downtime_ms: f64,
    /// 64 MiB over the control channel and over the data channels: transfer ms.
    control_ms: f64,
    data_ms: f64,
}

/// rdmig's data rate in a run: memory moved over the time from the end of setup to the end.
fn rdmig_gb_s(s: &Value, size: u64) -> f64 {
    let ms = (field(s, "total_time_ms") - field(s, "setup_time_ms")).max(1);
    size as f64 / (ms as f64 / 1e3) / 1e9
}

/// Fills a RAM file with non-zero pages from the workload's generator.
fn source_memory(path: &Path, size: u64) -> Result<crate::memory::ram::RamBlock, String> {
    let src =
        crate::memory::ram::RamBlock::create("bench", path, size, 12).map_err(|e| e.to_string())?;
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
    Ok(src)
}

/// A RAM file whose every other page is zero: moved with zero elision, its data travels
/// as single-page writes, as a running guest's scattered dirty pages do in later rounds.
fn scattered_memory(path: &Path, size: u64) -> Result<(), String> {
    let src =
        crate::memory::ram::RamBlock::create("bench", path, size, 12).map_err(|e| e.to_string())?;
    let mut page = vec![0u8; 4096];
    let mut p = 0u64;
    while p < size >> 12 {
        crate::tools::workload::page_content(9, p, 1, &mut page);
        src.write(p << 12, &page);
        p += 2;
    }
    Ok(())
}

/// Hash-scan rate of the dirty tracker with `threads` threads, GB/s.
/// The `scan` dirty log's steady state over `src` in GB/s: every page hashed and compared,
/// nothing changed since it was sent; the median of 3 scans (one scan of 1 GiB lasts tens of
/// milliseconds, short enough for a neighbour's burst to halve it).
fn scan_rate(src: crate::memory::ram::RamBlock, threads: usize) -> f64 {
    let blocks = vec![Arc::new(src)];
    median(
        (0..RUNS)
            .map(|_| crate::memory::dirty::scan_rate(blocks.clone(), threads))
            .collect(),
    )
}

/// What one bench run measured.
struct Figures {
    reference: &'static str,
    one: f64,
    two: f64,
    /// The memory-to-memory stream, 1 and 2 pairs.
    mem: [f64; 2],
    rdmig: [f64; 2],
    /// The same migrations inside TLS 1.3.
    tls: [f64; 2],
    /// Seconds (end of setup to end) for 2 channels to move the scattered memory.
    scattered_s: f64,
    phases: [String; 2],
    overhead: [(u64, u64); 2],
    scan: [f64; 2],
    state: Option<StateFigures>,
}

fn measure(d: &Path, size: u64, state_size: u64) -> Result<Figures, String> {
    let key = write_key(d)?;
    let src_path = d.join("src.ram");
    let src = source_memory(&src_path, size)?;
    let iperf = iperf3_installed();
    let reference = if iperf {
        "iperf3 -l 1M"
    } else {
        "in-tree stream (hot 1 MiB buffer)"
    };
    let wire = |pairs| {
        if iperf {
            iperf3(pairs)
        } else {
            stream(pairs, size)
        }
    };
    let mut one = Vec::new();
    let mut two = Vec::new();
    let mut mem = [Vec::new(), Vec::new()];
    let mut rdmig = [Vec::new(), Vec::new()];
    let mut tls = [Vec::new(), Vec::new()];
    let creds = d.join("tls");
    crate::transport::tls::init(&creds, &[])?;
    let scattered_path = d.join("scattered.ram");
    scattered_memory(&scattered_path, size)?;
    let mut scattered = Vec::new();
    let mut last = Vec::new();
    let (state_ram, big_state, small_state) = (
        d.join("state-src.ram"),
        d.join("state-big.bin"),
        d.join("state-64mib.bin"),
    );
    if state_size > 0 {
        source_memory(&state_ram, STATE_RAM)?;
        random_file(&big_state, state_size)?;
        random_file(&small_state, CONTROL_STATE)?;
    }
    let mut st: [Vec<f64>; 5] = Default::default();
    // Interleaved, so that a noisy moment hits every figure alike.
    for _ in 0..RUNS {
        one.push(wire(1)?);
        two.push(wire(2)?);
        mem[0].push(memory_stream(d, &src_path, 1, size)?);
        mem[1].push(memory_stream(d, &src_path, 2, size)?);
        last.clear();
        for (i, ch) in [1u8, 2].into_iter().enumerate() {
            let (s, r) = rdmig_run(d, &key, &src_path, size, ch, None)?;
            rdmig[i].push(rdmig_gb_s(&s, size));
            last.push((s, r));
            let (s, _) = rdmig_run(d, &key, &src_path, size, ch, Some(&creds))?;
            tls[i].push(rdmig_gb_s(&s, size));
        }
        let (s, _) = rdmig_run(d, &key, &scattered_path, size, 2, None)?;
        scattered.push((field(&s, "total_time_ms") - field(&s, "setup_time_ms")) as f64 / 1e3);
        if state_size > 0 {
            let s = state_run(d, &key, &state_ram, Some(&big_state), false)?;
            st[0].push(tail_ms(&s));
            st[1].push(field(&s, "downtime_ms") as f64);
            let s = state_run(d, &key, &state_ram, None, false)?;
            st[2].push(field(&s, "downtime_ms") as f64);
            let s = state_run(d, &key, &state_ram, Some(&small_state), true)?;
            st[3].push(tail_ms(&s));
            let s = state_run(d, &key, &state_ram, Some(&small_state), false)?;
            st[4].push(tail_ms(&s));
        }
    }
    let [big, big_down, none_down, control, data] = st;
    let state = (state_size > 0).then(|| StateFigures {
        size: state_size,
        big_ms: median(big),
        big_downtime_ms: median(big_down),
        none_downtime_ms: median(none_down),
        control_ms: median(control),
        data_ms: median(data),
    });
    let phases = |s: &Value| -> String {
        s["phases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["duration_ms"].as_u64().unwrap_or(0) > 0)
            .map(|p| {
                format!(
                    "{} {} ms",
                    p["name"].as_str().unwrap_or("?"),
                    p["duration_ms"]
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let overhead = |(s, r): &(Value, Value)| {
        (
            field(s, "rss_anon_bytes") >> 20,
            field(r, "rss_anon_bytes") >> 20,
        )
    };
    let scan = [
        scan_rate(
            crate::memory::ram::RamBlock::open("bench", &src_path, 12)
                .map_err(|e| e.to_string())?,
            1,
        ),
        scan_rate(src, 2),
    ];
    let [r1, r2] = rdmig;
    let [t1, t2] = tls;
    let [m1, m2] = mem;
    Ok(Figures {
        reference,
        one: median(one),
        two: median(two),
        mem: [median(m1), median(m2)],
        rdmig: [median(r1), median(r2)],
        tls: [median(t1), median(t2)],
        scattered_s: median(scattered),
        phases: [phases(&last[0].0), phases(&last[1].0)],
        overhead: [overhead(&last[0]), overhead(&last[1])],
        scan,
        state,
    })
}

/// Side-by-side data-path figures; `--json` prints them as one object. With `busy`, that many
/// threads spin for the whole measurement.
pub fn bench(
    size: u64,
    state_size: u64,
    dir: Option<PathBuf>,
    json: bool,
    busy: usize,
) -> Result<ExitCode, String> {
    let d = work_dir(dir, "bench")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..busy)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let result = measure(&d, size, state_size);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    // The scan once nothing else runs: a paused guest's final scan (for the simulator).
    let idle_scan = match (&result, busy) {
        (Ok(f), 0) => Ok(f.scan[1]),
        (Ok(_), _) => crate::memory::ram::RamBlock::open("bench", &d.join("src.ram"), 12)
            .map_err(|e| e.to_string())
            .map(|b| scan_rate(b, 2)),
        (Err(e), _) => Err(e.clone()),
    };
    let _ = std::fs::remove_dir_all(&d);
    let f = result?;
    let idle_scan = idle_scan?;
    if json {
        print_json(&f, size, busy, idle_scan);
    } else {
        print_table(&f, size);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--json`: the figures as one object.
fn print_json(f: &Figures, size: u64, busy: usize, idle_scan: f64) {
    let (r1, r2) = (f.rdmig[0] / f.one, f.rdmig[1] / f.two);
    let v = json!({
        "bytes": size,
        "busy_cores": busy,
        "reference": f.reference,
        "iperf3_1_gb_s": f.one,
        "iperf3_2_gb_s": f.two,
        "rdmig_1ch_gb_s": f.rdmig[0],
        "rdmig_2ch_gb_s": f.rdmig[1],
        "ratio_1ch": r1,
        "ratio_2ch": r2,
        "memory_stream_1_gb_s": f.mem[0],
        "memory_stream_2_gb_s": f.mem[1],
        "ratio_1ch_memory_stream": f.rdmig[0] / f.mem[0],
        "ratio_2ch_memory_stream": f.rdmig[1] / f.mem[1],
        "rdmig_tls_1ch_gb_s": f.tls[0],
        "rdmig_tls_2ch_gb_s": f.tls[1],
        "tls_ratio_1ch": f.tls[0] / f.rdmig[0],
        "tls_ratio_2ch": f.tls[1] / f.rdmig[1],
        "scan_1_thread_gb_s": f.scan[0],
        "scan_2_threads_gb_s": f.scan[1],
        "scan_2_threads_idle_gb_s": idle_scan,
        "scattered_2ch_s": f.scattered_s,
        "scattered_writes": size >> 13,
        "rss_anon_mib": {"1ch": f.overhead[0], "2ch": f.overhead[1]},
    });
    let mut v = v;
    if let Some(s) = &f.state {
        let t = state_terms(s, f.rdmig[1]);
        v["device_state"] = json!({
            "bytes": s.size,
            "data_channels_gb_s": t.rate,
            "ratio_to_rdmig_2ch": t.rate / f.rdmig[1],
            "transfer_ms": s.big_ms,
            "downtime_ms": s.big_downtime_ms,
            "downtime_without_state_ms": s.none_downtime_ms,
            "added_downtime_ms": t.added,
            "transfer_ms_at_ram_rate": t.at_ram_rate,
            "added_downtime_ratio": t.added / t.at_ram_rate,
            "control_channel_64mib_gb_s": CONTROL_STATE as f64 / (s.control_ms / 1e3) / 1e9,
            "data_channels_64mib_gb_s": CONTROL_STATE as f64 / (s.data_ms / 1e3) / 1e9,
        });
    }
    println!("{}", serde_json::to_string_pretty(&v).expect("plain JSON"));
}

/// What the device state figures come to beside the RAM rate.
struct StateTerms {
    /// The large state's rate over the data channels, GB/s.
    rate: f64,
    /// Downtime it added to the same migration without state, ms.
    added: f64,
    /// Its transfer time at the RAM's rate (2 channels), ms.
    at_ram_rate: f64,
}

fn state_terms(s: &StateFigures, ram_gb_s: f64) -> StateTerms {
    StateTerms {
        rate: s.size as f64 / (s.big_ms / 1e3) / 1e9,
        added: s.big_downtime_ms - s.none_downtime_ms,
        at_ram_rate: s.size as f64 / (ram_gb_s * 1e9) * 1e3,
    }
}

/// The figures as a table, each ratio beside its target.
fn print_table(f: &Figures, size: u64) {
    let (r1, r2) = (f.rdmig[0] / f.one, f.rdmig[1] / f.two);
    let limit = (size / 100 + (64 << 20)) >> 20;
    println!(
        "rdmig bench: {} MiB of non-zero memory, loopback TCP, median of {RUNS} interleaved runs",
        size >> 20
    );
    println!(
        "  {:<44} {:6.2} GB/s",
        format!("{}, 1 stream", f.reference),
        f.one
    );
    println!(
        "  {:<44} {:6.2} GB/s",
        format!("{}, 2 pairs at once", f.reference),
        f.two
    );
    for (i, pairs) in ["1 stream", "2 pairs at once"].into_iter().enumerate() {
        println!(
            "  {:<44} {:6.2} GB/s",
            format!("memory to memory (mapping to mapping), {pairs}"),
            f.mem[i]
        );
    }
    for (i, ch) in [1, 2].into_iter().enumerate() {
        let (ratio, target) = if ch == 1 { (r1, 0.9) } else { (r2, 0.8) };
        println!(
            "  {:<44} {:6.2} GB/s  {ratio:.2}x the {} (target {target}x: {})",
            format!("rdmig, {ch} channel{}", if ch > 1 { "s" } else { "" }),
            f.rdmig[i],
            if ch == 1 { "stream" } else { "pairs" },
            if ratio >= target { "met" } else { "not met" }
        );
        println!(
            "    {:.2}x memory to memory over the same {}",
            f.rdmig[i] / f.mem[i],
            if ch == 1 { "stream" } else { "pairs" }
        );
        println!("    phases: {}", f.phases[i]);
        println!(
            "    memory overhead: source {} MiB, destination {} MiB (limit 1% of RAM + 64 MiB = {limit} MiB)",
            f.overhead[i].0, f.overhead[i].1
        );
        println!(
            "  {:<44} {:6.2} GB/s  {:.2}x rdmig in the clear",
            format!(
                "rdmig inside TLS 1.3, {ch} channel{}",
                if ch > 1 { "s" } else { "" }
            ),
            f.tls[i],
            f.tls[i] / f.rdmig[i]
        );
    }
    println!(
        "  {:<44} {:6.0} ms  ({} single-page writes of {} MiB)",
        "rdmig, 2 channels, every other page zero",
        f.scattered_s * 1e3,
        size >> 13,
        size >> 21
    );
    println!(
        "  {:<44} {:6.2} GB/s",
        "dirty-log hash scan, 1 thread", f.scan[0]
    );
    println!(
        "  {:<44} {:6.2} GB/s",
        "dirty-log hash scan, 2 threads", f.scan[1]
    );
    if let Some(s) = &f.state {
        let t = state_terms(s, f.rdmig[1]);
        let ratio = t.rate / f.rdmig[1];
        let added = t.added / t.at_ram_rate;
        println!(
            "  {:<44} {:6.2} GB/s  {ratio:.2}x rdmig's RAM, 2 channels (target 0.8x: {})",
            format!("device state {} MiB, data channels (2)", s.size >> 20),
            t.rate,
            if ratio >= 0.8 { "met" } else { "not met" }
        );
        println!(
            "    adds {:.0} ms of downtime ({:.0} ms with it, {:.0} ms without): {added:.2}x its {:.0} ms at the RAM's rate (target 1.3x: {})",
            t.added,
            s.big_downtime_ms,
            s.none_downtime_ms,
            t.at_ram_rate,
            if added <= 1.3 { "met" } else { "not met" }
        );
        println!(
            "  {:<44} {:6.2} GB/s",
            "device state 64 MiB, control channel",
            CONTROL_STATE as f64 / (s.control_ms / 1e3) / 1e9
        );
        println!(
            "  {:<44} {:6.2} GB/s",
            "device state 64 MiB, data channels (2)",
            CONTROL_STATE as f64 / (s.data_ms / 1e3) / 1e9
        );
    }
}
