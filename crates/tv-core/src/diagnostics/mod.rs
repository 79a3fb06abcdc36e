//! Merge diagnostics gathered during the analysis: sign conflicts between
//! task vectors, cosines by layer group with Model Stock's interpolation,
//! the energy trimming keeps at each density (per tensor and over the
//! whole task vector), each model's magnitude histogram, and the mass that
//! survives TIES' sign election; then [`suggest`]ed merge settings.
//!
//! The fused statistics pass gives each tensor's pairwise dot products and
//! sign agreement ([`crate::lanes::PairSigns`]); the per-model quantile
//! buffer gives its magnitude histogram ([`crate::magnitude`]). A
//! [`Collector`] adds them up tensor by tensor; [`Collector::finish`] runs
//! the sampled election pass ([`agreement`]) once the weights are known.
//! Every tensor is counted once, as stored. An adapter's task vector (ΔW,
//! expanded by the fused pass) counts exactly as a stored fine-tune's
//! m − base; a tensor an adapter leaves alone counts as a zero task vector.

pub mod agreement;
pub mod suggest;

use crate::error::Result;
use crate::family::Family;
use crate::kernels::DeltaAcc;
use crate::lanes::PairSigns;
use crate::magnitude::{kept_count, lower_edge, top_energy, Histogram, TensorMagnitudes};
use crate::methods::inputs::TensorInputs;
use crate::methods::model_stock::interpolation;
use crate::stats::group_of;
use agreement::{ties_agreement, TensorCuts};
pub use suggest::Suggestions;

/// The densities at which trimming is measured.
pub const DENSITIES: [f64; 8] = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9];

/// Each model's fraction of its task vector's energy (Σ d²) kept at each
/// of [`DENSITIES`]; None for a zero or non-finite task vector.
#[derive(Debug, Clone)]
pub struct TrimEnergy {
    /// Every tensor trimmed on its own.
    pub tensor: [Option<f64>; 8],
    /// One threshold over the whole task vector.
    pub model: [Option<f64>; 8],
}

/// Everything the diagnostics report.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    pub sign_conflict: Vec<Vec<f64>>,
    pub sign_conflict_weighted: Vec<Vec<f64>>,
    /// (group, K×K cosines), groups in natural order.
    pub cosine_by_layer: Vec<(String, Vec<Vec<f64>>)>,
    /// (group, t), None where Model Stock keeps the base.
    pub model_stock_t: Vec<(String, Option<f64>)>,
    pub trim_energy: Vec<TrimEnergy>,
    /// Per density, None when no weights or no mass.
    pub ties_agreement: [Option<f64>; 8],
    /// Elements per model the election pass sampled.
    pub ties_sampled: u64,
    /// The weights the election used (exp mode), or why there are none.
    pub ties_weights: std::result::Result<Vec<f64>, String>,
    pub histograms: Vec<Histogram>,
    pub suggestions: Suggestions,
}

/// Cosines from a K×K matrix of dot products; a zero (or non-finite)
/// vector has cosine 0 with everything, itself included.
pub fn cosine_matrix(dots: &[f64], k: usize) -> Vec<Vec<f64>> {
    (0..k)
        .map(|i| {
            (0..k)
                .map(|j| {
                    let denom = (dots[i * k + i] * dots[j * k + j]).sqrt();
                    if denom > 0.0 && denom.is_finite() {
                        dots[i * k + j] / denom
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Running sums of the diagnostics over the tensors.
pub(crate) struct Collector<'a> {
    k: usize,
    signs: Vec<PairSigns>,
    groups: Vec<(String, Vec<f64>)>,
    sum_sq: Vec<f64>,
    kept: Vec<[f64; 8]>,
    nonfinite: Vec<bool>,
    hist: Vec<Histogram>,
    cuts: Vec<TensorCuts<'a>>,
}

impl<'a> Collector<'a> {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            signs: vec![PairSigns::default(); k * k],
            groups: Vec::new(),
            sum_sq: vec![0.0; k],
            kept: vec![[0.0; 8]; k],
            nonfinite: vec![false; k],
            hist: vec![Histogram::default(); k],
            cuts: Vec::new(),
        }
    }

    /// Adds one tensor's fused-pass sums; `inputs` are the base and the
    /// models that store or adapt it, in the order of `acc` (an adapter's
    /// task vector entered the pass as a delta, exactly as a stored model's
    /// m − base). A model that leaves the tensor alone adds nothing here:
    /// see [`Collector::add_zero`].
    pub fn add_tensor(
        &mut self,
        inputs: TensorInputs<'a>,
        rows: crate::analyze::RowMaps<'a>,
        acc: &DeltaAcc,
    ) {
        let (k, ks) = (self.k, inputs.models.len());
        let group = group_of(inputs.name);
        let g = match self.groups.iter().position(|(n, _)| *n == group) {
            Some(g) => g,
            None => {
                self.groups.push((group, vec![0.0; k * k]));
                self.groups.len() - 1
            }
        };
        for (a, &(i, _)) in inputs.models.iter().enumerate() {
            for (b, &(j, _)) in inputs.models.iter().enumerate() {
                self.groups[g].1[i * k + j] += acc.dots[a * ks + b];
                self.signs[i * k + j].add(&acc.signs[a * ks + b]);
            }
            self.sum_sq[i] += acc.dots[a * ks + a];
            self.nonfinite[i] |= acc.models[a].nonfinite > 0;
        }
        // A tensor no model stores or adapts casts no vote: not read again.
        if ks > 0 {
            self.cuts.push(TensorCuts {
                inputs,
                taus: vec![[0.0; 8]; ks],
                rows,
            });
        }
    }

    /// Adds the magnitude histogram of the last tensor's source `slot`
    /// (model `model`).
    pub fn add_magnitudes(&mut self, slot: usize, model: usize, mags: &TensorMagnitudes) {
        let ks: Vec<u64> = DENSITIES
            .iter()
            .map(|&r| kept_count(r, mags.entries))
            .collect();
        let tops = top_energy(mags.buckets.iter().copied(), &ks);
        let cut = self.cuts.last_mut().expect("tensor added");
        for (r, &(energy, b)) in tops.iter().enumerate() {
            self.kept[model][r] += energy;
            cut.taus[slot][r] = lower_edge(b);
        }
        self.hist[model].add(mags);
    }

    /// Adds a tensor of `numel` elements that model `model` (an adapter)
    /// leaves alone: a zero task vector, as a stored model whose tensor
    /// equals the base's. Its dot products and sign agreement are zero,
    /// its histogram holds `numel` zeros, it keeps no energy, and it casts
    /// no vote in the election (a zero delta adds nothing to it), so it is
    /// not read again.
    pub fn add_zero(&mut self, model: usize, numel: u64) {
        self.hist[model].add(&TensorMagnitudes::zeros(numel));
    }

    /// The diagnostics, after the election pass over `family` with the
    /// exp-mode weights of `norms` (one global L2 norm per model).
    pub fn finish(self, family: &Family, norms: &[f64]) -> Result<Diagnostics> {
        let k = self.k;
        let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
        let matrix = |f: &dyn Fn(&PairSigns) -> f64| -> Vec<Vec<f64>> {
            (0..k)
                .map(|i| {
                    (0..k)
                        .map(|j| {
                            if i == j {
                                0.0
                            } else {
                                f(&self.signs[i * k + j])
                            }
                        })
                        .collect()
                })
                .collect()
        };
        let sign_conflict = matrix(&|s| ratio(s.conflict, s.both));
        let sign_conflict_weighted = matrix(&|s| ratio(s.weight_conflict, s.weight));
        let mut groups = self.groups;
        groups.sort_by_key(|(g, _)| crate::analyze::natural_key(g));
        // Model Stock's t per group, by the merge's own rule.
        let model_stock_t = groups
            .iter()
            .map(|(g, dots)| (g.clone(), interpolation(dots, k)))
            .collect();
        let cosine_by_layer: Vec<(String, Vec<Vec<f64>>)> = groups
            .into_iter()
            .map(|(g, dots)| (g, cosine_matrix(&dots, k)))
            .collect();
        let fraction = |kept: f64, total: f64, bad: bool| {
            let f = kept / total;
            (!bad && total > 0.0 && f.is_finite()).then_some(f.min(1.0))
        };
        let trim_energy = (0..k)
            .map(|i| {
                let total = self.sum_sq[i];
                let bad = self.nonfinite[i];
                let ks: Vec<u64> = DENSITIES
                    .iter()
                    .map(|&r| kept_count(r, self.hist[i].entries))
                    .collect();
                let model = top_energy(self.hist[i].descending(), &ks);
                TrimEnergy {
                    tensor: std::array::from_fn(|r| fraction(self.kept[i][r], total, bad)),
                    model: std::array::from_fn(|r| fraction(model[r].0, total, bad)),
                }
            })
            .collect::<Vec<_>>();
        let params = crate::weights::WeightParams::default();
        let ties_weights = crate::weights::lambdas_from_norms(&family.names, norms, params)
            .map_err(|e| e.to_string());
        let (ties_agreement, ties_sampled) = match &ties_weights {
            Ok(w) => {
                let a = ties_agreement(&self.cuts, w)?;
                (a.fractions(), a.sampled)
            }
            Err(_) => ([None; 8], 0),
        };
        let mut d = Diagnostics {
            sign_conflict,
            sign_conflict_weighted,
            cosine_by_layer,
            model_stock_t,
            trim_energy,
            ties_agreement,
            ties_sampled,
            ties_weights,
            histograms: self.hist,
            suggestions: Suggestions::default(),
        };
        d.suggestions = suggest::suggest(&d, &family.names, norms);
        Ok(d)
    }
}
