//! `linear`: the weighted average of the models themselves,
//! Σ w_i m_i / Σ w_i (or Σ w_i m_i without normalisation). The base's
//! values take no part; it only gives the layout and side files.

use super::inputs::{Block, TensorInputs};
use super::{Method, Scratch, TensorParams};
use crate::error::{Error, Result};

/// The linear merge.
pub(crate) struct Linear {
    pub normalize: bool,
}

impl Method for Linear {
    /// The divisor of the tensor.
    type State = f64;

    fn prepare(&self, t: &TensorInputs<'_>, p: &TensorParams) -> Result<f64> {
        if !self.normalize {
            return Ok(1.0);
        }
        let sum: f64 = t.models.iter().map(|&(m, _)| p.weight[m]).sum();
        if sum == 0.0 {
            return Err(Error::InvalidArgument(format!(
                "tensor '{}': the weights of the models that store it sum to 0, and linear \
                 divides by their sum; change the weights or pass --no-normalize",
                t.name
            )));
        }
        Ok(sum)
    }

    #[inline(always)]
    fn combine(
        &self,
        divisor: &f64,
        t: &TensorInputs<'_>,
        p: &TensorParams,
        block: &Block<'_>,
        _scratch: &mut Scratch,
        out: &mut [f64],
    ) {
        out.fill(0.0);
        for (i, &(m, _)) in t.models.iter().enumerate() {
            let w = p.weight[m];
            for (o, &x) in out.iter_mut().zip(block.model(i)) {
                *o += w * x;
            }
        }
        for o in out.iter_mut() {
            *o /= divisor;
        }
    }
}
