//! Reproducible random draws for DARE and DELLA, independent of threads.
//!
//! Every task-vector entry gets its own uniform draw in [0, 1), a function
//! of (seed, model, tensor name, element index) only, so the merged output
//! is bit-identical whatever the thread count, the segment size or the
//! order in which tensors are visited. The generator is SplitMix64 used as
//! a counter-based generator: its 64-bit key is the first 8 bytes
//! (little-endian) of SHA-256(seed as 8 little-endian bytes ‖ model index as
//! 8 little-endian bytes ‖ tensor name in UTF-8), and entry j's draw is
//! SplitMix64's output for state key + (j + 1) · 0x9E3779B97F4A7C15, that is
//! the (j + 1)-th output of the SplitMix64 sequence seeded with the key,
//! mapped to `(x >> 12) · 2⁻⁵²` (computed exactly as the f64 with those 52
//! bits as its fraction, minus 1). An entry is kept when its draw is below its
//! keep probability. Each draw is a few multiplications, computed
//! independently, so a block of draws vectorises.

use sha2::{Digest, Sha256};

/// SplitMix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The draws of one model's entries of one tensor.
#[derive(Debug, Clone)]
pub(crate) struct Draws {
    key: u64,
}

impl Draws {
    /// The generator of `model` (index in the family) for tensor `name`.
    pub fn new(seed: u64, model: usize, name: &str) -> Self {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update((model as u64).to_le_bytes());
        h.update(name.as_bytes());
        let digest = h.finalize();
        Self {
            key: u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")),
        }
    }

    /// Fills `out` with the draws of entries `first..first + out.len()`.
    #[inline(always)]
    pub fn fill(&self, first: usize, out: &mut [f64]) {
        for (j, u) in out.iter_mut().enumerate() {
            let counter = (first + j) as u64 + 1;
            let mut z = self.key.wrapping_add(counter.wrapping_mul(GAMMA));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *u = f64::from_bits(0x3FF0_0000_0000_0000 | (z >> 12)) - 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 as its author wrote it: a state advanced by GAMMA.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(GAMMA);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn draws_are_the_splitmix64_sequence_and_depend_only_on_the_entry() {
        let d = Draws::new(7, 2, "model.layers.0.mlp.up_proj.weight");
        let mut whole = vec![0.0; 1000];
        d.fill(0, &mut whole);
        let mut reference = SplitMix64(d.key);
        for &u in &whole {
            assert_eq!(u, (reference.next() >> 12) as f64 / (1u64 << 52) as f64);
        }
        let mut part = vec![0.0; 10];
        d.fill(37, &mut part);
        assert_eq!(part, whole[37..47]);
        assert!(whole.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mut other = vec![0.0; 1000];
        Draws::new(7, 3, "model.layers.0.mlp.up_proj.weight").fill(0, &mut other);
        assert_ne!(whole, other);
        let mean = whole.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }
}
