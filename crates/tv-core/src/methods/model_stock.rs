//! `model_stock`: moves from the base towards the models' average by
//! t = N c / (1 + (N − 1) c), with c the mean pairwise cosine of the task
//! vectors over the tensor (or over each row with `filter_wise`) and N the
//! number of models; merged = t · mean(m_i) + (1 − t) b. Cosines divide by
//! max(|d_i||d_j|, 1e-6) and are clamped to [−1, 1]; where
//! |1 + (N − 1) c| < 1e-6 the base is kept (t = 0), as mergekit does.

use super::inputs::{fixed_parts, Block, TensorInputs, Visit};
use super::{Method, Scratch, TensorParams};
use crate::error::Result;

/// The Model Stock merge.
pub(crate) struct ModelStock {
    pub filter_wise: bool,
}

/// Model Stock's t = N c / (1 + (N − 1) c) from the models' pairwise dot
/// products (`dots[i*k+j]`), c the mean over pairs of their cosines (each
/// clamped to [−1, 1], norms floored at 1e-6); `None` for fewer than two
/// models or where |1 + (N − 1) c| < 1e-6, where the merge keeps the base.
/// The analysis' `model_stock_t` uses it too, so both agree.
pub(crate) fn interpolation(dots: &[f64], k: usize) -> Option<f64> {
    let mut sum = 0.0;
    let mut pairs = 0;
    for i in 0..k {
        for j in i + 1..k {
            let norms = dots[i * k + i].sqrt() * dots[j * k + j].sqrt();
            sum += (dots[i * k + j] / norms.max(1e-6)).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    if pairs == 0 {
        return None;
    }
    let c = sum / pairs as f64;
    let n = k as f64;
    let denominator = 1.0 + (n - 1.0) * c;
    (denominator.abs() >= 1e-6).then(|| n * c / denominator)
}

/// Adds Σ d_i d_j over `range` of `block` to `dots`.
fn add_dots(block: &Block<'_>, k: usize, range: std::ops::Range<usize>, dots: &mut [f64]) {
    for j in range {
        for a in 0..k {
            let da = block.delta(a, j);
            for b in a..k {
                dots[a * k + b] += da * block.delta(b, j);
            }
        }
    }
    for a in 0..k {
        for b in 0..a {
            dots[a * k + b] = dots[b * k + a];
        }
    }
}

/// t · mean(m_i) + (1 − t) b over `range`.
fn blend(block: &Block<'_>, k: usize, t: f64, range: std::ops::Range<usize>, out: &mut [f64]) {
    for j in range {
        let mean = (0..k).map(|i| block.model(i)[j]).sum::<f64>() / k as f64;
        out[j] = t * mean + (1.0 - t) * block.base[j];
    }
}

/// Σ d_i d_j over the tensor.
struct Dots {
    k: usize,
}

impl Visit for Dots {
    /// Σ d_i d_j (`k * k`, upper triangle filled) and the block's deltas.
    type Acc = (Vec<f64>, Vec<f64>);

    #[inline(always)]
    fn visit(&self, (dots, deltas): &mut Self::Acc, block: &Block<'_>) {
        let (k, len) = (self.k, block.len);
        deltas.resize(k * len, 0.0);
        for i in 0..k {
            for ((d, &m), &b) in deltas[i * len..(i + 1) * len]
                .iter_mut()
                .zip(block.model(i))
                .zip(block.base)
            {
                *d = m - b;
            }
        }
        for a in 0..k {
            let da = &deltas[a * len..(a + 1) * len];
            for b in a..k {
                let db = &deltas[b * len..(b + 1) * len];
                dots[a * k + b] += crate::lanes::dot(da, db);
            }
        }
    }
}

impl Method for ModelStock {
    /// The tensor's t (unused with `filter_wise`).
    type State = f64;

    fn rows(&self) -> bool {
        self.filter_wise
    }

    fn prepare(&self, t: &TensorInputs<'_>, _p: &TensorParams) -> Result<f64> {
        if self.filter_wise {
            return Ok(0.0);
        }
        let k = t.models.len();
        let mut accs = fixed_parts(|| (vec![0f64; k * k], Vec::new()));
        t.scan(false, &mut accs, &Dots { k })?;
        let mut dots = vec![0f64; k * k];
        for (part, _) in accs {
            for (x, y) in dots.iter_mut().zip(part) {
                *x += y;
            }
        }
        for a in 0..k {
            for b in 0..a {
                dots[a * k + b] = dots[b * k + a];
            }
        }
        Ok(interpolation(&dots, k).unwrap_or(0.0))
    }

    #[inline(always)]
    fn combine(
        &self,
        t_tensor: &f64,
        t: &TensorInputs<'_>,
        _p: &TensorParams,
        block: &Block<'_>,
        _scratch: &mut Scratch,
        out: &mut [f64],
    ) {
        let k = t.models.len();
        if !self.filter_wise {
            blend(block, k, *t_tensor, 0..block.len, out);
            return;
        }
        let row = t.row_len();
        let mut dots = vec![0f64; k * k];
        for start in (0..block.len).step_by(row) {
            let range = start..(start + row).min(block.len);
            dots.fill(0.0);
            add_dots(block, k, range.clone(), &mut dots);
            blend(block, k, interpolation(&dots, k).unwrap_or(0.0), range, out);
        }
    }
}
