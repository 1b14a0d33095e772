//! The end-of-migration report, shaped like QEMU's `query-migrate` so operators find the same
//! figures under familiar names.

use rdmig_model::{AbortInfo, Outcome};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, Default)]
pub struct RoundReport {
    pub round: u32,
    pub last: bool,
    pub dirty_pages: u64,
    pub zero_pages: u64,
    pub data_bytes: u64,
    pub writes: u64,
    pub duration_ms: u64,
}

/// One step of a migration and how long it took: local work the driver timed (scans, the
/// pause, digests, the destination's load and start) and the waits on the protocol between
/// them (a round's transfer, PREPARE to PREPARED, ...).
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct PhaseReport {
    pub name: String,
    /// Milliseconds since this side started.
    pub start_ms: u64,
    pub duration_ms: u64,
    /// Inside the downtime (the source workload paused).
    pub downtime: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Bytes {
    pub data: u64,
    pub zero_pages: u64,
    /// Device state moved, and how: over the data channels into the state area, or on the
    /// control channel (spec: STATE-1, SW-3).
    pub device_state: u64,
    pub device_state_path: &'static str,
    pub control_frames: u64,
    pub control_bytes: u64,
}

/// How a side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Completed,
    /// Nothing moved for good: the source workload runs at the source.
    #[default]
    Aborted,
    /// COMMIT was sent and no answer came: find out whether the destination started before
    /// resuming anything.
    InDoubt,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::Aborted => "aborted",
            Status::InDoubt => "in-doubt",
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub role: &'static str,
    pub status: Status,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub aborted_by_peer: bool,
    pub total_time_ms: u64,
    pub setup_time_ms: u64,
    /// Source: workload paused until the destination confirmed it started.
    pub downtime_ms: Option<u64>,
    pub memory_bytes: u64,
    pub rounds: Vec<RoundReport>,
    /// Where the time went, in order (spec section 7 names the steps).
    pub phases: Vec<PhaseReport>,
    pub bytes: Bytes,
    /// Data bytes per second over the whole migration, in MB/s.
    pub throughput_mb_s: f64,
    /// Mean dirty rate observed after the first round, in MB/s.
    pub dirty_rate_mb_s: f64,
    pub registration_requests: u64,
    pub chunks_registered: u64,
    pub chunks_evicted: u64,
    pub verified: bool,
    /// Anonymous memory of this process at the end (rdmig's own overhead), bytes.
    pub rss_anon_bytes: u64,
    pub channels: u8,
    pub transport: &'static str,
    /// What became of a QEMU guest (`--qemu-qmp`): e.g. `running`, `resumed`, `stopped`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// The save file of `rdmig save` or `rdmig restore`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileReport>,
}

/// A save file as `rdmig save` left it or `rdmig restore` read it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FileReport {
    pub path: String,
    /// The file's size, holes included.
    pub logical_bytes: u64,
    /// What the file system allocated for it.
    pub allocated_bytes: u64,
    pub direct_io: bool,
}

impl Report {
    pub fn set_outcome(&mut self, o: Option<Outcome>) {
        match o {
            Some(Outcome::Completed) => self.status = Status::Completed,
            Some(Outcome::Aborted(AbortInfo {
                reason,
                by_peer,
                detail,
            })) => {
                self.status = Status::Aborted;
                self.reason = Some(format!("{reason:?}"));
                self.detail = Some(detail.to_string());
                self.aborted_by_peer = by_peer;
            }
            Some(Outcome::InDoubt(d)) => {
                self.status = Status::InDoubt;
                self.detail = Some(d.to_string());
            }
            None => {
                self.status = Status::Aborted;
                self.detail = Some("no outcome".into());
            }
        }
    }

    /// Exit code: 0 completed, 2 aborted (source resumed), 3 in doubt.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            Status::Completed => 0,
            Status::InDoubt => 3,
            Status::Aborted => 2,
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {}: {} ms total, setup {} ms",
            self.role,
            self.status.as_str(),
            self.total_time_ms,
            self.setup_time_ms
        );
        if let Some(d) = self.downtime_ms {
            s += &format!(", downtime {d} ms");
        }
        if let Some(r) = &self.reason {
            s += &format!(", reason {r}");
        }
        if let Some(d) = &self.detail {
            s += &format!(" ({d})");
        }
        if let Some(g) = &self.guest {
            s += &format!(", guest {g}");
        }
        if let Some(f) = &self.file {
            s += &format!(
                "\n  file {}: {} MiB, {} MiB allocated{}",
                f.path,
                f.logical_bytes >> 20,
                f.allocated_bytes >> 20,
                if f.direct_io { ", O_DIRECT" } else { "" }
            );
        }
        if !self.rounds.is_empty() {
            s += &format!(
                "\n  {} rounds, {} MiB data, {} zero pages, {} control frames, {:.0} MB/s",
                self.rounds.len(),
                self.bytes.data >> 20,
                self.bytes.zero_pages,
                self.bytes.control_frames,
                self.throughput_mb_s
            );
            for r in &self.rounds {
                s += &format!(
                    "\n  round {:>3}{} dirty {:>8} pages, zero {:>7}, sent {:>6} MiB in {:>5} ms",
                    r.round,
                    if r.last { " (final)" } else { "        " },
                    r.dirty_pages,
                    r.zero_pages,
                    r.data_bytes >> 20,
                    r.duration_ms
                );
            }
        }
        if !self.phases.is_empty() {
            s += "\n  where the time went (* inside the downtime):";
            for p in &self.phases {
                s += &format!(
                    "\n    {:>6} ms {:>6} ms{} {}",
                    p.start_ms,
                    p.duration_ms,
                    if p.downtime { "*" } else { " " },
                    p.name
                );
            }
        }
        s
    }
}

/// RssAnon of this process from /proc/self/status, in bytes.
pub fn rss_anon() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
