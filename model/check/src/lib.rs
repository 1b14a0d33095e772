//! Verification of the rdmig protocol machines (`rdmig-model`), kept out of what the `rdmig`
//! binary links:
//!
//! - [`check`]: the stateright model of a whole migration (binary `rdmig-model`);
//! - [`pair`]: a source and a destination stepped against each other in memory, for tests;
//! - [`fuzzing`]: the bodies of the cargo-fuzz targets and their oracles, replayed by
//!   `cargo test` over the checked-in corpora.
#![forbid(unsafe_code)]

pub mod check;
pub mod env;
pub mod fuzzing;
pub mod pair;
pub mod rng;
