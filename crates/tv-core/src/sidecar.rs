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

/// The most bytes a side file (`config.json`, tokenizer and generation
/// files, index json, `summary.json`, ...) may have.
pub const SIDE_FILE_LIMIT: u64 = 64 << 20;

/// What a non-regular file is, for messages.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Refuses anything but a regular file of at most `limit` bytes.
fn check_regular(path: &Path, meta: &std::fs::Metadata, limit: u64) -> Result<()> {
    if !meta.is_file() {
        return Err(Error::bad_file(
            path,
            format!(
                "is {}, not a regular file; refusing to read it",
                kind_of(meta)
            ),
        ));
    }
    if meta.len() > limit {
        return Err(Error::bad_file(
            path,
            format!(
                "is {} bytes, over the {} MB limit for this kind of file; refusing to read it",
                meta.len(),
                limit >> 20
            ),
        ));
    }
    Ok(())
}

/// Checks that `path` is a regular file (following symlinks) without
/// opening it: a FIFO, device, socket or folder is refused naming the file.
pub fn check_regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
    check_regular(path, &meta, u64::MAX)
}

/// Reads a side file whole. Only a regular file of at most
/// [`SIDE_FILE_LIMIT`] bytes is read: the type is checked before opening
/// and again on the open file, which is opened non-blocking, so a FIFO can
/// never hang the run. An interrupt request stops the read.
pub fn read_side_bytes(path: &Path) -> Result<Vec<u8>> {
    read_limited(path, SIDE_FILE_LIMIT)
}

/// [`read_side_bytes`] with another size limit.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
    check_regular(path, &meta, limit)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))?;
    // The path may have been swapped between the check and the open.
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot read", path, e))?;
    check_regular(path, &meta, limit)?;
    let mut out = Vec::with_capacity(meta.len() as usize);
    let mut reader = file.take(limit + 1);
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        if crate::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("cannot read", path, e)),
        };
        out.extend_from_slice(&chunk[..n]);
    }
    if out.len() as u64 > limit {
        return Err(Error::bad_file(
            path,
            format!(
                "grew past the {} MB limit for this kind of file while being read",
                limit >> 20
            ),
        ));
    }
    Ok(out)
}

/// [`read_side_bytes`] as UTF-8 text.
pub fn read_side_text(path: &Path) -> Result<String> {
    String::from_utf8(read_side_bytes(path)?)
        .map_err(|_| Error::bad_file(path, "is not UTF-8 text"))
}

/// [`read_side_text`], or `None` when nothing exists at `path` (a dangling
/// symlink counts as nothing).
pub fn read_side_text_if_present(path: &Path) -> Result<Option<String>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => read_side_text(path).map(Some),
    }
}

/// Checks, without opening anything, that every side file of `folder`
/// (`config.json` and what [`copy_side_files`] copies) is a regular file
/// within [`SIDE_FILE_LIMIT`], so a bad one is reported before any work.
pub fn check_side_files(folder: &Path) -> Result<()> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io("cannot list", folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", folder, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name != "config.json" && (!is_side_file(&name) || path.is_dir()) {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|e| Error::io("cannot read", &path, e))?;
        check_regular(&path, &meta, SIDE_FILE_LIMIT)?;
    }
    Ok(())
}

/// Copies the base's side files into `dir`; returns their names. A side
/// file that is a FIFO, device or socket, or too large, is an error naming
/// it; folders (some repositories keep a `tokenizer/` folder) are not side
/// files and are left out.
pub fn copy_side_files(base_folder: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    let entries =
        std::fs::read_dir(base_folder).map_err(|e| Error::io("cannot list", base_folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", base_folder, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let src = entry.path();
        if !is_side_file(&name) || src.is_dir() {
            continue;
        }
        let bytes = read_side_bytes(&src)?;
        let dst = dir.join(&name);
        std::fs::write(&dst, bytes).map_err(|e| Error::io("cannot write", &dst, e))?;
        copied.push(name);
    }
    copied.sort();
    Ok(copied)
}

/// Writes the base's `config.json` into `dir` with its dtype set to
/// `dtype` and, when `untied`, `tie_word_embeddings: false` (the output
/// stores its own `lm_head.weight`). Returns false when the base has no
/// config.
pub fn write_config(
    base_folder: &Path,
    dir: &Path,
    dtype: Option<FloatType>,
    untied: bool,
) -> Result<bool> {
    let src = base_folder.join("config.json");
    let Some(text) = read_side_text_if_present(&src)? else {
        return Ok(false);
    };
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&src, format!("not valid JSON: {e}")))?;
    if let (Some(obj), Some(dtype)) = (config.as_object_mut(), dtype) {
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), dtype.torch_name().into());
        }
    }
    if let (Some(obj), true) = (config.as_object_mut(), untied) {
        obj.insert("tie_word_embeddings".into(), false.into());
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
    /// `None` where the weight varies by tensor (see `mergekit_config.yml`)
    /// and for methods that weigh no models (model_stock, slerp, magmax).
    pub lambda: Option<f64>,
    pub missing_tensors: Vec<String>,
    pub extra_tensors: Vec<String>,
    /// Tokens matched, added and missing against the base's vocabulary,
    /// when embedding rows were matched by token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab: Option<crate::vocab::VocabCounts>,
    /// For a LoRA adapter: its rank, alpha and targets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<crate::lora::AdapterSummary>,
}

/// The settings of [`MergeRecord::settings`]: those the method uses.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecordSettings {
    /// λ, when it is one number for every tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// SLERP's t, when it is one number for every tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescale: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub density_scope: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_wise: Option<bool>,
    /// The config file beside the record that reproduces the merge.
    pub config: &'static str,
}

impl RecordSettings {
    /// The settings `config` (as written out) and `s` give method `s.kind`.
    pub fn new(config: &crate::config::MergeConfig, s: &crate::methods::MethodSettings) -> Self {
        use crate::config::ParamKey;
        let kind = s.kind;
        let uses = |key: ParamKey| key.applies_to(kind);
        let number = |key: ParamKey, default: f64| match config.global_param(key) {
            Some(crate::params::ParamValue::Number(x)) => Some(*x),
            None => Some(default),
            Some(_) => None,
        };
        Self {
            scale: uses(ParamKey::Lambda)
                .then(|| number(ParamKey::Lambda, crate::recipe::DEFAULT_LAMBDA))
                .flatten(),
            t: uses(ParamKey::T)
                .then(|| number(ParamKey::T, crate::recipe::DEFAULT_T))
                .flatten(),
            normalize: uses(ParamKey::Normalize).then_some(s.normalize),
            rescale: uses(ParamKey::Rescale).then(|| s.rescale.name()),
            seed: uses(ParamKey::Seed).then_some(s.seed),
            density_scope: uses(ParamKey::DensityScope).then(|| s.density_scope.name()),
            filter_wise: uses(ParamKey::FilterWise).then_some(s.filter_wise),
            config: "mergekit_config.yml",
        }
    }
}

/// The machine-readable record of a merge (`merge_record.json`).
#[derive(Debug, Clone, Serialize)]
pub struct MergeRecord {
    pub tool: &'static str,
    pub version: &'static str,
    pub method: &'static str,
    pub formula: &'static str,
    /// The method's settings for the whole merge (per-model and per-tensor
    /// values are in `mergekit_config.yml`).
    pub settings: RecordSettings,
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
    /// The base's tied embeddings were written untied (`--untie-embeddings`).
    pub untied_embeddings: bool,
    /// `base` or `union` when embedding rows were matched by token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab: Option<&'static str>,
    /// Rows of the output's embedding, when matched by token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
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
        s.push_str(&format!(
            "library_name: transformers\ntags:\n- merge\n- mergekit\n- {}\n- ta-merge\n---\n\n",
            self.method.replace('_', "-")
        ));
        s.push_str(&format!("# {} merge\n\n", self.method));
        s.push_str(&format!(
            "Made with {} {} by `{}`: `{}`, accumulated in f64 and rounded once to {}. \
             `mergekit_config.yml` holds the recipe.\n\n",
            self.tool,
            self.version,
            self.method,
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
            let lambda = m
                .lambda
                .map_or("per tensor".to_string(), |l| format!("{l:.6}"));
            s.push_str(&format!("| `{}` | {l2} | {lambda} |\n", m.path));
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

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("config.json");
        std::fs::write(&ok, "{}").unwrap();
        assert_eq!(read_side_text(&ok).unwrap(), "{}");
        assert_eq!(
            read_side_text_if_present(&dir.path().join("nope")).unwrap(),
            None
        );

        let fifo = dir.path().join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // Returns at once (no writer would ever come), naming the file.
        let err = read_side_text(&fifo).unwrap_err().to_string();
        assert!(err.contains("fifo.json") && err.contains("a FIFO"), "{err}");
        let err = check_regular_file(&fifo).unwrap_err().to_string();
        assert!(err.contains("a FIFO"), "{err}");

        let err = read_side_text(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a folder"), "{err}");
        let err = read_side_text(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/null") && err.contains("character device"),
            "{err}"
        );

        let big = dir.path().join("tokenizer.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(SIDE_FILE_LIMIT + 1).unwrap();
        let err = read_side_bytes(&big).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("64 MB"),
            "{err}"
        );

        // A symlink to a regular file is read; one to a FIFO is refused.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert_eq!(read_side_text(&link).unwrap(), "{}");
        let link = dir.path().join("fifo-link.json");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(read_side_text(&link).is_err());
    }
}
