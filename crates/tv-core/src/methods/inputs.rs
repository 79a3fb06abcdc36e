//! One tensor's inputs to a merge method, and the passes that read them.
//!
//! [`TensorInputs`] names the base's tensor and the tensor of every model
//! that stores it. Every read of tensor data by a method goes through
//! [`TensorInputs::scan`]: segment by segment (so resident memory stays
//! bounded and an interrupt is noticed between segments), each segment
//! split into one contiguous part per thread, each part decoded into f64
//! [`Block`]s that a visitor folds into a per-thread accumulator (or, for
//! bf16 inputs and a visitor that can, handed over as the stored words: see
//! [`super::operands`]); the pages of a segment are released once it is
//! done. The merge's own write pass reads blocks the same way
//! ([`TensorInputs::decode`], [`TensorInputs::bf16_block`]).

use super::operands::Bf16Block;
use crate::checkpoint::{Checkpoint, TensorRef};
use crate::dtype::{decode_f64_finite, FloatType};
use crate::error::{Error, Result};
use crate::family::ModelTensor;
use crate::interrupt;
use crate::kernels::Operand;
use crate::lora::expand::{delta_range, BaseRange};
use crate::lora::AdapterTensor;
use rayon::prelude::*;

/// Elements per segment of a pass: bounds the pages resident at once.
pub(crate) const SEGMENT: usize = 1 << 22;
/// Most bytes of one tensor's inputs that a pre-pass leaves resident for
/// the merge pass right after it.
pub(crate) const KEEP_RESIDENT: usize = 64 << 20;
/// Elements per block handed to a visitor or a combine step. Blocks of a
/// tensor start at multiples of this (unless whole rows are asked for).
pub(crate) const BLOCK: usize = 2048;

/// One input tensor: the checkpoint that stores it, where, and its type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Input<'a> {
    pub ckpt: &'a Checkpoint,
    pub tensor: &'a TensorRef,
    pub ty: FloatType,
}

impl<'a> Input<'a> {
    /// The bytes of elements `start..end`, as mapped.
    pub fn range(&self, start: usize, end: usize) -> &'a [u8] {
        &self.ckpt.bytes(self.tensor)[self.ty.byte_range(start, end)]
    }

    /// Drops the pages of elements `start..end` from the resident set.
    pub fn release(&self, start: usize, end: usize) {
        let r = self.ty.byte_range(start, end);
        self.ckpt.release(self.tensor, r.start, r.end);
    }
}

/// What one model gives a tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ModelInput<'a> {
    /// A stored tensor of the base's shape.
    Stored(Input<'a>),
    /// An adapter's factors and/or full weight, in its file.
    Adapter {
        file: &'a Checkpoint,
        tensor: &'a AdapterTensor,
    },
    /// An adapter that leaves the tensor alone (a zero task vector).
    Untouched,
}

impl<'a> ModelInput<'a> {
    /// The input for what a model holds for a tensor (`file`: the model's
    /// weight file, [`crate::family::Model::checkpoint`]).
    pub fn new(file: &'a Checkpoint, held: &'a ModelTensor) -> Self {
        match held {
            ModelTensor::Stored(tensor) => Self::Stored(Input {
                ckpt: file,
                tensor,
                ty: tensor.float_type().expect("a float tensor"),
            }),
            ModelTensor::Adapter(tensor) => Self::Adapter { file, tensor },
            ModelTensor::Untouched => Self::Untouched,
        }
    }

    /// Bytes of the model's files that elements `start..end` read.
    pub fn read_len(&self, start: usize, end: usize) -> usize {
        match self {
            Self::Stored(s) => s.ty.byte_range(start, end).len(),
            _ => 0,
        }
    }

    /// Elements `start..end` as the fused kernels take them: the stored
    /// values, or the adapter's task vector expanded into `expanded` (as
    /// f64); `None` for an untouched tensor.
    pub fn operand<'x>(
        &'x self,
        slot: usize,
        start: usize,
        end: usize,
        expanded: &'x Expanded,
    ) -> Option<Operand<'x>> {
        match self {
            Self::Stored(s) => Some(Operand {
                ty: s.ty,
                bytes: s.range(start, end),
                is_delta: false,
            }),
            Self::Adapter { .. } => Some(Operand {
                ty: FloatType::F64,
                bytes: bytemuck::cast_slice(expanded.delta(slot, start, end)),
                is_delta: true,
            }),
            Self::Untouched => None,
        }
    }
}

/// The adapters' task vectors over one segment of a tensor: one buffer per
/// model slot (empty for stored models).
#[derive(Debug, Default)]
pub(crate) struct Expanded {
    start: usize,
    deltas: Vec<Vec<f64>>,
}

impl Expanded {
    /// Slot `slot`'s task vector for elements `start..end` of the segment.
    pub fn delta(&self, slot: usize, start: usize, end: usize) -> &[f64] {
        &self.deltas[slot][start - self.start..end - self.start]
    }
}

/// The base's tensor and the same tensor of each model that stores it.
#[derive(Debug, Clone)]
pub(crate) struct TensorInputs<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    /// Position of the tensor in the base's storage order.
    pub ordinal: usize,
    pub base: Input<'a>,
    /// The models that take part in this tensor, with their index in the family.
    pub models: Vec<(usize, ModelInput<'a>)>,
    /// Where adapters' products are computed.
    pub device: candle_core::Device,
    /// Whether a pass leaves the tensor's pages resident, for a pass that
    /// follows at once (see [`TensorInputs::keep_pages_if_small`]).
    pub keep_pages: bool,
}

/// A decoded block: elements `first..first + len` of the base and of every
/// model of a [`TensorInputs`], in f64.
#[derive(Debug)]
pub(crate) struct Block<'a> {
    pub first: usize,
    pub len: usize,
    pub base: &'a [f64],
    /// Model-major: model `i`'s values are `models[i * len..(i + 1) * len]`.
    pub models: &'a [f64],
    /// Every value of `base` and `models` is finite.
    pub finite: bool,
}

impl Block<'_> {
    /// Model `i`'s values.
    pub fn model(&self, i: usize) -> &[f64] {
        &self.models[i * self.len..(i + 1) * self.len]
    }

    /// Model `i`'s task-vector element `j`: m − b.
    #[inline(always)]
    pub fn delta(&self, i: usize, j: usize) -> f64 {
        self.models[i * self.len + j] - self.base[j]
    }
}

/// Reusable decode buffers for one thread.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    base: Vec<f64>,
    models: Vec<f64>,
}

impl<'a> TensorInputs<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of a row (the last dimension; the whole tensor for scalars).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1)
    }

    /// Whether any model is an adapter (whose segments need expanding).
    pub fn has_adapters(&self) -> bool {
        self.models
            .iter()
            .any(|(_, m)| matches!(m, ModelInput::Adapter { .. }))
    }

    /// Computes every adapter's task vector for elements `start..end` into
    /// `into`, for the decoding of that segment.
    pub fn expand(&self, start: usize, end: usize, into: &mut Expanded) -> Result<()> {
        if !self.has_adapters() {
            return Ok(());
        }
        into.start = start;
        into.deltas.resize_with(self.models.len(), Vec::new);
        for ((_, m), out) in self.models.iter().zip(&mut into.deltas) {
            match m {
                ModelInput::Adapter { file, tensor } => delta_range(
                    file,
                    tensor,
                    self.shape,
                    BaseRange {
                        ty: self.base.ty,
                        bytes: self.base.range(start, end),
                    },
                    &self.device,
                    start..end,
                    out,
                )?,
                _ => out.clear(),
            }
        }
        Ok(())
    }

    /// Decodes elements `start..end` (inside the segment `expanded` holds)
    /// into `scratch` and returns the block. An adapter's values are
    /// base + ΔW in f64; an untouched tensor's are the base's.
    #[inline(always)]
    pub fn decode<'s>(
        &self,
        start: usize,
        end: usize,
        expanded: &Expanded,
        scratch: &'s mut Scratch,
    ) -> Block<'s> {
        let len = end - start;
        let k = self.models.len();
        scratch.base.resize(len, 0.0);
        scratch.models.resize(k * len, 0.0);
        let base = &mut scratch.base;
        let mut finite = decode_f64_finite(self.base.ty, self.base.range(start, end), base);
        for (i, (_, m)) in self.models.iter().enumerate() {
            let out = &mut scratch.models[i * len..(i + 1) * len];
            finite &= match m {
                ModelInput::Stored(s) => decode_f64_finite(s.ty, s.range(start, end), out),
                ModelInput::Adapter { .. } => {
                    let d = expanded.delta(i, start, end);
                    let mut all = true;
                    for ((o, &d), &b) in out.iter_mut().zip(d).zip(base.iter()) {
                        *o = b + d;
                        all &= o.is_finite();
                    }
                    all
                }
                ModelInput::Untouched => {
                    out.copy_from_slice(base);
                    true
                }
            };
        }
        Block {
            first: start,
            len,
            base: &scratch.base,
            models: &scratch.models,
            finite,
        }
    }

    /// Elements `start..end` as the stored words, when the base and every
    /// stored model hold the tensor as bf16 at an aligned offset; `words`
    /// is filled with the models' slices (a model an adapter leaves
    /// untouched reads the base's). None otherwise (other types, adapters
    /// that change the tensor, or a big-endian machine): the block is
    /// decoded.
    #[inline(always)]
    pub fn bf16_block<'s>(
        &'s self,
        start: usize,
        end: usize,
        words: &'s mut Vec<&'a [u16]>,
    ) -> Option<Bf16Block<'s>> {
        let stored = |input: &Input<'a>| -> Option<&'a [u16]> {
            if input.ty != FloatType::BF16 {
                return None;
            }
            crate::dtype::bf16_words(input.range(start, end))
        };
        let base = stored(&self.base)?;
        words.clear();
        for (_, m) in &self.models {
            match m {
                ModelInput::Stored(s) => words.push(stored(s)?),
                ModelInput::Untouched => words.push(base),
                ModelInput::Adapter { .. } => return None,
            }
        }
        Some(Bf16Block {
            first: start,
            len: end - start,
            base,
            models: words,
        })
    }

    /// Lets a pre-pass leave the tensor's pages resident for the merge
    /// pass that follows, when every input's bytes together come to at most
    /// [`KEEP_RESIDENT`]: the merge then finds them mapped instead of
    /// faulting them in a second time. Larger tensors are released segment
    /// by segment as usual, so resident memory stays bounded.
    pub fn keep_pages_if_small(&mut self) {
        let n = self.numel();
        let bytes = self.base.ty.byte_range(0, n).len()
            + self
                .models
                .iter()
                .map(|(_, m)| m.read_len(0, n))
                .sum::<usize>();
        self.keep_pages = bytes <= KEEP_RESIDENT;
    }

    /// Drops the pages of elements `start..end` of every input.
    pub fn release(&self, start: usize, end: usize) {
        self.base.release(start, end);
        for (_, m) in &self.models {
            if let ModelInput::Stored(m) = m {
                m.release(start, end);
            }
        }
    }

    /// Blocks of a pass: [`BLOCK`] elements, or whole rows when `rows`.
    pub fn block_len(&self, rows: bool) -> usize {
        if rows {
            let row = self.row_len();
            (BLOCK / row).max(1) * row
        } else {
            BLOCK
        }
    }

    /// Reads the whole tensor once: every element range is passed to
    /// `visitor` with the accumulator of the thread part it falls in, as
    /// stored bf16 words when the visitor takes them
    /// ([`Visit::visit_bf16`]), else decoded into a [`Block`]. `accs` holds one accumulator per part (typically
    /// one per thread); blocks within a part come in increasing order.
    /// With `rows`, every block holds whole rows. Each part runs compiled
    /// for the CPU's widest vector extension.
    pub fn scan<V: Visit>(&self, rows: bool, accs: &mut [V::Acc], visitor: &V) -> Result<()> {
        let n = self.numel();
        let block = self.block_len(rows);
        let segment = (SEGMENT / block).max(1) * block;
        let parts = accs.len().max(1);
        let mut expanded = Expanded::default();
        let mut start = 0;
        while start < n {
            if interrupt::requested() {
                return Err(Error::Interrupted);
            }
            let end = (start + segment).min(n);
            self.expand(start, end, &mut expanded)?;
            let expanded = &expanded;
            let blocks = (end - start).div_ceil(block);
            let per_part = blocks.div_ceil(parts);
            accs.par_iter_mut().enumerate().for_each(|(p, acc)| {
                let first = start + p * per_part * block;
                crate::simd::fastest(ScanPart {
                    inputs: self,
                    expanded,
                    visitor,
                    acc,
                    first,
                    last: (first + per_part * block).min(end),
                    block,
                })
            });
            if !self.keep_pages {
                self.release(start, end);
            }
            crate::guard::check()?;
            start = end;
        }
        Ok(())
    }
}

/// What a pass over a tensor does with each block (decoded, or as stored
/// bf16 words where it has a form for them).
/// Implementations mark `visit` `#[inline(always)]` so it is compiled into
/// the vectorised copy of the pass.
pub(crate) trait Visit: Sync {
    /// What one thread part accumulates.
    type Acc: Send;
    fn visit(&self, acc: &mut Self::Acc, block: &Block<'_>);

    /// [`visit`](Self::visit) on the stored bf16 words, when the visitor
    /// has such a form and the CPU runs it; false (nothing done) otherwise,
    /// and the block is decoded instead.
    #[inline(always)]
    fn visit_bf16(&self, _acc: &mut Self::Acc, _block: &Bf16Block<'_>) -> bool {
        false
    }
}

/// One thread part of a [`TensorInputs::scan`].
struct ScanPart<'a, 'b, V: Visit> {
    inputs: &'a TensorInputs<'b>,
    expanded: &'a Expanded,
    visitor: &'a V,
    acc: &'a mut V::Acc,
    first: usize,
    last: usize,
    block: usize,
}

impl<V: Visit> crate::simd::Kernel for ScanPart<'_, '_, V> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let mut scratch = Scratch::default();
        let mut words = Vec::new();
        let mut s = self.first;
        while s < self.last {
            let e = (s + self.block).min(self.last);
            let visited = match self.inputs.bf16_block(s, e, &mut words) {
                Some(stored) => self.visitor.visit_bf16(self.acc, &stored),
                None => false,
            };
            if !visited {
                let b = self.inputs.decode(s, e, self.expanded, &mut scratch);
                self.visitor.visit(self.acc, &b);
            }
            s = e;
        }
    }
}

/// Accumulators of float sums: a fixed number of parts, whatever the thread
/// count, so each part sums the same elements in the same order on every
/// machine and the total (added in part order) is bit-identical.
pub(crate) fn fixed_parts<A>(init: impl Fn() -> A) -> Vec<A> {
    (0..16).map(|_| init()).collect()
}

/// One accumulator per thread of rayon's pool, made by `init` (for counts,
/// whose totals do not depend on how the work is split).
pub(crate) fn per_thread<A>(init: impl Fn() -> A) -> Vec<A> {
    (0..rayon::current_num_threads().max(1))
        .map(|_| init())
        .collect()
}
