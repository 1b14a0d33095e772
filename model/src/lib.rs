//! rdmig protocol core: the wire codec and the sans-IO source and destination state machines.
//!
//! Everything that decides what the protocol does lives here; the model checker, the
//! simulator and the real transports all drive these same machines. The machines read no
//! clock, spawn no thread, touch no socket and draw no random number: time, nonces and all
//! I/O results arrive as inputs, and every effect leaves as a command.

pub mod auth;
pub mod check;
pub mod destination;
#[cfg(feature = "arbitrary")]
pub mod fuzzing;
pub mod pair;
pub mod source;
pub mod table;
pub mod types;
pub mod wire;

pub use destination::{DestConfig, Destination};
pub use source::{LimitPolicy, Source, SourceConfig};
pub use types::*;
