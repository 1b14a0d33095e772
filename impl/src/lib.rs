//! The `rdmig` binary's library: memory backends, dirty tracking, transports, and the driver
//! loops that run the `rdmig-model` machines against them. No protocol decision lives here:
//! the driver feeds the machines inputs and executes their commands.

pub mod dirty;
pub mod mapped_bitmap;
pub mod mem;
pub mod workload;
