//! `report.html`: one self-contained page of an analysis (images embedded
//! as data URIs, no scripts, nothing fetched) with the terminal summary,
//! the weights each mode gives, the suggested merge settings and their
//! reasons, the diagnostics' tables, every plot, and each model's top
//! tensors by L2. Also the summary table the binary prints, so the page and
//! the terminal show the same lines.

use crate::analyze::Analysis;
use crate::diagnostics::{agreement, suggest::Suggestion, DENSITIES};
use crate::error::{escape_controls, Error, Result};
use crate::stats::TensorRow;
use crate::weights::Mode;
use base64::Engine;
use std::fmt::Write;
use std::path::Path;

/// Top tensors by L2 shown per model.
const TOP_ROWS: usize = 10;

/// The summary table ta-analyze prints: one line per model (global L2,
/// relative change, λ in exp mode) and a note under a model that skipped
/// tensors. `shown` are the names as they should appear.
pub fn summary_table(analysis: &Analysis, shown: &[String]) -> Vec<String> {
    let exp = analysis
        .merge_weights()
        .into_iter()
        .find(|(m, _)| *m == Mode::Exp)
        .and_then(|(_, w)| w.ok());
    let width = shown
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max(12);
    let mut lines = vec![format!(
        "{:<width$}  {:>14}  {:>12}  {:>9}",
        "model", "global L2", "rel. change", "λ (exp)"
    )];
    for (i, m) in analysis.models.iter().enumerate() {
        let s = &m.summary;
        let lambda = exp
            .as_ref()
            .map_or("n/a".to_string(), |w| format!("{:.6}", w[i]));
        lines.push(format!(
            "{:<width$}  {:>14.6}  {:>12.3e}  {:>9}",
            shown[i], s.global_l2, s.relative_change, lambda
        ));
        if s.skipped_params > 0 {
            lines.push(format!(
                "{:<width$}  ({} tensors skipped; see summary.json)",
                "", s.skipped_params
            ));
        }
        if let Some(v) = &s.vocab {
            lines.push(format!(
                "{:<width$}  (embedding rows matched by token: {} matched, {} added rows not \
                 compared, {} base tokens missing)",
                "", v.matched, v.added, v.missing
            ));
        }
    }
    lines
}

/// Text safe inside HTML, with control characters escaped first.
fn esc(text: &str) -> String {
    let text = escape_controls(text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for a table cell: four decimals, or "–" when absent.
fn cell(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "–".into(),
    }
}

/// An `<img>` holding the PNG at `path`, embedded.
fn image(path: &Path, alt: &str) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    Ok(format!(
        "<img alt=\"{}\" src=\"data:image/png;base64,{data}\">",
        esc(alt)
    ))
}

/// A K×K matrix as a table with the models' names.
fn matrix_table(names: &[String], m: &[Vec<f64>]) -> String {
    let mut t = String::from("<table><tr><th></th>");
    for (j, _) in names.iter().enumerate() {
        let _ = write!(t, "<th>[{}]</th>", j + 1);
    }
    t.push_str("</tr>");
    for (i, row) in m.iter().enumerate() {
        let _ = write!(t, "<tr><th>{} [{}]</th>", esc(&names[i]), i + 1);
        for &v in row {
            let _ = write!(t, "<td>{}</td>", cell(Some(v)));
        }
        t.push_str("</tr>");
    }
    t.push_str("</table>");
    t
}

const STYLE: &str = "body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222}\
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:16px}\
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:13px}\
img{max-width:100%;border:1px solid #eee;margin:6px 0;display:block}code{background:#f3f3f3;padding:1px 4px}\
.note{color:#555;font-size:13px}";

/// Writes `dir/report.html` from `analysis` and the PNGs already in `dir`.
pub fn write_report(analysis: &Analysis, dir: &Path) -> Result<()> {
    let names: Vec<String> = analysis.models.iter().map(|m| m.name.clone()).collect();
    let d = &analysis.diagnostics;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ta-analyze report</title><style>{STYLE}</style></head><body>\n"
    );
    let _ = write!(
        h,
        "<h1>Task-vector analysis</h1><p class=\"note\">base <code>{}</code>, {} model(s), ta-analyze {}</p>",
        esc(&analysis.base),
        names.len(),
        crate::VERSION
    );

    h.push_str("<h2>Summary</h2><pre>");
    let shown: Vec<String> = names
        .iter()
        .map(|n| escape_controls(n).into_owned())
        .collect();
    for line in summary_table(analysis, &shown) {
        let _ = writeln!(h, "{}", esc(&line));
    }
    h.push_str("</pre>");

    h.push_str("<h2>Merge weights by mode</h2><table><tr><th class=\"l\">mode</th>");
    for n in &names {
        let _ = write!(h, "<th>{}</th>", esc(n));
    }
    h.push_str("</tr>");
    for (mode, w) in analysis.merge_weights() {
        let _ = write!(h, "<tr><th class=\"l\">{}</th>", mode.name());
        match w {
            Ok(w) => w.iter().for_each(|&x| {
                let _ = write!(h, "<td>{x:.6}</td>");
            }),
            Err(e) => {
                let _ = write!(
                    h,
                    "<td class=\"l\" colspan=\"{}\">{}</td>",
                    names.len(),
                    esc(&e)
                );
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");

    let s = &d.suggestions;
    let _ = write!(
        h,
        "<h2>Suggestions</h2><p>For <code>ta-merge --from-analysis DIR</code>: <code>{}</code></p><table><tr><th class=\"l\">setting</th><th class=\"l\">value</th><th class=\"l\">why</th><th class=\"l\">rule</th></tr>",
        esc(&s.flags)
    );
    for (what, sg) in [
        ("method", &s.method),
        ("density", &s.density),
        ("mode", &s.mode),
    ] {
        let _ = write!(
            h,
            "<tr><th class=\"l\">{what}</th><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
            esc(&value_text(sg)),
            esc(&sg.reason),
            esc(&sg.rule)
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Pairwise cosines</h2>");
    h.push_str(&image(
        &dir.join("pairwise_cosines.png"),
        "pairwise cosines",
    )?);
    h.push_str("<h2>Sign conflicts</h2><p class=\"note\">Fraction of the elements where both task vectors are non-zero whose signs differ; weighted: each element counts min(|d_i|, |d_j|).</p>");
    h.push_str(&image(&dir.join("sign_conflict.png"), "sign conflicts")?);
    h.push_str("<h3>weighted</h3>");
    h.push_str(&matrix_table(&names, &d.sign_conflict_weighted));

    h.push_str("<h2>Cosines by layer and Model Stock</h2>");
    h.push_str(&image(
        &dir.join("cosine_by_layer.png"),
        "cosines by layer",
    )?);
    h.push_str("<table><tr><th class=\"l\">group</th><th>mean pairwise cosine</th><th>Model Stock t</th></tr>");
    for ((g, cos), (_, t)) in d.cosine_by_layer.iter().zip(&d.model_stock_t) {
        let k = cos.len();
        let pairs: Vec<f64> = (0..k)
            .flat_map(|i| (i + 1..k).map(move |j| cos[i][j]))
            .collect();
        let mean = (!pairs.is_empty()).then(|| pairs.iter().sum::<f64>() / pairs.len() as f64);
        let _ = write!(
            h,
            "<tr><th class=\"l\">{}</th><td>{}</td><td>{}</td></tr>",
            esc(g),
            cell(mean),
            cell(*t)
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Energy kept by trimming</h2>");
    h.push_str(&image(&dir.join("trim_energy.png"), "trim energy")?);
    let _ = write!(
        h,
        "<table><tr><th class=\"l\">model</th><th class=\"l\">scope</th>{}</tr>",
        DENSITIES
            .iter()
            .map(|r| format!("<th>ρ {r}</th>"))
            .collect::<String>()
    );
    for (n, t) in names.iter().zip(&d.trim_energy) {
        for (scope, v) in [("tensor", &t.tensor), ("model", &t.model)] {
            let _ = write!(
                h,
                "<tr><th class=\"l\">{}</th><td class=\"l\">{scope}</td>{}</tr>",
                esc(n),
                v.iter()
                    .map(|x| format!("<td>{}</td>", cell(*x)))
                    .collect::<String>()
            );
        }
    }
    let _ = write!(
        h,
        "<tr><th class=\"l\">TIES election</th><td class=\"l\">kept mass</td>{}</tr></table>",
        d.ties_agreement
            .iter()
            .map(|x| format!("<td>{}</td>", cell(*x)))
            .collect::<String>()
    );
    let _ = write!(
        h,
        "<p class=\"note\">Energy: fraction of Σd² kept by the k = max(1, ⌊ρn⌋) largest |d|, within {:.5} of exact. TIES election: fraction of the trimmed, exp-weighted mass whose sign agrees with the elected one, on blocks of {} elements, one in {} ({} elements).</p>",
        crate::magnitude::ENERGY_BOUND,
        agreement::SAMPLE_BLOCK,
        agreement::SAMPLE_EVERY,
        d.ties_sampled
    );

    if let Some((rows, seconds)) = &analysis.spectral {
        let _ = write!(
            h,
            "<h2>Spectral structure</h2><p class=\"note\">{} sketches of 2-D tensors in {seconds:.1} s; per tensor in spectral.csv.</p>",
            rows.len()
        );
        h.push_str(&image(&dir.join("spectral.png"), "spectral")?);
    }
    h.push_str("<h2>Models</h2>");
    for m in &analysis.models {
        let _ = write!(h, "<h3>{}</h3>", esc(&m.name));
        h.push_str(&image(
            &dir.join(&m.name).join("group_l2_bar.png"),
            "group L2",
        )?);
        let mut rows: Vec<&TensorRow> = m.rows.iter().collect();
        rows.sort_by(|a, b| b.l2.total_cmp(&a.l2));
        rows.truncate(TOP_ROWS);
        h.push_str("<table><tr><th class=\"l\">top tensors by L2</th><th class=\"l\">shape</th><th>l2</th><th>maxabs</th><th>std</th><th>unchanged</th></tr>");
        for r in rows {
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{:.6}</td><td>{:.6}</td><td>{:.3e}</td><td>{:.1}%</td></tr>",
                esc(&r.param),
                crate::report::shape_string(&r.shape),
                r.l2,
                r.maxabs,
                r.std,
                100.0 * r.unchanged as f64 / r.numel.max(1) as f64
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    let path = dir.join("report.html");
    std::fs::write(&path, h).map_err(|e| Error::io("cannot write", &path, e))
}

/// A suggestion's value as text.
fn value_text(s: &Suggestion) -> String {
    match &s.value {
        serde_json::Value::String(v) => v.clone(),
        v => v.to_string(),
    }
}
