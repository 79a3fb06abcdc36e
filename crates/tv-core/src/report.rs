//! Writing an [`Analysis`] to disk in the original tool's formats.
//!
//! Per model `DIR/<name>/`: `per_param_stats.csv`, `top50_by_l2.csv`,
//! `top50_by_maxabs.csv`, `summary.json`, `group_l2_bar.png`; for the family:
//! `DIR/pairwise_cosines.csv`, `DIR/pairwise_cosines.png` and
//! `DIR/analysis.json`. Numbers are written with Rust's shortest round-trip
//! formatting, so every f64 reads back exactly.

use crate::analyze::{Analysis, ModelAnalysis};
use crate::error::{Error, Result};
use crate::plot;
use crate::stats::TensorRow;
use crate::weights::WeightParams;
use serde_json::{json, Map, Value};
use std::path::Path;

/// The CSV columns, the original's first.
pub const COLUMNS: [&str; 23] = [
    "param",
    "shape",
    "l2",
    "l1",
    "maxabs",
    "mean",
    "std",
    "skew",
    "kurtosis_excess",
    "q0",
    "q1",
    "q5",
    "q10",
    "q25",
    "q50",
    "q75",
    "q90",
    "q95",
    "q99",
    "q100",
    "numel",
    "nonfinite",
    "unchanged",
];

/// Writes every output of `analysis` into `dir` (which must exist).
pub fn write_all(analysis: &Analysis, dir: &Path) -> Result<()> {
    for model in &analysis.models {
        let mdir = dir.join(&model.name);
        std::fs::create_dir_all(&mdir).map_err(|e| Error::io("cannot create", &mdir, e))?;
        write_model(model, &mdir)?;
    }
    write_cosines(analysis, &dir.join("pairwise_cosines.csv"))?;
    let names: Vec<String> = analysis.models.iter().map(|m| m.name.clone()).collect();
    plot::cosine_heatmap(&names, &analysis.cosines, &dir.join("pairwise_cosines.png"))?;
    let path = dir.join("analysis.json");
    let text = serde_json::to_string_pretty(&analysis_json(analysis)).expect("json") + "\n";
    std::fs::write(&path, text).map_err(|e| Error::io("cannot write", &path, e))
}

fn write_model(model: &ModelAnalysis, dir: &Path) -> Result<()> {
    write_rows(&model.rows, &dir.join("per_param_stats.csv"))?;
    let mut by_l2: Vec<&TensorRow> = model.rows.iter().collect();
    by_l2.sort_by(|a, b| b.l2.total_cmp(&a.l2));
    by_l2.truncate(50);
    write_rows(by_l2.iter().copied(), &dir.join("top50_by_l2.csv"))?;
    let mut by_max: Vec<&TensorRow> = model.rows.iter().collect();
    by_max.sort_by(|a, b| b.maxabs.total_cmp(&a.maxabs));
    by_max.truncate(50);
    write_rows(by_max.iter().copied(), &dir.join("top50_by_maxabs.csv"))?;
    let path = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&model.summary).expect("json") + "\n";
    std::fs::write(&path, text).map_err(|e| Error::io("cannot write", &path, e))?;
    let groups: Vec<(String, f64)> = model
        .summary
        .groups
        .iter()
        .map(|(g, v)| (g.clone(), v["l2"].as_f64().unwrap_or(0.0)))
        .collect();
    plot::group_bars(&model.name, &groups, &dir.join("group_l2_bar.png"))
}

/// Python's list repr of a shape, e.g. `[3072, 3072]`.
pub fn shape_string(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

fn write_rows<'a>(rows: impl IntoIterator<Item = &'a TensorRow>, path: &Path) -> Result<()> {
    let fail = |e: csv::Error| Error::io("cannot write", path, e.into());
    let mut w = csv::Writer::from_path(path).map_err(fail)?;
    w.write_record(COLUMNS).map_err(fail)?;
    for r in rows {
        let mut rec = vec![r.param.clone(), shape_string(&r.shape)];
        for v in [
            r.l2,
            r.l1,
            r.maxabs,
            r.mean,
            r.std,
            r.skew,
            r.kurtosis_excess,
        ] {
            rec.push(format!("{v:?}"));
        }
        rec.extend(r.quantiles.iter().map(|q| format!("{q:?}")));
        rec.extend([
            r.numel.to_string(),
            r.nonfinite.to_string(),
            r.unchanged.to_string(),
        ]);
        w.write_record(&rec).map_err(fail)?;
    }
    w.flush().map_err(|e| Error::io("cannot write", path, e))
}

fn write_cosines(analysis: &Analysis, path: &Path) -> Result<()> {
    let fail = |e: csv::Error| Error::io("cannot write", path, e.into());
    let mut w = csv::Writer::from_path(path).map_err(fail)?;
    let mut header = vec![String::new()];
    header.extend(analysis.models.iter().map(|m| m.name.clone()));
    w.write_record(&header).map_err(fail)?;
    for (m, row) in analysis.models.iter().zip(&analysis.cosines) {
        let mut rec = vec![m.name.clone()];
        rec.extend(row.iter().map(|c| format!("{c:?}")));
        w.write_record(&rec).map_err(fail)?;
    }
    w.flush().map_err(|e| Error::io("cannot write", path, e))
}

fn analysis_json(analysis: &Analysis) -> Value {
    let models: Vec<Value> = analysis
        .models
        .iter()
        .map(|m| json!({"name": m.name, "path": m.spec, "summary": m.summary}))
        .collect();
    let names: Vec<&str> = analysis.models.iter().map(|m| m.name.as_str()).collect();
    let defaults = WeightParams::default();
    let mut weights = Map::new();
    for (mode, result) in analysis.merge_weights() {
        let v = match result {
            Ok(l) => Value::Object(
                names
                    .iter()
                    .zip(l)
                    .map(|(n, l)| (n.to_string(), json!(l)))
                    .collect(),
            ),
            Err(e) => json!({"error": e}),
        };
        weights.insert(mode.name().to_string(), v);
    }
    json!({
        "tool": "ta-analyze",
        "version": crate::VERSION,
        "base": analysis.base,
        "models": models,
        "pairwise_cosines": {"names": names, "matrix": analysis.cosines},
        "merge_weights": {"alpha": defaults.alpha, "beta": defaults.beta, "modes": weights},
    })
}

/// Reads each model's `global_l2` from `DIR/<name>/summary.json`, as
/// written by the analysis, for `ta-merge --from-analysis`.
pub fn norms_from_analysis(dir: &Path, names: &[String]) -> Result<Vec<f64>> {
    names
        .iter()
        .map(|name| {
            let path = dir.join(name).join("summary.json");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::NotFound(format!(
                    "--from-analysis: no summary for model '{name}' ({}: {e}); analyse it, or set matching --names",
                    path.display()
                ))
            })?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&path, format!("not valid JSON: {e}")))?;
            v.get("global_l2")
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::bad_file(&path, "has no numeric global_l2"))
        })
        .collect()
}

/// Whether `dir` may be replaced by a new analysis without `--force`: it is
/// empty or holds a previous analysis.
pub fn is_replaceable_output(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            dir.join("analysis.json").is_file()
                || dir.join("pairwise_cosines.csv").is_file()
                || entries.next().is_none()
        }
        Err(_) => false,
    }
}
