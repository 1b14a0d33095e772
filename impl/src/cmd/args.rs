//! Command-line arguments of the `rdmig` subcommands.

use std::path::PathBuf;

use rdmig::cli::{self, RamSpec};

#[derive(clap::Args, Clone)]
pub struct TransportArgs {
    /// Transport: tcp, or rdma (verbs; control and data over RC queue pairs, bootstrapped
    /// over a TCP connection to the same address).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    pub transport: String,
    /// RDMA device (default: the first with an active port).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// GID index (default: the port's IPv4-mapped RoCE v2 GID).
    #[arg(long)]
    pub gid_index: Option<u8>,
    /// Mutual TLS 1.3 on every TCP connection, with x509 credentials in QEMU's layout in this
    /// directory (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; `rdmig tls-init DIR` writes throwaway ones).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of --connect).
    #[arg(long, requires = "tls_creds")]
    pub tls_hostname: Option<String>,
}

impl TransportArgs {
    fn tls_rdma(&self) -> Result<(), String> {
        if self.tls_creds.is_some() && self.transport == "rdma" {
            return Err(
                "--tls-creds works with --transport tcp only: RDMA one-sided writes \
                        travel in clear, so protect an RDMA fabric itself (see the README)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The source's TLS, for a destination at `connect` (HOST:PORT).
    pub fn client_tls(
        &self,
        connect: &str,
    ) -> Result<Option<rdmig::transport::tls::ClientTls>, String> {
        self.tls_rdma()?;
        let Some(dir) = &self.tls_creds else {
            return Ok(None);
        };
        let host = match &self.tls_hostname {
            Some(h) => h.clone(),
            None => {
                let h = connect.rsplit_once(':').map_or(connect, |(h, _)| h);
                h.trim_start_matches('[').trim_end_matches(']').to_string()
            }
        };
        rdmig::transport::tls::ClientTls::load(dir, &host).map(Some)
    }

    /// The destination's TLS.
    pub fn server_tls(&self) -> Result<Option<rdmig::transport::tls::ServerTls>, String> {
        self.tls_rdma()?;
        match &self.tls_creds {
            Some(dir) => rdmig::transport::tls::ServerTls::load(dir).map(Some),
            None => Ok(None),
        }
    }
    pub fn verbs(&self) -> Option<rdmig::transport::verbs::VerbsOptions> {
        (self.transport == "rdma").then(|| rdmig::transport::verbs::VerbsOptions {
            device: self.rdma_device.clone(),
            gid_index: self.gid_index,
        })
    }
}

#[derive(clap::Args, Clone)]
pub struct Common {
    /// Pre-shared key file (at least 16 bytes), same on both sides.
    #[arg(long)]
    pub psk_file: Option<PathBuf>,
    /// Run without authentication (explicit; required for non-loopback addresses without a key).
    #[arg(long)]
    pub insecure: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Page size of the RAM blocks.
    #[arg(long, default_value = "4KiB", value_parser = cli::parse_size)]
    pub page_size: u64,
    /// Seconds a wait on the peer may last without progress before giving up; every wait of
    /// the transports is bounded by it too (connections, frames, unacknowledged data).
    #[arg(long, default_value_t = 30)]
    pub idle_timeout: u64,
    /// Threads for digests and dirty scans.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

#[derive(clap::Args, Clone)]
pub struct RecvArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
    /// RAM block NAME=PATH:SIZE (repeatable); files are created or resized and pre-faulted.
    #[arg(long = "ram", required = true, value_parser = cli::parse_ram)]
    pub ram: Vec<RamSpec>,
    /// Most bytes registered for remote writes at once (default: all memory, the device
    /// state's staging area included).
    #[arg(long, value_parser = cli::parse_size)]
    pub pin_budget: Option<u64>,
    /// Most data channels accepted.
    #[arg(long, default_value_t = 16)]
    pub max_channels: u8,
    /// Command run to start the workload after commit.
    #[arg(long)]
    pub start_cmd: Option<String>,
    /// Process (stopped) to continue after commit.
    #[arg(long)]
    pub start_pid: Option<i32>,
    /// Where to write the received device state (written as it arrives, beside this path
    /// until the commit, then renamed to it).
    #[arg(long)]
    pub state_out: Option<PathBuf>,
    /// Largest device state taken over the data channels into a staging area (0: device
    /// state only on the control channel, at most 64 MiB). Default: 16 GiB or half the
    /// memory available at start, whichever is smaller; memory is taken only as state
    /// arrives, and a state the memory cannot hold is refused before the commit.
    #[arg(long, value_parser = cli::parse_size)]
    pub max_state_size: Option<u64>,
    /// QMP socket of the destination QEMU, waiting with `-incoming defer` on the --ram files
    /// (memory-backend-file, share=on). rdmig loads the device state into it as it arrives
    /// (x-ignore-shared, its autostart off) and runs the guest after commit.
    #[arg(long)]
    pub qemu_qmp: Option<PathBuf>,
    /// Command that starts the destination QEMU (with `-incoming defer` and `-qmp
    /// unix:SOCK,server=on,wait=off` for the --qemu-qmp socket); run before the migration
    /// starts, stopped again if the migration aborts.
    #[arg(long, requires = "qemu_qmp")]
    pub qemu_start: Option<String>,
    /// Where the QEMU started by --qemu-start writes its output (default: the QMP socket's
    /// path with `.log` appended).
    #[arg(long, requires = "qemu_start")]
    pub qemu_log: Option<PathBuf>,
    /// Write the listening address to this file once listening (for scripts).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone)]
pub struct SendArgs {
    /// Destination address.
    #[arg(long)]
    pub connect: String,
    /// RAM block NAME=PATH (repeatable).
    #[arg(long = "ram", required = true, value_parser = cli::parse_ram)]
    pub ram: Vec<RamSpec>,
    /// Data channels.
    #[arg(long, default_value_t = 1)]
    pub channels: u8,
    /// Registration and digest unit.
    #[arg(long, default_value = "1MiB", value_parser = cli::parse_size)]
    pub chunk_size: u64,
    /// Register all memory at setup instead of chunk by chunk.
    #[arg(long)]
    pub pin_all: bool,
    /// Target downtime in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Cap on data throughput, e.g. 500MB/s (default: none).
    #[arg(long, value_parser = cli::parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy rounds before the limit policy applies.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Seconds of pre-copy before the limit policy applies.
    #[arg(long)]
    pub max_time: Option<u64>,
    /// What to do at the round or time limit: switchover or abort.
    #[arg(long, default_value = "switchover")]
    pub on_limit: String,
    /// Verify every chunk with a digest before commit.
    #[arg(long)]
    pub verify: bool,
    /// The digest --verify uses: page-tree (xxh3-64 of the pages' xxh3-64 hashes, kept
    /// current as pages are scanned and land, so verifying costs little) or bytes (xxh3-64 of
    /// each chunk's bytes).
    #[arg(long, default_value = "page-tree", value_parser = ["page-tree", "bytes"])]
    pub digest: String,
    /// Dirty tracking: none, bitmap:PATH, soft-dirty:PID, scan, or auto (soft-dirty on the
    /// --pid or QEMU process where the kernel supports it, else scan). Default: auto with
    /// --qemu-qmp or --pid, none otherwise. scan needs --transport tcp (it compares memory
    /// with the bytes each page was sent with, which an RDMA NIC does not tell).
    #[arg(long)]
    pub dirty_log: Option<String>,
    /// Pause/resume the workload with SIGSTOP/SIGCONT to this process.
    #[arg(long)]
    pub pid: Option<i32>,
    /// Command that pauses the workload (its stdout is the device state unless --state-in).
    #[arg(long)]
    pub pause_cmd: Option<String>,
    /// Command that resumes the workload after an abort.
    #[arg(long)]
    pub resume_cmd: Option<String>,
    /// Device state file sent at switchover.
    #[arg(long)]
    pub state_in: Option<PathBuf>,
    /// QMP socket of the source QEMU, whose guest RAM is the --ram files
    /// (memory-backend-file, share=on): rdmig stops the guest at switchover, sends its device
    /// state (x-ignore-shared) and continues it if the migration aborts.
    #[arg(long, conflicts_with_all = ["pid", "pause_cmd", "resume_cmd", "state_in"])]
    pub qemu_qmp: Option<PathBuf>,
    /// Quit the source QEMU after commit (default: leave it stopped).
    #[arg(long, requires = "qemu_qmp")]
    pub qemu_quit: bool,
    /// Most guest RAM QEMU may keep privately (a memory-backend-ram, or a file without
    /// share=on): it travels inside QEMU's device state, all of it during the downtime.
    #[arg(long, default_value = "1GiB", value_parser = cli::parse_size, requires = "qemu_qmp")]
    pub max_private_ram: u64,
    /// Largest device state sent over the data channels, streamed while the final round
    /// runs (0: on the control channel, at most 64 MiB). Default: for a QEMU guest with
    /// private RAM, that RAM plus 64 MiB; for a --state-in file over 64 MiB, its size;
    /// otherwise 0.
    #[arg(long, value_parser = cli::parse_size)]
    pub max_state_size: Option<u64>,
    /// Disable zero-page elision.
    #[arg(long)]
    pub no_zero_elision: bool,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone)]
pub struct SaveArgs {
    /// RAM block NAME=PATH (repeatable).
    #[arg(long = "ram", required = true, value_parser = cli::parse_ram)]
    pub ram: Vec<RamSpec>,
    /// The save file to write (replaced only once the new save is complete).
    #[arg(long)]
    pub to: PathBuf,
    /// Parallel writers (data channels).
    #[arg(long, default_value_t = 2)]
    pub channels: u8,
    /// Write the file with O_DIRECT (page-aligned writes straight from memory, bypassing
    /// the page cache); refused on file systems that do not support it.
    #[arg(long)]
    pub direct_io: bool,
    /// Pre-copy into the file while the workload runs, rewriting dirty pages in place, and
    /// pause it only for the last round (default: pause first, one pass).
    #[arg(long)]
    pub live: bool,
    /// Registration and digest unit, and the largest single write to the file (larger
    /// writes reach the device's rate with --direct-io: 4 MiB measured about 30 % faster
    /// than 1 MiB).
    #[arg(long, default_value = "4MiB", value_parser = cli::parse_size)]
    pub chunk_size: u64,
    /// With --live: target downtime in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// With --live: pre-copy rounds before switching over.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// The digest the file keeps per chunk: page-tree or bytes (as `send --digest`).
    #[arg(long, default_value = "page-tree", value_parser = ["page-tree", "bytes"])]
    pub digest: String,
    /// Dirty tracking with --live (as `send --dirty-log`; default: auto with --qemu-qmp or
    /// --pid, none otherwise).
    #[arg(long)]
    pub dirty_log: Option<String>,
    /// Pause/resume the workload with SIGSTOP/SIGCONT to this process.
    #[arg(long)]
    pub pid: Option<i32>,
    /// Command that pauses the workload (its stdout is the device state unless --state-in).
    #[arg(long)]
    pub pause_cmd: Option<String>,
    /// Command that resumes the workload if the save fails.
    #[arg(long)]
    pub resume_cmd: Option<String>,
    /// Device state file saved with the memory.
    #[arg(long)]
    pub state_in: Option<PathBuf>,
    /// QMP socket of a QEMU whose guest RAM is the --ram files (memory-backend-file,
    /// share=on): rdmig stops the guest, saves its device state (x-ignore-shared) into the
    /// file, and continues it if the save fails.
    #[arg(long, conflicts_with_all = ["pid", "pause_cmd", "resume_cmd", "state_in"])]
    pub qemu_qmp: Option<PathBuf>,
    /// Quit the QEMU after the save (default: leave it stopped).
    #[arg(long, requires = "qemu_qmp")]
    pub qemu_quit: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone)]
pub struct RestoreArgs {
    /// The save file to restore.
    #[arg(long)]
    pub from: PathBuf,
    /// RAM block NAME=PATH:SIZE (repeatable): the save's blocks, by name and size; files are
    /// created or resized, and marked incomplete until the restore commits.
    #[arg(long = "ram", required = true, value_parser = cli::parse_ram)]
    pub ram: Vec<RamSpec>,
    /// Parallel readers (data channels).
    #[arg(long, default_value_t = 2)]
    pub channels: u8,
    /// Read the file with O_DIRECT; refused on file systems that do not support it.
    #[arg(long)]
    pub direct_io: bool,
    /// Command run to start the workload once the memory is restored.
    #[arg(long)]
    pub start_cmd: Option<String>,
    /// Process (stopped) to continue once the memory is restored.
    #[arg(long)]
    pub start_pid: Option<i32>,
    /// Where to write the saved device state.
    #[arg(long)]
    pub state_out: Option<PathBuf>,
    /// QMP socket of a QEMU waiting with `-incoming defer` on the --ram files: rdmig loads
    /// the saved device state into it and runs the guest.
    #[arg(long)]
    pub qemu_qmp: Option<PathBuf>,
    /// Command that starts that QEMU (as `recv --qemu-start`).
    #[arg(long, requires = "qemu_qmp")]
    pub qemu_start: Option<String>,
    /// Where the QEMU started by --qemu-start writes its output.
    #[arg(long, requires = "qemu_start")]
    pub qemu_log: Option<PathBuf>,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Threads for digests.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

#[derive(clap::Args, Clone)]
pub struct WorkloadArgs {
    /// RAM file to create and keep writing.
    #[arg(long)]
    pub ram: PathBuf,
    #[arg(long, default_value = "256MiB", value_parser = cli::parse_size)]
    pub size: u64,
    /// Write rate in MB/s.
    #[arg(long, default_value_t = 50.0)]
    pub dirty_rate: f64,
    /// uniform, hot:FRACTION, sweep, bursts.
    #[arg(long, default_value = "uniform")]
    pub pattern: String,
    /// Fraction of pages kept zero.
    #[arg(long, default_value_t = 0.1)]
    pub zero_fraction: f64,
    /// Fraction of writes that put a page back to its previous content (a lock released),
    /// the pattern a dirty log comparing scans with each other would miss.
    #[arg(long, default_value_t = 0.0)]
    pub undo_fraction: f64,
    /// Shared dirty bitmap file to maintain.
    #[arg(long)]
    pub bitmap: Option<PathBuf>,
    /// File created once the memory is filled.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "4KiB", value_parser = cli::parse_size)]
    pub page_size: u64,
}

#[derive(clap::Args, Clone)]
pub struct DemoArgs {
    #[arg(long, default_value = "256MiB", value_parser = cli::parse_size)]
    pub size: u64,
    /// Workload write rate in MB/s during the migration.
    #[arg(long, default_value_t = 64.0)]
    pub dirty_rate: f64,
    #[arg(long, default_value_t = 2)]
    pub channels: u8,
    /// Directory for the RAM files (default: /dev/shm if present, else a temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Every connection inside TLS 1.3, with throwaway credentials from `tls-init`.
    #[arg(long)]
    pub tls: bool,
}

#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    #[arg(long, default_value = "1GiB", value_parser = cli::parse_size)]
    pub size: u64,
    /// Device state of random bytes migrated beside 64 MiB of RAM, over the data channels
    /// and (64 MiB of it) over the control channel, for their rates and the downtime it adds
    /// (0: not measured).
    #[arg(long, default_value = "1GiB", value_parser = cli::parse_size)]
    pub state_size: u64,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Keep this many cores busy while measuring, as a guest's running vCPUs do during a
    /// live migration (for calibrating the simulator to such runs).
    #[arg(long, default_value_t = 0)]
    pub busy: usize,
    /// Internal: run as the receiving half of the raw stream measurement.
    #[arg(long, hide = true)]
    pub sink_port: Option<u16>,
    /// Internal: the sink receives into a new mapping of `--size` bytes at this path (the
    /// memory-to-memory stream).
    #[arg(long, hide = true)]
    pub sink_into: Option<PathBuf>,
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The guard `rdmig send` starts (internal).
#[derive(clap::Args, Clone)]
pub struct GuardArgs {
    /// SIGCONT to this process.
    #[arg(long)]
    pub pid: Option<i32>,
    /// Run this shell command.
    #[arg(long)]
    pub resume_cmd: Option<String>,
    /// `cont` this QEMU over QMP.
    #[arg(long)]
    pub qemu_qmp: Option<PathBuf>,
    /// The migration capabilities to put back on that QEMU (JSON).
    #[arg(long, requires = "qemu_qmp")]
    pub qemu_caps: Option<String>,
}
