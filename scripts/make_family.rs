//! Generates a synthetic model family for the demo and the benchmark: a
//! Llama-shaped base checkpoint and fine-tunes of it (base plus seeded noise
//! of a per-model scale, one fine-tune identical to the base), each a
//! Hugging Face folder with config, generation config and tokenizer files;
//! and a PEFT LoRA adapter of the base (`chat-lora/`: rank `--adapter-rank`
//! on every attention and MLP matrix).
//!
//!     cargo run --release --example make-family -- OUT [--size tiny|bench] [--models 5] [--adapter-rank 16]

use clap::Parser;
use std::path::{Path, PathBuf};
use tv_core::dtype::{encode_f64, FloatType};
use tv_core::writer::{Layout, OutTensor, ShardWriter};

#[derive(Parser)]
struct Args {
    /// Folder to create the family in (base/ and one folder per fine-tune).
    out: PathBuf,
    /// tiny: about 1M parameters, one shard; bench: about 160M, two shards.
    #[arg(long, default_value = "tiny")]
    size: String,
    /// Number of fine-tunes (the third one equals the base).
    #[arg(long, default_value_t = 5)]
    models: usize,
    /// Element type: bf16, f16, f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Rank of the LoRA adapter `chat-lora/` (0: no adapter).
    #[arg(long, default_value_t = 16)]
    adapter_rank: usize,
}

struct Shape {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    shards: u64,
}

const NAMES: [&str; 6] = [
    "math-tune",
    "korean-tune",
    "instruct-copy",
    "dpo-tune",
    "home-tune",
    "code-tune",
];
/// Task-vector scale of each fine-tune, relative to the base's spread.
const SCALES: [f64; 6] = [0.5, 0.1, 0.0, 0.002, 0.03, 0.2];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = match args.size.as_str() {
        "tiny" => Shape {
            vocab: 1000,
            hidden: 64,
            intermediate: 172,
            layers: 4,
            shards: 1,
        },
        "bench" => Shape {
            vocab: 50_000,
            hidden: 768,
            intermediate: 2048,
            layers: 12,
            shards: 2,
        },
        other => anyhow::bail!("--size '{other}' is not tiny or bench"),
    };
    let ty = FloatType::parse(&args.dtype).ok_or_else(|| anyhow::anyhow!("bad --dtype"))?;
    let tensors = tensor_list(&shape);
    let total: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let per_shard = total * ty.size() as u64 / shape.shards + 1;
    println!("{} parameters per model, {} per file", total, ty);

    let mut folders = vec![("base".to_string(), 0.0)];
    for i in 0..args.models.min(NAMES.len()) {
        folders.push((NAMES[i].to_string(), SCALES[i]));
    }
    for (name, scale) in &folders {
        let dir = args.out.join(name);
        std::fs::create_dir_all(&dir)?;
        write_model(&dir, &tensors, ty, per_shard, *scale, name)?;
        write_side_files(&dir, &shape, ty)?;
        println!("wrote {}", dir.display());
    }
    if args.adapter_rank > 0 {
        let dir = args.out.join("chat-lora");
        write_adapter(&dir, &tensors, ty, args.adapter_rank)?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}

/// The modules a LoRA adapter targets: every attention and MLP matrix.
const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Writes a PEFT LoRA adapter folder: rank `r`, alpha 2r (scale 2), on
/// every attention and MLP matrix, with PEFT's tensor names.
fn write_adapter(
    dir: &Path,
    tensors: &[(String, Vec<usize>)],
    ty: FloatType,
    r: usize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut factors: Vec<(String, Vec<usize>)> = Vec::new();
    for (name, shape) in tensors {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !TARGETS.iter().any(|t| module.ends_with(t)) {
            continue;
        }
        let prefix = format!("base_model.model.{module}");
        factors.push((format!("{prefix}.lora_A.weight"), vec![r, shape[1]]));
        factors.push((format!("{prefix}.lora_B.weight"), vec![shape[0], r]));
    }
    let layout = Layout::plan(out_tensors(&factors, ty), u64::MAX);
    let mut w = ShardWriter::create(dir, &layout, 0)?;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (i, (_, shape)) in factors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut rng = Rng(0xA11CE ^ (i as u64 * 104_729));
        values.clear();
        values.extend((0..n).map(|_| 0.02 * rng.normal()));
        bytes.resize(n * ty.size(), 0);
        encode_f64(ty, &values, &mut bytes);
        w.write(&bytes)?;
    }
    w.finish()?;
    std::fs::rename(
        dir.join("model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "base",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "fan_in_fan_out": false,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    Ok(())
}

fn tensor_list(s: &Shape) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![s.vocab, s.hidden],
    )];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((
                format!("{p}.self_attn.{proj}.weight"),
                vec![s.hidden, s.hidden],
            ));
        }
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![s.intermediate, s.hidden],
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![s.intermediate, s.hidden],
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![s.hidden, s.intermediate],
        ));
        t.push((format!("{p}.input_layernorm.weight"), vec![s.hidden]));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![s.hidden],
        ));
    }
    t.push(("model.norm.weight".to_string(), vec![s.hidden]));
    t.push(("lm_head.weight".to_string(), vec![s.vocab, s.hidden]));
    t
}

/// A small, fast, seeded generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Roughly normal: the sum of four uniforms, centred and scaled.
    fn normal(&mut self) -> f64 {
        let r = self.next();
        let u = |k: u32| ((r >> (16 * k)) & 0xFFFF) as f64 / 65536.0;
        (u(0) + u(1) + u(2) + u(3) - 2.0) * 1.732
    }
}

/// The output tensors (name, shape) all of type `ty`.
fn out_tensors(tensors: &[(String, Vec<usize>)], ty: FloatType) -> Vec<OutTensor> {
    tensors
        .iter()
        .map(|(n, s)| OutTensor {
            name: n.clone(),
            dtype: ty.dtype(),
            shape: s.clone(),
        })
        .collect()
}

fn write_model(
    dir: &Path,
    tensors: &[(String, Vec<usize>)],
    ty: FloatType,
    per_shard: u64,
    scale: f64,
    name: &str,
) -> anyhow::Result<()> {
    let layout = Layout::plan(out_tensors(tensors, ty), per_shard);
    let seed = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (k, shard) in layout.shards.iter().enumerate() {
        let mut w = ShardWriter::create(dir, &layout, k)?;
        for (ti, (tname, shape)) in tensors
            .iter()
            .enumerate()
            .take(shard.tensors.end)
            .skip(shard.tensors.start)
        {
            let n: usize = shape.iter().product();
            let norm = tname.contains("norm");
            // The base's values depend only on the tensor; the delta on the model too.
            let mut base_rng = Rng(ti as u64 * 1_000_003 + 17);
            let mut delta_rng = Rng(seed ^ (ti as u64 * 7919));
            values.clear();
            values.extend((0..n).map(|_| {
                let b = if norm {
                    1.0 + 0.05 * base_rng.normal()
                } else {
                    0.02 * base_rng.normal()
                };
                let d = if scale == 0.0 {
                    0.0
                } else {
                    scale * 0.02 * delta_rng.normal()
                };
                b + d
            }));
            bytes.resize(n * ty.size(), 0);
            encode_f64(ty, &values, &mut bytes);
            w.write(&bytes)?;
        }
        w.finish()?;
    }
    if let Some(index) = layout.index_json() {
        std::fs::write(dir.join("model.safetensors.index.json"), index)?;
    }
    Ok(())
}

fn write_side_files(dir: &Path, s: &Shape, ty: FloatType) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": s.vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": ty.torch_name(),
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    std::fs::write(
        dir.join("generation_config.json"),
        "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n  \"do_sample\": false\n}\n",
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\n  \"model_max_length\": 2048,\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\"\n}\n",
    )?;
    std::fs::write(
        dir.join("special_tokens_map.json"),
        "{\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\"\n}\n",
    )?;
    Ok(())
}
