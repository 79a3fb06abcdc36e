//! End-to-end tests of ta-merge's merge methods. Each method's output is
//! compared, element by element, with a straightforward f64 reference
//! written here from the methods' definitions (full sorts instead of radix
//! selection, one whole tensor at a time), correctly rounded by the test's
//! own nearest-value search. DARE's and DELLA's masks come from the
//! documented generator: SplitMix64 keyed by SHA-256(seed ‖ model ‖ name).

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// A family on disk and its values.
struct Fam {
    dir: tempfile::TempDir,
    base: Vec<T>,
    models: Vec<Vec<T>>,
}

impl Fam {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
    fn models(&self) -> Vec<String> {
        (0..self.models.len())
            .map(|i| self.path(&format!("m{i}")))
            .collect()
    }
    /// Tensor names in the base's storage order.
    fn storage_order(&self) -> Vec<String> {
        storage_order(&self.dir.path().join("base"))
    }
}

/// A base with the common tensors plus one of 12 × 1000 elements (several
/// blocks), and fine-tunes of the given noise scales.
fn fam(ty: Ty, shards: usize, tied: bool, scales: &[f64]) -> Fam {
    fam_with(ty, shards, tied, scales, &[12, 1000])
}

/// [`fam`] with the extra tensor of shape `big`.
fn fam_with(ty: Ty, shards: usize, tied: bool, scales: &[f64], big: &[usize]) -> Fam {
    let dir = tempfile::tempdir().unwrap();
    let mut base = base_tensors(ty, tied);
    base.push(T::new(
        "model.layers.1.mlp.gate_proj.weight",
        ty,
        big,
        noise(99, big.iter().product(), 0.05),
    ));
    write_model(&dir.path().join("base"), &base, shards, tied);
    write_side_files(&dir.path().join("base"));
    let models: Vec<Vec<T>> = scales
        .iter()
        .enumerate()
        .map(|(i, &s)| fine_tune(&base, i as u64 + 20, s, ty))
        .collect();
    for (i, m) in models.iter().enumerate() {
        write_model(&dir.path().join(format!("m{i}")), m, shards, tied);
    }
    Fam { dir, base, models }
}

/// Runs ta-merge on `f` into `out` with `extra` flags.
fn merge_output(f: &Fam, out: &Path, extra: &[&str]) -> std::process::Output {
    let base = f.path("base");
    let models = f.models();
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["--base-model-path", &base, "--other-model-paths"];
    args.extend(models.iter().map(String::as_str));
    args.extend(["--output-path", &out_s, "--quiet"]);
    args.extend_from_slice(extra);
    run("ta-merge", &args)
}

/// [`merge_output`], panicking on failure.
fn merge(f: &Fam, out: &Path, extra: &[&str]) {
    let o = merge_output(f, out, extra);
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
}

/// Runs ta-analyze on `f` into `stats`; panics on failure.
fn analyse(f: &Fam, stats: &Path) {
    let base = f.path("base");
    let models = f.models();
    let stats_s = stats.to_string_lossy().into_owned();
    let mut args = vec!["--base", &base, "--models"];
    args.extend(models.iter().map(String::as_str));
    args.extend(["--outdir", &stats_s, "--quiet"]);
    let o = run("ta-analyze", &args);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Compares the merged folder with `want` (exact merged values per
/// tensor, base order): every element must be the correctly rounded value,
/// except one unit in the last place at a tie (within f64 rounding).
fn check(out: &Path, base: &[T], want: &BTreeMap<String, Vec<f64>>) {
    let merged = read_model(out);
    assert_eq!(merged.len(), base.len());
    let (mut checked, mut ties) = (0, 0);
    for b in base {
        let got = &merged[&b.name];
        assert_eq!(got.ty, b.ty, "{}", b.name);
        let bits = b.ty.bits(&got.bytes);
        let values = b.ty.decode(&got.bytes);
        for (j, &exact) in want[&b.name].iter().enumerate() {
            let rounded = b.ty.round(exact);
            let want_bits = b.ty.bits(&rounded)[0];
            let diff = (bits[j] - want_bits).abs();
            assert!(diff <= 1, "{}[{j}]: got {} want {exact}", b.name, values[j]);
            if diff == 1 {
                let mid = (b.ty.decode(&rounded)[0] + values[j]) / 2.0;
                assert!(
                    (exact - mid).abs() <= 1e-12 * exact.abs().max(1e-30),
                    "{}[{j}]: got {} want {exact}: not a tie",
                    b.name,
                    values[j]
                );
                ties += 1;
            }
            checked += 1;
        }
    }
    assert!(
        checked > 0 && ties * 100 <= checked,
        "{ties} ties of {checked}"
    );
}

// ---- the reference: each method from its definition, in f64 ----

fn deltas(f: &Fam, name: &str) -> (Vec<f64>, Vec<Vec<f64>>) {
    let b = &f.base.iter().find(|t| t.name == name).unwrap().values;
    let ds = f
        .models
        .iter()
        .map(|m| {
            let m = &m.iter().find(|t| t.name == name).unwrap().values;
            m.iter().zip(b).map(|(m, b)| m - b).collect()
        })
        .collect();
    (b.clone(), ds)
}

/// Indices by |d| descending, equal magnitudes in index order.
fn by_magnitude(d: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by(|&a, &b| d[b].abs().total_cmp(&d[a].abs()).then(a.cmp(&b)));
    idx
}

fn top_k_mask(d: &[f64], k: usize) -> Vec<bool> {
    let mut keep = vec![false; d.len()];
    for &i in by_magnitude(d).iter().take(k) {
        keep[i] = true;
    }
    keep
}

fn ties_k(n: usize, rho: f64) -> usize {
    if rho >= 1.0 {
        n
    } else {
        (((rho * n as f64).floor()) as usize).max(1)
    }
}

/// The documented draws of `model` for tensor `name`.
fn draws(seed: u64, model: usize, name: &str, n: usize) -> Vec<f64> {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update((model as u64).to_le_bytes());
    h.update(name.as_bytes());
    let mut state = u64::from_le_bytes(h.finalize()[..8].try_into().unwrap());
    (0..n)
        .map(|_| {
            // SplitMix64, step by step.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 12) as f64 / (1u64 << 52) as f64
        })
        .collect()
}

/// Sign election and sum (mergekit's generalised task arithmetic).
fn combine(b: &[f64], v: &[Vec<f64>], w: &[f64], elect: bool, normalize: bool) -> Vec<f64> {
    (0..b.len())
        .map(|j| {
            let (mut delta, mut div);
            if elect {
                let s: f64 = v.iter().map(|v| v[j]).sum();
                delta = 0.0;
                div = 0.0;
                for (vi, wi) in v.iter().zip(w) {
                    if (s >= 0.0 && vi[j] > 0.0) || (s < 0.0 && vi[j] < 0.0) {
                        delta += vi[j];
                        div += wi;
                    }
                }
                if div == 0.0 {
                    div = 1.0;
                }
            } else {
                delta = v.iter().map(|v| v[j]).sum();
                div = w.iter().sum();
                if div.abs() < 1e-8 {
                    div = 1.0;
                }
            }
            if normalize {
                delta /= div;
            }
            b[j] + delta
        })
        .collect()
}

fn weighted(d: &[f64], keep: &[bool], w: f64) -> Vec<f64> {
    d.iter()
        .zip(keep)
        .map(|(d, &k)| if k { w * d } else { 0.0 })
        .collect()
}

const W: [f64; 3] = [0.5, 0.3, 0.2];
const SCALES: [f64; 3] = [0.01, 0.02, 0.005];

fn each_tensor(
    f: &Fam,
    mut merged: impl FnMut(&str, &[f64], &[Vec<f64>]) -> Vec<f64>,
) -> BTreeMap<String, Vec<f64>> {
    f.base
        .iter()
        .map(|t| {
            let (b, ds) = deltas(f, &t.name);
            (t.name.clone(), merged(&t.name, &b, &ds))
        })
        .collect()
}

fn weights_flag() -> Vec<String> {
    W.iter().map(|w| w.to_string()).collect()
}

fn run_method(f: &Fam, out: &Path, method: &str, extra: &[&str]) {
    let w = weights_flag();
    let mut args = vec!["--method", method, "--lambdas"];
    args.extend(w.iter().map(String::as_str));
    args.extend_from_slice(extra);
    merge(f, out, &args);
}

#[test]
fn ties_and_magnitude_prune_match_the_reference_on_every_type() {
    for (ty, shards, tied) in [
        (Ty::BF16, 1, false),
        (Ty::F16, 2, true),
        (Ty::F32, 3, false),
    ] {
        let f = fam(ty, shards, tied, &SCALES);
        for (method, elect, normalize) in [("ties", true, true), ("magnitude_prune", false, false)]
        {
            let out = f.dir.path().join(format!("out-{method}"));
            run_method(&f, &out, method, &["--density", "0.3"]);
            let want = each_tensor(&f, |_, b, ds| {
                let v: Vec<Vec<f64>> = ds
                    .iter()
                    .zip(W)
                    .map(|(d, w)| weighted(d, &top_k_mask(d, ties_k(d.len(), 0.3)), w))
                    .collect();
                combine(b, &v, &W, elect, normalize)
            });
            check(&out, &f.base, &want);
        }
    }
}

#[test]
fn ties_with_scale_per_model_density_and_no_normalize() {
    let f = fam(Ty::BF16, 2, false, &SCALES);
    let out = f.dir.path().join("out");
    let dens = [0.1, 0.5, 0.9];
    run_method(
        &f,
        &out,
        "ties",
        &[
            "--density",
            "0.1",
            "0.5",
            "0.9",
            "--scale",
            "0.7",
            "--no-normalize",
        ],
    );
    let want = each_tensor(&f, |_, b, ds| {
        let v: Vec<Vec<f64>> = ds
            .iter()
            .zip(W)
            .zip(dens)
            .map(|((d, w), r)| weighted(d, &top_k_mask(d, ties_k(d.len(), r)), w))
            .collect();
        let m = combine(b, &v, &W, true, false);
        m.iter().zip(b).map(|(m, b)| b + 0.7 * (m - b)).collect()
    });
    check(&out, &f.base, &want);
}

#[test]
fn breadcrumbs_drop_outliers_then_keep_the_density() {
    let f = fam(Ty::BF16, 1, true, &SCALES);
    for (method, elect) in [("breadcrumbs", false), ("breadcrumbs_ties", true)] {
        let out = f.dir.path().join(format!("out-{method}"));
        // gamma 0.8 with density 0.3 overlaps: the top part shrinks to 0.7n.
        for (gamma, rho) in [("0.05", 0.3), ("0.8", 0.3)] {
            let _ = std::fs::remove_dir_all(&out);
            run_method(&f, &out, method, &["--density", "0.3", "--gamma", gamma]);
            let g: f64 = gamma.parse().unwrap();
            let want = each_tensor(&f, |_, b, ds| {
                let v: Vec<Vec<f64>> = ds
                    .iter()
                    .zip(W)
                    .map(|(d, w)| {
                        let n = d.len();
                        let keep_n = (rho * n as f64).floor() as usize;
                        let top = ((g * n as f64).floor() as usize).min(n - keep_n);
                        let mut keep = vec![false; n];
                        for &i in &by_magnitude(d)[top..top + keep_n] {
                            keep[i] = true;
                        }
                        weighted(d, &keep, w)
                    })
                    .collect();
                combine(b, &v, &W, elect, false)
            });
            check(&out, &f.base, &want);
        }
    }
}

#[test]
fn dare_masks_follow_the_documented_generator_and_rescale() {
    let f = fam(Ty::F32, 2, false, &SCALES);
    for (method, elect, rescale) in [
        ("dare_linear", false, "inverse"),
        ("dare_ties", true, "inverse"),
        ("dare_linear", false, "l1"),
        ("dare_ties", true, "none"),
    ] {
        let out = f.dir.path().join(format!("out-{method}-{rescale}"));
        run_method(
            &f,
            &out,
            method,
            &["--density", "0.4", "--seed", "7", "--rescale", rescale],
        );
        let want = each_tensor(&f, |name, b, ds| {
            let v: Vec<Vec<f64>> = ds
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let u = draws(7, i, name, d.len());
                    let kept: Vec<f64> = d
                        .iter()
                        .zip(&u)
                        .map(|(d, &u)| if u < 0.4 { *d } else { 0.0 })
                        .collect();
                    let factor = match rescale {
                        "inverse" => 1.0 / 0.4,
                        "l1" => {
                            let before: f64 = d.iter().map(|x| x.abs()).sum();
                            let after: f64 = kept.iter().map(|x| x.abs()).sum();
                            if before < 1e-7 || after < 1e-7 {
                                1.0
                            } else {
                                before / after
                            }
                        }
                        _ => 1.0,
                    };
                    kept.iter().map(|k| W[i] * k * factor).collect()
                })
                .collect();
            combine(b, &v, &W, elect, false)
        });
        check(&out, &f.base, &want);
    }
}

#[test]
fn outputs_do_not_depend_on_the_thread_count() {
    // DARE's draws, and the float sums of the pre-passes (Model Stock's
    // dots, SLERP's norms, L1 rescaling), in f64 output where a last-bit
    // difference would show, on a tensor of many blocks.
    let f = fam_with(Ty::BF16, 2, false, &SCALES, &[1024, 1024]);
    let m0 = f.path("m0");
    let runs: [(&str, Vec<&str>); 4] = [
        ("dare_ties", vec!["--density", "0.3"]),
        (
            "dare_linear",
            vec!["--density", "0.3", "--rescale", "l1", "--dtype", "f64"],
        ),
        ("model_stock", vec!["--dtype", "f64"]),
        ("slerp", vec!["--t", "0.3", "--dtype", "f64"]),
    ];
    for (method, extra) in runs {
        let mut outs = Vec::new();
        for threads in ["1", "2", "3"] {
            let out = f.dir.path().join(format!("{method}-{threads}"));
            let models = if method == "slerp" {
                vec![m0.clone()]
            } else {
                f.models()
            };
            let mut cmd = std::process::Command::new(bin_path("ta-merge"));
            cmd.env("RAYON_NUM_THREADS", threads)
                .args(["--base-model-path", &f.path("base"), "--other-model-paths"])
                .args(&models)
                .args(["--method", method])
                .args(&extra)
                .arg("--output-path")
                .arg(&out)
                .arg("--quiet");
            if method.starts_with("dare") {
                cmd.args(["--lambdas", "0.5", "0.3", "0.2"]);
            }
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{method}: {}", stderr(&o));
            let shards: Vec<Vec<u8>> = snapshot(&out)
                .into_iter()
                .filter(|(p, _)| p.to_string_lossy().ends_with(".safetensors"))
                .map(|(_, b)| b)
                .collect();
            assert!(!shards.is_empty());
            outs.push(shards);
        }
        assert!(outs[0] == outs[1] && outs[0] == outs[2], "{method}");
    }
}

#[test]
fn nan_in_a_fine_tune_is_refused_by_every_method() {
    // bf16 families are merged from the stored words, the others decoded.
    for ty in [Ty::F32, Ty::BF16] {
        nan_is_refused(ty);
    }
}

fn nan_is_refused(ty: Ty) {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(ty, false);
    write_model(&dir.path().join("base"), &base, 1, false);
    let mut bad = fine_tune(&base, 3, 0.01, ty);
    bad[1].values[5] = f64::NAN;
    write_model(&dir.path().join("bad"), &bad, 1, false);
    write_model(
        &dir.path().join("good"),
        &fine_tune(&base, 4, 0.01, ty),
        1,
        false,
    );
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    for (method, flags) in [
        ("ties", &["--density", "0.5"][..]),
        ("dare_ties", &["--density", "0.5"]),
        ("breadcrumbs", &["--density", "0.5", "--gamma", "0.2"]),
        ("magmax", &[]),
        ("della", &["--density", "0.5"]),
        ("model_stock", &[]),
        ("linear", &[]),
    ] {
        let out = p(&format!("out-{method}"));
        let (base_dir, bad_dir, good_dir) = (p("base"), p("bad"), p("good"));
        let mut args = vec![
            "--base-model-path",
            &base_dir,
            "--other-model-paths",
            &bad_dir,
            &good_dir,
            "--method",
            method,
            "--output-path",
            &out,
            "--quiet",
        ];
        if !matches!(method, "magmax" | "model_stock") {
            args.extend(["--lambdas", "0.5", "0.5"]);
        }
        args.extend_from_slice(flags);
        let o = run("ta-merge", &args);
        assert_eq!(o.status.code(), Some(1), "{ty:?} {method}: {}", stderr(&o));
        assert_one_line_error(&o, &[&bad[1].name, "model 'bad'", "NaN"]);
        assert!(!Path::new(&out).exists(), "{method}");
    }
}

#[test]
fn dare_keeps_about_the_density() {
    // Kept fraction of the 12000-element tensor with one model, weight 1,
    // no rescaling: changed elements / all changed before.
    let f = fam(Ty::F32, 1, false, &[0.01]);
    let out = f.dir.path().join("out");
    merge(
        &f,
        &out,
        &[
            "--method",
            "dare_linear",
            "--lambdas",
            "1",
            "--density",
            "0.3",
            "--rescale",
            "none",
        ],
    );
    let name = "model.layers.1.mlp.gate_proj.weight";
    let got = Ty::F32.decode(&read_model(&out)[name].bytes);
    let (b, ds) = deltas(&f, name);
    let changed = ds[0].iter().filter(|d| **d != 0.0).count();
    let kept = got
        .iter()
        .zip(&b)
        .zip(&ds[0])
        .filter(|((g, b), d)| **d != 0.0 && g != b)
        .count();
    let fraction = kept as f64 / changed as f64;
    assert!((fraction - 0.3).abs() < 0.02, "kept {fraction}");
}

#[test]
fn della_ranks_rows_and_draws_the_documented_mask() {
    // bf16 deltas leave the magnitudes' low bits free (the packed sort),
    // f32 deltas do not (the pair sort).
    for ty in [Ty::BF16, Ty::F32] {
        let f = fam(ty, 1, false, &SCALES);
        for (method, elect, normalize) in [("della", true, true), ("della_linear", false, false)] {
            let out = f.dir.path().join(format!("out-{method}"));
            run_method(
                &f,
                &out,
                method,
                &["--density", "0.5", "--epsilon", "0.2", "--seed", "3"],
            );
            let shapes: BTreeMap<String, Vec<usize>> = f
                .base
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect();
            let want = each_tensor(&f, |name, b, ds| {
                let row = *shapes[name].last().unwrap();
                let v: Vec<Vec<f64>> = ds
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let u = draws(3, i, name, d.len());
                        let mut out = vec![0.0; d.len()];
                        for r in 0..d.len() / row {
                            let cells: Vec<usize> = (r * row..(r + 1) * row).collect();
                            let mut order = cells.clone();
                            order.sort_by(|&a, &c| {
                                d[a].abs().total_cmp(&d[c].abs()).then(a.cmp(&c))
                            });
                            for (rank, &j) in order.iter().enumerate() {
                                let scaled = if row == 1 {
                                    0.5
                                } else {
                                    rank as f64 / (row - 1) as f64
                                };
                                let p = 0.3 + 0.4 * scaled;
                                if u[j] < p {
                                    out[j] = W[i] * (d[j] / p);
                                }
                            }
                        }
                        out
                    })
                    .collect();
                combine(b, &v, &W, elect, normalize)
            });
            check(&out, &f.base, &want);
        }
    }
}

#[test]
fn linear_magmax_model_stock_and_slerp_match_their_formulas() {
    let f = fam(Ty::BF16, 2, true, &SCALES);
    let shapes: BTreeMap<String, Vec<usize>> = f
        .base
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();

    let out = f.dir.path().join("linear");
    run_method(&f, &out, "linear", &[]);
    let want = each_tensor(&f, |_, b, ds| {
        (0..b.len())
            .map(|j| {
                W.iter()
                    .zip(ds)
                    .map(|(w, d)| w * (b[j] + d[j]))
                    .sum::<f64>()
                    / W.iter().sum::<f64>()
            })
            .collect()
    });
    check(&out, &f.base, &want);

    let out = f.dir.path().join("magmax");
    merge(&f, &out, &["--method", "magmax", "--scale", "0.8"]);
    let want = each_tensor(&f, |_, b, ds| {
        (0..b.len())
            .map(|j| {
                let mut best = 0.0f64;
                for d in ds {
                    if d[j].abs() > best.abs() {
                        best = d[j];
                    }
                }
                b[j] + 0.8 * best
            })
            .collect()
    });
    check(&out, &f.base, &want);

    for filter_wise in [false, true] {
        let out = f.dir.path().join(format!("stock-{filter_wise}"));
        let mut flags = vec!["--method", "model_stock"];
        if filter_wise {
            flags.push("--filter-wise");
        }
        merge(&f, &out, &flags);
        let want = each_tensor(&f, |name, b, ds| {
            let row = if filter_wise {
                *shapes[name].last().unwrap()
            } else {
                b.len()
            };
            let mut merged = vec![0.0; b.len()];
            for r in 0..b.len() / row {
                let cells = r * row..(r + 1) * row;
                let (mut sum, mut pairs) = (0.0, 0.0);
                for i in 0..3 {
                    for k in i + 1..3 {
                        let dot: f64 = cells.clone().map(|j| ds[i][j] * ds[k][j]).sum();
                        let ni: f64 = cells
                            .clone()
                            .map(|j| ds[i][j] * ds[i][j])
                            .sum::<f64>()
                            .sqrt();
                        let nk: f64 = cells
                            .clone()
                            .map(|j| ds[k][j] * ds[k][j])
                            .sum::<f64>()
                            .sqrt();
                        sum += (dot / (ni * nk).max(1e-6)).clamp(-1.0, 1.0);
                        pairs += 1.0;
                    }
                }
                let c = sum / pairs;
                let t = 3.0 * c / (1.0 + 2.0 * c);
                for j in cells {
                    let mean = (0..3).map(|i| b[j] + ds[i][j]).sum::<f64>() / 3.0;
                    merged[j] = t * mean + (1.0 - t) * b[j];
                }
            }
            merged
        });
        check(&out, &f.base, &want);
    }

    // SLERP: the base and the first model only.
    let out = f.dir.path().join("slerp");
    let m0 = f.path("m0");
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &f.path("base"),
            "--other-model-paths",
            &m0,
            "--method",
            "slerp",
            "--t",
            "0.3",
            "--output-path",
            &out.to_string_lossy(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let want = each_tensor(&f, |_, b, ds| {
        let m: Vec<f64> = b.iter().zip(&ds[0]).map(|(b, d)| b + d).collect();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nm = m.iter().map(|x| x * x).sum::<f64>().sqrt();
        let c = (b.iter().zip(&m).map(|(x, y)| x * y).sum::<f64>() / (nb * nm)).clamp(-1.0, 1.0);
        let (cb, cm) = if c.abs() > 0.9995 {
            (0.7, 0.3)
        } else {
            let th = c.acos();
            ((0.7 * th).sin() / th.sin(), (0.3 * th).sin() / th.sin())
        };
        b.iter().zip(&m).map(|(b, m)| cb * b + cm * m).collect()
    });
    check(&out, &f.base, &want);
}

#[test]
fn whole_model_density_keeps_the_top_entries_over_all_tensors() {
    let f = fam(Ty::BF16, 2, false, &SCALES);
    let order = f.storage_order();
    for (method, elect, gamma) in [("ties", true, None), ("breadcrumbs", false, Some(0.02))] {
        let out = f.dir.path().join(format!("model-{method}"));
        let mut flags = vec!["--density", "0.2", "--density-scope", "model"];
        if gamma.is_some() {
            flags.extend(["--gamma", "0.02"]);
        }
        run_method(&f, &out, method, &flags);
        // Each model's deltas concatenated in storage order.
        let per_tensor: BTreeMap<String, (Vec<f64>, Vec<Vec<f64>>)> =
            order.iter().map(|n| (n.clone(), deltas(&f, n))).collect();
        let mut keep: Vec<BTreeMap<String, Vec<bool>>> = vec![BTreeMap::new(); 3];
        for (i, keep_i) in keep.iter_mut().enumerate() {
            let all: Vec<f64> = order
                .iter()
                .flat_map(|n| per_tensor[n].1[i].clone())
                .collect();
            let n = all.len();
            let mask = match gamma {
                None => top_k_mask(&all, ties_k(n, 0.2)),
                Some(g) => {
                    let k = (0.2 * n as f64).floor() as usize;
                    let top = ((g * n as f64).floor() as usize).min(n - k);
                    let mut m = vec![false; n];
                    for &j in &by_magnitude(&all)[top..top + k] {
                        m[j] = true;
                    }
                    m
                }
            };
            let mut at = 0;
            for name in &order {
                let len = per_tensor[name].0.len();
                keep_i.insert(name.clone(), mask[at..at + len].to_vec());
                at += len;
            }
        }
        let want = each_tensor(&f, |name, b, ds| {
            let v: Vec<Vec<f64>> = (0..3)
                .map(|i| weighted(&ds[i], &keep[i][name], W[i]))
                .collect();
            combine(b, &v, &W, elect, elect)
        });
        check(&out, &f.base, &want);
    }
}

/// `--from-analysis` with `--density-scope model` places the thresholds by
/// the analysis' magnitude counts (saying so) and writes the same bytes as
/// the sampled selection of an analysis folder without them.
#[test]
fn whole_model_ties_from_an_analysis_uses_its_counts_and_writes_the_same_bytes() {
    let f = fam(Ty::BF16, 2, false, &SCALES);
    let stats = f.dir.path().join("stats");
    let (base, models) = (f.path("base"), f.models());
    analyse(&f, &stats);
    // The same analysis without analysis.json: summaries only.
    let bare = f.dir.path().join("bare");
    for name in ["m0", "m1", "m2"] {
        std::fs::create_dir_all(bare.join(name)).unwrap();
        std::fs::copy(
            stats.join(name).join("summary.json"),
            bare.join(name).join("summary.json"),
        )
        .unwrap();
    }
    let mut outputs = Vec::new();
    for (dir, counted) in [(&stats, true), (&bare, false)] {
        let out = f.dir.path().join(format!("out-{counted}"));
        let dir_s = dir.to_string_lossy().into_owned();
        let flags = [
            "--from-analysis",
            &dir_s,
            "--mode",
            "exp",
            "--method",
            "ties",
            "--density",
            "0.2",
            "--density-scope",
            "model",
        ];
        let out_s = out.to_string_lossy().into_owned();
        let mut args = vec!["--base-model-path", &base, "--other-model-paths"];
        args.extend(models.iter().map(String::as_str));
        args.extend(["--output-path", &out_s]);
        args.extend(flags);
        let o = run("ta-merge", &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let said = stdout(&o).contains("placed by the analysis' magnitude counts for 3 of 3");
        assert_eq!(said, counted, "{}", stdout(&o));
        let bytes: BTreeMap<String, Vec<u8>> = read_model(&out)
            .into_iter()
            .map(|(name, t)| (name, t.bytes))
            .collect();
        outputs.push(bytes);
    }
    assert!(outputs[0] == outputs[1], "the counts changed the merge");
}

#[test]
fn every_method_reproduces_from_its_written_config() {
    let f = fam(Ty::BF16, 2, false, &SCALES);
    let m0 = f.path("m0");
    for method in [
        "task_arithmetic",
        "linear",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "slerp",
        "magmax",
    ] {
        let first = f.dir.path().join(format!("{method}-1"));
        let second = f.dir.path().join(format!("{method}-2"));
        if method == "slerp" {
            let o = run(
                "ta-merge",
                &[
                    "--base-model-path",
                    &f.path("base"),
                    "--other-model-paths",
                    &m0,
                    "--method",
                    "slerp",
                    "--t",
                    "0.4",
                    "--output-path",
                    &first.to_string_lossy(),
                    "--quiet",
                ],
            );
            assert!(o.status.success(), "{}", stderr(&o));
        } else if matches!(method, "model_stock" | "magmax") {
            merge(&f, &first, &["--method", method]);
        } else {
            let mut extra = vec![];
            if !matches!(method, "task_arithmetic" | "linear") {
                extra.extend(["--density", "0.4"]);
            }
            if method.starts_with("dare") || method.starts_with("della") {
                extra.extend(["--seed", "11"]);
            }
            run_method(&f, &first, method, &extra);
        }
        let config = first.join("mergekit_config.yml");
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains(&format!("merge_method: {method}")), "{text}");
        // The record holds the settings this method uses, and no others.
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(first.join("merge_record.json")).unwrap(),
        )
        .unwrap();
        let settings = &record["settings"];
        let random = method.starts_with("dare") || method.starts_with("della");
        let weighs = !matches!(method, "model_stock" | "slerp" | "magmax");
        for (key, expected) in [
            ("seed", random.then_some(serde_json::json!(11))),
            ("t", (method == "slerp").then_some(serde_json::json!(0.4))),
            (
                "scale",
                (!matches!(method, "linear" | "model_stock" | "slerp"))
                    .then_some(serde_json::json!(1.0)),
            ),
            (
                "filter_wise",
                (method == "model_stock").then_some(serde_json::json!(false)),
            ),
            ("normalize", weighs.then(|| settings["normalize"].clone())),
        ] {
            assert_eq!(
                settings.get(key).cloned(),
                expected,
                "{method} {key}: {settings}"
            );
        }
        assert_eq!(settings["config"], "mergekit_config.yml");
        let lambda = &record["models"][0]["lambda"];
        assert_eq!(lambda.is_null(), !weighs, "{method}: {lambda}");
        let o = run(
            "ta-merge",
            &[
                "--config",
                &config.to_string_lossy(),
                "--output-path",
                &second.to_string_lossy(),
                "--quiet",
            ],
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let shards = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
            snapshot(dir)
                .into_iter()
                .map(|(p, b)| (p.file_name().unwrap().to_string_lossy().into_owned(), b))
                .filter(|(p, _)| p.contains("safetensors"))
                .collect()
        };
        let (a, b) = (shards(&first), shards(&second));
        assert!(
            !a.is_empty() && a == b,
            "{method}: the config's merge differs"
        );
        assert_eq!(
            text,
            std::fs::read_to_string(second.join("mergekit_config.yml")).unwrap()
        );
    }
}

/// The test's own grouping of the family's tensor names.
fn group(name: &str) -> String {
    if name.starts_with("lm_head") {
        "lm_head".into()
    } else if name.contains("embed_tokens") {
        "embed".into()
    } else if let Some(rest) = name.strip_prefix("model.layers.") {
        format!("layer_{}", rest.split('.').next().unwrap())
    } else {
        "other".into()
    }
}

#[test]
fn weights_per_group_and_per_tensor_come_from_the_analysis_norms() {
    let f = fam(Ty::BF16, 1, false, &SCALES);
    let stats = f.dir.path().join("stats");
    let stats_s = stats.to_string_lossy().into_owned();
    analyse(&f, &stats);
    for granularity in ["group", "tensor"] {
        let out = f.dir.path().join(format!("out-{granularity}"));
        merge(
            &f,
            &out,
            &[
                "--from-analysis",
                &stats_s,
                "--granularity",
                granularity,
                "--mode",
                "exp",
            ],
        );
        // Each model's norm per tensor, read from the analysis' files.
        let norm = |i: usize, tensor: &str| -> f64 {
            let dir = stats.join(format!("m{i}"));
            if granularity == "group" {
                let v: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(dir.join("summary.json")).unwrap(),
                )
                .unwrap();
                v["groups"][group(tensor)]["l2"].as_f64().unwrap()
            } else {
                let mut r = csv::Reader::from_path(dir.join("per_param_stats.csv")).unwrap();
                r.records()
                    .map(|r| r.unwrap())
                    .find(|r| &r[0] == tensor)
                    .map(|r| r[2].parse().unwrap())
                    .unwrap()
            }
        };
        let want = each_tensor(&f, |name, b, ds| {
            let norms: Vec<f64> = (0..3).map(|i| norm(i, name)).collect();
            let mean = norms.iter().sum::<f64>() / 3.0;
            let raw: Vec<f64> = norms.iter().map(|l| (-l / mean).exp()).collect();
            let total: f64 = raw.iter().sum();
            (0..b.len())
                .map(|j| b[j] + (0..3).map(|i| raw[i] / total * ds[i][j]).sum::<f64>())
                .collect()
        });
        check(&out, &f.base, &want);
        // No single weight per model was used: the record says so rather
        // than showing the model-level weight.
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("merge_record.json")).unwrap())
                .unwrap();
        for m in record["models"].as_array().unwrap() {
            assert!(m["lambda"].is_null(), "{m}");
        }
    }
}

#[test]
fn flags_a_method_ignores_are_refused_and_config_keys_it_ignores_are_left_out() {
    let f = fam(Ty::BF16, 1, false, &SCALES);
    let out = f.dir.path().join("out");
    let out_s = out.to_string_lossy().into_owned();
    let base = f.path("base");
    let models = f.models();
    let merge_with = |flags: &[&str]| merge_output(&f, &out, flags);
    let merge_config = |config: &Path| {
        let config = config.to_string_lossy();
        run(
            "ta-merge",
            &["--config", &config, "--output-path", &out_s, "--quiet"],
        )
    };
    for (flags, named) in [
        (
            &["--lambdas", "1", "1", "1", "--density", "0.3"][..],
            "--density has no effect with --method task_arithmetic",
        ),
        (
            &["--method", "ties", "--lambdas", "1", "1", "1", "--t", "0.3"],
            "--t has no effect with --method ties; it applies to slerp",
        ),
        (
            &[
                "--method",
                "linear",
                "--lambdas",
                "1",
                "1",
                "1",
                "--scale",
                "2",
            ],
            "--scale has no effect with --method linear",
        ),
        (
            &[
                "--method",
                "ties",
                "--lambdas",
                "1",
                "1",
                "1",
                "--seed",
                "3",
            ],
            "--seed has no effect with --method ties",
        ),
        (
            &[
                "--method",
                "ties",
                "--lambdas",
                "1",
                "1",
                "1",
                "--density",
                "1.5",
            ],
            "--density 1.5: `density` must lie in [0, 1], not 1.5",
        ),
        (
            &[
                "--method",
                "breadcrumbs",
                "--lambdas",
                "1",
                "1",
                "1",
                "--gamma",
                "-0.1",
            ],
            "--gamma -0.1: `gamma` must lie in [0, 1]",
        ),
        (
            &["--method", "magmax", "--scale", "NaN"],
            "--scale: `lambda` must be a finite number",
        ),
        (
            &[
                "--method",
                "della",
                "--lambdas",
                "1",
                "1",
                "1",
                "--density",
                "0.9",
            ],
            "della needs density ± epsilon inside (0, 1), got density 0.9 and epsilon 0.15",
        ),
        (
            &[
                "--method",
                "ties",
                "--lambdas",
                "1",
                "1",
                "1",
                "--rescale",
                "inverse",
            ],
            "rescale `inverse` (--rescale, or `rescale` in a config) applies to dare and della",
        ),
    ] {
        let o = merge_with(flags);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {}", stderr(&o));
        assert_one_line_error(&o, &[named]);
        assert!(!out.exists(), "{flags:?}");
    }

    // A config may carry keys its method ignores (mergekit ignores them):
    // each is named once and left out of the written config.
    let config = f.dir.path().join("ties.yml");
    let mut text = format!("merge_method: ties\nbase_model: {base}\nmodels:\n");
    for m in &models {
        text.push_str(&format!(
            "  - model: {m}\n    parameters: {{weight: 0.5, density: 0.4, epsilon: 0.1}}\n"
        ));
    }
    text.push_str("parameters: {t: 0.3, lambda: 0.9}\ndtype: float32\n");
    std::fs::write(&config, text).unwrap();
    let o = merge_config(&config);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    for note in [
        "config key `parameters.t` has no effect with ties",
        "config key `models[2].parameters.epsilon` has no effect with ties",
        "the output is written as float32",
    ] {
        assert!(said.contains(note), "{note}: {said}");
    }
    let written = std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap();
    assert!(
        !written.contains("epsilon") && !written.contains("t: 0.3"),
        "{written}"
    );
    assert!(
        written.contains("lambda: 0.9") && written.contains("dtype: float32"),
        "{written}"
    );
    for t in read_model(&out).values() {
        assert_eq!(
            t.ty,
            Ty::F32,
            "mergekit writes its working type without out_dtype"
        );
    }

    // A model without a weight: the message names the keys that give one.
    std::fs::remove_dir_all(&out).unwrap();
    let text = format!(
        "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {}\n    parameters: {{weight: 1, density: 0.5}}\n  - model: {}\n",
        models[0], models[1]
    );
    std::fs::write(&config, text).unwrap();
    let o = merge_config(&config);
    assert_one_line_error(
        &o,
        &[
            "has no weight for tensor",
            "set models[1].parameters.weight or parameters.weight in the config, or give --lambdas",
        ],
    );
    assert!(!out.exists());

    // Weights given to a method that weighs no models are only noted:
    // scripts pass the norms whatever the method.
    let o = merge_with(&["--method", "magmax", "--l2-norms", "1", "2", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("note: --l2-norms has no effect with --method magmax: it weighs no models"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&out).unwrap();

    // A method that thins with no density anywhere says that it keeps all.
    let o = merge_with(&["--method", "della", "--lambdas", "1", "1", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no density given: della keeps every entry"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_analysis_of_other_checkpoints_is_named_in_a_note() {
    let f = fam(Ty::BF16, 1, false, &SCALES);
    let stats = f.dir.path().join("stats");
    let stats_s = stats.to_string_lossy().into_owned();
    let base = f.path("base");
    let models = f.models();
    analyse(&f, &stats);
    // A copy of the second model under another folder, same name.
    let elsewhere = f.dir.path().join("elsewhere");
    let moved = elsewhere.join("m1");
    std::fs::create_dir_all(&moved).unwrap();
    for e in std::fs::read_dir(&models[1]).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), moved.join(e.file_name())).unwrap();
    }
    let moved_s = moved.to_string_lossy().into_owned();
    for (second, expect_note) in [(&models[1], false), (&moved_s, true)] {
        let out = f.dir.path().join(format!("out-{expect_note}"));
        let out_s = out.to_string_lossy().into_owned();
        let o = run(
            "ta-merge",
            &[
                "--base-model-path",
                &base,
                "--other-model-paths",
                &models[0],
                second,
                &models[2],
                "--from-analysis",
                &stats_s,
                "--output-path",
                &out_s,
                "--quiet",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let note = format!(
            "it analysed 'm1' at '{}', this merge reads '{moved_s}'",
            models[1]
        );
        assert_eq!(stderr(&o).contains(&note), expect_note, "{}", stderr(&o));
        assert_eq!(
            stderr(&o).contains("--from-analysis"),
            expect_note,
            "{}",
            stderr(&o)
        );
    }

    // An analysis run from another folder with relative paths: the same
    // models seen from here are not reported as others.
    let family_dir = Path::new(&base).parent().unwrap();
    let name_of = |p: &str| {
        Path::new(p)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let relative_stats = f.dir.path().join("relative-stats");
    let o = std::process::Command::new(bin_path("ta-analyze"))
        .current_dir(family_dir)
        .args(["--base", &name_of(&base), "--models"])
        .args(models.iter().map(|m| name_of(m)))
        .arg("--outdir")
        .arg(&relative_stats)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // A damaged analysis.json only loses the note: the norms are the summaries'.
    for damage in [false, true] {
        if damage {
            std::fs::write(relative_stats.join("analysis.json"), "{\"trunc").unwrap();
        }
        let out = f.dir.path().join(format!("out-relative-{damage}"));
        let stats_s = relative_stats.to_string_lossy().into_owned();
        let o = merge_output(&f, &out, &["--from-analysis", &stats_s]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            !stderr(&o).contains("note: --from-analysis"),
            "{}",
            stderr(&o)
        );
    }

    // A norm the weights cannot use is blamed on the analysis it came from.
    let zero = f.dir.path().join("zero-stats");
    for (name, norm) in [("m0", 0.0), ("m1", 1.0), ("m2", 2.0)] {
        std::fs::create_dir_all(zero.join(name)).unwrap();
        let summary = format!("{{\"global_l2\": {norm}}}");
        std::fs::write(zero.join(name).join("summary.json"), summary).unwrap();
    }
    let zero_s = zero.to_string_lossy().into_owned();
    let out = f.dir.path().join("out-zero");
    let o = merge_output(&f, &out, &["--from-analysis", &zero_s, "--mode", "linear"]);
    assert_one_line_error(
        &o,
        &[&format!("--from-analysis {zero_s}: model 'm0' has norm 0")],
    );
}
