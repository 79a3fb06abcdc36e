//! The generalised task arithmetic combine, element-major.
//!
//! [`super::gta`]'s plain form runs model by model over a block: each
//! model's weighted, thinned deltas are stored, then read back for the sign
//! election. When every model's thinning is the same test for every entry
//! of the block (a plain magnitude threshold, a band, a random draw, all or
//! nothing: see [`Lane`]), this form instead takes [`WIDTH`] entries at a
//! time through every model, with the running sums in registers, and writes
//! the merged value once. The sign election needs no second pass: the sums
//! of the positive and of the negative contributions (and of their weights)
//! are kept alongside the total, and the elected sign picks one pair. Every
//! value is made by the same operations in the same order as in the plain
//! form, so the results are bit-identical; only the traffic through memory
//! differs.

use super::operands::{Operands, Values};
use super::select::{key, Threshold};
use crate::simd::keep_or_zero;

/// Entries taken through every model at a time by the portable form.
pub(crate) const WIDTH: usize = 4;

/// How one model thins every entry of a block.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lane {
    /// Every entry is kept.
    Keep,
    /// Every entry is dropped (it still adds 0 · factor · w, as the plain
    /// form does).
    Drop,
    /// Entries kept by a magnitude threshold.
    Above(Threshold),
    /// Kept by `outer` and not by `inner` (Breadcrumbs).
    Band { outer: Threshold, inner: Threshold },
    /// Kept where the entry's draw is below `p`, scaled by `scale`.
    Random { p: f64, scale: f64 },
}

/// A loop over a block's deltas that thins each one: `thin(j, d)` for the
/// delta `d` of entry `j` (counted from the block's start).
pub(crate) trait ThinLoop {
    type Output;
    fn run(self, thin: impl Fn(usize, f64) -> f64) -> Self::Output;
}

impl Lane {
    /// Runs `each` with this lane's thinning, the loop compiled once per
    /// kind of lane (no test of the kind per entry). `draws`: the block's
    /// draws, for a random lane. The one statement of each thinning, for
    /// every loop but the AVX2 form below.
    #[inline(always)]
    pub fn with_thin<L: ThinLoop>(self, draws: &[f64], each: L) -> L::Output {
        match self {
            Lane::Keep => each.run(|_, d| d),
            Lane::Drop => each.run(|_, _| 0.0),
            Lane::Above(cut) => each.run(|_, d| keep_or_zero(d, cut.keeps(key(d)))),
            Lane::Band { outer, inner } => each.run(|_, d| {
                let k = key(d);
                keep_or_zero(d, outer.keeps(k) && !inner.keeps(k))
            }),
            Lane::Random { p, scale } => each.run(|j, d| keep_or_zero(d * scale, draws[j] < p)),
        }
    }
}

/// One model's part in a block: its thinning, its L1 factor and weight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelLane {
    pub lane: Lane,
    pub factor: f64,
    pub weight: f64,
}

/// What the combine does with the weighted deltas' sum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish {
    /// Divide by the (agreeing) weights' sum.
    pub normalize: bool,
    /// Divisor without election (Σ w_i, or 1).
    pub divisor: f64,
    /// λ.
    pub scale: f64,
}

/// Running sums of one group of entries.
#[derive(Clone, Copy)]
struct Sums {
    total: [f64; WIDTH],
    positive: [f64; WIDTH],
    negative: [f64; WIDTH],
    positive_weight: [f64; WIDTH],
    negative_weight: [f64; WIDTH],
}

/// Merges `block` into `out`: b + λ · delta, as [`super::gta`] defines it,
/// with TIES' sign election when `ELECT`. `draws` holds every model's draws
/// of the block, model-major (`lanes.len() × block.len`; read for random
/// lanes only). The block's values are read as decoded f64 or as stored
/// bf16 words ([`super::operands`]), with the same results.
#[inline(always)]
pub(crate) fn combine<const ELECT: bool, O: Operands>(
    block: &O,
    lanes: &[ModelLane],
    draws: &[f64],
    finish: Finish,
    out: &mut [f64],
) {
    let len = block.len();
    assert_eq!(draws.len(), lanes.len() * len, "draws of every model");
    assert!(out.len() == len && block.base().count() >= len);
    for i in 0..lanes.len() {
        assert!(block.model(i).count() >= len, "model {i}'s values");
    }
    let whole = len - len % WIDTH;
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if super::operands::avx2() {
        // SAFETY: the CPU has AVX2, checked just above; every input holds
        // `len` entries, checked above.
        unsafe { avx2::groups::<ELECT, O>(block, lanes, draws, finish, &mut out[..whole]) };
        j = whole;
    }
    while j < whole {
        group::<WIDTH, ELECT, O>(block, lanes, draws, finish, j, &mut out[j..j + WIDTH]);
        j += WIDTH;
    }
    // The last entries one at a time, by the same steps.
    while j < len {
        group::<1, ELECT, O>(block, lanes, draws, finish, j, &mut out[j..j + 1]);
        j += 1;
    }
}

/// Entries `first..first + N` of the block through every model.
#[inline(always)]
fn group<const N: usize, const ELECT: bool, O: Operands>(
    block: &O,
    lanes: &[ModelLane],
    draws: &[f64],
    finish: Finish,
    first: usize,
    out: &mut [f64],
) {
    let len = block.len();
    let values = |v: O::Values<'_>| -> [f64; N] { std::array::from_fn(|l| v.at(first + l)) };
    let base = values(block.base());
    let mut sums = Sums {
        total: [0.0; WIDTH],
        positive: [0.0; WIDTH],
        negative: [0.0; WIDTH],
        positive_weight: [0.0; WIDTH],
        negative_weight: [0.0; WIDTH],
    };
    for (i, lane) in lanes.iter().enumerate() {
        let add = AddModel::<N, ELECT> {
            sums,
            model: values(block.model(i)),
            base,
            factor: lane.factor,
            w: lane.weight,
            first,
        };
        sums = lane.lane.with_thin(&draws[i * len..(i + 1) * len], add);
    }
    let s = sums;
    for l in 0..N {
        let delta = if ELECT {
            // The sign of the sum is elected (zero counts as +); the
            // contributions of that sign and their weights remain.
            let (kept, weight) = if s.total[l] >= 0.0 {
                (s.positive[l], s.positive_weight[l])
            } else {
                (s.negative[l], s.negative_weight[l])
            };
            if finish.normalize {
                kept / if weight == 0.0 { 1.0 } else { weight }
            } else {
                kept
            }
        } else {
            s.total[l] / finish.divisor
        };
        out[l] = base[l] + finish.scale * delta;
    }
}

/// Adds one model's weighted, thinned deltas of a group (entries
/// `first..first + N`) to the sums: x = thin(m − b) · factor · w.
struct AddModel<const N: usize, const ELECT: bool> {
    sums: Sums,
    model: [f64; N],
    base: [f64; N],
    factor: f64,
    w: f64,
    first: usize,
}

impl<const N: usize, const ELECT: bool> ThinLoop for AddModel<N, ELECT> {
    type Output = Sums;

    #[inline(always)]
    fn run(self, thin: impl Fn(usize, f64) -> f64) -> Sums {
        let (mut s, w) = (self.sums, self.w);
        for l in 0..N {
            let x = thin(self.first + l, self.model[l] - self.base[l]) * self.factor * w;
            s.total[l] += x;
            if ELECT {
                s.positive[l] += keep_or_zero(x, x > 0.0);
                s.negative[l] += keep_or_zero(x, x < 0.0);
                s.positive_weight[l] += keep_or_zero(w, x > 0.0);
                s.negative_weight[l] += keep_or_zero(w, x < 0.0);
            }
        }
        s
    }
}

/// The same groups in AVX2 registers, four entries at a time: compilers do
/// not keep the portable form's five running sums in registers across the
/// loop over models. Each step is the portable form's operation on four
/// lanes (comparisons are ordered and quiet, as Rust's), so the values are
/// bit-identical.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Finish, Lane, ModelLane};
    use crate::methods::operands::{Operands, Values};
    use std::arch::x86_64::*;

    /// Entries `0..out.len()` (a multiple of 4) of the block.
    ///
    /// # Safety
    /// The CPU has AVX2, and the base and every model hold `block.len()`
    /// entries.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn groups<const ELECT: bool, O: Operands>(
        block: &O,
        lanes: &[ModelLane],
        draws: &[f64],
        finish: Finish,
        out: &mut [f64],
    ) {
        let len = block.len();
        assert!(out.len().is_multiple_of(4) && out.len() <= len);
        assert!(draws.len() >= lanes.len() * len);
        let zero = _mm256_setzero_pd();
        let one = _mm256_set1_pd(1.0);
        let magnitude = _mm256_set1_epi64x(i64::MAX);
        let scale = _mm256_set1_pd(finish.scale);
        let divisor = _mm256_set1_pd(finish.divisor);
        let mut j = 0;
        while j < out.len() {
            // SAFETY (every load and store below): j + 4 <= out.len() <=
            // len, and every input holds len entries (the caller's promise).
            let base = block.base().four(j);
            let (mut total, mut positive, mut negative) = (zero, zero, zero);
            let (mut positive_weight, mut negative_weight) = (zero, zero);
            for (i, lane) in lanes.iter().enumerate() {
                let model = block.model(i).four(j);
                let d = _mm256_sub_pd(model, base);
                let key = _mm256_and_si256(_mm256_castpd_si256(d), magnitude);
                let kept_by =
                    |dropped_up_to: i64| _mm256_cmpgt_epi64(key, _mm256_set1_epi64x(dropped_up_to));
                let thinned = match lane.lane {
                    Lane::Keep => d,
                    Lane::Drop => zero,
                    Lane::Above(cut) => {
                        _mm256_and_pd(d, _mm256_castsi256_pd(kept_by(cut.dropped_up_to())))
                    }
                    Lane::Band { outer, inner } => {
                        let keep = _mm256_andnot_si256(
                            kept_by(inner.dropped_up_to()),
                            kept_by(outer.dropped_up_to()),
                        );
                        _mm256_and_pd(d, _mm256_castsi256_pd(keep))
                    }
                    Lane::Random { p, scale } => {
                        let u = _mm256_loadu_pd(draws.as_ptr().add(i * len + j));
                        let keep = _mm256_cmp_pd::<_CMP_LT_OQ>(u, _mm256_set1_pd(p));
                        _mm256_and_pd(_mm256_mul_pd(d, _mm256_set1_pd(scale)), keep)
                    }
                };
                let w = _mm256_set1_pd(lane.weight);
                let x = _mm256_mul_pd(_mm256_mul_pd(thinned, _mm256_set1_pd(lane.factor)), w);
                total = _mm256_add_pd(total, x);
                if ELECT {
                    let up = _mm256_cmp_pd::<_CMP_GT_OQ>(x, zero);
                    let down = _mm256_cmp_pd::<_CMP_LT_OQ>(x, zero);
                    positive = _mm256_add_pd(positive, _mm256_and_pd(x, up));
                    negative = _mm256_add_pd(negative, _mm256_and_pd(x, down));
                    positive_weight = _mm256_add_pd(positive_weight, _mm256_and_pd(w, up));
                    negative_weight = _mm256_add_pd(negative_weight, _mm256_and_pd(w, down));
                }
            }
            let delta = if ELECT {
                let plus = _mm256_cmp_pd::<_CMP_GE_OQ>(total, zero);
                let kept = _mm256_blendv_pd(negative, positive, plus);
                let weight = _mm256_blendv_pd(negative_weight, positive_weight, plus);
                if finish.normalize {
                    let none = _mm256_cmp_pd::<_CMP_EQ_OQ>(weight, zero);
                    _mm256_div_pd(kept, _mm256_blendv_pd(weight, one, none))
                } else {
                    kept
                }
            } else {
                _mm256_div_pd(total, divisor)
            };
            let merged = _mm256_add_pd(base, _mm256_mul_pd(scale, delta));
            _mm256_storeu_pd(out.as_mut_ptr().add(j), merged);
            j += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::inputs::Block;
    use crate::methods::operands::Bf16Block;
    use crate::simd::{with_variant, Variant};
    use crate::testdata::{noise, stored_bf16};

    /// The merged value of entry `j`, straight from the definition in
    /// [`super::super::gta`], one entry at a time in f64.
    fn reference(
        block: &Block<'_>,
        lanes: &[ModelLane],
        draws: &[f64],
        finish: Finish,
        elect: bool,
        j: usize,
    ) -> f64 {
        let b = block.base[j];
        let kept = |i: usize, lane: &Lane, d: f64| -> f64 {
            let magnitude = d.abs().to_bits();
            match *lane {
                Lane::Keep => d,
                Lane::Drop => 0.0,
                Lane::Above(t) => {
                    if t.keeps(magnitude) {
                        d
                    } else {
                        0.0
                    }
                }
                Lane::Band { outer, inner } => {
                    if outer.keeps(magnitude) && !inner.keeps(magnitude) {
                        d
                    } else {
                        0.0
                    }
                }
                Lane::Random { p, scale } => {
                    if draws[i * block.len + j] < p {
                        d * scale
                    } else {
                        0.0
                    }
                }
            }
        };
        let x: Vec<(f64, f64)> = lanes
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    kept(i, &l.lane, block.delta(i, j)) * l.factor * l.weight,
                    l.weight,
                )
            })
            .collect();
        let total = x.iter().fold(0.0, |s, (v, _)| s + v);
        let delta = if elect {
            let agrees = |v: f64| if total >= 0.0 { v > 0.0 } else { v < 0.0 };
            let (mut sum, mut weight) = (0.0, 0.0);
            for &(v, w) in &x {
                if agrees(v) {
                    sum += v;
                    weight += w;
                } else {
                    sum += 0.0;
                    weight += 0.0;
                }
            }
            if finish.normalize && weight != 0.0 {
                sum / weight
            } else {
                sum
            }
        } else {
            total / finish.divisor
        };
        b + finish.scale * delta
    }

    #[test]
    fn both_forms_equal_the_definition_bit_for_bit() {
        // Not a multiple of the group widths, so the tail runs too.
        let len = 2048 + 3;
        let base: Vec<f64> = noise(1, len, 0.05);
        let mut models = Vec::new();
        for (i, scale) in [1e-2, 3e-3, 1e-2, 2e-2, 5e-3].iter().enumerate() {
            let d = noise(10 + i as u64, len, 1.0);
            models.extend(base.iter().zip(&d).enumerate().map(|(j, (b, d))| {
                // Some exact zeros and repeated magnitudes at the cuts.
                match j % 13 {
                    0 => *b,
                    1 => b + 0.0078125,
                    2 => b - 0.0078125,
                    _ => b + d * scale,
                }
            }));
        }
        // A NaN and an infinity in one model.
        models[3 * len + 7] = f64::NAN;
        models[3 * len + 8] = f64::INFINITY;
        // Stored as bf16: the words, and the values they decode to.
        let (base_words, base) = stored_bf16(&base);
        let (model_words, models) = stored_bf16(&models);
        let block = Block {
            first: 0,
            len,
            base: &base,
            models: &models,
            finite: false,
        };
        let model_words: Vec<&[u16]> = model_words.chunks(len).collect();
        let words = Bf16Block {
            first: 0,
            len,
            base: &base_words,
            models: &model_words,
        };
        // Every model's draws, different per model, so that reading
        // another model's would show.
        let draws: Vec<f64> = noise(99, 5 * len, 1.0).iter().map(|u| u.abs()).collect();
        let at = |v: f64| v.to_bits();
        let lanes = [
            ModelLane {
                lane: Lane::Above(Threshold::new(at(0.0078125), true)),
                factor: 1.0,
                weight: 0.7,
            },
            ModelLane {
                lane: Lane::Band {
                    outer: Threshold::new(at(0.001), false),
                    inner: Threshold::new(at(0.0078125), false),
                },
                factor: 1.3,
                weight: -0.4,
            },
            ModelLane {
                lane: Lane::Random {
                    p: 0.3,
                    scale: 1.0 / 0.3,
                },
                factor: 1.0,
                weight: 1.1,
            },
            ModelLane {
                lane: Lane::Keep,
                factor: 1.0,
                weight: 0.5,
            },
            ModelLane {
                lane: Lane::Drop,
                factor: 1.0,
                weight: 0.9,
            },
        ];
        for normalize in [false, true] {
            let finish = Finish {
                normalize,
                divisor: if normalize { 2.8 } else { 1.0 },
                scale: 0.9,
            };
            for elect in [false, true] {
                let want: Vec<f64> = (0..len)
                    .map(|j| reference(&block, &lanes, &draws, finish, elect, j))
                    .collect();
                fn run<O: Operands>(
                    block: &O,
                    lanes: &[ModelLane],
                    draws: &[f64],
                    finish: Finish,
                    elect: bool,
                ) -> Vec<f64> {
                    let mut out = vec![0.0; block.len()];
                    if elect {
                        combine::<true, O>(block, lanes, draws, finish, &mut out);
                    } else {
                        combine::<false, O>(block, lanes, draws, finish, &mut out);
                    }
                    out
                }
                for variant in [Variant::Scalar, Variant::Avx2] {
                    let (decoded, _) =
                        with_variant(variant, || run(&block, &lanes, &draws, finish, elect));
                    let (from_words, _) =
                        with_variant(variant, || run(&words, &lanes, &draws, finish, elect));
                    for (got, form) in [(decoded, "f64"), (from_words, "bf16")] {
                        for j in 0..len {
                            let (g, w) = (got[j], want[j]);
                            assert!(
                                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                                "{variant:?} {form} elect {elect} normalize {normalize} \
                                 entry {j}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
