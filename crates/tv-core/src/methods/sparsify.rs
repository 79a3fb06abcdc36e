//! Thinning a task vector before it is combined: TIES' magnitude trim,
//! Breadcrumbs' outlier-and-small trim, DARE's random drop and DELLA's
//! rank-dependent drop, each with its rescaling.
//!
//! [`Sparsifier::for_tensor`] decides, per model of a tensor, which entries
//! survive (running the exact selection of [`super::select`] when a
//! magnitude threshold is needed, and a pass for L1 sums when rescaling to
//! the L1 norm); [`Sparsifier::accumulate`] then writes a block's thinned,
//! weighted deltas (in one loop for the common masks, through
//! [`Sparsifier::apply`] for the others). Both the pre-pass (with weight 1)
//! and the merge call `accumulate`, so the entries counted for the L1 norm
//! are exactly the entries merged.

use super::fused::{Lane, ThinLoop};
use super::inputs::{fixed_parts, Block, TensorInputs, Visit, BLOCK};
use super::rng::Draws;
use super::select::{self, Cut, Target};
use super::{DellaScratch, MethodSettings, Rescale, Scratch, Sparsification, TensorParams};
use crate::error::{Error, Result};
use crate::simd::keep_or_zero;
use std::sync::Arc;

/// Which entries of one model's task vector survive.
#[derive(Debug, Clone)]
pub(crate) enum Mask {
    All,
    Nothing,
    /// The entries a magnitude cut keeps.
    Top(Arc<Cut>),
    /// Kept by `outer` and not by `inner` (Breadcrumbs: the largest are
    /// dropped as outliers).
    Window {
        outer: Arc<Cut>,
        inner: Arc<Cut>,
    },
    /// Each entry kept with probability `p`.
    Random {
        p: f64,
        draws: Draws,
    },
    /// Kept with probability (ρ − ε) + 2ε · (rank of |d| in its row)/(row − 1):
    /// `by_rank`, one entry per rank of the tensor's rows.
    Della {
        by_rank: Arc<[f64]>,
        draws: Draws,
    },
}

/// One model's thinning of one tensor.
#[derive(Debug, Clone)]
pub(crate) struct Sparsifier {
    pub mask: Mask,
    /// Divide kept entries by their keep probability.
    pub inverse: bool,
    /// Factor restoring the L1 norm (1 without L1 rescaling).
    pub factor: f64,
}

/// A mask that may wait for the selection of its cuts.
#[derive(Debug)]
pub(crate) enum Pending {
    Ready(Mask),
    /// The cut of target `.0`.
    Top(usize),
    /// Kept by target `.0`'s cut and not by target `.1`'s.
    Window(usize, usize),
}

impl Pending {
    /// The mask of model `model` for a magnitude sparsification at density
    /// `rho` (and `gamma`) over `n` entries, pushing the cuts it needs onto
    /// `targets`: TIES' top max(1, ⌊ρn⌋), or Breadcrumbs' window.
    pub fn magnitude(
        kind: Sparsification,
        model: usize,
        rho: f64,
        gamma: f64,
        n: u64,
        targets: &mut Vec<Target>,
    ) -> Self {
        if rho >= 1.0 || n == 0 {
            return Pending::Ready(Mask::All);
        }
        if kind == Sparsification::Magnitude {
            // The one rule, shared with the analysis' trim energy.
            let rank = crate::magnitude::kept_count(rho, n);
            if rank == 0 {
                return Pending::Ready(Mask::Nothing);
            }
            targets.push(Target { model, rank });
            return Pending::Top(targets.len() - 1);
        }
        let (drop, keep) = outlier_window(rho, gamma, n);
        if keep == 0 {
            return Pending::Ready(Mask::Nothing);
        }
        targets.push(Target {
            model,
            rank: drop + keep,
        });
        targets.push(Target { model, rank: drop });
        Pending::Window(targets.len() - 2, targets.len() - 1)
    }

    /// The mask, given the cuts selected for the targets.
    pub fn resolve(self, cuts: &[Arc<Cut>]) -> Mask {
        match self {
            Pending::Ready(mask) => mask,
            Pending::Top(k) => Mask::Top(Arc::clone(&cuts[k])),
            Pending::Window(outer, inner) => Mask::Window {
                outer: Arc::clone(&cuts[outer]),
                inner: Arc::clone(&cuts[inner]),
            },
        }
    }
}

/// Whole-model cuts of one model, for `--density-scope model`.
#[derive(Debug, Clone)]
pub(crate) struct ModelCut {
    pub model: usize,
    pub mask: Mask,
}

impl Sparsifier {
    /// Decides the thinning of every model of `t`. `model_cuts` holds the
    /// whole-model masks when the density scope is the model.
    pub fn for_tensor(
        kind: Sparsification,
        settings: &MethodSettings,
        t: &TensorInputs<'_>,
        p: &TensorParams,
        model_cuts: Option<&[ModelCut]>,
    ) -> Result<Vec<Sparsifier>> {
        let n = t.numel() as u64;
        let mut masks = Vec::with_capacity(t.models.len());
        // Magnitude targets of every model, selected together.
        let mut targets: Vec<Target> = Vec::new();
        for &(m, _) in &t.models {
            let rho = p.density[m];
            let pending = if let Some(cuts) = model_cuts {
                let cut = cuts.iter().find(|c| c.model == m).expect("cut per model");
                Pending::Ready(cut.mask.clone())
            } else if rho >= 1.0 {
                Pending::Ready(Mask::All)
            } else {
                match kind {
                    Sparsification::Magnitude | Sparsification::MagnitudeOutliers => {
                        Pending::magnitude(kind, m, rho, p.gamma[m], n, &mut targets)
                    }
                    Sparsification::Random if rho <= 0.0 => Pending::Ready(Mask::Nothing),
                    Sparsification::Random => Pending::Ready(Mask::Random {
                        p: rho,
                        draws: Draws::new(settings.seed, m, t.name),
                    }),
                    Sparsification::DellaMagprune if rho <= 0.0 => Pending::Ready(Mask::Nothing),
                    Sparsification::DellaMagprune => {
                        let eps = p.epsilon[m];
                        check_della(t.name, rho, eps)?;
                        Pending::Ready(Mask::Della {
                            by_rank: keep_probabilities(t.row_len(), rho, eps),
                            draws: Draws::new(settings.seed, m, t.name),
                        })
                    }
                }
            };
            masks.push(pending);
        }
        let cuts: Vec<Arc<Cut>> = if targets.is_empty() {
            Vec::new()
        } else {
            select::select(std::slice::from_ref(t), &targets)?
                .into_iter()
                .map(Arc::new)
                .collect()
        };
        let mut out: Vec<Sparsifier> = masks
            .into_iter()
            .map(|pending| Sparsifier {
                mask: pending.resolve(&cuts),
                inverse: settings.rescale == Rescale::Inverse,
                factor: 1.0,
            })
            .collect();
        if settings.rescale == Rescale::L1 {
            let factors = l1_factors(t, &out)?;
            for (s, f) in out.iter_mut().zip(factors) {
                s.factor = f;
            }
        }
        Ok(out)
    }

    /// Writes model `i`'s thinned and rescaled deltas of `block` into `out`.
    /// A [`Mask::Della`] needs a block of whole rows of `row_len`.
    #[inline(always)]
    pub fn apply(
        &self,
        t: &TensorInputs<'_>,
        i: usize,
        block: &Block<'_>,
        scratch: &mut Scratch,
        out: &mut [f64],
    ) {
        for ((o, &m), &b) in out.iter_mut().zip(block.model(i)).zip(block.base) {
            *o = m - b;
        }
        match &self.mask {
            Mask::All => {}
            Mask::Nothing => out.fill(0.0),
            Mask::Top(cut) => cut.apply(t.ordinal, block.first, out),
            Mask::Window { outer, inner } => {
                outer.apply_without(inner, t.ordinal, block.first, out)
            }
            Mask::Random { p, draws } => {
                scratch.a.resize(block.len, 0.0);
                draws.fill(block.first, &mut scratch.a);
                let scale = if self.inverse { 1.0 / p } else { 1.0 };
                for (o, &u) in out.iter_mut().zip(&scratch.a) {
                    *o = keep_or_zero(*o * scale, u < *p);
                }
            }
            Mask::Della { by_rank, draws } => {
                scratch.a.resize(block.len, 0.0);
                draws.fill(block.first, &mut scratch.a);
                let row = t.row_len();
                for (r, out) in out.chunks_mut(row).enumerate() {
                    let draws = &scratch.a[r * row..r * row + out.len()];
                    della_row(out, draws, by_rank, self.inverse, &mut scratch.della);
                }
            }
        }
        if self.factor != 1.0 {
            for o in out.iter_mut() {
                *o *= self.factor;
            }
        }
    }
}

impl Sparsifier {
    /// This model's thinning of the block from entry `first` as one test
    /// for every entry, when it is one (not for DELLA, nor in the one block
    /// where a cut's kept ties run out). A random mask's draws are written
    /// into `draws`, a buffer of the block's length.
    #[inline(always)]
    pub fn lane(&self, t: &TensorInputs<'_>, first: usize, draws: &mut [f64]) -> Option<Lane> {
        let here = first / BLOCK;
        Some(match &self.mask {
            Mask::All => Lane::Keep,
            Mask::Nothing => Lane::Drop,
            Mask::Top(cut) => Lane::Above(cut.threshold(t.ordinal, here)?),
            Mask::Window { outer, inner } => Lane::Band {
                outer: outer.threshold(t.ordinal, here)?,
                inner: inner.threshold(t.ordinal, here)?,
            },
            Mask::Random { p, draws: source } => {
                source.fill(first, draws);
                Lane::Random {
                    p: *p,
                    scale: if self.inverse { 1.0 / p } else { 1.0 },
                }
            }
            Mask::Della { .. } => return None,
        })
    }

    /// Writes `w` times model `i`'s thinned and rescaled deltas of `block`
    /// into `v` and adds them to `total`: what [`apply`](Self::apply)
    /// followed by a product and a sum computes, in one loop over the block
    /// where the thinning is a [`Lane`] (the operations and their order are
    /// the same, so the values are too; multiplying by a factor of 1 is
    /// exact).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn accumulate(
        &self,
        t: &TensorInputs<'_>,
        i: usize,
        w: f64,
        block: &Block<'_>,
        scratch: &mut Scratch,
        v: &mut [f64],
        total: &mut [f64],
    ) {
        scratch.a.resize(block.len, 0.0);
        if let Some(lane) = self.lane(t, block.first, &mut scratch.a) {
            let sum = WeightedSum {
                models: block.model(i),
                base: block.base,
                factor: self.factor,
                w,
                v,
                total,
            };
            return lane.with_thin(&scratch.a, sum);
        }
        self.apply(t, i, block, scratch, v);
        for (x, s) in v.iter_mut().zip(total.iter_mut()) {
            *x *= w;
            *s += *x;
        }
    }
}

/// One model's deltas of a block into its weighted, thinned values and the
/// running sum, for [`Sparsifier::accumulate`]: v_j = thin(j, m_j − b_j) ·
/// factor · w, and total_j += v_j.
struct WeightedSum<'a> {
    models: &'a [f64],
    base: &'a [f64],
    factor: f64,
    w: f64,
    v: &'a mut [f64],
    total: &'a mut [f64],
}

impl ThinLoop for WeightedSum<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self, thin: impl Fn(usize, f64) -> f64) {
        let (factor, w) = (self.factor, self.w);
        let pairs = self.models.iter().zip(self.base);
        let sums = self.v.iter_mut().zip(self.total.iter_mut());
        for (j, ((x, s), (&m, &b))) in sums.zip(pairs).enumerate() {
            *x = thin(j, m - b) * factor * w;
            *s += *x;
        }
    }
}

/// DELLA's keep probabilities ρ ± ε must lie inside (0, 1) when it drops
/// anything (0 < ρ < 1); checked when the merge is planned, and again
/// where the mask is made.
pub(crate) fn check_della(tensor: &str, rho: f64, eps: f64) -> Result<()> {
    if rho <= 0.0 || rho >= 1.0 || (rho - eps > 0.0 && rho + eps < 1.0) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "tensor '{tensor}': della needs density ± epsilon inside (0, 1), got density {rho} \
         and epsilon {eps}"
    )))
}

/// ⌊ρn⌋, the number of entries a density keeps.
pub(crate) fn keep_count(rho: f64, n: u64) -> u64 {
    ((rho * n as f64).floor() as u64).min(n)
}

/// Breadcrumbs: (entries dropped from the top, entries kept below them):
/// ⌊γn⌋ and ⌊ρn⌋, the top part shrunk when both do not fit (mergekit).
pub(crate) fn outlier_window(rho: f64, gamma: f64, n: u64) -> (u64, u64) {
    let keep = keep_count(rho.max(0.0), n);
    let drop = keep_count(gamma.max(0.0), n).min(n - keep);
    (drop, keep)
}

/// DELLA on one row: ranks by |d| ascending (equal magnitudes in index
/// order), keep probability `by_rank[rank]`, drop or keep by the draws.
/// Inlined so that it is compiled into the vectorised copy of the merge.
#[inline(always)]
fn della_row(
    row: &mut [f64],
    draws: &[f64],
    by_rank: &[f64],
    inverse: bool,
    buffers: &mut DellaScratch,
) {
    assert_eq!(row.len(), by_rank.len(), "a whole row");
    let DellaScratch {
        order,
        packed,
        probability,
    } = buffers;
    probability.clear();
    probability.resize(row.len(), 0.0);
    // Order by |d| bits, then index. When the magnitudes' low bits are free
    // (deltas of bf16 or f16 values usually leave them zero), the index is
    // packed into them and plain u64s are sorted, which is faster.
    let n = row.len();
    let index_bits = usize::BITS - (n.max(2) - 1).leading_zeros();
    let low = (1u64 << index_bits) - 1;
    if row.iter().all(|d| d.abs().to_bits() & low == 0) {
        packed.clear();
        packed.extend(
            row.iter()
                .enumerate()
                .map(|(j, d)| d.abs().to_bits() | j as u64),
        );
        packed.sort_unstable();
        for (&x, &p) in packed.iter().zip(by_rank) {
            probability[(x & low) as usize] = p;
        }
    } else {
        order.clear();
        order.extend(
            row.iter()
                .enumerate()
                .map(|(j, d)| (d.abs().to_bits(), j as u32)),
        );
        order.sort_unstable();
        for (&(_, j), &p) in order.iter().zip(by_rank) {
            probability[j as usize] = p;
        }
    }
    // Branch-free, so that it vectorises.
    for ((d, &u), &p) in row.iter_mut().zip(draws).zip(probability.iter()) {
        let kept = if inverse { *d / p } else { *d };
        *d = keep_or_zero(kept, u < p);
    }
}

/// DELLA's keep probability of each rank in a row of `n` entries:
/// (ρ − ε) + 2ε · rank/(n − 1) (rank scaled to 0.5 in a row of one). The
/// same for every row of a tensor, so made once per tensor and model.
fn keep_probabilities(n: usize, density: f64, epsilon: f64) -> Arc<[f64]> {
    let scaled = |rank: usize| {
        if n == 1 {
            0.5
        } else {
            rank as f64 / (n - 1) as f64
        }
    };
    (0..n)
        .map(|rank| (density - epsilon) + 2.0 * epsilon * scaled(rank))
        .collect()
}

/// Σ|d| and Σ|thinned d| per model.
struct L1Sums<'a, 'b> {
    t: &'a TensorInputs<'b>,
    sparsifiers: &'a [Sparsifier],
}

impl Visit for L1Sums<'_, '_> {
    /// Sums, scratch, the kept deltas, and a running sum the pass ignores.
    type Acc = (Vec<f64>, Scratch, Vec<f64>, Vec<f64>);

    #[inline(always)]
    fn visit(&self, (sums, scratch, kept, unused): &mut Self::Acc, block: &Block<'_>) {
        for (i, s) in self.sparsifiers.iter().enumerate() {
            kept.resize(block.len, 0.0);
            unused.resize(block.len, 0.0);
            // The merge's own step with weight 1 (exact): the entries summed
            // here are exactly the entries merged.
            s.accumulate(self.t, i, 1.0, block, scratch, kept, unused);
            sums[2 * i] += (0..block.len).map(|j| block.delta(i, j).abs()).sum::<f64>();
            sums[2 * i + 1] += kept.iter().map(|v| v.abs()).sum::<f64>();
        }
    }
}

/// The factor per model that brings the thinned tensor's L1 norm back to
/// the full one's (1 when either is below 1e-7, as mergekit does).
fn l1_factors(t: &TensorInputs<'_>, sparsifiers: &[Sparsifier]) -> Result<Vec<f64>> {
    let k = sparsifiers.len();
    let rows = sparsifiers
        .iter()
        .any(|s| matches!(s.mask, Mask::Della { .. }));
    let mut accs = fixed_parts(|| {
        let sums = vec![0f64; 2 * k];
        (sums, Scratch::default(), Vec::new(), Vec::new())
    });
    t.scan(rows, &mut accs, &L1Sums { t, sparsifiers })?;
    let mut sums = vec![0f64; 2 * k];
    for (s, _, _, _) in accs {
        for (a, b) in sums.iter_mut().zip(s) {
            *a += b;
        }
    }
    Ok((0..k)
        .map(|i| {
            let (before, after) = (sums[2 * i], sums[2 * i + 1]);
            if before < 1e-7 || after < 1e-7 {
                1.0
            } else {
                before / after
            }
        })
        .collect())
}
