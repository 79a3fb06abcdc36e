//! Checking a finished model folder before it is used or uploaded.
//!
//! Re-reads every shard: header, offsets and file length (through the
//! checkpoint reader, which refuses any inconsistency), the index's shard
//! names and `total_size`, the `format` metadata transformers expects,
//! `config.json` when present (a merge of a base without one has none), and
//! every float value, which must be finite.

use crate::checkpoint::Checkpoint;
use crate::dtype::count_nonfinite;
use crate::error::{Error, Result};
use crate::progress::Progress;
use rayon::prelude::*;
use std::path::Path;

/// What a successful verification found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub tensors: usize,
    pub shards: usize,
    pub total_size: u64,
    pub elements: u64,
}

/// Verifies the model folder `dir`.
pub fn verify(dir: &Path, progress: &dyn Progress) -> Result<VerifyReport> {
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "{}: no such folder",
            dir.display()
        )));
    }
    let spec = dir.to_string_lossy().into_owned();
    let ckpt = Checkpoint::open(&spec)?;
    let total_size: u64 = ckpt
        .names()
        .iter()
        .map(|n| ckpt.get(n).expect("listed").nbytes() as u64)
        .sum();

    let index = dir.join("model.safetensors.index.json");
    if let Some(text) = crate::sidecar::read_side_text_if_present(&index)? {
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
        match v
            .pointer("/metadata/total_size")
            .and_then(serde_json::Value::as_u64)
        {
            Some(t) if t == total_size => {}
            Some(t) => {
                return Err(Error::bad_file(
                    &index,
                    format!(
                    "metadata.total_size is {t}, but the shards hold {total_size} bytes of tensors"
                ),
                ))
            }
            None => return Err(Error::bad_file(&index, "has no metadata.total_size")),
        }
    }
    for shard in &ckpt.shards {
        check_format_metadata(&shard.path)?;
    }
    // A merge of a base without config.json has none either; one that is
    // there must be a readable JSON file.
    let config = dir.join("config.json");
    if let Some(text) = crate::sidecar::read_side_text_if_present(&config)? {
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| Error::bad_file(&config, format!("not valid JSON: {e}")))?;
    }

    progress.begin(total_size);
    let mut elements = 0u64;
    for name in ckpt.names() {
        let t = ckpt.get(name).expect("listed");
        elements += t.numel() as u64;
        if crate::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        if let Some(ty) = t.float_type() {
            let bytes = ckpt.bytes(t);
            // In pieces of 64 MB, so an interrupt stops a huge tensor too.
            let mut bad = 0usize;
            for (k, piece) in bytes.chunks(64 << 20).enumerate() {
                if crate::interrupt::requested() {
                    return Err(Error::Interrupted);
                }
                bad += piece
                    .par_chunks(ty.size() << 16)
                    .map(|c| count_nonfinite(ty, c))
                    .sum::<usize>();
                let from = k * (64 << 20);
                ckpt.release(t, from, from + piece.len());
            }
            if bad > 0 {
                return Err(Error::bad_file(
                    &ckpt.shards[t.shard].path,
                    format!("tensor '{name}' holds {bad} NaN or infinite values"),
                ));
            }
        }
        progress.advance(t.nbytes() as u64);
    }
    progress.finish();
    // A shard truncated while it was read reads as zeros: say so.
    crate::guard::check()?;
    Ok(VerifyReport {
        tensors: ckpt.len(),
        shards: ckpt.shards.len(),
        total_size,
        elements,
    })
}

/// Checks that a shard's header carries `__metadata__ {"format": "pt"}`.
fn check_format_metadata(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| Error::io("cannot read", path, e))?;
    // The reader has already checked the header length against the file.
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header)
        .map_err(|e| Error::io("cannot read", path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::bad_file(path, format!("header is not JSON: {e}")))?;
    match v
        .pointer("/__metadata__/format")
        .and_then(serde_json::Value::as_str)
    {
        Some("pt") => Ok(()),
        other => Err(Error::bad_file(
            path,
            format!(
                "header metadata format is {other:?}, not \"pt\" (transformers refuses such files)"
            ),
        )),
    }
}
