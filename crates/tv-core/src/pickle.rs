//! PyTorch pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`).
//!
//! Each file is read through candle's lazy pickle reader and converted,
//! tensor by tensor, into a temporary safetensors file, which the rest of
//! the toolkit then maps like any other checkpoint; the copy is deleted
//! when the checkpoint is dropped. Names that share one storage (tied
//! embeddings) are stored once, under the first name that is not `lm_head`,
//! as transformers does when it writes safetensors.

use crate::error::{Error, Result};
use crate::writer::{Layout, OutTensor, ShardWriter};
use candle_core::pickle::PthTensors;
use candle_core::{DType, Tensor};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Converts pickle checkpoint `files` into safetensors files in a new
/// temporary folder; returns the folder (deleted on drop) and the files.
pub fn convert(files: &[PathBuf]) -> Result<(tempfile::TempDir, Vec<PathBuf>)> {
    let dir = tempfile::Builder::new()
        .prefix("tv-pickle-")
        .tempdir()
        .map_err(|e| {
            Error::io(
                "cannot create a temporary folder in",
                &std::env::temp_dir(),
                e,
            )
        })?;
    let mut out = Vec::with_capacity(files.len());
    for (k, file) in files.iter().enumerate() {
        let sub = dir.path().join(k.to_string());
        std::fs::create_dir(&sub).map_err(|e| Error::io("cannot create", &sub, e))?;
        convert_file(file, &sub)?;
        out.push(sub.join("model.safetensors"));
    }
    Ok((dir, out))
}

fn convert_file(file: &Path, dir: &Path) -> Result<()> {
    let bad = |e: candle_core::Error| {
        Error::bad_file(file, format!("not a readable PyTorch checkpoint: {e}"))
    };
    let mut tensors = PthTensors::new(file, None).map_err(bad)?;
    if tensors.tensor_infos().is_empty() {
        // Training checkpoints nest the weights under "state_dict".
        if let Ok(nested) = PthTensors::new(file, Some("state_dict")) {
            tensors = nested;
        }
    }
    if tensors.tensor_infos().is_empty() {
        return Err(Error::bad_file(file, "holds no tensors"));
    }

    // One name per storage region; prefer names other than lm_head.
    let mut names: Vec<&String> = tensors.tensor_infos().keys().collect();
    names.sort_by_key(|n| (n.starts_with("lm_head"), n.as_str()));
    let mut seen: HashMap<(String, usize, Vec<usize>), &String> = HashMap::new();
    let mut kept: Vec<(String, Dtype, Vec<usize>)> = Vec::new();
    for name in names {
        let info = &tensors.tensor_infos()[name];
        let shape = info.layout.dims().to_vec();
        let region = (info.path.clone(), info.layout.start_offset(), shape.clone());
        if seen.insert(region, name).is_some() {
            continue;
        }
        let dtype = storage_dtype(info.dtype).ok_or_else(|| {
            Error::bad_file(
                file,
                format!("tensor '{name}' has unsupported type {:?}", info.dtype),
            )
        })?;
        kept.push((name.clone(), dtype, shape));
    }
    kept.sort_by(|a, b| a.0.cmp(&b.0));

    let layout = Layout::plan(
        kept.iter()
            .map(|(name, dtype, shape)| OutTensor {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
            })
            .collect(),
        u64::MAX,
    );
    let mut writer = ShardWriter::create(dir, &layout, 0)?;
    for (name, _, _) in &kept {
        let tensor = tensors.get(name).map_err(bad)?.ok_or_else(|| {
            Error::bad_file(file, format!("tensor '{name}' vanished while reading"))
        })?;
        writer.write(&tensor_bytes(&tensor).map_err(bad)?)?;
    }
    writer.finish()
}

fn storage_dtype(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I64 => Dtype::I64,
        _ => return None,
    })
}

/// The little-endian bytes of a tensor, in row-major order.
fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = t.contiguous()?.flatten_all()?;
    fn bytes<T: Copy, const N: usize>(v: Vec<T>, le: fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(le).collect()
    }
    Ok(match flat.dtype() {
        DType::BF16 => bytes(flat.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::F16 => bytes(flat.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::F32 => bytes(flat.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F64 => bytes(flat.to_vec1::<f64>()?, f64::to_le_bytes),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => bytes(flat.to_vec1::<u32>()?, u32::to_le_bytes),
        DType::I64 => bytes(flat.to_vec1::<i64>()?, i64::to_le_bytes),
        other => candle_core::bail!("unsupported type {other:?}"),
    })
}
