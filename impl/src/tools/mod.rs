//! Programs around the migration itself: the local demo, the benchmark, the synthetic
//! workload.

pub mod bench;
pub mod demo;
mod procs;
pub mod workload;
