//! Reading checkpoints: mmapped safetensors shards and a name -> tensor map.
//!
//! Every shard is memory-mapped and its header validated with the
//! `safetensors` crate (offsets contiguous, sizes matching dtype × shape,
//! file length matching the header). Tensor bytes are borrowed straight from
//! the mapping, never copied; [`Checkpoint::release`] drops a range's pages
//! from this process once it is done, so resident memory stays near the
//! working set while the page cache keeps the file warm.

use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::locate::{locate, Located, WeightFiles};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One mmapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    pub path: PathBuf,
    /// Turns a truncation of the file under the mapping into an error;
    /// declared first so it is unregistered before the mapping goes.
    _watch: crate::guard::Watch,
    map: Mmap,
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Index of its shard in [`Checkpoint::shards`].
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    pub start: usize,
    pub end: usize,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Byte length.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }

    /// The float type, if this is a float tensor.
    pub fn float_type(&self) -> Option<FloatType> {
        FloatType::from_dtype(self.dtype)
    }
}

/// An opened checkpoint: its shards and every tensor by name, in file order.
#[derive(Debug)]
pub struct Checkpoint {
    /// Where it came from.
    pub located: Located,
    pub shards: Vec<Shard>,
    tensors: HashMap<String, TensorRef>,
    /// Tensor names in storage order (shard by shard, by offset).
    order: Vec<String>,
    /// Safetensors copies of pickle files, deleted with the checkpoint.
    _converted: Option<crate::pickle::Converted>,
}

impl Checkpoint {
    /// Locates and opens `spec` (a path or a cached hub id).
    pub fn open(spec: &str) -> Result<Self> {
        let located = locate(spec)?;
        Self::open_located(located)
    }

    /// Opens already located weight files.
    pub fn open_located(located: Located) -> Result<Self> {
        let mut converted = None;
        let (files, index) = match &located.weights {
            WeightFiles::Single(p) => (vec![p.clone()], None),
            WeightFiles::Loose(ps) => (ps.clone(), None),
            WeightFiles::Pickle(ps) => {
                let (dir, files) = crate::pickle::convert(ps)?;
                converted = Some(dir);
                (files, None)
            }
            WeightFiles::Indexed(index_path) => {
                let map = read_index(index_path)?;
                let dir = index_path.parent().unwrap_or(Path::new("."));
                let mut files: Vec<PathBuf> = Vec::new();
                for file in map.values() {
                    let p = dir.join(file);
                    if !files.contains(&p) {
                        files.push(p);
                    }
                }
                files.sort();
                (files, Some((index_path.clone(), map)))
            }
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for (shard_idx, path) in files.into_iter().enumerate() {
            let (shard, entries) = open_shard(&path, shard_idx)?;
            let shard_name = file_name(&path);
            for (name, tref) in entries {
                if let Some((index_path, map)) = &index {
                    match map.get(&name) {
                        Some(listed) if *listed == shard_name => {}
                        Some(listed) => {
                            return Err(Error::bad_file(
                                &path,
                                format!(
                                    "holds tensor '{name}' that {} puts in {listed}",
                                    file_name(index_path)
                                ),
                            ))
                        }
                        None => {
                            return Err(Error::bad_file(
                                &path,
                                format!(
                                    "holds tensor '{name}' that {} does not list",
                                    file_name(index_path)
                                ),
                            ))
                        }
                    }
                }
                if tensors.contains_key(&name) {
                    return Err(Error::bad_file(
                        &path,
                        format!("tensor '{name}' is also stored in another shard"),
                    ));
                }
                order.push(name.clone());
                tensors.insert(name, tref);
            }
            shards.push(shard);
        }
        if let Some((index_path, map)) = &index {
            if let Some((name, file)) = map.iter().find(|(n, _)| !tensors.contains_key(*n)) {
                return Err(Error::bad_file(
                    index_path,
                    format!("lists tensor '{name}' in {file}, which does not hold it"),
                ));
            }
        }
        Ok(Self {
            located,
            shards,
            tensors,
            order,
            _converted: converted,
        })
    }

    /// Tensor names in storage order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// Whether the checkpoint stores a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the checkpoint stores no tensors.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The tensor's bytes, borrowed from the mapping (no copy).
    pub fn bytes(&self, tensor: &TensorRef) -> &[u8] {
        &self.shards[tensor.shard].map[tensor.start..tensor.end]
    }

    /// Total bytes of all weight files.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }

    /// Drops the pages of `bytes[from..to]` of `tensor` from this process's
    /// resident set. The file's page cache is kept; a later read faults the
    /// pages back in.
    pub fn release(&self, tensor: &TensorRef, from: usize, to: usize) {
        let map = &self.shards[tensor.shard].map;
        let start = tensor.start + from;
        let len = to.saturating_sub(from);
        if len == 0 {
            return;
        }
        // SAFETY: the mapping is private and read-only; MADV_DONTNEED only
        // discards this process's page references, and any later access
        // re-reads the unchanged file contents. No reference into the range
        // is assumed to keep stale data.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len) };
    }

    /// The folder holding `config.json` and tokenizer files.
    pub fn folder(&self) -> &Path {
        &self.located.folder
    }

    /// The model's `config.json`, if present and valid JSON.
    pub fn config(&self) -> Option<serde_json::Value> {
        self.read_config().ok().flatten()
    }

    /// The model's `config.json`: `None` when absent or not valid JSON; an
    /// error naming the file when it is not a regular file, is too large
    /// or cannot be read.
    pub fn read_config(&self) -> Result<Option<serde_json::Value>> {
        let path = self.folder().join("config.json");
        let text = crate::sidecar::read_side_text_if_present(&path)?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads `weight_map` from an index json (a regular file of bounded size);
/// an empty map, a shard name that is not a plain file name, and a shard
/// that is missing or not a regular file are errors naming the index.
pub(crate) fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let map = parse_index(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut checked = std::collections::BTreeSet::new();
    for file in map.values() {
        if !checked.insert(file.as_str()) {
            continue;
        }
        let shard = dir.join(file);
        if !shard.exists() {
            return Err(Error::NotFound(format!(
                "{}: names shard {file}, which is missing from {}",
                path.display(),
                dir.display()
            )));
        }
        crate::sidecar::check_regular_file(&shard)?;
    }
    Ok(map)
}

/// Reads `weight_map` from an index json without looking for its shards:
/// an empty map and a shard name that is not a plain file name are errors.
pub(crate) fn parse_index(path: &Path) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = crate::sidecar::read_side_text(path)?;
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("not a valid index json: {e}")))?;
    if index.weight_map.is_empty() {
        return Err(Error::bad_file(
            path,
            "has an empty weight_map (it lists no tensors)",
        ));
    }
    for file in index.weight_map.values() {
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file == "."
            || file == ".."
        {
            return Err(Error::bad_file(
                path,
                format!("shard name '{file}' is not a plain file name"),
            ));
        }
    }
    Ok(index.weight_map)
}

/// Maps one shard and lists its tensors in offset order.
fn open_shard(path: &Path, shard_idx: usize) -> Result<(Shard, Vec<(String, TensorRef)>)> {
    let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot read", path, e))?;
    // SAFETY: the file is mapped read-only; the tools never write to their
    // inputs. Another process truncating it while we run raises SIGBUS on
    // the lost pages, which `guard` turns into zeros plus an error that
    // `guard::check` reports before any output is committed.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("cannot map", path, e))?;
    let watch = crate::guard::watch(path, &meta, &map);
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| Error::bad_file(path, describe(e)))?;
    let data_start = 8 + header_len;
    let infos = metadata.tensors();
    let mut entries: Vec<(String, TensorRef)> = metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = infos[&name];
            let (s, e) = info.data_offsets;
            let tref = TensorRef {
                shard: shard_idx,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            };
            (name, tref)
        })
        .collect();
    entries.sort_by_key(|(_, t)| t.start);
    Ok((
        Shard {
            path: path.to_path_buf(),
            map,
            _watch: watch,
        },
        entries,
    ))
}

/// A one-line description of a safetensors parsing error.
fn describe(e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "too short to be a safetensors file (no 8-byte header length)".into(),
        E::HeaderTooLarge => "header length is implausibly large (not a safetensors file?)".into(),
        E::InvalidHeaderLength => "header length runs past the end of the file".into(),
        E::InvalidHeader(_) => "header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(err) => {
            format!("header is not valid safetensors JSON: {err}")
        }
        E::InvalidOffset(name) => {
            format!("tensor '{name}' has data_offsets that overlap, leave a gap or run backwards")
        }
        E::TensorInvalidInfo => "a tensor's data_offsets do not match its dtype and shape".into(),
        E::MetadataIncompleteBuffer => {
            "file length does not match its header (truncated or padded download?)".into()
        }
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        E::MisalignedSlice => "a tensor's size is not a whole number of bytes".into(),
        other => format!("invalid safetensors file: {other}"),
    }
}

/// The `checkpoint` fuzz target's input layout, shared with the test that
/// replays its corpus.
#[doc(hidden)]
pub mod fuzzing {
    use super::Checkpoint;
    use std::path::Path;

    /// Writes `data` as a model folder into the empty folder `root` (the
    /// first byte picks the layout: 0, a single `model.safetensors` of the
    /// rest; 1, a `model.safetensors.index.json` of the rest up to its first
    /// NUL byte and one shard of what follows; 2, the same with a
    /// `pytorch_model.bin` index and pickle shard), opens it and reads
    /// every tensor. Returns whether it opened; panics if an opened tensor's
    /// bytes do not have its size.
    pub fn open_layout(root: &Path, data: &[u8]) -> bool {
        let Some((&mode, rest)) = data.split_first() else {
            return false;
        };
        let (index, shard) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let write = |name: &str, bytes: &[u8]| std::fs::write(root.join(name), bytes).unwrap();
        match mode % 3 {
            0 => write("model.safetensors", rest),
            1 => {
                write("model.safetensors.index.json", index);
                write("model-00001-of-00001.safetensors", shard);
            }
            _ => {
                write("pytorch_model.bin.index.json", index);
                write("pytorch_model-00001-of-00001.bin", shard);
            }
        }
        let Ok(ckpt) = Checkpoint::open(&root.to_string_lossy()) else {
            return false;
        };
        let mut sum = 0u64;
        for name in ckpt.names() {
            let t = ckpt.get(name).expect("listed");
            let bytes = ckpt.bytes(t);
            assert_eq!(bytes.len(), t.nbytes(), "tensor {name}");
            sum += bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
        }
        std::hint::black_box(sum);
        true
    }
}
