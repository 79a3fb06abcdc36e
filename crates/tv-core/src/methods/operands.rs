//! Where the hot loops of a pass read a block's values from: the decoded
//! f64 buffers of a [`Block`], or the stored bf16 words of a [`Bf16Block`].
//!
//! Decoding a block writes every input into f64 buffers that the pass then
//! reads back; for bf16 inputs (the usual checkpoint type) the AVX2 loops of
//! the window pass and of the element-major combine instead widen the
//! stored words in registers, four at a time. Widening is exact (a bf16 is
//! an f32 with zero low bits, and f32 → f64 is exact) and is the very
//! conversion decoding performs, so both sources give the same f64 values
//! and the loops generic over [`Operands`] give bit-identical results.

use super::inputs::Block;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// One input's values over a block.
pub(crate) trait Values: Copy {
    /// Number of entries.
    fn count(self) -> usize;

    /// Entries `range`.
    fn part(self, range: std::ops::Range<usize>) -> Self;

    /// Entry `j`.
    fn at(self, j: usize) -> f64;

    /// Entries `j..j + 4`.
    ///
    /// # Safety
    /// The CPU has AVX2 and `j + 4` is at most the number of entries.
    #[cfg(target_arch = "x86_64")]
    unsafe fn four(self, j: usize) -> __m256d;
}

impl Values for &[f64] {
    #[inline(always)]
    fn count(self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn part(self, range: std::ops::Range<usize>) -> Self {
        &self[range]
    }

    #[inline(always)]
    fn at(self, j: usize) -> f64 {
        self[j]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn four(self, j: usize) -> __m256d {
        debug_assert!(j + 4 <= self.len());
        // SAFETY: the caller guarantees AVX2 and j + 4 <= len.
        unsafe { _mm256_loadu_pd(self.as_ptr().add(j)) }
    }
}

impl Values for &[u16] {
    #[inline(always)]
    fn count(self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn part(self, range: std::ops::Range<usize>) -> Self {
        &self[range]
    }

    #[inline(always)]
    fn at(self, j: usize) -> f64 {
        f64::from(crate::dtype::bf16_bits_to_f32(self[j]))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn four(self, j: usize) -> __m256d {
        debug_assert!(j + 4 <= self.len());
        // SAFETY: the caller guarantees AVX2 and j + 4 <= len: the 8 bytes
        // read are inside the slice.
        unsafe {
            let words = _mm_loadl_epi64(self.as_ptr().add(j).cast());
            let bits = _mm_slli_epi32::<16>(_mm_cvtepu16_epi32(words));
            _mm256_cvtps_pd(_mm_castsi128_ps(bits))
        }
    }
}

/// A block's inputs: elements `first..first + len` of the base and of
/// every model.
///
/// # Safety
/// The AVX2 loops check the lengths once (`fused::combine` and
/// `window::classify` assert them) and then load without checks: `base()`
/// and every `model(i)` must return the same slices on every call.
pub(crate) unsafe trait Operands {
    type Values<'s>: Values
    where
        Self: 's;
    fn first(&self) -> usize;
    fn len(&self) -> usize;
    fn base(&self) -> Self::Values<'_>;
    /// Model `i` (position among the tensor's models).
    fn model(&self, i: usize) -> Self::Values<'_>;
    /// Number of models.
    fn model_count(&self) -> usize;
    /// Whether every value of the base and of every model is finite.
    fn finite(&self) -> bool;
}

// SAFETY: the slices are fields of the block, the same on every call.
unsafe impl Operands for Block<'_> {
    type Values<'s>
        = &'s [f64]
    where
        Self: 's;

    #[inline(always)]
    fn first(&self) -> usize {
        self.first
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn base(&self) -> &[f64] {
        self.base
    }

    #[inline(always)]
    fn model(&self, i: usize) -> &[f64] {
        Block::model(self, i)
    }

    #[inline(always)]
    fn model_count(&self) -> usize {
        self.models.len().checked_div(self.len).unwrap_or(0)
    }

    /// Known from decoding.
    #[inline(always)]
    fn finite(&self) -> bool {
        self.finite
    }
}

/// A block of a tensor whose base and models are all stored as aligned
/// bf16: the words as they are mapped, undecoded.
#[derive(Debug)]
pub(crate) struct Bf16Block<'a> {
    pub first: usize,
    pub len: usize,
    pub base: &'a [u16],
    pub models: &'a [&'a [u16]],
}

// SAFETY: the slices are fields of the block, the same on every call.
unsafe impl Operands for Bf16Block<'_> {
    type Values<'s>
        = &'s [u16]
    where
        Self: 's;

    #[inline(always)]
    fn first(&self) -> usize {
        self.first
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn base(&self) -> &[u16] {
        self.base
    }

    #[inline(always)]
    fn model(&self, i: usize) -> &[u16] {
        self.models[i]
    }

    #[inline(always)]
    fn model_count(&self) -> usize {
        self.models.len()
    }

    /// A scan of the words: none has every exponent bit set.
    #[inline(always)]
    fn finite(&self) -> bool {
        let finite = |words: &[u16]| {
            words
                .iter()
                .fold(true, |all, &w| all & crate::dtype::bf16_is_finite(w))
        };
        finite(self.base) && self.models.iter().all(|m| finite(m))
    }
}

/// Whether the AVX2 loops may run (the CPU has AVX2 and, in tests, the
/// variant is allowed).
#[inline(always)]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::allowed(crate::simd::Variant::Avx2)
            && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{noise, stored_bf16};

    #[test]
    fn stored_words_read_as_their_decoded_values() {
        let mut values = noise(5, 64, 3.0);
        values[3] = f64::NAN;
        values[9] = f64::INFINITY;
        values[10] = -0.0;
        values[11] = 1e-40; // subnormal in f32 and in bf16
        let (words, decoded) = stored_bf16(&values);
        let bits = |x: f64| x.to_bits();
        for (j, &x) in decoded.iter().enumerate() {
            assert_eq!(bits(words.as_slice().at(j)), bits(x), "{j}");
        }
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            for j in (0..values.len()).step_by(4) {
                let (mut from_words, mut from_f64) = ([0f64; 4], [0f64; 4]);
                // SAFETY: AVX2 checked above; j + 4 <= 64.
                unsafe {
                    _mm256_storeu_pd(from_words.as_mut_ptr(), words.as_slice().four(j));
                    _mm256_storeu_pd(from_f64.as_mut_ptr(), decoded.as_slice().four(j));
                }
                assert_eq!(from_words.map(bits), from_f64.map(bits), "{j}");
                assert_eq!(
                    from_words.map(bits),
                    [0, 1, 2, 3].map(|l| bits(decoded[j + l]))
                );
            }
        }
        let finite = |base: &[u16], model: &[u16]| {
            Bf16Block {
                first: 0,
                len: 8,
                base,
                models: &[model],
            }
            .finite()
        };
        let (clean, nan, infinite) = (&words[16..24], &words[..8], &words[8..16]);
        assert!(finite(clean, &words[24..32]));
        assert!(!finite(nan, clean), "NaN in the base");
        assert!(!finite(clean, infinite), "infinity in a model");
    }
}
