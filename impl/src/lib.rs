//! The `rdmig` binary's library: the driver loops that run the `rdmig-model` machines, and
//! everything they drive. No protocol decision lives here: the driver feeds the machines
//! inputs and executes their commands.
//!
//! - [`driver`]: the source and destination driver loops;
//! - [`transport`]: TCP and RDMA verbs transports behind one pair of traits;
//! - [`memory`]: RAM blocks (shared-file mappings) and dirty tracking;
//! - [`vmm`]: pausing, resuming and starting workloads, QEMU over QMP;
//! - [`tools`]: `rdmig demo`, `rdmig bench` and the synthetic `rdmig workload`;
//! - [`cli`] and [`report`]: argument parsing and the migration report;
//! - [`fuzzing`]: fuzz target bodies for the QMP and RDMA bootstrap parsers, and the fuzz
//!   dictionaries.

pub mod cli;
pub mod driver;
pub mod fuzzing;
pub mod memory;
pub mod report;
pub mod savefile;
pub mod tools;
pub mod transport;
pub mod vmm;
