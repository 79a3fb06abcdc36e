//! `ta-merge`'s command line. Flags keep the original tool's underscore
//! spellings as aliases of the kebab-case names, so its commands run
//! unchanged.

use clap::Parser;
use std::path::PathBuf;

/// Merge fine-tunes onto their base: by Task Arithmetic,
/// merged = base + Σ λ_i (model_i − base), with λ from each task vector's
/// global L2 norm (or given directly), or by another of mergekit's methods
/// (--method, --config).
#[derive(Debug, Parser)]
#[command(name = "ta-merge", version, long_about = None)]
pub struct Args {
    /// The base checkpoint: a folder, a .safetensors file, an index json, or a Hugging Face id
    /// (org/name or org/name@revision; downloaded into the cache when missing).
    #[arg(
        long = "base-model-path",
        visible_alias = "base_model_path",
        value_name = "PATH",
        required_unless_present_any = ["verify", "config"]
    )]
    pub base: Option<String>,

    /// The fine-tuned checkpoints, same forms as the base, or PEFT LoRA adapter folders.
    #[arg(long = "other-model-paths", visible_alias = "other_model_paths", value_name = "PATH", num_args = 1.., required_unless_present_any = ["verify", "config"])]
    pub models: Vec<String>,

    /// Merge method (mergekit's names): task_arithmetic, linear, ties, dare_linear, dare_ties,
    /// magnitude_prune, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, slerp, magmax.
    /// Default: task_arithmetic, or the config's merge_method.
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,

    /// A mergekit YAML config (merge_method, base_model, models, parameters, out_dtype);
    /// flags given beside it override it.
    #[arg(long, value_name = "FILE", conflicts_with = "verify")]
    pub config: Option<PathBuf>,

    /// Fraction of each task vector kept (ties, dare, breadcrumbs, della, magnitude_prune):
    /// one value in [0, 1], or one per model. Default: 1 (keep all, as mergekit).
    #[arg(long, value_name = "ρ", num_args = 1.., allow_negative_numbers = true)]
    pub density: Option<Vec<f64>>,

    /// Breadcrumbs: fraction of the largest entries dropped as outliers (one, or one per model).
    /// Default: 0.01.
    #[arg(long, value_name = "γ", num_args = 1.., allow_negative_numbers = true)]
    pub gamma: Option<Vec<f64>>,

    /// DELLA: keep probabilities range over density ± epsilon (one, or one per model).
    /// Default: 0.15.
    #[arg(long, value_name = "ε", num_args = 1.., allow_negative_numbers = true)]
    pub epsilon: Option<Vec<f64>>,

    /// Scale λ of the merged task vector: base + λ · delta. Default: 1.
    #[arg(long, value_name = "λ", allow_negative_numbers = true)]
    pub scale: Option<f64>,

    /// SLERP: interpolation factor from the base (0) to the model (1). Default: 0.5.
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub t: Option<f64>,

    /// Divide by the sum of the weights (default on for linear, ties and della).
    #[arg(long, overrides_with = "no_normalize")]
    pub normalize: bool,

    /// Do not divide by the sum of the weights.
    #[arg(long = "no-normalize")]
    pub no_normalize: bool,

    /// How entries kept by dare/della/trimming are rescaled: inverse (1/p), l1 (restore the
    /// tensor's L1 norm), none. Default: inverse for dare and della, none for the others.
    #[arg(long, value_parser = ["inverse", "l1", "none"])]
    pub rescale: Option<String>,

    /// Seed of DARE's and DELLA's random draws. Default: 42 (always recorded).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Whether densities select within each tensor or over each model's whole task vector
    /// (ties, magnitude_prune, breadcrumbs). Default: tensor.
    #[arg(long = "density-scope", value_parser = ["tensor", "model"])]
    pub density_scope: Option<String>,

    /// Model Stock: one interpolation factor per row instead of per tensor.
    #[arg(long = "filter-wise")]
    pub filter_wise: bool,

    /// Global L2 norm of each model's task vector, in model order.
    #[arg(long = "l2-norms", visible_alias = "l2_norms", value_name = "L2", num_args = 1.., allow_negative_numbers = true, conflicts_with = "lambdas")]
    pub l2_norms: Option<Vec<f64>>,

    /// Explicit merge weights, one per model. Task Arithmetic uses them as given; methods that
    /// normalise (linear, ties, della by default) divide by their sum.
    #[arg(long, value_name = "λ", num_args = 1.., allow_negative_numbers = true, conflicts_with = "from_analysis")]
    pub lambdas: Option<Vec<f64>>,

    /// Take each model's norm from a ta-analyze folder (DIR/<name>/summary.json's global_l2).
    #[arg(
        long = "from-analysis",
        visible_alias = "from_analysis",
        value_name = "DIR",
        conflicts_with = "l2_norms"
    )]
    pub from_analysis: Option<PathBuf>,

    /// With --from-analysis: weights once per model (its global norm), per layer group
    /// (`embed`, `layer_N`, `lm_head`, `other`: the group's norm) or per tensor (its norm).
    #[arg(long, default_value = "model", value_parser = ["model", "group", "tensor"], requires = "from_analysis")]
    pub granularity: String,

    /// The merged model's folder (written beside it and renamed into place when complete).
    #[arg(
        long = "output-path",
        visible_alias = "output_path",
        value_name = "DIR",
        required_unless_present = "verify"
    )]
    pub output: Option<PathBuf>,

    /// How norms become weights: linear (1/L), power (1/L^alpha), exp (exp(-beta L / mean L)).
    #[arg(long, default_value = "exp", value_parser = ["linear", "power", "exp"])]
    pub mode: String,

    /// Exponent of power mode.
    #[arg(long, default_value_t = 1.5, allow_negative_numbers = true)]
    pub alpha: f64,

    /// Temperature of exp mode.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub beta: f64,

    /// Float type of the output (bf16, f16, f32, f64); default: as the base stores each tensor.
    #[arg(long)]
    pub dtype: Option<String>,

    /// Largest output shard, like transformers' save_pretrained (5GB, 500MB, 2GiB).
    #[arg(
        long = "max-shard-size",
        visible_alias = "max_shard_size",
        default_value = "5GB"
    )]
    pub max_shard_size: String,

    /// Where the arithmetic runs: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Names for the models in tables and the record (default: path basenames).
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub names: Option<Vec<String>>,

    /// Leave a model out of the tensors it stores with another shape (a resized vocabulary).
    #[arg(long = "skip-mismatched")]
    pub skip_mismatched: bool,

    /// Match embedding and lm_head rows by token (needs tokenizer.json): base keeps the base's vocabulary, union appends the tokens the models add. Default: base, when a model's embedding has another number of rows.
    #[arg(long, value_parser = ["base", "union"])]
    pub vocab: Option<String>,

    /// Write merged values that are NaN or infinite instead of refusing.
    #[arg(long = "allow-nonfinite")]
    pub allow_nonfinite: bool,

    /// When the base ties its embeddings, write an untied output: an lm_head.weight merged from the base's embedding and each model's own lm_head.
    #[arg(long = "untie-embeddings")]
    pub untie_embeddings: bool,

    /// Only check a finished merged folder (headers, offsets, index, sizes, values) and exit.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["base", "models", "output", "dry_run"])]
    pub verify: Option<PathBuf>,

    /// Use models named by Hugging Face id only from the local cache; never download.
    #[arg(long = "no-download")]
    pub no_download: bool,

    /// Check the inputs and print the weights and the output plan; write nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,

    /// Replace an existing output folder (only once the new one is complete).
    #[arg(long)]
    pub force: bool,

    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}
