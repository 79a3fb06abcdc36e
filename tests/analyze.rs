//! End-to-end tests of `ta-analyze`: every number it writes is checked
//! against a straightforward f64 computation in this file.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// numpy's linear interpolation (as `np.quantile` uses it).
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

const LEVELS: [f64; 11] = [
    0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 100.0,
];

/// Reference statistics of one delta, by the definitions in the docs.
#[derive(Debug)]
struct Ref {
    l2: f64,
    l1: f64,
    maxabs: f64,
    mean: f64,
    std: f64,
    skew: f64,
    kurt: f64,
    q: Vec<f64>,
    sum_sq: f64,
    zeros: usize,
}

fn reference(d: &[f64]) -> Ref {
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = if d.len() > 1 {
        d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let std = var.sqrt();
    let (skew, kurt) = if std == 0.0 {
        (0.0, 0.0)
    } else {
        let z = |x: f64| (x - mean) / (std + 1e-12);
        (
            d.iter().map(|&x| z(x).powi(3)).sum::<f64>() / n,
            d.iter().map(|&x| z(x).powi(4)).sum::<f64>() / n - 3.0,
        )
    };
    let mut s = d.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = LEVELS
        .iter()
        .map(|p| {
            let pos = p / 100.0 * (n - 1.0);
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(s.len() - 1);
            lerp(s[lo], s[hi], pos - lo as f64)
        })
        .collect();
    let sum_sq = d.iter().map(|x| x * x).sum::<f64>();
    Ref {
        l2: sum_sq.sqrt(),
        l1: d.iter().map(|x| x.abs()).sum(),
        maxabs: d.iter().fold(0.0, |m: f64, x| m.max(x.abs())),
        mean,
        std,
        skew,
        kurt,
        q,
        sum_sq,
        zeros: d.iter().filter(|&&x| x == 0.0).count(),
    }
}

/// √Σd² over a model's deltas.
fn global_norm(d: &BTreeMap<String, Vec<f64>>) -> f64 {
    d.values().flatten().map(|x| x * x).sum::<f64>().sqrt()
}

/// Merge weights from norms by the formulas (alpha 1.5, beta 1), normalised.
fn reference_weights(norms: &[f64], mode: &str) -> Vec<f64> {
    let mean = norms.iter().sum::<f64>() / norms.len() as f64;
    let raw: Vec<f64> = norms
        .iter()
        .map(|&l| match mode {
            "linear" => 1.0 / l,
            "power" => l.powf(-1.5),
            _ => (-l / mean).exp(),
        })
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|w| w / total).collect()
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got - want).abs() <= rel * want.abs() || (got - want).abs() <= abs
}

fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let headers: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    r.records()
        .map(|rec| {
            headers
                .iter()
                .cloned()
                .zip(rec.unwrap().iter().map(str::to_string))
                .collect()
        })
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A tensor's delta with the base values it was taken from.
struct Delta {
    name: String,
    shape: Vec<usize>,
    d: Vec<f64>,
    base: Vec<f64>,
}

/// Tensors of the base that `model` can be compared on (same name, shape,
/// float type), with their deltas.
fn deltas(base: &[T], model: &[T]) -> Vec<Delta> {
    base.iter()
        .filter(|b| b.ty != Ty::I64)
        .filter_map(|b| {
            let m = model
                .iter()
                .find(|m| m.name == b.name && m.shape == b.shape)?;
            let d = m.values.iter().zip(&b.values).map(|(m, b)| m - b).collect();
            Some(Delta {
                name: b.name.clone(),
                shape: b.shape.clone(),
                d,
                base: b.values.clone(),
            })
        })
        .collect()
}

/// Checks one model's CSV and summary against the reference and returns
/// its (name -> delta) map for cosine checks.
fn check_model(
    out: &Path,
    name: &str,
    base: &[T],
    model: &[T],
    expect_skipped: usize,
) -> BTreeMap<String, Vec<f64>> {
    let ds = deltas(base, model);
    let rows = read_csv(&out.join(name).join("per_param_stats.csv"));
    assert_eq!(rows.len(), ds.len(), "{name}: rows");
    let cols = [
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
    ];
    let header: Vec<String> = csv::Reader::from_path(out.join(name).join("per_param_stats.csv"))
        .unwrap()
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(&header[..cols.len()], cols);
    let mut total_sq = 0.0;
    let mut total_l1 = 0.0;
    let mut base_sq = 0.0;
    let mut zeros = 0;
    let mut elements = 0;
    let mut groups: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
    let mut kinds: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
    let by_name: BTreeMap<&str, &BTreeMap<String, String>> =
        rows.iter().map(|r| (r["param"].as_str(), r)).collect();
    assert_eq!(by_name.len(), rows.len(), "{name}: one row per tensor");
    for Delta {
        name: tname,
        shape,
        d,
        base: b,
    } in &ds
    {
        let row = by_name
            .get(tname.as_str())
            .unwrap_or_else(|| panic!("{name}: no row for {tname}"));
        let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
        assert_eq!(row["shape"], format!("[{}]", dims.join(", ")));
        let r = reference(d);
        let f = |k: &str| row[k].parse::<f64>().unwrap();
        for (k, want) in [
            ("l2", r.l2),
            ("l1", r.l1),
            ("maxabs", r.maxabs),
            ("mean", r.mean),
            ("std", r.std),
        ] {
            assert!(
                close(f(k), want, 1e-6, 1e-9),
                "{name}/{tname}/{k}: {} vs {want}",
                f(k)
            );
        }
        assert!(
            close(f("skew"), r.skew, 1e-4, 1e-4),
            "{name}/{tname}/skew: {} vs {}",
            f("skew"),
            r.skew
        );
        assert!(
            close(f("kurtosis_excess"), r.kurt, 1e-4, 1e-4),
            "{name}/{tname}/kurt: {} vs {}",
            f("kurtosis_excess"),
            r.kurt
        );
        for (lvl, want) in cols[9..].iter().zip(&r.q) {
            assert_eq!(f(lvl), *want, "{name}/{tname}/{lvl} must be exact");
        }
        assert_eq!(f("numel") as usize, d.len());
        assert_eq!(f("unchanged") as usize, r.zeros);
        total_sq += r.sum_sq;
        total_l1 += r.l1;
        base_sq += b.iter().map(|x| x * x).sum::<f64>();
        zeros += r.zeros;
        elements += d.len();
        let g = if tname.contains("embed") {
            "embed".to_string()
        } else if tname.contains("lm_head") {
            "lm_head".to_string()
        } else if let Some(rest) = tname.strip_prefix("model.layers.") {
            format!("layer_{}", rest.split('.').next().unwrap())
        } else {
            "other".to_string()
        };
        let e = groups.entry(g).or_default();
        e.0 += r.sum_sq;
        e.1 += r.l1;
        e.2 += d.len();
        // The test families' names, by kind of module.
        let kind = ["embed", "lm_head", "norm", "self_attn", "mlp"]
            .into_iter()
            .find(|k| tname.contains(k))
            .map_or("other", |k| if k == "self_attn" { "attention" } else { k });
        let e = kinds.entry(kind.to_string()).or_default();
        e.0 += r.sum_sq;
        e.1 += r.l1;
        e.2 += d.len();
    }
    let s = json(&out.join(name).join("summary.json"));
    let gl2 = s["global_l2"].as_f64().unwrap();
    assert!(
        close(gl2, total_sq.sqrt(), 1e-9, 1e-12),
        "{name}: global_l2 {gl2} vs {}",
        total_sq.sqrt()
    );
    assert!(close(
        s["global_l1"].as_f64().unwrap(),
        total_l1,
        1e-9,
        1e-12
    ));
    assert_eq!(
        s["n_params_considered"].as_u64().unwrap() as usize,
        ds.len()
    );
    assert_eq!(
        s["skipped_params"].as_u64().unwrap() as usize,
        expect_skipped,
        "{name}: {}",
        s["skipped"]
    );
    assert_eq!(s["skipped"].as_array().unwrap().len(), expect_skipped);
    assert_eq!(s["total_elements"].as_u64().unwrap() as usize, elements);
    assert!(close(
        s["base_global_l2"].as_f64().unwrap(),
        base_sq.sqrt(),
        1e-9,
        1e-12
    ));
    assert!(close(
        s["relative_change"].as_f64().unwrap(),
        total_sq.sqrt() / base_sq.sqrt(),
        1e-9,
        1e-15
    ));
    assert!(close(
        s["unchanged_fraction"].as_f64().unwrap(),
        zeros as f64 / elements as f64,
        1e-12,
        1e-15
    ));
    let got_groups = s["groups"].as_object().unwrap();
    assert_eq!(
        got_groups.len(),
        groups.len(),
        "{name}: groups {got_groups:?}"
    );
    for (g, (sq, l1, count)) in &groups {
        let v = &got_groups[g];
        assert!(
            close(v["l2"].as_f64().unwrap(), sq.sqrt(), 1e-9, 1e-12),
            "{name}/{g}"
        );
        assert!(close(v["l1"].as_f64().unwrap(), *l1, 1e-9, 1e-12));
        assert_eq!(v["param_count_approx"].as_u64().unwrap() as usize, *count);
    }
    let modules = s["modules"].as_object().unwrap();
    let module_sq: f64 = modules
        .values()
        .map(|v| v["l2"].as_f64().unwrap().powi(2))
        .sum();
    assert!(
        close(module_sq, total_sq, 1e-9, 1e-15),
        "modules partition the tensors"
    );
    assert_eq!(modules.len(), kinds.len(), "{name}: modules {modules:?}");
    for (kind, (sq, l1, count)) in &kinds {
        let v = &modules[kind];
        assert!(
            close(v["l2"].as_f64().unwrap(), sq.sqrt(), 1e-9, 1e-12),
            "{name}/{kind}"
        );
        assert!(
            close(v["l1"].as_f64().unwrap(), *l1, 1e-9, 1e-12),
            "{name}/{kind}"
        );
        assert_eq!(v["param_count_approx"].as_u64().unwrap() as usize, *count);
    }
    ds.into_iter().map(|x| (x.name, x.d)).collect()
}

/// Checks pairwise_cosines.csv against Σ d_i·d_j / (|d_i| |d_j|).
fn check_cosines(out: &Path, names: &[&str], deltas: &[BTreeMap<String, Vec<f64>>]) {
    let text = std::fs::read_to_string(out.join("pairwise_cosines.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), format!(",{}", names.join(",")));
    let matrix = json(&out.join("analysis.json"))["pairwise_cosines"]["matrix"].clone();
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], names[i]);
        for (j, cell) in cells[1..].iter().enumerate() {
            let dot: f64 = deltas[i]
                .iter()
                .filter_map(|(t, di)| {
                    deltas[j]
                        .get(t)
                        .map(|dj| di.iter().zip(dj).map(|(a, b)| a * b).sum::<f64>())
                })
                .sum();
            let denom = global_norm(&deltas[i]) * global_norm(&deltas[j]);
            let want = if denom > 0.0 { dot / denom } else { 0.0 };
            let got: f64 = cell.parse().unwrap();
            let in_json = matrix[i][j].as_f64().unwrap();
            assert!(
                (in_json - want).abs() <= 1e-9,
                "analysis.json cos({i},{j}) = {in_json}"
            );
            assert!(
                (got - want).abs() <= 1e-9,
                "cos({},{}) = {got}, want {want}",
                names[i],
                names[j]
            );
        }
    }
}

fn analyze(dir: &Path, models: &[&str], extra: &[&str]) -> std::process::Output {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let out = p("stats");
    let mut args = vec!["--base".to_string(), p("base"), "--models".to_string()];
    args.extend(models.iter().map(|m| p(m)));
    args.extend(["--outdir".to_string(), out, "--quiet".to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("ta-analyze", &args)
}

#[test]
fn bf16_family_statistics_cosines_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = base_tensors(Ty::BF16, false);
    // Deltas f32 cannot tell apart: 0.5 and 0.5 ± 2^-40 (exact in f64) all
    // round to 0.5 in f32, so their order must come from their true values;
    // in a tensor large enough for the radix path and in a small one.
    let tiny = 2f64.powi(-40);
    let tie_tensors = [
        ("model.ties_big.weight", 70_000),
        ("model.ties_small.weight", 300),
    ];
    for (name, n) in tie_tensors {
        let values = (0..n).map(|i| [0.25, -tiny, tiny][i % 3]).collect();
        base.push(T::new(name, Ty::BF16, &[n], values));
    }
    let mut models = [
        fine_tune(&base, 1, 0.02, Ty::BF16),
        fine_tune(&base, 2, 0.0, Ty::BF16),
        fine_tune(&base, 3, 0.005, Ty::BF16),
    ];
    for (name, n) in tie_tensors {
        let t = models[0].iter_mut().find(|t| t.name == name).unwrap();
        *t = T::new(
            name,
            Ty::BF16,
            &[n],
            (0..n).map(|i| [0.75, 0.5, 0.5][i % 3]).collect(),
        );
    }
    write_model(&dir.path().join("base"), &base, 1, false);
    let names = ["alpha", "same", "gamma"];
    for (n, m) in names.iter().zip(&models) {
        write_model(&dir.path().join(n), m, 1, false);
    }
    let o = analyze(dir.path(), &names, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("stats");
    let ds: Vec<_> = names
        .iter()
        .zip(&models)
        .map(|(n, m)| check_model(&out, n, &base, m, 0))
        .collect();
    check_cosines(&out, &names, &ds);

    // The identical fine-tune: a zero task vector.
    let same = json(&out.join("same/summary.json"));
    assert_eq!(same["global_l2"], 0.0);
    assert_eq!(same["unchanged_fraction"], 1.0);

    // Top-50 files: the 50 largest rows, descending.
    for (file, key) in [("top50_by_l2.csv", "l2"), ("top50_by_maxabs.csv", "maxabs")] {
        let all = read_csv(&out.join("alpha/per_param_stats.csv"));
        let top = read_csv(&out.join("alpha").join(file));
        let mut want: Vec<f64> = all.iter().map(|r| r[key].parse().unwrap()).collect();
        want.sort_by(|a, b| b.partial_cmp(a).unwrap());
        want.truncate(50);
        let got: Vec<f64> = top.iter().map(|r| r[key].parse().unwrap()).collect();
        assert_eq!(got, want, "{file}");
    }

    // analysis.json: the cosines, and each mode's weights from the norms.
    let a = json(&out.join("analysis.json"));
    let norms: Vec<f64> = names
        .iter()
        .map(|n| {
            json(&out.join(n).join("summary.json"))["global_l2"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let want = reference_weights(&norms, "exp");
    for (i, n) in names.iter().enumerate() {
        let got = a["merge_weights"]["modes"]["exp"][n].as_f64().unwrap();
        assert!((got - want[i]).abs() < 1e-12, "{n}: {got}");
    }
    assert!(a["merge_weights"]["modes"]["linear"]["error"]
        .as_str()
        .unwrap()
        .contains("'same'"));
    assert_eq!(a["pairwise_cosines"]["names"][2], "gamma");
    for png in ["pairwise_cosines.png", "alpha/group_l2_bar.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    assert!(stdout(&o).contains("alpha") && stdout(&o).contains("global L2"));
}

#[test]
fn f32_sharded_with_missing_mismatched_extra_and_integer_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = base_tensors(Ty::F32, false);
    base.push(T::new(
        "model.position_ids",
        Ty::I64,
        &[4],
        vec![0.0, 1.0, 2.0, 3.0],
    ));
    let floats = &base[..base.len() - 1];
    let m0 = fine_tune(floats, 5, 0.01, Ty::F32);
    let mut m1 = fine_tune(floats, 6, 0.03, Ty::BF16);
    m1.retain(|t| t.name != "model.layers.0.mlp.up_proj.weight");
    m1[0] = T::new(&m1[0].name, Ty::BF16, &[40, 16], noise(9, 640, 0.05));
    m1.push(T::new("model.extra.weight", Ty::BF16, &[2], vec![1.0, 2.0]));
    write_model(&dir.path().join("base"), &base, 3, false);
    write_model(&dir.path().join("m0"), &m0, 2, false);
    write_model(&dir.path().join("m1"), &m1, 1, false);
    let o = analyze(dir.path(), &["m0", "m1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("stats");
    // m0 skips the integer tensor; m1 also the missing, the resized and the extra one.
    let d0 = check_model(&out, "m0", &base, &m0, 1);
    let d1 = check_model(&out, "m1", &base, &m1, 4);
    let norms = [global_norm(&d0), global_norm(&d1)];
    check_cosines(&out, &["m0", "m1"], &[d0, d1]);
    // Every mode's weights in analysis.json, from these norms.
    let a = json(&out.join("analysis.json"));
    for mode in ["linear", "power", "exp"] {
        let want = reference_weights(&norms, mode);
        for (i, name) in ["m0", "m1"].iter().enumerate() {
            let got = a["merge_weights"]["modes"][mode][name].as_f64().unwrap();
            assert!(
                (got - want[i]).abs() < 1e-12,
                "{mode}/{name}: {got} vs {}",
                want[i]
            );
        }
    }
    let s = json(&out.join("m1/summary.json"));
    let reasons: Vec<String> = s["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{} {}", v["param"], v["reason"]))
        .collect();
    let all = reasons.join("\n");
    assert!(
        all.contains("model.layers.0.mlp.up_proj.weight\" \"missing"),
        "{all}"
    );
    assert!(all.contains("[40, 16]"), "{all}");
    assert!(
        all.contains("model.extra.weight\" \"not in the base"),
        "{all}"
    );
    assert!(all.contains("model.position_ids\" \"not a float"), "{all}");
}

#[test]
fn tiny_tied_f16_family_and_the_tied_lm_head_switch() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = base_tensors(Ty::F16, true);
    // 1-D and very small tensors, where interpolation matters, and ties.
    base.push(T::new("model.scale", Ty::F16, &[1], vec![0.5]));
    base.push(T::new("model.pair", Ty::F16, &[2], vec![0.25, -0.5]));
    base.push(T::new("model.tri", Ty::F16, &[3], vec![1.0, 2.0, 3.0]));
    base.push(T::new("model.flat", Ty::F16, &[101], vec![0.125; 101]));
    let mut m = fine_tune(&base, 4, 0.01, Ty::F16);
    let n = m.len();
    m[n - 1] = T::new(
        "model.flat",
        Ty::F16,
        &[101],
        (0..101)
            .map(|i| 0.125 + [0.0, 0.25, -0.25][i % 3])
            .collect(),
    );
    write_model(&dir.path().join("base"), &base, 2, true);
    write_model(&dir.path().join("ft"), &m, 1, true);
    let o = analyze(dir.path(), &["ft"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("stats");
    let d = check_model(&out, "ft", &base, &m, 0);
    let s = json(&out.join("ft/summary.json"));
    assert_eq!(s["tied_embeddings"], true);
    assert_eq!(s["lm_head_counted_twice"], false);

    // The original's numbers: the tied matrix counted a second time.
    let o = analyze(dir.path(), &["ft"], &["--count-tied-lm-head"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s2 = json(&out.join("ft/summary.json"));
    let embed_sq: f64 = d["model.embed_tokens.weight"].iter().map(|x| x * x).sum();
    let all_sq: f64 = d.values().flatten().map(|x| x * x).sum();
    assert!(close(
        s2["global_l2"].as_f64().unwrap(),
        (all_sq + embed_sq).sqrt(),
        1e-9,
        0.0
    ));
    assert!(close(
        s2["groups"]["lm_head"]["l2"].as_f64().unwrap(),
        embed_sq.sqrt(),
        1e-9,
        0.0
    ));
    let rows = read_csv(&out.join("ft/per_param_stats.csv"));
    assert_eq!(rows.last().unwrap()["param"], "lm_head.weight");
}

#[test]
fn analysis_feeds_the_merge_and_names_must_be_unique() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(Ty::BF16, false);
    write_model(&dir.path().join("base"), &base, 1, false);
    let m0 = fine_tune(&base, 7, 0.02, Ty::BF16);
    let m1 = fine_tune(&base, 8, 0.004, Ty::BF16);
    write_model(&dir.path().join("a/ft"), &m0, 1, false);
    write_model(&dir.path().join("b/ft"), &m1, 1, false);

    let o = analyze(dir.path(), &["a/ft", "b/ft"], &[]);
    assert_one_line_error(&o, &["both named 'ft'", "--names"]);
    assert!(!dir.path().join("stats").exists());

    let o = analyze(dir.path(), &["a/ft", "b/ft"], &["--names", "math", "chat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats = dir.path().join("stats");
    let d0 = check_model(&stats, "math", &base, &m0, 0);
    let d1 = check_model(&stats, "chat", &base, &m1, 0);
    let lambdas = reference_weights(&[global_norm(&d0), global_norm(&d1)], "exp");

    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let merged = p("merged");
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &p("base"),
            "--other-model-paths",
            &p("a/ft"),
            &p("b/ft"),
            "--names",
            "math",
            "chat",
            "--from-analysis",
            &p("stats"),
            "--output-path",
            &merged,
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let record = json(&Path::new(&merged).join("merge_record.json"));
    for i in 0..2 {
        let got = record["models"][i]["lambda"].as_f64().unwrap();
        assert!(
            (got - lambdas[i]).abs() < 1e-9,
            "λ{i} {got} vs {}",
            lambdas[i]
        );
    }
    // Without --names the basenames do not match the analysis folders.
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &p("base"),
            "--other-model-paths",
            &p("a/ft"),
            "--from-analysis",
            &p("stats"),
            "--output-path",
            &p("merged2"),
        ],
    );
    assert_one_line_error(&o, &["--from-analysis", "'ft'"]);
    assert!(!dir.path().join("merged2").exists());

    // Re-running into a previous analysis replaces it; a foreign folder needs --force.
    let o = analyze(dir.path(), &["a/ft", "b/ft"], &["--names", "math", "chat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(stats.join("analysis.json")).unwrap();
    std::fs::remove_file(stats.join("pairwise_cosines.csv")).unwrap();
    let o = analyze(dir.path(), &["a/ft", "b/ft"], &["--names", "math", "chat"]);
    assert_one_line_error(&o, &["--outdir", "--force"]);
    let o = analyze(
        dir.path(),
        &["a/ft", "b/ft"],
        &["--names", "math", "chat", "--force"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn pytorch_pickle_checkpoints_are_read_tensor_by_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // A tied base: lm_head.weight is a second name for the embedding.
    let base = base_tensors(Ty::BF16, true);
    let ft = fine_tune(&base, 11, 0.02, Ty::BF16);
    let tie = [("lm_head.weight", "model.embed_tokens.weight")];
    std::fs::create_dir_all(dir.path().join("base")).unwrap();
    write_pth(&dir.path().join("base/pytorch_model.bin"), &base, &tie);
    std::fs::create_dir_all(dir.path().join("ft")).unwrap();
    write_pth(&dir.path().join("ft/pytorch_model.bin"), &ft, &tie);
    // The same fine-tune as safetensors, and as a bare .pt file.
    write_model(&dir.path().join("ft_st"), &ft, 1, true);
    // A file given directly protects its folder: keep it apart from outputs.
    std::fs::create_dir_all(dir.path().join("pt")).unwrap();
    write_pth(&dir.path().join("pt/ft.pt"), &ft, &[]);

    let o = analyze(dir.path(), &["ft", "ft_st", "pt/ft.pt"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("stats");
    for name in ["ft", "ft_st", "ft.pt"] {
        // The shared matrix is counted once, like the safetensors copy.
        check_model(&out, name, &base, &ft, 0);
    }

    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let merged = p("merged");
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &p("base"),
            "--other-model-paths",
            &p("pt/ft.pt"),
            "--lambdas",
            "0.5",
            "--output-path",
            &merged,
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m = read_model(Path::new(&merged));
    assert!(!m.contains_key("lm_head.weight"));
    for t in &base {
        let f = ft.iter().find(|f| f.name == t.name).unwrap();
        let got = Ty::BF16.decode(&m[&t.name].bytes);
        for (j, g) in got.iter().enumerate() {
            let exact = t.values[j] + 0.5 * (f.values[j] - t.values[j]);
            let want = Ty::BF16.decode(&Ty::BF16.round(exact))[0];
            assert!(
                *g == want || (exact - (g + want) / 2.0).abs() <= 1e-12 * exact.abs(),
                "{}[{j}]",
                t.name
            );
        }
    }
}
