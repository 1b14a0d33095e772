//! Sizes and rates: the one parser of every rdmig command line lives in `rdmig_model::units`;
//! the simulator adds its time unit.

pub use rdmig_model::units::*;

/// Nanoseconds as milliseconds with three decimals.
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}
