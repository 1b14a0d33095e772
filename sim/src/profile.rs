//! Named transport profiles: the hardware a run is simulated on.
//!
//! Defaults come from published measurements: perftest results for RDMA goodput, message rate
//! and latency; memory-registration costs measured for 4 KiB and 2 MiB pages; TCP single-stream
//! goodput and per-byte CPU costs from 25 and 100 Gb/s host tuning reports. Every parameter can be overridden by name
//! (`--set link_gbps=40`), and [`Profile::costs`] turns the human units into integer
//! femtoseconds per byte once, so the simulation itself does only integer arithmetic and is
//! reproducible bit for bit.

use serde::Serialize;

/// How data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One-sided RDMA writes: no CPU per byte, registration required and costly.
    Rdma,
    /// TCP streams: copying and checksums cost CPU per byte on both sides.
    Tcp,
}

/// One transport profile. Units are in the field names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub name: String,
    pub transport: Transport,
    /// Line rate of the one link all channels share.
    pub link_gbps: f64,
    /// One-way latency for a small message.
    pub latency_ns: u64,
    /// Payload bytes per packet (RoCE path MTU, or TCP MSS).
    pub mtu_bytes: u32,
    /// Bytes each packet adds on the wire (headers, CRCs, preamble and inter-frame gap).
    pub header_bytes: u32,
    /// Per write request: WQE processing on the NIC (RDMA) or the send syscall (TCP). It
    /// spaces requests on one channel and is charged as sender CPU.
    pub wr_overhead_ns: u64,
    /// Writes in flight per channel (the send queue depth the source may fill).
    pub sq_depth: u16,
    /// Data channels (queue pairs or TCP streams) the source proposes.
    pub channels: u8,
    /// Completions harvested per poll.
    pub cq_batch: u32,
    /// Delay between a completion reaching an empty queue and the poller harvesting it
    /// (0 = busy polling).
    pub cq_wakeup_ns: u64,
    /// Fixed cost of one memory registration (ibv_reg_mr).
    pub reg_fixed_us: f64,
    /// Pinning cost per MiB of memory that is already resident.
    pub reg_us_per_mib: f64,
    /// Extra cost per MiB the first time destination memory is touched (page fault and
    /// zeroing): paid by registration (RDMA pins it) or by the receiving copy (TCP).
    pub first_touch_us_per_mib: f64,
    pub dereg_us_per_mib: f64,
    /// Registrations the destination runs in parallel.
    pub reg_threads: u32,
    /// CPU the sender spends per byte (copy, checksum); 0 for one-sided RDMA writes.
    pub send_cpu_s_per_gb: f64,
    /// CPU the receiver spends per byte; 0 for RDMA (the NIC places the bytes).
    pub recv_cpu_s_per_gb: f64,
    /// Cores per host available to the migration (channels beyond this share cores).
    pub cores_per_side: u32,
    /// CPU to send or receive one control frame.
    pub frame_cpu_ns: u64,
    /// Zero-page detection, per byte actually compared (all of a zero page; a non-zero page
    /// exits after its first cache lines, counted as 256 bytes).
    pub zero_check_s_per_gb: f64,
    /// xxh3 over memory for end-of-migration digests (memory-bandwidth bound).
    pub digest_s_per_gb: f64,
    /// The `scan` dirty log: hashing all of memory once per scan (every page, every round),
    /// with the source's scan threads. `rdmig bench` measures it on a host.
    pub scan_s_per_gb: f64,
    /// The same once the workload is paused: the final scan no longer shares the cores with
    /// a running guest (`rdmig bench --busy N` measures both).
    pub paused_scan_s_per_gb: f64,
    /// Destination memset for ZERO ranges.
    pub zero_fill_s_per_gb: f64,
    /// TCP: a receiving core's fixed cost per data frame (header, registration lookup,
    /// acknowledgement, the system calls), on top of its per-byte cost; what makes a round of
    /// scattered single pages slower than one of contiguous memory.
    pub recv_write_ns: u64,
}

/// Names accepted by [`Profile::named`].
pub const PROFILE_NAMES: &[&str] = &[
    "rdma-25g",
    "rdma-40g",
    "rdma-100g",
    "rdma-200g",
    "tcp-25g",
    "tcp-100g",
];

impl Profile {
    fn rdma(name: &str, gbps: f64, latency_ns: u64, mtu: u32, wr_ns: u64) -> Profile {
        Profile {
            name: name.to_string(),
            transport: Transport::Rdma,
            link_gbps: gbps,
            latency_ns,
            mtu_bytes: mtu,
            // RoCEv2 middle packet: Ethernet 14 + FCS 4 + preamble/IFG 20, IPv4 20, UDP 8,
            // BTH 12, ICRC 4.
            header_bytes: 82,
            wr_overhead_ns: wr_ns,
            sq_depth: 64,
            channels: 2,
            cq_batch: 16,
            cq_wakeup_ns: 0,
            reg_fixed_us: 50.0,
            reg_us_per_mib: 100.0,
            first_touch_us_per_mib: 250.0,
            dereg_us_per_mib: 23.0,
            reg_threads: 4,
            send_cpu_s_per_gb: 0.0,
            recv_cpu_s_per_gb: 0.0,
            cores_per_side: 16,
            frame_cpu_ns: 1_000,
            zero_check_s_per_gb: 0.063,
            digest_s_per_gb: 0.1,
            scan_s_per_gb: 0.06,
            paused_scan_s_per_gb: 0.06,
            zero_fill_s_per_gb: 0.1,
            recv_write_ns: 0,
        }
    }

    /// TCP CPU costs: the calibration table's central figures (send 0.35, receive 0.6
    /// core-s/GB) would cap one stream at 13 Gb/s, below the 23.5 and 35 Gb/s single-stream
    /// goodput measured on 25G and 100G hosts; these profiles take the costs within the
    /// table's ranges (send 0.15-0.7, receive 0.2-0.85) that reproduce the measured goodput.
    fn tcp(name: &str, gbps: f64, latency_ns: u64, channels: u8, send: f64, recv: f64) -> Profile {
        Profile {
            name: name.to_string(),
            transport: Transport::Tcp,
            link_gbps: gbps,
            latency_ns,
            // MSS 1448 with timestamps; Ethernet 38 + IPv4 20 + TCP 32 per segment.
            mtu_bytes: 1448,
            header_bytes: 90,
            wr_overhead_ns: 2_000,
            sq_depth: 64,
            channels,
            cq_batch: 64,
            cq_wakeup_ns: 5_000,
            // No memory regions: the transport keeps software keys.
            reg_fixed_us: 1.0,
            reg_us_per_mib: 0.0,
            first_touch_us_per_mib: 250.0,
            dereg_us_per_mib: 0.0,
            reg_threads: 1,
            send_cpu_s_per_gb: send,
            recv_cpu_s_per_gb: recv,
            cores_per_side: 16,
            frame_cpu_ns: 3_000,
            zero_check_s_per_gb: 0.063,
            digest_s_per_gb: 0.1,
            scan_s_per_gb: 0.06,
            paused_scan_s_per_gb: 0.06,
            zero_fill_s_per_gb: 0.1,
            recv_write_ns: 0,
        }
    }

    /// A named profile, or `None`.
    pub fn named(name: &str) -> Option<Profile> {
        Some(match name {
            "rdma-25g" => Self::rdma(name, 25.0, 1_500, 1024, 270),
            "rdma-40g" => Self::rdma(name, 40.0, 1_300, 2048, 270),
            "rdma-100g" => Self::rdma(name, 100.0, 1_000, 4096, 270),
            "rdma-200g" => Self::rdma(name, 200.0, 1_000, 4096, 180),
            "tcp-25g" => Self::tcp(name, 25.0, 15_000, 1, 0.25, 0.33),
            "tcp-100g" => Self::tcp(name, 100.0, 12_000, 4, 0.2, 0.23),
            _ => return None,
        })
    }

    /// Sets one parameter by its field name (`--set key=value`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn f(v: &str) -> Result<f64, String> {
            let x: f64 = v.parse().map_err(|_| format!("{v:?} is not a number"))?;
            if x.is_finite() && x >= 0.0 {
                Ok(x)
            } else {
                Err(format!("{v:?} must be a finite non-negative number"))
            }
        }
        fn u<T: std::str::FromStr>(v: &str) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{v:?} is not a valid integer here"))
        }
        match key {
            "transport" => {
                self.transport = match value {
                    "rdma" => Transport::Rdma,
                    "tcp" => Transport::Tcp,
                    _ => return Err("transport is rdma or tcp".into()),
                }
            }
            "link_gbps" => self.link_gbps = f(value)?,
            "latency_ns" => self.latency_ns = u(value)?,
            "mtu_bytes" => self.mtu_bytes = u(value)?,
            "header_bytes" => self.header_bytes = u(value)?,
            "wr_overhead_ns" => self.wr_overhead_ns = u(value)?,
            "sq_depth" => self.sq_depth = u(value)?,
            "channels" => self.channels = u(value)?,
            "cq_batch" => self.cq_batch = u(value)?,
            "cq_wakeup_ns" => self.cq_wakeup_ns = u(value)?,
            "reg_fixed_us" => self.reg_fixed_us = f(value)?,
            "reg_us_per_mib" => self.reg_us_per_mib = f(value)?,
            "first_touch_us_per_mib" => self.first_touch_us_per_mib = f(value)?,
            "dereg_us_per_mib" => self.dereg_us_per_mib = f(value)?,
            "reg_threads" => self.reg_threads = u(value)?,
            "send_cpu_s_per_gb" => self.send_cpu_s_per_gb = f(value)?,
            "recv_cpu_s_per_gb" => self.recv_cpu_s_per_gb = f(value)?,
            "cores_per_side" => self.cores_per_side = u(value)?,
            "frame_cpu_ns" => self.frame_cpu_ns = u(value)?,
            "zero_check_s_per_gb" => self.zero_check_s_per_gb = f(value)?,
            "digest_s_per_gb" => self.digest_s_per_gb = f(value)?,
            "scan_s_per_gb" => self.scan_s_per_gb = f(value)?,
            "paused_scan_s_per_gb" => self.paused_scan_s_per_gb = f(value)?,
            "recv_write_ns" => self.recv_write_ns = f(value)? as u64,
            "zero_fill_s_per_gb" => self.zero_fill_s_per_gb = f(value)?,
            _ => return Err(format!("unknown profile parameter {key:?}")),
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.link_gbps.is_nan() || self.link_gbps <= 0.0 {
            return Err("link_gbps must be positive".into());
        }
        if self.mtu_bytes == 0 || self.sq_depth == 0 || self.cq_batch == 0 {
            return Err("mtu_bytes, sq_depth and cq_batch must be positive".into());
        }
        if self.channels == 0 || self.channels > rdmig_model::wire::MAX_CHANNELS {
            return Err("channels must be 1..=16".into());
        }
        if self.reg_threads == 0 || self.cores_per_side == 0 {
            return Err("reg_threads and cores_per_side must be positive".into());
        }
        Ok(())
    }

    /// `key = value` lines for `rdmig-sim profiles`.
    pub fn describe(&self) -> String {
        let v = serde_json::to_value(self).expect("profile serialises");
        let mut s = String::new();
        if let serde_json::Value::Object(m) = v {
            for (k, v) in m {
                s += &format!("  {k:<24} {v}\n");
            }
        }
        s
    }

    /// Integer costs derived once per run.
    pub fn costs(&self) -> Costs {
        // 1 s/GB = 1 ns/B = 1e6 fs/B; 1 Gb/s = 8 ns/B.
        let fs = |s_per_gb: f64| (s_per_gb * 1e6).round() as u64;
        let per_mib = |us: f64| (us * 1e9 / (1u64 << 20) as f64).round() as u64;
        Costs {
            rdma: self.transport == Transport::Rdma,
            link_fs_per_byte: (8e6 / self.link_gbps).round().max(1.0) as u64,
            latency_ns: self.latency_ns,
            mtu: self.mtu_bytes as u64,
            header: self.header_bytes as u64,
            wr_ns: self.wr_overhead_ns,
            cq_batch: self.cq_batch as usize,
            cq_wakeup_ns: self.cq_wakeup_ns,
            reg_fixed_ns: (self.reg_fixed_us * 1e3).round() as u64,
            reg_fs_per_byte: per_mib(self.reg_us_per_mib),
            touch_fs_per_byte: per_mib(self.first_touch_us_per_mib),
            dereg_fs_per_byte: per_mib(self.dereg_us_per_mib),
            reg_threads: self.reg_threads as usize,
            send_fs_per_byte: fs(self.send_cpu_s_per_gb),
            recv_fs_per_byte: fs(self.recv_cpu_s_per_gb),
            cores: self.cores_per_side as u64,
            frame_ns: self.frame_cpu_ns,
            zero_check_fs_per_byte: fs(self.zero_check_s_per_gb),
            digest_fs_per_byte: fs(self.digest_s_per_gb),
            scan_fs_per_byte: fs(self.scan_s_per_gb),
            paused_scan_fs_per_byte: fs(self.paused_scan_s_per_gb),
            recv_write_ns: self.recv_write_ns,
            zero_fill_fs_per_byte: fs(self.zero_fill_s_per_gb),
        }
    }
}

/// A profile in integer units: femtoseconds per byte and nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Costs {
    pub rdma: bool,
    pub link_fs_per_byte: u64,
    pub latency_ns: u64,
    pub mtu: u64,
    pub header: u64,
    pub wr_ns: u64,
    pub cq_batch: usize,
    pub cq_wakeup_ns: u64,
    pub reg_fixed_ns: u64,
    pub reg_fs_per_byte: u64,
    pub touch_fs_per_byte: u64,
    pub dereg_fs_per_byte: u64,
    pub reg_threads: usize,
    pub send_fs_per_byte: u64,
    pub recv_fs_per_byte: u64,
    pub cores: u64,
    pub frame_ns: u64,
    pub zero_check_fs_per_byte: u64,
    pub digest_fs_per_byte: u64,
    pub zero_fill_fs_per_byte: u64,
    pub scan_fs_per_byte: u64,
    pub paused_scan_fs_per_byte: u64,
    pub recv_write_ns: u64,
}

/// Nanoseconds for `bytes` at `fs_per_byte`, rounded up so no transfer is free.
pub fn ns(bytes: u64, fs_per_byte: u64) -> u64 {
    ((bytes as u128 * fs_per_byte as u128).div_ceil(1_000_000)) as u64
}

impl Costs {
    /// Bytes a payload occupies on the wire, headers included.
    pub fn wire_bytes(&self, len: u64) -> u64 {
        len + len.div_ceil(self.mtu).max(1) * self.header
    }

    /// Time the link is busy sending `len` payload bytes.
    pub fn wire_ns(&self, len: u64) -> u64 {
        ns(self.wire_bytes(len), self.link_fs_per_byte)
    }

    /// Payload rate the link can carry with full-size packets, bytes per second.
    pub fn goodput_bytes_per_s(&self) -> f64 {
        1e15 / self.link_fs_per_byte as f64 * self.mtu as f64 / (self.mtu + self.header) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_match_calibration() {
        let p = Profile::named("rdma-100g").unwrap();
        let c = p.costs();
        let gbps = c.goodput_bytes_per_s() * 8.0 / 1e9;
        assert!((96.6..=98.4).contains(&gbps), "rdma-100g goodput {gbps}");
        let c25 = Profile::named("rdma-25g").unwrap().costs();
        let g25 = c25.goodput_bytes_per_s() * 8.0 / 1e9;
        assert!((22.5..=23.5).contains(&g25), "rdma-25g goodput {g25}");
        let t = Profile::named("tcp-100g").unwrap();
        let single = 1.0 / t.recv_cpu_s_per_gb * 8.0;
        assert!(
            (30.0..=40.0).contains(&single),
            "tcp-100g single stream {single}"
        );
        for n in PROFILE_NAMES {
            Profile::named(n).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn overrides() {
        let mut p = Profile::named("rdma-100g").unwrap();
        p.set("link_gbps", "40").unwrap();
        assert_eq!(p.link_gbps, 40.0);
        assert!(p.set("nope", "1").is_err());
        assert!(p.set("channels", "0").is_err());
    }
}
