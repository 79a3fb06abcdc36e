//! PEFT LoRA adapters as task vectors in factored form.
//!
//! An adapter folder (`adapter_config.json` beside `adapter_model.safetensors`
//! or `adapter_model.bin`) is opened against the base it adapts:
//! [`Adapter::open`] maps every stored tensor onto a tensor of the base
//! (`base_model.model.` prefix and the `lora_A`/`lora_B`/`lora_embedding_*`
//! suffixes removed, an adapter name such as `.default` allowed) and checks
//! shapes, so a module the base lacks or a factor that does not fit is an
//! error naming the module before any work. A base tensor then gets an
//! [`AdapterTensor`]: LoRA factors whose product s·B·A is its task vector
//! ([`expand`] computes it row block by row block), and/or a full weight the
//! adapter stores for it (`modules_to_save`, `base_layer` weights, biases),
//! whose task vector is saved − base, as PEFT's `merge_and_unload` gives.
//! Base tensors the adapter does not touch have a zero task vector.

pub mod config;
pub mod expand;

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::error::{Error, Result};
use crate::locate::{Located, WeightFiles};
pub use config::LoraConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How the stored factors make a tensor in the base's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorLayout {
    /// A Linear layer: ΔW = s · B A, B `[out, r]`, A `[r, in]`, W `[out, in]`.
    Plain,
    /// `fan_in_fan_out` (Conv1D) and embeddings: ΔW = s · (B A)ᵀ, W `[A cols, B rows]`.
    Transposed,
}

/// The LoRA factors of one base tensor, in the adapter's file.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    pub a: TensorRef,
    pub b: TensorRef,
    pub scale: f64,
    pub rank: usize,
    pub layout: FactorLayout,
}

/// What an adapter holds for one tensor of the base.
#[derive(Debug, Clone)]
pub struct AdapterTensor {
    /// Factors whose product is (part of) the task vector.
    pub lora: Option<LoraFactors>,
    /// A full weight stored by the adapter: its task vector is saved − base.
    pub full: Option<TensorRef>,
}

/// One adapted module, for the merge record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    pub rank: u64,
    pub alpha: f64,
    pub use_rslora: bool,
    pub target_modules: serde_json::Value,
    pub modules_to_save: Vec<String>,
    /// Base tensors the adapter changes.
    pub changed_tensors: usize,
    /// Base tensors with LoRA factors.
    pub lora_tensors: usize,
    /// Base tensors the adapter replaces with full weights.
    pub full_tensors: usize,
}

/// An opened adapter, mapped onto its base.
#[derive(Debug)]
pub struct Adapter {
    pub folder: PathBuf,
    pub config: LoraConfig,
    /// The adapter's weight file.
    pub file: Checkpoint,
    tensors: HashMap<String, AdapterTensor>,
}

/// Whether `spec` names an adapter folder (a folder holding
/// `adapter_config.json`), and which.
pub fn adapter_folder(spec: &str) -> Option<PathBuf> {
    let folder = crate::locate::folder_of(spec)?;
    folder
        .join("adapter_config.json")
        .is_file()
        .then_some(folder)
}

/// The adapter weight file in `spec`'s folder when it is the folder's only
/// weight file and no `adapter_config.json` goes with it (an adapter copied
/// without its config); `None` for a checkpoint folder, even one that also
/// holds an adapter's weights.
pub fn adapter_weights_without_config(spec: &str) -> Option<PathBuf> {
    let folder = crate::locate::folder_of(spec)?;
    if folder.join("adapter_config.json").is_file() {
        return None;
    }
    let adapter_files = ["adapter_model.safetensors", "adapter_model.bin"];
    let other_weights = std::fs::read_dir(&folder).ok()?.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".safetensors") || name.ends_with(".bin");
        weights && !adapter_files.contains(&name.as_str())
    });
    if other_weights {
        return None;
    }
    adapter_files
        .into_iter()
        .map(|f| folder.join(f))
        .find(|p| p.exists())
}

/// The part of a stored name that PEFT adds around a module's name.
const PREFIX: &str = "base_model.model.";

/// What one stored adapter tensor is.
enum Role {
    LoraA {
        module: String,
        embedding: bool,
    },
    LoraB {
        module: String,
        embedding: bool,
    },
    /// A full weight for this base tensor name.
    Full(String),
}

/// Reads a stored tensor name (without PEFT's prefix).
fn role_of(name: &str) -> std::result::Result<Role, String> {
    // An adapter name may sit before `.weight` (or end an embedding factor).
    let parts: Vec<&str> = name.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let module = parts[..i].join(".");
        let rest = &parts[i + 1..];
        let factor = |embedding| match *part {
            "lora_A" | "lora_embedding_A" => Some(Role::LoraA {
                module: module.clone(),
                embedding,
            }),
            "lora_B" | "lora_embedding_B" => Some(Role::LoraB {
                module: module.clone(),
                embedding,
            }),
            _ => None,
        };
        match *part {
            "lora_A" | "lora_B" => {
                return match rest {
                    ["weight"] | [_, "weight"] => Ok(factor(false).expect("a factor")),
                    [.., "bias"] => Err("a LoRA bias (lora_bias), which is not supported".into()),
                    _ => Err("a LoRA factor with an unexpected name".into()),
                }
            }
            "lora_embedding_A" | "lora_embedding_B" => {
                return match rest {
                    [] | [_] => Ok(factor(true).expect("a factor")),
                    _ => Err("an embedding factor with an unexpected name".into()),
                }
            }
            "lora_magnitude_vector" => {
                return Err("a DoRA magnitude vector (DoRA is not supported)".into())
            }
            "base_layer" => return Ok(Role::Full(format!("{module}.{}", rest.join(".")))),
            "modules_to_save" if rest.len() >= 2 => {
                return Ok(Role::Full(format!("{module}.{}", rest[1..].join("."))))
            }
            "token_adapter" => {
                return Err("trainable tokens, which are not supported".into());
            }
            p if p.starts_with("lora_") => {
                return Err(format!("'{p}', not a LoRA factor this tool knows"));
            }
            _ => {}
        }
    }
    Ok(Role::Full(name.to_string()))
}

impl Adapter {
    /// Opens the adapter in `folder` and maps it onto `base`.
    pub fn open(spec: &str, folder: &Path, base: &Checkpoint) -> Result<Self> {
        let config = LoraConfig::read(&folder.join("adapter_config.json"))?;
        let weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|n| folder.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "{}: no adapter_model.safetensors or adapter_model.bin",
                    folder.display()
                ))
            })?;
        // A FIFO or device under the adapter's file name would block or
        // stream forever: only regular files, as for every weight file.
        crate::sidecar::check_regular_file(&weights)?;
        let weights_kind = if weights.extension().is_some_and(|e| e == "bin") {
            WeightFiles::Pickle(vec![weights.clone()])
        } else {
            WeightFiles::Single(weights.clone())
        };
        let file = Checkpoint::open_located(Located {
            spec: spec.to_string(),
            root: folder.to_path_buf(),
            folder: folder.to_path_buf(),
            weights: weights_kind,
        })?;
        let tensors = map_tensors(&file, &config, &weights, base)?;
        Ok(Self {
            folder: folder.to_path_buf(),
            config,
            file,
            tensors,
        })
    }

    /// What the adapter holds for base tensor `name` (`None`: untouched).
    pub fn tensor(&self, name: &str) -> Option<&AdapterTensor> {
        self.tensors.get(name)
    }

    /// Rank, alpha and targets, for the merge record.
    pub fn summary(&self) -> AdapterSummary {
        AdapterSummary {
            rank: self.config.rank,
            alpha: self.config.alpha,
            use_rslora: self.config.use_rslora,
            target_modules: self.config.target_modules.clone(),
            modules_to_save: self.config.modules_to_save.clone(),
            changed_tensors: self.tensors.len(),
            lora_tensors: self.tensors.values().filter(|t| t.lora.is_some()).count(),
            full_tensors: self.tensors.values().filter(|t| t.full.is_some()).count(),
        }
    }
}

/// Maps the adapter file's tensors onto `base`'s tensor names, checking
/// every shape against the base.
fn map_tensors(
    file: &Checkpoint,
    config: &LoraConfig,
    path: &Path,
    base: &Checkpoint,
) -> Result<HashMap<String, AdapterTensor>> {
    let bad = |detail: String| Error::bad_file(path, detail);
    let esc = |s: &str| crate::error::escape_controls(s).into_owned();
    // module -> (A, B, embedding)
    let mut factors: BTreeMap<String, (Option<TensorRef>, Option<TensorRef>, bool)> =
        BTreeMap::new();
    let mut out: HashMap<String, AdapterTensor> = HashMap::new();
    for stored in file.names() {
        let tref = file.get(stored).expect("listed");
        let name = stored.strip_prefix(PREFIX).unwrap_or(stored);
        let role =
            role_of(name).map_err(|why| bad(format!("tensor '{}' is {why}", esc(stored))))?;
        if tref.float_type().is_none() {
            return Err(bad(format!(
                "tensor '{}' is stored as {:?}, not as floats",
                esc(stored),
                tref.dtype
            )));
        }
        let is_a = matches!(role, Role::LoraA { .. });
        match role {
            // Layers outside layers_to_transform: PEFT leaves them alone.
            Role::LoraA { module, .. } | Role::LoraB { module, .. }
                if !config.transforms(&module) => {}
            Role::LoraA { module, embedding } | Role::LoraB { module, embedding } => {
                let e = factors.entry(module).or_default();
                let slot = if is_a { &mut e.0 } else { &mut e.1 };
                // Two adapters' factors in one file (another adapter name)
                // must not quietly replace each other.
                if slot.is_some() {
                    return Err(bad(format!("tensor '{}' is stored twice", esc(stored))));
                }
                *slot = Some(tref.clone());
                e.2 |= embedding;
            }
            Role::Full(target) => {
                let Some(b) = base.get(&target) else {
                    return Err(Error::Incompatible(format!(
                        "adapter {}: tensor '{}' replaces '{}', which the base lacks",
                        path.display(),
                        esc(stored),
                        esc(&target)
                    )));
                };
                if tref.shape != b.shape {
                    return Err(shape_error(path, &target, &tref.shape, &b.shape));
                }
                refuse_unmergeable_base(path, &target, b)?;
                let entry = out.entry(target).or_insert(AdapterTensor {
                    lora: None,
                    full: None,
                });
                if entry.full.is_some() {
                    return Err(bad(format!("tensor '{}' is stored twice", esc(stored))));
                }
                entry.full = Some(tref.clone());
            }
        }
    }
    for (module, (a, b, embedding)) in factors {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!(
                "module '{}' has only one of its two LoRA factors",
                esc(&module)
            )));
        };
        let target = format!("{module}.weight");
        let Some(w) = base.get(&target) else {
            return Err(Error::Incompatible(format!(
                "adapter {}: module '{}' is not in the base (it has no tensor '{}')",
                path.display(),
                esc(&module),
                esc(&target)
            )));
        };
        refuse_unmergeable_base(path, &target, w)?;
        if a.shape.len() != 2 || b.shape.len() != 2 || w.shape.len() != 2 {
            return Err(Error::Incompatible(format!(
                "adapter {}: module '{}' has factors of shapes {:?} and {:?} for a tensor of shape {:?}; \
                 only LoRA on Linear, Conv1D and Embedding layers is supported",
                path.display(),
                esc(&module),
                a.shape,
                b.shape,
                w.shape
            )));
        }
        let rank = a.shape[0];
        if b.shape[1] != rank {
            return Err(Error::Incompatible(format!(
                "adapter {}: module '{}': lora_A has rank {rank} but lora_B {:?} does not match it",
                path.display(),
                esc(&module),
                b.shape
            )));
        }
        let expected_rank = config.rank_of(&module);
        if rank as u64 != expected_rank {
            return Err(Error::Incompatible(format!(
                "adapter {}: module '{}' has rank {rank}, but adapter_config.json gives it rank \
                 {expected_rank} (r, rank_pattern)",
                path.display(),
                esc(&module)
            )));
        }
        let layout = if embedding || config.fan_in_fan_out {
            FactorLayout::Transposed
        } else {
            FactorLayout::Plain
        };
        let shape = match layout {
            FactorLayout::Plain => vec![b.shape[0], a.shape[1]],
            FactorLayout::Transposed => vec![a.shape[1], b.shape[0]],
        };
        if shape != w.shape {
            return Err(shape_error(path, &target, &shape, &w.shape));
        }
        let entry = out.entry(target).or_insert(AdapterTensor {
            lora: None,
            full: None,
        });
        entry.lora = Some(LoraFactors {
            a,
            b,
            scale: config.scale_of(&module),
            rank,
            layout,
        });
    }
    Ok(out)
}

/// A shape that does not fit the base: a vocabulary change for embeddings
/// (not merged yet), else a plain mismatch.
fn shape_error(path: &Path, target: &str, got: &[usize], base: &[usize]) -> Error {
    let target = crate::error::escape_controls(target);
    let vocab = got.len() == 2 && base.len() == 2 && got[1] == base[1] && got[0] > base[0];
    if vocab {
        Error::Incompatible(format!(
            "adapter {}: '{target}' has {} rows, the base {}: the adapter resizes the vocabulary, \
             which is not supported yet",
            path.display(),
            got[0],
            base[0]
        ))
    } else {
        Error::Incompatible(format!(
            "adapter {}: '{target}' would have shape {got:?}, but the base's is {base:?}",
            path.display()
        ))
    }
}

/// An adapter cannot change a base tensor that is not stored as floats
/// (FP8 and other packed types): the merge would copy the base's and drop
/// the adapter's change without a word.
fn refuse_unmergeable_base(path: &Path, target: &str, w: &TensorRef) -> Result<()> {
    if w.float_type().is_some() {
        return Ok(());
    }
    let kind = crate::dtype::low_precision_kind(w.dtype)
        .map_or_else(|| format!("{:?}", w.dtype), str::to_string);
    Err(Error::Incompatible(format!(
        "adapter {}: it changes '{}', which the base stores as {kind}; tensors of that type \
         cannot be merged (dequantize the base first)",
        path.display(),
        crate::error::escape_controls(target)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_onto_modules() {
        let module = |r| match r {
            Ok(Role::LoraA { module, embedding }) => format!("A {module} {embedding}"),
            Ok(Role::LoraB { module, embedding }) => format!("B {module} {embedding}"),
            Ok(Role::Full(t)) => format!("full {t}"),
            Err(e) => format!("err {e}"),
        };
        let cases = [
            (
                "model.layers.0.q_proj.lora_A.weight",
                "A model.layers.0.q_proj false",
            ),
            (
                "model.layers.0.q_proj.lora_B.default.weight",
                "B model.layers.0.q_proj false",
            ),
            (
                "model.embed_tokens.lora_embedding_A",
                "A model.embed_tokens true",
            ),
            (
                "model.embed_tokens.lora_embedding_B.default",
                "B model.embed_tokens true",
            ),
            (
                "model.embed_tokens.base_layer.weight",
                "full model.embed_tokens.weight",
            ),
            (
                "lm_head.modules_to_save.default.weight",
                "full lm_head.weight",
            ),
            ("lm_head.weight", "full lm_head.weight"),
        ];
        for (name, want) in cases {
            assert_eq!(module(role_of(name)), want, "{name}");
        }
        assert!(module(role_of("x.lora_magnitude_vector")).contains("DoRA"));
        assert!(module(role_of("x.hada_w1_a")).starts_with("full"));
        assert!(module(role_of("x.lora_B.bias")).contains("bias"));
    }
}
