//! The streaming Task Arithmetic merge.
//!
//! [`MergePlan::new`] checks a [`Family`] against its weights and decides,
//! for every tensor of the base in storage order, what to write: float
//! tensors become `base + Σ λ_i (model_i − base)` over the models that store
//! them, everything else is copied from the base. [`MergePlan::execute`]
//! then makes one pass: each tensor of every input is read once, in
//! segments of bounded size, merged on rayon's pool in f64, rounded once to
//! the output type and streamed into the output shards.

use crate::checkpoint::TensorRef;
use crate::device::Device;
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::family::Family;
use crate::interrupt;
use crate::kernels::{convert_range, merge_range, Addend};
use crate::progress::Progress;
use crate::writer::{Layout, OutTensor, ShardWriter};
use rayon::prelude::*;
use std::path::Path;

/// Elements per segment: bounds the output buffer (and the input pages
/// resident at once) whatever the tensor size.
const SEGMENT: usize = 1 << 22;
/// Elements per parallel task within a segment.
const TASK: usize = 1 << 16;

/// What happens to one tensor of the base.
#[derive(Debug, Clone)]
pub enum Action {
    /// Merge with the listed models (index into the family, their tensor).
    Merge(Vec<(usize, TensorRef)>),
    /// Copy (converting the float type if the output type differs).
    Copy,
}

/// One output tensor and how to produce it.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub base: TensorRef,
    pub out_type: Option<FloatType>,
    pub action: Action,
}

/// Choices that shape the output.
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    /// Float type of every float tensor; `None` keeps the base's.
    pub out_type: Option<FloatType>,
    /// Largest shard, in data bytes.
    pub max_shard_size: u64,
    /// Leave a model out of tensors it stores with another shape, instead
    /// of refusing.
    pub skip_mismatched: bool,
    /// Write NaN or infinite merged values instead of refusing.
    pub allow_nonfinite: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            out_type: None,
            max_shard_size: 5_000_000_000,
            skip_mismatched: false,
            allow_nonfinite: false,
        }
    }
}

/// Everything decided before writing a byte.
#[derive(Debug)]
pub struct MergePlan {
    pub tensors: Vec<PlannedTensor>,
    pub layout: Layout,
    pub lambdas: Vec<f64>,
    /// Per model: float tensors of the base that the model lacks.
    pub missing: Vec<Vec<String>>,
    /// Per model: tensors the model stores that the base lacks (not merged).
    pub extra: Vec<Vec<String>>,
    /// Per model: tensors stored with another shape, left out with
    /// `skip_mismatched`.
    pub mismatched: Vec<Vec<String>>,
    pub options: MergeOptions,
    /// The output's main float type (for `config.json`).
    pub main_type: Option<FloatType>,
    pub tied_embeddings: bool,
}

impl MergePlan {
    /// Checks the family and plans the output.
    pub fn new(family: &Family, lambdas: Vec<f64>, options: MergeOptions) -> Result<Self> {
        assert_eq!(lambdas.len(), family.models.len());
        family.check_overlap()?;
        let out_type = options.out_type;
        let mut tensors = Vec::with_capacity(family.base.len());
        let mut missing = vec![Vec::new(); family.models.len()];
        let mut mismatched = vec![Vec::new(); family.models.len()];
        for name in family.base.names() {
            let base = family.base.get(name).expect("listed tensor").clone();
            let Some(base_type) = base.float_type() else {
                tensors.push(PlannedTensor {
                    name: name.clone(),
                    base,
                    out_type: None,
                    action: Action::Copy,
                });
                continue;
            };
            let mut sources = Vec::new();
            for (i, model) in family.models.iter().enumerate() {
                let model_name = &family.names[i];
                let Some(t) = model.get(name) else {
                    missing[i].push(name.clone());
                    continue;
                };
                if t.shape != base.shape {
                    if options.skip_mismatched {
                        mismatched[i].push(name.clone());
                        continue;
                    }
                    return Err(Error::Incompatible(format!(
                        "tensor '{name}': model '{model_name}' has shape {:?}, the base {:?}{}; \
                         pass --skip-mismatched to merge it from the other models only",
                        t.shape,
                        base.shape,
                        if name.contains("embed") || name.contains("lm_head") {
                            " (a resized vocabulary?)"
                        } else {
                            ""
                        }
                    )));
                }
                if t.float_type().is_none() {
                    return Err(Error::Incompatible(format!(
                        "tensor '{name}': model '{model_name}' stores it as {:?}, the base as {:?}",
                        t.dtype, base.dtype
                    )));
                }
                sources.push((i, t.clone()));
            }
            let out = out_type.unwrap_or(base_type);
            let action = if sources.is_empty() {
                Action::Copy
            } else {
                Action::Merge(sources)
            };
            tensors.push(PlannedTensor {
                name: name.clone(),
                base,
                out_type: Some(out),
                action,
            });
        }
        let extra = family
            .models
            .iter()
            .map(|m| {
                m.names()
                    .iter()
                    .filter(|n| !family.base.contains(n))
                    .cloned()
                    .collect()
            })
            .collect();
        let layout = Layout::plan(
            tensors
                .iter()
                .map(|t| OutTensor {
                    name: t.name.clone(),
                    dtype: t.out_type.map_or(t.base.dtype, FloatType::dtype),
                    shape: t.base.shape.clone(),
                })
                .collect(),
            options.max_shard_size,
        );
        let main_type = out_type.or_else(|| main_float_type(&tensors));
        Ok(Self {
            tensors,
            layout,
            lambdas,
            missing,
            extra,
            mismatched,
            options,
            main_type,
            tied_embeddings: family.base_ties_embeddings(),
        })
    }

    /// Number of tensors merged (the rest are copied).
    pub fn merged_count(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| matches!(t.action, Action::Merge(_)))
            .count()
    }

    /// Bytes read from all inputs by [`execute`](Self::execute).
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| read_bytes(t) as u64).sum()
    }

    /// A human summary of the plan.
    pub fn describe(&self, names: &[String]) -> String {
        let mut s = String::new();
        let shards = self.layout.shards.len();
        s.push_str(&format!(
            "plan: {} tensors ({} merged, {} copied from the base), {} in {} shard{}, dtype {}\n",
            self.tensors.len(),
            self.merged_count(),
            self.tensors.len() - self.merged_count(),
            human_bytes(self.layout.total_bytes()),
            shards,
            if shards == 1 { "" } else { "s" },
            self.main_type
                .map_or("as stored".to_string(), |t| t.to_string()),
        ));
        if self.tied_embeddings {
            s.push_str("      tied embeddings: the shared matrix is merged once, as stored\n");
        }
        for (i, name) in names.iter().enumerate() {
            if !self.missing[i].is_empty() {
                s.push_str(&format!(
                    "      model '{name}' lacks {} tensor(s) of the base (the others' deltas still apply): {}\n",
                    self.missing[i].len(),
                    preview(&self.missing[i])
                ));
            }
            if !self.mismatched[i].is_empty() {
                s.push_str(&format!(
                    "      model '{name}' stores {} tensor(s) with another shape, left out: {}\n",
                    self.mismatched[i].len(),
                    preview(&self.mismatched[i])
                ));
            }
            if !self.extra[i].is_empty() {
                s.push_str(&format!(
                    "      model '{name}' has {} tensor(s) the base lacks, not merged: {}\n",
                    self.extra[i].len(),
                    preview(&self.extra[i])
                ));
            }
        }
        s
    }

    /// Writes the merged shards (and the index, when sharded) into `dir`.
    pub fn execute(
        &self,
        family: &Family,
        device: &Device,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        progress.begin(self.input_bytes());
        let mut buffer = Vec::new();
        for (k, shard) in self.layout.shards.iter().enumerate() {
            let mut writer = ShardWriter::create(dir, &self.layout, k)?;
            for planned in &self.tensors[shard.tensors.clone()] {
                self.write_tensor(family, device, planned, &mut writer, &mut buffer, progress)?;
            }
            writer.finish()?;
        }
        if let Some(index) = self.layout.index_json() {
            let path = dir.join("model.safetensors.index.json");
            std::fs::write(&path, index).map_err(|e| Error::io("cannot write", &path, e))?;
        }
        progress.finish();
        Ok(())
    }

    fn write_tensor(
        &self,
        family: &Family,
        device: &Device,
        planned: &PlannedTensor,
        writer: &mut ShardWriter,
        buffer: &mut Vec<u8>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let base = &family.base;
        let base_bytes = base.bytes(&planned.base);
        let (Some(base_type), Some(out_type)) = (planned.base.float_type(), planned.out_type)
        else {
            // Not a float tensor: the base's bytes, verbatim.
            writer.write(base_bytes)?;
            base.release(&planned.base, 0, base_bytes.len());
            progress.advance(base_bytes.len() as u64);
            return Ok(());
        };
        let sources: &[(usize, TensorRef)] = match &planned.action {
            Action::Merge(s) => s,
            Action::Copy => &[],
        };
        let numel = planned.base.numel();
        let mut start = 0;
        while start < numel {
            crate::testhooks::before_segment();
            if interrupt::requested() {
                return Err(Error::Interrupted);
            }
            let end = (start + SEGMENT).min(numel);
            let base_range = base_type.byte_range(start, end);
            let (b0, b1) = (base_range.start, base_range.end);
            let addends: Vec<Addend<'_>> = sources
                .iter()
                .map(|(i, t)| {
                    let ty = t.float_type().expect("checked in plan");
                    Addend {
                        lambda: self.lambdas[*i],
                        ty,
                        bytes: &family.models[*i].bytes(t)[ty.byte_range(start, end)],
                    }
                })
                .collect();
            if addends.is_empty() && base_type == out_type {
                writer.write(&base_bytes[b0..b1])?;
            } else {
                buffer.resize((end - start) * out_type.size(), 0);
                let nonfinite = compute_segment(
                    device,
                    base_type,
                    &base_bytes[b0..b1],
                    &addends,
                    out_type,
                    buffer,
                )?;
                if nonfinite > 0 && !self.options.allow_nonfinite {
                    return Err(nonfinite_error(
                        family,
                        planned,
                        base_type,
                        &base_bytes[b0..b1],
                        sources,
                        &addends,
                    ));
                }
                writer.write(buffer)?;
            }
            let mut done = (b1 - b0) as u64;
            base.release(&planned.base, b0, b1);
            for ((i, t), a) in sources.iter().zip(&addends) {
                let range = a.ty.byte_range(start, end);
                family.models[*i].release(t, range.start, range.end);
                done += a.bytes.len() as u64;
            }
            progress.advance(done);
            start = end;
        }
        Ok(())
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
                        0
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

/// The error for non-finite merged values: names the input that holds
/// NaN or infinity, or says the merge overflowed.
fn nonfinite_error(
    family: &Family,
    planned: &PlannedTensor,
    base_type: FloatType,
    base: &[u8],
    sources: &[(usize, TensorRef)],
    addends: &[Addend<'_>],
) -> Error {
    let name = &planned.name;
    let has_nonfinite = |ty: FloatType, bytes: &[u8]| {
        let mut values = vec![0f64; bytes.len() / ty.size()];
        crate::dtype::decode_f64(ty, bytes, &mut values);
        values.iter().any(|v| !v.is_finite())
    };
    let culprit = if has_nonfinite(base_type, base) {
        Some("the base model".to_string())
    } else {
        sources
            .iter()
            .zip(addends)
            .find(|(_, a)| has_nonfinite(a.ty, a.bytes))
            .map(|((i, _), _)| format!("model '{}'", family.names[*i]))
    };
    match culprit {
        Some(who) => Error::Incompatible(format!(
            "tensor '{name}': {who} holds NaN or infinite values; pass --allow-nonfinite to merge anyway"
        )),
        None => Error::Incompatible(format!(
            "tensor '{name}': merged values overflow {}; use smaller weights, a wider --dtype, \
             or pass --allow-nonfinite",
            planned.out_type.map_or("the output type".to_string(), |t| t.to_string())
        )),
    }
}

fn read_bytes(t: &PlannedTensor) -> usize {
    let sources: usize = match &t.action {
        Action::Merge(s) => s.iter().map(|(_, r)| r.nbytes()).sum(),
        Action::Copy => 0,
    };
    t.base.nbytes() + sources
}

/// The float type holding the most elements.
fn main_float_type(tensors: &[PlannedTensor]) -> Option<FloatType> {
    let mut counts: Vec<(FloatType, usize)> = Vec::new();
    for t in tensors {
        if let Some(ty) = t.out_type {
            match counts.iter_mut().find(|(c, _)| *c == ty) {
                Some((_, n)) => *n += t.base.numel(),
                None => counts.push((ty, t.base.numel())),
            }
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t)
}

fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    if names.len() > 3 {
        format!("{}, ...", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Formats a byte count with a decimal unit (as `--max-shard-size` reads it).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses a size like `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => f64::NAN,
    };
    let value: f64 = num.parse().unwrap_or(f64::NAN) * mult;
    if !value.is_finite() || value < 1.0 {
        return Err(Error::InvalidArgument(format!(
            "--max-shard-size '{s}' is not a size like 5GB, 500MB or 2GiB"
        )));
    }
    Ok(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5kB").unwrap(), 1500);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
