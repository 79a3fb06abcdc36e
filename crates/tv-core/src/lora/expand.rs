//! Expanding an adapter's task vector for a range of elements.
//!
//! The rows of ΔW = s · B A (or its transpose) that cover the range are
//! computed by one candle matmul in f64 on the chosen device: the factors'
//! stored values (bf16, f16, f32) are exact in f64, so the only roundings
//! are the f64 product's own and the multiplication by s, and the merge
//! that follows rounds once to the output type. Only the rows needed are
//! decoded from the left factor; the right factor (r × columns) is small.
//! A full weight the adapter stores adds saved − base, in f64.

use super::{AdapterTensor, FactorLayout, LoraFactors};
use crate::checkpoint::Checkpoint;
use crate::dtype::{decode_f64, FloatType};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

/// The base's values of the same element range, for full weights.
pub struct BaseRange<'a> {
    pub ty: FloatType,
    pub bytes: &'a [u8],
}

/// Writes the task vector of elements `range` of the base tensor of shape
/// `shape` into `out` (resized to the range's length).
pub fn delta_range(
    file: &Checkpoint,
    tensor: &AdapterTensor,
    shape: &[usize],
    base: BaseRange<'_>,
    device: &Device,
    range: std::ops::Range<usize>,
    out: &mut Vec<f64>,
) -> Result<()> {
    let (start, end) = (range.start, range.end);
    out.clear();
    out.resize(end - start, 0.0);
    if let Some(f) = &tensor.lora {
        lora_rows(file, f, shape, device, start, end, out)
            .map_err(|e| Error::Device(format!("{device:?}: expanding a LoRA product: {e}")))?;
    }
    if let Some(full) = &tensor.full {
        let ty = full
            .float_type()
            .expect("checked when the adapter was opened");
        let mut saved = vec![0f64; end - start];
        decode_f64(ty, &file.bytes(full)[ty.byte_range(start, end)], &mut saved);
        let mut b = vec![0f64; end - start];
        decode_f64(base.ty, base.bytes, &mut b);
        for ((o, s), b) in out.iter_mut().zip(&saved).zip(&b) {
            *o += s - b;
        }
        let r = ty.byte_range(start, end);
        file.release(full, r.start, r.end);
    }
    Ok(())
}

/// Adds s · (B A) (or its transpose) for elements `start..end` to `out`.
fn lora_rows(
    file: &Checkpoint,
    f: &LoraFactors,
    shape: &[usize],
    device: &Device,
    start: usize,
    end: usize,
    out: &mut [f64],
) -> candle_core::Result<()> {
    let cols = shape[1];
    let (r0, r1) = (start / cols, end.div_ceil(cols));
    let rows = r1 - r0;
    let rank = f.rank;
    let decode = |t: &crate::checkpoint::TensorRef, from: usize, to: usize, into: &mut [f64]| {
        let ty = t.float_type().expect("checked when the adapter was opened");
        decode_f64(ty, &file.bytes(t)[ty.byte_range(from, to)], into);
    };
    let (left, right) = match f.layout {
        FactorLayout::Plain => {
            // B rows r0..r1 ([rows, r]) times A ([r, cols]).
            let mut b = vec![0f64; rows * rank];
            decode(&f.b, r0 * rank, r1 * rank, &mut b);
            let mut a = vec![0f64; rank * cols];
            decode(&f.a, 0, rank * cols, &mut a);
            (
                Tensor::from_vec(b, (rows, rank), device)?,
                Tensor::from_vec(a, (rank, cols), device)?,
            )
        }
        FactorLayout::Transposed => {
            // Columns r0..r1 of A ([r, n]) transposed, times Bᵀ ([r, cols]).
            let n = shape[0];
            let mut a = vec![0f64; rank * rows];
            for k in 0..rank {
                decode(
                    &f.a,
                    k * n + r0,
                    k * n + r1,
                    &mut a[k * rows..(k + 1) * rows],
                );
            }
            let mut b = vec![0f64; cols * rank];
            decode(&f.b, 0, cols * rank, &mut b);
            (
                Tensor::from_vec(a, (rank, rows), device)?
                    .t()?
                    .contiguous()?,
                Tensor::from_vec(b, (cols, rank), device)?
                    .t()?
                    .contiguous()?,
            )
        }
    };
    let product = left.matmul(&right)?.flatten_all()?.to_vec1::<f64>()?;
    let first = start - r0 * cols;
    let n = out.len();
    for (o, &p) in out.iter_mut().zip(&product[first..first + n]) {
        *o += f.scale * p;
    }
    Ok(())
}
