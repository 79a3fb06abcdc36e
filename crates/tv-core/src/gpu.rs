//! The device path through candle, used for CUDA GPUs.
//!
//! A segment's inputs are uploaded as candle tensors, the merge is computed
//! in f64 with candle's ops, and the f64 result comes back to be rounded by
//! the same encoder as the CPU path, so both devices write identical bytes.
//! The code is generic over candle's `Device`, which lets the tests run it
//! on candle's CPU backend.

use crate::dtype::{encode_f64, FloatType};
use crate::error::{Error, Result};
use crate::kernels::Addend;
use candle_core::{DType, Device, Tensor};

fn candle_dtype(ty: FloatType) -> DType {
    match ty {
        FloatType::BF16 => DType::BF16,
        FloatType::F16 => DType::F16,
        FloatType::F32 => DType::F32,
        FloatType::F64 => DType::F64,
    }
}

fn upload(dev: &Device, ty: FloatType, bytes: &[u8]) -> candle_core::Result<Tensor> {
    let n = bytes.len() / ty.size();
    Tensor::from_raw_buffer(bytes, candle_dtype(ty), &[n], dev)?.to_dtype(DType::F64)
}

/// Computes `base + Σ λ_i (model_i − base)` for one segment on `dev`;
/// returns how many merged values are NaN or infinite.
pub fn merge_segment(
    dev: &Device,
    base_type: FloatType,
    base: &[u8],
    addends: &[Addend<'_>],
    out_type: FloatType,
    out: &mut [u8],
) -> Result<usize> {
    let run = || -> candle_core::Result<Vec<f64>> {
        let b = upload(dev, base_type, base)?;
        let mut acc = b.zeros_like()?;
        for a in addends {
            let m = upload(dev, a.ty, a.bytes)?;
            let d = if a.is_delta { m } else { (m - &b)? };
            acc = (acc + d.affine(a.lambda, 0.0)?)?;
        }
        (acc + b)?.to_vec1::<f64>()
    };
    let values = run().map_err(|e| Error::Device(format!("{dev:?}: {e}")))?;
    encode_f64(out_type, &values, out);
    Ok(crate::dtype::count_nonfinite(out_type, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::encode_f64;
    use crate::kernels::merge_range;

    #[test]
    fn candle_path_writes_the_same_bytes_as_the_fused_kernel() {
        let n = 5000;
        let enc = |ty: FloatType, f: &dyn Fn(usize) -> f64| {
            let v: Vec<f64> = (0..n).map(f).collect();
            let mut b = vec![0u8; n * ty.size()];
            encode_f64(ty, &v, &mut b);
            b
        };
        let base = enc(FloatType::BF16, &|i| (i as f64 * 0.37).sin());
        let m1 = enc(FloatType::BF16, &|i| {
            (i as f64 * 0.37).sin() + 0.01 * (i as f64).cos()
        });
        let m2 = enc(FloatType::F32, &|i| {
            (i as f64 * 0.37).sin() - 0.003 * (i % 7) as f64
        });
        let addends = [
            Addend {
                lambda: 0.3,
                ty: FloatType::BF16,
                bytes: &m1,
                is_delta: false,
            },
            Addend {
                lambda: 0.7,
                ty: FloatType::F32,
                bytes: &m2,
                is_delta: false,
            },
        ];
        let mut fused = vec![0u8; n * 2];
        let _ = merge_range(
            FloatType::BF16,
            &base,
            &addends,
            FloatType::BF16,
            &mut fused,
        );
        let mut candle = vec![0u8; n * 2];
        merge_segment(
            &Device::Cpu,
            FloatType::BF16,
            &base,
            &addends,
            FloatType::BF16,
            &mut candle,
        )
        .unwrap();
        assert_eq!(fused, candle);
    }
}
