//! `rdmig-sim validate`: the simulator's predictions next to real migrations.
//!
//! A profile for the host's loopback TCP is calibrated from `rdmig bench --json` (rdmig's own
//! data rate with two channels, and its hash-scan rate), measured with as many cores kept busy
//! as the real runs' guests keep busy (`rdmig bench --busy N`). Each real run, a row of
//! `make qemu-bench`'s `results.jsonl`, becomes a simulated
//! migration of the same size, zero fraction, dirty rate, channels, dirty log and
//! verification; the table shows predicted against measured total time and downtime.

use serde_json::Value;

use crate::guest::{GuestConfig, Pattern};
use crate::profile::Profile;
use crate::{run, SimConfig};

/// What the host measured, and the VMM's own costs.
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    /// rdmig's data rate with two channels, GB/s.
    pub data_gb_s: f64,
    /// The hash scan's rate with the source's threads, GB/s, beside the busy cores.
    pub scan_gb_s: f64,
    /// The same with no core busy: the final scan, the guest paused.
    pub paused_scan_gb_s: f64,
    /// A receiving core's fixed cost per data frame, ns: from the time 2 channels took to
    /// move memory whose every other page is zero (single-page writes), less what its bytes
    /// take at the contiguous rate.
    pub recv_write_ns: f64,
    /// Pause and device-state save, and load and start, in ms (QEMU: `stop` and the state
    /// save; `migrate-incoming` and `cont`).
    pub pause_ms: f64,
    pub start_ms: f64,
}

impl Calibration {
    pub fn from_bench(bench: &Value, pause_ms: f64, start_ms: f64) -> Result<Self, String> {
        let f = |k: &str| {
            bench[k]
                .as_f64()
                .filter(|x| *x > 0.0)
                .ok_or_else(|| format!("the bench figures have no {k}"))
        };
        let scan_gb_s = f("scan_2_threads_gb_s")?;
        let data_gb_s = f("rdmig_2ch_gb_s")?;
        let recv_write_ns = match (f("scattered_2ch_s"), f("scattered_writes")) {
            (Ok(t), Ok(n)) => {
                let bytes = n * 4096.0;
                ((t - bytes / (data_gb_s * 1e9)).max(0.0) * 2.0 / n * 1e9).max(0.0)
            }
            _ => 0.0,
        };
        Ok(Calibration {
            data_gb_s,
            recv_write_ns,
            scan_gb_s,
            // Older figures without it: the busy rate.
            paused_scan_gb_s: f("scan_2_threads_idle_gb_s").unwrap_or(scan_gb_s),
            pause_ms,
            start_ms,
        })
    }

    /// The loopback profile: one link at rdmig's measured rate, the measured scan rate.
    pub fn profile(&self) -> Profile {
        let mut p = Profile::named("tcp-25g").expect("a built-in profile");
        p.name = "loopback (calibrated)".into();
        p.link_gbps = self.data_gb_s * 8.0;
        p.latency_ns = 20_000;
        p.cores_per_side = 2;
        p.scan_s_per_gb = 1.0 / self.scan_gb_s;
        p.paused_scan_s_per_gb = 1.0 / self.paused_scan_gb_s;
        p.recv_write_ns = self.recv_write_ns.round() as u64;
        p
    }
}

/// One real migration to predict.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub ram_bytes: u64,
    pub zero_fraction: f64,
    pub dirty_bytes_per_s: u64,
    pub channels: u8,
    pub verify: bool,
    pub hash_scan: bool,
    pub device_state_bytes: u64,
    pub total_ms: f64,
    pub downtime_ms: f64,
}

/// The rdmig rows of `make qemu-bench`'s results: a QEMU guest of `guest_mb` with `fill_mb`
/// written by memcheck (the rest zero), `scan` dirty tracking. The runs of one configuration
/// (guest, rate, tool) become one case with their median total time, downtime and dirty rate:
/// a shared machine makes single runs differ by more than the prediction's error.
pub fn qemu_cases(jsonl: &str) -> Result<Vec<Case>, String> {
    let runs = qemu_runs(jsonl)?;
    let mut names: Vec<&str> = Vec::new();
    for r in &runs {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    Ok(names
        .iter()
        .map(|n| {
            let group: Vec<&Case> = runs.iter().filter(|r| r.name == *n).collect();
            let median = |f: fn(&Case) -> f64| {
                let mut v: Vec<f64> = group.iter().map(|c| f(c)).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let mut c = group[0].clone();
            c.total_ms = median(|c| c.total_ms);
            c.downtime_ms = median(|c| c.downtime_ms);
            c.dirty_bytes_per_s = median(|c| c.dirty_bytes_per_s as f64) as u64;
            if group.len() > 1 {
                c.name = format!("{n} (median of {})", group.len());
            }
            c
        })
        .collect())
}

/// Every rdmig run of the results, one case each.
fn qemu_runs(jsonl: &str) -> Result<Vec<Case>, String> {
    let mut v = Vec::new();
    for (i, line) in jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        let tool = r["tool"].as_str().unwrap_or("");
        // The calibration is rdmig's clear-text data rate: TLS rows are not predicted.
        if !tool.starts_with("rdmig") || tool.contains("tls") || r["survived"] != true {
            continue;
        }
        let n = |k: &str| {
            r[k].as_f64()
                .ok_or_else(|| format!("line {}: no {k}", i + 1))
        };
        let (guest, fill) = (n("guest_mb")?, n("fill_mb")?);
        v.push(Case {
            name: format!("QEMU {guest} MiB, {} MB/s, {tool}", r["rate_mb_s"]),
            ram_bytes: (guest as u64) << 20,
            zero_fraction: ((guest - fill) / guest).clamp(0.0, 1.0),
            dirty_bytes_per_s: (n("measured_dirty_mb_s")? * 1e6) as u64,
            channels: if tool.contains("2ch") { 2 } else { 1 },
            verify: tool.contains("--verify"),
            hash_scan: true,
            device_state_bytes: 320 << 10,
            total_ms: n("total_ms")?,
            downtime_ms: n("downtime_ms")?,
        });
    }
    Ok(v)
}

/// Predicted total time and downtime of `c`, in ms.
pub fn predict(c: &Case, cal: &Calibration, seed: u64) -> Result<(f64, f64), String> {
    let mut g = GuestConfig::new(c.ram_bytes);
    g.dirty_bytes_per_s = c.dirty_bytes_per_s;
    g.pattern = Pattern::Uniform;
    g.zero_ppm = (c.zero_fraction * 1e6).round() as u32;
    g.device_state_bytes = c.device_state_bytes;
    g.dst_pretouched = true;
    g.hash_scan = c.hash_scan;
    g.pause_ns = (cal.pause_ms * 1e6) as u64;
    g.start_ns = (cal.start_ms * 1e6) as u64;
    let mut cfg = SimConfig::new(seed, cal.profile(), g);
    cfg.migration.channels = Some(c.channels);
    cfg.migration.verify_digests = c.verify;
    cfg.migration.downtime_limit_ms = 300;
    cfg.validate()?;
    let r = run(cfg)?;
    let rep = &r.report;
    Ok((rep.total_ms, rep.downtime_ms.unwrap_or(f64::NAN)))
}

/// The side-by-side table, in Markdown, and the largest errors (total, downtime) as fractions.
pub fn table(cases: &[Case], cal: &Calibration) -> Result<(String, f64, f64), String> {
    let mut s = String::from(
        "| run | measured total / downtime (ms) | predicted total / downtime (ms) | error total | error downtime |\n|---|---|---|---|---|\n",
    );
    let (mut worst_t, mut worst_d) = (0f64, 0f64);
    for c in cases {
        let (t, d) = predict(c, cal, 1)?;
        let (et, ed) = (
            (t - c.total_ms) / c.total_ms,
            (d - c.downtime_ms) / c.downtime_ms,
        );
        worst_t = worst_t.max(et.abs());
        worst_d = worst_d.max(ed.abs());
        s += &format!(
            "| {} | {:.0} / {:.0} | {:.0} / {:.0} | {:+.0} % | {:+.0} % |\n",
            c.name,
            c.total_ms,
            c.downtime_ms,
            t,
            d,
            100.0 * et,
            100.0 * ed
        );
    }
    Ok((s, worst_t, worst_d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(extra: &[(&str, f64)]) -> Value {
        let mut v = serde_json::json!({"rdmig_2ch_gb_s": 4.0, "scan_2_threads_gb_s": 16.0});
        for (k, x) in extra {
            v[*k] = serde_json::json!(x);
        }
        v
    }

    fn case(dirty_mb_s: u64) -> Case {
        Case {
            name: "t".into(),
            ram_bytes: 256 << 20,
            zero_fraction: 0.25,
            dirty_bytes_per_s: dirty_mb_s * 1_000_000,
            channels: 2,
            verify: false,
            hash_scan: true,
            device_state_bytes: 320 << 10,
            total_ms: 1.0,
            downtime_ms: 1.0,
        }
    }

    /// The per-frame cost is what the scattered run took beyond its bytes at the contiguous
    /// rate, per write and channel; older figures without the run calibrate none.
    #[test]
    fn qemu_runs_of_one_configuration_become_one_case_with_their_medians() {
        let row = |tool: &str, rate: u64, total: u64, down: u64| {
            format!(
                "{{\"tool\":\"{tool}\",\"rate_mb_s\":{rate},\"guest_mb\":1024,\"fill_mb\":768,\"measured_dirty_mb_s\":{rate},\"total_ms\":{total},\"downtime_ms\":{down},\"survived\":true}}\n"
            )
        };
        let mut jsonl = String::new();
        for (total, down) in [(400, 70), (300, 40), (350, 90)] {
            jsonl += &row("rdmig 2ch", 50, total, down);
            jsonl += &row("qemu multifd 2ch", 50, 900, 200);
        }
        jsonl += &row("rdmig 2ch", 200, 500, 60);
        let c = qemu_cases(&jsonl).unwrap();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].name, "QEMU 1024 MiB, 50 MB/s, rdmig 2ch (median of 3)");
        assert_eq!((c[0].total_ms, c[0].downtime_ms), (350.0, 70.0));
        assert_eq!(c[1].name, "QEMU 1024 MiB, 200 MB/s, rdmig 2ch");
        assert_eq!((c[1].total_ms, c[1].downtime_ms), (500.0, 60.0));
    }

    #[test]
    fn calibration_derives_the_per_frame_cost_from_the_scattered_run() {
        // 1000 single-page writes: 4,096,000 bytes take 1.024 ms at 4 GB/s; 11.024 ms in all
        // leave 10 ms, 20 us per write over 2 channels.
        let c = Calibration::from_bench(
            &bench(&[("scattered_2ch_s", 0.011024), ("scattered_writes", 1000.0)]),
            4.0,
            8.0,
        )
        .unwrap();
        assert!(
            (c.recv_write_ns - 20_000.0).abs() < 1.0,
            "{}",
            c.recv_write_ns
        );
        assert_eq!(c.paused_scan_gb_s, 16.0);
        let old = Calibration::from_bench(&bench(&[]), 4.0, 8.0).unwrap();
        assert_eq!(old.recv_write_ns, 0.0);
    }

    /// A faster paused scan shortens only the downtime's final scan; a per-frame cost
    /// lengthens a writing guest's rounds.
    #[test]
    fn paused_scan_rate_and_per_frame_cost_change_the_prediction() {
        let slow = Calibration::from_bench(&bench(&[]), 4.0, 8.0).unwrap();
        let fast = Calibration::from_bench(&bench(&[("scan_2_threads_idle_gb_s", 64.0)]), 4.0, 8.0)
            .unwrap();
        let (_, d_slow) = predict(&case(0), &slow, 1).unwrap();
        let (_, d_fast) = predict(&case(0), &fast, 1).unwrap();
        assert!(d_fast < d_slow, "paused scan: {d_fast} vs {d_slow}");
        let costly = Calibration::from_bench(
            &bench(&[("scattered_2ch_s", 1.0), ("scattered_writes", 10_000.0)]),
            4.0,
            8.0,
        )
        .unwrap();
        let (t_free, _) = predict(&case(100), &slow, 1).unwrap();
        let (t_costly, _) = predict(&case(100), &costly, 1).unwrap();
        assert!(t_costly > t_free, "per-frame cost: {t_costly} vs {t_free}");
    }
}
