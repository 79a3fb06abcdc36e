//! `magmax`: per element, the task-vector entry of largest magnitude
//! among the models (the first model wins a tie), b + λ · that entry.

use super::inputs::{Block, TensorInputs};
use super::{Method, Scratch, TensorParams};
use crate::error::Result;

/// The MagMax merge.
pub(crate) struct Magmax;

impl Method for Magmax {
    type State = ();

    fn prepare(&self, _t: &TensorInputs<'_>, _p: &TensorParams) -> Result<()> {
        Ok(())
    }

    #[inline(always)]
    fn combine(
        &self,
        _state: &(),
        t: &TensorInputs<'_>,
        p: &TensorParams,
        block: &Block<'_>,
        _scratch: &mut Scratch,
        out: &mut [f64],
    ) {
        for (j, o) in out.iter_mut().enumerate() {
            let mut best = 0.0f64;
            for i in 0..t.models.len() {
                let d = block.delta(i, j);
                if d.abs() > best.abs() {
                    best = d;
                }
            }
            *o = block.base[j] + p.scale * best;
        }
    }
}
