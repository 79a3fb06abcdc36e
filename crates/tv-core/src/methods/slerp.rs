//! `slerp`: spherical interpolation between the base and one fine-tune,
//! each tensor flattened to a vector, as mergekit does: with the unit
//! vectors' dot product c (norms at most 1e-8 are taken as 1), c clamped to
//! [−1, 1], θ = acos c, merged = sin((1−t)θ)/sin θ · b + sin(tθ)/sin θ · m;
//! plain linear interpolation (1−t) b + t m when |c| > 0.9995.

use super::inputs::{fixed_parts, Block, TensorInputs, Visit};
use super::{Method, Scratch, TensorParams};
use crate::error::Result;

/// Vectors closer to parallel than this are interpolated linearly.
const DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this are not divided by.
const EPS: f64 = 1e-8;

/// The SLERP merge of the base and one model.
pub(crate) struct Slerp;

/// The two coefficients of a tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefficients {
    pub base: f64,
    pub model: f64,
}

/// SLERP's coefficients for vectors with these sums, at `t`.
pub(crate) fn coefficients(base_sq: f64, model_sq: f64, dot: f64, t: f64) -> Coefficients {
    let nb = base_sq.sqrt();
    let nm = model_sq.sqrt();
    let nb = if nb > EPS { nb } else { 1.0 };
    let nm = if nm > EPS { nm } else { 1.0 };
    let c = (dot / (nb * nm)).clamp(-1.0, 1.0);
    if c.abs() > DOT_THRESHOLD {
        return Coefficients {
            base: 1.0 - t,
            model: t,
        };
    }
    let theta = c.acos();
    let s = theta.sin();
    Coefficients {
        base: ((1.0 - t) * theta).sin() / s,
        model: (t * theta).sin() / s,
    }
}

/// Σb², Σm², Σbm of the base and the model.
struct Sums;

impl Visit for Sums {
    type Acc = [f64; 3];

    #[inline(always)]
    fn visit(&self, acc: &mut [f64; 3], block: &Block<'_>) {
        for (&b, &m) in block.base.iter().zip(block.model(0)) {
            acc[0] += b * b;
            acc[1] += m * m;
            acc[2] += b * m;
        }
    }
}

impl Method for Slerp {
    type State = Coefficients;

    fn prepare(&self, t: &TensorInputs<'_>, p: &TensorParams) -> Result<Coefficients> {
        let mut accs = fixed_parts(|| [0f64; 3]);
        t.scan(false, &mut accs, &Sums)?;
        let s = accs
            .iter()
            .fold([0f64; 3], |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]]);
        Ok(coefficients(s[0], s[1], s[2], p.t))
    }

    #[inline(always)]
    fn combine(
        &self,
        c: &Coefficients,
        _t: &TensorInputs<'_>,
        _p: &TensorParams,
        block: &Block<'_>,
        _scratch: &mut Scratch,
        out: &mut [f64],
    ) {
        for ((o, &b), &m) in out.iter_mut().zip(block.base).zip(block.model(0)) {
            *o = c.base * b + c.model * m;
        }
    }
}
