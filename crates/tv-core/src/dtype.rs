//! Floating-point element types of checkpoints and their conversions.
//!
//! Tensors are decoded from their little-endian bytes straight out of the
//! mmapped file (no alignment assumed) into f64 for arithmetic, and results
//! are encoded back exactly once. Encoding from f64 first rounds to f32 with
//! round-to-odd and then to the target format with round-to-nearest-even:
//! f32 has at least two more significand bits than bf16 or f16, so this pair
//! of roundings gives the correctly rounded result of the f64 value.

use safetensors::Dtype;

/// A floating-point storage type that the tools can compute with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatType {
    BF16,
    F16,
    F32,
    F64,
}

impl FloatType {
    /// The float type of a safetensors dtype, or `None` for integer, boolean
    /// and exotic types, which are carried over unchanged.
    pub fn from_dtype(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::BF16 => Some(Self::BF16),
            Dtype::F16 => Some(Self::F16),
            Dtype::F32 => Some(Self::F32),
            Dtype::F64 => Some(Self::F64),
            _ => None,
        }
    }

    /// The safetensors dtype that stores this type.
    pub fn dtype(self) -> Dtype {
        match self {
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
            Self::F64 => Dtype::F64,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    /// The byte range of elements `start..end` in a tensor of this type.
    pub fn byte_range(self, start: usize, end: usize) -> std::ops::Range<usize> {
        start * self.size()..end * self.size()
    }

    /// The name PyTorch and `config.json` (`torch_dtype`) use.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }

    /// Parses a user-facing name: `bf16`, `bfloat16`, `f16`, `fp16`,
    /// `float16`, `half`, `f32`, `fp32`, `float32`, `float`, `f64`, `float64`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(Self::BF16),
            "f16" | "fp16" | "float16" | "half" => Some(Self::F16),
            "f32" | "fp32" | "float32" | "float" => Some(Self::F32),
            "f64" | "fp64" | "float64" | "double" => Some(Self::F64),
            _ => None,
        }
    }
}

/// The family name of a low-precision float type (FP8, FP6, FP4) that the
/// tools cannot compute with; such tensors come with scale tensors stored
/// beside them (`*_scale_inv`), so merging or analysing the rest alone
/// would be silently wrong.
pub fn low_precision_kind(dtype: Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::F8_E4M3
        | Dtype::F8_E5M2
        | Dtype::F8_E8M0
        | Dtype::F8_E4M3FNUZ
        | Dtype::F8_E5M2FNUZ => Some("FP8"),
        Dtype::F6_E2M3 | Dtype::F6_E3M2 => Some("FP6"),
        Dtype::F4 => Some("FP4"),
        _ => None,
    }
}

impl std::fmt::Display for FloatType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

#[inline(always)]
pub(crate) fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Whether a bf16 value is finite (not every exponent bit set).
#[inline(always)]
pub(crate) fn bf16_is_finite(bits: u16) -> bool {
    bits & 0x7F80 != 0x7F80
}

/// `bytes` as little-endian bf16 words, when they are aligned for `u16` on a
/// little-endian machine (the common case: read in place); `None` otherwise.
#[inline(always)]
pub(crate) fn bf16_words(bytes: &[u8]) -> Option<&[u16]> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::try_cast_slice::<u8, u16>(bytes).ok()
    }
    #[cfg(not(target_endian = "little"))]
    {
        let _ = bytes;
        None
    }
}

/// Decodes bf16 words into f64 and tells whether every one is finite (the
/// test vectorises with the conversion, so it costs next to nothing).
#[inline(always)]
fn decode_bf16_words(words: &[u16], out: &mut [f64]) -> bool {
    debug_assert_eq!(words.len(), out.len());
    let mut finite = true;
    for (o, &w) in out.iter_mut().zip(words) {
        *o = f64::from(bf16_bits_to_f32(w));
        finite &= bf16_is_finite(w);
    }
    finite
}

/// Decodes `out.len()` elements of type `ty` from `bytes` into f64.
///
/// `bytes` must hold exactly `out.len() * ty.size()` bytes.
#[inline(always)]
pub fn decode_f64(ty: FloatType, bytes: &[u8], out: &mut [f64]) {
    debug_assert_eq!(bytes.len(), out.len() * ty.size());
    match ty {
        FloatType::BF16 => {
            // Aligned little-endian data is read as u16 words (much faster);
            // the byte-wise loop covers any alignment.
            if let Some(words) = bf16_words(bytes) {
                decode_bf16_words(words, out);
                return;
            }
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f64::from(bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        FloatType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64();
            }
        }
        FloatType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        FloatType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunk of 8"));
            }
        }
    }
}

/// [`decode_f64`], returning whether every decoded value is finite. Aligned
/// bf16 (the common case) is tested as it is decoded, which saves reading
/// the values a second time.
#[inline(always)]
pub fn decode_f64_finite(ty: FloatType, bytes: &[u8], out: &mut [f64]) -> bool {
    if ty == FloatType::BF16 {
        if let Some(words) = bf16_words(bytes) {
            return decode_bf16_words(words, out);
        }
    }
    decode_f64(ty, bytes, out);
    all_finite(out)
}

/// Whether every value is finite (no NaN, no infinity).
#[inline(always)]
pub fn all_finite(xs: &[f64]) -> bool {
    xs.iter().fold(true, |all, x| all & x.is_finite())
}

/// Counts the NaN and infinite values among encoded elements (all exponent
/// bits set).
#[inline(always)]
pub fn count_nonfinite(ty: FloatType, bytes: &[u8]) -> usize {
    match ty {
        FloatType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| !bf16_is_finite(u16::from_le_bytes([c[0], c[1]])))
            .count(),
        FloatType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00)
            .count(),
        FloatType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
            .count(),
        FloatType::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                let bits = u64::from_le_bytes((*c).try_into().expect("chunk of 8"));
                bits & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000
            })
            .count(),
    }
}

/// Rounds `x` to f32 with round-to-odd: exact values stay, inexact ones go to
/// whichever neighbour has an odd significand. A later round-to-nearest-even
/// into a format with at least two fewer significand bits is then correct.
#[inline(always)]
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let r = x as f32;
    let bits = r.to_bits();
    if r.is_nan() || f64::from(r) == x || bits & 1 == 1 {
        return r;
    }
    // `r` is even and inexact: step one unit towards `x` (sign-magnitude bits).
    if f64::from(r).abs() > x.abs() {
        f32::from_bits(bits - 1)
    } else {
        f32::from_bits(bits + 1)
    }
}

/// Rounds an f32 to bf16 bits, to nearest with ties to even; NaN stays NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Encodes `values` as type `ty` into `out`, rounding each value once to the
/// nearest representable value (ties to even).
///
/// `out` must hold exactly `values.len() * ty.size()` bytes.
#[inline(always)]
pub fn encode_f64(ty: FloatType, values: &[f64], out: &mut [u8]) {
    debug_assert_eq!(out.len(), values.len() * ty.size());
    match ty {
        FloatType::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                let bits = f32_to_bf16_bits(f64_to_f32_round_odd(*v));
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
        FloatType::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                let h = half::f16::from_f32(f64_to_f32_round_odd(*v));
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        FloatType::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&(*v as f32).to_le_bytes());
            }
        }
        FloatType::F64 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The correctly rounded bf16 of `x`, found by brute force among the
    /// neighbours of a first guess.
    fn nearest_bf16(x: f64) -> u16 {
        let guess = half::bf16::from_f64(x).to_bits();
        let mut best = guess;
        for cand in [guess.wrapping_sub(1), guess, guess.wrapping_add(1)] {
            let v = half::bf16::from_bits(cand).to_f64();
            let b = half::bf16::from_bits(best).to_f64();
            let (dv, db) = ((v - x).abs(), (b - x).abs());
            if dv < db || (dv == db && cand & 1 == 0) {
                best = cand;
            }
        }
        best
    }

    #[test]
    fn bf16_encoding_is_correctly_rounded_where_double_rounding_would_fail() {
        // 1 + 2^-8 is a bf16 tie; adding 2^-40 makes it round up. Rounding to
        // f32 first would drop the 2^-40 and round the tie down to even.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        let mut out = [0u8; 2];
        encode_f64(FloatType::BF16, &[x], &mut out);
        assert_eq!(u16::from_le_bytes(out), nearest_bf16(x));
        assert_eq!(
            half::bf16::from_bits(u16::from_le_bytes(out)).to_f64(),
            1.0 + 2f64.powi(-7)
        );
    }

    #[test]
    fn round_trips_every_type() {
        let values = [0.0, -0.0, 1.5, -2.25, 65504.0, 1e-3];
        for ty in [
            FloatType::BF16,
            FloatType::F16,
            FloatType::F32,
            FloatType::F64,
        ] {
            let mut bytes = vec![0u8; values.len() * ty.size()];
            encode_f64(ty, &values, &mut bytes);
            let mut back = vec![0f64; values.len()];
            decode_f64(ty, &bytes, &mut back);
            for (v, b) in values.iter().zip(&back) {
                assert!((v - b).abs() <= v.abs() * 1e-2, "{ty}: {v} -> {b}");
            }
        }
    }

    #[test]
    fn decoding_tells_whether_every_value_is_finite() {
        let finite = [0.0, -0.0, 1.5, -2.25, 1e-3, 3.0];
        for ty in [
            FloatType::BF16,
            FloatType::F16,
            FloatType::F32,
            FloatType::F64,
        ] {
            for special in [
                None,
                Some(f64::NAN),
                Some(f64::INFINITY),
                Some(-f64::INFINITY),
            ] {
                for at in 0..finite.len() {
                    let mut values = finite.to_vec();
                    if let Some(x) = special {
                        values[at] = x;
                    }
                    // Aligned, and one byte off (the byte-wise path).
                    let mut bytes = vec![0u8; 1 + values.len() * ty.size()];
                    encode_f64(ty, &values, &mut bytes[1..]);
                    let aligned = bytes[1..].to_vec();
                    for input in [&aligned[..], &bytes[1..]] {
                        let (mut plain, mut checked) =
                            (vec![0f64; values.len()], vec![0f64; values.len()]);
                        decode_f64(ty, input, &mut plain);
                        let all = decode_f64_finite(ty, input, &mut checked);
                        assert_eq!(all, special.is_none(), "{ty} {special:?} at {at}");
                        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&plain), bits(&checked), "{ty}");
                    }
                }
            }
        }
    }

    #[test]
    fn unaligned_bytes_decode_like_aligned_ones() {
        let values = [1.5, -0.25, 3.0, 1e-3];
        let mut bytes = vec![0u8; 1 + values.len() * 2];
        encode_f64(FloatType::BF16, &values, &mut bytes[1..]);
        let (mut a, mut b) = ([0f64; 4], [0f64; 4]);
        decode_f64(FloatType::BF16, &bytes[1..], &mut a);
        let aligned = bytes[1..].to_vec();
        decode_f64(FloatType::BF16, &aligned, &mut b);
        assert_eq!(a, b);
        assert_eq!(a[..3], [1.5, -0.25, 3.0]);
    }

    #[test]
    fn round_odd_keeps_exact_values_and_marks_inexact_ones_odd() {
        assert_eq!(f64_to_f32_round_odd(1.5), 1.5f32);
        let x = 1.0 + 2f64.powi(-30);
        let r = f64_to_f32_round_odd(x);
        assert_eq!(r.to_bits() & 1, 1);
        assert!(f64::from(r) > 1.0 && f64::from(r) < 1.0 + 2f64.powi(-22));
        assert!(f64_to_f32_round_odd(f64::NAN).is_nan());
    }

    #[test]
    fn bf16_nan_and_overflow() {
        assert!(half::bf16::from_bits(f32_to_bf16_bits(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80);
    }
}
