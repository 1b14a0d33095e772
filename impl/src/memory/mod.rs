//! Memory: RAM blocks as shared-file mappings, and the ways of learning which pages changed.

pub mod digest_cache;
pub mod dirty;
pub mod mapped_bitmap;
pub mod ram;
pub mod sent_pages;
