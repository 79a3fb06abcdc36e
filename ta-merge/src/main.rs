//! `ta-merge`: the Task Arithmetic merge as a command. Parses flags, calls
//! `tv-core`, prints the weight table and the plan; all logic is in the
//! library.

mod args;

use anyhow::{bail, Context, Result};
use args::Args;
use std::process::ExitCode;
use std::time::Instant;
use tv_core::config::{MergeConfig, ModelSpec, ParamKey, Params};
use tv_core::device::{Device, DeviceRequest};
use tv_core::dtype::FloatType;
use tv_core::family::Family;
use tv_core::merge::{human_bytes, parse_size, MergeOptions, MergePlan};
use tv_core::methods::{DensityScope, MethodKind};
use tv_core::params::{FilterEntry, ParamValue};
use tv_core::recipe;
use tv_core::report;
use tv_core::sidecar::{self, MergeRecord, RecordModel, RecordSettings};
use tv_core::staging::{check_output_apart, Staging};
use tv_core::vocab::{self, VocabMode};
use tv_core::weights::{self, Granularity, Mode, WeightParams};

fn main() -> ExitCode {
    tv_cli::main::<Args>(run)
}

fn run(args: Args) -> Result<()> {
    tv_core::interrupt::install().context("cannot install signal handlers")?;
    if let Some(dir) = &args.verify {
        return verify(dir, args.quiet);
    }
    let started = Instant::now();
    let Some(output) = args.output.as_deref() else {
        unreachable!("clap requires it without --verify");
    };

    // Validate the flags before touching any file.
    let out_type = match &args.dtype {
        Some(d) => Some(
            FloatType::parse(d)
                .with_context(|| format!("--dtype '{d}' is not one of bf16, f16, f32, f64"))?,
        ),
        None => None,
    };
    let device_request = DeviceRequest::parse(&args.device)?;
    let max_shard_size = parse_size(&args.max_shard_size)?;
    let params = WeightParams {
        mode: Mode::parse(&args.mode).expect("clap checked the mode"),
        alpha: args.alpha,
        beta: args.beta,
    };
    let mut config = base_config(&args)?;
    let kind = config.method();
    refuse_unused_flags(&args, kind)?;
    let weights_given =
        args.l2_norms.is_some() || args.lambdas.is_some() || args.from_analysis.is_some();
    if kind.uses_weights() && !weights_given && args.config.is_none() {
        bail!(
            "give the models' task-vector norms with --l2_norms (one per model) or --from-analysis DIR, \
             or weights with --lambdas"
        );
    }
    let (device, chosen) = Device::resolve(device_request)?;
    tv_cli::notes(chosen.as_slice());

    let base = config
        .base_model()
        .unwrap_or(&config.models()[0].model)
        .to_string();
    let specs: Vec<String> = config.models().iter().map(|m| m.model.clone()).collect();
    let model_args: Vec<String> = std::iter::once(base.clone())
        .chain(specs.iter().cloned())
        .collect();
    tv_cli::fetch_models(&model_args, args.no_download, args.quiet)?;
    let family = Family::open(&base, &specs, args.names.as_deref())?;
    let norms = match (&args.l2_norms, &args.from_analysis) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(dir)) => {
            let named: Vec<(String, String)> = family
                .names
                .iter()
                .cloned()
                .zip(specs.iter().cloned())
                .collect();
            for difference in report::analysis_differences(dir, &base, &named) {
                eprintln!(
                    "note: --from-analysis {}: {difference}; its norms may describe other models",
                    dir.display()
                );
            }
            Some(report::norms_from_analysis(dir, &family.names)?)
        }
        (None, None) => None,
    };
    let lambdas = match (&norms, &args.lambdas) {
        (Some(norms), _) => Some(
            weights::lambdas_from_norms(&family.names, norms, params).with_context(|| {
                match (&args.l2_norms, &args.from_analysis) {
                    (None, Some(dir)) => format!("--from-analysis {}", dir.display()),
                    _ => "--l2_norms".to_string(),
                }
            })?,
        ),
        (None, Some(l)) => {
            weights::check_explicit(&family.names, l)?;
            Some(l.clone())
        }
        (None, None) => None,
    };
    apply_flags(&args, &mut config, lambdas.as_deref(), out_type)?;
    let dropped = config.drop_unused();
    let granularity = Granularity::parse(&args.granularity).expect("clap checked --granularity");
    if let (Some(dir), Granularity::Group | Granularity::Tensor) =
        (&args.from_analysis, granularity)
    {
        weights_per_tensor(&mut config, &family, dir, granularity, params)?;
    }
    // A weight that varies by tensor (--granularity group|tensor) is shown
    // as such, not as the model-level weight no tensor is merged with.
    let mut recipe = recipe::from_config(&config, family.base.names().iter().map(String::as_str))?;
    // Said once the settings are checked, so that a refused run prints only
    // its error.
    for note in config.notes() {
        eprintln!("note: {note}");
    }
    for place in &dropped {
        eprintln!("note: config key `{place}` has no effect with {kind}; left out");
    }
    if let Some(note) = default_density_note(&config) {
        eprintln!("note: {note}");
    }
    if let (Some(dir), DensityScope::Model) = (&args.from_analysis, recipe.settings.density_scope) {
        // The analysis' magnitude counts place each model's threshold
        // without a sample (README: "The histogram for whole-model trimming").
        recipe.magnitude_counts = report::magnitude_counts_from_analysis(dir, &family.names)?;
        let counted = recipe.magnitude_counts.iter().flatten().count();
        if counted > 0 {
            tv_cli::say(format!(
                "whole-model thresholds placed by the analysis' magnitude counts for {counted} of {} \
                 models (where they count the entries merged)\n",
                family.names.len()
            ));
        }
    }
    let options = MergeOptions {
        out_type: config.out_dtype(),
        max_shard_size,
        skip_mismatched: args.skip_mismatched,
        allow_nonfinite: args.allow_nonfinite,
        untie_embeddings: args.untie_embeddings,
        vocab: args
            .vocab
            .as_deref()
            .map(|v| VocabMode::parse(v).expect("clap checked --vocab")),
    };
    let plan = MergePlan::with_recipe(&family, recipe, options)?;

    let shown = tv_cli::names(&family.names);
    if kind.uses_weights() {
        tv_cli::say(weights::format_table(
            &shown,
            norms.as_deref(),
            plan.lambdas(),
        ));
    }
    tv_cli::say(plan.describe(&shown));
    tv_cli::say(family.adapter_notes(&shown));

    let mut inputs = family.input_paths();
    if let Some(dir) = &args.from_analysis {
        inputs.push(("--from-analysis".into(), dir.clone()));
        for name in &family.names {
            inputs.push((
                "--from-analysis".into(),
                dir.join(name).join("summary.json"),
            ));
        }
    }
    check_output_apart(output, &inputs)?;
    if args.dry_run {
        Staging::check_target(output, args.force)?;
        tv_cli::sayln!(
            "dry run: checked inputs and plan on {}; nothing written",
            device.describe()
        );
        return Ok(());
    }

    let staging = Staging::new(output, args.force)?;
    tv_cli::notes(staging.notes());
    let bar = tv_cli::Bar::new("merging", args.quiet);
    plan.execute(&family, &device, staging.path(), &bar)?;
    sidecar::write_config(
        family.base.folder(),
        staging.path(),
        plan.main_type,
        plan.untied_embeddings,
    )?;
    sidecar::copy_side_files(family.base.folder(), staging.path())?;
    if let Some(a) = plan.alignment.as_deref() {
        if a.mode == VocabMode::Union {
            vocab::write_union_files(family.base.folder(), staging.path(), a)?;
        }
    }
    recipe::pin_settings(&mut config, &plan.recipe.settings)?;
    record(&args, &family, &plan, &config, norms.as_deref()).write(staging.path())?;
    let config_path = staging.path().join("mergekit_config.yml");
    std::fs::write(&config_path, config.to_yaml())
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    staging.commit()?;

    tv_cli::sayln!(
        "wrote {} ({} in {} shard(s)) in {:.1} s",
        output.display(),
        human_bytes(plan.layout.total_bytes()),
        plan.layout.shards.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sets each model's weight per tensor from the analysis' group or tensor
/// norms, as a list of `{filter: tensor name, value: weight}` entries
/// (longest names first, so a name that another contains cannot match it).
fn weights_per_tensor(
    config: &mut MergeConfig,
    family: &Family,
    dir: &std::path::Path,
    granularity: Granularity,
    params: WeightParams,
) -> Result<()> {
    let mut tensors: Vec<String> = family
        .base
        .names()
        .iter()
        .filter(|n| family.base.get(n).is_some_and(|t| t.float_type().is_some()))
        .cloned()
        .collect();
    tensors.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    let norms = report::tensor_norms_from_analysis(dir, &family.names, &tensors, granularity)?;
    let what: Vec<String> = tensors
        .iter()
        .map(|t| match granularity {
            Granularity::Group => format!("group '{}' (tensor '{t}')", tv_core::stats::group_of(t)),
            _ => format!("tensor '{t}'"),
        })
        .collect();
    let per_tensor = weights::lambdas_per_tensor(&family.names, &norms, &what, params)
        .with_context(|| format!("--from-analysis {}", dir.display()))?;
    for i in 0..family.models.len() {
        let entries = tensors
            .iter()
            .zip(&per_tensor)
            .map(|(t, w)| FilterEntry {
                filter: Some(t.clone()),
                value: ParamValue::Number(w[i]),
            })
            .collect();
        config.set_model_param(i, ParamKey::Weight, ParamValue::Filtered(entries))?;
    }
    Ok(())
}

/// The config the flags start from: `--config FILE` (with `--base-model-path`
/// and `--other-model-paths` replacing its paths), or one made of the flags.
fn base_config(args: &Args) -> Result<MergeConfig> {
    let method = match &args.method {
        Some(name) => Some(MethodKind::parse(name).with_context(|| {
            let names: Vec<&str> = MethodKind::ALL.iter().map(|m| m.name()).collect();
            format!("--method '{name}' is not one of {}", names.join(", "))
        })?),
        None => None,
    };
    let models = (!args.models.is_empty()).then(|| args.models.clone());
    let mut config = match &args.config {
        Some(path) => {
            let mut config = MergeConfig::from_file(path)?;
            config.set_paths(args.base.clone(), models)?;
            if let Some(kind) = method {
                config = config.with_method(kind)?;
            }
            config
        }
        None => MergeConfig::new(
            method.unwrap_or(MethodKind::TaskArithmetic),
            args.base.clone(),
            args.models
                .iter()
                .map(|m| ModelSpec {
                    model: m.clone(),
                    parameters: Params::default(),
                })
                .collect(),
            Params::default(),
        )?,
    };
    if config.method() == MethodKind::Slerp {
        config = config.without_base_in_models();
    }
    Ok(config)
}

/// Refuses a method parameter flag that the method would ignore (a slip, or
/// a flag meant for another method), naming the methods it applies to;
/// notes weights given to a method that uses none.
fn refuse_unused_flags(args: &Args, kind: MethodKind) -> Result<()> {
    let given = [
        ("--density", ParamKey::Density, args.density.is_some()),
        ("--gamma", ParamKey::Gamma, args.gamma.is_some()),
        ("--epsilon", ParamKey::Epsilon, args.epsilon.is_some()),
        ("--scale", ParamKey::Lambda, args.scale.is_some()),
        ("--t", ParamKey::T, args.t.is_some()),
        ("--normalize", ParamKey::Normalize, args.normalize),
        ("--no-normalize", ParamKey::Normalize, args.no_normalize),
        ("--rescale", ParamKey::Rescale, args.rescale.is_some()),
        ("--seed", ParamKey::Seed, args.seed.is_some()),
        (
            "--density-scope",
            ParamKey::DensityScope,
            args.density_scope.is_some(),
        ),
        ("--filter-wise", ParamKey::FilterWise, args.filter_wise),
    ];
    for (flag, key, present) in given {
        if present && !key.applies_to(kind) {
            bail!(
                "{flag} has no effect with --method {kind}; it applies to {}",
                key.methods()
            );
        }
    }
    // Scripts pass the models' norms whatever the method (merge_commands.sh
    // does): for a method that weighs no models they are only noted.
    let weights = [
        ("--lambdas", args.lambdas.is_some()),
        ("--l2-norms", args.l2_norms.is_some()),
        ("--from-analysis", args.from_analysis.is_some()),
    ];
    for (flag, present) in weights {
        if present && !kind.uses_weights() {
            eprintln!("note: {flag} has no effect with --method {kind}: it weighs no models");
        }
    }
    Ok(())
}

/// A note when a method that thins task vectors got no density anywhere:
/// mergekit's default of 1 keeps every entry, which is rarely what was meant.
fn default_density_note(config: &MergeConfig) -> Option<String> {
    let kind = config.method();
    let given = config.global_param(ParamKey::Density).is_some()
        || (0..config.models().len()).any(|i| config.model_param(i, ParamKey::Density).is_some());
    (kind.sparsification().is_some() && !given).then(|| {
        format!("no density given: {kind} keeps every entry (density 1, mergekit's default); set --density")
    })
}

/// Writes the flags over the config: weights per model, densities and the
/// like (one value for all models, or one per model), the method's settings.
fn apply_flags(
    args: &Args,
    config: &mut MergeConfig,
    weights: Option<&[f64]>,
    out_type: Option<FloatType>,
) -> Result<()> {
    let k = config.models().len();
    if let Some(w) = weights {
        for (i, &w) in w.iter().enumerate() {
            config.set_model_param(i, ParamKey::Weight, ParamValue::Number(w))?;
        }
    }
    for (flag, key, given) in [
        ("--density", ParamKey::Density, &args.density),
        ("--gamma", ParamKey::Gamma, &args.gamma),
        ("--epsilon", ParamKey::Epsilon, &args.epsilon),
    ] {
        match given.as_deref() {
            None => {}
            Some(vs) if vs.len() == 1 || vs.len() == k => {
                for i in 0..k {
                    let v = vs[if vs.len() == 1 { 0 } else { i }];
                    config
                        .set_model_param(i, key, ParamValue::Number(v))
                        .with_context(|| format!("{flag} {v}"))?;
                }
            }
            Some(vs) => bail!(
                "{flag}: got {} values for {k} models; give one, or one per model",
                vs.len()
            ),
        }
    }
    let mut set = |key: ParamKey, value: Option<ParamValue>| match value {
        Some(v) => config.set_param(key, v),
        None => Ok(()),
    };
    set(ParamKey::Lambda, args.scale.map(ParamValue::Number)).context("--scale")?;
    set(ParamKey::T, args.t.map(ParamValue::Number)).context("--t")?;
    let normalize = match (args.normalize, args.no_normalize) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    set(ParamKey::Normalize, normalize.map(ParamValue::Bool))?;
    set(
        ParamKey::Rescale,
        args.rescale.clone().map(ParamValue::Text),
    )?;
    set(
        ParamKey::Seed,
        args.seed.map(|s| ParamValue::Number(s as f64)),
    )?;
    set(
        ParamKey::DensityScope,
        args.density_scope.clone().map(ParamValue::Text),
    )?;
    set(
        ParamKey::FilterWise,
        args.filter_wise.then_some(ParamValue::Bool(true)),
    )?;
    if out_type.is_some() {
        *config = config.clone().with_out_dtype(out_type);
    }
    Ok(())
}

fn record(
    args: &Args,
    family: &Family,
    plan: &MergePlan,
    config: &MergeConfig,
    norms: Option<&[f64]>,
) -> MergeRecord {
    let settings = &plan.recipe.settings;
    let weighs = settings.kind.uses_weights();
    let models = family
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| RecordModel {
            name: family.names[i].clone(),
            path: m.checkpoint().located.spec.clone(),
            l2_norm: norms.map(|n| n[i]),
            lambda: plan.lambdas()[i].filter(|_| weighs),
            missing_tensors: plan.missing[i].clone(),
            extra_tensors: plan.extra[i].clone(),
            vocab: plan.alignment.as_ref().map(|a| a.counts[i]),
            adapter: m.adapter().map(|a| a.summary()),
        })
        .collect();
    let weights_from = match (&args.l2_norms, &args.from_analysis) {
        (Some(_), _) => "l2_norms".to_string(),
        (None, Some(dir)) => format!("analysis {}", dir.display()),
        (None, None) => "lambdas".to_string(),
    };
    let from_norms = norms.is_some();
    MergeRecord {
        tool: "ta-merge",
        version: tv_core::VERSION,
        method: plan.recipe.settings.kind.name(),
        formula: plan.recipe.settings.kind.formula(),
        settings: RecordSettings::new(config, settings),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        base: family.base.located.spec.clone(),
        models,
        weights_from,
        mode: from_norms.then(|| args.mode.clone()),
        alpha: args.alpha,
        beta: args.beta,
        dtype: plan.main_type.map(|t| t.torch_name().to_string()),
        tensors_merged: plan.merged_count(),
        tensors_copied: plan.tensors.len() - plan.merged_count(),
        shards: plan.layout.shards.len(),
        total_size: plan.layout.total_bytes(),
        tied_embeddings: plan.tied_embeddings,
        untied_embeddings: plan.untied_embeddings,
        vocab: plan.alignment.as_ref().map(|a| a.mode.name()),
        vocab_size: plan.alignment.as_ref().map(|a| a.rows()),
    }
}

/// `--verify DIR`: re-reads a finished merged folder and reports.
fn verify(dir: &std::path::Path, quiet: bool) -> Result<()> {
    let bar = tv_cli::Bar::new("verifying", quiet);
    let report = tv_core::verify::verify(dir, &bar)?;
    tv_cli::sayln!(
        "ok: {} holds {} tensors ({} elements, {}) in {} shard(s); headers, offsets, index and values check out",
        dir.display(),
        report.tensors,
        report.elements,
        human_bytes(report.total_size),
        report.shards
    );
    Ok(())
}
