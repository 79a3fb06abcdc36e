//! `ta-analyze`: task-vector statistics of fine-tunes against their base.
//! Parses flags, calls `tv-core`'s single-pass analysis, writes the report
//! folder atomically and prints a short table; all logic is in the library.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use tv_core::analyze::{analyze, AnalyzeOptions};
use tv_core::device::{Device, DeviceRequest};
use tv_core::family::Family;
use tv_core::report;
use tv_core::staging::{check_output_apart, Staging};

/// Compute each fine-tune's task vector (fine-tune − base) and report
/// per-tensor statistics, group summaries, pairwise cosines and plots.
#[derive(Debug, Parser)]
#[command(name = "ta-analyze", version, long_about = None)]
struct Args {
    /// The base checkpoint: a folder, a .safetensors file, an index json, or a Hugging Face id
    /// (org/name or org/name@revision; downloaded into the cache when missing).
    #[arg(long, value_name = "PATH")]
    base: String,

    /// The fine-tuned checkpoints, same forms as the base.
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    models: Vec<String>,

    /// Output folder (a previous analysis there is replaced, nothing else).
    #[arg(long, default_value = "./tv_stats")]
    outdir: PathBuf,

    /// Model names for folders and tables (default: path basenames).
    #[arg(long, value_name = "NAME", num_args = 1..)]
    names: Option<Vec<String>>,

    /// auto, cpu, cuda or cuda:N. The statistics run on the CPU's fused kernels.
    #[arg(long, default_value = "auto")]
    device: String,

    /// Accepted for compatibility with the original tool; no effect.
    #[arg(long = "multi-gpu", visible_alias = "multi_gpu")]
    multi_gpu: bool,

    /// Count a tied embedding twice (as lm_head.weight too), reproducing the
    /// original tool's numbers for tied models.
    #[arg(long = "count-tied-lm-head")]
    count_tied_lm_head: bool,

    /// Write into an --outdir that also holds files an analysis does not
    /// write (they are left alone; an earlier analysis is always replaced).
    #[arg(long)]
    force: bool,

    /// Also sketch the singular values of every 2-D task-vector tensor
    /// (spectral.csv, spectral.png and `spectral` in analysis.json); on a
    /// CUDA device when --device gives one.
    #[arg(long)]
    spectral: bool,

    /// Use models named by Hugging Face id only from the local cache; never download.
    #[arg(long = "no-download")]
    no_download: bool,

    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    tv_cli::main::<Args>(run)
}

fn run(args: Args) -> Result<()> {
    tv_core::interrupt::install().context("cannot install signal handlers")?;
    let started = Instant::now();
    // The analysis itself is memory-bound and runs on the CPU kernels; the
    // device computes adapters' products and, with --spectral, the sketches.
    let (device, chosen) = Device::resolve(DeviceRequest::parse(&args.device)?)?;
    tv_cli::notes(chosen.as_slice());

    let specs: Vec<String> = std::iter::once(args.base.clone())
        .chain(args.models.iter().cloned())
        .collect();
    tv_cli::fetch_models(&specs, args.no_download, args.quiet)?;
    let family = Family::open(&args.base, &args.models, args.names.as_deref())?;
    check_output_apart(&args.outdir, &family.input_paths())?;
    report::check_outdir(&args.outdir, &family.names, args.force)?;

    let bar = tv_cli::Bar::new("analysing", args.quiet);
    let options = AnalyzeOptions {
        count_tied_lm_head: args.count_tied_lm_head,
        spectral: args.spectral.then(|| device.candle()),
        device,
    };
    let analysis = analyze(&family, options, &bar)?;
    tv_cli::notes(&analysis.notes);

    // check_outdir allowed what is there; only analysis files are replaced.
    let staging = Staging::new(&args.outdir, true)?;
    tv_cli::notes(staging.notes());
    report::write_all(&analysis, staging.path())?;
    tv_cli::notes(&report::commit_analysis(
        staging,
        &family.names,
        args.force,
    )?);

    let shown = tv_cli::names(&family.names);
    for line in tv_core::html::summary_table(&analysis, &shown) {
        tv_cli::sayln!("{line}");
    }
    let suggestions = &analysis.diagnostics.suggestions;
    if suggestions.flags.is_empty() {
        tv_cli::sayln!("suggested: {}", suggestions.method.reason);
    } else {
        tv_cli::sayln!(
            "suggested: {} ({}; see report.html)",
            suggestions.flags,
            suggestions.method.reason
        );
    }
    if let Some((rows, seconds)) = &analysis.spectral {
        tv_cli::sayln!(
            "spectral: {} tensor sketches in {seconds:.1} s (spectral.csv)",
            rows.len()
        );
    }
    tv_cli::sayln!(
        "wrote {} in {:.1} s; merge with: ta-merge --from-analysis {} ...",
        args.outdir.display(),
        started.elapsed().as_secs_f64(),
        args.outdir.display()
    );
    Ok(())
}
