//! rdmig protocol core: the wire codec and the sans-IO source and destination state machines.
//!
//! Everything that decides what the protocol does lives here; the model checker, the
//! simulator and the real transports all drive these same machines. The machines read no
//! clock, spawn no thread, touch no socket and draw no random number: time, nonces and all
//! I/O results arrive as inputs, and every effect leaves as a command.
//!
//! This crate is what the `rdmig` binary links. The model checker, the in-memory pair and the
//! fuzz target bodies live in `rdmig-check` (`model/check/`), which only tests, the checker
//! binary and the fuzzers link.
#![forbid(unsafe_code)]

pub mod auth;
pub mod destination;
pub mod digest;
pub mod source;
pub mod table;
pub mod types;
pub mod wire;

pub use destination::{DestConfig, Destination};
pub use source::{LimitPolicy, Source, SourceConfig};
pub use types::*;
