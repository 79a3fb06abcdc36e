//! Helpers shared by the end-to-end tests: tiny checkpoint families written
//! with the `safetensors` crate (not with the code under test), readers for
//! the tools' outputs, and independent f64 oracles.

#![allow(dead_code)]

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Storage types the tests generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    BF16,
    F16,
    F32,
    I64,
}

impl Ty {
    pub fn dtype(self) -> Dtype {
        match self {
            Ty::BF16 => Dtype::BF16,
            Ty::F16 => Dtype::F16,
            Ty::F32 => Dtype::F32,
            Ty::I64 => Dtype::I64,
        }
    }

    pub fn from_dtype(d: Dtype) -> Ty {
        match d {
            Dtype::BF16 => Ty::BF16,
            Dtype::F16 => Ty::F16,
            Dtype::F32 => Ty::F32,
            Dtype::I64 => Ty::I64,
            other => panic!("unexpected dtype {other:?}"),
        }
    }

    /// Encodes values (already representable, or rounded by `half`).
    pub fn encode(self, values: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &v in values {
            match self {
                Ty::BF16 => out.extend(half::bf16::from_f64(v).to_le_bytes()),
                Ty::F16 => out.extend(half::f16::from_f64(v).to_le_bytes()),
                Ty::F32 => out.extend((v as f32).to_le_bytes()),
                Ty::I64 => out.extend((v as i64).to_le_bytes()),
            }
        }
        out
    }

    pub fn decode(self, bytes: &[u8]) -> Vec<f64> {
        match self {
            Ty::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Ty::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Ty::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Ty::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
        }
    }

    /// The raw bit pattern of each element, for ulp distances.
    pub fn bits(self, bytes: &[u8]) -> Vec<i64> {
        match self {
            Ty::BF16 | Ty::F16 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            Ty::F32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            Ty::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        }
    }

    /// The correctly rounded value of `x` in this type (nearest, ties to
    /// even), found by comparing the neighbours of a first guess in f64.
    pub fn round(self, x: f64) -> Vec<u8> {
        let (guess, width): (i64, u32) = match self {
            Ty::BF16 => (half::bf16::from_f64(x).to_bits() as i64, 16),
            Ty::F16 => (half::f16::from_f64(x).to_bits() as i64, 16),
            Ty::F32 => ((x as f32).to_bits() as i64, 32),
            Ty::I64 => return Ty::I64.encode(&[x]),
        };
        let value = |bits: i64| -> f64 {
            match self {
                Ty::BF16 => half::bf16::from_bits(bits as u16).to_f64(),
                Ty::F16 => half::f16::from_bits(bits as u16).to_f64(),
                _ => f32::from_bits(bits as u32) as f64,
            }
        };
        let mask = (1i64 << width) - 1;
        let mut best = guess;
        for cand in [guess - 1, guess, guess + 1] {
            let cand = cand & mask;
            let (dc, db) = ((value(cand) - x).abs(), (value(best) - x).abs());
            if dc < db || (dc == db && cand & 1 == 0 && best & 1 == 1) {
                best = cand;
            }
        }
        match self {
            Ty::F32 => (best as u32).to_le_bytes().to_vec(),
            _ => (best as u16).to_le_bytes().to_vec(),
        }
    }

    pub fn size(self) -> usize {
        match self {
            Ty::BF16 | Ty::F16 => 2,
            Ty::F32 => 4,
            Ty::I64 => 8,
        }
    }
}

/// A tensor as the tests describe it.
#[derive(Debug, Clone)]
pub struct T {
    pub name: String,
    pub ty: Ty,
    pub shape: Vec<usize>,
    /// The stored values (exactly as decoded from the stored bytes).
    pub values: Vec<f64>,
}

impl T {
    pub fn new(name: &str, ty: Ty, shape: &[usize], values: Vec<f64>) -> Self {
        let stored = ty.decode(&ty.encode(&values));
        T {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
            values: stored,
        }
    }
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn noise(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A base model: embedding, two layers of attention/mlp/norm, optional
/// lm_head, all of `ty`.
pub fn base_tensors(ty: Ty, tied: bool) -> Vec<T> {
    let (vocab, hidden, inter) = (37, 16, 24);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..2 {
        shapes.push((
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            vec![hidden, hidden],
        ));
        shapes.push((
            format!("model.layers.{l}.self_attn.o_proj.weight"),
            vec![hidden, hidden],
        ));
        shapes.push((
            format!("model.layers.{l}.mlp.up_proj.weight"),
            vec![inter, hidden],
        ));
        shapes.push((
            format!("model.layers.{l}.mlp.down_proj.weight"),
            vec![hidden, inter],
        ));
        shapes.push((
            format!("model.layers.{l}.input_layernorm.weight"),
            vec![hidden],
        ));
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let scale = if name.contains("norm") { 1.0 } else { 0.05 };
            T::new(&name, ty, &shape, noise(i as u64 + 1, n, scale))
        })
        .collect()
}

/// A fine-tune: the base plus `scale`-sized noise (0 gives an exact copy).
pub fn fine_tune(base: &[T], seed: u64, scale: f64, ty: Ty) -> Vec<T> {
    base.iter()
        .enumerate()
        .map(|(i, t)| {
            let d = noise(seed * 1000 + i as u64, t.values.len(), scale);
            let v = t.values.iter().zip(d).map(|(b, d)| b + d).collect();
            T::new(&t.name, ty, &t.shape, v)
        })
        .collect()
}

/// Writes one safetensors file holding each tensor under its given name,
/// with torch's `format: pt` metadata when `pt`.
pub fn write_safetensors(path: &Path, tensors: &[(String, &T)], pt: bool) {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.ty.encode(&t.values))
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, t), bytes)| {
            let view = TensorView::new(t.ty.dtype(), t.shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    let meta = pt.then(|| [("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// Tensor names of a model folder in storage order: shard files in name
/// order, tensors by data offset.
pub fn storage_order(dir: &Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut order = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<(usize, String)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (v.data().as_ptr() as usize, n))
            .collect();
        t.sort();
        order.extend(t.into_iter().map(|(_, n)| n));
    }
    order
}

/// Rewrites `dir/model.safetensors` (written by [`write_model`]) with the
/// tensors of `tensors` except those named in `raw`, which are stored with
/// their own dtype and bytes (FP8 here, which the test helpers cannot
/// encode).
pub fn write_with_raw(
    dir: &Path,
    tensors: &[T],
    raw: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) {
    write_model(dir, tensors, 1, false);
    let encoded: Vec<(String, Vec<u8>, &T)> = tensors
        .iter()
        .filter(|t| !raw.iter().any(|r| r.0 == t.name))
        .map(|t| (t.name.clone(), t.ty.encode(&t.values), t))
        .collect();
    let mut views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, b, t)| {
            (
                n.clone(),
                TensorView::new(t.ty.dtype(), t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    for (name, dtype, shape, bytes) in raw {
        views.push((
            name.to_string(),
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        ));
    }
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Writes `tensors` as a Hugging Face folder with `shards` files (1 gives
/// model.safetensors) plus a config.
pub fn write_model(dir: &Path, tensors: &[T], shards: usize, tied: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        let named: Vec<(String, &T)> = chunk.iter().map(|t| (t.name.clone(), t)).collect();
        write_safetensors(&dir.join(&file), &named, true);
        for t in chunk {
            weight_map.insert(t.name.clone(), file.clone());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "vocab_size": 37
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// Adds generation and tokenizer files to a model folder.
pub fn write_side_files(dir: &Path) {
    std::fs::write(
        dir.join("generation_config.json"),
        "{\"eos_token_id\": 2}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": {}}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"model_max_length\": 64}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("special_tokens_map.json"),
        "{\"eos_token\": \"</s>\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.model"), [0u8, 1, 2, 3, 255]).unwrap();
    std::fs::write(dir.join("trainer_state.json"), "{}").unwrap();
}

/// One stored tensor as read back: type, shape and raw bytes.
#[derive(Debug, Clone)]
pub struct Stored {
    pub ty: Ty,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Reads every tensor of a model folder (single file or index + shards)
/// with the `safetensors` crate.
pub fn read_model(dir: &Path) -> BTreeMap<String, Stored> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        let mut f: Vec<String> = v["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.insert(
                name,
                Stored {
                    ty: Ty::from_dtype(view.dtype()),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            );
        }
    }
    out
}

/// Runs a binary of this package.
pub fn run(bin: &str, args: &[&str]) -> Output {
    run_env(bin, args, &[])
}

/// The path of one of this package's binaries.
pub fn bin_path(bin: &str) -> &'static str {
    match bin {
        "ta-merge" => env!("CARGO_BIN_EXE_ta-merge"),
        "ta-analyze" => env!("CARGO_BIN_EXE_ta-analyze"),
        other => panic!("unknown binary {other}"),
    }
}

pub fn run_env(bin: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin_path(bin));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure with exactly one non-empty stderr line containing
/// every one of `needles`.
pub fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} lacks {n:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// Every file under `dir` with its bytes, to prove inputs unchanged.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Names of the entries of `dir`.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes `tensors` as a PyTorch zip checkpoint (what `torch.save` of a
/// state dict produces), with the pickle opcodes written by hand. Each name
/// in `aliases` is stored as a second name for the storage of the tensor
/// it maps to, as tied weights are.
pub fn write_pth(path: &Path, tensors: &[T], aliases: &[(&str, &str)]) {
    use std::io::Write;
    fn text(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    let storage_class = |ty: Ty| match ty {
        Ty::BF16 => "BFloat16Storage",
        Ty::F16 => "HalfStorage",
        Ty::F32 => "FloatStorage",
        Ty::I64 => "LongStorage",
    };
    let entry = |p: &mut Vec<u8>, name: &str, key: usize, t: &T| {
        text(p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // storage: persistent id ('storage', class, key, 'cpu', numel)
        p.push(b'(');
        text(p, "storage");
        p.extend(format!("ctorch\n{}\n", storage_class(t.ty)).as_bytes());
        text(p, &key.to_string());
        text(p, "cpu");
        int(p, t.values.len());
        p.extend(b"tQ");
        int(p, 0); // storage offset
        p.push(b'(');
        for &d in &t.shape {
            int(p, d);
        }
        p.push(b't');
        p.push(b'(');
        let mut stride = 1;
        let mut strides = vec![0; t.shape.len()];
        for (i, &d) in t.shape.iter().enumerate().rev() {
            strides[i] = stride;
            stride *= d;
        }
        for s in strides {
            int(p, s);
        }
        p.push(b't');
        p.push(0x89); // requires_grad = False
        p.extend(b"ccollections\nOrderedDict\n)R"); // backward hooks
        p.extend(b"tR");
    };
    let mut pkl = vec![0x80, 2, b'}', b'('];
    for (key, t) in tensors.iter().enumerate() {
        entry(&mut pkl, &t.name, key, t);
    }
    for (alias, target) in aliases {
        let key = tensors
            .iter()
            .position(|t| t.name == *target)
            .expect("alias target");
        entry(&mut pkl, alias, key, &tensors[key]);
    }
    pkl.extend(b"u.");

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options: zip::write::SimpleFileOptions =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(&pkl).unwrap();
    for (key, t) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), options)
            .unwrap();
        zip.write_all(&t.ty.encode(&t.values)).unwrap();
    }
    zip.finish().unwrap();
}

/// Runs one of this package's binaries with `env`, killing it and failing
/// the test if it runs longer than `secs` (a read that hangs, say on a
/// FIFO, must not hang the test suite).
pub fn run_bounded(bin: &str, args: &[&str], env: &[(&str, &Path)], secs: u64) -> Output {
    let mut cmd = Command::new(bin_path(bin));
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{bin} {args:?} still ran after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Makes a FIFO at `path` (with coreutils' mkfifo).
pub fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Asserts `text` holds no control character but line breaks.
pub fn assert_no_controls(text: &str) {
    let bad: Vec<char> = text
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(bad.is_empty(), "control characters {bad:?} in {text:?}");
}

/// Names of the entries of `dir` and of every folder below it, relative
/// to `dir` (symlinks listed, not followed).
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r.to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Like [`snapshot`], without following symlinks or opening anything but
/// regular files: a symlink is recorded by its target, a FIFO or device
/// by its kind, so inputs can be compared byte for byte even where
/// reading them would hang.
pub fn snapshot_nofollow(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let t = meta.file_type();
            let record = if t.is_symlink() {
                let mut v = b"link:".to_vec();
                v.extend(std::fs::read_link(&p).unwrap().to_string_lossy().bytes());
                v
            } else if t.is_dir() {
                stack.push(p.clone());
                b"dir".to_vec()
            } else if t.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                b"special".to_vec()
            };
            out.insert(p, record);
        }
    }
    out
}

/// A family folder: `base/` and `good/` (a bf16 fine-tune of it), with the
/// base's side files when asked; test files add their own helpers in
/// `impl Setup` blocks.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub base: Vec<T>,
}

impl Setup {
    pub fn with_side_files(side_files: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = base_tensors(Ty::BF16, false);
        write_model(&dir.path().join("base"), &base, 1, false);
        if side_files {
            write_side_files(&dir.path().join("base"));
        }
        write_model(
            &dir.path().join("good"),
            &fine_tune(&base, 5, 0.01, Ty::BF16),
            1,
            false,
        );
        Setup { dir, base }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}
