//! rdmig protocol core: the wire codec and the sans-IO source and destination state machines.
//!
//! Everything that decides what the protocol does lives here; the model checker, the
//! simulator and the real transports all drive these same machines. The machines read no
//! clock, spawn no thread, touch no socket and draw no random number: time, nonces and all
//! I/O results arrive as inputs, and every effect leaves as a command.
//!
//! - [`source::Source`] takes [`source::SrcInput`] and issues [`source::SrcCommand`];
//! - [`destination::Destination`] takes [`destination::DstInput`] and issues
//!   [`destination::DstCommand`];
//! - [`listener::Listener`] is the listening destination: it takes every connection a
//!   destination accepts, runs a destination machine per control connection in its
//!   handshake, binds the first that authenticates, and admits its data channels.
//!
//! This crate is what the `rdmig` binary links. The model checker, the in-memory pair and the
//! fuzz target bodies live in `rdmig-check` (`model/check/`), which only tests, the checker
//! binary and the fuzzers link.
#![forbid(unsafe_code)]

pub mod auth;
pub mod credits;
pub mod destination;
pub mod detail;
pub mod digest;
pub mod geometry;
pub mod listener;
pub mod source;
pub mod table;
pub mod types;
pub mod units;
pub mod wire;

pub use credits::{Credits, INITIAL_CREDITS};
pub use destination::{DestConfig, Destination, DstCommand, DstInput, DstOut, DstTimer};
pub use detail::Detail;
pub use geometry::{BlockGeom, Geometry, PageBitmap, MAX_TOTAL_CHUNKS};
pub use listener::{ConnId, Listener, ListenerConfig, LsnCommand, LsnInput, LsnOut, LsnTimer};
pub use source::{
    LimitPolicy, Source, SourceConfig, SrcCommand, SrcInput, SrcOut, SrcTimer, WriteCmd,
};
pub use types::*;
