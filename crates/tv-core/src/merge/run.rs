//! Executing a merge plan: one streaming pass over the base's tensors.
//!
//! For each output tensor in order, the method's pre-pass runs (if it has
//! one), then the tensor is produced segment by segment: every segment is
//! split into tasks on rayon's pool, each task decodes blocks of the inputs,
//! combines them in f64 and rounds once into the output type; the segment
//! is streamed into the shard writer and its input pages are released.
//! Task Arithmetic keeps its fused kernel (and the GPU path); every other
//! method goes through [`Method`]. With `--density-scope model`, one
//! selection over every merged tensor comes first.

use super::plan::{Action, MergePlan, PlannedTensor};
use crate::checkpoint::TensorRef;
use crate::device::Device;
use crate::dtype::{count_nonfinite, encode_f64, FloatType};
use crate::error::{Error, Result};
use crate::family::{Family, ModelTensor};
use crate::interrupt;
use crate::kernels::{convert_range, merge_range, Addend};
use crate::methods::gta::Gta;
use crate::methods::inputs::{
    Expanded, Input, ModelInput, Scratch as DecodeScratch, TensorInputs, SEGMENT,
};
use crate::methods::linear::Linear;
use crate::methods::magmax::Magmax;
use crate::methods::model_stock::ModelStock;
use crate::methods::operands::{Operands, Values};
use crate::methods::select;
use crate::methods::slerp::Slerp;
use crate::methods::sparsify::{ModelCut, Pending};
use crate::methods::{DensityScope, Method, MethodKind, Scratch, TensorParams};
use crate::progress::Progress;
use crate::writer::ShardWriter;
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// Elements per parallel task within a segment.
pub(super) const TASK: usize = 1 << 16;

/// Where a tensor's bytes go: the shard being written, the reused segment
/// buffer, the reused buffers of adapters' task vectors, and the progress
/// report.
pub(super) struct Out<'a> {
    pub writer: &'a mut ShardWriter,
    pub buffer: &'a mut Vec<u8>,
    pub expanded: &'a mut Expanded,
    pub progress: &'a dyn Progress,
}

/// Fills the output bytes of elements `start..end` (the adapters' task
/// vectors of which are expanded); returns how many of the values are not
/// finite.
type ComputeSegment<'a> = dyn Fn(usize, usize, &Expanded, &mut [u8]) -> Result<usize> + Sync + 'a;

/// Writes one planned tensor.
type WriteTensor<'a> = dyn FnMut(&PlannedTensor, &mut Out<'_>) -> Result<()> + 'a;

impl MergePlan {
    /// Writes the merged shards (and the index, when sharded) into `dir`.
    pub fn execute(
        &self,
        family: &Family,
        device: &Device,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        let settings = self.recipe.settings;
        match settings.kind {
            MethodKind::TaskArithmetic => self.write_all(family, progress, dir, &mut |t, out| {
                self.write_fused(family, device, t, out)
            }),
            MethodKind::Linear => self.run(
                family,
                device,
                dir,
                progress,
                &Linear {
                    normalize: settings.normalize,
                },
            ),
            MethodKind::ModelStock => self.run(
                family,
                device,
                dir,
                progress,
                &ModelStock {
                    filter_wise: settings.filter_wise,
                },
            ),
            MethodKind::Slerp => self.run(family, device, dir, progress, &Slerp),
            MethodKind::Magmax => self.run(family, device, dir, progress, &Magmax),
            _ => {
                let cuts = match settings.density_scope {
                    DensityScope::Model => Some(self.model_cuts(family, device)?),
                    DensityScope::Tensor => None,
                };
                self.run(family, device, dir, progress, &Gta::new(settings, cuts))
            }
        }
    }

    /// Runs `method` over every tensor.
    fn run<M: Method>(
        &self,
        family: &Family,
        device: &Device,
        dir: &Path,
        progress: &dyn Progress,
        method: &M,
    ) -> Result<()> {
        self.write_all(family, progress, dir, &mut |t, out| {
            self.write_with(family, device, method, t, out)
        })
    }

    /// Opens each shard in turn and writes its tensors with `write`.
    fn write_all(
        &self,
        family: &Family,
        progress: &dyn Progress,
        dir: &Path,
        write: &mut WriteTensor<'_>,
    ) -> Result<()> {
        progress.begin(self.input_bytes());
        let mut buffer = Vec::new();
        let mut expanded = Expanded::default();
        for (k, shard) in self.layout.shards.iter().enumerate() {
            let mut writer = ShardWriter::create(dir, &self.layout, k)?;
            for planned in &self.tensors[shard.tensors.clone()] {
                if planned.out_type.is_none() {
                    // Not a float tensor: the base's bytes, verbatim, a
                    // chunk at a time so that its pages do not pile up.
                    let bytes = family.base.bytes(&planned.base);
                    for (i, chunk) in bytes.chunks(crate::writer::COPY_CHUNK).enumerate() {
                        writer.write(chunk)?;
                        let from = i * crate::writer::COPY_CHUNK;
                        family.base.release(&planned.base, from, from + chunk.len());
                        progress.advance(chunk.len() as u64);
                    }
                    continue;
                }
                let mut out = Out {
                    writer: &mut writer,
                    buffer: &mut buffer,
                    expanded: &mut expanded,
                    progress,
                };
                match &planned.action {
                    Action::MergeRows(rows) => self.write_rows(family, planned, rows, &mut out)?,
                    _ => write(planned, &mut out)?,
                }
            }
            writer.finish()?;
        }
        if let Some(index) = self.layout.index_json() {
            let path = dir.join("model.safetensors.index.json");
            std::fs::write(&path, index).map_err(|e| Error::io("cannot write", &path, e))?;
        }
        crate::guard::check()?;
        progress.finish();
        Ok(())
    }

    /// The inputs of a merged (or copied) float tensor.
    fn inputs<'a>(
        &self,
        family: &'a Family,
        planned: &'a PlannedTensor,
        device: &Device,
    ) -> TensorInputs<'a> {
        let sources: &[(usize, ModelTensor)] = match &planned.action {
            Action::Merge(s) => s,
            Action::Copy | Action::MergeRows(_) => &[],
        };
        let input = |ckpt, tensor: &'a TensorRef| Input {
            ckpt,
            tensor,
            ty: tensor.float_type().expect("float tensor"),
        };
        TensorInputs {
            name: &planned.name,
            shape: &planned.base.shape,
            ordinal: self.ordinal(planned),
            base: input(&family.base, &planned.base),
            models: sources
                .iter()
                .map(|(i, held)| (*i, ModelInput::new(family.models[*i].checkpoint(), held)))
                .collect(),
            device: device.candle(),
            keep_pages: false,
        }
    }

    /// Position of `planned` in the output order.
    fn ordinal(&self, planned: &PlannedTensor) -> usize {
        self.tensors
            .iter()
            .position(|t| std::ptr::eq(t, planned))
            .expect("a tensor of this plan")
    }

    /// Produces one tensor segment by segment: `compute(start, end, out)`
    /// fills the output bytes of elements `start..end` and returns how many
    /// are not finite. Segments are multiples of `unit` elements.
    fn stream_tensor(
        &self,
        family: &Family,
        inputs: &TensorInputs<'_>,
        planned: &PlannedTensor,
        unit: usize,
        out: &mut Out<'_>,
        compute: &ComputeSegment<'_>,
    ) -> Result<()> {
        let (writer, buffer, progress) = (&mut *out.writer, &mut *out.buffer, out.progress);
        let expanded = &mut *out.expanded;
        let out_type = planned.out_type.expect("float tensor");
        let numel = planned.base.numel();
        let segment = (SEGMENT / unit).max(1) * unit;
        let mut start = 0;
        while start < numel {
            crate::testhooks::before_segment();
            if interrupt::requested() {
                return Err(Error::Interrupted);
            }
            let end = (start + segment).min(numel);
            inputs.expand(start, end, expanded)?;
            buffer.resize((end - start) * out_type.size(), 0);
            let nonfinite = compute(start, end, expanded, buffer)?;
            crate::guard::check()?;
            if nonfinite > 0 && !self.options.allow_nonfinite {
                return Err(nonfinite_error(
                    family, inputs, expanded, planned, start, end,
                ));
            }
            let full = std::mem::take(buffer);
            *buffer = writer.write_owned(full)?;
            inputs.release(start, end);
            let read: usize = inputs.base.ty.byte_range(start, end).len()
                + inputs
                    .models
                    .iter()
                    .map(|(_, m)| m.read_len(start, end))
                    .sum::<usize>();
            progress.advance(read as u64);
            start = end;
        }
        Ok(())
    }

    /// Task Arithmetic (and copies) through the fused kernel or the GPU.
    fn write_fused(
        &self,
        family: &Family,
        device: &Device,
        planned: &PlannedTensor,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let inputs = self.inputs(family, planned, device);
        let out_type = planned.out_type.expect("float tensor");
        let lambdas: Vec<f64> = match &planned.params {
            Some(p) => inputs
                .models
                .iter()
                .map(|&(m, _)| p.scale * p.weight[m])
                .collect(),
            None => Vec::new(),
        };
        let compute = |start: usize, end: usize, expanded: &Expanded, out: &mut [u8]| {
            let base = inputs.base.range(start, end);
            // An untouched tensor of an adapter adds λ·0: left out.
            let addends: Vec<Addend<'_>> = inputs
                .models
                .iter()
                .zip(&lambdas)
                .enumerate()
                .filter_map(|(slot, ((_, m), &lambda))| {
                    let op = m.operand(slot, start, end, expanded)?;
                    Some(Addend {
                        lambda,
                        ty: op.ty,
                        bytes: op.bytes,
                        is_delta: op.is_delta,
                    })
                })
                .collect();
            compute_segment(device, inputs.base.ty, base, &addends, out_type, out)
        };
        if inputs.models.is_empty() && inputs.base.ty == out_type {
            // A plain copy: the base's bytes, segment by segment.
            return self.stream_tensor(family, &inputs, planned, 1, out, &|s, e, _, bytes| {
                bytes.copy_from_slice(inputs.base.range(s, e));
                Ok(count_nonfinite(out_type, bytes))
            });
        }
        self.stream_tensor(family, &inputs, planned, 1, out, &compute)
    }

    /// A tensor through `method`: its pre-pass, then the combine.
    fn write_with<M: Method>(
        &self,
        family: &Family,
        device: &Device,
        method: &M,
        planned: &PlannedTensor,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let Some(params) = &planned.params else {
            return self.write_fused(family, &Device::Cpu, planned, out);
        };
        let mut inputs = self.inputs(family, planned, device);
        inputs.keep_pages_if_small();
        let state = method.prepare(&inputs, params)?;
        let out_type = planned.out_type.expect("float tensor");
        let block = inputs.block_len(method.rows());
        let task = (TASK / block).max(1) * block;
        let os = out_type.size();
        let compute = |start: usize, _end: usize, expanded: &Expanded, out: &mut [u8]| {
            Ok(out
                .par_chunks_mut(task * os)
                .enumerate()
                .map(|(k, out)| {
                    crate::simd::fastest(CombineTask {
                        method,
                        state: &state,
                        inputs: &inputs,
                        expanded,
                        params,
                        block,
                        out_type,
                        first: start + k * task,
                        out,
                    })
                })
                .sum())
        };
        self.stream_tensor(family, &inputs, planned, task, out, &compute)
    }

    /// Whole-model cuts for `--density-scope model`: each model keeps its
    /// ⌊ρ N⌋ largest entries over all N entries of the tensors it merges
    /// into (ρ and γ must then be one number per model).
    fn model_cuts(&self, family: &Family, device: &Device) -> Result<Vec<ModelCut>> {
        let kind = self.recipe.settings.kind;
        let merged: Vec<&PlannedTensor> = self
            .tensors
            .iter()
            .filter(|t| matches!(t.action, Action::Merge(_)))
            .collect();
        let inputs: Vec<TensorInputs<'_>> = merged
            .iter()
            .map(|t| self.inputs(family, t, device))
            .collect();
        let k = family.models.len();
        let mut entries = vec![0u64; k];
        let mut density: Vec<Option<f64>> = vec![None; k];
        let mut gamma: Vec<Option<f64>> = vec![None; k];
        for (planned, t) in merged.iter().zip(&inputs) {
            let p = planned
                .params
                .as_ref()
                .expect("merged tensors have parameters");
            for &(m, _) in &t.models {
                entries[m] += t.numel() as u64;
                for (seen, value, what) in [
                    (&mut density[m], p.density[m], "density"),
                    (&mut gamma[m], p.gamma[m], "gamma"),
                ] {
                    match seen {
                        Some(v) if *v != value => {
                            return Err(Error::InvalidArgument(format!(
                                "--density-scope model needs one {what} per model, but model '{}' \
                                 has {v} and {value} on different tensors",
                                family.names[m]
                            )))
                        }
                        _ => *seen = Some(value),
                    }
                }
            }
        }
        let mut targets = Vec::new();
        let sparsification = kind.sparsification().expect("a magnitude method");
        let pending: Vec<Pending> = (0..k)
            .map(|m| {
                let (rho, gamma) = (density[m].unwrap_or(1.0), gamma[m].unwrap_or(0.0));
                Pending::magnitude(sparsification, m, rho, gamma, entries[m], &mut targets)
            })
            .collect();
        let cuts: Vec<Arc<_>> = if targets.is_empty() {
            Vec::new()
        } else {
            select::select_counted(&inputs, &targets, &self.recipe.magnitude_counts)?
                .into_iter()
                .map(Arc::new)
                .collect()
        };
        Ok(pending
            .into_iter()
            .enumerate()
            .map(|(model, p)| ModelCut {
                model,
                mask: p.resolve(&cuts),
            })
            .collect())
    }
}

/// One parallel task of a method's merge: elements `first..` into `out`,
/// block by block: combine in f64 (from the stored bf16 words where the
/// method can, else decoded), round once.
struct CombineTask<'a, M: Method> {
    method: &'a M,
    state: &'a M::State,
    inputs: &'a TensorInputs<'a>,
    expanded: &'a Expanded,
    params: &'a TensorParams,
    block: usize,
    out_type: FloatType,
    first: usize,
    out: &'a mut [u8],
}

impl<M: Method> crate::simd::Kernel for CombineTask<'_, M> {
    /// How many merged values are not finite.
    type Output = usize;

    #[inline(always)]
    fn run(self) -> usize {
        let out_type = self.out_type;
        let last = self.first + self.out.len() / out_type.size();
        let mut decoded = DecodeScratch::default();
        let mut scratch = Scratch::default();
        let mut merged = Vec::new();
        let mut words = Vec::new();
        let mut nonfinite = 0;
        let mut s = self.first;
        while s < last {
            let e = (s + self.block).min(last);
            merged.resize(e - s, 0.0);
            // Straight from the stored words where the method can, else
            // decoded; either way a non-finite input makes its entry NaN.
            let from_words = self.inputs.bf16_block(s, e, &mut words).filter(|stored| {
                self.method.combine_bf16(
                    self.state,
                    self.inputs,
                    self.params,
                    stored,
                    &mut scratch,
                    &mut merged,
                )
            });
            match from_words {
                Some(stored) => propagate_nonfinite(&stored, &mut merged),
                None => {
                    let b = self.inputs.decode(s, e, self.expanded, &mut decoded);
                    self.method.combine(
                        self.state,
                        self.inputs,
                        self.params,
                        &b,
                        &mut scratch,
                        &mut merged,
                    );
                    propagate_nonfinite(&b, &mut merged);
                }
            }
            let bytes = &mut self.out[out_type.byte_range(s - self.first, e - self.first)];
            encode_f64(out_type, &merged, bytes);
            nonfinite += count_nonfinite(out_type, bytes);
            s = e;
        }
        nonfinite
    }
}

/// Makes every merged value whose inputs hold NaN or infinity NaN, whatever
/// the method did with them (trimming, dropping or sign election may leave
/// such an entry out), so the non-finite check refuses it and names the
/// input, as for Task Arithmetic.
#[inline(always)]
fn propagate_nonfinite<O: Operands>(block: &O, merged: &mut [f64]) {
    // Inputs are nearly always finite: a block is rewritten only when it
    // holds a non-finite input.
    if block.finite() {
        return;
    }
    let inputs =
        std::iter::once(block.base()).chain((0..block.model_count()).map(|i| block.model(i)));
    for input in inputs {
        for (j, m) in merged.iter_mut().enumerate() {
            *m = crate::simd::nan_if(*m, !input.at(j).is_finite());
        }
    }
}

/// Merges one segment on `device` into `out`; returns how many merged
/// values are NaN or infinite.
fn compute_segment(
    device: &Device,
    base_type: FloatType,
    base: &[u8],
    addends: &[Addend<'_>],
    out_type: FloatType,
    out: &mut [u8],
) -> Result<usize> {
    match device {
        Device::Cpu => {
            let os = out_type.size();
            let nonfinite = out
                .par_chunks_mut(TASK * os)
                .enumerate()
                .map(|(k, out)| {
                    let e0 = k * TASK;
                    let e1 = e0 + out.len() / os;
                    let parts: Vec<Addend<'_>> = addends
                        .iter()
                        .map(|a| Addend {
                            bytes: &a.bytes[a.ty.byte_range(e0, e1)],
                            ..*a
                        })
                        .collect();
                    let b = &base[base_type.byte_range(e0, e1)];
                    if parts.is_empty() {
                        convert_range(base_type, b, out_type, out);
                        count_nonfinite(out_type, out)
                    } else {
                        merge_range(base_type, b, &parts, out_type, out)
                    }
                })
                .sum();
            Ok(nonfinite)
        }
        Device::Cuda(dev) => {
            crate::gpu::merge_segment(dev, base_type, base, addends, out_type, out)
        }
    }
}

/// The error for non-finite output values: names the input that holds NaN
/// or infinity, or says the merge (or the conversion) overflowed.
fn nonfinite_error(
    family: &Family,
    inputs: &TensorInputs<'_>,
    expanded: &Expanded,
    planned: &PlannedTensor,
    start: usize,
    end: usize,
) -> Error {
    let name = &planned.name;
    let has_nonfinite = |input: &Input<'_>| {
        let bytes = input.range(start, end);
        let mut values = vec![0f64; end - start];
        crate::dtype::decode_f64(input.ty, bytes, &mut values);
        values.iter().any(|v| !v.is_finite())
    };
    let culprit = if has_nonfinite(&inputs.base) {
        Some("the base model".to_string())
    } else {
        inputs
            .models
            .iter()
            .enumerate()
            .find(|(slot, (_, m))| match m {
                ModelInput::Stored(m) => has_nonfinite(m),
                ModelInput::Adapter { .. } => expanded
                    .delta(*slot, start, end)
                    .iter()
                    .any(|v| !v.is_finite()),
                ModelInput::Untouched => false,
            })
            .map(|(_, (i, _))| format!("model '{}'", family.names[*i]))
    };
    let out_type = planned.out_type.expect("float tensor");
    // Whether the base's values alone, in the output type, overflow it.
    let base_overflows = || {
        let mut values = vec![0f64; end - start];
        crate::dtype::decode_f64(inputs.base.ty, inputs.base.range(start, end), &mut values);
        let mut bytes = vec![0u8; (end - start) * out_type.size()];
        encode_f64(out_type, &values, &mut bytes);
        count_nonfinite(out_type, &bytes) > 0
    };
    let action = if inputs.models.is_empty() {
        "copy them anyway"
    } else {
        "merge anyway"
    };
    match culprit {
        Some(who) => Error::Incompatible(format!(
            "tensor '{name}': {who} holds NaN or infinite values; pass --allow-nonfinite to {action}"
        )),
        None if inputs.models.is_empty() || base_overflows() => Error::Incompatible(format!(
            "tensor '{name}': the base's values overflow {out_type}; choose a wider --dtype \
             (or keep the base's), or pass --allow-nonfinite to write them as infinity"
        )),
        None => Error::Incompatible(format!(
            "tensor '{name}': merged values overflow {out_type}; use smaller weights, a wider --dtype, \
             or pass --allow-nonfinite"
        )),
    }
}
