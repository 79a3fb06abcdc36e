//! Writing a tensor merged by token ([`super::Action::MergeRows`]).
//!
//! Output row `r` of an embedding or lm_head whose models' vocabularies
//! differ is combined in f64 from the base's row `r` and, for each model
//! that holds row `r`'s token, that model's row; it is rounded once into
//! the output type. A model that lacks the token contributes nothing.
//! Task Arithmetic: `b + λ Σ w_i (m_i − b)` over the models holding the
//! token. Linear: `Σ w_i m_i / Σ w_i` over them (without normalisation the
//! divisor is 1 for the base's tokens). A row no model holds keeps the
//! base's values. A row the union appends (a token the base lacks) takes
//! the mean of all the base's rows of that matrix as its base value and
//! weights renormalised over the models holding it (`w_i / Σ w_j`), so that
//! with λ = 1 it is their weighted average. Rows are written in order,
//! segment by segment, parallel over rows within a segment; the model rows
//! are gathered by index, so the same-vocabulary path is untouched.
//! An adapter has the base's rows: one that leaves the tensor alone reads
//! the base's (a zero task vector), and a stored full weight of one is read
//! row for row; one whose factors change the tensor is refused when planned.

use super::plan::{MergePlan, PlannedTensor, RowMerge, RowSource};
use super::run::{Out, TASK};
use crate::checkpoint::Checkpoint;
use crate::dtype::{count_nonfinite, decode_f64, encode_f64, FloatType};
use crate::error::{Error, Result};
use crate::family::Family;
use crate::interrupt;
use crate::methods::inputs::SEGMENT;
use crate::methods::MethodKind;
use rayon::prelude::*;

impl MergePlan {
    /// Writes `planned`, merged row by row by token.
    pub(super) fn write_rows(
        &self,
        family: &Family,
        planned: &PlannedTensor,
        rows: &RowMerge,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let params = planned
            .params
            .as_ref()
            .expect("merged tensors have parameters");
        let out_type = planned.out_type.expect("float tensor");
        let base_type = planned.base.float_type().expect("float tensor");
        let alignment = &rows.alignment;
        let (n, len) = (alignment.rows(), rows.row_len);
        let linear = self.recipe.settings.kind == MethodKind::Linear;
        let base = family.base.bytes(&planned.base);
        if n * len == 0 {
            return Ok(());
        }
        // Appended rows start from the mean row: a row no model holds (its
        // token's model lacks this tensor) keeps it, for every method.
        let mean = if alignment.added.is_empty() {
            Vec::new()
        } else {
            mean_row(base_type, base, len, &|from, to| {
                family.base.release(&planned.base, from, to)
            })
        };
        let sources: Vec<(usize, FloatType, &[u8])> = rows
            .sources
            .iter()
            .map(|s| {
                let ty = s.tensor.float_type().expect("float tensor");
                (s.model, ty, source_file(family, s).bytes(&s.tensor))
            })
            .collect();
        let row = |r: usize,
                   merged: &mut [f64],
                   scratch: &mut Vec<f64>,
                   m_row: &mut Vec<f64>|
         -> Result<()> {
            let added = r >= alignment.base_rows;
            let b: &[f64] = if added {
                &mean
            } else {
                scratch.resize(len, 0.0);
                decode_f64(
                    base_type,
                    &base[base_type.byte_range(r * len, (r + 1) * len)],
                    scratch,
                );
                scratch
            };
            let held = || {
                sources.iter().filter_map(|&(m, ty, bytes)| {
                    let j = alignment.maps[m][r]? as usize;
                    Some((m, ty, &bytes[ty.byte_range(j * len, (j + 1) * len)]))
                })
            };
            if held().next().is_none() {
                merged.copy_from_slice(b);
                return Ok(());
            }
            // Non-zero where it divides: checked when planned.
            let total: f64 = held().map(|(m, _, _)| params.weight[m]).sum();
            m_row.resize(len, 0.0);
            merged.fill(0.0);
            for (m, ty, bytes) in held() {
                decode_f64(ty, bytes, m_row);
                let w = params.weight[m];
                if linear {
                    for (o, &x) in merged.iter_mut().zip(m_row.iter()) {
                        *o += w * x;
                    }
                } else {
                    let lambda = params.scale * if added { w / total } else { w };
                    for ((o, &x), &b) in merged.iter_mut().zip(m_row.iter()).zip(b) {
                        *o += lambda * (x - b);
                    }
                }
            }
            if linear {
                let divisor = if added || self.recipe.settings.normalize {
                    total
                } else {
                    1.0
                };
                for o in merged.iter_mut() {
                    *o /= divisor;
                }
            } else {
                for (o, &b) in merged.iter_mut().zip(b) {
                    *o += b;
                }
            }
            Ok(())
        };

        let per_task = (TASK / len).max(1);
        let per_segment = (SEGMENT / len).max(per_task) / per_task * per_task;
        let os = out_type.size();
        let total_read = super::plan::read_bytes(planned) as u64;
        let mut advanced = 0;
        let mut start = 0;
        while start < n {
            crate::testhooks::before_segment();
            if interrupt::requested() {
                return Err(Error::Interrupted);
            }
            let end = (start + per_segment).min(n);
            out.buffer.resize((end - start) * len * os, 0);
            let nonfinite = out
                .buffer
                .par_chunks_mut(per_task * len * os)
                .enumerate()
                .map(|(k, bytes)| -> Result<usize> {
                    let first = start + k * per_task;
                    let mut merged = vec![0f64; len];
                    let (mut scratch, mut m_row) = (Vec::new(), Vec::new());
                    for (i, out_row) in bytes.chunks_mut(len * os).enumerate() {
                        row(first + i, &mut merged, &mut scratch, &mut m_row)?;
                        encode_f64(out_type, &merged, out_row);
                    }
                    Ok(count_nonfinite(out_type, bytes))
                })
                .try_reduce(|| 0, |a, b| Ok(a + b))?;
            crate::guard::check()?;
            if nonfinite > 0 && !self.options.allow_nonfinite {
                return Err(Error::Incompatible(format!(
                    "tensor '{}': merged rows {start}..{end} hold NaN or infinite values \
                     (from an input, or an overflow of {out_type}); pass --allow-nonfinite \
                     to write them anyway",
                    planned.name
                )));
            }
            let full = std::mem::take(out.buffer);
            *out.buffer = out.writer.write_owned(full)?;
            release_segment(family, planned, rows, start, end);
            let done = total_read * end as u64 / n as u64;
            out.progress.advance(done - advanced);
            advanced = done;
            start = end;
        }
        Ok(())
    }
}

/// Drops the pages of the rows that output rows `start..end` read: the
/// base's rows, and the span of each model's rows they map to (rows are
/// mostly in order; a row read again later is simply paged in again).
fn release_segment(
    family: &Family,
    planned: &PlannedTensor,
    rows: &RowMerge,
    start: usize,
    end: usize,
) {
    let len = rows.row_len;
    let base_end = end.min(rows.alignment.base_rows);
    if start < base_end {
        let ty = planned.base.float_type().expect("float tensor");
        let r = ty.byte_range(start * len, base_end * len);
        family.base.release(&planned.base, r.start, r.end);
    }
    for s in &rows.sources {
        let t = &s.tensor;
        let held = rows.alignment.maps[s.model][start..end].iter().flatten();
        let (Some(lo), Some(hi)) = (held.clone().min(), held.max()) else {
            continue;
        };
        let ty = t.float_type().expect("float tensor");
        let r = ty.byte_range(*lo as usize * len, (*hi as usize + 1) * len);
        source_file(family, s).release(t, r.start, r.end);
    }
}

/// The file a row source's tensor lives in: the model's (a checkpoint's
/// shards, an adapter's file), or the base's for an adapter that leaves
/// the tensor alone.
fn source_file<'a>(family: &'a Family, s: &RowSource) -> &'a Checkpoint {
    if s.from_base {
        &family.base
    } else {
        family.models[s.model].checkpoint()
    }
}

/// The mean of a matrix's rows, in f64 (rows summed in order); the pages
/// of each segment read are handed to `release` (byte offsets).
fn mean_row(ty: FloatType, bytes: &[u8], len: usize, release: &dyn Fn(usize, usize)) -> Vec<f64> {
    let n = bytes.len() / ty.size() / len.max(1);
    let mut sum = vec![0f64; len];
    let mut row = vec![0f64; len];
    let mut released = 0;
    for r in 0..n {
        decode_f64(ty, &bytes[ty.byte_range(r * len, (r + 1) * len)], &mut row);
        for (s, &x) in sum.iter_mut().zip(&row) {
            *s += x;
        }
        if (r + 1) % (SEGMENT / len).max(1) == 0 || r + 1 == n {
            let done = ty.byte_range(0, (r + 1) * len).end;
            release(released, done);
            released = done;
        }
    }
    for s in sum.iter_mut() {
        *s /= n.max(1) as f64;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::noise;
    use std::cell::RefCell;

    /// The mean row equals the rows' mean computed plainly in f64, and the
    /// pages are released once each: consecutive ranges from the start to
    /// the end, none released twice.
    #[test]
    fn mean_row_averages_and_releases_each_segment_once() {
        let len = 1000;
        // More rows than one segment holds, and not a multiple of it.
        let rows = 2 * (SEGMENT / len) + 7;
        let values = noise(5, rows * len, 3.0);
        let ty = FloatType::F32;
        let mut bytes = vec![0u8; values.len() * ty.size()];
        encode_f64(ty, &values, &mut bytes);
        let released = RefCell::new(Vec::new());
        let mean = mean_row(ty, &bytes, len, &|from, to| {
            released.borrow_mut().push((from, to))
        });
        for (c, &m) in mean.iter().enumerate() {
            let mut want = 0.0;
            for r in 0..rows {
                // The stored f32 value, as an f64.
                want += f64::from(values[r * len + c] as f32);
            }
            assert_eq!(m, want / rows as f64, "column {c}");
        }
        let released = released.into_inner();
        assert_eq!(released.len(), 3, "{released:?}");
        assert_eq!(released[0].0, 0);
        for pair in released.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "{released:?}");
        }
        assert_eq!(released.last().unwrap().1, bytes.len());
    }
}
