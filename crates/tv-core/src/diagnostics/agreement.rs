//! TIES' sign election on trimmed task vectors: how much of the weighted
//! mass survives it, a second (sampled) pass over the tensors.
//!
//! For each density ρ, every model's delta of a tensor is trimmed to the
//! entries with |d| ≥ τ, τ the lower edge of the magnitude bucket that
//! holds the tensor's k-th largest |d| (k = max(1, ⌊ρn⌋); see
//! [`crate::magnitude`]: τ is within 2^-10 of the exact threshold, and the
//! trim keeps the k largest plus the rest of that bucket). With weights
//! w_i, v_i = w_i · trimmed d_i; per element the elected sign S is the sign
//! of Σ v_i (zero counts as +), as in the merge's `ties`. The agreement is
//! Σ |v_i| over the v_i of sign S, divided by Σ |v_i|, over the sampled
//! elements of every tensor: the blocks of [`SAMPLE_BLOCK`] elements whose
//! index is a multiple of [`SAMPLE_EVERY`] (every tensor's first block, so
//! small tensors whole). Sums add the blocks in a fixed order.
//!
//! An adapter's task vector is expanded for each sampled block on its own
//! ([`TensorInputs::expand`]: the rows of s·B·A that cover it, in f64);
//! a tensor an adapter leaves alone is a zero task vector, which adds
//! nothing to any sum here, and is not among a tensor's inputs.

use super::DENSITIES;
use crate::analyze::model_segment;
use crate::dtype::decode_f64;
use crate::error::{Error, Result};
use crate::interrupt;
use crate::methods::inputs::{Expanded, ModelInput, TensorInputs};
use crate::simd::simd_dispatch;
use rayon::prelude::*;

/// Elements per sampled block.
pub const SAMPLE_BLOCK: usize = 2048;
/// One block in this many is sampled.
pub const SAMPLE_EVERY: usize = 32;
/// Sampled blocks per parallel task.
const BLOCKS_PER_TASK: usize = 16;
/// Blocks per segment of a tensor (released after use): 4M elements.
const SEGMENT_BLOCKS: usize = 2048;

const R: usize = DENSITIES.len();

/// One tensor's inputs and each source model's trim thresholds.
pub(crate) struct TensorCuts<'a> {
    /// The base's tensor and the models that store or adapt it.
    pub inputs: TensorInputs<'a>,
    /// Per source, the threshold τ for each density.
    pub taus: Vec<[f64; R]>,
    /// Per source, its rows matched by token (a resized embedding), read
    /// as the statistics pass reads them.
    pub rows: crate::analyze::RowMaps<'a>,
}

/// Mass and surviving mass per density, and the elements sampled.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Agreement {
    pub mass: [f64; R],
    pub kept: [f64; R],
    pub sampled: u64,
}

impl Agreement {
    fn add(&mut self, o: &Self) {
        for r in 0..R {
            self.mass[r] += o.mass[r];
            self.kept[r] += o.kept[r];
        }
        self.sampled += o.sampled;
    }

    /// kept / mass for each density; None where nothing was kept.
    pub fn fractions(&self) -> [Option<f64>; R] {
        std::array::from_fn(|r| {
            let f = self.kept[r] / self.mass[r];
            (self.mass[r] > 0.0 && f.is_finite()).then_some(f)
        })
    }
}

/// Runs the sampled election over `tensors` with model weights `weights`
/// (indexed by model).
pub(crate) fn ties_agreement(tensors: &[TensorCuts<'_>], weights: &[f64]) -> Result<Agreement> {
    let mut total = Agreement::default();
    for t in tensors {
        if interrupt::requested() {
            return Err(Error::Interrupted);
        }
        crate::guard::check()?;
        let numel = t.inputs.numel();
        let blocks = numel.div_ceil(SAMPLE_BLOCK);
        // Segments of SEGMENT_BLOCKS blocks, whose pages are released after use.
        let mut first = 0;
        while first < blocks {
            let last = (first + SEGMENT_BLOCKS).min(blocks);
            let sampled: Vec<usize> = (first..last).filter(|b| b % SAMPLE_EVERY == 0).collect();
            let parts: Vec<Agreement> = sampled
                .par_chunks(BLOCKS_PER_TASK)
                .map(|chunk| {
                    let mut acc = Agreement::default();
                    let mut scratch = Scratch::new(t.inputs.models.len());
                    for &b in chunk {
                        let start = b * SAMPLE_BLOCK;
                        let end = (start + SAMPLE_BLOCK).min(numel);
                        block(t, weights, start, end, &mut scratch, &mut acc)?;
                    }
                    Ok(acc)
                })
                .collect::<Result<_>>()?;
            for p in &parts {
                total.add(p);
            }
            t.inputs
                .release(first * SAMPLE_BLOCK, (last * SAMPLE_BLOCK).min(numel));
            first = last;
        }
    }
    Ok(total)
}

/// Buffers of one task.
struct Scratch {
    base: Vec<f64>,
    deltas: Vec<f64>,
    sum: Vec<f64>,
    expanded: Expanded,
}

impl Scratch {
    fn new(k: usize) -> Self {
        Self {
            base: vec![0.0; SAMPLE_BLOCK],
            deltas: vec![0.0; k * SAMPLE_BLOCK],
            sum: vec![0.0; SAMPLE_BLOCK],
            expanded: Expanded::default(),
        }
    }
}

/// Adds the election of elements `start..end` of tensor `t` to `acc`.
fn block(
    t: &TensorCuts<'_>,
    weights: &[f64],
    start: usize,
    end: usize,
    s: &mut Scratch,
    acc: &mut Agreement,
) -> Result<()> {
    let len = end - start;
    let inputs = &t.inputs;
    let base = &mut s.base[..len];
    decode_f64(inputs.base.ty, inputs.base.range(start, end), base);
    inputs.expand(start, end, &mut s.expanded)?;
    for (slot, ((_, m), rows)) in inputs.models.iter().zip(&t.rows).enumerate() {
        let d = &mut s.deltas[slot * SAMPLE_BLOCK..slot * SAMPLE_BLOCK + len];
        let is_delta = match (rows, m) {
            // Rows matched by token: the model's rows of the base's tokens.
            (Some(_), ModelInput::Stored(model)) => {
                let bytes = model_segment(&inputs.base, model, *rows, start, end);
                decode_f64(model.ty, &bytes, d);
                false
            }
            _ => {
                let op = m
                    .operand(slot, start, end, &s.expanded)
                    .expect("untouched tensors are not inputs");
                decode_f64(op.ty, op.bytes, d);
                op.is_delta
            }
        };
        if !is_delta {
            for (d, &b) in d.iter_mut().zip(base.iter()) {
                *d -= b;
            }
        }
    }
    acc.sampled += len as u64;
    let deltas = &s.deltas[..inputs.models.len() * SAMPLE_BLOCK];
    for r in 0..R {
        let cuts: Vec<(f64, f64)> = inputs
            .models
            .iter()
            .enumerate()
            .map(|(slot, &(i, _))| (weights[i], t.taus[slot][r]))
            .collect();
        let (mass, kept) = elect(deltas, len, &cuts, &mut s.sum[..len]);
        acc.mass[r] += mass;
        acc.kept[r] += kept;
    }
    Ok(())
}

simd_dispatch! {
    /// The election over one block: `deltas` holds each source's `len`
    /// deltas at a stride of [`SAMPLE_BLOCK`], `cuts` each source's weight
    /// and threshold; returns (Σ |v_i|, Σ |v_i| of the elected sign).
    fn elect(deltas: &[f64], len: usize, cuts: &[(f64, f64)], sum: &mut [f64]) -> (f64, f64)
        => elect_kernel
}

/// Lanes of the mass sums (so they vectorise; combined in a fixed order).
const L: usize = 16;

#[inline(always)]
fn elect_kernel(deltas: &[f64], len: usize, cuts: &[(f64, f64)], sum: &mut [f64]) -> (f64, f64) {
    #[inline(always)]
    fn weighted(d: f64, (w, tau): (f64, f64)) -> f64 {
        if d.abs() >= tau {
            w * d
        } else {
            0.0
        }
    }
    sum.fill(0.0);
    for (slot, &cut) in cuts.iter().enumerate() {
        let d = &deltas[slot * SAMPLE_BLOCK..slot * SAMPLE_BLOCK + len];
        for (x, &d) in sum.iter_mut().zip(d) {
            *x += weighted(d, cut);
        }
    }
    let (mut mass, mut kept) = ([0.0f64; L], [0.0f64; L]);
    #[inline(always)]
    fn one(x: f64, v: f64) -> (f64, f64) {
        let agrees = if x >= 0.0 { v > 0.0 } else { v < 0.0 };
        let a = v.abs();
        (a, if agrees { a } else { 0.0 })
    }
    let (mut tail_mass, mut tail_kept) = (0.0, 0.0);
    for (slot, &cut) in cuts.iter().enumerate() {
        let d = &deltas[slot * SAMPLE_BLOCK..slot * SAMPLE_BLOCK + len];
        let (cs, cd) = (sum.chunks_exact(L), d.chunks_exact(L));
        for (&x, &d) in cs.remainder().iter().zip(cd.remainder()) {
            let (m, k) = one(x, weighted(d, cut));
            tail_mass += m;
            tail_kept += k;
        }
        for (xs, ds) in cs.zip(cd) {
            for l in 0..L {
                let (m, k) = one(xs[l], weighted(ds[l], cut));
                mass[l] += m;
                kept[l] += k;
            }
        }
    }
    (
        mass.iter().sum::<f64>() + tail_mass,
        kept.iter().sum::<f64>() + tail_kept,
    )
}
