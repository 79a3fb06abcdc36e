//! Fused CPU loops over mmapped tensor bytes.
//!
//! Each kernel walks its inputs in blocks of [`BLOCK`] elements that stay in
//! the L1/L2 cache: decode every input once into f64, do all the arithmetic
//! for the block, encode the result once. Callers split large tensors into
//! independent pieces and run them on rayon's pool.

use crate::dtype::{decode_f64, encode_f64, FloatType};

/// Elements per cache-resident block.
pub const BLOCK: usize = 2048;

/// One fine-tune's contribution to a merge: its weight and its bytes of the
/// same element range as the base.
#[derive(Debug, Clone, Copy)]
pub struct Addend<'a> {
    pub lambda: f64,
    pub ty: FloatType,
    pub bytes: &'a [u8],
}

/// Computes `base + Σ λ_i (model_i - base)` for one element range, in f64,
/// rounding once into `out` (type `out_ty`).
///
/// `base` holds `n` elements of `base_ty`, each addend `n` elements of its
/// own type, `out` `n` elements of `out_ty`.
pub fn merge_range(
    base_ty: FloatType,
    base: &[u8],
    addends: &[Addend<'_>],
    out_ty: FloatType,
    out: &mut [u8],
) {
    let n = base.len() / base_ty.size();
    debug_assert_eq!(out.len(), n * out_ty.size());
    let mut b = [0f64; BLOCK];
    let mut m = [0f64; BLOCK];
    let mut acc = [0f64; BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let (b, m, acc) = (&mut b[..len], &mut m[..len], &mut acc[..len]);
        let elems = start..start + len;
        decode_f64(base_ty, &base[byte_range(&elems, base_ty)], b);
        acc.fill(0.0);
        for a in addends {
            decode_f64(a.ty, &a.bytes[byte_range(&elems, a.ty)], m);
            for ((acc, &m), &b) in acc.iter_mut().zip(m.iter()).zip(b.iter()) {
                *acc += a.lambda * (m - b);
            }
        }
        for (acc, &b) in acc.iter_mut().zip(b.iter()) {
            *acc += b;
        }
        encode_f64(out_ty, acc, &mut out[byte_range(&elems, out_ty)]);
        start += len;
    }
}

/// Converts one element range from `in_ty` to `out_ty` (rounding once).
pub fn convert_range(in_ty: FloatType, input: &[u8], out_ty: FloatType, out: &mut [u8]) {
    if in_ty == out_ty {
        out.copy_from_slice(input);
        return;
    }
    merge_range(in_ty, input, &[], out_ty, out);
}

fn byte_range(elems: &std::ops::Range<usize>, ty: FloatType) -> std::ops::Range<usize> {
    elems.start * ty.size()..elems.end * ty.size()
}
