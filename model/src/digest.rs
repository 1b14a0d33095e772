//! The chunk digest both sides compute before the commit (spec: SW-4).

/// xxh3-64 (seed 0) of one chunk's bytes: the digest negotiated as `Xxh3_64` (spec: SW-4).
pub fn chunk_digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Digests of every chunk of `mem` (blocks in the given order, chunks of `1 << chunk_log2`
/// bytes, a block's last chunk possibly short), in global chunk order.
pub fn digests(mem: &[Vec<u8>], chunk_log2: u8) -> Vec<u64> {
    mem.iter()
        .flat_map(|b| b.chunks(1 << chunk_log2).map(chunk_digest))
        .collect()
}
