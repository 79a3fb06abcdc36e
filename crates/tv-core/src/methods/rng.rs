//! Reproducible random draws for DARE and DELLA, independent of threads.
//!
//! Every task-vector entry gets its own uniform draw in [0, 1), a function
//! of (seed, model, tensor name, element index) only, so the merged output
//! is bit-identical whatever the thread count, the segment size or the
//! order in which tensors are visited. The generator is ChaCha8
//! (`rand_chacha`) keyed by SHA-256(seed as 8 little-endian bytes ‖ model
//! index as 8 little-endian bytes ‖ tensor name in UTF-8), stream 0; entry
//! `j` takes the 64-bit output at word position 2j, and its draw is
//! `(x >> 11) · 2⁻⁵³`. An entry is kept when its draw is below its keep
//! probability.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// The draws of one model's entries of one tensor.
#[derive(Debug, Clone)]
pub(crate) struct Draws {
    key: [u8; 32],
}

impl Draws {
    /// The generator of `model` (index in the family) for tensor `name`.
    pub fn new(seed: u64, model: usize, name: &str) -> Self {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update((model as u64).to_le_bytes());
        h.update(name.as_bytes());
        Self {
            key: h.finalize().into(),
        }
    }

    /// Fills `out` with the draws of entries `first..first + out.len()`.
    pub fn fill(&self, first: usize, out: &mut [f64]) {
        let mut rng = ChaCha8Rng::from_seed(self.key);
        rng.set_word_pos(2 * first as u128);
        // The stream's bytes in bulk: entry j's output is the 8 bytes of
        // words 2j and 2j + 1, little-endian, as next_u64 would read them.
        let mut bytes = vec![0u8; 8 * out.len()];
        rng.fill_bytes(&mut bytes);
        for (u, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            let x = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            *u = (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_only_on_the_entry() {
        let d = Draws::new(7, 2, "model.layers.0.mlp.up_proj.weight");
        let mut whole = vec![0.0; 100];
        d.fill(0, &mut whole);
        let mut part = vec![0.0; 10];
        d.fill(37, &mut part);
        assert_eq!(part, whole[37..47]);
        assert!(whole.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mut rng = ChaCha8Rng::from_seed(d.key);
        for &u in &whole[..5] {
            assert_eq!(u, (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64);
        }
        let mut other = vec![0.0; 100];
        Draws::new(7, 3, "model.layers.0.mlp.up_proj.weight").fill(0, &mut other);
        assert_ne!(whole, other);
        let mean = whole.iter().sum::<f64>() / 100.0;
        assert!((mean - 0.5).abs() < 0.15, "{mean}");
    }
}
