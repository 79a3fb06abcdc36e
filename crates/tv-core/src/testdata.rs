//! Deterministic data for the unit tests: xorshift noise, the same on every
//! machine and in every test that asks for the same seed.

/// `n` values in [-scale, scale) from `seed`.
pub(crate) fn noise(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}
