//! The one seeded generator of every test world: the simulator's runs, the in-memory pair's
//! guest, the fuzz smoke tests and the process tests.
//!
//! A run draws nothing from the operating system and reads no clock: the seed is expanded
//! into a xoshiro256** state, and independent streams (configuration, guest, fabric, faults,
//! nonces) are forked from that one generator in a fixed order. Forking keeps streams
//! independent, so that, for example, enabling a fault does not change which pages the
//! guest writes, while everything still follows from the one seed.

/// xoshiro256**: small, fast, and identical on every platform.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            s: [
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
            ],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the tiny bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "between({lo}, {hi})");
        if hi - lo == u64::MAX {
            return self.next_u64();
        }
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `ppm` per million (integer probabilities, as in TigerBeetle).
    pub fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.below(1_000_000) < ppm as u64
    }

    /// A new, independent generator whose seed comes from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Parses a seed: a decimal u64, `0x` hex, or a 40-hex-digit commit hash (hashed with xxh3
/// so every digit counts), so that a CI failure can be replayed from the commit it ran on.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.len() == 40 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(xxhash_rust::xxh3::xxh3_64(
            t.to_ascii_lowercase().as_bytes(),
        ));
    }
    if let Some(h) = t.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|e| format!("bad hex seed {s:?}: {e}"));
    }
    t.parse::<u64>()
        .map_err(|_| format!("seed {s:?} is neither a u64 nor a 40-hex commit hash"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn seeds_parse() {
        assert_eq!(parse_seed("17").unwrap(), 17);
        assert_eq!(parse_seed("0x10").unwrap(), 16);
        let h = "f5c1467aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(
            parse_seed(h).unwrap(),
            parse_seed(&h.to_uppercase()).unwrap()
        );
        assert!(parse_seed("nope").is_err());
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(3);
        for n in 1..200 {
            assert!(r.below(n) < n);
        }
        assert_eq!(r.between(5, 5), 5);
    }
}

#[cfg(test)]
mod uniformity {
    use super::*;

    #[test]
    fn first_draw_of_forked_streams_is_uniform() {
        let mut counts = [0u32; 3];
        for seed in 0..30_000u64 {
            let mut r = Rng::new(seed).fork();
            counts[r.below(3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }
}
