//! The single-pass task-vector analysis.
//!
//! Walks the base's tensors once in storage order. For each float tensor,
//! one fused pass over the base and every model that stores it (same shape)
//! gathers each model's moments, L1, max |d|, zero and non-finite counts and
//! the dot products between all pairs of task vectors; then, model by model,
//! the delta is written into one reusable buffer (f32 when exact, else f64)
//! for exact quantiles. Inputs are read in bounded segments whose pages are
//! released after use, so memory stays near the largest tensor's buffer.
//! An adapter's task vector is expanded segment by segment (s·B·A in f64,
//! on the chosen device) and enters the same kernels as a delta; a tensor
//! an adapter leaves alone is a zero task vector, counted as unchanged
//! without reading anything of the adapter.
//!
//! When a fine-tune's embedding or lm_head has another number of rows than
//! the base's and both have a readable `tokenizer.json`, its task vector
//! there is taken over the base's tokens ([`crate::vocab::Alignment`]):
//! each segment of the base's rows is compared with the model's rows of the
//! same tokens, gathered into a segment buffer; a base token the model
//! lacks counts as an unchanged row (its delta is zero), and the rows of
//! tokens the base lacks are counted in the summary's `vocab`, not compared
//! with unrelated base rows. Only stored checkpoints are gathered: an
//! adapter's tensors have the base's shape, so its rows are the base's.

use crate::checkpoint::TensorRef;
use crate::device::Device;
use crate::diagnostics::{cosine_matrix, Collector, Diagnostics};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::family::{is_input_embedding, Family, Model, ModelTensor};
use crate::interrupt;
use crate::kernels::{
    delta_into_f32, delta_into_f64, delta_nonzero, delta_stats, DeltaAcc, Operand,
};
use crate::magnitude::TensorMagnitudes;
use crate::methods::inputs::{Expanded, Input, ModelInput, TensorInputs};
use crate::progress::Progress;
use crate::quantile::{quantiles_with, Sample};
use crate::stats::{group_of, module_of, TensorRow};
use crate::vocab::{is_vocab_tensor, Alignment, VocabCounts};
use crate::weights::{lambdas_from_norms, Mode, WeightParams};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};
use std::borrow::Cow;

const SEGMENT: usize = 1 << 22;
const TASK: usize = 1 << 16;

/// Options of the analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Count a tied embedding a second time as `lm_head.weight`, as the
    /// original tool did for tied models loaded from shards.
    pub count_tied_lm_head: bool,
    /// Where adapters' products are computed.
    pub device: Device,
    /// Sketch the singular values of every 2-D task-vector tensor on this
    /// device (`--spectral`).
    pub spectral: Option<candle_core::Device>,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self {
            count_tied_lm_head: false,
            device: Device::Cpu,
            spectral: None,
        }
    }
}

/// One 2-D tensor's spectrum for one model (`spectral.csv`).
#[derive(Debug, Clone)]
pub struct SpectralRow {
    pub param: String,
    pub model: usize,
    pub rows: usize,
    pub cols: usize,
    pub spectrum: crate::spectral::Spectrum,
}

/// A tensor left out of one model's analysis, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub param: String,
    pub reason: String,
}

/// L2, L1 and element count of a set of tensors.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupStats {
    pub l2: f64,
    pub l1: f64,
    pub param_count_approx: u64,
    #[serde(skip)]
    sum_sq: f64,
}

/// `summary.json` of one model: the original's keys first.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub global_l2: f64,
    pub global_l1: f64,
    pub n_params_considered: usize,
    pub skipped_params: usize,
    pub groups: Map<String, Value>,
    pub modules: Map<String, Value>,
    pub skipped: Vec<Skipped>,
    pub total_elements: u64,
    pub base_global_l2: f64,
    pub relative_change: f64,
    pub unchanged_fraction: f64,
    pub nonfinite_elements: u64,
    pub tied_embeddings: bool,
    pub lm_head_counted_twice: bool,
    /// Tokens matched, added and missing, when the embedding rows were
    /// matched by token (the model's vocabulary differs from the base's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab: Option<VocabCounts>,
}

/// One model's results.
#[derive(Debug, Clone)]
pub struct ModelAnalysis {
    pub name: String,
    pub spec: String,
    pub rows: Vec<TensorRow>,
    pub summary: Summary,
}

/// The whole analysis.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub base: String,
    pub models: Vec<ModelAnalysis>,
    /// Cosine similarity of every pair of task vectors (0 for a zero vector).
    pub cosines: Vec<Vec<f64>>,
    /// The merge diagnostics (every tensor counted once; an adapter's
    /// untouched tensors as zero task vectors).
    pub diagnostics: Diagnostics,
    /// With `--spectral`: every 2-D tensor's spectrum per model, and the
    /// seconds the sketches took.
    pub spectral: Option<(Vec<SpectralRow>, f64)>,
    /// What the caller should tell the user (a resized embedding whose rows
    /// could not be matched by token, and why).
    pub notes: Vec<String>,
}

impl Analysis {
    /// The merge weights each mode would give from the global L2 norms, or
    /// the reason a mode cannot.
    pub fn merge_weights(&self) -> Vec<(Mode, std::result::Result<Vec<f64>, String>)> {
        let names: Vec<String> = self.models.iter().map(|m| m.name.clone()).collect();
        let norms: Vec<f64> = self.models.iter().map(|m| m.summary.global_l2).collect();
        Mode::ALL
            .iter()
            .map(|&mode| {
                let params = WeightParams {
                    mode,
                    ..Default::default()
                };
                (
                    mode,
                    lambdas_from_norms(&names, &norms, params).map_err(|e| e.to_string()),
                )
            })
            .collect()
    }
}

/// Runs the analysis of `family`.
pub fn analyze(family: &Family, opts: AnalyzeOptions, progress: &dyn Progress) -> Result<Analysis> {
    family.check_overlap()?;
    family.refuse_low_precision("analysed")?;
    let k = family.models.len();
    let mut rows: Vec<Vec<TensorRow>> = vec![Vec::new(); k];
    let mut skipped: Vec<Vec<Skipped>> = vec![Vec::new(); k];
    let mut base_sum_sq = vec![0f64; k];
    let mut dots = vec![0f64; k * k];
    let mut buffers = Buffers::default();
    let tied = family.base_ties_embeddings();
    // The tied embedding: its name, the models that change it, those that
    // leave it alone (adapters), and its sums.
    let mut tied_extra: Option<(String, Vec<usize>, Vec<usize>, DeltaAcc)> = None;
    let mut collector = Collector::new(k);
    let mut spectral: Vec<SpectralRow> = Vec::new();
    let mut spectral_seconds = 0.0;

    // Rows matched by token when vocabularies differ and can be read; else
    // resized tensors are skipped as before.
    let mut notes = Vec::new();
    let alignment = match Alignment::plan(family, None, false) {
        Ok(alignment) => alignment.filter(Alignment::needed),
        Err(e) => {
            notes.push(format!(
                "resized embedding rows are not matched by token, so those tensors are \
                 skipped (ta-merge would refuse them: {e})"
            ));
            None
        }
    };
    let work: Vec<TensorWork> = family
        .base
        .names()
        .iter()
        .map(|name| {
            let base = family.base.get(name).expect("listed");
            let aligned = alignment.as_ref().filter(|_| is_vocab_tensor(name));
            let mut sources = Vec::new();
            for (i, m) in family.models.iter().enumerate() {
                let held = m.tensor(name);
                let rows = aligned.map(|a| a.model_rows[i]);
                match skip_reason(base, held.as_ref(), rows) {
                    Some(reason) => skipped[i].push(Skipped {
                        param: name.clone(),
                        reason,
                    }),
                    None => sources.push((i, held.expect("present"))),
                }
            }
            TensorWork {
                name,
                base,
                sources,
                aligned,
            }
        })
        .collect();
    for (i, m) in family.models.iter().enumerate() {
        for name in m.extra_names(&family.base) {
            skipped[i].push(Skipped {
                param: name.clone(),
                reason: "not in the base".into(),
            });
        }
    }
    let total: u64 = work.iter().map(TensorWork::input_bytes).sum();
    progress.begin(total);

    for TensorWork {
        name,
        base,
        sources,
        aligned,
    } in &work
    {
        if sources.is_empty() {
            continue;
        }
        let inputs = tensor_inputs(family, name, base, sources, &opts.device);
        let maps = row_maps(family, &inputs, *aligned);
        let acc = fused_pass(&inputs, &maps, &mut buffers.expanded, progress)?;
        let indices: Vec<usize> = inputs.models.iter().map(|&(i, _)| i).collect();
        add_family_sums(&mut dots, &mut base_sum_sq, &indices, &acc);
        collector.add_tensor(inputs.clone(), maps.clone(), &acc);
        let ks = inputs.models.len();
        let spectral_from = spectral.len();
        // Adapters that leave the tensor alone: a zero task vector.
        for &(i, _) in sources
            .iter()
            .filter(|(_, h)| matches!(h, ModelTensor::Untouched))
        {
            base_sum_sq[i] += acc.base_sum_sq;
            collector.add_zero(i, base.numel() as u64);
            if let (Some(_), &[rows, cols]) = (&opts.spectral, &base.shape[..]) {
                spectral.push(SpectralRow {
                    param: name.to_string(),
                    model: i,
                    rows,
                    cols,
                    spectrum: crate::spectral::Spectrum {
                        fro: 0.0,
                        sigma: Vec::new(),
                    },
                });
            }
            rows[i].push(TensorRow {
                param: name.to_string(),
                shape: base.shape.clone(),
                l2: 0.0,
                l1: 0.0,
                maxabs: 0.0,
                mean: 0.0,
                std: 0.0,
                skew: 0.0,
                kurtosis_excess: 0.0,
                quantiles: [0.0; 11],
                numel: base.numel() as u64,
                nonfinite: 0,
                unchanged: base.numel() as u64,
                sum_sq: 0.0,
            });
        }
        for (slot, &(i, m)) in inputs.models.iter().enumerate() {
            let single = TensorInputs {
                models: vec![(i, m)],
                ..inputs.clone()
            };
            let s = &acc.models[slot];
            let (q, mags) = buffers.quantiles(&single, slot, maps[slot], s.unchanged, s.max_abs)?;
            collector.add_magnitudes(slot, i, &mags);
            if let (Some(device), &[rows, cols]) = (&opts.spectral, &base.shape[..]) {
                let started = std::time::Instant::now();
                let spectrum = buffers.spectrum(&single, slot, maps[slot], device, name, i)?;
                spectral_seconds += started.elapsed().as_secs_f64();
                spectral.push(SpectralRow {
                    param: name.to_string(),
                    model: i,
                    rows,
                    cols,
                    spectrum,
                });
            }
            rows[i].push(TensorRow {
                param: name.to_string(),
                shape: base.shape.clone(),
                l2: acc.dots[slot * ks + slot].sqrt(),
                l1: s.sum_abs,
                maxabs: s.max_abs,
                mean: s.moments.mean,
                std: s.moments.std(),
                skew: s.moments.skew(),
                kurtosis_excess: s.moments.kurtosis_excess(),
                quantiles: q,
                numel: base.numel() as u64,
                nonfinite: s.nonfinite,
                unchanged: s.unchanged,
                sum_sq: acc.dots[slot * ks + slot],
            });
        }
        // spectral.csv lists a tensor's models in the family's order.
        spectral[spectral_from..].sort_by_key(|r| r.model);
        if opts.count_tied_lm_head
            && tied
            && is_input_embedding(name)
            && !family.base.contains("lm_head.weight")
        {
            let untouched = sources
                .iter()
                .filter(|(_, h)| matches!(h, ModelTensor::Untouched))
                .map(|&(i, _)| i)
                .collect();
            tied_extra = Some((name.to_string(), indices, untouched, acc));
        }
    }
    progress.finish();

    // The original counted a tied embedding twice, once as lm_head.weight.
    let counted_twice = tied_extra.is_some();
    if let Some((embed, idx, untouched, acc)) = tied_extra {
        add_family_sums(&mut dots, &mut base_sum_sq, &idx, &acc);
        for &i in &untouched {
            base_sum_sq[i] += acc.base_sum_sq;
        }
        for &i in idx.iter().chain(&untouched) {
            if let Some(row) = rows[i].iter().find(|r| r.param == embed).cloned() {
                rows[i].push(TensorRow {
                    param: "lm_head.weight".into(),
                    ..row
                });
            }
        }
    }

    let models: Vec<ModelAnalysis> = (0..k)
        .map(|i| {
            let rows = std::mem::take(&mut rows[i]);
            let summary = summarise(
                &rows,
                std::mem::take(&mut skipped[i]),
                base_sum_sq[i],
                tied,
                counted_twice,
                alignment.as_ref().map(|a| a.counts[i]),
            );
            ModelAnalysis {
                name: family.names[i].clone(),
                spec: family.models[i].checkpoint().located.spec.clone(),
                rows,
                summary,
            }
        })
        .collect();
    let cosines = cosine_matrix(&dots, k);
    let norms: Vec<f64> = models
        .iter()
        .map(|m: &ModelAnalysis| m.summary.global_l2)
        .collect();
    let diagnostics = collector.finish(family, &norms)?;
    crate::guard::check()?;
    Ok(Analysis {
        base: family.base.located.spec.clone(),
        models,
        cosines,
        diagnostics,
        spectral: opts
            .spectral
            .is_some()
            .then_some((spectral, spectral_seconds)),
        notes,
    })
}

/// Adds one tensor's pairwise dot products and Σ base² (from `acc`, whose
/// models are `indices` of the family) to the family-wide sums.
fn add_family_sums(dots: &mut [f64], base_sum_sq: &mut [f64], indices: &[usize], acc: &DeltaAcc) {
    let k = base_sum_sq.len();
    let ks = indices.len();
    for (a, &i) in indices.iter().enumerate() {
        for (b, &j) in indices.iter().enumerate() {
            dots[i * k + j] += acc.dots[a * ks + b];
        }
        base_sum_sq[i] += acc.base_sum_sq;
    }
}

/// One tensor of the base and the models it can be compared with.
struct TensorWork<'a> {
    name: &'a str,
    base: &'a TensorRef,
    /// (model index, what the model holds for it)
    sources: Vec<(usize, ModelTensor)>,
    /// The rows' tokens, for a tensor matched by token.
    aligned: Option<&'a Alignment>,
}

/// For each model slot of a tensor's inputs: the model's row of each base
/// row, when its stored tensor is matched by token (stored checkpoints
/// only: an adapter's tensors have the base's rows).
pub(crate) type RowMaps<'a> = Vec<Option<&'a [Option<u32>]>>;

fn row_maps<'a>(
    family: &Family,
    inputs: &TensorInputs<'_>,
    aligned: Option<&'a Alignment>,
) -> RowMaps<'a> {
    inputs
        .models
        .iter()
        .map(|&(i, m)| match (aligned, m, &family.models[i]) {
            (Some(a), ModelInput::Stored(_), Model::Checkpoint(_)) => Some(a.maps[i].as_slice()),
            _ => None,
        })
        .collect()
}

/// A stored model's values of base elements `start..end`, in the model's
/// type: its stored bytes, or, matched by token (`rows`), its rows of the
/// same tokens gathered in the base's order (a token the model lacks takes
/// the base's values, a zero delta).
pub(crate) fn model_segment<'b>(
    base: &Input<'b>,
    model: &Input<'b>,
    rows: Option<&[Option<u32>]>,
    start: usize,
    end: usize,
) -> Cow<'b, [u8]> {
    let ty = model.ty;
    let bytes = model.ckpt.bytes(model.tensor);
    let Some(map) = rows else {
        return Cow::Borrowed(&bytes[ty.byte_range(start, end)]);
    };
    let base_ty = base.ty;
    let len = base.tensor.shape.last().copied().unwrap_or(1).max(1);
    let mut out = vec![0u8; (end - start) * ty.size()];
    let mut values = Vec::new();
    let mut e = start;
    while e < end {
        let r = e / len;
        let hi = ((r + 1) * len).min(end);
        let dst = &mut out[ty.byte_range(e - start, hi - start)];
        match map[r] {
            Some(j) => {
                let j = j as usize * len + (e - r * len);
                dst.copy_from_slice(&bytes[ty.byte_range(j, j + hi - e)]);
            }
            None if base_ty == ty => dst.copy_from_slice(base.range(e, hi)),
            None => {
                values.resize(hi - e, 0.0);
                crate::dtype::decode_f64(base_ty, base.range(e, hi), &mut values);
                crate::dtype::encode_f64(ty, &values, dst);
            }
        }
        e = hi;
    }
    Cow::Owned(out)
}

/// Drops the pages of a stored model's elements `start..end` (a tensor
/// matched by token, read out of order, is dropped whole at `end`).
fn release_model(
    model: &Input<'_>,
    rows: Option<&[Option<u32>]>,
    start: usize,
    end: usize,
    numel: usize,
) {
    match rows {
        None => model.release(start, end),
        Some(_) if end == numel => model.release(0, model.tensor.numel()),
        Some(_) => {}
    }
}

impl TensorWork<'_> {
    /// Bytes the fused pass reads (nothing when no model takes part).
    fn input_bytes(&self) -> u64 {
        if self.sources.is_empty() {
            return 0;
        }
        let models: usize = self
            .sources
            .iter()
            .map(|(_, held)| match held {
                ModelTensor::Stored(t) => t.nbytes(),
                _ => 0,
            })
            .sum();
        (self.base.nbytes() + models) as u64
    }
}

/// Why a model's tensor cannot be compared with the base's, if it cannot;
/// `rows`, for a tensor matched by token, is the model's embedding rows.
fn skip_reason(
    base: &TensorRef,
    model: Option<&ModelTensor>,
    rows: Option<usize>,
) -> Option<String> {
    if base.float_type().is_none() {
        return Some(format!("not a float tensor ({:?})", base.dtype));
    }
    let m = match model {
        None => return Some("missing from the model".into()),
        // Adapters are checked against the base when opened.
        Some(ModelTensor::Adapter(_) | ModelTensor::Untouched) => return None,
        Some(ModelTensor::Stored(m)) => m,
    };
    let expected = match (rows, &base.shape[..]) {
        (Some(rows), &[_, len]) => vec![rows, len],
        _ => base.shape.clone(),
    };
    if m.shape != expected {
        return Some(format!(
            "shape {:?} differs from the base's {:?}",
            m.shape, base.shape
        ));
    }
    if m.float_type().is_none() {
        return Some(format!("not a float tensor in the model ({:?})", m.dtype));
    }
    None
}

/// The inputs of one tensor's analysis: the base and every model that
/// stores it or adapts it (untouched tensors of adapters are left out).
fn tensor_inputs<'a>(
    family: &'a Family,
    name: &'a str,
    base: &'a TensorRef,
    sources: &'a [(usize, ModelTensor)],
    device: &Device,
) -> TensorInputs<'a> {
    let input = |ckpt, tensor: &'a TensorRef| Input {
        ckpt,
        tensor,
        ty: tensor.float_type().expect("float"),
    };
    TensorInputs {
        name,
        shape: &base.shape,
        ordinal: 0,
        base: input(&family.base, base),
        models: sources
            .iter()
            .filter(|(_, held)| !matches!(held, ModelTensor::Untouched))
            .map(|(i, held)| (*i, ModelInput::new(family.models[*i].checkpoint(), held)))
            .collect(),
        device: device.candle(),
        keep_pages: false,
    }
}

/// The fused statistics pass over one tensor of the base and its models.
/// `maps`: per model slot, its rows matched by token ([`row_maps`]).
fn fused_pass(
    inputs: &TensorInputs<'_>,
    maps: &[Option<&[Option<u32>]>],
    expanded: &mut Expanded,
    progress: &dyn Progress,
) -> Result<DeltaAcc> {
    let base_ty = inputs.base.ty;
    let numel = inputs.numel();
    let mut acc = DeltaAcc::new(inputs.models.len());
    let mut start = 0;
    while start < numel {
        if interrupt::requested() {
            return Err(Error::Interrupted);
        }
        crate::guard::check()?;
        let end = (start + SEGMENT).min(numel);
        inputs.expand(start, end, expanded)?;
        let expanded = &*expanded;
        // Stored models matched by token: their rows gathered in the
        // base's order for this segment.
        let gathered: Vec<Option<Cow<'_, [u8]>>> = inputs
            .models
            .iter()
            .zip(maps)
            .map(|((_, m), map)| match (m, map) {
                (ModelInput::Stored(s), Some(_)) => {
                    Some(model_segment(&inputs.base, s, *map, start, end))
                }
                _ => None,
            })
            .collect();
        let parts: Vec<DeltaAcc> = (start..end)
            .step_by(TASK)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|s| {
                let e = (s + TASK).min(end);
                let ms: Vec<Operand<'_>> = inputs
                    .models
                    .iter()
                    .enumerate()
                    .map(|(slot, (_, m))| match (m, &gathered[slot]) {
                        (ModelInput::Stored(model), Some(rows)) => Operand {
                            ty: model.ty,
                            bytes: &rows[model.ty.byte_range(s - start, e - start)],
                            is_delta: false,
                        },
                        _ => m.operand(slot, s, e, expanded).expect("touched"),
                    })
                    .collect();
                delta_stats(base_ty, inputs.base.range(s, e), &ms)
            })
            .collect();
        acc = parts.iter().fold(acc, |a, p| a.combine(p));
        inputs.base.release(start, end);
        for ((_, m), map) in inputs.models.iter().zip(maps) {
            if let ModelInput::Stored(model) = m {
                release_model(model, *map, start, end, numel);
            }
        }
        let done = base_ty.byte_range(start, end).len()
            + inputs
                .models
                .iter()
                .map(|(_, m)| m.read_len(start, end))
                .sum::<usize>();
        progress.advance(done as u64);
        start = end;
    }
    Ok(acc)
}

/// The reusable delta buffers for quantiles, and for adapters' task vectors.
#[derive(Default)]
struct Buffers {
    f32s: Vec<f32>,
    f64s: Vec<f64>,
    expanded: Expanded,
}

impl Buffers {
    /// Exact quantiles and the magnitude histogram of one model's delta
    /// for one tensor (`one` holds that model only; `max_abs` its largest
    /// |d|): in the f32 buffer for 16-bit checkpoints (with the rare deltas
    /// f32 cannot hold listed exactly beside it), else in the f64 buffer
    /// (an adapter's f64 task vector always: the very values the fused
    /// pass saw). Zero deltas are counted, not stored, when they are many.
    /// `slot` is the model's place in the fused pass, whose expansion is
    /// reused when the tensor was one segment. `rows`: the model's rows
    /// matched by token, if they are.
    fn quantiles(
        &mut self,
        one: &TensorInputs<'_>,
        slot: usize,
        rows: Option<&[Option<u32>]>,
        zeros: u64,
        max_abs: f64,
    ) -> Result<([f64; 11], TensorMagnitudes)> {
        let numel = one.numel();
        if zeros as usize == numel {
            return Ok(([0.0; 11], TensorMagnitudes::zeros(numel as u64)));
        }
        let compact = zeros as usize * 4 > numel;
        let ModelInput::Stored(model) = one.models[0].1 else {
            let kept = self.adapter_deltas(one, slot, compact)?;
            let values = &mut self.f64s[..kept];
            let zeros = (numel - kept) as u64;
            let (mags, level1) = TensorMagnitudes::from_values(values, zeros, &[], max_abs);
            let q = quantiles_with(values, numel - kept, &mut [], Some(level1));
            return Ok((q, mags));
        };
        let pair = Pair {
            base: one.base,
            model,
            rows,
        };
        if pair.base.ty.size() == 2 && pair.model.ty.size() == 2 {
            self.f32s.resize(numel, 0.0);
            let (kept, mut inexact) = pair.fill(&mut self.f32s, compact, delta_into_f32)?;
            let values = &mut self.f32s[..kept];
            let zeros = (numel - kept) as u64;
            let (mags, level1) = TensorMagnitudes::from_values(values, zeros, &inexact, max_abs);
            let q = quantiles_with(values, numel - kept, &mut inexact, Some(level1));
            return Ok((q, mags));
        }
        self.f64s.resize(numel, 0.0);
        let (kept, _) = pair.fill(&mut self.f64s, compact, delta_into_f64)?;
        let values = &mut self.f64s[..kept];
        let zeros = (numel - kept) as u64;
        let (mags, level1) = TensorMagnitudes::from_values(values, zeros, &[], max_abs);
        let q = quantiles_with(values, numel - kept, &mut [], Some(level1));
        Ok((q, mags))
    }

    /// Writes the one adapter's task vector of `one` (slot `slot` of the
    /// fused pass) into the f64 buffer, with `compact` only its non-zero
    /// entries, at the front; returns how many were kept. A one-segment
    /// tensor is still expanded by the fused pass; a larger one is expanded
    /// again over the same segments, so the values are the pass's.
    fn adapter_deltas(
        &mut self,
        one: &TensorInputs<'_>,
        slot: usize,
        compact: bool,
    ) -> Result<usize> {
        let numel = one.numel();
        self.f64s.resize(numel, 0.0);
        if numel <= SEGMENT {
            let mut kept = 0;
            for &d in self.expanded.delta(slot, 0, numel) {
                self.f64s[kept] = d;
                kept += usize::from(!compact || d != 0.0);
            }
            Ok(kept)
        } else {
            fill_expanded(one, &mut self.expanded, &mut self.f64s, compact)
        }
    }

    /// The spectrum of one model's delta of a 2-D tensor (`one` holds that
    /// model only, slot `slot` of the fused pass; `rows` its rows matched
    /// by token, if they are), sketched on `device` with draws seeded by
    /// the tensor's name and the model.
    #[allow(clippy::too_many_arguments)]
    fn spectrum(
        &mut self,
        one: &TensorInputs<'_>,
        slot: usize,
        rows: Option<&[Option<u32>]>,
        device: &candle_core::Device,
        name: &str,
        model: usize,
    ) -> Result<crate::spectral::Spectrum> {
        let numel = one.numel();
        match one.models[0].1 {
            ModelInput::Stored(model) => {
                self.f64s.resize(numel, 0.0);
                let pair = Pair {
                    base: one.base,
                    model,
                    rows,
                };
                pair.fill(&mut self.f64s, false, delta_into_f64)?;
            }
            _ => {
                self.adapter_deltas(one, slot, false)?;
            }
        }
        let (rows, cols) = (one.shape[0], one.shape[1]);
        let seed = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ model as u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        // The buffer becomes the sketch's matrix (no copy); the next tensor
        // allocates a new one.
        let mut values = std::mem::take(&mut self.f64s);
        values.truncate(numel);
        crate::spectral::spectrum(values, rows, cols, device, seed)
    }
}

/// Writes the one adapter's task vector of `one` into `out`, segment by
/// segment; with `compact`, only the non-zero entries, at the front.
/// Returns how many were kept.
fn fill_expanded(
    one: &TensorInputs<'_>,
    expanded: &mut Expanded,
    out: &mut [f64],
    compact: bool,
) -> Result<usize> {
    let numel = out.len();
    let mut kept = 0;
    let mut s0 = 0;
    while s0 < numel {
        if interrupt::requested() {
            return Err(Error::Interrupted);
        }
        let s1 = (s0 + SEGMENT).min(numel);
        one.expand(s0, s1, expanded)?;
        for &d in expanded.delta(0, s0, s1) {
            out[kept] = d;
            kept += usize::from(!compact || d != 0.0);
        }
        s0 = s1;
    }
    Ok(kept)
}

/// One tensor of the base and of one model, as mmapped bytes.
struct Pair<'a> {
    base: Input<'a>,
    model: Input<'a>,
    /// The model's row of each base row, when matched by token.
    rows: Option<&'a [Option<u32>]>,
}

impl Pair<'_> {
    /// Writes the deltas into `out` in parallel segments, releasing the input
    /// pages as it goes; with `compact`, only the non-zero ones, at the
    /// front. Returns how many were kept and the true values of those `T`
    /// could not hold exactly.
    fn fill<T: Sample>(
        &self,
        out: &mut [T],
        compact: bool,
        write: impl Fn(FloatType, &[u8], FloatType, &[u8], &mut [T], &mut Vec<f64>) + Sync,
    ) -> Result<(usize, Vec<f64>)> {
        let (bt, mt) = (self.base.ty, self.model.ty);
        let base_bytes = self.base.ckpt.bytes(self.base.tensor);
        let numel = out.len();
        let mut kept = 0;
        let mut inexact = Vec::new();
        let mut s0 = 0;
        while s0 < numel {
            if interrupt::requested() {
                return Err(Error::Interrupted);
            }
            let s1 = (s0 + SEGMENT).min(numel);
            let model_bytes = model_segment(&self.base, &self.model, self.rows, s0, s1);
            let parts: Vec<(usize, Vec<f64>)> = out[s0..s1]
                .par_chunks_mut(TASK)
                .enumerate()
                .map(|(c, part)| {
                    let e0 = s0 + c * TASK;
                    let e1 = e0 + part.len();
                    let (b, m) = (
                        &base_bytes[bt.byte_range(e0, e1)],
                        &model_bytes[mt.byte_range(e0 - s0, e1 - s0)],
                    );
                    let mut odd = Vec::new();
                    let count = if compact {
                        delta_nonzero(bt, b, mt, m, part, &mut odd)
                    } else {
                        write(bt, b, mt, m, part, &mut odd);
                        part.len()
                    };
                    (count, odd)
                })
                .collect();
            // Close the gaps the zeros left: parts start at multiples of TASK.
            for (c, (count, odd)) in parts.into_iter().enumerate() {
                let from = s0 + c * TASK;
                if from != kept {
                    out.copy_within(from..from + count, kept);
                }
                kept += count;
                inexact.extend(odd);
            }
            self.base.release(s0, s1);
            release_model(&self.model, self.rows, s0, s1, numel);
            s0 = s1;
        }
        Ok((kept, inexact))
    }
}

/// Builds a model's summary from its rows.
fn summarise(
    rows: &[TensorRow],
    skipped: Vec<Skipped>,
    base_sum_sq: f64,
    tied: bool,
    counted_twice: bool,
    vocab: Option<VocabCounts>,
) -> Summary {
    let sum_sq: f64 = rows.iter().map(|r| r.sum_sq).sum();
    let global_l1: f64 = rows.iter().map(|r| r.l1).sum();
    let total_elements: u64 = rows.iter().map(|r| r.numel).sum();
    let unchanged: u64 = rows.iter().map(|r| r.unchanged).sum();
    let nonfinite: u64 = rows.iter().map(|r| r.nonfinite).sum();
    let global_l2 = sum_sq.sqrt();
    let base_global_l2 = base_sum_sq.sqrt();
    Summary {
        global_l2,
        global_l1,
        n_params_considered: rows.len(),
        skipped_params: skipped.len(),
        groups: grouped(rows, |r| group_of(&r.param)),
        modules: grouped(rows, |r| module_of(&r.param).to_string()),
        skipped,
        total_elements,
        base_global_l2,
        relative_change: if base_global_l2 > 0.0 {
            global_l2 / base_global_l2
        } else {
            0.0
        },
        unchanged_fraction: if total_elements > 0 {
            unchanged as f64 / total_elements as f64
        } else {
            0.0
        },
        nonfinite_elements: nonfinite,
        tied_embeddings: tied,
        lm_head_counted_twice: counted_twice,
        vocab,
    }
}

/// Groups rows by `key` into {name: {l2, l1, param_count_approx}}, in a
/// natural order: embed, layer_0, layer_1, ..., lm_head, then the rest.
fn grouped(rows: &[TensorRow], key: impl Fn(&TensorRow) -> String) -> Map<String, Value> {
    let mut groups: Vec<(String, GroupStats)> = Vec::new();
    for r in rows {
        let k = key(r);
        let idx = match groups.iter().position(|(g, _)| *g == k) {
            Some(i) => i,
            None => {
                groups.push((k, GroupStats::default()));
                groups.len() - 1
            }
        };
        let g = &mut groups[idx].1;
        g.sum_sq += r.sum_sq;
        g.l1 += r.l1;
        g.param_count_approx += r.numel;
    }
    groups.sort_by_key(|(name, _)| natural_key(name));
    groups
        .into_iter()
        .map(|(name, mut g)| {
            g.l2 = g.sum_sq.sqrt();
            (name, serde_json::to_value(g).expect("json"))
        })
        .collect()
}

/// Sort key that orders `layer_2` before `layer_10` and embeddings first.
pub fn natural_key(name: &str) -> (u8, u64, String) {
    let rank = match name {
        "embed" => 0,
        _ if name.starts_with("layer_") => 1,
        "lm_head" => 2,
        "other" => 4,
        _ => 3,
    };
    let num = name
        .rsplit('_')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (rank, num, name.to_string())
}
