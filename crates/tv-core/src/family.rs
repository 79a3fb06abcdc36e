//! A base checkpoint and its fine-tunes, opened together and named.
//!
//! Model names default to the basename of each model argument (the last
//! component of a path or of a hub id), as the original tool did; names must
//! be unique, since they label output folders and tables. A model is a
//! stored checkpoint or a LoRA adapter folder ([`Model`]); what it holds for
//! a tensor of the base is a [`ModelTensor`].

use crate::checkpoint::Checkpoint;
use crate::checkpoint::TensorRef;
use crate::dtype::low_precision_kind;
use crate::error::{Error, Result};
use crate::locate::WeightFiles;
use crate::lora::{Adapter, AdapterTensor};
use std::path::{Path, PathBuf};

/// A fine-tune: a stored checkpoint, or a LoRA adapter of the base.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Checkpoint(Checkpoint),
    Adapter(Box<Adapter>),
}

/// What a model holds for one tensor of the base.
#[derive(Debug, Clone)]
pub enum ModelTensor {
    /// A stored tensor (in [`Model::checkpoint`]): its task vector is m − base.
    Stored(TensorRef),
    /// An adapter's factors and/or full weight for it.
    Adapter(AdapterTensor),
    /// An adapter that does not touch it: a zero task vector, nothing read.
    Untouched,
}

impl Model {
    /// The weight file(s) the model's tensors live in (an adapter's file).
    pub fn checkpoint(&self) -> &Checkpoint {
        match self {
            Self::Checkpoint(c) => c,
            Self::Adapter(a) => &a.file,
        }
    }

    /// The adapter, when the model is one.
    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Self::Checkpoint(_) => None,
            Self::Adapter(a) => Some(a),
        }
    }

    /// What the model holds for the base's tensor `name` (`None`: a stored
    /// checkpoint that lacks it).
    pub fn tensor(&self, name: &str) -> Option<ModelTensor> {
        match self {
            Self::Checkpoint(c) => c.get(name).cloned().map(ModelTensor::Stored),
            Self::Adapter(a) => Some(match a.tensor(name) {
                Some(AdapterTensor {
                    lora: None,
                    full: Some(full),
                }) => ModelTensor::Stored(full.clone()),
                Some(t) => ModelTensor::Adapter(t.clone()),
                None => ModelTensor::Untouched,
            }),
        }
    }

    /// Tensor names the model stores that the base lacks (none for an
    /// adapter: it is checked against the base when opened).
    pub fn extra_names<'a>(&'a self, base: &'a Checkpoint) -> Vec<&'a String> {
        match self {
            Self::Checkpoint(c) => c.names().iter().filter(|n| !base.contains(n)).collect(),
            Self::Adapter(_) => Vec::new(),
        }
    }
}

/// The base and the fine-tunes of one merge or analysis.
#[derive(Debug)]
pub struct Family {
    pub base: Checkpoint,
    pub models: Vec<Model>,
    pub names: Vec<String>,
}

impl Family {
    /// Opens `base` and `models`; `names` overrides the derived names.
    pub fn open(base: &str, models: &[String], names: Option<&[String]>) -> Result<Self> {
        if models.is_empty() {
            return Err(Error::InvalidArgument("no fine-tuned models given".into()));
        }
        let names = resolve_names(models, names)?;
        if let Some(folder) = crate::lora::adapter_folder(base) {
            return Err(Error::InvalidArgument(format!(
                "base model {}: this is a LoRA adapter folder (it has adapter_config.json); give \
                 the model it adapts as the base and the adapter among the models",
                folder.display()
            )));
        }
        let base = Checkpoint::open(base).map_err(|e| context("base model", e))?;
        if base.is_empty() {
            return Err(Error::bad_file(
                &weights_path(&base),
                "the base model holds no tensors; nothing to merge or analyse",
            ));
        }
        // Side files that are FIFOs, devices or too large are refused now,
        // before any work, not when they are copied at the end.
        crate::sidecar::check_side_files(base.folder())?;
        base.read_config()?;
        let models = models
            .iter()
            .zip(&names)
            .map(|(spec, name)| {
                let model = match crate::lora::adapter_folder(spec) {
                    Some(folder) => {
                        Adapter::open(spec, &folder, &base).map(|a| Model::Adapter(Box::new(a)))
                    }
                    None => match crate::lora::adapter_weights_without_config(spec) {
                        Some(weights) => Err(Error::InvalidArgument(format!(
                            "{} holds a PEFT adapter's weights but no adapter_config.json \
                             (a regular file); an adapter needs both",
                            weights.display()
                        ))),
                        None => Checkpoint::open(spec).map(Model::Checkpoint),
                    },
                };
                model.map_err(|e| context(&format!("model '{name}'"), e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            base,
            models,
            names,
        })
    }

    /// One line per adapter among the models (`shown`: their display
    /// names): rank, alpha and how many base tensors it changes.
    pub fn adapter_notes(&self, shown: &[String]) -> String {
        let mut s = String::new();
        for (m, name) in self.models.iter().zip(shown) {
            if let Some(a) = m.adapter() {
                let sum = a.summary();
                s.push_str(&format!(
                    "      model '{name}' is a LoRA adapter (rank {}, alpha {}{}): it changes {} \
                     tensor(s), {} of them with full weights; the others keep the base's values\n",
                    sum.rank,
                    sum.alpha,
                    if sum.use_rslora { ", rsLoRA" } else { "" },
                    sum.changed_tensors,
                    sum.full_tensors
                ));
            }
        }
        s
    }

    /// Every input location, labelled, for
    /// [`crate::staging::check_output_apart`].
    pub fn input_paths(&self) -> Vec<(String, PathBuf)> {
        let mut out: Vec<(String, PathBuf)> = checkpoint_paths(&self.base)
            .into_iter()
            .map(|p| ("base model".to_string(), p))
            .collect();
        for (m, name) in self.models.iter().zip(&self.names) {
            if let Model::Adapter(a) = m {
                out.push((format!("model '{name}'"), a.folder.clone()));
            }
            out.extend(
                checkpoint_paths(m.checkpoint())
                    .into_iter()
                    .map(|p| (format!("model '{name}'"), p)),
            );
        }
        out
    }

    /// Refuses a model that shares fewer than half of the base's tensor
    /// names, or whose shared tensors all have other shapes: it is almost
    /// certainly not a fine-tune of this base.
    pub fn check_overlap(&self) -> Result<()> {
        let total = self.base.len();
        for (model, name) in self.models.iter().zip(&self.names) {
            let Model::Checkpoint(model) = model else {
                continue;
            };
            let shared = self
                .base
                .names()
                .iter()
                .filter(|n| model.contains(n))
                .count();
            if total > 0 && shared * 2 < total {
                return Err(Error::Incompatible(format!(
                    "model '{name}' shares only {shared} of the base's {total} tensor names \
                     (it stores {}); is it a fine-tune of this base?",
                    model.len()
                )));
            }
            // Same names but no same shape: another size of the architecture.
            // Embeddings and lm_head are left out: a resized vocabulary is
            // matched by token.
            let mut pairs = self
                .base
                .names()
                .iter()
                .filter(|n| !crate::vocab::is_vocab_tensor(n))
                .filter_map(|n| Some((n, self.base.get(n)?, model.get(n)?)));
            if pairs.clone().all(|(_, b, m)| b.shape != m.shape) {
                if let Some((n, b, m)) = pairs.next() {
                    return Err(Error::Incompatible(format!(
                        "model '{name}': none of its tensors has the base's shape (tensor '{n}': \
                         {:?} against the base's {:?}); is it a fine-tune of this base?",
                        m.shape, b.shape
                    )));
                }
            }
        }
        Ok(())
    }

    /// Refuses a family where a tensor to be `verb` ("merged", "analysed")
    /// is stored as FP8 (or FP6/FP4) in the base or in a model: those
    /// tensors are quantised with scale tensors beside them, and handling
    /// the scales while copying the weights would silently break the model.
    /// A low-precision tensor of the base that no model stores is copied.
    pub fn refuse_low_precision(&self, verb: &str) -> Result<()> {
        let refuse = |name: &str, dtype, kind, whose: String| {
            Error::Incompatible(format!(
                "tensor '{name}' is stored as {dtype:?} in {whose}; {kind} checkpoints are not \
                 {verb} (dequantise them to bf16 first)"
            ))
        };
        for name in self.base.names() {
            let base = self.base.get(name).expect("listed tensor");
            let stored: Vec<usize> = (0..self.models.len())
                .filter(|&i| matches!(self.models[i].tensor(name), Some(ModelTensor::Stored(_))))
                .collect();
            if let (Some(kind), Some(_)) = (low_precision_kind(base.dtype), stored.first()) {
                return Err(refuse(name, base.dtype, kind, "the base".into()));
            }
            for i in stored {
                let Some(ModelTensor::Stored(t)) = self.models[i].tensor(name) else {
                    continue;
                };
                if let Some(kind) = low_precision_kind(t.dtype) {
                    return Err(refuse(
                        name,
                        t.dtype,
                        kind,
                        format!("model '{}'", self.names[i]),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The input embedding the base's output layer is tied to, when the
    /// base ties its embeddings and stores no `lm_head.weight`.
    pub fn tied_embedding(&self) -> Option<&str> {
        if self.base.contains(LM_HEAD) || !self.base_ties_embeddings() {
            return None;
        }
        self.base
            .names()
            .iter()
            .find(|n| is_input_embedding(n))
            .map(String::as_str)
    }

    /// Whether the base ties its output embedding to its input embedding
    /// (`tie_word_embeddings` in its config, or no `lm_head.weight` stored
    /// beside an embedding).
    pub fn base_ties_embeddings(&self) -> bool {
        let from_config = self
            .base
            .config()
            .and_then(|c| c.get("tie_word_embeddings").and_then(|v| v.as_bool()));
        from_config.unwrap_or_else(|| {
            !self.base.contains("lm_head.weight")
                && self.base.names().iter().any(|n| n.contains("embed_tokens"))
        })
    }
}

/// The name of the output embedding that tied checkpoints leave out.
pub const LM_HEAD: &str = "lm_head.weight";

/// Whether `name` is an input embedding that an output layer can be tied to.
pub fn is_input_embedding(name: &str) -> bool {
    name.ends_with("embed_tokens.weight")
        || name.ends_with("wte.weight")
        || name.ends_with("word_embeddings.weight")
}

/// Whether `ckpt` stores an output layer of its own: an `lm_head.weight`
/// that its config does not declare tied to the input embedding (with
/// `tie_word_embeddings: true`, Transformers loads the embedding there).
pub fn stores_own_lm_head(model: &Model) -> bool {
    let Model::Checkpoint(ckpt) = model else {
        return false;
    };
    let tied = ckpt
        .config()
        .and_then(|c| c.get("tie_word_embeddings").and_then(|v| v.as_bool()));
    ckpt.contains(LM_HEAD) && tied != Some(true)
}

/// The weight files of `ckpt` as the user will recognise them: the index,
/// the single file, or the folder.
fn weights_path(ckpt: &Checkpoint) -> PathBuf {
    match &ckpt.located.weights {
        WeightFiles::Single(p) | WeightFiles::Indexed(p) => p.clone(),
        WeightFiles::Pickle(ps) if ps.len() == 1 => ps[0].clone(),
        _ => ckpt.located.root.clone(),
    }
}

/// Every location a checkpoint is read from: what the user named, the
/// folder of its side files, each weight file and index, and each side
/// file present (`config.json`, tokenizer files); symlinks among them are
/// followed by [`crate::staging::check_output_apart`].
pub fn checkpoint_paths(ckpt: &Checkpoint) -> Vec<PathBuf> {
    let located = &ckpt.located;
    let mut paths = vec![located.root.clone(), located.folder.clone()];
    match &located.weights {
        WeightFiles::Single(p) => paths.push(p.clone()),
        WeightFiles::Indexed(p) => {
            paths.push(p.clone());
            // Safetensors shards are mapped from where the index names them.
            paths.extend(ckpt.shards.iter().map(|s| s.path.clone()));
        }
        WeightFiles::Loose(ps) | WeightFiles::Pickle(ps) => paths.extend(ps.iter().cloned()),
    }
    if let Ok(entries) = std::fs::read_dir(&located.folder) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "config.json" || crate::sidecar::is_side_file(&name) {
                paths.push(entry.path());
            }
        }
    }
    paths
}

fn context(what: &str, e: Error) -> Error {
    match e {
        Error::NotFound(msg) => Error::NotFound(format!("{what}: {msg}")),
        other => other,
    }
}

/// The display name of a model argument: its basename.
pub fn model_name(spec: &str) -> String {
    let trimmed = spec.trim_end_matches('/');
    let path = Path::new(trimmed);
    let name = match path.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| trimmed.to_string()),
    };
    if name == "." || name == ".." {
        return std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or(name);
    }
    name
}

/// Names for `models`: `names` when given (one per model), else basenames;
/// duplicates are an error that suggests `--names`.
pub fn resolve_names(models: &[String], names: Option<&[String]>) -> Result<Vec<String>> {
    let names: Vec<String> = match names {
        Some(given) => {
            if given.len() != models.len() {
                return Err(Error::InvalidArgument(format!(
                    "--names: got {} names for {} models",
                    given.len(),
                    models.len()
                )));
            }
            given.to_vec()
        }
        None => models.iter().map(|m| model_name(m)).collect(),
    };
    for (i, a) in names.iter().enumerate() {
        // Names become folders beside the family-level analysis files.
        const RESERVED: [&str; 5] = [
            ".",
            "..",
            "analysis.json",
            "pairwise_cosines.csv",
            "pairwise_cosines.png",
        ];
        if a.is_empty() || a.contains('/') || a.contains('\\') || RESERVED.contains(&a.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "model name '{a}' is not usable as a folder name; set names with --names"
            )));
        }
        if let Some(j) = names[..i].iter().position(|b| b == a) {
            return Err(Error::InvalidArgument(format!(
                "models {} and {} are both named '{a}'; give distinct names with --names n1 n2 ...",
                models[j], models[i]
            )));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_basenames_and_must_be_unique() {
        let models = vec!["/a/x/m1/".to_string(), "org/m2".to_string()];
        assert_eq!(resolve_names(&models, None).unwrap(), ["m1", "m2"]);
        let dup = vec!["/a/m".to_string(), "/b/m".to_string()];
        let err = resolve_names(&dup, None).unwrap_err().to_string();
        assert!(err.contains("--names"), "{err}");
        for bad in [
            ".",
            "..",
            "a/b",
            "",
            "analysis.json",
            "pairwise_cosines.png",
        ] {
            let names = [bad.to_string(), "q".to_string()];
            let err = resolve_names(&dup, Some(&names)).unwrap_err().to_string();
            assert!(err.contains("not usable as a folder name"), "{bad}: {err}");
        }
        let named = ["p".to_string(), "q".to_string()];
        assert_eq!(resolve_names(&dup, Some(&named)).unwrap(), ["p", "q"]);
    }
}
