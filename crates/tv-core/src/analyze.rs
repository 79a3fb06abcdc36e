//! The single-pass task-vector analysis.
//!
//! Walks the base's tensors once in storage order. For each float tensor,
//! one fused pass over the base and every model that stores it (same shape)
//! gathers each model's moments, L1, max |d|, zero and non-finite counts and
//! the dot products between all pairs of task vectors; then, model by model,
//! the delta is written into one reusable buffer (f32 when exact, else f64)
//! for exact quantiles. Inputs are read in bounded segments whose pages are
//! released after use, so memory stays near the largest tensor's buffer.

use crate::checkpoint::TensorRef;
use crate::diagnostics::{cosine_matrix, Collector, Diagnostics};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::family::{is_input_embedding, Family};
use crate::interrupt;
use crate::kernels::{delta_into_f32, delta_into_f64, delta_nonzero, delta_stats, DeltaAcc};
use crate::magnitude::TensorMagnitudes;
use crate::progress::Progress;
use crate::quantile::{quantiles_with, Sample};
use crate::stats::{group_of, module_of, TensorRow};
use crate::weights::{lambdas_from_norms, Mode, WeightParams};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};

const SEGMENT: usize = 1 << 22;
const TASK: usize = 1 << 16;

/// Options of the analysis.
#[derive(Debug, Clone, Default)]
pub struct AnalyzeOptions {
    /// Count a tied embedding a second time as `lm_head.weight`, as the
    /// original tool did for tied models loaded from shards.
    pub count_tied_lm_head: bool,
    /// Sketch the singular values of every 2-D task-vector tensor on this
    /// device (`--spectral`).
    pub spectral: Option<candle_core::Device>,
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
    /// The merge diagnostics (every stored tensor counted once).
    pub diagnostics: Diagnostics,
    /// With `--spectral`: every 2-D tensor's spectrum per model, and the
    /// seconds the sketches took.
    pub spectral: Option<(Vec<SpectralRow>, f64)>,
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
    let mut tied_extra: Option<(String, Vec<usize>, DeltaAcc)> = None;
    let mut collector = Collector::new(k);
    let mut spectral: Vec<SpectralRow> = Vec::new();
    let mut spectral_seconds = 0.0;

    let work: Vec<TensorWork> = family
        .base
        .names()
        .iter()
        .map(|name| {
            let base = family.base.get(name).expect("listed");
            let mut sources = Vec::new();
            for (i, m) in family.models.iter().enumerate() {
                match skip_reason(base, m.get(name)) {
                    Some(reason) => skipped[i].push(Skipped {
                        param: name.clone(),
                        reason,
                    }),
                    None => sources.push((i, m.get(name).expect("present"))),
                }
            }
            TensorWork {
                name,
                base,
                sources,
            }
        })
        .collect();
    for (i, m) in family.models.iter().enumerate() {
        for name in m.names().iter().filter(|n| !family.base.contains(n)) {
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
    } in &work
    {
        if sources.is_empty() {
            continue;
        }
        let acc = fused_pass(family, base, sources, progress)?;
        let indices: Vec<usize> = sources.iter().map(|&(i, _)| i).collect();
        add_family_sums(&mut dots, &mut base_sum_sq, &indices, &acc);
        collector.add_tensor(name, base, sources, &acc);
        let ks = sources.len();
        for (slot, &(i, tref)) in sources.iter().enumerate() {
            let s = &acc.models[slot];
            let (q, mags) =
                buffers.quantiles(&Pair::new(family, base, i, tref), s.unchanged, s.max_abs)?;
            collector.add_magnitudes(slot, i, &mags);
            if let (Some(device), &[rows, cols]) = (&opts.spectral, &base.shape[..]) {
                let started = std::time::Instant::now();
                let spectrum =
                    buffers.spectrum(&Pair::new(family, base, i, tref), device, name, i)?;
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
        if opts.count_tied_lm_head
            && tied
            && is_input_embedding(name)
            && !family.base.contains("lm_head.weight")
        {
            tied_extra = Some((name.to_string(), indices, acc));
        }
    }
    progress.finish();

    // The original counted a tied embedding twice, once as lm_head.weight.
    let counted_twice = tied_extra.is_some();
    if let Some((embed, idx, acc)) = tied_extra {
        add_family_sums(&mut dots, &mut base_sum_sq, &idx, &acc);
        for &i in &idx {
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
            );
            ModelAnalysis {
                name: family.names[i].clone(),
                spec: family.models[i].located.spec.clone(),
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
    /// (model index, the model's tensor)
    sources: Vec<(usize, &'a TensorRef)>,
}

impl TensorWork<'_> {
    /// Bytes the fused pass reads (nothing when no model takes part).
    fn input_bytes(&self) -> u64 {
        if self.sources.is_empty() {
            return 0;
        }
        let models: usize = self.sources.iter().map(|(_, t)| t.nbytes()).sum();
        (self.base.nbytes() + models) as u64
    }
}

/// Why a model's tensor cannot be compared with the base's, if it cannot.
fn skip_reason(base: &TensorRef, model: Option<&TensorRef>) -> Option<String> {
    if base.float_type().is_none() {
        return Some(format!("not a float tensor ({:?})", base.dtype));
    }
    let Some(m) = model else {
        return Some("missing from the model".into());
    };
    if m.shape != base.shape {
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

/// The fused statistics pass over one tensor of the base and its models.
fn fused_pass(
    family: &Family,
    base: &TensorRef,
    sources: &[(usize, &TensorRef)],
    progress: &dyn Progress,
) -> Result<DeltaAcc> {
    let base_ty = base.float_type().expect("float");
    let base_bytes = family.base.bytes(base);
    let models: Vec<(FloatType, &[u8])> = sources
        .iter()
        .map(|&(i, t)| (t.float_type().expect("float"), family.models[i].bytes(t)))
        .collect();
    let numel = base.numel();
    let mut acc = DeltaAcc::new(sources.len());
    let mut start = 0;
    while start < numel {
        if interrupt::requested() {
            return Err(Error::Interrupted);
        }
        crate::guard::check()?;
        let end = (start + SEGMENT).min(numel);
        let parts: Vec<DeltaAcc> = (start..end)
            .step_by(TASK)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|s| {
                let e = (s + TASK).min(end);
                let ms: Vec<(FloatType, &[u8])> = models
                    .iter()
                    .map(|&(ty, b)| (ty, &b[ty.byte_range(s, e)]))
                    .collect();
                delta_stats(base_ty, &base_bytes[base_ty.byte_range(s, e)], &ms)
            })
            .collect();
        acc = parts.iter().fold(acc, |a, p| a.combine(p));
        let mut done = 0;
        for (ty, release) in std::iter::once((base_ty, (&family.base, base))).chain(
            sources
                .iter()
                .zip(&models)
                .map(|(&(i, t), &(ty, _))| (ty, (&family.models[i], t))),
        ) {
            let bytes = ty.byte_range(start, end);
            done += bytes.len() as u64;
            release.0.release(release.1, bytes.start, bytes.end);
        }
        progress.advance(done);
        start = end;
    }
    Ok(acc)
}

/// The reusable delta buffers for quantiles.
#[derive(Default)]
struct Buffers {
    f32s: Vec<f32>,
    f64s: Vec<f64>,
}

impl Buffers {
    /// Exact quantiles and the magnitude histogram of one model's delta
    /// for one tensor (`max_abs` its largest |d|): in the f32 buffer for
    /// 16-bit checkpoints (with the rare deltas f32 cannot hold listed
    /// exactly beside it), else in the f64 buffer. Zero deltas are counted,
    /// not stored, when they are many.
    fn quantiles(
        &mut self,
        pair: &Pair,
        zeros: u64,
        max_abs: f64,
    ) -> Result<([f64; 11], TensorMagnitudes)> {
        let numel = pair.base.numel();
        if zeros as usize == numel {
            return Ok(([0.0; 11], TensorMagnitudes::zeros(numel as u64)));
        }
        let compact = zeros as usize * 4 > numel;
        if pair.base_ty.size() == 2 && pair.model_ty.size() == 2 {
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
}

impl Buffers {
    /// The spectrum of one model's delta of a 2-D tensor, sketched on
    /// `device` with draws seeded by the tensor's name and the model.
    fn spectrum(
        &mut self,
        pair: &Pair,
        device: &candle_core::Device,
        name: &str,
        model: usize,
    ) -> Result<crate::spectral::Spectrum> {
        let numel = pair.base.numel();
        self.f64s.resize(numel, 0.0);
        pair.fill(&mut self.f64s, false, delta_into_f64)?;
        let (rows, cols) = (pair.base.shape[0], pair.base.shape[1]);
        let seed = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ model as u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        crate::spectral::spectrum(&self.f64s[..numel], rows, cols, device, seed)
    }
}

/// One tensor of the base and of one model, as mmapped bytes.
struct Pair<'a> {
    family: &'a Family,
    base: &'a TensorRef,
    base_ty: FloatType,
    model: usize,
    tensor: &'a TensorRef,
    model_ty: FloatType,
}

impl<'a> Pair<'a> {
    fn new(family: &'a Family, base: &'a TensorRef, model: usize, tensor: &'a TensorRef) -> Self {
        Self {
            family,
            base,
            base_ty: base.float_type().expect("float"),
            model,
            tensor,
            model_ty: tensor.float_type().expect("float"),
        }
    }

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
        let (bt, mt) = (self.base_ty, self.model_ty);
        let base_bytes = self.family.base.bytes(self.base);
        let model = &self.family.models[self.model];
        let model_bytes = model.bytes(self.tensor);
        let numel = out.len();
        let mut kept = 0;
        let mut inexact = Vec::new();
        let mut s0 = 0;
        while s0 < numel {
            if interrupt::requested() {
                return Err(Error::Interrupted);
            }
            let s1 = (s0 + SEGMENT).min(numel);
            let parts: Vec<(usize, Vec<f64>)> = out[s0..s1]
                .par_chunks_mut(TASK)
                .enumerate()
                .map(|(c, part)| {
                    let e0 = s0 + c * TASK;
                    let e1 = e0 + part.len();
                    let (b, m) = (
                        &base_bytes[bt.byte_range(e0, e1)],
                        &model_bytes[mt.byte_range(e0, e1)],
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
            let (b, m) = (bt.byte_range(s0, s1), mt.byte_range(s0, s1));
            self.family.base.release(self.base, b.start, b.end);
            model.release(self.tensor, m.start, m.end);
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
