//! Small guests shared by the test suite, so the whole suite stays fast in debug builds.
#![allow(dead_code)]

use rdmig_sim::guest::GuestConfig;
use rdmig_sim::profile::Profile;
use rdmig_sim::SimConfig;

/// A 16 MiB guest dirtying 300 MB/s into a hot fifth of memory, 256 KiB chunks, short
/// timeouts: every phase of the protocol in a few milliseconds of virtual time.
pub fn small(seed: u64, profile: &str) -> SimConfig {
    let mut g = GuestConfig::new(16 << 20);
    g.dirty_bytes_per_s = 300_000_000;
    g.pattern = "hot:0.2".parse().unwrap();
    let mut c = SimConfig::new(seed, Profile::named(profile).unwrap(), g);
    c.migration.chunk_log2 = 18;
    c.migration.idle_timeout_ms = 500;
    c.migration.keepalive_ms = 100;
    c
}

/// Summary without the trace line: what a reviewer reads in a snapshot diff.
pub fn summary(r: &rdmig_sim::Report) -> String {
    r.summary()
        .lines()
        .filter(|l| !l.starts_with("trace:"))
        .collect::<Vec<_>>()
        .join("\n")
}
