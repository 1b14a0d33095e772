//! The workload's side of a migration: pausing and resuming the source, starting the
//! destination, and QEMU guests over QMP.

pub mod control;
pub mod guard;
pub mod qemu;
pub mod qmp;
