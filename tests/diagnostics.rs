//! End-to-end tests of `ta-analyze`'s merge diagnostics: every new key of
//! `analysis.json` against a straightforward f64 computation written here
//! from the documented definitions, on families with a model identical to
//! the base, a model missing a tensor, and a base that ties its embeddings.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;

const DENSITIES: [f64; 8] = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9];

/// The README's bound on trim energy: within 0.001 of exact.
const TRIM_BOUND: f64 = 0.001;

/// Each model's deltas by tensor name, over the base's tensors it stores
/// with the same shape.
type Deltas = BTreeMap<String, Vec<f64>>;

fn deltas(base: &[T], model: &[T]) -> Deltas {
    base.iter()
        .filter_map(|b| {
            let m = model
                .iter()
                .find(|m| m.name == b.name && m.shape == b.shape)?;
            let d = m.values.iter().zip(&b.values).map(|(m, b)| m - b).collect();
            Some((b.name.clone(), d))
        })
        .collect()
}

/// The layer group of a tensor name, for the names these tests generate.
fn group(name: &str) -> String {
    if name.contains("lm_head") {
        "lm_head".into()
    } else if name.contains("embed") {
        "embed".into()
    } else if let Some(rest) = name.strip_prefix("model.layers.") {
        format!("layer_{}", rest.split('.').next().unwrap())
    } else {
        "other".into()
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn analyze(dir: &Path, models: &[&str]) -> std::path::PathBuf {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let out = dir.join("stats");
    let mut args = vec!["--base".to_string(), p("base"), "--models".to_string()];
    args.extend(models.iter().map(|m| p(m)));
    args.extend([
        "--outdir".to_string(),
        out.to_string_lossy().into_owned(),
        "--quiet".to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("ta-analyze", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// Σ over the tensors both store of (both non-zero, conflicts, Σ min, Σ min
/// over conflicts).
fn signs(a: &Deltas, b: &Deltas) -> (f64, f64, f64, f64) {
    let mut s = (0.0, 0.0, 0.0, 0.0);
    for (name, da) in a {
        let Some(db) = b.get(name) else { continue };
        for (&x, &y) in da.iter().zip(db) {
            if x != 0.0 && y != 0.0 {
                let m = x.abs().min(y.abs());
                s.0 += 1.0;
                s.2 += m;
                if (x < 0.0) != (y < 0.0) {
                    s.1 += 1.0;
                    s.3 += m;
                }
            }
        }
    }
    s
}

/// Fraction of Σd² the k = max(1, ⌊ρn⌋) largest |d| keep.
fn kept(values: &[f64], rho: f64) -> f64 {
    let mut a: Vec<f64> = values.iter().map(|v| v.abs()).collect();
    a.sort_by(|x, y| y.total_cmp(x));
    let k = ((rho * a.len() as f64).floor() as usize).max(1);
    a[..k].iter().map(|x| x * x).sum()
}

/// The documented estimate of [`kept`]: each kept entry counts as
/// (lo² + hi²)/2 of its bucket [lo, hi) (|d| bits >> 42).
fn kept_estimate(values: &[f64], rho: f64) -> f64 {
    let mut a: Vec<f64> = values.iter().map(|v| v.abs()).collect();
    a.sort_by(|x, y| y.total_cmp(x));
    let k = ((rho * a.len() as f64).floor() as usize).max(1);
    a[..k]
        .iter()
        .map(|x| {
            let b = x.to_bits() >> 42;
            let (lo, hi) = (f64::from_bits(b << 42), f64::from_bits((b + 1) << 42));
            (lo * lo + hi * hi) / 2.0
        })
        .sum()
}

/// The documented trim threshold of the election: the lower edge of the
/// bucket (|d| bits >> 42) of the k-th largest |d|.
fn tau(values: &[f64], rho: f64) -> f64 {
    let mut a: Vec<f64> = values.iter().map(|v| v.abs()).collect();
    a.sort_by(|x, y| y.total_cmp(x));
    let k = ((rho * a.len() as f64).floor() as usize).max(1);
    f64::from_bits((a[k - 1].to_bits() >> 42) << 42)
}

/// Checks every diagnostic key of `out/analysis.json` for models `names`
/// with deltas `ds`.
fn check_diagnostics(out: &Path, names: &[&str], ds: &[Deltas]) {
    let a = json(&out.join("analysis.json"));
    let k = names.len();

    // Sign conflicts: the plain fraction is a ratio of exact counts.
    for i in 0..k {
        for j in 0..k {
            let got = f(&a["sign_conflict"]["matrix"][i][j]);
            let got_w = f(&a["sign_conflict_weighted"]["matrix"][i][j]);
            if i == j {
                assert_eq!((got, got_w), (0.0, 0.0));
                continue;
            }
            let (both, conflict, w, wc) = signs(&ds[i], &ds[j]);
            let want = if both > 0.0 { conflict / both } else { 0.0 };
            let want_w = if w > 0.0 { wc / w } else { 0.0 };
            // Exact counts; serde_json's parser may be one ulp off.
            assert!(
                (got - want).abs() <= 1e-15,
                "sign_conflict {i},{j}: {got} vs {want}"
            );
            assert!(
                (got_w - want_w).abs() <= 1e-12,
                "weighted {i},{j}: {got_w} vs {want_w}"
            );
        }
    }

    // Cosines by group, and Model Stock's t.
    let mut groups: BTreeMap<String, Vec<Deltas>> = BTreeMap::new();
    for (i, d) in ds.iter().enumerate() {
        for (name, v) in d {
            let g = groups
                .entry(group(name))
                .or_insert_with(|| vec![Deltas::new(); k]);
            g[i].insert(name.clone(), v.clone());
        }
    }
    let got_groups = a["cosine_by_layer"]["groups"].as_object().unwrap();
    assert_eq!(got_groups.len(), groups.len(), "{:?}", got_groups.keys());
    for (g, per_model) in &groups {
        let norm = |d: &Deltas| d.values().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let mut cos = vec![vec![0.0; k]; k];
        for i in 0..k {
            for j in 0..k {
                let dot: f64 = per_model[i]
                    .iter()
                    .filter_map(|(n, x)| per_model[j].get(n).map(|y| (x, y)))
                    .map(|(x, y)| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>())
                    .sum();
                let den = norm(&per_model[i]) * norm(&per_model[j]);
                cos[i][j] = if den > 0.0 { dot / den } else { 0.0 };
                let got = f(&got_groups[g][i][j]);
                assert!(
                    (got - cos[i][j]).abs() <= 1e-9,
                    "cos {g} {i},{j}: {got} vs {}",
                    cos[i][j]
                );
            }
        }
        let pairs: Vec<f64> = (0..k)
            .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
            .map(|(i, j)| cos[i][j])
            .collect();
        let c = pairs.iter().sum::<f64>() / pairs.len() as f64;
        let n = k as f64;
        let t = n * c / (1.0 + (n - 1.0) * c);
        let got = f(&a["model_stock_t"][g]);
        assert!((got - t).abs() <= 1e-9, "model_stock_t {g}: {got} vs {t}");
    }

    // Trim energy within the stated bound, per tensor and per model.
    assert_eq!(a["trim_energy"]["densities"], serde_json::json!(DENSITIES));
    for (i, name) in names.iter().enumerate() {
        let te = &a["trim_energy"]["models"][name];
        let total: f64 = ds[i].values().flatten().map(|x| x * x).sum();
        if total == 0.0 {
            assert!(te["tensor"].as_array().unwrap().iter().all(|v| v.is_null()));
            assert!(te["model"].as_array().unwrap().iter().all(|v| v.is_null()));
            continue;
        }
        let all: Vec<f64> = ds[i].values().flatten().copied().collect();
        for (r, &rho) in DENSITIES.iter().enumerate() {
            let per_tensor: f64 = ds[i].values().map(|d| kept(d, rho)).sum::<f64>() / total;
            let whole = kept(&all, rho) / total;
            let (got_t, got_m) = (f(&te["tensor"][r]), f(&te["model"][r]));
            // The documented estimator, to rounding...
            let est_t: f64 = ds[i].values().map(|d| kept_estimate(d, rho)).sum::<f64>() / total;
            let est_m = kept_estimate(&all, rho) / total;
            assert!(
                (got_t - est_t).abs() <= 1e-9,
                "{name} ρ {rho}: {got_t} vs {est_t}"
            );
            assert!(
                (got_m - est_m).abs() <= 1e-9,
                "{name} ρ {rho}: {got_m} vs {est_m}"
            );
            // ...and within the stated bound of the exact fraction.
            assert!(
                (got_t - per_tensor).abs() <= TRIM_BOUND,
                "{name} tensor ρ {rho}: {got_t} vs {per_tensor}"
            );
            assert!(
                (got_m - whole).abs() <= TRIM_BOUND,
                "{name} model ρ {rho}: {got_m} vs {whole}"
            );
        }
    }

    // The magnitude histogram at the selection's first level, exactly.
    let mh = &a["magnitude_histogram"];
    assert_eq!(mh["shift"], 47);
    for (i, name) in names.iter().enumerate() {
        let mut want: BTreeMap<u64, u64> = BTreeMap::new();
        for x in ds[i].values().flatten() {
            *want.entry(x.abs().to_bits() >> 47).or_default() += 1;
        }
        let mut got: BTreeMap<u64, u64> = BTreeMap::new();
        for run in mh["models"][name]["runs"].as_array().unwrap() {
            let first = run[0].as_u64().unwrap();
            for (o, c) in run[1].as_array().unwrap().iter().enumerate() {
                let c = c.as_u64().unwrap();
                if c > 0 {
                    got.insert(first + o as u64, c);
                }
            }
        }
        assert_eq!(got, want, "magnitude_histogram of {name}");
        let entries: usize = ds[i].values().map(Vec::len).sum();
        assert_eq!(mh["models"][name]["entries"], entries as u64);
    }

    // TIES election on the trimmed, exp-weighted deltas (tensors under
    // 2048 elements are sampled whole).
    let norms: Vec<f64> = ds
        .iter()
        .map(|d| d.values().flatten().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mean = norms.iter().sum::<f64>() / k as f64;
    let raw: Vec<f64> = norms.iter().map(|l| (-l / mean).exp()).collect();
    let w: Vec<f64> = raw.iter().map(|x| x / raw.iter().sum::<f64>()).collect();
    let tensors: Vec<&String> = {
        let mut t: Vec<&String> = ds.iter().flat_map(|d| d.keys()).collect();
        t.sort();
        t.dedup();
        t
    };
    for (r, &rho) in DENSITIES.iter().enumerate() {
        let (mut mass, mut agree) = (0.0, 0.0);
        for name in &tensors {
            let stores: Vec<usize> = (0..k).filter(|&i| ds[i].contains_key(*name)).collect();
            let taus: Vec<f64> = stores.iter().map(|&i| tau(&ds[i][*name], rho)).collect();
            let n = ds[stores[0]][*name].len();
            assert!(n <= 2048, "test tensors are sampled whole");
            #[allow(clippy::needless_range_loop)]
            for e in 0..n {
                let v: Vec<f64> = stores
                    .iter()
                    .zip(&taus)
                    .map(|(&i, &t)| {
                        let d = ds[i][*name][e];
                        if d.abs() >= t {
                            w[i] * d
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let s: f64 = v.iter().sum();
                for &x in &v {
                    mass += x.abs();
                    if (s >= 0.0 && x > 0.0) || (s < 0.0 && x < 0.0) {
                        agree += x.abs();
                    }
                }
            }
        }
        let got = f(&a["ties_agreement"]["values"][r]);
        let want = agree / mass;
        assert!(
            (got - want).abs() <= 1e-9,
            "ties_agreement ρ {rho}: {got} vs {want}"
        );
    }

    // Suggestions: each rule applied to the numbers computed here.
    let s = &a["suggestions"];
    let live: Vec<usize> = (0..k).filter(|&i| norms[i] > 0.0).collect();
    let pairs: Vec<f64> = live
        .iter()
        .flat_map(|&i| live.iter().filter(move |&&j| j > i).map(move |&j| (i, j)))
        .map(|(i, j)| {
            let (_, _, w, wc) = signs(&ds[i], &ds[j]);
            if w > 0.0 {
                wc / w
            } else {
                0.0
            }
        })
        .collect();
    let conflict = pairs.iter().sum::<f64>() / pairs.len() as f64;
    let method = if pairs.is_empty() || conflict < 0.3 {
        "task_arithmetic"
    } else {
        "ties"
    };
    assert_eq!(s["method"]["value"], method);
    let density = DENSITIES
        .iter()
        .copied()
        .find(|&rho| {
            live.iter().all(|&i| {
                let total: f64 = ds[i].values().flatten().map(|x| x * x).sum();
                ds[i].values().map(|d| kept(d, rho)).sum::<f64>() / total >= 0.9
            })
        })
        .filter(|_| !live.is_empty())
        .unwrap_or(1.0);
    assert_eq!(f(&s["density"]["value"]), density);
    let lo = norms.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = norms.iter().copied().fold(0.0, f64::max);
    let mode = if lo == 0.0 || hi / lo >= 10.0 {
        "exp"
    } else {
        "linear"
    };
    assert_eq!(s["mode"]["value"], mode);
    assert!(s["flags"]
        .as_str()
        .unwrap()
        .contains(&format!("--method {method}")));
    for key in ["method", "density", "mode"] {
        assert!(!s[key]["reason"].as_str().unwrap().is_empty());
        assert!(!s[key]["rule"].as_str().unwrap().is_empty());
    }

    // The plots and the page.
    for png in [
        "sign_conflict.png",
        "cosine_by_layer.png",
        "trim_energy.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(
        html.matches("<img").count(),
        html.matches("src=\"data:image/png;base64,").count()
    );
    assert_eq!(html.matches("<img").count(), 4 + k, "every plot embedded");
    for forbidden in ["<script", "http://", "https://", "src=\"/", "src=\"."] {
        assert!(!html.contains(forbidden), "report.html holds {forbidden}");
    }
    for section in [
        "Summary",
        "Merge weights",
        "Suggestions",
        "top tensors by L2",
    ] {
        assert!(html.contains(section), "report.html lacks {section}");
    }
    for n in names {
        assert!(html.contains(n));
    }
}

#[test]
fn diagnostics_of_a_bf16_family_with_a_copy_of_the_base_and_a_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(Ty::BF16, false);
    let alpha = fine_tune(&base, 11, 0.02, Ty::BF16);
    let same = fine_tune(&base, 12, 0.0, Ty::BF16);
    let mut beta = fine_tune(&base, 13, 0.01, Ty::BF16);
    beta.retain(|t| t.name != "model.layers.0.mlp.up_proj.weight");
    // Against alpha: half its delta with the sign flipped, so conflicts
    // are many, plus noise.
    let anti: Vec<T> = base
        .iter()
        .zip(&alpha)
        .zip(fine_tune(&base, 14, 0.004, Ty::BF16))
        .map(|((b, a), n)| {
            let v = b
                .values
                .iter()
                .zip(&a.values)
                .zip(&n.values)
                .map(|((b, a), n)| b - 0.5 * (a - b) + (n - b))
                .collect();
            T::new(&b.name, Ty::BF16, &b.shape, v)
        })
        .collect();
    write_model(&dir.path().join("base"), &base, 1, false);
    let names = ["alpha", "same", "beta", "anti"];
    let models = [&alpha, &same, &beta, &anti];
    for (n, m) in names.iter().zip(models) {
        write_model(&dir.path().join(n), m, 1, false);
    }
    let out = analyze(dir.path(), &names);
    let ds: Vec<Deltas> = models.iter().map(|m| deltas(&base, m)).collect();
    check_diagnostics(&out, &names, &ds);
    let a = json(&out.join("analysis.json"));
    // The flipped model conflicts with alpha far more than chance.
    assert!(f(&a["sign_conflict"]["matrix"][0][3]) > 0.8);
}

/// Every fine-tune equal to the base: no flags are suggested (ta-merge
/// would refuse them: every norm is 0), and the analysis says why.
#[test]
fn no_merge_is_suggested_when_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(Ty::BF16, false);
    write_model(&dir.path().join("base"), &base, 1, false);
    for m in ["m0", "m1"] {
        write_model(
            &dir.path().join(m),
            &fine_tune(&base, 1, 0.0, Ty::BF16),
            1,
            false,
        );
    }
    let out = analyze(dir.path(), &["m0", "m1"]);
    let a = json(&out.join("analysis.json"));
    assert_eq!(a["suggestions"]["flags"], "");
    let reason = a["suggestions"]["method"]["reason"].as_str().unwrap();
    assert!(reason.contains("nothing to merge"), "{reason}");
}

#[test]
fn diagnostics_of_a_tied_f16_family() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(Ty::F16, true);
    let m0 = fine_tune(&base, 21, 0.01, Ty::F16);
    let m1 = fine_tune(&base, 22, 0.003, Ty::F32);
    write_model(&dir.path().join("base"), &base, 2, true);
    write_model(&dir.path().join("m0"), &m0, 1, true);
    write_model(&dir.path().join("m1"), &m1, 1, true);
    let out = analyze(dir.path(), &["m0", "m1"]);
    let ds = vec![deltas(&base, &m0), deltas(&base, &m1)];
    check_diagnostics(&out, &["m0", "m1"], &ds);
    let a = json(&out.join("analysis.json"));
    assert!(a["cosine_by_layer"]["groups"].get("lm_head").is_none());
}

#[test]
fn spectral_values_of_every_2d_tensor_match_an_exact_svd() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(Ty::BF16, false);
    let m0 = fine_tune(&base, 31, 0.02, Ty::BF16);
    let mut m1 = fine_tune(&base, 32, 0.01, Ty::BF16);
    m1.retain(|t| t.name != "model.layers.1.mlp.down_proj.weight");
    write_model(&dir.path().join("base"), &base, 1, false);
    write_model(&dir.path().join("m0"), &m0, 1, false);
    write_model(&dir.path().join("m1"), &m1, 1, false);
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let out = dir.path().join("stats");
    let o = run(
        "ta-analyze",
        &[
            "--base",
            &p("base"),
            "--models",
            &p("m0"),
            &p("m1"),
            "--outdir",
            &out.to_string_lossy(),
            "--quiet",
            "--spectral",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("spectral:"));
    let mut r = csv::Reader::from_path(out.join("spectral.csv")).unwrap();
    assert_eq!(
        r.headers().unwrap().iter().collect::<Vec<_>>(),
        [
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
            "energy_top128"
        ]
    );
    let mut seen = 0;
    let models = [("m0", &m0), ("m1", &m1)];
    for rec in r.records() {
        let rec = rec.unwrap();
        let (param, model) = (&rec[0], &rec[1]);
        let m = models.iter().find(|(n, _)| *n == model).unwrap().1;
        let d = &deltas(&base, m)[param];
        let shape = &base.iter().find(|t| t.name == param).unwrap().shape;
        assert_eq!(shape.len(), 2);
        assert_eq!(
            (&rec[2], &rec[3]),
            (&*shape[0].to_string(), &*shape[1].to_string())
        );
        let svd = nalgebra::DMatrix::from_row_slice(shape[0], shape[1], d).svd(false, false);
        let mut s: Vec<f64> = svd.singular_values.iter().copied().collect();
        s.sort_by(|x, y| y.total_cmp(x));
        let fro2: f64 = d.iter().map(|x| x * x).sum();
        let top = |k: usize| s.iter().take(k).map(|x| x * x).sum::<f64>() / fro2;
        let got = |c: usize| rec[c].parse::<f64>().unwrap();
        assert!((got(4) - fro2.sqrt()).abs() <= 1e-9 * fro2.sqrt());
        assert!(
            (got(5) - s[0]).abs() <= 1e-6 * s[0],
            "{param}: σ1 {} vs {}",
            got(5),
            s[0]
        );
        assert!((got(6) - fro2 / (s[0] * s[0])).abs() <= 1e-6 * got(6));
        for (c, k) in [(7, 1), (8, 8), (9, 32), (10, 128)] {
            assert!((got(c) - top(k)).abs() <= 0.01, "{param} top{k}");
        }
        seen += 1;
    }
    // Every 2-D tensor of each model, the missing one left out.
    let two_d = base.iter().filter(|t| t.shape.len() == 2).count();
    assert_eq!(seen, 2 * two_d - 1);
    let a = json(&out.join("analysis.json"));
    assert!(a["spectral"]["medians_by_group"]["layer_0"]["m0"]["stable_rank"].is_number());
    assert_eq!(
        &std::fs::read(out.join("spectral.png")).unwrap()[1..4],
        b"PNG"
    );
}
