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

/// The `Xxh3PageTree` digest of one chunk: xxh3-64 (seed 0) over the little-endian xxh3-64
/// hashes of its pages, in page order (a short last page hashed over its actual length)
/// (spec: SW-4).
pub fn tree_digest(page_hashes: &[u64]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in page_hashes {
        h.update(&p.to_le_bytes());
    }
    h.digest()
}

/// Digests `alg` of every chunk of `mem` (pages of `1 << page_log2` bytes), in global chunk
/// order; empty for `None`.
pub fn digests_by(
    alg: crate::wire::DigestAlg,
    mem: &[Vec<u8>],
    page_log2: u8,
    chunk_log2: u8,
) -> Vec<u64> {
    use crate::wire::DigestAlg;
    match alg {
        DigestAlg::None => Vec::new(),
        DigestAlg::Xxh3_64 => digests(mem, chunk_log2),
        DigestAlg::Xxh3PageTree => mem
            .iter()
            .flat_map(|b| {
                b.chunks(1 << chunk_log2).map(|c| {
                    let pages: Vec<u64> = c.chunks(1 << page_log2).map(chunk_digest).collect();
                    tree_digest(&pages)
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DigestAlg;

    /// spec: SW-4: the page tree hashes each page, then the pages' hashes; equal memory gives
    /// equal digests and one changed byte changes its chunk's digest only.
    #[test]
    fn sw_4_page_tree_digest_is_the_hash_of_page_hashes() {
        let mut a = vec![vec![0u8; 3 * 4096 + 100]];
        a[0][5000] = 1;
        let d = digests_by(DigestAlg::Xxh3PageTree, &a, 12, 13);
        let p = |r: std::ops::Range<usize>| chunk_digest(&a[0][r]);
        assert_eq!(
            d,
            vec![
                tree_digest(&[p(0..4096), p(4096..8192)]),
                tree_digest(&[p(8192..12288), p(12288..12388)]),
            ]
        );
        let mut b = a.clone();
        b[0][12300] = 7;
        let e = digests_by(DigestAlg::Xxh3PageTree, &b, 12, 13);
        assert_eq!((d[0] == e[0], d[1] == e[1]), (true, false));
        assert_ne!(d, digests_by(DigestAlg::Xxh3_64, &a, 12, 13));
    }
}
