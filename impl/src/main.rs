//! `rdmig`: live migration of memory between processes or hosts.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cmd::args::{
    BenchArgs, DemoArgs, GuardArgs, RecvArgs, RestoreArgs, SaveArgs, SendArgs, WorkloadArgs,
};

#[derive(Parser)]
#[command(
    name = "rdmig",
    version,
    about = "Live migration of memory over RDMA or TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive a migration: listen, take the memory, start the workload on commit.
    Recv(RecvArgs),
    /// Send a migration: connect, pre-copy live, switch over, commit.
    Send(SendArgs),
    /// Save memory (a QEMU guest's, a process's) to a file: a migration into the file, each
    /// block at a fixed offset, written by parallel writers, live or paused.
    Save(SaveArgs),
    /// Restore a save file into RAM files (and a QEMU waiting for it): a migration out of the
    /// file, read by parallel readers, verified against the file's digests.
    Restore(RestoreArgs),
    /// A synthetic guest: maps a RAM file, fills it, keeps writing at a given rate.
    Workload(WorkloadArgs),
    /// Print the xxh3-64 digest of a file (e.g. a RAM file).
    Digest {
        /// Files to digest.
        files: Vec<PathBuf>,
    },
    /// A complete local live migration between separate processes, with a report.
    Demo(DemoArgs),
    /// rdmig's data path on loopback next to iperf3 (or an equivalent in-tree stream).
    Bench(BenchArgs),
    /// List RDMA devices, their ports, port states and GIDs.
    Devices,
    /// Write a throwaway CA and server and client certificates for --tls-creds (tests and
    /// first steps; a deployment uses its own CA).
    TlsInit {
        /// Directory to write ca-cert.pem, server-cert.pem, server-key.pem,
        /// client-cert.pem and client-key.pem into.
        dir: PathBuf,
        /// More names (host names or addresses) for the server certificate, besides
        /// localhost, 127.0.0.1 and ::1.
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Internal: the guard `rdmig send` starts; it resumes a paused workload if send dies.
    #[command(hide = true)]
    Guard(GuardArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RDMIG_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Exit codes: 0 completed, 1 bad usage or setup, 2 aborted, 3 in doubt. Usage errors are
    // 1, not clap's 2, which means "aborted" here.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage { 1 } else { 0 });
        }
    };
    let r = match cli.cmd {
        Cmd::Recv(a) => cmd::recv::recv(a),
        Cmd::Send(a) => cmd::send::send(a),
        Cmd::Save(a) => cmd::file::save(a),
        Cmd::Restore(a) => cmd::file::restore(a),
        Cmd::Workload(a) => cmd::workload(a),
        Cmd::Digest { files } => files
            .iter()
            .try_for_each(|f| {
                let d = rdmig::tools::workload::file_digest(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?;
                println!("{d:016x}  {}", f.display());
                Ok::<(), String>(())
            })
            .map(|_| ExitCode::SUCCESS),
        Cmd::Demo(a) => rdmig::tools::demo::demo(a.size, a.dirty_rate, a.channels, a.dir, a.tls),
        Cmd::Bench(a) => match (a.sink_port, a.sink_into) {
            (Some(p), Some(into)) => rdmig::tools::bench::memory_sink(p, &into, a.size),
            (Some(p), None) => rdmig::tools::bench::raw_sink(p),
            _ => rdmig::tools::bench::bench(a.size, a.state_size, a.dir, a.json, a.busy),
        },
        Cmd::Devices => cmd::devices(),
        Cmd::TlsInit { dir, names } => rdmig::transport::tls::init(&dir, &names).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }),
        Cmd::Guard(a) => cmd::guard(a),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rdmig: {e}");
            ExitCode::from(1)
        }
    }
}
