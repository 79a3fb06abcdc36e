//! `ta-merge`: the Task Arithmetic merge as a command. Parses flags, calls
//! `tv-core`, prints the weight table and the plan; all logic is in the
//! library.

mod args;

use anyhow::{bail, Context, Result};
use args::Args;
use std::process::ExitCode;
use std::time::Instant;
use tv_core::device::{Device, DeviceRequest};
use tv_core::dtype::FloatType;
use tv_core::family::Family;
use tv_core::merge::{human_bytes, parse_size, MergeOptions, MergePlan};
use tv_core::report;
use tv_core::sidecar::{self, MergeRecord, RecordModel};
use tv_core::staging::{check_output_apart, Staging};
use tv_core::weights::{self, Mode, WeightParams};

fn main() -> ExitCode {
    tv_cli::main::<Args>(run)
}

fn run(args: Args) -> Result<()> {
    tv_core::interrupt::install().context("cannot install signal handlers")?;
    if let Some(dir) = &args.verify {
        return verify(dir, args.quiet);
    }
    let started = Instant::now();
    let (Some(base), Some(output)) = (args.base.as_deref(), args.output.as_deref()) else {
        unreachable!("clap requires them without --verify");
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
    if args.l2_norms.is_none() && args.lambdas.is_none() && args.from_analysis.is_none() {
        bail!(
            "give the models' task-vector norms with --l2_norms (one per model) or --from-analysis DIR, \
             or weights with --lambdas"
        );
    }
    let device = Device::resolve(device_request)?;

    let family = Family::open(base, &args.models, args.names.as_deref())?;
    let norms = match (&args.l2_norms, &args.from_analysis) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(dir)) => Some(report::norms_from_analysis(dir, &family.names)?),
        (None, None) => None,
    };
    let lambdas = match (&norms, &args.lambdas) {
        (Some(norms), _) => weights::lambdas_from_norms(&family.names, norms, params)?,
        (None, Some(l)) => {
            weights::check_explicit(&family.names, l)?;
            l.clone()
        }
        (None, None) => unreachable!("checked above"),
    };
    let options = MergeOptions {
        out_type,
        max_shard_size,
        skip_mismatched: args.skip_mismatched,
        allow_nonfinite: args.allow_nonfinite,
    };
    let mut plan = MergePlan::new(&family, lambdas, options)?;

    let shown = tv_cli::names(&family.names);
    tv_cli::say(weights::format_table(
        &shown,
        norms.as_deref(),
        &plan.lambdas,
    ));
    tv_cli::say(tv_cli::describe_plan(&mut plan, &shown));

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
    sidecar::write_config(family.base.folder(), staging.path(), plan.main_type)?;
    sidecar::copy_side_files(family.base.folder(), staging.path())?;
    record(&args, &family, &plan, norms.as_deref()).write(staging.path())?;
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

fn record(args: &Args, family: &Family, plan: &MergePlan, norms: Option<&[f64]>) -> MergeRecord {
    let models = family
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| RecordModel {
            name: family.names[i].clone(),
            path: m.located.spec.clone(),
            l2_norm: norms.map(|n| n[i]),
            lambda: plan.lambdas[i],
            missing_tensors: plan.missing[i].clone(),
            extra_tensors: plan.extra[i].clone(),
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
        method: "task_arithmetic",
        formula: "merged = base + sum_i lambda_i * (model_i - base)",
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
