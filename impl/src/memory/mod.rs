//! Memory: RAM blocks as shared-file mappings, and the ways of learning which pages changed.

pub mod dirty;
pub mod mapped_bitmap;
pub mod ram;
