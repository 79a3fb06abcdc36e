//! Fused CPU loops over mmapped tensor bytes.
//!
//! Each kernel walks its inputs in blocks of [`BLOCK`] elements that stay in
//! the L1/L2 cache: decode every input once into f64, do all the arithmetic
//! for the block, encode the result once. Callers split large tensors into
//! independent pieces and run them on rayon's pool.

use crate::dtype::{count_nonfinite, decode_f64, encode_f64, FloatType};
use crate::lanes::{self, PairSigns};
use crate::quantile::Sample;
use crate::simd::simd_dispatch;
use crate::stats::Moments;

/// Elements per cache-resident block.
pub const BLOCK: usize = 2048;

/// One fine-tune's contribution to a merge: its weight and its bytes of the
/// same element range as the base: the model's values, or (`is_delta`, for
/// adapters) its task vector itself.
#[derive(Debug, Clone, Copy)]
pub struct Addend<'a> {
    pub lambda: f64,
    pub ty: FloatType,
    pub bytes: &'a [u8],
    pub is_delta: bool,
}

/// One model's elements of a range: its stored values (task vector
/// m − base), or with `is_delta` the task vector itself (an adapter's).
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    pub ty: FloatType,
    pub bytes: &'a [u8],
    pub is_delta: bool,
}

simd_dispatch! {
    /// Computes `base + Σ λ_i (model_i - base)` for one element range, in
    /// f64, rounding once into `out` (type `out_ty`).
    ///
    /// `base` holds `n` elements of `base_ty`, each addend `n` elements of its
    /// own type, `out` `n` elements of `out_ty`. Returns how many merged
    /// values are NaN or infinite.
    pub fn merge_range(base_ty: FloatType, base: &[u8], addends: &[Addend<'_>], out_ty: FloatType, out: &mut [u8]) -> usize
        => merge_kernel
}

#[inline(always)]
fn merge_kernel(
    base_ty: FloatType,
    base: &[u8],
    addends: &[Addend<'_>],
    out_ty: FloatType,
    out: &mut [u8],
) -> usize {
    let n = base.len() / base_ty.size();
    debug_assert_eq!(out.len(), n * out_ty.size());
    let mut nonfinite = 0;
    let mut b = [0f64; BLOCK];
    let mut m = [0f64; BLOCK];
    let mut acc = [0f64; BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let (b, m, acc) = (&mut b[..len], &mut m[..len], &mut acc[..len]);
        let elems = start..start + len;
        decode_f64(
            base_ty,
            &base[base_ty.byte_range(elems.start, elems.end)],
            b,
        );
        acc.fill(0.0);
        for a in addends {
            decode_f64(a.ty, &a.bytes[a.ty.byte_range(elems.start, elems.end)], m);
            if a.is_delta {
                for (acc, &d) in acc.iter_mut().zip(m.iter()) {
                    *acc += a.lambda * d;
                }
            } else {
                for ((acc, &m), &b) in acc.iter_mut().zip(m.iter()).zip(b.iter()) {
                    *acc += a.lambda * (m - b);
                }
            }
        }
        for (acc, &b) in acc.iter_mut().zip(b.iter()) {
            *acc += b;
        }
        let out = &mut out[out_ty.byte_range(elems.start, elems.end)];
        encode_f64(out_ty, acc, out);
        nonfinite += count_nonfinite(out_ty, out);
        start += len;
    }
    nonfinite
}

/// Converts one element range from `in_ty` to `out_ty` (rounding once).
pub fn convert_range(in_ty: FloatType, input: &[u8], out_ty: FloatType, out: &mut [u8]) {
    if in_ty == out_ty {
        out.copy_from_slice(input);
        return;
    }
    let _ = merge_range(in_ty, input, &[], out_ty, out);
}

/// Per-model sums of one task-vector tensor range, from [`delta_stats`].
#[derive(Debug, Clone, Default)]
pub struct DeltaSums {
    pub moments: Moments,
    pub sum_abs: f64,
    pub max_abs: f64,
    pub unchanged: u64,
    pub nonfinite: u64,
}

/// Everything [`delta_stats`] accumulates over an element range.
#[derive(Debug, Clone)]
pub struct DeltaAcc {
    pub models: Vec<DeltaSums>,
    /// `dots[i * k + j]` = Σ d_i d_j (the diagonal is Σ d_i²).
    pub dots: Vec<f64>,
    /// Σ base², for the base's own norm.
    pub base_sum_sq: f64,
    /// `signs[i * k + j]`: sign agreement of models i and j (symmetric;
    /// the diagonal is left empty).
    pub signs: Vec<PairSigns>,
}

impl DeltaAcc {
    /// An empty accumulator for `k` models.
    pub fn new(k: usize) -> Self {
        Self {
            models: vec![DeltaSums::default(); k],
            dots: vec![0.0; k * k],
            base_sum_sq: 0.0,
            signs: vec![PairSigns::default(); k * k],
        }
    }

    /// Adds a later range's sums (order matters only in the last bits).
    pub fn combine(mut self, other: &Self) -> Self {
        for (a, b) in self.models.iter_mut().zip(&other.models) {
            a.moments = a.moments.combine(b.moments);
            a.sum_abs += b.sum_abs;
            a.max_abs = a.max_abs.max(b.max_abs);
            a.unchanged += b.unchanged;
            a.nonfinite += b.nonfinite;
        }
        for (a, b) in self.dots.iter_mut().zip(&other.dots) {
            *a += b;
        }
        self.base_sum_sq += other.base_sum_sq;
        for (a, b) in self.signs.iter_mut().zip(&other.signs) {
            a.add(b);
        }
        self
    }
}

simd_dispatch! {
    /// One pass over an element range of the base and of `k` models: for
    /// each model's delta d = m − base, its moments, Σ|d|, max|d|, zero and
    /// non-finite counts; Σ d_i d_j and the sign agreement
    /// ([`PairSigns`]) of every pair; and Σ base². An operand with
    /// `is_delta` (an adapter's ΔW) is its own delta and enters every sum,
    /// the sign agreement included, exactly as a stored model's m − base.
    pub fn delta_stats(base_ty: FloatType, base: &[u8], models: &[Operand<'_>]) -> DeltaAcc
        => delta_stats_kernel
}

#[inline(always)]
fn delta_stats_kernel(base_ty: FloatType, base: &[u8], models: &[Operand<'_>]) -> DeltaAcc {
    let k = models.len();
    let n = base.len() / base_ty.size();
    let mut acc = DeltaAcc::new(k);
    // Smaller blocks than the merge's: k deltas must stay in the L1 cache.
    const BLOCK: usize = 512;
    let mut b = vec![0f64; BLOCK];
    let mut ds = vec![0f64; k * BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let elems = start..start + len;
        let b = &mut b[..len];
        decode_f64(
            base_ty,
            &base[base_ty.byte_range(elems.start, elems.end)],
            b,
        );
        acc.base_sum_sq += lanes::dot(b, b);
        for (i, op) in models.iter().enumerate() {
            let d = &mut ds[i * BLOCK..i * BLOCK + len];
            decode_f64(
                op.ty,
                &op.bytes[op.ty.byte_range(elems.start, elems.end)],
                d,
            );
            if !op.is_delta {
                for (d, &b) in d.iter_mut().zip(b.iter()) {
                    *d -= b;
                }
            }
            let s = &mut acc.models[i];
            // Power sums around a value near the mean keep the moments exact
            // enough in one pass: the mean so far, or the block's first delta.
            let shift = if s.moments.n > 0.0 {
                s.moments.mean
            } else {
                d[0]
            };
            let shift = if shift.is_finite() { shift } else { 0.0 };
            let sums = lanes::block_sums(d, shift);
            s.moments = s
                .moments
                .combine(Moments::from_power_sums(len, shift, sums.powers));
            s.sum_abs += sums.sum_abs;
            s.max_abs = s.max_abs.max(sums.max_abs);
            s.unchanged += sums.zeros;
            s.nonfinite += sums.nonfinite;
        }
        for i in 0..k {
            let di = &ds[i * BLOCK..i * BLOCK + len];
            for j in i..k {
                let dj = &ds[j * BLOCK..j * BLOCK + len];
                if i == j {
                    acc.dots[i * k + i] += lanes::dot(di, di);
                    continue;
                }
                let (dot, signs) = lanes::dot_and_signs(di, dj);
                acc.dots[i * k + j] += dot;
                acc.dots[j * k + i] += dot;
                acc.signs[i * k + j].add(&signs);
                acc.signs[j * k + i].add(&signs);
            }
        }
        start += len;
    }
    acc
}

/// Writes the non-zero deltas d = model − base of an element range to the
/// front of `out` (as f32 or f64, rounded to nearest), the true value of
/// each inexact one to `inexact`, and returns how many there were.
pub fn delta_nonzero<T: Sample>(
    base_ty: FloatType,
    base: &[u8],
    ty: FloatType,
    model: &[u8],
    out: &mut [T],
    inexact: &mut Vec<f64>,
) -> usize {
    let mut written = 0;
    delta_blocks(base_ty, base, ty, model, out.len(), |_, d| {
        for &v in d {
            // Branch-free compaction: always store, advance only past non-zeros.
            if rounds_in::<T>(v) {
                inexact.push(v);
            }
            out[written] = T::from_f64(v);
            written += usize::from(v != 0.0);
        }
    });
    written
}

simd_dispatch! {
    /// Writes d = model − base for an element range into `out` as f32,
    /// rounded to nearest, and the true value of each inexact one to
    /// `inexact`.
    pub fn delta_into_f32(base_ty: FloatType, base: &[u8], ty: FloatType, model: &[u8], out: &mut [f32], inexact: &mut Vec<f64>)
        => delta_into_kernel
}

simd_dispatch! {
    /// Writes d = model − base for an element range into `out` as f64.
    pub fn delta_into_f64(base_ty: FloatType, base: &[u8], ty: FloatType, model: &[u8], out: &mut [f64], inexact: &mut Vec<f64>)
        => delta_into_kernel
}

#[inline(always)]
fn delta_into_kernel<T: Sample>(
    base_ty: FloatType,
    base: &[u8],
    ty: FloatType,
    model: &[u8],
    out: &mut [T],
    inexact: &mut Vec<f64>,
) {
    delta_blocks(base_ty, base, ty, model, out.len(), |start, d| {
        let mut any_rounded = false;
        for (o, &v) in out[start..start + d.len()].iter_mut().zip(d) {
            *o = T::from_f64(v);
            any_rounded |= rounds_in::<T>(v);
        }
        // Rare: list the true values only for blocks that need them.
        if any_rounded {
            inexact.extend(d.iter().copied().filter(|&v| rounds_in::<T>(v)));
        }
    });
}

/// Whether `T` cannot hold `v` exactly (NaN counts as held).
#[inline(always)]
fn rounds_in<T: Sample>(v: f64) -> bool {
    T::from_f64(v).to_f64() != v && !v.is_nan()
}

#[inline(always)]
fn delta_blocks(
    base_ty: FloatType,
    base: &[u8],
    ty: FloatType,
    model: &[u8],
    n: usize,
    mut emit: impl FnMut(usize, &[f64]),
) {
    let mut b = [0f64; BLOCK];
    let mut d = [0f64; BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let elems = start..start + len;
        decode_f64(
            base_ty,
            &base[base_ty.byte_range(elems.start, elems.end)],
            &mut b[..len],
        );
        decode_f64(
            ty,
            &model[ty.byte_range(elems.start, elems.end)],
            &mut d[..len],
        );
        for (d, b) in d[..len].iter_mut().zip(&b[..len]) {
            *d -= b;
        }
        emit(start, &d[..len]);
        start += len;
    }
}
