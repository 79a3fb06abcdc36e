//! Turning what the user typed into weight files.
//!
//! A model argument may be a folder holding `model.safetensors` or a
//! `*.safetensors.index.json` with its shards, a single `.safetensors` file,
//! an index file, or a Hugging Face model id (`org/name`, `org/name@revision`)
//! present in the local cache (see [`crate::hub`], which downloads it there
//! first when it is missing). This module only finds files; reading them is
//! the job of [`crate::checkpoint`].

use crate::error::{Error, Result};
use crate::hub::cache::{Cached, HubId};
pub use crate::hub::settings::hub_cache_dir;
use std::path::{Path, PathBuf};

/// Where a checkpoint's weights live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One safetensors file.
    Single(PathBuf),
    /// An index json mapping tensors to shards in the same folder.
    Indexed(PathBuf),
    /// Several safetensors files in one folder without an index.
    Loose(Vec<PathBuf>),
    /// PyTorch pickle files (`pytorch_model.bin`, its shards, `.pt`, `.pth`).
    Pickle(Vec<PathBuf>),
}

/// A located checkpoint: its weight files and the folder holding its
/// configuration and tokenizer files.
#[derive(Debug, Clone)]
pub struct Located {
    /// What the user typed.
    pub spec: String,
    /// The file or folder the user named (the snapshot folder for a hub id).
    pub root: PathBuf,
    /// The folder (or, for a single file, the file's folder) of side files.
    pub folder: PathBuf,
    /// The weight files.
    pub weights: WeightFiles,
}

/// Finds the weight files of `spec` (a path or a cached Hugging Face id).
pub fn locate(spec: &str) -> Result<Located> {
    let path = Path::new(spec);
    if path.exists() {
        return locate_path(spec, path);
    }
    if let Some(id) = HubId::parse(spec)? {
        let folder = hub_snapshot(spec, &id)?;
        return locate_path(spec, &folder);
    }
    Err(Error::NotFound(format!("{spec}: no such file or folder")))
}

/// The folder `spec` names: a folder path, or a cached hub id's snapshot
/// folder; `None` for files and for what cannot be found.
pub(crate) fn folder_of(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return path.is_dir().then(|| path.to_path_buf());
    }
    match HubId::parse(spec) {
        Ok(Some(id)) => hub_snapshot(spec, &id).ok(),
        _ => None,
    }
}

fn locate_path(spec: &str, path: &Path) -> Result<Located> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
    if !meta.is_dir() {
        // A FIFO, device or socket is refused before anything opens it.
        crate::sidecar::check_regular_file(path)?;
    }
    let parent = || {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    if meta.is_file() {
        let name = file_name(path);
        let weights = if name.ends_with(".bin.index.json") {
            WeightFiles::Pickle(pickle_shards(path)?)
        } else if name.ends_with(".index.json") {
            WeightFiles::Indexed(path.to_path_buf())
        } else if is_pickle_name(&name) {
            WeightFiles::Pickle(vec![path.to_path_buf()])
        } else if name.ends_with(".safetensors") {
            WeightFiles::Single(path.to_path_buf())
        } else {
            return Err(unsupported_file(path));
        };
        return Ok(Located {
            spec: spec.to_string(),
            root: path.to_path_buf(),
            folder: parent(),
            weights,
        });
    }
    let weights = find_in_folder(path)?;
    Ok(Located {
        spec: spec.to_string(),
        root: path.to_path_buf(),
        folder: path.to_path_buf(),
        weights,
    })
}

fn unsupported_file(path: &Path) -> Error {
    Error::NotFound(format!(
        "{}: not a checkpoint file (expected *.safetensors, *.safetensors.index.json, *.bin, *.pt or *.pth)",
        path.display()
    ))
}

fn is_pickle_name(name: &str) -> bool {
    [".bin", ".pt", ".pth"].iter().any(|e| name.ends_with(e))
}

/// The shard files named by a `pytorch_model.bin.index.json`.
fn pickle_shards(index: &Path) -> Result<Vec<PathBuf>> {
    let map = crate::checkpoint::read_index(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(crate) fn find_in_folder(dir: &Path) -> Result<WeightFiles> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        crate::sidecar::check_regular_file(&index)?;
        return Ok(WeightFiles::Indexed(index));
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        crate::sidecar::check_regular_file(&single)?;
        return Ok(WeightFiles::Single(single));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    let mut indexes = Vec::new();
    let mut files = Vec::new();
    let mut pickles = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", dir, e))?;
        let path = entry.path();
        let name = file_name(&path);
        let weight_like = name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || name == "pytorch_model.bin.index.json"
            || (name.ends_with(".bin") && name.starts_with("pytorch_model"));
        if path.is_dir() || !weight_like {
            continue;
        }
        // A weight file that is a FIFO, device or socket is refused, not skipped.
        crate::sidecar::check_regular_file(&path)?;
        if name.ends_with(".safetensors.index.json") {
            indexes.push(path);
        } else if name.ends_with(".safetensors") {
            files.push(path);
        } else if name == "pytorch_model.bin.index.json" {
            return Ok(WeightFiles::Pickle(pickle_shards(&path)?));
        } else if name.ends_with(".bin") && name.starts_with("pytorch_model") {
            pickles.push(path);
        }
    }
    indexes.sort();
    files.sort();
    match (indexes.len(), files.len()) {
        (1, _) => Ok(WeightFiles::Indexed(indexes.remove(0))),
        (0, 1) => Ok(WeightFiles::Single(files.remove(0))),
        (0, n) if n > 1 => Ok(WeightFiles::Loose(files)),
        (0, _) if !pickles.is_empty() => {
            pickles.sort();
            Ok(WeightFiles::Pickle(pickles))
        }
        (0, _) => Err(Error::NotFound(format!(
            "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, \
             *.safetensors, pytorch_model*.bin)",
            dir.display()
        ))),
        _ => Err(Error::NotFound(format!(
            "{}: several index files ({}); pass the one to use as the model path",
            dir.display(),
            indexes
                .iter()
                .map(|p| file_name(p))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The snapshot folder of a hub id in the local cache; an error that says
/// what is missing (and how to get it) when the cache lacks it.
fn hub_snapshot(spec: &str, id: &HubId) -> Result<PathBuf> {
    let cache = hub_cache_dir();
    match crate::hub::cache::lookup(&cache, id)? {
        Cached::Complete(dir) | Cached::Guessed(dir) => Ok(dir),
        Cached::Incomplete { snapshot, missing } => Err(Error::NotFound(format!(
            "{spec}: the cached snapshot {} lacks {missing} (an interrupted download?); \
             run without --no-download and HF_HUB_OFFLINE to complete it",
            snapshot.display()
        ))),
        Cached::Dangling { reference, commit } => Err(Error::NotFound(format!(
            "{spec}: {} names commit {commit}, which has no snapshot folder in the cache; \
             run without --no-download and HF_HUB_OFFLINE to download the model again",
            reference.display()
        ))),
        Cached::Absent => Err(Error::NotFound(format!(
            "{spec}: not a local path{}, and not in the Hugging Face cache at {} \
             (run without --no-download and HF_HUB_OFFLINE to download it)",
            crate::hub::local_hint(id),
            cache.display()
        ))),
    }
}
