//! End-to-end tests of `ta-merge` on generated families: every merged
//! element is checked against an independent f64 computation, rounded by
//! the test's own nearest-value search.

mod common;

use common::*;
use std::path::Path;

/// Independent exp-mode weights: exp(-beta L / mean L), normalised.
fn exp_weights(norms: &[f64], beta: f64) -> Vec<f64> {
    let mean = norms.iter().sum::<f64>() / norms.len() as f64;
    let raw: Vec<f64> = norms.iter().map(|l| (-beta * l / mean).exp()).collect();
    let s: f64 = raw.iter().sum();
    raw.iter().map(|w| w / s).collect()
}

/// Checks every tensor of the merged folder `out` against
/// base + Σ λ_i (m_i − base) computed in f64 and correctly rounded to the
/// output type (`out_ty`, else the base's). An element may differ by one
/// unit in the last place only where the exact value is a tie between two
/// neighbours (to f64 precision), where the order of f64 additions decides.
/// Returns the number of elements checked.
fn check_merged(
    out: &Path,
    base: &[T],
    models: &[Vec<T>],
    lambdas: &[f64],
    out_ty: Option<Ty>,
) -> usize {
    let merged = read_model(out);
    assert_eq!(
        merged.len(),
        base.len(),
        "tensor count: {:?}",
        merged.keys()
    );
    let mut checked = 0;
    let mut ties = 0;
    for b in base {
        let got = merged
            .get(&b.name)
            .unwrap_or_else(|| panic!("{} missing from output", b.name));
        assert_eq!(got.shape, b.shape, "{}", b.name);
        if b.ty == Ty::I64 {
            assert_eq!(
                got.bytes,
                b.ty.encode(&b.values),
                "{} must be copied verbatim",
                b.name
            );
            continue;
        }
        let ty = out_ty.unwrap_or(b.ty);
        assert_eq!(got.ty, ty, "{}", b.name);
        let got_bits = ty.bits(&got.bytes);
        let got_values = ty.decode(&got.bytes);
        for (j, &bv) in b.values.iter().enumerate() {
            let mut exact = bv;
            for (m, &lambda) in models.iter().zip(lambdas) {
                if let Some(t) = m.iter().find(|t| t.name == b.name) {
                    exact += lambda * (t.values[j] - bv);
                }
            }
            let want = ty.bits(&ty.round(exact))[0];
            let diff = (got_bits[j] - want).abs();
            assert!(
                diff <= 1,
                "{}[{j}]: got bits {:#x}, want {want:#x} (exact {exact})",
                b.name,
                got_bits[j]
            );
            if diff == 1 {
                // Only a value on (or within f64 rounding of) the midpoint
                // between two neighbours may round either way.
                let mid = (ty.decode(&ty.round(exact))[0] + got_values[j]) / 2.0;
                assert!(
                    (exact - mid).abs() <= 1e-12 * exact.abs(),
                    "{}[{j}]: got {}, want {} (exact {exact:e}), not a tie",
                    b.name,
                    got_values[j],
                    ty.decode(&ty.round(exact))[0]
                );
                ties += 1;
            }
            checked += 1;
        }
    }
    assert!(
        ties * 100 <= checked,
        "{ties} of {checked} elements rounded the other way at a tie"
    );
    checked
}

struct Family {
    dir: tempfile::TempDir,
    base: Vec<T>,
    models: Vec<Vec<T>>,
}

impl Family {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
    fn model_paths(&self) -> Vec<String> {
        (0..self.models.len())
            .map(|i| self.path(&format!("m{i}")))
            .collect()
    }
}

/// A base and fine-tunes of scales `scales` (0 = identical to the base).
fn family(ty: Ty, shards: usize, tied: bool, scales: &[f64]) -> Family {
    let dir = tempfile::tempdir().unwrap();
    let base = base_tensors(ty, tied);
    write_model(&dir.path().join("base"), &base, shards, tied);
    write_side_files(&dir.path().join("base"));
    let models: Vec<Vec<T>> = scales
        .iter()
        .enumerate()
        .map(|(i, &s)| fine_tune(&base, i as u64 + 10, s, ty))
        .collect();
    for (i, m) in models.iter().enumerate() {
        write_model(&dir.path().join(format!("m{i}")), m, shards, tied);
    }
    Family { dir, base, models }
}

fn merge_args<'a>(
    f: &'a Family,
    models: &'a [String],
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let _ = f;
    let mut a = vec!["--base_model_path", f_base(f), "--other_model_paths"];
    a.extend(models.iter().map(String::as_str));
    a.extend(["--output_path", out, "--quiet"]);
    a.extend_from_slice(extra);
    a
}

fn f_base(f: &Family) -> &'static str {
    Box::leak(f.path("base").into_boxed_str())
}

#[test]
fn original_command_reproduces_the_seed_weight_table() {
    let f = family(Ty::BF16, 1, false, &[0.01, 0.005, 0.0, 0.001, 0.002]);
    let models = f.model_paths();
    let out = f.path("merged");
    let norms = [
        "182.63449804",
        "31.87331430",
        "0.00000000",
        "0.52867741",
        "9.26351817",
    ];
    let mut args = merge_args(
        &f,
        &models,
        &out,
        &["--mode", "exp", "--device", "cpu", "--l2_norms"],
    );
    args.extend(norms);
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for (i, want) in ["0.005153", "0.148450", "0.302100", "0.298560", "0.245736"]
        .iter()
        .enumerate()
    {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("m{i} ")))
            .expect("table row");
        assert!(line.contains(&format!("λ={want}")), "{line}");
        assert!(
            line.contains(&format!("L2={:.4}", norms[i].parse::<f64>().unwrap())),
            "{line}"
        );
    }
    let norms: Vec<f64> = norms.iter().map(|n| n.parse().unwrap()).collect();
    let lambdas = exp_weights(&norms, 1.0);
    check_merged(Path::new(&out), &f.base, &f.models, &lambdas, None);
}

#[test]
fn bf16_single_file_merge_is_correctly_rounded() {
    let f = family(Ty::BF16, 1, false, &[0.02, 0.0, 0.004]);
    let models = f.model_paths();
    let out = f.path("merged");
    let args = merge_args(&f, &models, &out, &["--l2_norms", "3.0", "0", "0.5"]);
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let n = check_merged(
        Path::new(&out),
        &f.base,
        &f.models,
        &exp_weights(&[3.0, 0.0, 0.5], 1.0),
        None,
    );
    assert!(n > 3000);
}

#[test]
fn f16_sharded_linear_merge_is_correctly_rounded() {
    let f = family(Ty::F16, 3, false, &[0.03, 0.01]);
    let models = f.model_paths();
    let out = f.path("merged");
    let args = merge_args(
        &f,
        &models,
        &out,
        &["--mode", "linear", "--l2_norms", "2", "6"],
    );
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    // linear: w = 1/L normalised: (1/2, 1/6) / (2/3) = (0.75, 0.25)
    check_merged(Path::new(&out), &f.base, &f.models, &[0.75, 0.25], None);
}

#[test]
fn f32_power_merge_and_conversion_to_bf16() {
    let f = family(Ty::F32, 2, false, &[0.01, 0.02]);
    let models = f.model_paths();
    let out = f.path("merged");
    let args = merge_args(
        &f,
        &models,
        &out,
        &["--mode", "power", "--alpha", "2", "--l2_norms", "1", "2"],
    );
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    // power, alpha 2: (1, 1/4) / 1.25
    check_merged(Path::new(&out), &f.base, &f.models, &[0.8, 0.2], None);

    let out16 = f.path("merged-bf16");
    let args = merge_args(
        &f,
        &models,
        &out16,
        &["--dtype", "bf16", "--lambdas", "0.5", "-0.25"],
    );
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    check_merged(
        Path::new(&out16),
        &f.base,
        &f.models,
        &[0.5, -0.25],
        Some(Ty::BF16),
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out16).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn tied_embeddings_are_merged_once_as_stored() {
    let f = family(Ty::BF16, 1, true, &[0.02, 0.01]);
    let models = f.model_paths();
    let out = f.path("merged");
    let args = merge_args(&f, &models, &out, &["--lambdas", "0.6", "0.4"]);
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("tied embeddings"), "{}", stdout(&o));
    let merged = read_model(Path::new(&out));
    assert!(!merged.contains_key("lm_head.weight"));
    check_merged(Path::new(&out), &f.base, &f.models, &[0.6, 0.4], None);
}

#[test]
fn missing_extra_and_non_float_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = base_tensors(Ty::BF16, false);
    base.push(T::new(
        "model.position_ids",
        Ty::I64,
        &[5],
        vec![0.0, 1.0, 2.0, 3.0, 4.0],
    ));
    let m0 = fine_tune(&base[..base.len() - 1], 3, 0.02, Ty::BF16);
    // m1 lacks one layer's q_proj and stores an extra tensor; it is also
    // stored in f32 while the base is bf16.
    let mut m1 = fine_tune(&base[..base.len() - 1], 4, 0.01, Ty::F32);
    m1.retain(|t| t.name != "model.layers.1.self_attn.q_proj.weight");
    m1.push(T::new(
        "model.extra_head.weight",
        Ty::F32,
        &[3],
        vec![1.0, 2.0, 3.0],
    ));
    write_model(&dir.path().join("base"), &base, 2, false);
    write_model(&dir.path().join("m0"), &m0, 1, false);
    write_model(&dir.path().join("m1"), &m1, 2, false);
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let out = p("merged");
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &p("base"),
            "--other-model-paths",
            &p("m0"),
            &p("m1"),
            "--output-path",
            &out,
            "--lambdas",
            "0.7",
            "0.3",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("model 'm1' lacks 1 tensor"), "{text}");
    assert!(
        text.contains("model.layers.1.self_attn.q_proj.weight"),
        "{text}"
    );
    assert!(text.contains("model.extra_head.weight"), "{text}");
    check_merged(Path::new(&out), &base, &[m0, m1], &[0.7, 0.3], None);
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("merge_record.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        record["models"][1]["missing_tensors"][0],
        "model.layers.1.self_attn.q_proj.weight"
    );
    assert_eq!(
        record["models"][1]["extra_tensors"][0],
        "model.extra_head.weight"
    );
}

#[test]
fn output_layout_is_what_transformers_loads() {
    let f = family(Ty::BF16, 2, false, &[0.02, 0.01]);
    write_side_files(&f.dir.path().join("m0"));
    let models = f.model_paths();
    let out = f.path("merged");
    let inputs_before = snapshot(f.dir.path());
    let args = merge_args(
        &f,
        &models,
        &out,
        &["--l2_norms", "1", "2", "--max-shard-size", "3kB"],
    );
    let o = run("ta-merge", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = Path::new(&out);

    // Shards, each with format metadata and at most 3 kB of data unless a
    // single tensor is larger.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.len(), f.base.len());
    let mut shard_files: Vec<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    shard_files.sort();
    shard_files.dedup();
    let n = shard_files.len();
    assert!(n > 2);
    let mut total = 0u64;
    for (k, file) in shard_files.iter().enumerate() {
        assert_eq!(*file, format!("model-{:05}-of-{n:05}.safetensors", k + 1));
        let bytes = std::fs::read(out.join(file)).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "pt");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data: u64 = st
            .tensors()
            .iter()
            .map(|(_, v)| v.data().len() as u64)
            .sum();
        assert!(
            data <= 3000 || st.len() == 1,
            "{file}: {data} bytes in {} tensors",
            st.len()
        );
        for (name, _) in st.tensors() {
            assert_eq!(weight_map[&name], *file);
        }
        total += data;
    }
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), total);
    let expected_total: u64 = f
        .base
        .iter()
        .map(|t| (t.values.len() * t.ty.size()) as u64)
        .sum();
    assert_eq!(total, expected_total);

    // Side files: config with dtype, byte-for-byte copies, card and record.
    let base_dir = f.dir.path().join("base");
    for copied in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        assert_eq!(
            std::fs::read(out.join(copied)).unwrap(),
            std::fs::read(base_dir.join(copied)).unwrap(),
            "{copied}"
        );
    }
    assert!(!out.join("trainer_state.json").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["model_type"], "llama");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merge_record.json")).unwrap())
            .unwrap();
    assert_eq!(record["mode"], "exp");
    assert_eq!(record["total_size"].as_u64().unwrap(), expected_total);
    assert_eq!(record["shards"].as_u64().unwrap() as usize, n);
    assert_eq!(
        record["tensors_merged"].as_u64().unwrap() as usize,
        f.base.len()
    );
    assert_eq!(record["tensors_copied"], 0);
    assert_eq!(record["dtype"], "bfloat16");
    assert_eq!(record["tied_embeddings"], false);
    assert_eq!(record["models"][0]["l2_norm"], 1.0);
    let want = exp_weights(&[1.0, 2.0], 1.0);
    assert!((record["models"][1]["lambda"].as_f64().unwrap() - want[1]).abs() < 1e-15);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model:") && card.contains("task-arithmetic"),
        "{card}"
    );

    // Nothing else beside the output, inputs untouched.
    assert_eq!(entries(f.dir.path()), ["base", "m0", "m1", "merged"]);
    let mut after = snapshot(f.dir.path());
    after.retain(|p, _| !p.starts_with(out));
    assert_eq!(inputs_before, after);
    check_merged(out, &f.base, &f.models, &want, None);
}

#[test]
fn hub_ids_resolve_from_the_local_cache() {
    let f = family(Ty::BF16, 1, false, &[0.02]);
    let cache = f.dir.path().join("hub");
    let snap = cache
        .join("models--acme--tiny-base")
        .join("snapshots")
        .join("abc1230000000000000000000000000000000000");
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::fs::rename(f.dir.path().join("base"), &snap).unwrap();
    std::fs::create_dir_all(cache.join("models--acme--tiny-base/refs")).unwrap();
    std::fs::write(
        cache.join("models--acme--tiny-base/refs/main"),
        "abc1230000000000000000000000000000000000",
    )
    .unwrap();
    let out = f.path("merged");
    let m0 = f.path("m0");
    let args = [
        "--base_model_path",
        "acme/tiny-base",
        "--other_model_paths",
        &m0,
        "--output_path",
        &out,
        "--lambdas",
        "1.0",
        "--quiet",
    ];
    let o = run_env("ta-merge", &args, &[("HF_HUB_CACHE", &cache)]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_merged(Path::new(&out), &f.base, &f.models, &[1.0], None);

    let args = [
        "--base_model_path",
        "acme/not-here",
        "--other_model_paths",
        &m0,
        "--output_path",
        &out,
        "--lambdas",
        "1.0",
        "--force",
    ];
    // Offline, so the missing model is not looked for on the network
    // (downloads are tested against a loopback hub in tests/hub.rs).
    let env = [
        ("HF_HUB_CACHE", cache.as_path()),
        ("HF_HUB_OFFLINE", Path::new("1")),
    ];
    let o = run_env("ta-merge", &args, &env);
    assert_one_line_error(&o, &["acme/not-here", "Hugging Face cache"]);
}

#[test]
fn dry_run_and_force() {
    let f = family(Ty::BF16, 1, false, &[0.02, 0.01]);
    let models = f.model_paths();
    let out = f.path("merged");
    let o = run(
        "ta-merge",
        &merge_args(&f, &models, &out, &["--l2_norms", "1", "2", "--dry-run"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("plan:") && stdout(&o).contains("nothing written"));
    assert_eq!(entries(f.dir.path()), ["base", "m0", "m1"]);

    let o = run(
        "ta-merge",
        &merge_args(&f, &models, &out, &["--lambdas", "1", "0"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    check_merged(Path::new(&out), &f.base, &f.models, &[1.0, 0.0], None);
    let o = run(
        "ta-merge",
        &merge_args(&f, &models, &out, &["--lambdas", "0", "1"]),
    );
    assert_one_line_error(&o, &["already exists", "--force"]);
    let o = run(
        "ta-merge",
        &merge_args(&f, &models, &out, &["--lambdas", "0", "1", "--force"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    check_merged(Path::new(&out), &f.base, &f.models, &[0.0, 1.0], None);
    assert_eq!(entries(f.dir.path()), ["base", "m0", "m1", "merged"]);
}

/// Runs a failing merge and checks the one-line error, that no output (or
/// temporary folder) appeared and that the inputs are unchanged.
fn assert_refused(f: &Family, args: &[&str], needles: &[&str]) {
    let before = snapshot(f.dir.path());
    let names = entries(f.dir.path());
    let o = run("ta-merge", args);
    assert_one_line_error(&o, needles);
    assert_eq!(
        entries(f.dir.path()),
        names,
        "{args:?} left something behind"
    );
    assert_eq!(snapshot(f.dir.path()), before, "{args:?} changed an input");
}

#[test]
fn bad_weights_and_flags_are_refused_with_one_line() {
    let f = family(Ty::BF16, 1, false, &[0.02, 0.0]);
    let models = f.model_paths();
    let out = f.path("merged");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--l2_norms", "1"], vec!["1 norms for 2 models"]),
        (vec!["--l2_norms", "1", "-2"], vec!["m1", "-2"]),
        (vec!["--l2_norms", "1", "NaN"], vec!["m1", "NaN"]),
        (
            vec!["--l2_norms", "1", "0", "--mode", "linear"],
            vec!["m1", "norm 0", "--mode exp"],
        ),
        (
            vec!["--l2_norms", "1", "0", "--mode", "power"],
            vec!["m1", "--mode exp"],
        ),
        (
            vec!["--l2_norms", "0", "0"],
            vec!["--l2_norms: every norm is 0"],
        ),
        (
            vec!["--l2_norms", "1", "2", "--lambdas", "1", "2"],
            vec!["--lambdas"],
        ),
        (vec!["--lambdas", "1"], vec!["1 weights for 2 models"]),
        (vec![], vec!["--l2_norms", "--lambdas"]),
        (
            vec!["--lambdas", "1", "1", "--device", "cuda"],
            vec!["--device", "CUDA"],
        ),
        (
            vec!["--lambdas", "1", "1", "--device", "tpu"],
            vec!["--device", "tpu"],
        ),
        (
            vec!["--lambdas", "1", "1", "--dtype", "int8"],
            vec!["--dtype", "int8"],
        ),
        (
            vec!["--lambdas", "1", "1", "--max-shard-size", "big"],
            vec!["--max-shard-size"],
        ),
        (
            vec!["--lambdas", "1", "1", "--mode", "cubic"],
            vec!["cubic"],
        ),
    ];
    for (extra, needles) in cases {
        let args = merge_args(&f, &models, &out, &extra);
        assert_refused(&f, &args, &needles);
    }
}

#[test]
fn bad_inputs_and_output_locations_are_refused() {
    let f = family(Ty::BF16, 1, false, &[0.02]);
    let base = f.path("base");
    let m0 = f.path("m0");
    let missing = f.path("nope");
    let inside = f.path("base/merged");
    let outer = f.dir.path().to_string_lossy().into_owned();
    let out = f.path("merged");
    let common = |b: &str, m: &str, o: &str| -> Vec<String> {
        [
            "--base_model_path",
            b,
            "--other_model_paths",
            m,
            "--output_path",
            o,
            "--lambdas",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (common(&base, &missing, &out), vec!["nope", "no such file"]),
        (common(&missing, &m0, &out), vec!["base model", "nope"]),
        (common(&base, &m0, &inside), vec!["inside input"]),
        (common(&base, &m0, &base), vec!["inside input"]),
        (common(&base, &m0, &outer), vec!["contains input"]),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&f, &args, &needles);
    }

    // A fine-tune with one tensor of another shape.
    let mut odd = f.models[0].clone();
    odd[0] = T::new(&odd[0].name, Ty::BF16, &[38, 16], vec![0.0; 38 * 16]);
    write_model(&f.dir.path().join("odd"), &odd, 1, false);
    let args = common(&base, &f.path("odd"), &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(
        &f,
        &args,
        &["model.embed_tokens.weight", "'odd'", "[38, 16]", "[37, 16]"],
    );

    // A folder with no weights.
    std::fs::create_dir(f.dir.path().join("empty")).unwrap();
    let args = common(&base, &f.path("empty"), &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_refused(&f, &args, &["empty", "no weights"]);
}
