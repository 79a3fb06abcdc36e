//! The non-weight files of a merged model folder.
//!
//! `config.json` comes from the base with `torch_dtype` set to the output
//! type; generation and tokenizer files are copied byte for byte; a
//! `README.md` model card and `merge_record.json` (what was merged, with
//! which weights, by which tool version) describe the result.

use crate::dtype::FloatType;
use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// Whether a base file belongs in the merged folder (besides config.json):
/// generation settings, tokenizer, vocabulary and chat-template files.
pub fn is_side_file(name: &str) -> bool {
    const EXACT: [&str; 9] = [
        "generation_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.json",
    ];
    EXACT.contains(&name)
        || name.starts_with("tokenizer")
        || name.starts_with("vocab.")
        || name.starts_with("chat_template.")
        || name.ends_with(".tiktoken")
}

/// Copies the base's side files into `dir`; returns their names.
pub fn copy_side_files(base_folder: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    let entries =
        std::fs::read_dir(base_folder).map_err(|e| Error::io("cannot list", base_folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", base_folder, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let src = entry.path();
        if !is_side_file(&name) || !src.is_file() {
            continue;
        }
        std::fs::copy(&src, dir.join(&name)).map_err(|e| Error::io("cannot copy", &src, e))?;
        copied.push(name);
    }
    copied.sort();
    Ok(copied)
}

/// Writes the base's `config.json` into `dir` with its dtype set to
/// `dtype`. Returns false when the base has no config.
pub fn write_config(base_folder: &Path, dir: &Path, dtype: Option<FloatType>) -> Result<bool> {
    let src = base_folder.join("config.json");
    if !src.is_file() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&src).map_err(|e| Error::io("cannot read", &src, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&src, format!("not valid JSON: {e}")))?;
    if let (Some(obj), Some(dtype)) = (config.as_object_mut(), dtype) {
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), dtype.torch_name().into());
        }
    }
    let dst = dir.join("config.json");
    let out = serde_json::to_string_pretty(&config).expect("json") + "\n";
    std::fs::write(&dst, out).map_err(|e| Error::io("cannot write", &dst, e))?;
    Ok(true)
}

/// One fine-tune in the merge record.
#[derive(Debug, Clone, Serialize)]
pub struct RecordModel {
    pub name: String,
    pub path: String,
    pub l2_norm: Option<f64>,
    pub lambda: f64,
    pub missing_tensors: Vec<String>,
    pub extra_tensors: Vec<String>,
}

/// The machine-readable record of a merge (`merge_record.json`).
#[derive(Debug, Clone, Serialize)]
pub struct MergeRecord {
    pub tool: &'static str,
    pub version: &'static str,
    pub method: &'static str,
    pub formula: &'static str,
    pub created_unix: u64,
    pub base: String,
    pub models: Vec<RecordModel>,
    /// `l2_norms`, `lambdas` or `analysis`.
    pub weights_from: String,
    pub mode: Option<String>,
    pub alpha: f64,
    pub beta: f64,
    pub dtype: Option<String>,
    pub tensors_merged: usize,
    pub tensors_copied: usize,
    pub shards: usize,
    pub total_size: u64,
    pub tied_embeddings: bool,
}

impl MergeRecord {
    /// Writes `merge_record.json` and `README.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join("merge_record.json");
        let json = serde_json::to_string_pretty(self).expect("json") + "\n";
        std::fs::write(&path, json).map_err(|e| Error::io("cannot write", &path, e))?;
        let path = dir.join("README.md");
        std::fs::write(&path, self.model_card()).map_err(|e| Error::io("cannot write", &path, e))
    }

    fn model_card(&self) -> String {
        let mut s = String::new();
        s.push_str("---\n");
        s.push_str(&format!("base_model: {}\n", yaml_str(&self.base)));
        s.push_str(
            "library_name: transformers\ntags:\n- merge\n- task-arithmetic\n- ta-merge\n---\n\n",
        );
        s.push_str("# Task Arithmetic merge\n\n");
        s.push_str(&format!(
            "Made with {} {} by Task Arithmetic: `{}`, accumulated in f64 and rounded once to {}.\n\n",
            self.tool,
            self.version,
            self.formula,
            self.dtype.as_deref().unwrap_or("each tensor's stored type")
        ));
        s.push_str(&format!("Base: `{}`\n\n", self.base));
        let how = match (self.weights_from.as_str(), &self.mode) {
            ("lambdas", _) => "given directly".to_string(),
            (from, Some(mode)) => format!(
                "from each task vector's global L2 norm ({from}), mode {mode}, alpha {}, beta {}",
                self.alpha, self.beta
            ),
            (from, None) => from.to_string(),
        };
        s.push_str(&format!(
            "Weights {how}:\n\n| model | L2 | λ |\n| --- | ---: | ---: |\n"
        ));
        for m in &self.models {
            let l2 = m.l2_norm.map_or("n/a".to_string(), |l| format!("{l:.4}"));
            s.push_str(&format!("| `{}` | {l2} | {:.6} |\n", m.path, m.lambda));
        }
        s.push_str(&format!(
            "\n{} tensors merged, {} copied from the base; {} shard(s), {} bytes.\n",
            self.tensors_merged, self.tensors_copied, self.shards, self.total_size
        ));
        s.push_str("The full record is in `merge_record.json`.\n");
        s
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_files_are_tokenizer_and_generation_files_only() {
        for yes in [
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            assert!(is_side_file(yes), "{yes}");
        }
        for no in [
            "config.json",
            "model.safetensors",
            "trainer_state.json",
            "README.md",
            "optimizer.pt",
        ] {
            assert!(!is_side_file(no), "{no}");
        }
    }
}
