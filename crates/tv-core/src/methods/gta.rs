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

use super::inputs::{Block, TensorInputs};
use super::sparsify::{ModelCut, Sparsifier};
use super::{Method, MethodSettings, Scratch, Sparsification, TensorParams};
use crate::error::Result;

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
        // v_i = w_i s_i, model-major in scratch.c.
        let mut v = std::mem::take(&mut scratch.c);
        v.resize(k * len, 0.0);
        for (i, &(m, _)) in t.models.iter().enumerate() {
            let vi = &mut v[i * len..(i + 1) * len];
            match sparsifiers.get(i) {
                Some(s) => s.apply(t, i, block, scratch, vi),
                None => {
                    for (j, x) in vi.iter_mut().enumerate() {
                        *x = block.delta(i, j);
                    }
                }
            }
            let w = p.weight[m];
            for x in vi.iter_mut() {
                *x *= w;
            }
        }
        let weights: Vec<f64> = t.models.iter().map(|&(m, _)| p.weight[m]).collect();
        let weight_sum: f64 = weights.iter().sum();
        for (j, o) in out.iter_mut().enumerate() {
            let mut delta;
            let mut divisor;
            if self.elect {
                let total: f64 = (0..k).map(|i| v[i * len + j]).sum();
                let positive = total >= 0.0;
                delta = 0.0;
                divisor = 0.0;
                for (i, w) in weights.iter().enumerate() {
                    let x = v[i * len + j];
                    if (positive && x > 0.0) || (!positive && x < 0.0) {
                        delta += x;
                        divisor += w;
                    }
                }
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                delta = (0..k).map(|i| v[i * len + j]).sum();
                divisor = if weight_sum.abs() < 1e-8 {
                    1.0
                } else {
                    weight_sum
                };
            }
            if self.settings.normalize {
                delta /= divisor;
            }
            *o = block.base[j] + p.scale * delta;
        }
        scratch.c = v;
    }
}
