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

/// `values` stored as bf16: the little-endian words, and the values those
/// words decode to (the rounding of each value to bf16).
pub(crate) fn stored_bf16(values: &[f64]) -> (Vec<u16>, Vec<f64>) {
    use crate::dtype::{decode_f64, encode_f64, FloatType};
    let mut bytes = vec![0u8; 2 * values.len()];
    encode_f64(FloatType::BF16, values, &mut bytes);
    let mut decoded = vec![0.0; values.len()];
    decode_f64(FloatType::BF16, &bytes, &mut decoded);
    let words = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    (words, decoded)
}
