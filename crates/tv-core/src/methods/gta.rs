//! Generalised task arithmetic: task_arithmetic, ties, dare_linear,
//! dare_ties, magnitude_prune, breadcrumbs, breadcrumbs_ties, della and
//! della_linear, as mergekit defines them.
//!
//! Per element, with weights w_i and each model's thinned delta s_i (see
//! [`super::sparsify`]): v_i = w_i s_i. Without sign election the merged
//! delta is Σ v_i, normalised by Σ w_i (left as is when |Σ w_i| < 1e-8).
//! With election (the `ties` variants and `della`) the sign S of Σ v_i is
//! elected (zero counts as +), the merged delta is the sum of the v_i whose
//! sign is S (a zero never agrees), normalised by the sum of their weights
//! (1 when none agree). The result is b + λ · delta.

use super::fused::{self, Finish, Lane, ModelLane};
use super::inputs::{Block, TensorInputs};
use super::operands::{Bf16Block, Operands};
use super::sparsify::{ModelCut, Sparsifier};
use super::{Method, MethodSettings, Scratch, Sparsification, TensorParams};
use crate::error::Result;
use crate::simd::keep_or_zero;

/// A method of the family, with its whole-model cuts when the density
/// scope is the model.
pub(crate) struct Gta {
    pub settings: MethodSettings,
    pub sparsification: Option<Sparsification>,
    pub elect: bool,
    pub model_cuts: Option<Vec<ModelCut>>,
}

impl Gta {
    /// The method `settings.kind`, which must be of this family.
    pub fn new(settings: MethodSettings, model_cuts: Option<Vec<ModelCut>>) -> Self {
        Self {
            settings,
            sparsification: settings.kind.sparsification(),
            elect: settings.kind.elects_sign(),
            model_cuts,
        }
    }
}

impl Gta {
    /// The combine in [`super::fused`]'s element-major form, when every
    /// model's thinning of the block is one test for every entry; false
    /// (nothing written) otherwise.
    #[inline(always)]
    fn combine_fused<O: Operands>(
        &self,
        sparsifiers: &[Sparsifier],
        t: &TensorInputs<'_>,
        p: &TensorParams,
        block: &O,
        scratch: &mut Scratch,
        out: &mut [f64],
    ) -> bool {
        let len = block.len();
        scratch.draws.resize(t.models.len() * len, 0.0);
        let mut draws = scratch.draws.chunks_mut(len.max(1));
        scratch.lanes.clear();
        for (i, &(m, _)) in t.models.iter().enumerate() {
            let weight = p.weight[m];
            let model_lane = match sparsifiers.get(i) {
                Some(s) => {
                    match s.lane(t, block.first(), draws.next().expect("a buffer per model")) {
                        Some(lane) => ModelLane {
                            lane,
                            factor: s.factor,
                            weight,
                        },
                        None => return false,
                    }
                }
                // Multiplying by a factor of 1 is exact.
                None => ModelLane {
                    lane: Lane::Keep,
                    factor: 1.0,
                    weight,
                },
            };
            scratch.lanes.push(model_lane);
        }
        let finish = Finish {
            normalize: self.settings.normalize,
            divisor: self.divisor(t, p),
            scale: p.scale,
        };
        let (lanes, draws) = (&scratch.lanes, &scratch.draws);
        if self.elect {
            fused::combine::<true, O>(block, lanes, draws, finish, out);
        } else {
            fused::combine::<false, O>(block, lanes, draws, finish, out);
        }
        true
    }

    /// The divisor of the summed deltas without sign election: Σ w_i when
    /// normalising (unless it is within 1e-8 of zero), else 1.
    fn divisor(&self, t: &TensorInputs<'_>, p: &TensorParams) -> f64 {
        let weight_sum = t.models.iter().fold(0.0, |s, &(m, _)| s + p.weight[m]);
        if self.settings.normalize && weight_sum.abs() >= 1e-8 {
            weight_sum
        } else {
            1.0
        }
    }
}

impl Method for Gta {
    type State = Vec<Sparsifier>;

    fn rows(&self) -> bool {
        self.sparsification == Some(Sparsification::DellaMagprune)
    }

    fn prepare(&self, t: &TensorInputs<'_>, p: &TensorParams) -> Result<Self::State> {
        match self.sparsification {
            None => Ok(Vec::new()),
            Some(kind) => {
                Sparsifier::for_tensor(kind, &self.settings, t, p, self.model_cuts.as_deref())
            }
        }
    }

    /// The element-major combine on the stored words (AVX2 only: the
    /// portable form gains nothing over decoding).
    #[inline(always)]
    fn combine_bf16(
        &self,
        sparsifiers: &Self::State,
        t: &TensorInputs<'_>,
        p: &TensorParams,
        block: &Bf16Block<'_>,
        scratch: &mut Scratch,
        out: &mut [f64],
    ) -> bool {
        super::operands::avx2() && self.combine_fused(sparsifiers, t, p, block, scratch, out)
    }

    #[inline(always)]
    fn combine(
        &self,
        sparsifiers: &Self::State,
        t: &TensorInputs<'_>,
        p: &TensorParams,
        block: &Block<'_>,
        scratch: &mut Scratch,
        out: &mut [f64],
    ) {
        let (k, len) = (t.models.len(), block.len);
        if self.combine_fused(sparsifiers, t, p, block, scratch, out) {
            return;
        }
        // Model-major v_i = w_i s_i; loops run model by model over the
        // block so they vectorise.
        let mut v = std::mem::take(&mut scratch.c);
        let mut total = std::mem::take(&mut scratch.total);
        v.resize(k * len, 0.0);
        total.clear();
        total.resize(len, 0.0);
        // Only a thinning that is not one test for every entry of the block
        // (DELLA's, or a cut where its kept ties run out) comes here: every
        // model then has a sparsifier.
        for (i, &(m, _)) in t.models.iter().enumerate() {
            let vi = &mut v[i * len..(i + 1) * len];
            sparsifiers[i].accumulate(t, i, p.weight[m], block, scratch, vi, &mut total);
        }
        if self.elect {
            // Only the entries that agree with the elected sign count.
            out.fill(0.0);
            let mut divisor = std::mem::take(&mut scratch.divisor);
            divisor.clear();
            divisor.resize(len, 0.0);
            for (i, &(m, _)) in t.models.iter().enumerate() {
                let w = p.weight[m];
                let vi = &v[i * len..(i + 1) * len];
                for (((o, d), &x), &s) in out.iter_mut().zip(divisor.iter_mut()).zip(vi).zip(&total)
                {
                    let agrees = if s >= 0.0 { x > 0.0 } else { x < 0.0 };
                    *o += keep_or_zero(x, agrees);
                    *d += keep_or_zero(w, agrees);
                }
            }
            for ((o, &d), &b) in out.iter_mut().zip(&divisor).zip(block.base) {
                let delta = if self.settings.normalize {
                    *o / if d == 0.0 { 1.0 } else { d }
                } else {
                    *o
                };
                *o = b + p.scale * delta;
            }
            scratch.divisor = divisor;
        } else {
            let divisor = self.divisor(t, p);
            for ((o, &s), &b) in out.iter_mut().zip(&total).zip(block.base) {
                *o = b + p.scale * (s / divisor);
            }
        }
        scratch.c = v;
        scratch.total = total;
    }
}
