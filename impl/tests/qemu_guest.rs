//! Live migration of a real QEMU guest (TCG) whose RAM is a shared file, by `rdmig send
//! --qemu-qmp` / `rdmig recv --qemu-qmp`, beside QEMU's own `migrate tcp:` of the same guest.
//!
//! The guest (tests/qemu/guest) runs `memcheck`, which keeps dirtying its memory at a set rate
//! and verifies all of it continuously, printing `MEMCHECK tick=N ... VERIFY OK` once a second
//! on the serial console. A migration is correct when the destination console continues the
//! source's counter with verification still OK.
//!
//! These tests need QEMU 10, a kernel and the guest initramfs: `tests/qemu/run.sh` (`make
//! qemu`) prepares them and runs this file with `--ignored`, one test at a time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdmig::vmm::qmp::Qmp;
use serde_json::{json, Value};

/// Guest RAM in MiB, and how much of it memcheck fills and checks: 512 and 256 for the tests,
/// `RDMIG_QEMU_GUEST_MB` and `RDMIG_QEMU_FILL_MB` for the benchmark (`make qemu-bench`: 1024
/// and 768).
fn ram_mb() -> u64 {
    env_mb("RDMIG_QEMU_GUEST_MB", 512)
}
fn fill_mb() -> u64 {
    env_mb("RDMIG_QEMU_FILL_MB", 256)
}
fn env_mb(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// The dirty rates of the issue, in MB/s.
const RATES: [u64; 3] = [0, 50, 200];

struct Assets {
    qemu: String,
    data: String,
    kernel: String,
    initrd: String,
}

fn assets() -> Assets {
    let p = std::env::var("RDMIG_QEMU_ENV")
        .expect("RDMIG_QEMU_ENV names the env file tests/qemu/prepare.sh writes; run `make qemu`");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{p} has no {k}"))
            .to_string()
    };
    Assets {
        qemu: get("QEMU_BIN"),
        data: get("QEMU_DATA"),
        kernel: get("KERNEL"),
        initrd: get("INITRD"),
    }
}

/// Where a test keeps its sockets, consoles and RAM files (RAM in /dev/shm when present).
struct Scratch {
    dir: tempfile::TempDir,
    shm: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rdmig-qemu-{tag}-"))
            .tempdir()
            .unwrap();
        let shm = if Path::new("/dev/shm").is_dir() {
            PathBuf::from(format!("/dev/shm/rdmig-qemu-{tag}-{}", std::process::id()))
        } else {
            dir.path().join("shm")
        };
        std::fs::create_dir_all(&shm).unwrap();
        Scratch { dir, shm }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn ram(&self, name: &str) -> PathBuf {
        self.shm.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.shm);
    }
}

#[derive(Clone)]
struct GuestSpec {
    name: &'static str,
    rate: u64,
    /// RAM in this shared file (None: QEMU's default, private RAM).
    ram: Option<PathBuf>,
    /// MiB of private RAM (a memory-backend-ram) beside the shared file, as the NUMA node of
    /// the guest's CPU, so the guest's own allocations fill it first: it travels inside
    /// QEMU's device state.
    private_mb: u64,
    incoming: bool,
    extra: Vec<String>,
}

fn qemu_args(a: &Assets, s: &Scratch, g: &GuestSpec) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "-L".into(),
        a.data.clone(),
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        format!("{}M", ram_mb() + g.private_mb),
        "-smp".into(),
        "1".into(),
        "-no-reboot".into(),
        "-nic".into(),
        "none".into(),
        "-vga".into(),
        "none".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-kernel".into(),
        a.kernel.clone(),
        "-initrd".into(),
        a.initrd.clone(),
        "-append".into(),
        format!(
            "console=ttyS0 panic=-1 quiet memcheck.size={} memcheck.rate={}",
            fill_mb(),
            g.rate
        ),
        "-serial".into(),
        format!("file:{}", s.path(&format!("{}.console", g.name)).display()),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            s.path(&format!("{}.qmp", g.name)).display()
        ),
        "-pidfile".into(),
        s.path(&format!("{}.pid", g.name)).display().to_string(),
    ];
    match (&g.ram, g.private_mb) {
        (Some(ram), 0) => v.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
                ram_mb(),
                ram.display()
            ),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
        ]),
        (Some(ram), private) => v.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
                ram_mb(),
                ram.display()
            ),
            "-object".into(),
            format!("memory-backend-ram,id=priv,size={private}M"),
            "-numa".into(),
            "node,nodeid=0,cpus=0,memdev=priv".into(),
            "-numa".into(),
            "node,nodeid=1,memdev=mem".into(),
            "-machine".into(),
            "q35".into(),
        ]),
        (None, _) => v.extend(["-machine".into(), "q35".into()]),
    }
    if g.incoming {
        v.extend(["-incoming".into(), "defer".into()]);
    }
    v.extend(g.extra.iter().cloned());
    v
}

fn shell_line(bin: &str, args: &[String]) -> String {
    std::iter::once(bin)
        .chain(args.iter().map(String::as_str))
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One QEMU process (started here, or by `rdmig recv --qemu-start`), killed on drop.
struct Guest {
    name: &'static str,
    child: Option<Child>,
    pidfile: PathBuf,
    console: PathBuf,
    qmp: PathBuf,
}

impl Guest {
    fn start(a: &Assets, s: &Scratch, g: &GuestSpec) -> Guest {
        let child = Command::new(&a.qemu)
            .args(qemu_args(a, s, g))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.path(&format!("{}.stderr", g.name))).unwrap())
            .spawn()
            .expect("starting QEMU");
        Guest::adopt(s, g, Some(child))
    }

    /// A guest whose QEMU someone else starts with `qemu_args`.
    fn adopt(s: &Scratch, g: &GuestSpec, child: Option<Child>) -> Guest {
        Guest {
            name: g.name,
            child,
            pidfile: s.path(&format!("{}.pid", g.name)),
            console: s.path(&format!("{}.console", g.name)),
            qmp: s.path(&format!("{}.qmp", g.name)),
        }
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect_retry(&self.qmp, Duration::from_secs(30), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{}: QMP: {e}", self.name))
    }

    fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    fn ticks(&self) -> Vec<Tick> {
        ticks(&self.console())
    }

    /// Waits until the guest has printed `n` more tick lines than `after`.
    fn wait_ticks(&self, after: usize, n: usize, timeout: Duration) -> Vec<Tick> {
        let t = Instant::now();
        loop {
            let k = self.ticks();
            if k.len() >= after + n {
                return k;
            }
            assert!(
                t.elapsed() < timeout,
                "{}: {} tick lines after {:?}; console:\n{}",
                self.name,
                k.len(),
                timeout,
                tail(&self.console())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Boots until memcheck has filled its memory and printed two ticks.
    fn wait_ready(&self) -> Duration {
        let t = Instant::now();
        self.wait_ticks(0, 2, Duration::from_secs(240));
        t.elapsed()
    }

    fn capability(&self, name: &str) -> bool {
        let mut q = self.qmp();
        let caps = q.execute("query-migrate-capabilities", None).unwrap();
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == name && c["state"] == true)
    }

    fn status(&self) -> String {
        let mut q = self.qmp();
        q.execute("query-status", None).unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Ok(p) = std::fs::read_to_string(&self.pidfile) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Tick {
    n: u64,
    ok: bool,
    dirtied_mb: u64,
}

/// The tick lines of a console. A line cut short (the guest paused while printing it, its
/// end still to come on the destination's console) is not a tick yet.
fn ticks(console: &str) -> Vec<Tick> {
    console
        .lines()
        .filter(|l| {
            let l = l.trim_end();
            l.ends_with("VERIFY OK") || l.ends_with("VERIFY BAD")
        })
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("MEMCHECK tick=")?;
            let n = rest.split_whitespace().next()?.parse().ok()?;
            let dirtied_mb = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("dirtied_mb="))
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
            Some(Tick {
                n,
                ok: l.trim_end().ends_with("VERIFY OK"),
                dirtied_mb,
            })
        })
        .collect()
}

fn tail(s: &str) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The destination continues the source's counter with memory verification still OK: its
/// first complete tick follows the source's last one (a line cut by the switchover may be
/// lost), later ticks count up by one, and nothing reports a bad page or a crash.
fn check_continues(src: &Guest, dst: &Guest) -> Result<(u64, u64), String> {
    let s = src.ticks();
    let last = s.last().ok_or("the source printed no tick")?.n;
    if let Some(b) = s.iter().find(|t| !t.ok) {
        return Err(format!("source tick {} reported VERIFY BAD", b.n));
    }
    let t = Instant::now();
    let d = loop {
        let d = dst.ticks();
        if d.len() >= 4 {
            break d;
        }
        let c = dst.console();
        if c.contains("VERIFY BAD") || c.contains("Kernel panic") || c.contains("MEMCHECK EXITED") {
            return Err(format!("destination failed:\n{}", tail(&c)));
        }
        if t.elapsed() > Duration::from_secs(90) {
            return Err(format!(
                "destination printed {} ticks in 90 s:\n{}",
                d.len(),
                tail(&c)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let first = d[0].n;
    if !(last + 1..=last + 2).contains(&first) {
        return Err(format!(
            "destination counter starts at {first}, source ended at {last}"
        ));
    }
    if d.windows(2).any(|w| w[1].n != w[0].n + 1) {
        return Err(format!("destination counter skips: {d:?}"));
    }
    let c = dst.console();
    if let Some(b) = d.iter().find(|t| !t.ok) {
        return Err(format!(
            "destination tick {} VERIFY BAD:\n{}",
            b.n,
            tail(&c)
        ));
    }
    if c.contains("VERIFY BAD") || c.contains("Kernel panic") {
        return Err(format!("destination failed:\n{}", tail(&c)));
    }
    Ok((last, first))
}

/// A process with its output collected, killed on drop.
struct Proc {
    child: Option<Child>,
    name: &'static str,
}

struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Proc {
    fn spawn(name: &'static str, args: &[String]) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_rdmig"))
            .args(args)
            .env("RDMIG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rdmig");
        Proc {
            child: Some(child),
            name,
        }
    }

    fn wait(mut self, timeout: Duration) -> Exit {
        let mut c = self.child.take().unwrap();
        let mut out = c.stdout.take().unwrap();
        let mut err = c.stderr.take().unwrap();
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let t = Instant::now();
        let status = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > timeout {
                let _ = c.kill();
                let st = c.wait().unwrap();
                panic!(
                    "{} did not finish in {timeout:?} ({st}); stderr:\n{}",
                    self.name,
                    e.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Exit {
            code: status.code(),
            stdout: o.join().unwrap(),
            stderr: e.join().unwrap(),
        }
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn report(e: &Exit, who: &str) -> Value {
    serde_json::from_str(&e.stdout).unwrap_or_else(|err| {
        panic!(
            "{who}: no JSON report ({err}); exit {:?}; stderr:\n{}",
            e.code, e.stderr
        )
    })
}

fn wait_file(p: &Path, timeout: Duration) -> String {
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.is_empty() {
                return s;
            }
        }
        assert!(t.elapsed() < timeout, "{} not written", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line of the comparison table.
#[derive(Debug)]
struct Row {
    tool: &'static str,
    rate: u64,
    total_ms: u64,
    downtime_ms: u64,
    transferred_mb: f64,
    dirtied_mb_s: u64,
    survived: Result<(u64, u64), String>,
    /// rdmig's phase breakdown (its report's `phases`), or null.
    phases: Value,
}

fn record(r: &Row) {
    let line = json!({
        "tool": r.tool,
        "rate_mb_s": r.rate,
        "measured_dirty_mb_s": r.dirtied_mb_s,
        "total_ms": r.total_ms,
        "downtime_ms": r.downtime_ms,
        "transferred_mb": (r.transferred_mb * 10.0).round() / 10.0,
        "survived": r.survived.is_ok(),
        "guest_mb": ram_mb(),
        "fill_mb": fill_mb(),
        "phases": r.phases,
        "detail": detail(&r.survived),
    });
    eprintln!("ROW {line}");
    if let Ok(p) = std::env::var("RDMIG_QEMU_RESULTS") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

/// Mean MB dirtied per second over the source's last ticks before the switchover.
fn dirtied(src: &Guest) -> u64 {
    let t = src.ticks();
    let last: Vec<_> = t.iter().rev().take(3).collect();
    last.iter().map(|t| t.dirtied_mb).sum::<u64>() / last.len().max(1) as u64
}

/// Boots the source guest (RAM in the scratch's `src.ram`, dirtying at `rate` MB/s) until
/// memcheck runs, and returns it with the spec of its destination: the same machine on its own
/// RAM file, waiting with `-incoming defer`.
fn boot_source(a: &Assets, s: &Scratch, rate: u64, extra: Vec<String>) -> (Guest, GuestSpec) {
    boot_source_with(a, s, rate, 0, extra)
}

/// [`boot_source`] for a guest with `private_mb` MiB of private RAM beside its shared file.
fn boot_source_with(
    a: &Assets,
    s: &Scratch,
    rate: u64,
    private_mb: u64,
    extra: Vec<String>,
) -> (Guest, GuestSpec) {
    let srcg = GuestSpec {
        name: "src",
        rate,
        ram: Some(s.ram("src.ram")),
        private_mb,
        incoming: false,
        extra,
    };
    let src = Guest::start(a, s, &srcg);
    let boot = src.wait_ready();
    eprintln!("source guest ready in {boot:?}");
    let dstg = GuestSpec {
        name: "dst",
        ram: Some(s.ram("dst.ram")),
        incoming: true,
        extra: vec![],
        ..srcg
    };
    (src, dstg)
}

/// `rdmig recv` for the scratch's destination QEMU and RAM file, reporting in JSON.
fn recv_args(s: &Scratch) -> Vec<String> {
    vec![
        "recv".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--json".into(),
        "--addr-file".into(),
        s.path("addr").display().to_string(),
        "--qemu-qmp".into(),
        s.path("dst.qmp").display().to_string(),
        "--ram".into(),
        format!("pc.ram={}:{}MiB", s.ram("dst.ram").display(), ram_mb()),
    ]
}

/// `rdmig send` of the scratch's source QEMU to `addr`, with `scan` dirty tracking.
fn send_args(s: &Scratch, addr: String, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "send".into(),
        "--connect".into(),
        addr,
        "--json".into(),
        "--dirty-log".into(),
        "scan".into(),
        "--ram".into(),
        format!("pc.ram={}", s.ram("src.ram").display()),
        "--qemu-qmp".into(),
        s.path("src.qmp").display().to_string(),
    ];
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

struct RdmigRun {
    send: Exit,
    recv: Exit,
    src: Guest,
    dst: Guest,
}

/// Boots a guest, migrates it with rdmig to a destination QEMU (started by `rdmig recv
/// --qemu-start` when `start_by_recv`), and returns both processes' results.
fn rdmig_migrate(
    a: &Assets,
    s: &Scratch,
    rate: u64,
    start_by_recv: bool,
    src_extra: Vec<String>,
    send_extra: &[&str],
) -> RdmigRun {
    rdmig_migrate_with(a, s, rate, start_by_recv, src_extra, send_extra, &[])
}

/// [`rdmig_migrate`] with arguments for `rdmig recv` too.
fn rdmig_migrate_with(
    a: &Assets,
    s: &Scratch,
    rate: u64,
    start_by_recv: bool,
    src_extra: Vec<String>,
    send_extra: &[&str],
    recv_extra: &[&str],
) -> RdmigRun {
    let booted = boot_source(a, s, rate, src_extra);
    rdmig_migrate_booted(a, s, booted, start_by_recv, send_extra, recv_extra)
}

/// Migrates a booted source guest with rdmig to its destination spec.
fn rdmig_migrate_booted(
    a: &Assets,
    s: &Scratch,
    (src, dstg): (Guest, GuestSpec),
    start_by_recv: bool,
    send_extra: &[&str],
    recv_extra: &[&str],
) -> RdmigRun {
    let mut recv_args = recv_args(s);
    recv_args.extend(recv_extra.iter().map(|x| x.to_string()));
    let dst = if start_by_recv {
        recv_args.push("--qemu-start".into());
        recv_args.push(shell_line(&a.qemu, &qemu_args(a, s, &dstg)));
        Guest::adopt(s, &dstg, None)
    } else {
        let g = Guest::start(a, s, &dstg);
        assert_eq!(g.status(), "inmigrate");
        g
    };
    let recv = Proc::spawn("rdmig recv", &recv_args);
    let addr = wait_file(&s.path("addr"), Duration::from_secs(60));
    let send_args = send_args(s, addr, send_extra);
    let send = Proc::spawn("rdmig send", &send_args);
    let send = send.wait(Duration::from_secs(300));
    let recv = recv.wait(Duration::from_secs(120));
    RdmigRun {
        send,
        recv,
        src,
        dst,
    }
}

#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn rdmig_live_migrates_qemu_guest_at_0_50_200_mb_s_and_memory_stays_intact() {
    let a = assets();
    // (rate, channels, verify); the first run also covers `rdmig recv --qemu-start`.
    let mut runs: Vec<(u64, u8, bool)> = RATES
        .iter()
        .flat_map(|&r| [(r, 1, false), (r, 2, false)])
        .collect();
    runs.push((50, 1, true));
    for (i, (rate, channels, verify)) in runs.into_iter().enumerate() {
        let s = Scratch::new(&format!("rdmig-{rate}-{channels}-{verify}"));
        let ch = channels.to_string();
        let mut extra = vec!["--channels", ch.as_str()];
        if verify {
            // This run also quits the source QEMU after commit.
            extra.extend(["--verify", "--qemu-quit"]);
        }
        let mut r = rdmig_migrate(&a, &s, rate, i == 0, vec![], &extra);
        let sr = report(&r.send, "send");
        let rr = report(&r.recv, "recv");
        eprintln!("rate {rate}, {channels} channels: source report {sr}");
        for l in r
            .send
            .stderr
            .lines()
            .filter(|l| l.contains(" took ") || l.contains(" in "))
        {
            eprintln!("  send: {l}");
        }
        assert_eq!(
            (r.send.code, r.recv.code),
            (Some(0), Some(0)),
            "rate {rate}: send {sr}\nrecv stderr:\n{}",
            r.recv.stderr
        );
        assert_eq!(sr["status"], "completed");
        assert_eq!(sr["verified"], verify);
        assert_eq!(rr["guest"], "running");
        if verify {
            assert_eq!(sr["guest"], "quit");
            let c = r.src.child.as_mut().unwrap();
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "source QEMU still runs"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            assert_eq!(sr["guest"], "stopped");
            assert_eq!(
                r.src.status(),
                "postmigrate",
                "the source guest stays stopped"
            );
        }
        assert_eq!(r.dst.status(), "running");
        let tool = match (channels, verify) {
            (1, false) => "rdmig 1ch",
            (2, false) => "rdmig 2ch",
            _ => "rdmig 1ch --verify",
        };
        let row = rdmig_row(tool, rate, &r, &sr);
        record(&row);
        if let Err(e) = &row.survived {
            panic!("rate {rate}: guest did not survive: {e}");
        }
    }
}

/// QEMU's own live migration of the same guest over TCP on loopback: precopy, and multifd
/// with 2 channels; max-bandwidth raised, downtime-limit 300 ms.
fn qemu_migrate(a: &Assets, rate: u64, multifd: bool) -> Row {
    qemu_migrate_with(a, rate, multifd, None)
}

/// QEMU's own migration, inside TLS with `tls-creds-x509` objects on the credentials in
/// `tls` (the layout `rdmig tls-init` writes) when given.
fn qemu_migrate_with(a: &Assets, rate: u64, multifd: bool, tls: Option<&Path>) -> Row {
    qemu_migrate_guest(a, rate, multifd, tls, 0)
}

/// QEMU's own migration of a guest with `private_mb` MiB of private RAM beside its shared
/// file (all of it, shared and private, in QEMU's stream).
fn qemu_migrate_guest(
    a: &Assets,
    rate: u64,
    multifd: bool,
    tls: Option<&Path>,
    private_mb: u64,
) -> Row {
    let s = Scratch::new(&format!(
        "qemu-{rate}-{multifd}-{}-{private_mb}",
        tls.is_some()
    ));
    let (src, dstg) = boot_source_with(a, &s, rate, private_mb, vec![]);
    let dst = Guest::start(a, &s, &dstg);
    let mut qs = src.qmp();
    let mut qd = dst.qmp();
    let caps = json!({"capabilities": [{"capability": "multifd", "state": multifd}]});
    qs.execute("migrate-set-capabilities", Some(caps.clone()))
        .unwrap();
    qd.execute("migrate-set-capabilities", Some(caps)).unwrap();
    let mut params =
        json!({"max-bandwidth": 10u64 << 30, "downtime-limit": 300, "multifd-channels": 2});
    let mut dparams = json!({"multifd-channels": 2});
    if let Some(dir) = tls {
        for (q, endpoint) in [(&mut qs, "client"), (&mut qd, "server")] {
            q.execute(
                "object-add",
                Some(json!({"qom-type": "tls-creds-x509", "id": "tls0",
                    "dir": dir.display().to_string(), "endpoint": endpoint,
                    "verify-peer": true})),
            )
            .unwrap();
        }
        params["tls-creds"] = json!("tls0");
        params["tls-hostname"] = json!("localhost");
        dparams["tls-creds"] = json!("tls0");
    }
    qs.execute("migrate-set-parameters", Some(params.clone()))
        .unwrap();
    qd.execute("migrate-set-parameters", Some(dparams)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qd.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .unwrap();
    qs.execute("migrate", Some(json!({ "uri": uri }))).unwrap();
    let t = Instant::now();
    let m = loop {
        let m = qs.execute("query-migrate", None).unwrap();
        match m["status"].as_str().unwrap_or("") {
            "completed" | "failed" | "cancelled" => break m,
            _ if t.elapsed() > Duration::from_secs(300) => panic!("QEMU migration hangs: {m}"),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let tool = match (multifd, tls.is_some(), private_mb > 0) {
        (true, _, true) => "qemu multifd 2ch, private RAM",
        (true, true, _) => "qemu multifd 2ch tls",
        (true, false, _) => "qemu multifd 2ch",
        (false, _, _) => "qemu precopy",
    };
    let survived = if m["status"] == "completed" {
        check_continues(&src, &dst)
    } else {
        Err(format!("QEMU migration {m}"))
    };
    Row {
        tool,
        rate,
        total_ms: m["total-time"].as_u64().unwrap_or(0),
        downtime_ms: m["downtime"].as_u64().unwrap_or(0),
        transferred_mb: m["ram"]["transferred"].as_u64().unwrap_or(0) as f64 / 1e6,
        dirtied_mb_s: dirtied(&src),
        survived,
        phases: Value::Null,
    }
}

/// Pages that differ between two RAM files: a count and the first few page numbers.
fn page_diff(a: &Path, b: &Path) -> String {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let diff: Vec<usize> = x
        .chunks(4096)
        .zip(y.chunks(4096))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i)
        .collect();
    let zero = |v: &[u8], i: usize| v[i * 4096..(i + 1) * 4096].iter().all(|&b| b == 0);
    let dst_zero = diff.iter().filter(|&&i| zero(&y, i)).count();
    let src_zero = diff.iter().filter(|&&i| zero(&x, i)).count();
    // memcheck's pages: word 0 is ((page << 32) | version) * K (tests/qemu/guest/memcheck.rs),
    // so each differing page tells whether the destination holds an older version (memory
    // lost in the migration) or a newer one (the destination guest wrote it after resuming).
    const K_INV: u64 = {
        // The inverse of memcheck's odd multiplier modulo 2^64, by Newton's iteration.
        let k: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut inv: u64 = k;
        let mut i = 0;
        while i < 6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(k.wrapping_mul(inv)));
            i += 1;
        }
        inv
    };
    let key = |v: &[u8], i: usize| {
        let w = u64::from_le_bytes(v[i * 4096..i * 4096 + 8].try_into().unwrap());
        let k = w.wrapping_mul(K_INV);
        ((k >> 32) as usize, k as u32)
    };
    let (mut older, mut newer) = (0, 0);
    for &i in &diff {
        let ((pa, va), (pb, vb)) = (key(&x, i), key(&y, i));
        if pa == pb && va < 1 << 20 && vb < 1 << 20 {
            if vb < va {
                older += 1;
            } else if vb > va {
                newer += 1;
            }
        }
    }
    format!(
        "{} pages differ ({dst_zero} of them zero at the destination, {src_zero} at the source; \
         memcheck pages older at the destination {older}, newer {newer}), first {:?}",
        diff.len(),
        &diff[..diff.len().min(20)]
    )
}

/// The row of an rdmig run whose source reported `sr`: its figures, and whether the guest
/// went on at the destination.
fn rdmig_row(tool: &'static str, rate: u64, r: &RdmigRun, sr: &Value) -> Row {
    Row {
        tool,
        rate,
        total_ms: sr["total_time_ms"].as_u64().unwrap(),
        downtime_ms: sr["downtime_ms"].as_u64().unwrap(),
        transferred_mb: sr["bytes"]["data"].as_u64().unwrap() as f64 / 1e6,
        dirtied_mb_s: dirtied(&r.src),
        survived: check_continues(&r.src, &r.dst),
        phases: sr["phases"].clone(),
    }
}

/// The benchmark row of an rdmig run, recorded. A guest that fails its check leaves its
/// evidence: the page comparison and both QEMUs' states on stderr, and with
/// `RDMIG_QEMU_KEEP_FAILED=DIR` both RAM files, the report and the consoles in `DIR/tag`.
fn bench_row(tool: &'static str, rate: u64, s: &Scratch, r: &RdmigRun, tag: &str) -> Row {
    let sr = report(&r.send, "send");
    assert_eq!(r.send.code, Some(0), "rate {rate}: {sr}");
    let row = rdmig_row(tool, rate, r, &sr);
    record(&row);
    if row.survived.is_err() {
        eprintln!("DIFF {}", page_diff(&s.ram("src.ram"), &s.ram("dst.ram")));
        eprintln!(
            "DIFF source QEMU {}, destination QEMU {}",
            r.src.status(),
            r.dst.status()
        );
        if let Ok(keep) = std::env::var("RDMIG_QEMU_KEEP_FAILED") {
            let to = Path::new(&keep).join(tag);
            let _ = std::fs::create_dir_all(&to);
            for f in ["src.ram", "dst.ram"] {
                let _ = std::fs::copy(s.ram(f), to.join(f));
            }
            let _ = std::fs::write(to.join("send.json"), sr.to_string());
            let _ = std::fs::write(to.join("dst-console"), r.dst.console());
            let _ = std::fs::write(to.join("src-console"), r.src.console());
        }
    }
    row
}

/// A benchmark goes on past a guest that failed; the test fails at its end.
fn note_failure(failed: &mut Vec<String>, row: &Row) {
    if let Err(e) = &row.survived {
        failed.push(format!("{} at {} MB/s: {e}", row.tool, row.rate));
    }
}

/// `make qemu-bench`: rdmig with 2 channels (with and without `--verify`) next to QEMU's own
/// multifd migration with 2 channels, at 0, 50 and 200 MB/s, `RDMIG_QEMU_BENCH_RUNS` times each
/// (default 3), interleaved so that a noisy moment hits every tool alike. Every row goes to
/// `RDMIG_QEMU_RESULTS`; `tests/qemu/bench.sh` prints the medians and ratios. Every guest must
/// verify its memory after the switchover.
#[test]
#[ignore = "a benchmark: run `make qemu-bench`"]
fn bench_rdmig_2ch_against_qemu_multifd_2ch() {
    let a = assets();
    let runs = env_mb("RDMIG_QEMU_BENCH_RUNS", 3);
    // A guest that fails is recorded and the benchmark goes on; the test fails at the end.
    let mut failed: Vec<String> = Vec::new();
    for run in 0..runs {
        for rate in RATES {
            let verify_too = std::env::var("RDMIG_QEMU_BENCH_RDMIG_ONLY").is_err();
            for verify in [false, true].into_iter().filter(|&v| !v || verify_too) {
                let s = Scratch::new(&format!("bench-{rate}-{verify}-{run}"));
                let mut extra = vec!["--channels", "2"];
                if verify {
                    extra.push("--verify");
                }
                let r = rdmig_migrate(&a, &s, rate, false, vec![], &extra);
                let tool = if verify {
                    "rdmig 2ch --verify"
                } else {
                    "rdmig 2ch"
                };
                let row = bench_row(tool, rate, &s, &r, &format!("{rate}-{verify}-{run}"));
                note_failure(&mut failed, &row);
            }
            if std::env::var("RDMIG_QEMU_BENCH_RDMIG_ONLY").is_ok() {
                continue;
            }
            let q = qemu_migrate(&a, rate, true);
            record(&q);
            note_failure(&mut failed, &q);
        }
    }
    assert!(failed.is_empty(), "guests that failed: {failed:#?}");
}

/// `make qemu-bench`, a guest with private RAM (`RDMIG_QEMU_PRIVATE_MB`, default 256 MiB)
/// beside its shared file: rdmig with 2 channels (the private RAM inside the device state,
/// streamed over the data channels) next to QEMU's own multifd migration of the same guest
/// with 2 channels, at 0 and 50 MB/s, interleaved, rows as above.
#[test]
#[ignore = "a benchmark: run `make qemu-bench`"]
fn bench_private_ram_rdmig_2ch_against_qemu_multifd_2ch() {
    let a = assets();
    let runs = env_mb("RDMIG_QEMU_BENCH_RUNS", 3);
    let private = env_mb("RDMIG_QEMU_PRIVATE_MB", 256);
    let mut failed: Vec<String> = Vec::new();
    for run in 0..runs {
        for rate in [0, 50] {
            let s = Scratch::new(&format!("bench-private-{rate}-{run}"));
            let booted = boot_source_with(&a, &s, rate, private, vec![]);
            let r = rdmig_migrate_booted(&a, &s, booted, false, &["--channels", "2"], &[]);
            let sr = report(&r.send, "send");
            eprintln!(
                "ROW-STATE rate {rate}: {} bytes of device state over the {}",
                sr["bytes"]["device_state"], sr["bytes"]["device_state_path"]
            );
            let row = bench_row(
                "rdmig 2ch, private RAM",
                rate,
                &s,
                &r,
                &format!("private-{rate}-{run}"),
            );
            note_failure(&mut failed, &row);
            let q = qemu_migrate_guest(&a, rate, true, None, private);
            record(&q);
            note_failure(&mut failed, &q);
        }
    }
    assert!(failed.is_empty(), "guests that failed: {failed:#?}");
}

/// `make qemu-bench`, TLS: rdmig with 2 channels inside TLS 1.3 (`--tls-creds`, with the
/// PSK bound to the session) next to QEMU's multifd with 2 channels and `tls-creds-x509` on
/// the same credentials, at 0 and 200 MB/s, interleaved, rows as above.
#[test]
#[ignore = "a benchmark: run `make qemu-bench`"]
fn bench_tls_rdmig_2ch_against_qemu_multifd_tls_2ch() {
    let a = assets();
    let runs = env_mb("RDMIG_QEMU_BENCH_RUNS", 3);
    let mut failed: Vec<String> = Vec::new();
    let creds = Scratch::new("tls-creds");
    let dir = creds.path("tls");
    let o = Command::new(env!("CARGO_BIN_EXE_rdmig"))
        .arg("tls-init")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = dir.display().to_string();
    for run in 0..runs {
        for rate in [0, 200] {
            let s = Scratch::new(&format!("bench-tls-{rate}-{run}"));
            let tls = ["--tls-creds", d.as_str()];
            let r = rdmig_migrate_with(
                &a,
                &s,
                rate,
                false,
                vec![],
                &["--channels", "2", "--tls-creds", &d],
                &tls,
            );
            let row = bench_row("rdmig 2ch tls", rate, &s, &r, &format!("tls-{rate}-{run}"));
            note_failure(&mut failed, &row);
            let q = qemu_migrate_with(&a, rate, true, Some(&dir));
            record(&q);
            note_failure(&mut failed, &q);
        }
    }
    assert!(failed.is_empty(), "guests that failed: {failed:#?}");
}

#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn reference_qemu_own_migration_of_the_same_guest_completes() {
    let a = assets();
    for rate in RATES {
        for multifd in [false, true] {
            let row = qemu_migrate(&a, rate, multifd);
            record(&row);
            assert!(
                row.total_ms > 0,
                "QEMU reported no total time: the comparison would be empty: {row:?}"
            );
        }
    }
}

#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn source_guest_keeps_running_when_the_destination_is_killed_mid_migration() {
    let a = assets();
    let s = Scratch::new("abort");
    let (src, dstg) = boot_source(&a, &s, 50, vec![]);
    let dst = Guest::start(&a, &s, &dstg);
    assert_eq!(dst.status(), "inmigrate");
    let mut recv = Proc::spawn("rdmig recv", &recv_args(&s));
    let addr = wait_file(&s.path("addr"), Duration::from_secs(60));
    // Slow enough that the kill lands in the middle of pre-copy.
    let send = Proc::spawn(
        "rdmig send",
        &send_args(&s, addr, &["--max-bandwidth", "20MB/s"]),
    );
    std::thread::sleep(Duration::from_secs(3));
    recv.kill();
    let before = src.ticks().len();
    let e = send.wait(Duration::from_secs(60));
    let r = report(&e, "send");
    assert_eq!(e.code, Some(2), "aborted, source resumed: {r}");
    assert_eq!(r["status"], "aborted");
    assert_eq!(r["guest"], "resumed");
    assert_eq!(src.status(), "running");
    assert!(
        !src.capability("x-ignore-shared"),
        "the source QEMU's capabilities are put back after the abort"
    );
    let t = src.wait_ticks(before, 3, Duration::from_secs(60));
    assert!(
        t.iter().all(|t| t.ok),
        "source memory verification after the abort:\n{}",
        tail(&src.console())
    );
    assert!(t.windows(2).all(|w| w[1].n == w[0].n + 1), "{t:?}");
}

#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn destination_qemu_that_fails_to_load_the_state_aborts_and_source_guest_resumes() {
    let a = assets();
    let s = Scratch::new("loadfail");
    // The source has a device the destination lacks: its state section cannot be loaded.
    let r = rdmig_migrate(
        &a,
        &s,
        50,
        false,
        vec!["-device".into(), "virtio-rng-pci".into()],
        &[],
    );
    let sr = report(&r.send, "send");
    assert_eq!(r.send.code, Some(2), "{sr}");
    assert_eq!(sr["status"], "aborted");
    assert_eq!(sr["guest"], "resumed");
    assert_ne!(r.recv.code, Some(0));
    assert!(
        r.recv
            .stderr
            .contains("destination QEMU exited while loading the device state"),
        "recv stderr:\n{}",
        r.recv.stderr
    );
    assert_eq!(r.src.status(), "running");
    assert!(!r.src.capability("x-ignore-shared"));
    let before = r.src.ticks().len();
    let t = r.src.wait_ticks(before, 3, Duration::from_secs(60));
    assert!(
        t.iter().all(|t| t.ok),
        "source memory after the failed switchover:\n{}",
        tail(&r.src.console())
    );
}

#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn guest_without_shared_file_ram_is_refused_and_keeps_running() {
    let a = assets();
    let s = Scratch::new("private");
    let src = Guest::start(
        &a,
        &s,
        &GuestSpec {
            name: "src",
            rate: 0,
            ram: None,
            private_mb: 0,
            incoming: false,
            extra: vec![],
        },
    );
    assert_eq!(src.status(), "running");
    let ram = s.ram("src.ram");
    std::fs::write(&ram, vec![0u8; (ram_mb() << 20) as usize]).unwrap();
    let e = Proc::spawn(
        "rdmig send",
        &[
            "send".into(),
            "--connect".into(),
            "127.0.0.1:9".into(),
            "--ram".into(),
            format!("pc.ram={}", ram.display()),
            "--qemu-qmp".into(),
            s.path("src.qmp").display().to_string(),
        ],
    )
    .wait(Duration::from_secs(60));
    assert_eq!(e.code, Some(1), "{}", e.stderr);
    assert!(
        e.stderr.contains("is not a RAM backend of this guest"),
        "{}",
        e.stderr
    );
    assert_eq!(src.status(), "running");
}

/// MiB of private RAM in the tests of guests that have some.
const PRIVATE_MB: u64 = 128;

/// spec: STATE-1: a guest whose private RAM (it all becomes downtime) exceeds the operator's
/// limit is refused before anything is paused, with a message that says why, and keeps
/// running.
#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn state_1_a_guest_with_more_private_ram_than_allowed_is_refused_and_keeps_running() {
    let a = assets();
    let s = Scratch::new("private-limit");
    let (src, _) = boot_source_with(&a, &s, 0, PRIVATE_MB, vec![]);
    let mut args = send_args(&s, "127.0.0.1:9".into(), &[]);
    args.extend(["--max-private-ram".into(), "64MiB".into()]);
    let e = Proc::spawn("rdmig send", &args).wait(Duration::from_secs(60));
    assert_eq!(e.code, Some(1), "{}", e.stderr);
    assert!(
        e.stderr.contains("private RAM")
            && e.stderr.contains("downtime")
            && e.stderr.contains("--max-private-ram"),
        "{}",
        e.stderr
    );
    assert_eq!(src.status(), "running");
}

/// spec: STATE-1 .. STATE-5: a guest with private RAM beside its shared file migrates live:
/// the shared file by rdmig's rounds, the private RAM inside QEMU's device state, streamed
/// over the data channels while the final round runs and loaded by the destination QEMU as
/// it lands; the guest verifies all its memory (the private node holds its first pages).
#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn state_3_a_guest_with_private_ram_migrates_with_it_in_its_device_state() {
    let a = assets();
    let s = Scratch::new("private-ram");
    let booted = boot_source_with(&a, &s, 50, PRIVATE_MB, vec![]);
    let r = rdmig_migrate_booted(&a, &s, booted, true, &["--channels", "2", "--verify"], &[]);
    let sr = report(&r.send, "send");
    let rr = report(&r.recv, "recv");
    assert_eq!(
        (r.send.code, r.recv.code),
        (Some(0), Some(0)),
        "send {sr}\nrecv {rr}\nrecv stderr:\n{}",
        r.recv.stderr
    );
    assert_eq!(sr["status"], "completed");
    assert_eq!(rr["guest"], "running");
    assert_eq!(sr["bytes"]["device_state_path"], "data channels", "{sr}");
    let state = sr["bytes"]["device_state"].as_u64().unwrap();
    assert!(
        state > 64 << 20,
        "the private RAM's pages travel in the device state: {state} bytes"
    );
    assert_eq!(rr["bytes"]["device_state"].as_u64(), Some(state), "{rr}");
    let row = rdmig_row("rdmig 2ch --verify, private RAM", 50, &r, &sr);
    record(&row);
    if let Err(e) = &row.survived {
        panic!("the guest did not survive: {e}");
    }
}

/// A result row's one-line account of the guest: the ticks it reached, or why it failed (the
/// first line and the guest's own verdict: a `VERIFY BAD` line, a panic or memcheck's end).
fn detail(survived: &Result<(u64, u64), String>) -> String {
    match survived {
        Ok((a, b)) => format!("source tick {a}, destination {b}"),
        Err(e) => {
            let first = e.lines().next().unwrap_or("");
            let verdict = e.lines().find(|l| {
                l.starts_with("VERIFY BAD")
                    || l.contains("Kernel panic")
                    || l.contains("MEMCHECK EXITED")
            });
            match verdict {
                Some(v) if v != first => format!("{first} {v}"),
                _ => first.to_string(),
            }
        }
    }
}

/// A failed guest's row says why in one line: the first line of the failure and the guest's
/// own verdict.
#[test]
fn a_failed_guest_row_names_its_verdict() {
    let e = "destination failed:\nMEMCHECK tick=7 VERIFY OK\nVERIFY BAD page=3 version=3\nmore";
    assert_eq!(
        detail(&Err(e.into())),
        "destination failed: VERIFY BAD page=3 version=3"
    );
    assert_eq!(detail(&Err("no ticks in 90 s".into())), "no ticks in 90 s");
    assert_eq!(detail(&Ok((4, 5))), "source tick 4, destination 5");
}

/// A tick line the pause cut short is not read as a failed verification.
#[test]
fn a_tick_line_cut_short_is_not_a_tick() {
    let c = "MEMCHECK tick=3 dirtied_mb=0 verified_mb=2624 passes=10 VERIFY OK\nMEMCHECK tick=4 dirtied_mb=0 verified_mb=22";
    let t = ticks(c);
    assert_eq!(t.len(), 1);
    assert!(t[0].ok);
    let bad = ticks("MEMCHECK tick=5 dirtied_mb=1 verified_mb=9 passes=1 VERIFY BAD\n");
    assert_eq!(bad.len(), 1);
    assert!(!bad[0].ok);
}

/// Writes dirty pages back and empties the page cache (root), so a restore reads its file
/// from the device.
fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// A file's size and what the file system allocated for it, in bytes.
fn file_sizes(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or((0, 0), |m| (m.len(), m.blocks() * 512))
}

/// `rdmig save` of the scratch's source guest (paused unless `--live` is among `extra`) to
/// `file`, and the wall time of the command.
fn rdmig_save(s: &Scratch, file: &Path, extra: &[&str]) -> (Exit, Duration) {
    let mut args: Vec<String> = vec![
        "save".into(),
        "--json".into(),
        "--ram".into(),
        format!("pc.ram={}", s.ram("src.ram").display()),
        "--qemu-qmp".into(),
        s.path("src.qmp").display().to_string(),
        "--to".into(),
        file.display().to_string(),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let t = Instant::now();
    let e = Proc::spawn("rdmig save", &args).wait(Duration::from_secs(300));
    (e, t.elapsed())
}

/// `rdmig restore` of `file` into the scratch's destination QEMU (waiting with `-incoming
/// defer`), and the wall time of the command: until the guest runs.
fn rdmig_restore(s: &Scratch, file: &Path, extra: &[&str]) -> (Exit, Duration) {
    let mut args: Vec<String> = vec![
        "restore".into(),
        "--json".into(),
        "--from".into(),
        file.display().to_string(),
        "--ram".into(),
        format!("pc.ram={}:{}MiB", s.ram("dst.ram").display(), ram_mb()),
        "--qemu-qmp".into(),
        s.path("dst.qmp").display().to_string(),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let t = Instant::now();
    let e = Proc::spawn("rdmig restore", &args).wait(Duration::from_secs(300));
    (e, t.elapsed())
}

/// A destination QEMU waiting with `-incoming defer` on a RAM file of its own, fresh.
fn fresh_destination(a: &Assets, s: &Scratch, dstg: &GuestSpec) -> Guest {
    let _ = std::fs::remove_file(s.path("dst.console"));
    let _ = std::fs::remove_file(s.path("dst.qmp"));
    let _ = std::fs::remove_file(s.ram("dst.ram"));
    let g = Guest::start(a, s, dstg);
    assert_eq!(g.status(), "inmigrate");
    g
}

/// Lets the source guest run again after a save left it stopped, for the next save.
fn continue_source(src: &Guest) {
    let mut q = src.qmp();
    q.execute("cont", None).unwrap();
    let before = src.ticks().len();
    src.wait_ticks(before, 2, Duration::from_secs(60));
}

/// QEMU's own save of the stopped source guest to `file`: mapped-ram with multifd on 2
/// channels, or the sequential `file:` stream; `direct` adds QEMU's `direct-io`. Timed from
/// `stop` until QEMU reports the migration completed, and until the file is on disk
/// (`fsync`), as rdmig's save is.
fn qemu_save(
    src: &Guest,
    file: &Path,
    mapped: bool,
    direct: bool,
) -> Result<(Duration, Duration), String> {
    let mut q = src.qmp();
    let caps = json!({"capabilities": [
        {"capability": "x-ignore-shared", "state": false},
        {"capability": "mapped-ram", "state": mapped},
        {"capability": "multifd", "state": mapped},
    ]});
    q.execute("migrate-set-capabilities", Some(caps))
        .map_err(|e| e.to_string())?;
    let mut params = json!({"max-bandwidth": 100u64 << 30});
    if mapped {
        params["multifd-channels"] = json!(2);
        params["direct-io"] = json!(direct);
    }
    q.execute("migrate-set-parameters", Some(params))
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(file);
    let _ = Command::new("sync").status();
    let t = Instant::now();
    q.execute("stop", None).map_err(|e| e.to_string())?;
    q.execute(
        "migrate",
        Some(json!({ "uri": format!("file:{}", file.display()) })),
    )
    .map_err(|e| e.to_string())?;
    loop {
        let m = q
            .execute("query-migrate", None)
            .map_err(|e| e.to_string())?;
        match m["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => return Err(format!("QEMU save: {m}")),
            _ if t.elapsed() > Duration::from_secs(300) => {
                return Err(format!("QEMU save hangs: {m}"))
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let saved = t.elapsed();
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    Ok((saved, t.elapsed()))
}

/// QEMU's own restore of `file` into a destination QEMU waiting with `-incoming defer`, with
/// the capabilities of the save; timed until the guest runs.
fn qemu_restore(dst: &Guest, file: &Path, mapped: bool, direct: bool) -> Result<Duration, String> {
    let mut q = dst.qmp();
    let caps = json!({"capabilities": [
        {"capability": "mapped-ram", "state": mapped},
        {"capability": "multifd", "state": mapped},
    ]});
    q.execute("migrate-set-capabilities", Some(caps))
        .map_err(|e| e.to_string())?;
    if mapped {
        q.execute(
            "migrate-set-parameters",
            Some(json!({"multifd-channels": 2, "direct-io": direct})),
        )
        .map_err(|e| e.to_string())?;
    }
    let t = Instant::now();
    q.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("file:{}", file.display()) })),
    )
    .map_err(|e| e.to_string())?;
    loop {
        let st = q.execute("query-status", None).map_err(|e| e.to_string())?;
        if st["status"] == "running" {
            return Ok(t.elapsed());
        }
        let m = q
            .execute("query-migrate", None)
            .map_err(|e| e.to_string())?;
        match m["status"].as_str().unwrap_or("") {
            "failed" => return Err(format!("QEMU restore: {m}")),
            // The guest was saved stopped, and QEMU restores the run state it saved.
            "completed" if st["status"] == "paused" => {
                q.execute("cont", None).map_err(|e| e.to_string())?;
            }
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!("QEMU restore hangs: {st} {m}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One line of the save/restore table, recorded like the migration rows.
fn record_save(
    tool: &str,
    save: Duration,
    durable: Duration,
    restore: Duration,
    file: &Path,
    survived: &Result<(u64, u64), String>,
) {
    let (logical, allocated) = file_sizes(file);
    let line = json!({
        "kind": "save",
        "tool": tool,
        "save_ms": save.as_millis() as u64,
        "save_durable_ms": durable.as_millis() as u64,
        "restore_ms": restore.as_millis() as u64,
        "logical_mb": logical as f64 / 1e6,
        "allocated_mb": allocated as f64 / 1e6,
        "guest_mb": ram_mb(),
        "fill_mb": fill_mb(),
        "survived": survived.is_ok(),
        "detail": detail(survived),
    });
    eprintln!("ROW {line}");
    if let Ok(p) = std::env::var("RDMIG_QEMU_RESULTS") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

/// Saves the running source guest with rdmig, restores it into a fresh destination QEMU,
/// checks that the guest continues there with its memory intact, and lets the source run
/// again for the next save. Returns the two wall times and the guest check.
fn rdmig_save_restore(
    a: &Assets,
    s: &Scratch,
    src: &Guest,
    dstg: &GuestSpec,
    file: &Path,
    save_extra: &[&str],
    restore_extra: &[&str],
) -> (Duration, Duration, Result<(u64, u64), String>) {
    // Every tool writes a new file where the last one was.
    let _ = std::fs::remove_file(file);
    let _ = Command::new("sync").status();
    let (e, save_t) = rdmig_save(s, file, save_extra);
    let r = report(&e, "save");
    assert_eq!(e.code, Some(0), "save {save_extra:?}: {r}\n{}", e.stderr);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["guest"], "stopped");
    eprintln!("PHASES save {save_extra:?} {}", r["phases"]);
    assert_eq!(src.status(), "postmigrate", "the saved guest stays stopped");
    let dst = fresh_destination(a, s, dstg);
    drop_caches();
    let (e, restore_t) = rdmig_restore(s, file, restore_extra);
    let r = report(&e, "restore");
    assert_eq!(
        e.code,
        Some(0),
        "restore {restore_extra:?}: {r}\n{}",
        e.stderr
    );
    assert_eq!(r["guest"], "running");
    eprintln!("PHASES restore {restore_extra:?} {}", r["phases"]);
    let survived = check_continues(src, &dst);
    drop(dst);
    continue_source(src);
    (save_t, restore_t, survived)
}

/// spec: SAVE-1, SAVE-4: a QEMU guest saved by `rdmig save --qemu-qmp` (paused, then live at
/// 50 MB/s with `--direct-io`) and restored by `rdmig restore --qemu-qmp` into a fresh QEMU
/// continues its memcheck counter with its memory verified.
#[test]
#[ignore = "needs QEMU 10 and the test guest: run `make qemu`"]
fn rdmig_saves_and_restores_a_qemu_guest_paused_and_live() {
    let a = assets();
    let s = Scratch::new("save");
    let (src, dstg) = boot_source(&a, &s, 50, vec![]);
    let file = s.path("guest.rdmig");
    let (st, rt, ok) = rdmig_save_restore(&a, &s, &src, &dstg, &file, &["--channels", "2"], &[]);
    eprintln!("paused save {st:?}, restore {rt:?}: {ok:?}");
    ok.unwrap();
    let (st, rt, ok) = rdmig_save_restore(
        &a,
        &s,
        &src,
        &dstg,
        &file,
        &["--channels", "2", "--live", "--direct-io"],
        &["--direct-io"],
    );
    eprintln!("live save {st:?}, restore {rt:?}: {ok:?}");
    ok.unwrap();
    // The file allocates what the guest's memory holds, not its size: zero pages are holes.
    let (logical, allocated) = file_sizes(&file);
    assert!(logical >= ram_mb() << 20);
    assert!(
        allocated < logical,
        "allocated {allocated} of {logical}: zero pages are holes"
    );
}

/// `make qemu-save-bench`: one guest (1 GiB, 768 MiB filled) saved and restored, in turn, by
/// rdmig with 1 and 2 channels with and without `--direct-io`, by QEMU's mapped-ram with
/// multifd on 2 channels (with and without QEMU's `direct-io`) and by QEMU's sequential
/// `file:`; the page cache is dropped before each restore, and every restored guest must
/// continue with its memory verified. `dd` with `O_DIRECT` on the same file system is the
/// ceiling. Rows go to `RDMIG_QEMU_RESULTS`.
#[test]
#[ignore = "a benchmark: run `make qemu-save-bench`"]
fn bench_save_restore_against_qemu_mapped_ram() {
    let a = assets();
    let runs = env_mb("RDMIG_QEMU_BENCH_RUNS", 3);
    let s = Scratch::new("save-bench");
    let (src, dstg) = boot_source(&a, &s, 0, vec![]);
    let file = s.path("guest.save");
    let mut failed = Vec::new();
    for _ in 0..runs {
        for (tool, save_extra, restore_extra) in [
            (
                "rdmig 1ch",
                &["--channels", "1"][..],
                &["--channels", "1"][..],
            ),
            (
                "rdmig 2ch",
                &["--channels", "2"][..],
                &["--channels", "2"][..],
            ),
            (
                "rdmig 1ch --direct-io",
                &["--channels", "1", "--direct-io"][..],
                &["--channels", "1", "--direct-io"][..],
            ),
            (
                "rdmig 2ch --direct-io",
                &["--channels", "2", "--direct-io"][..],
                &["--channels", "2", "--direct-io"][..],
            ),
        ] {
            let (st, rt, ok) =
                rdmig_save_restore(&a, &s, &src, &dstg, &file, save_extra, restore_extra);
            record_save(tool, st, st, rt, &file, &ok);
            if let Err(e) = ok {
                failed.push(format!("{tool}: {e}"));
            }
        }
        for (tool, mapped, direct) in [
            ("qemu mapped-ram 2ch", true, false),
            ("qemu mapped-ram 2ch direct-io", true, true),
            ("qemu file: sequential", false, false),
        ] {
            let (st, durable) = qemu_save(&src, &file, mapped, direct).unwrap();
            let dst = fresh_destination(&a, &s, &dstg);
            drop_caches();
            let rt = qemu_restore(&dst, &file, mapped, direct).unwrap();
            let ok = check_continues(&src, &dst);
            record_save(tool, st, durable, rt, &file, &ok);
            if let Err(e) = ok {
                failed.push(format!("{tool}: {e}"));
            }
            drop(dst);
            continue_source(&src);
        }
        // The device's own limit: the guest's RAM written and read back with O_DIRECT.
        let ram = s.ram("src.ram");
        let _ = std::fs::remove_file(&file);
        let _ = Command::new("sync").status();
        let dd = |args: &[String]| {
            let t = Instant::now();
            let o = Command::new("dd").args(args).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            t.elapsed()
        };
        let st = dd(&[
            format!("if={}", ram.display()),
            format!("of={}", file.display()),
            "bs=4M".into(),
            "oflag=direct".into(),
            "conv=fsync".into(),
        ]);
        drop_caches();
        let rt = dd(&[
            format!("if={}", file.display()),
            "of=/dev/null".into(),
            "bs=4M".into(),
            "iflag=direct".into(),
        ]);
        record_save("dd O_DIRECT", st, st, rt, &file, &Ok((0, 0)));
    }
    assert!(failed.is_empty(), "guests that failed: {failed:#?}");
}
