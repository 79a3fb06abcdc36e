//! End-to-end tests of LoRA adapters as task vectors: adapters written by
//! the test with known factors A and B, their task vectors s·B·A computed
//! here by a plain f64 triple loop, and both tools checked against it.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// One adapted module as the test describes it.
struct Lora {
    /// The module's name in the base (`model.layers.0.self_attn.q_proj`).
    module: String,
    /// A `[r, in]` (or `[r, rows]` for transposed layouts), B `[out, r]`.
    a: T,
    b: T,
    scale: f64,
    /// fan_in_fan_out or an embedding: ΔW = s (B A)ᵀ.
    transposed: bool,
}

impl Lora {
    /// ΔW in the base's layout, by the definition, in f64.
    fn delta(&self) -> Vec<f64> {
        let r = self.a.shape[0];
        let (out, inn) = (self.b.shape[0], self.a.shape[1]);
        let mut ba = vec![0f64; out * inn];
        for i in 0..out {
            for j in 0..inn {
                let mut s = 0.0;
                for k in 0..r {
                    s += self.b.values[i * r + k] * self.a.values[k * inn + j];
                }
                ba[i * inn + j] = self.scale * s;
            }
        }
        if !self.transposed {
            return ba;
        }
        let mut t = vec![0f64; out * inn];
        for i in 0..out {
            for j in 0..inn {
                t[j * out + i] = ba[i * inn + j];
            }
        }
        t
    }
}

/// Factors of rank `r` for a base tensor of shape `[rows, cols]`.
fn lora(module: &str, shape: &[usize], r: usize, scale: f64, transposed: bool, seed: u64) -> Lora {
    let (out, inn) = if transposed {
        (shape[1], shape[0])
    } else {
        (shape[0], shape[1])
    };
    Lora {
        module: module.into(),
        a: T::new("a", Ty::BF16, &[r, inn], noise(seed, r * inn, 0.3)),
        b: T::new("b", Ty::F32, &[out, r], noise(seed + 77, out * r, 0.05)),
        scale,
        transposed,
    }
}

/// Writes an adapter folder: `config` as adapter_config.json and the
/// factors (and `full` tensors, stored under the given names) as
/// adapter_model.safetensors, with PEFT's names.
fn write_adapter(
    dir: &Path,
    config: serde_json::Value,
    loras: &[&Lora],
    full: &[T],
    embedding: bool,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, &T)> = Vec::new();
    for l in loras {
        let (a, b) = if embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        tensors.push((format!("base_model.model.{}.{a}", l.module), &l.a));
        tensors.push((format!("base_model.model.{}.{b}", l.module), &l.b));
    }
    for t in full {
        tensors.push((t.name.clone(), t));
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, false);
}

fn lora_config(r: usize, alpha: f64, targets: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "target_modules": targets, "base_model_name_or_path": "base"
    })
}

fn shape_of(base: &[T], name: &str) -> Vec<usize> {
    base.iter().find(|t| t.name == name).unwrap().shape.clone()
}

/// A base, a full fine-tune and adapters of every kind the tests use.
struct Family {
    setup: Setup,
    /// Per adapter folder name: base tensor name -> its task vector.
    deltas: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

const Q0: &str = "model.layers.0.self_attn.q_proj";
const Q1: &str = "model.layers.1.self_attn.q_proj";
const UP0: &str = "model.layers.0.mlp.up_proj";
const UP1: &str = "model.layers.1.mlp.up_proj";
const DOWN0: &str = "model.layers.0.mlp.down_proj";
const DOWN1: &str = "model.layers.1.mlp.down_proj";
const EMBED: &str = "model.embed_tokens";

impl Family {
    fn new() -> Self {
        let setup = Setup::with_side_files(false);
        let base = setup.base.clone();
        let w = |m: &str| shape_of(&base, &format!("{m}.weight"));
        let mut deltas = BTreeMap::new();
        let mut record = |name: &str, loras: &[&Lora], full: &[(String, Vec<f64>)]| {
            let mut map = BTreeMap::new();
            for l in loras {
                map.insert(format!("{}.weight", l.module), l.delta());
            }
            for (n, d) in full {
                map.insert(n.clone(), d.clone());
            }
            deltas.insert(name.to_string(), map);
        };

        // Rank 1 on both q_proj, alpha 2: s = 2.
        let r1: Vec<Lora> = [Q0, Q1]
            .iter()
            .enumerate()
            .map(|(i, m)| lora(m, &w(m), 1, 2.0, false, 10 + i as u64))
            .collect();
        write_adapter(
            &setup.path("r1"),
            lora_config(1, 2.0, &["q_proj"]),
            &r1.iter().collect::<Vec<_>>(),
            &[],
            false,
        );
        record("r1", &r1.iter().collect::<Vec<_>>(), &[]);

        // Rank 8, alpha 16, with a rank pattern (layer 1's up_proj rank 4)
        // and an alpha pattern (down_proj alpha 3).
        let r8 = [
            lora(UP0, &w(UP0), 8, 16.0 / 8.0, false, 20),
            lora(UP1, &w(UP1), 4, 16.0 / 4.0, false, 21),
            lora(DOWN0, &w(DOWN0), 8, 3.0 / 8.0, false, 22),
            lora(DOWN1, &w(DOWN1), 8, 3.0 / 8.0, false, 23),
        ];
        let mut config = lora_config(8, 16.0, &["up_proj", "down_proj"]);
        config["rank_pattern"] = serde_json::json!({"layers.1.mlp.up_proj": 4});
        config["alpha_pattern"] = serde_json::json!({"down_proj": 3});
        write_adapter(
            &setup.path("r8"),
            config,
            &r8.iter().collect::<Vec<_>>(),
            &[],
            false,
        );
        record("r8", &r8.iter().collect::<Vec<_>>(), &[]);

        // Rank 64 (above the matrices' sizes) with rsLoRA: s = 8 / √64;
        // layers_to_transform keeps layer 0 only, so layer 1's factors in
        // the file are ignored.
        let r64 = [
            lora(Q0, &w(Q0), 64, 1.0, false, 30),
            lora(Q1, &w(Q1), 64, 1.0, false, 31),
        ];
        let mut config = lora_config(64, 8.0, &["q_proj"]);
        config["use_rslora"] = true.into();
        config["layers_to_transform"] = serde_json::json!([0]);
        write_adapter(&setup.path("r64"), config, &[&r64[0], &r64[1]], &[], false);
        record("r64", &[&r64[0]], &[]);

        // fan_in_fan_out: the base stores [in, out]; ΔW = s (B A)ᵀ.
        let fifo = [lora(UP0, &w(UP0), 3, 0.5, true, 40)];
        let mut config = lora_config(3, 1.5, &["up_proj"]);
        config["fan_in_fan_out"] = true.into();
        write_adapter(&setup.path("fifo"), config, &[&fifo[0]], &[], false);
        record("fifo", &[&fifo[0]], &[]);

        // An embedding adapter with lm_head in modules_to_save (stored
        // under its plain name, as PEFT saves it).
        let emb = lora(EMBED, &w(EMBED), 4, 2.0, true, 50);
        let lm = base.iter().find(|t| t.name == "lm_head.weight").unwrap();
        let saved = T::new(
            "base_model.model.lm_head.weight",
            Ty::BF16,
            &lm.shape,
            lm.values
                .iter()
                .zip(noise(51, lm.values.len(), 0.01))
                .map(|(b, d)| b + d)
                .collect(),
        );
        let lm_delta: Vec<f64> = saved
            .values
            .iter()
            .zip(&lm.values)
            .map(|(s, b)| s - b)
            .collect();
        let mut config = lora_config(4, 8.0, &["embed_tokens"]);
        config["modules_to_save"] = serde_json::json!(["lm_head"]);
        write_adapter(
            &setup.path("embed"),
            config,
            &[&emb],
            std::slice::from_ref(&saved),
            true,
        );
        record("embed", &[&emb], &[("lm_head.weight".into(), lm_delta)]);

        Family { setup, deltas }
    }

    /// The task vector of `model` for base tensor `name` (full fine-tunes:
    /// stored − base).
    fn delta(&self, model: &str, name: &str, full: Option<&[T]>) -> Vec<f64> {
        let b = self.setup.base.iter().find(|t| t.name == name).unwrap();
        if let Some(full) = full {
            let m = full.iter().find(|t| t.name == name).unwrap();
            return m.values.iter().zip(&b.values).map(|(m, b)| m - b).collect();
        }
        self.deltas[model]
            .get(name)
            .cloned()
            .unwrap_or_else(|| vec![0.0; b.values.len()])
    }
}

/// Asserts `got` (bytes of `ty`) is `exact` correctly rounded, allowing the
/// other neighbour only where `exact` lies within f64 noise of a midpoint.
fn assert_rounded(name: &str, ty: Ty, got: &[u8], exact: &[f64]) {
    let got_v = ty.decode(got);
    let sz = ty.size();
    let mut near_ties = 0;
    for (j, &x) in exact.iter().enumerate() {
        let want = ty.round(x);
        if got[j * sz..(j + 1) * sz] == want[..] {
            continue;
        }
        let w = ty.decode(&want)[0];
        let mid = (w + got_v[j]) / 2.0;
        assert!(
            (x - mid).abs() <= 1e-12 * x.abs().max(1e-30),
            "{name}[{j}]: got {}, want {w} (exact {x})",
            got_v[j]
        );
        near_ties += 1;
    }
    assert!(
        near_ties <= exact.len() / 100 + 1,
        "{name}: {near_ties} ties"
    );
}

fn merge(fam: &Family, out: &str, models: &[&str], extra: &[&str]) -> std::process::Output {
    let paths: Vec<String> = models.iter().map(|m| fam.setup.s(m)).collect();
    let out = fam.setup.s(out);
    let base = fam.setup.s("base");
    let mut args = vec!["--quiet", "--base-model-path", &base, "--output-path", &out];
    args.push("--other-model-paths");
    args.extend(paths.iter().map(String::as_str));
    args.extend(extra);
    run("ta-merge", &args)
}

#[test]
fn each_adapter_expands_to_its_f64_product() {
    let fam = Family::new();
    for adapter in ["r1", "r8", "r64", "fifo", "embed"] {
        let out = format!("out-{adapter}");
        let o = merge(
            &fam,
            &out,
            &[adapter],
            &["--lambdas", "1", "--dtype", "f64"],
        );
        assert!(o.status.success(), "{adapter}: {}", stderr(&o));
        let bytes = std::fs::read(fam.setup.path(&out).join("model.safetensors")).unwrap();
        let merged = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for b in &fam.setup.base {
            if b.ty == Ty::I64 {
                continue;
            }
            let view = merged.tensor(&b.name).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::F64);
            let got: Vec<f64> = view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let d = fam.delta(adapter, &b.name, None);
            let touched = fam.deltas[adapter].contains_key(&b.name);
            for (j, ((&g, &b), &d)) in got.iter().zip(&b.values).zip(&d).enumerate() {
                if touched {
                    // The tool's f64 product may add in another order.
                    let tol = 1e-14 * (b.abs() + d.abs()) + 1e-300;
                    assert!(
                        (g - (b + d)).abs() <= tol,
                        "{adapter} {}[{j}]: got {g}, want {}",
                        b,
                        b + d
                    );
                } else {
                    assert_eq!(g, b, "{adapter}: untouched tensor changed");
                }
            }
        }
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fam.setup.path(&out).join("merge_record.json")).unwrap(),
        )
        .unwrap();
        let a = &record["models"][0]["adapter"];
        assert!(a["rank"].is_u64() && a["alpha"].is_f64(), "{record}");
        assert!(a["target_modules"].is_array(), "{record}");
    }
}

#[test]
fn a_mixed_merge_is_correctly_rounded() {
    let fam = Family::new();
    let full = fine_tune(&fam.setup.base, 5, 0.01, Ty::BF16);
    let lambdas = [0.3, 0.5, 0.7, -0.4];
    let models = ["good", "r8", "embed", "r1"];
    let o = merge(
        &fam,
        "mixed",
        &models,
        &["--lambdas", "0.3", "0.5", "0.7", "-0.4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = read_model(&fam.setup.path("mixed"));
    for b in &fam.setup.base {
        let mut exact = b.values.clone();
        for (m, &l) in models.iter().zip(&lambdas) {
            let d = fam.delta(m, &b.name, (*m == "good").then_some(&full[..]));
            for (e, d) in exact.iter_mut().zip(d) {
                *e += l * d;
            }
        }
        assert_rounded(&b.name, b.ty, &merged[&b.name].bytes, &exact);
    }
}

#[test]
fn linear_and_ties_take_adapters_too() {
    let fam = Family::new();
    let full = fine_tune(&fam.setup.base, 5, 0.01, Ty::BF16);
    // linear: Σ w m / Σ w, an adapter's m being base + ΔW.
    let o = merge(
        &fam,
        "linear",
        &["good", "r8"],
        &["--method", "linear", "--lambdas", "1", "3"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = read_model(&fam.setup.path("linear"));
    for b in &fam.setup.base {
        let d_full = fam.delta("good", &b.name, Some(&full));
        let d_r8 = fam.delta("r8", &b.name, None);
        let exact: Vec<f64> = (0..b.values.len())
            .map(|j| {
                let (m1, m2) = (b.values[j] + d_full[j], b.values[j] + d_r8[j]);
                (m1 + 3.0 * m2) / 4.0
            })
            .collect();
        assert_rounded(&b.name, b.ty, &merged[&b.name].bytes, &exact);
    }
    // ties and model-wide density run with an adapter among the models.
    for (k, extra) in [
        &[
            "--method",
            "ties",
            "--density",
            "0.5",
            "--lambdas",
            "1",
            "1",
        ][..],
        &[
            "--method",
            "ties",
            "--density",
            "0.5",
            "--density-scope",
            "model",
            "--lambdas",
            "1",
            "1",
        ],
        &[
            "--method",
            "dare_linear",
            "--density",
            "0.5",
            "--lambdas",
            "1",
            "1",
        ],
    ]
    .iter()
    .enumerate()
    {
        let out = format!("m-{k}");
        let o = merge(&fam, &out, &["good", "r1"], extra);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    }
}

/// Reads `per_param_stats.csv` of a model as param -> column -> value.
fn stats(dir: &Path, model: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut r = csv::Reader::from_path(dir.join(model).join("per_param_stats.csv")).unwrap();
    let headers = r.headers().unwrap().clone();
    let mut out = BTreeMap::new();
    for rec in r.records() {
        let rec = rec.unwrap();
        let mut row = BTreeMap::new();
        for (h, v) in headers.iter().zip(rec.iter()) {
            if let Ok(x) = v.parse::<f64>() {
                row.insert(h.to_string(), x);
            }
        }
        out.insert(rec[0].to_string(), row);
    }
    out
}

/// numpy's default quantile: linear interpolation between order statistics.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[test]
fn the_analysis_sees_the_same_task_vectors() {
    let fam = Family::new();
    let full = fine_tune(&fam.setup.base, 5, 0.01, Ty::BF16);
    let outdir = fam.setup.s("stats");
    let (base, good, r8, embed) = (
        fam.setup.s("base"),
        fam.setup.s("good"),
        fam.setup.s("r8"),
        fam.setup.s("embed"),
    );
    let o = run(
        "ta-analyze",
        &[
            "--quiet", "--base", &base, "--models", &good, &r8, &embed, "--outdir", &outdir,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let close = |what: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1e-12),
            "{what}: got {got}, want {want}"
        );
    };
    let mut dots = BTreeMap::new();
    // Sign agreement with the full fine-tune: (both non-zero, conflicts,
    // Σ min |·|, Σ min |·| over conflicts), and every element counted.
    let mut signs: BTreeMap<&str, [f64; 4]> = BTreeMap::new();
    let mut entries: BTreeMap<&str, u64> = BTreeMap::new();
    for model in ["r8", "embed"] {
        let rows = stats(Path::new(&outdir), model);
        for b in fam.setup.base.iter().filter(|b| b.ty != Ty::I64) {
            let d = fam.delta(model, &b.name, None);
            let row = &rows[&b.name];
            let l2 = d.iter().map(|x| x * x).sum::<f64>().sqrt();
            let l1: f64 = d.iter().map(|x| x.abs()).sum();
            let mut sorted = d.clone();
            sorted.sort_by(f64::total_cmp);
            let what = format!("{model} {}", b.name);
            close(&format!("{what} l2"), row["l2"], l2);
            close(&format!("{what} l1"), row["l1"], l1);
            close(
                &format!("{what} maxabs"),
                row["maxabs"],
                sorted[0].abs().max(sorted[sorted.len() - 1].abs()),
            );
            close(
                &format!("{what} mean"),
                row["mean"],
                d.iter().sum::<f64>() / d.len() as f64,
            );
            for (col, q) in [("q25", 0.25), ("q50", 0.5), ("q99", 0.99)] {
                close(&format!("{what} {col}"), row[col], quantile(&sorted, q));
            }
            let zeros = d.iter().filter(|&&x| x == 0.0).count() as f64;
            assert_eq!(row["unchanged"], zeros, "{what}");
            let g = fam.delta("good", &b.name, Some(&full));
            *dots.entry(model).or_insert(0.0) += d.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>();
            let s = signs.entry(model).or_default();
            for (&x, &y) in d.iter().zip(&g) {
                if x != 0.0 && y != 0.0 {
                    let m = x.abs().min(y.abs());
                    s[0] += 1.0;
                    s[2] += m;
                    if (x < 0.0) != (y < 0.0) {
                        s[1] += 1.0;
                        s[3] += m;
                    }
                }
            }
            *entries.entry(model).or_default() += d.len() as u64;
        }
    }
    // Cosines between the full fine-tune and each adapter.
    let norm = |model: &str, full: Option<&[T]>| -> f64 {
        fam.setup
            .base
            .iter()
            .filter(|b| b.ty != Ty::I64)
            .map(|b| {
                fam.delta(model, &b.name, full)
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let mut r = csv::Reader::from_path(Path::new(&outdir).join("pairwise_cosines.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(|r| r.unwrap()).collect();
    for (k, model) in [(2, "r8"), (3, "embed")] {
        let want = dots[model] / (norm("good", Some(&full)) * norm(model, None));
        let got: f64 = rows[0][k].parse().unwrap();
        close(&format!("cos(good, {model})"), got, want);
    }
    // The diagnostics see the adapters' ΔW as the statistics do: sign
    // conflicts with the full fine-tune as computed here in f64, and the
    // magnitude histogram counting every element, the zero task vector of
    // each tensor an adapter leaves alone included.
    let a: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&outdir).join("analysis.json")).unwrap(),
    )
    .unwrap();
    for (k, model) in [(1, "r8"), (2, "embed")] {
        let [both, conflict, w, wc] = signs[model];
        assert!(
            both > 0.0 && conflict > 0.0,
            "{model}: a test without conflicts"
        );
        for (i, j) in [(0, k), (k, 0)] {
            let got = a["sign_conflict"]["matrix"][i][j].as_f64().unwrap();
            let got_w = a["sign_conflict_weighted"]["matrix"][i][j]
                .as_f64()
                .unwrap();
            assert!(
                (got - conflict / both).abs() <= 1e-15,
                "sign_conflict(good, {model}): {got} vs {}",
                conflict / both
            );
            assert!(
                (got_w - wc / w).abs() <= 1e-12,
                "sign_conflict_weighted(good, {model}): {got_w} vs {}",
                wc / w
            );
        }
        assert_eq!(
            a["magnitude_histogram"]["models"][model]["entries"], entries[model],
            "{model}"
        );
    }
}

/// Runs a merge of `adapter` that must fail with one line naming `needles`,
/// leaving no output.
fn refused(fam: &Family, adapter: &str, needles: &[&str]) {
    let o = merge(fam, "refused", &[adapter], &["--lambdas", "1"]);
    assert_one_line_error(&o, needles);
    assert!(!fam.setup.path("refused").exists());
}

#[test]
fn bad_adapters_are_refused_by_name() {
    let fam = Family::new();
    let base = fam.setup.base.clone();
    let w = |m: &str| shape_of(&base, &format!("{m}.weight"));
    // A module the base lacks.
    let l = lora(
        "model.layers.7.self_attn.q_proj",
        &[16, 16],
        2,
        1.0,
        false,
        60,
    );
    write_adapter(
        &fam.setup.path("lacks"),
        lora_config(2, 2.0, &["q_proj"]),
        &[&l],
        &[],
        false,
    );
    refused(
        &fam,
        "lacks",
        &["model.layers.7.self_attn.q_proj", "not in the base"],
    );
    // A base storing the adapted tensor as FP8: the adapter's change could
    // not be merged, so it is refused rather than dropped.
    let fp8 = fam.setup.path("fp8-base");
    let up = format!("{UP0}.weight");
    let n: usize = w(UP0).iter().product();
    let raw = [(
        up.as_str(),
        safetensors::Dtype::F8_E4M3,
        w(UP0),
        vec![0x38u8; n],
    )];
    write_with_raw(&fp8, &base, &raw);
    let l = lora(UP0, &w(UP0), 2, 1.0, false, 66);
    write_adapter(
        &fam.setup.path("fp8-lora"),
        lora_config(2, 2.0, &["up_proj"]),
        &[&l],
        &[],
        false,
    );
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &fp8.to_string_lossy(),
            "--other-model-paths",
            &fam.setup.path("fp8-lora").to_string_lossy(),
            "--output-path",
            &fam.setup.path("refused").to_string_lossy(),
            "--lambdas",
            "1",
            "--quiet",
        ],
    );
    assert_one_line_error(&o, &[UP0, "FP8", "dequantize"]);
    assert!(!fam.setup.path("refused").exists());
    // A factor stored twice (a second adapter name in one file).
    let l = lora(UP0, &w(UP0), 2, 1.0, false, 67);
    let twice = fam.setup.path("twice");
    write_adapter(&twice, lora_config(2, 2.0, &["up_proj"]), &[&l], &[], false);
    let mut factors: Vec<(String, &T)> = vec![
        (
            format!("base_model.model.{UP0}.lora_A.default.weight"),
            &l.a,
        ),
        (
            format!("base_model.model.{UP0}.lora_B.default.weight"),
            &l.b,
        ),
    ];
    factors.push((format!("base_model.model.{UP0}.lora_A.other.weight"), &l.a));
    write_safetensors(&twice.join("adapter_model.safetensors"), &factors, false);
    refused(&fam, "twice", &[UP0, "stored twice"]);
    // Factors that do not fit the base's tensor.
    let l = lora(UP0, &[16, 16], 2, 1.0, false, 61);
    write_adapter(
        &fam.setup.path("shape"),
        lora_config(2, 2.0, &["up_proj"]),
        &[&l],
        &[],
        false,
    );
    refused(&fam, "shape", &[UP0, "shape"]);
    // A rank the config does not give.
    let l = lora(UP0, &w(UP0), 2, 1.0, false, 62);
    write_adapter(
        &fam.setup.path("rank"),
        lora_config(4, 2.0, &["up_proj"]),
        &[&l],
        &[],
        false,
    );
    refused(&fam, "rank", &[UP0, "rank 2"]);
    // DoRA and other adapter types.
    let l = lora(UP0, &w(UP0), 2, 1.0, false, 63);
    let mut config = lora_config(2, 2.0, &["up_proj"]);
    config["use_dora"] = true.into();
    write_adapter(&fam.setup.path("dora"), config, &[&l], &[], false);
    refused(&fam, "dora", &["DoRA"]);
    let config = serde_json::json!({"peft_type": "LOHA", "r": 2, "alpha": 2});
    write_adapter(&fam.setup.path("loha"), config, &[], &[], false);
    refused(&fam, "loha", &["LOHA"]);
    // An embedding adapter over a larger vocabulary.
    let l = lora(EMBED, &[40, 16], 2, 1.0, true, 64);
    write_adapter(
        &fam.setup.path("vocab"),
        lora_config(2, 2.0, &["embed_tokens"]),
        &[&l],
        &[],
        true,
    );
    refused(&fam, "vocab", &["model.embed_tokens.weight", "vocabulary"]);
    // A factor holding NaN: refused naming the adapter, as for a checkpoint.
    let mut l = lora(UP0, &w(UP0), 2, 1.0, false, 65);
    l.a.values[3] = f64::NAN;
    write_adapter(
        &fam.setup.path("nan"),
        lora_config(2, 2.0, &["up_proj"]),
        &[&l],
        &[],
        false,
    );
    refused(
        &fam,
        "nan",
        &["model.layers.0.mlp.up_proj.weight", "model 'nan'", "NaN"],
    );
    // An adapter given as the base.
    let (r1, good, out) = (
        fam.setup.s("r1"),
        fam.setup.s("good"),
        fam.setup.s("refused"),
    );
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &r1,
            "--other-model-paths",
            &good,
            "--lambdas",
            "1",
            "--output-path",
            &out,
        ],
    );
    assert_one_line_error(&o, &["LoRA adapter", "base"]);
}

#[test]
fn pickled_adapters_with_adapter_names_and_base_layers() {
    let fam = Family::new();
    let base = fam.setup.base.clone();
    let w = |m: &str| shape_of(&base, &format!("{m}.weight"));
    let q = lora(Q0, &w(Q0), 3, 1.5, false, 70);
    let emb = lora(EMBED, &w(EMBED), 2, 4.0, true, 71);
    let embed_base = base
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    // The embedding's own weight, saved by PEFT as base_layer (trained).
    let saved = T::new(
        "base_model.model.model.embed_tokens.base_layer.weight",
        Ty::BF16,
        &embed_base.shape,
        embed_base
            .values
            .iter()
            .zip(noise(72, embed_base.values.len(), 0.02))
            .map(|(b, d)| b + d)
            .collect(),
    );
    let named = |t: &T, name: String| T { name, ..t.clone() };
    let p = "base_model.model";
    let tensors = vec![
        named(&q.a, format!("{p}.{Q0}.lora_A.default.weight")),
        named(&q.b, format!("{p}.{Q0}.lora_B.default.weight")),
        named(&emb.a, format!("{p}.{EMBED}.lora_embedding_A.default")),
        named(&emb.b, format!("{p}.{EMBED}.lora_embedding_B.default")),
        saved.clone(),
    ];
    let dir = fam.setup.path("pickled");
    std::fs::create_dir_all(&dir).unwrap();
    write_pth(&dir.join("adapter_model.bin"), &tensors, &[]);
    let mut config = lora_config(3, 4.5, &["q_proj", "embed_tokens"]);
    config["rank_pattern"] = serde_json::json!({"embed_tokens": 2});
    config["alpha_pattern"] = serde_json::json!({"embed_tokens": 8});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();

    let o = merge(
        &fam,
        "out",
        &["pickled"],
        &["--lambdas", "1", "--dtype", "f64"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(fam.setup.path("out").join("model.safetensors")).unwrap();
    let merged = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let q_delta = q.delta();
    let emb_delta = emb.delta();
    for b in base.iter().filter(|b| b.ty != Ty::I64) {
        let got: Vec<f64> = merged
            .tensor(&b.name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<f64> = match b.name.as_str() {
            n if n == format!("{Q0}.weight") => {
                b.values.iter().zip(&q_delta).map(|(b, d)| b + d).collect()
            }
            // PEFT's merge: the saved base layer plus the LoRA product.
            "model.embed_tokens.weight" => saved
                .values
                .iter()
                .zip(&emb_delta)
                .map(|(s, d)| s + d)
                .collect(),
            _ => b.values.clone(),
        };
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-14 * w.abs().max(1e-3),
                "{}[{j}]: {g} vs {w}",
                b.name
            );
        }
    }
}

#[test]
fn whole_model_ties_selects_over_an_adapters_task_vector() {
    let fam = Family::new();
    let full = fine_tune(&fam.setup.base, 5, 0.01, Ty::BF16);
    let o = merge(
        &fam,
        "ties",
        &["good", "r8"],
        &[
            "--method",
            "ties",
            "--density",
            "0.3",
            "--density-scope",
            "model",
            "--lambdas",
            "1",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let order = storage_order(&fam.setup.path("base"));
    let w = [1.0, 2.0];
    let delta = |i: usize, name: &str| match i {
        0 => fam.delta("good", name, Some(&full)),
        _ => fam.delta("r8", name, None),
    };
    // Each model keeps its max(1, ⌊0.3 N⌋) largest |d| over its whole task
    // vector (zeros of untouched tensors included), earlier entries first
    // among equal magnitudes.
    let keep: Vec<BTreeMap<String, Vec<bool>>> = (0..2)
        .map(|i| {
            let all: Vec<f64> = order.iter().flat_map(|n| delta(i, n)).collect();
            let k = ((0.3 * all.len() as f64).floor() as usize).max(1);
            let mut idx: Vec<usize> = (0..all.len()).collect();
            idx.sort_by(|&a, &b| all[b].abs().total_cmp(&all[a].abs()).then(a.cmp(&b)));
            let mut mask = vec![false; all.len()];
            for &j in &idx[..k] {
                mask[j] = true;
            }
            let mut at = 0;
            order
                .iter()
                .map(|n| {
                    let len = delta(i, n).len();
                    at += len;
                    (n.clone(), mask[at - len..at].to_vec())
                })
                .collect()
        })
        .collect();
    let merged = read_model(&fam.setup.path("ties"));
    for b in &fam.setup.base {
        // Sign election over the trimmed, weighted deltas; normalised by
        // the agreeing weights.
        let v: Vec<Vec<f64>> = (0..2)
            .map(|i| {
                let d = delta(i, &b.name);
                let k = &keep[i][&b.name];
                d.iter()
                    .zip(k)
                    .map(|(d, &k)| if k { w[i] * d } else { 0.0 })
                    .collect()
            })
            .collect();
        let exact: Vec<f64> = (0..b.values.len())
            .map(|j| {
                let s: f64 = v.iter().map(|v| v[j]).sum();
                let (mut sum, mut div) = (0.0, 0.0);
                for (vi, wi) in v.iter().zip(w) {
                    if (s >= 0.0 && vi[j] > 0.0) || (s < 0.0 && vi[j] < 0.0) {
                        sum += vi[j];
                        div += wi;
                    }
                }
                b.values[j] + sum / if div == 0.0 { 1.0 } else { div }
            })
            .collect();
        assert_rounded(&b.name, b.ty, &merged[&b.name].bytes, &exact);
    }
}

#[test]
fn an_adapter_in_the_hub_cache_is_found_by_id() {
    let fam = Family::new();
    let o = merge(&fam, "by-path", &["r8"], &["--lambdas", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The adapter laid out as huggingface_hub caches it: blobs, a snapshot
    // of relative links, refs/main.
    let cache = fam.setup.path("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--acme--r8-lora");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, name) in ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .enumerate()
    {
        let blob = format!("{:064x}", i + 1);
        std::fs::copy(
            fam.setup.path("r8").join(name),
            repo.join("blobs").join(&blob),
        )
        .unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(name)).unwrap();
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let (base, out) = (fam.setup.s("base"), fam.setup.s("by-id"));
    let o = run_env(
        "ta-merge",
        &[
            "--quiet",
            "--base-model-path",
            &base,
            "--other-model-paths",
            "acme/r8-lora",
            "--lambdas",
            "1",
            "--output-path",
            &out,
        ],
        &[("HF_HUB_CACHE", &cache), ("HF_HUB_OFFLINE", Path::new("1"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |dir: &str| std::fs::read(fam.setup.path(dir).join("model.safetensors")).unwrap();
    assert!(
        read("by-id") == read("by-path"),
        "the cached adapter merges differently"
    );
    let record =
        std::fs::read_to_string(fam.setup.path("by-id").join("merge_record.json")).unwrap();
    assert!(
        record.contains("\"name\": \"r8-lora\"") && record.contains("\"rank\": 8"),
        "{record}"
    );
}
