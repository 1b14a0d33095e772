//! The `rdmig` binary's library: memory backends, dirty tracking, transports, and the driver
//! loops that run the `rdmig-model` machines against them. No protocol decision lives here:
//! the driver feeds the machines inputs and executes their commands.

pub mod cli;
pub mod completions;
pub mod control;
pub mod demo;
pub mod dirty;
pub mod driver;
pub mod mapped_bitmap;
pub mod mem;
pub mod qemu;
pub mod qmp;
pub mod regtable;
pub mod report;
pub mod tcp;
pub mod transport;
pub mod verbs;
pub mod workload;
