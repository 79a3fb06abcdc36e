//! Turning what the user typed into weight files.
//!
//! A model argument may be a folder holding `model.safetensors` or a
//! `*.safetensors.index.json` with its shards, a single `.safetensors` file,
//! an index file, or a Hugging Face model id (`org/name`) already present in
//! the local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`). This module only finds files; reading them is
//! the job of [`crate::checkpoint`].

use crate::error::{Error, Result};
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
    if looks_like_hub_id(spec) {
        let folder = hub_snapshot(spec)?;
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
    if looks_like_hub_id(spec) {
        return hub_snapshot(spec).ok();
    }
    None
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

fn find_in_folder(dir: &Path) -> Result<WeightFiles> {
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
            "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, *.safetensors)",
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

/// Whether `spec` has the shape of a hub id: `org/name`, nothing more.
fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

/// The hub cache folder, as huggingface_hub chooses it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn hub_snapshot(id: &str) -> Result<PathBuf> {
    let cache = hub_cache_dir();
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let not_cached = || {
        Error::NotFound(format!(
            "{id}: not a local path, and not in the Hugging Face cache at {} \
             (download it first, e.g. `huggingface-cli download {id}`)",
            cache.display()
        ))
    };
    if !repo.is_dir() {
        return Err(not_cached());
    }
    let snapshots = repo.join("snapshots");
    let refs_main = repo.join("refs").join("main");
    if std::fs::symlink_metadata(&refs_main).is_ok() {
        let rev = read_ref(&refs_main)?;
        return snapshot_dir(&snapshots, &rev).ok_or_else(|| {
            Error::NotFound(format!(
                "{id}: {} names revision {rev}, which has no snapshot folder in {}; \
                 download the model again",
                refs_main.display(),
                snapshots.display()
            ))
        });
    }
    // No refs/main: accept the cache only when it holds one snapshot.
    let mut revs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| snapshot_dir(&snapshots, &e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    match revs.len() {
        1 => Ok(revs.remove(0)),
        0 => Err(not_cached()),
        n => Err(Error::NotFound(format!(
            "{id}: the cache at {} holds {n} snapshots and no refs/main; pass the snapshot folder path",
            repo.display()
        ))),
    }
}

/// Whether `rev` is a commit hash: 40 lowercase or uppercase hex digits.
fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit hash a cache `refs/<revision>` file holds. Anything else
/// (a path, several lines, an empty file) is refused, so a revision can
/// never lead out of the cache.
fn read_ref(path: &Path) -> Result<String> {
    let bytes = crate::sidecar::read_limited(path, 4096)?;
    let text = String::from_utf8_lossy(&bytes);
    // huggingface_hub writes the hash alone; tolerate one trailing newline.
    let rev = text.strip_suffix('\n').unwrap_or(&text);
    if !is_commit_hash(rev) {
        return Err(Error::bad_file(
            path,
            format!(
                "holds '{}', not a commit hash (40 hex digits); the cache is damaged, download the model again",
                rev.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(rev.to_string())
}

/// `snapshots/<rev>` when `rev` is a commit hash and that is a real folder
/// (not a symlink that could lead elsewhere).
fn snapshot_dir(snapshots: &Path, rev: &str) -> Option<PathBuf> {
    if !is_commit_hash(rev) {
        return None;
    }
    let dir = snapshots.join(rev);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    meta.is_dir().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("meta-llama/Llama-3.2-3B"));
        assert!(!looks_like_hub_id("./x/y"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("plain"));
    }

    #[test]
    fn refs_must_hold_a_commit_hash_of_a_snapshot_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("snapshots");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(snapshots.join(hash)).unwrap();
        let refs = dir.path().join("main");
        std::fs::write(&refs, hash).unwrap();
        assert_eq!(read_ref(&refs).unwrap(), hash);
        std::fs::write(&refs, format!("{hash}\n")).unwrap();
        assert_eq!(read_ref(&refs).unwrap(), hash);
        assert_eq!(snapshot_dir(&snapshots, hash), Some(snapshots.join(hash)));
        for bad in [
            "../../etc".to_string(),
            "/etc".to_string(),
            String::new(),
            format!("{hash}\n../x"),
            format!("{hash}\n\n"),
            format!(" {hash}"),
            "g".repeat(40),
        ] {
            std::fs::write(&refs, &bad).unwrap();
            let err = read_ref(&refs).unwrap_err().to_string();
            assert!(err.contains("not a commit hash"), "{bad:?}: {err}");
            assert_eq!(snapshot_dir(&snapshots, &bad), None);
        }
        // A snapshot that is a symlink (possibly out of the cache) is not one.
        let other = "1123456789abcdef0123456789abcdef01234567";
        std::os::unix::fs::symlink("/", snapshots.join(other)).unwrap();
        assert_eq!(snapshot_dir(&snapshots, other), None);
    }
}
