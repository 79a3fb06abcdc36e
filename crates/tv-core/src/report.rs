//! Writing an [`Analysis`] to disk in the original tool's formats.
//!
//! Per model `DIR/<name>/`: `per_param_stats.csv`, `top50_by_l2.csv`,
//! `top50_by_maxabs.csv`, `summary.json`, `group_l2_bar.png`; for the family:
//! `DIR/pairwise_cosines.csv`, `DIR/pairwise_cosines.png`,
//! `DIR/analysis.json` (with the merge diagnostics), the diagnostics' plots
//! and `DIR/report.html` ([`crate::html`]). Numbers are written with Rust's
//! shortest round-trip formatting, so every f64 reads back exactly.

use crate::analyze::{Analysis, ModelAnalysis, SpectralRow};
use crate::diagnostics::{agreement, Diagnostics, TrimEnergy, DENSITIES};
use crate::error::{Error, Result};
use crate::plot;
use crate::stats::TensorRow;
use crate::weights::WeightParams;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

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
    write_diagnostic_plots(analysis, &names, dir)?;
    if let Some((rows, _)) = &analysis.spectral {
        write_spectral(rows, &names, dir)?;
    }
    let path = dir.join("analysis.json");
    let text = serde_json::to_string_pretty(&analysis_json(analysis)).expect("json") + "\n";
    std::fs::write(&path, text).map_err(|e| Error::io("cannot write", &path, e))?;
    crate::html::write_report(analysis, dir)
}

/// `sign_conflict.png`, `cosine_by_layer.png` and `trim_energy.png`.
fn write_diagnostic_plots(analysis: &Analysis, names: &[String], dir: &Path) -> Result<()> {
    let d = &analysis.diagnostics;
    plot::sign_conflict_heatmaps(
        names,
        &d.sign_conflict,
        &d.sign_conflict_weighted,
        &dir.join("sign_conflict.png"),
    )?;
    let groups: Vec<String> = d.cosine_by_layer.iter().map(|(g, _)| g.clone()).collect();
    let k = names.len();
    // Pairs with a zero task vector have cosine 0 everywhere: left out.
    let live: Vec<usize> = (0..k)
        .filter(|&i| analysis.models[i].summary.global_l2 > 0.0)
        .collect();
    let pairs: Vec<plot::Line> = live
        .iter()
        .flat_map(|&i| live.iter().filter(move |&&j| j > i).map(move |&j| (i, j)))
        .map(|(i, j)| plot::Line {
            label: format!("{} / {}", names[i], names[j]),
            points: d
                .cosine_by_layer
                .iter()
                .enumerate()
                .map(|(x, (_, cos))| (x as f64, Some(cos[i][j])))
                .collect(),
        })
        .collect();
    plot::cosine_by_layer(&groups, &pairs, &dir.join("cosine_by_layer.png"))?;
    let lines = |scope: fn(&TrimEnergy) -> &[Option<f64>; 8]| -> Vec<plot::Line> {
        names
            .iter()
            .zip(&d.trim_energy)
            .map(|(n, t)| plot::Line {
                label: n.clone(),
                points: DENSITIES
                    .iter()
                    .copied()
                    .zip(scope(t).iter().copied())
                    .collect(),
            })
            .collect()
    };
    plot::trim_energy(
        &lines(|t| &t.tensor),
        &lines(|t| &t.model),
        &dir.join("trim_energy.png"),
    )
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
    let mut out = json!({
        "tool": "ta-analyze",
        "version": crate::VERSION,
        "base": analysis.base,
        "models": models,
        "pairwise_cosines": {"names": names, "matrix": analysis.cosines},
        "merge_weights": {"alpha": defaults.alpha, "beta": defaults.beta, "modes": weights},
    });
    let mut extra = diagnostics_json(&analysis.diagnostics, &names);
    if let (Some((rows, seconds)), Value::Object(extra)) = (&analysis.spectral, &mut extra) {
        let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        extra.insert("spectral".into(), spectral_json(rows, &owned, *seconds));
    }
    if let (Value::Object(out), Value::Object(extra)) = (&mut out, extra) {
        out.extend(extra);
    }
    out
}

/// The header of `spectral.csv`.
pub const SPECTRAL_COLUMNS: [&str; 11] = [
    "param",
    "model",
    "rows",
    "cols",
    "fro",
    "sigma1",
    "stable_rank",
    "energy_top1",
    "energy_top8",
    "energy_top32",
    "energy_top128",
];

/// A spectral row's numbers after its names: fro, sigma1, stable rank and
/// the energies in the top 1, 8, 32, 128 singular values.
fn spectral_values(r: &SpectralRow) -> [f64; 7] {
    let s = &r.spectrum;
    let e = |k| s.energy_top(k);
    [
        s.fro,
        s.sigma.first().copied().unwrap_or(0.0),
        s.stable_rank(),
        e(crate::spectral::TOPS[0]),
        e(crate::spectral::TOPS[1]),
        e(crate::spectral::TOPS[2]),
        e(crate::spectral::TOPS[3]),
    ]
}

/// `spectral.csv` and `spectral.png` (median stable rank per group).
fn write_spectral(rows: &[SpectralRow], names: &[String], dir: &Path) -> Result<()> {
    let path = dir.join("spectral.csv");
    let fail = |e: csv::Error| Error::io("cannot write", &path, e.into());
    let mut w = csv::Writer::from_path(&path).map_err(fail)?;
    w.write_record(SPECTRAL_COLUMNS).map_err(fail)?;
    for r in rows {
        let mut rec = vec![
            r.param.clone(),
            names[r.model].clone(),
            r.rows.to_string(),
            r.cols.to_string(),
        ];
        rec.extend(spectral_values(r).iter().map(|v| format!("{v:?}")));
        w.write_record(&rec).map_err(fail)?;
    }
    w.flush().map_err(|e| Error::io("cannot write", &path, e))?;
    let medians = spectral_medians(rows, names.len());
    let groups: Vec<String> = medians.iter().map(|(g, _)| g.clone()).collect();
    let lines: Vec<plot::Line> = names
        .iter()
        .enumerate()
        .map(|(i, n)| plot::Line {
            label: n.clone(),
            points: medians
                .iter()
                .enumerate()
                .map(|(x, (_, m))| (x as f64, m[i].map(|v| v[2])))
                .collect(),
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|p| p.1))
        .fold(1.0f64, f64::max);
    plot::by_group(
        "median stable rank (‖Δ‖²/σ₁², Frobenius norm) of 2-D tensors by group",
        "stable rank",
        &groups,
        &lines,
        (0.0, top * 1.1),
        &dir.join("spectral.png"),
    )
}

/// Per group (natural order), per model, the medians of
/// [`spectral_values`] over the group's non-zero 2-D tensors (None where
/// the model has none).
fn spectral_medians(rows: &[SpectralRow], k: usize) -> Vec<(String, Vec<Option<[f64; 7]>>)> {
    let mut groups: Vec<String> = rows
        .iter()
        .map(|r| crate::stats::group_of(&r.param))
        .collect();
    groups.sort_by_key(|g| crate::analyze::natural_key(g));
    groups.dedup();
    groups
        .into_iter()
        .map(|g| {
            let per_model = (0..k)
                .map(|i| {
                    let vals: Vec<[f64; 7]> = rows
                        .iter()
                        .filter(|r| r.model == i && r.spectrum.fro > 0.0)
                        .filter(|r| crate::stats::group_of(&r.param) == g)
                        .map(spectral_values)
                        .collect();
                    (!vals.is_empty()).then(|| {
                        std::array::from_fn(|c| {
                            let mut v: Vec<f64> = vals.iter().map(|x| x[c]).collect();
                            v.sort_by(f64::total_cmp);
                            let n = v.len();
                            if n % 2 == 1 {
                                v[n / 2]
                            } else {
                                (v[n / 2 - 1] + v[n / 2]) / 2.0
                            }
                        })
                    })
                })
                .collect();
            (g, per_model)
        })
        .collect()
}

/// The `spectral` key of `analysis.json`.
fn spectral_json(rows: &[SpectralRow], names: &[String], seconds: f64) -> Value {
    let groups: Map<String, Value> = spectral_medians(rows, names.len())
        .into_iter()
        .map(|(g, per_model)| {
            let models: Map<String, Value> = names
                .iter()
                .zip(per_model)
                .filter_map(|(n, m)| {
                    m.map(|v| {
                        let fields: Map<String, Value> = SPECTRAL_COLUMNS[4..]
                            .iter()
                            .zip(v)
                            .map(|(c, x)| (c.to_string(), json!(x)))
                            .collect();
                        (n.clone(), Value::Object(fields))
                    })
                })
                .collect();
            (g, Value::Object(models))
        })
        .collect();
    json!({
        "medians_by_group": groups,
        "tensors": rows.len(),
        "seconds": seconds,
        "sketch": {
            "rank": crate::spectral::RANK,
            "oversample": crate::spectral::OVERSAMPLE,
            "power_iterations": crate::spectral::POWER_ITERS,
        },
    })
}

/// The diagnostics' keys of `analysis.json`.
fn diagnostics_json(d: &Diagnostics, names: &[&str]) -> Value {
    let per_model = |f: &dyn Fn(usize) -> Value| -> Map<String, Value> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), f(i)))
            .collect()
    };
    let groups = |f: &dyn Fn(usize) -> Value| -> Map<String, Value> {
        d.cosine_by_layer
            .iter()
            .enumerate()
            .map(|(g, (name, _))| (name.clone(), f(g)))
            .collect()
    };
    let suggestion = |s: &crate::diagnostics::suggest::Suggestion| json!({"value": s.value, "reason": s.reason, "rule": s.rule, "numbers": s.numbers});
    let s = &d.suggestions;
    json!({
        "sign_conflict": {"names": names, "matrix": d.sign_conflict},
        "sign_conflict_weighted": {"names": names, "matrix": d.sign_conflict_weighted},
        "cosine_by_layer": {
            "names": names,
            "groups": groups(&|g| json!(d.cosine_by_layer[g].1)),
        },
        "model_stock_t": groups(&|g| json!(d.model_stock_t[g].1)),
        "trim_energy": {
            "densities": DENSITIES,
            "bound": crate::magnitude::ENERGY_BOUND,
            "models": per_model(&|i| json!({
                "tensor": d.trim_energy[i].tensor,
                "model": d.trim_energy[i].model,
            })),
        },
        "ties_agreement": {
            "densities": DENSITIES,
            "values": d.ties_agreement,
            "weights": match &d.ties_weights {
                Ok(w) => Value::Object(per_model(&|i| json!(w[i]))),
                Err(e) => json!({"error": e}),
            },
            "sample": {
                "block": agreement::SAMPLE_BLOCK,
                "every": agreement::SAMPLE_EVERY,
                "elements": d.ties_sampled,
            },
        },
        "suggestions": {
            "method": suggestion(&s.method),
            "density": suggestion(&s.density),
            "mode": suggestion(&s.mode),
            "flags": s.flags,
        },
        "magnitude_histogram": {
            "key": "bits of |d| as f64, shifted right by `shift`",
            "shift": crate::magnitude::COARSE_SHIFT,
            "models": per_model(&|i| {
                let h = &d.histograms[i];
                json!({"entries": h.entries, "runs": h.coarse_runs()})
            }),
        },
    })
}

/// Reads each model's `global_l2` from `DIR/<name>/summary.json`, as
/// written by the analysis, for `ta-merge --from-analysis`.
pub fn norms_from_analysis(dir: &Path, names: &[String]) -> Result<Vec<f64>> {
    names
        .iter()
        .map(|name| {
            let path = dir.join(name).join("summary.json");
            let text = match crate::sidecar::read_side_text_if_present(&path)? {
                Some(text) => text,
                None => {
                    return Err(Error::NotFound(format!(
                        "--from-analysis: no summary for model '{name}' ({}: no such file); analyse it, or set matching --names",
                        path.display()
                    )))
                }
            };
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&path, format!("not valid JSON: {e}")))?;
            v.get("global_l2")
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::bad_file(&path, "has no numeric global_l2"))
        })
        .collect()
}

/// Where `DIR/analysis.json` says the analysis read other checkpoints than
/// `base` and `models` (`(name, spec)`, the specs as given now): one line per
/// difference, naming both. A spec that exists locally is compared by its
/// canonical path, so `./fam/base` and `fam/base` are the same; hub ids as
/// written. A recorded path that does not exist from here (the analysis ran
/// in another folder) says nothing. Nothing either when the file is absent,
/// unreadable or records no paths: the norms come from the summaries.
pub fn analysis_differences(dir: &Path, base: &str, models: &[(String, String)]) -> Vec<String> {
    let path = dir.join("analysis.json");
    let Ok(Some(text)) = crate::sidecar::read_side_text_if_present(&path) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    let same =
        |then: &str, now: &str| match (std::fs::canonicalize(then), std::fs::canonicalize(now)) {
            (Ok(a), Ok(b)) => a == b,
            (Err(_), Err(_)) => then == now,
            // Recorded relative to another folder: no judgement.
            (Err(_), Ok(_)) => true,
            (Ok(_), Err(_)) => then == now,
        };
    let mut out = Vec::new();
    if let Some(then) = v.get("base").and_then(Value::as_str) {
        if !same(then, base) {
            out.push(format!(
                "it analysed base '{then}', this merge's base is '{base}'"
            ));
        }
    }
    let recorded = v.get("models").and_then(Value::as_array);
    for (name, spec) in models {
        let then = recorded
            .into_iter()
            .flatten()
            .find(|m| m.get("name").and_then(Value::as_str) == Some(name.as_str()))
            .and_then(|m| m.get("path"))
            .and_then(Value::as_str);
        if let Some(then) = then {
            if !same(then, spec) {
                out.push(format!(
                    "it analysed '{name}' at '{then}', this merge reads '{spec}'"
                ));
            }
        }
    }
    out
}

/// Each model's `magnitude_histogram` entry from `DIR/analysis.json`, for
/// a whole-model selection (`ta-merge --from-analysis --density-scope
/// model`). `None` for a model the file does not describe, and for every
/// model when the file is absent or records another bucket width: the
/// selection then samples, as without an analysis (and where the counts
/// are inconsistent, see `CoarseCounts::is_consistent`). A file that is present
/// but malformed is an error naming it.
pub fn magnitude_counts_from_analysis(
    dir: &Path,
    names: &[String],
) -> Result<Vec<Option<crate::magnitude::CoarseCounts>>> {
    let path = dir.join("analysis.json");
    let none = || names.iter().map(|_| None).collect();
    let Some(text) = crate::sidecar::read_side_text_if_present(&path)? else {
        return Ok(none());
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&path, format!("not valid JSON: {e}")))?;
    let Some(h) = v.get("magnitude_histogram") else {
        return Ok(none());
    };
    if h.get("shift").and_then(Value::as_u64) != Some(u64::from(crate::magnitude::COARSE_SHIFT)) {
        return Ok(none());
    }
    let bad = |what: &str| Error::bad_file(&path, format!("magnitude_histogram: {what}"));
    names
        .iter()
        .map(|name| {
            let Some(m) = h.get("models").and_then(|m| m.get(name)) else {
                return Ok(None);
            };
            let entries = m
                .get("entries")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(&format!("model '{name}' has no entries count")))?;
            let runs =
                m.get("runs")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(&format!("model '{name}' has no runs")))?
                    .iter()
                    .map(|run| {
                        let first = run.get(0).and_then(Value::as_u64);
                        let counts = run.get(1).and_then(Value::as_array).and_then(|c| {
                            c.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>()
                        });
                        match (first, counts) {
                            (Some(first), Some(counts)) => Ok((first, counts)),
                            _ => Err(bad(&format!(
                                "a run of model '{name}' is not [bucket, [counts]]"
                            ))),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
            Ok(Some(crate::magnitude::CoarseCounts { entries, runs }))
        })
        .collect()
}

/// Each tensor's L2 norm per model from an analysis folder, for weights per
/// group or per tensor (`ta-merge --from-analysis --granularity`):
/// `result[t][i]` for tensor `tensors[t]` and model `names[i]`, from
/// `DIR/<name>/summary.json`'s `groups` (the tensor's group) or from
/// `DIR/<name>/per_param_stats.csv` (the tensor's row); `None` where the
/// model's analysis has no such group or row (a tensor it does not store).
pub fn tensor_norms_from_analysis(
    dir: &Path,
    names: &[String],
    tensors: &[String],
    granularity: crate::weights::Granularity,
) -> Result<Vec<Vec<Option<f64>>>> {
    use crate::weights::Granularity;
    let mut per_model: Vec<std::collections::HashMap<String, f64>> = Vec::new();
    for name in names {
        let norms = match granularity {
            Granularity::Model => unreachable!("model weights come from global_l2"),
            Granularity::Group => {
                let path = dir.join(name).join("summary.json");
                let text = crate::sidecar::read_side_text_if_present(&path)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "--from-analysis: no summary for model '{name}' ({}: no such file)",
                        path.display()
                    ))
                })?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| Error::bad_file(&path, format!("not valid JSON: {e}")))?;
                let groups = v
                    .get("groups")
                    .and_then(Value::as_object)
                    .ok_or_else(|| Error::bad_file(&path, "has no groups"))?;
                groups
                    .iter()
                    .map(|(g, stats)| {
                        stats
                            .get("l2")
                            .and_then(Value::as_f64)
                            .map(|l2| (g.clone(), l2))
                            .ok_or_else(|| {
                                Error::bad_file(&path, format!("group '{g}' has no numeric l2"))
                            })
                    })
                    .collect::<Result<_>>()?
            }
            Granularity::Tensor => {
                let path = dir.join(name).join("per_param_stats.csv");
                let text = crate::sidecar::read_side_text_if_present(&path)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "--from-analysis: no per-tensor statistics for model '{name}' ({}: no such file)",
                        path.display()
                    ))
                })?;
                let mut reader = csv::Reader::from_reader(text.as_bytes());
                let mut norms = std::collections::HashMap::new();
                for row in reader.records() {
                    let row = row.map_err(|e| Error::bad_file(&path, format!("bad CSV: {e}")))?;
                    let (Some(param), Some(l2)) = (row.get(0), row.get(2)) else {
                        return Err(Error::bad_file(&path, "a row lacks param or l2"));
                    };
                    let l2: f64 = l2.parse().map_err(|_| {
                        Error::bad_file(&path, format!("l2 of '{param}' is not a number"))
                    })?;
                    norms.insert(param.to_string(), l2);
                }
                norms
            }
        };
        per_model.push(norms);
    }
    Ok(tensors
        .iter()
        .map(|t| {
            let key = match granularity {
                Granularity::Group => crate::stats::group_of(t),
                _ => t.clone(),
            };
            per_model.iter().map(|m| m.get(&key).copied()).collect()
        })
        .collect())
}

/// The files an analysis writes at the top of its folder.
pub const FAMILY_FILES: [&str; 9] = [
    "analysis.json",
    "pairwise_cosines.csv",
    "pairwise_cosines.png",
    "sign_conflict.png",
    "cosine_by_layer.png",
    "trim_energy.png",
    "report.html",
    "spectral.csv",
    "spectral.png",
];

/// The files an analysis writes into each model's folder.
pub const MODEL_FILES: [&str; 5] = [
    "per_param_stats.csv",
    "top50_by_l2.csv",
    "top50_by_maxabs.csv",
    "summary.json",
    "group_l2_bar.png",
];

/// What an existing analysis folder holds, as paths relative to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutdirContents {
    /// Files an earlier analysis wrote (see [`outdir_contents`]). Only
    /// regular files count.
    pub owned: Vec<PathBuf>,
    /// Everything else: the tool leaves these alone.
    pub foreign: Vec<PathBuf>,
}

/// Sorts the entries of an existing `--outdir` into what an analysis wrote
/// and what it did not: [`FAMILY_FILES`] at the top, and [`MODEL_FILES`] in
/// the model folders the earlier `analysis.json` lists and in `also` (the
/// folders a new analysis writes, when forced). Symlinks are never followed
/// and count as foreign.
pub fn outdir_contents(dir: &Path, also: &[String]) -> Result<OutdirContents> {
    let regular = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
    let real_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let list = |d: &Path| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .map_err(|e| Error::io("cannot list", d, e))?
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(|e| Error::io("cannot list", d, e))
            })
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    };
    // The model folders of the earlier analysis, as its analysis.json names them.
    let index = dir.join("analysis.json");
    let mut model_dirs: Vec<String> = also.to_vec();
    if regular(&index) {
        if let Ok(text) = crate::sidecar::read_side_text(&index) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let models = v.get("models").and_then(Value::as_array);
                for m in models.into_iter().flatten() {
                    if let Some(name) = m.get("name").and_then(Value::as_str) {
                        let plain = !name.is_empty()
                            && !name.contains(['/', '\\'])
                            && name != "."
                            && name != "..";
                        if plain && !FAMILY_FILES.contains(&name) {
                            model_dirs.push(name.to_string());
                        }
                    }
                }
            }
        }
    }
    let mut out = OutdirContents::default();
    for name in list(dir)? {
        let path = dir.join(&name);
        if FAMILY_FILES.contains(&name.as_str()) && regular(&path) {
            out.owned.push(PathBuf::from(&name));
        } else if model_dirs.contains(&name) && real_dir(&path) {
            for inner in list(&path)? {
                let rel = Path::new(&name).join(&inner);
                if MODEL_FILES.contains(&inner.as_str()) && regular(&path.join(&inner)) {
                    out.owned.push(rel);
                } else {
                    out.foreign.push(rel);
                }
            }
        } else {
            out.foreign.push(PathBuf::from(name));
        }
    }
    Ok(out)
}

/// The files an analysis of models `names` writes, relative to its folder.
pub fn output_files(names: &[String]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = FAMILY_FILES.iter().map(PathBuf::from).collect();
    for name in names {
        files.extend(MODEL_FILES.iter().map(|f| Path::new(name).join(f)));
    }
    files
}

/// "1 entry", "3 entries".
fn count_entries(n: usize) -> String {
    if n == 1 {
        "1 entry".to_string()
    } else {
        format!("{n} entries")
    }
}

/// A short list of `paths` for a message.
fn preview(paths: &[PathBuf]) -> String {
    let mut shown: Vec<String> = paths
        .iter()
        .take(5)
        .map(|p| p.display().to_string())
        .collect();
    if paths.len() > 5 {
        shown.push(format!("and {} more", paths.len() - 5));
    }
    shown.join(", ")
}

/// The model folders whose analysis files a run may replace besides those
/// the earlier `analysis.json` lists: with `force`, the new run's own.
fn forced_dirs(names: &[String], force: bool) -> &[String] {
    if force {
        names
    } else {
        &[]
    }
}

/// Checks that an analysis of `names` may be written to `dir`, before any
/// work: a missing folder is fine; an existing one must be a folder, may
/// hold an earlier analysis (replaced), and may hold other files only with
/// `force` (they are left alone), none of them where a new file goes. With
/// `force`, analysis files at the new run's own paths are replaced too.
pub fn check_outdir(dir: &Path, names: &[String], force: bool) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--outdir {} exists and is not a folder; refusing to replace it",
            dir.display()
        )));
    }
    let contents = outdir_contents(dir, forced_dirs(names, force))?;
    if !contents.foreign.is_empty() && !force {
        return Err(Error::InvalidArgument(format!(
            "--outdir {} holds {} that ta-analyze did not write ({}); \
             pass --force to write the analysis beside them (they are left alone), or choose another folder",
            dir.display(),
            count_entries(contents.foreign.len()),
            preview(&contents.foreign)
        )));
    }
    crate::staging::check_placeable(dir, &output_files(names), &contents.owned)
}

/// Moves a finished analysis staged in `staging` into place. An earlier
/// analysis there is replaced; files an analysis does not write are left
/// where they are (the returned notes say which). A folder holding only
/// analysis files is exchanged in one step.
pub fn commit_analysis(
    staging: crate::staging::Staging,
    names: &[String],
    force: bool,
) -> Result<Vec<String>> {
    let dir = staging.target().to_path_buf();
    if std::fs::symlink_metadata(&dir).is_err() {
        staging.commit()?;
        return Ok(Vec::new());
    }
    let contents = outdir_contents(&dir, forced_dirs(names, force))?;
    if contents.foreign.is_empty() {
        staging.commit()?;
        return Ok(Vec::new());
    }
    staging.commit_beside(&contents.owned)?;
    Ok(vec![format!(
        "left {} that ta-analyze did not write in {}: {}",
        count_entries(contents.foreign.len()),
        dir.display(),
        preview(&contents.foreign)
    )])
}
