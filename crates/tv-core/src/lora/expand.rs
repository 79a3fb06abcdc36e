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
    let product = left.matmul(&right)?;
    let first = start - r0 * cols;
    let mut add = |p: &[f64]| {
        for (o, &p) in out.iter_mut().zip(&p[first..]) {
            *o += f.scale * p;
        }
    };
    // On the CPU the product is read where candle wrote it (no copy).
    let (storage, layout) = product.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((from, to))) => {
            add(&cpu.as_slice::<f64>()?[from..to])
        }
        _ => {
            drop(storage);
            add(&product.flatten_all()?.to_vec1::<f64>()?)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::dtype::encode_f64;
    use safetensors::tensor::TensorView;

    /// Values exactly representable in `ty`.
    fn values(ty: FloatType, n: usize, seed: usize) -> (Vec<f64>, Vec<u8>) {
        let v: Vec<f64> = (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f64 - 500.0) / 997.0)
            .collect();
        let mut bytes = vec![0u8; n * ty.size()];
        encode_f64(ty, &v, &mut bytes);
        let mut exact = vec![0f64; n];
        decode_f64(ty, &bytes, &mut exact);
        (exact, bytes)
    }

    #[test]
    fn any_element_range_is_its_part_of_the_product() {
        let (rank, rows, cols) = (5, 9, 7);
        for layout in [FactorLayout::Plain, FactorLayout::Transposed] {
            // Plain: B [rows, r], A [r, cols]; transposed: A [r, rows], B [cols, r].
            let (a_shape, b_shape) = match layout {
                FactorLayout::Plain => ([rank, cols], [rows, rank]),
                FactorLayout::Transposed => ([rank, rows], [cols, rank]),
            };
            let (a, a_bytes) = values(FloatType::BF16, rank * a_shape[1], 1);
            let (b, b_bytes) = values(FloatType::F32, b_shape[0] * rank, 2);
            let (saved, saved_bytes) = values(FloatType::BF16, rows * cols, 3);
            let (base, base_bytes) = values(FloatType::BF16, rows * cols, 4);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("adapter_model.safetensors");
            safetensors::serialize_to_file(
                [
                    (
                        "a",
                        TensorView::new(safetensors::Dtype::BF16, a_shape.to_vec(), &a_bytes)
                            .unwrap(),
                    ),
                    (
                        "b",
                        TensorView::new(safetensors::Dtype::F32, b_shape.to_vec(), &b_bytes)
                            .unwrap(),
                    ),
                    (
                        "w",
                        TensorView::new(safetensors::Dtype::BF16, vec![rows, cols], &saved_bytes)
                            .unwrap(),
                    ),
                ],
                None,
                &path,
            )
            .unwrap();
            let file = Checkpoint::open(path.to_str().unwrap()).unwrap();
            let scale = 0.75;
            let tensor = AdapterTensor {
                lora: Some(LoraFactors {
                    a: file.get("a").unwrap().clone(),
                    b: file.get("b").unwrap().clone(),
                    scale,
                    rank,
                    layout,
                }),
                full: Some(file.get("w").unwrap().clone()),
            };
            // The definition, element by element.
            let want: Vec<f64> = (0..rows * cols)
                .map(|e| {
                    let (i, j) = (e / cols, e % cols);
                    let dot: f64 = (0..rank)
                        .map(|k| match layout {
                            FactorLayout::Plain => b[i * rank + k] * a[k * cols + j],
                            FactorLayout::Transposed => a[k * rows + i] * b[j * rank + k],
                        })
                        .sum();
                    scale * dot + (saved[e] - base[e])
                })
                .collect();
            let mut out = Vec::new();
            for (start, end) in [(0, rows * cols), (3, 4), (5, 20), (13, 14), (20, 63)] {
                let bt = FloatType::BF16;
                delta_range(
                    &file,
                    &tensor,
                    &[rows, cols],
                    BaseRange {
                        ty: bt,
                        bytes: &base_bytes[bt.byte_range(start, end)],
                    },
                    &Device::Cpu,
                    start..end,
                    &mut out,
                )
                .unwrap();
                for (k, (&got, &w)) in out.iter().zip(&want[start..end]).enumerate() {
                    assert!(
                        (got - w).abs() <= 1e-14 * w.abs().max(1.0),
                        "{layout:?} {start}..{end} [{k}]: {got} vs {w}"
                    );
                }
            }
        }
    }
}
