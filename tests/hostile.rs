//! Hostile inputs, interruptions and full disks: both tools must exit
//! non-zero with one line naming the culprit, leave no output or temporary
//! folder behind, and leave their inputs byte for byte unchanged.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;

impl Setup {
    fn new() -> Self {
        Setup::with_side_files(false)
    }

    /// A model folder `name` holding `model.safetensors` = `bytes`.
    fn raw_model(&self, name: &str, bytes: &[u8]) {
        std::fs::create_dir_all(self.path(name)).unwrap();
        std::fs::write(self.path(name).join("model.safetensors"), bytes).unwrap();
    }

    fn merge(&self, model: &str, extra: &[&str]) -> Output {
        let (base, good, m, out) = (
            self.s("base"),
            self.s("good"),
            self.s(model),
            self.s("merged"),
        );
        let mut args = vec![
            "--base-model-path",
            &base,
            "--other-model-paths",
            &good,
            &m,
            "--output-path",
            &out,
            "--lambdas",
            "0.5",
            "0.5",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        run("ta-merge", &args)
    }

    fn analyze(&self, model: &str, extra: &[&str]) -> Output {
        let (base, good, m, out) = (
            self.s("base"),
            self.s("good"),
            self.s(model),
            self.s("stats"),
        );
        let mut args = vec![
            "--base", &base, "--models", &good, &m, "--outdir", &out, "--quiet",
        ];
        args.extend_from_slice(extra);
        run("ta-analyze", &args)
    }

    /// Runs both tools on `model` and checks each refuses cleanly.
    fn refused_by_both(&self, model: &str, needles: &[&str]) {
        let before = snapshot(self.dir.path());
        let names = entries(self.dir.path());
        for (tool, o) in [
            ("ta-merge", self.merge(model, &[])),
            ("ta-analyze", self.analyze(model, &[])),
        ] {
            assert_one_line_error(&o, needles);
            assert_eq!(
                entries(self.dir.path()),
                names,
                "{tool} on {model} left something behind"
            );
            assert_eq!(
                snapshot(self.dir.path()),
                before,
                "{tool} on {model} changed an input"
            );
        }
    }
}

/// A safetensors file from a header text and data, padded as the format
/// requires (the header text is written as given).
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h.as_bytes());
    out.extend(data);
    out
}

/// A model like the base but with one tensor's entry replaced: the good
/// fine-tune's file with its header rewritten by `edit`.
fn edited_header(setup: &Setup, edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let bytes = std::fs::read(setup.path("good/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    safetensors_bytes(&header.to_string(), &bytes[8 + n..])
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn malformed_shards_are_refused_naming_the_file() {
    let s = Setup::new();
    let good = std::fs::read(s.path("good/model.safetensors")).unwrap();

    s.raw_model("truncated", &good[..good.len() - 10]);
    s.refused_by_both(
        "truncated",
        &["truncated/model.safetensors", "file length does not match"],
    );

    let mut long = good.clone();
    long[..8].copy_from_slice(&(good.len() as u64 + 100).to_le_bytes());
    s.raw_model("longheader", &long);
    s.refused_by_both(
        "longheader",
        &["longheader/model.safetensors", "header length"],
    );

    s.raw_model("notjson", &safetensors_bytes("{this is not json", &[0; 8]));
    s.refused_by_both(
        "notjson",
        &["notjson/model.safetensors", "not valid safetensors JSON"],
    );

    s.raw_model("wrongshape", &safetensors_bytes(r#"{"a": [1, 2, 3]}"#, &[]));
    s.refused_by_both(
        "wrongshape",
        &["wrongshape/model.safetensors", "not valid safetensors JSON"],
    );

    s.raw_model("tiny", &[1, 2, 3]);
    s.refused_by_both("tiny", &["tiny/model.safetensors", "too short"]);

    let out_of_range = edited_header(&s, |h| {
        h[Q]["data_offsets"][1] = serde_json::json!(1u64 << 40)
    });
    s.raw_model("range", &out_of_range);
    s.refused_by_both("range", &["range/model.safetensors"]);

    let overlap = edited_header(&s, |h| {
        let start = h[Q]["data_offsets"][0].as_u64().unwrap();
        h[Q]["data_offsets"] = serde_json::json!([start.saturating_sub(2), start + 510]);
    });
    s.raw_model("overlap", &overlap);
    s.refused_by_both("overlap", &["overlap/model.safetensors", "data_offsets"]);

    let wrong_size = edited_header(&s, |h| h[Q]["shape"] = serde_json::json!([16, 15]));
    s.raw_model("wrongsize", &wrong_size);
    s.refused_by_both("wrongsize", &["wrongsize/model.safetensors"]);

    let dtype = edited_header(&s, |h| h[Q]["dtype"] = serde_json::json!("Q7"));
    s.raw_model("dtype", &dtype);
    s.refused_by_both("dtype", &["dtype/model.safetensors", "Q7"]);
}

#[test]
fn broken_indexes_missing_paths_and_empty_folders() {
    let s = Setup::new();
    let ft = fine_tune(&s.base, 6, 0.01, Ty::BF16);

    write_model(&s.path("noshard"), &ft, 2, false);
    std::fs::remove_file(s.path("noshard/model-00002-of-00002.safetensors")).unwrap();
    s.refused_by_both(
        "noshard",
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );

    write_model(&s.path("elsewhere"), &ft, 2, false);
    let index_path = s.path("elsewhere/model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let name = ft[0].name.clone();
    let file = index["weight_map"][&name].as_str().unwrap().to_string();
    let other = if file.contains("00001") {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    index["weight_map"][&name] = serde_json::json!(other);
    std::fs::write(&index_path, index.to_string()).unwrap();
    s.refused_by_both("elsewhere", &[&file, &name, "puts in"]);

    write_model(&s.path("badindex"), &ft, 2, false);
    std::fs::write(s.path("badindex/model.safetensors.index.json"), "{ nope").unwrap();
    s.refused_by_both(
        "badindex",
        &[
            "badindex/model.safetensors.index.json",
            "not a valid index json",
        ],
    );

    std::fs::create_dir(s.path("empty")).unwrap();
    std::fs::write(s.path("empty/config.json"), "{}").unwrap();
    s.refused_by_both("empty", &["empty", "no weights found"]);

    s.refused_by_both(
        "does-not-exist",
        &["does-not-exist", "no such file or folder"],
    );

    // The same names, but every shape differs (another size of the
    // architecture): not analysed as a zero task vector.
    let other_size: Vec<T> = ft
        .iter()
        .map(|t| {
            let mut t = t.clone();
            t.shape.push(1);
            t
        })
        .collect();
    write_model(&s.path("other-size"), &other_size, 1, false);
    s.refused_by_both(
        "other-size",
        &[
            "model 'other-size'",
            "none of its tensors has the base's shape",
        ],
    );

    // An adapter folder that lost its adapter_config.json.
    write_model(&s.path("no-config"), &ft, 1, false);
    std::fs::rename(
        s.path("no-config/model.safetensors"),
        s.path("no-config/adapter_model.safetensors"),
    )
    .unwrap();
    s.refused_by_both(
        "no-config",
        &[
            "no-config/adapter_model.safetensors",
            "no adapter_config.json",
        ],
    );

    // A checkpoint folder that also holds such a file is a checkpoint.
    write_model(&s.path("with-adapter-file"), &ft, 1, false);
    std::fs::copy(
        s.path("no-config/adapter_model.safetensors"),
        s.path("with-adapter-file/adapter_model.safetensors"),
    )
    .unwrap();
    let o = s.merge("with-adapter-file", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn other_architectures_shape_and_dtype_differences() {
    let s = Setup::new();
    // A different architecture: no tensor names in common.
    let alien: Vec<T> = s
        .base
        .iter()
        .map(|t| {
            T::new(
                &format!("transformer.{}", t.name),
                t.ty,
                &t.shape,
                t.values.clone(),
            )
        })
        .collect();
    write_model(&s.path("alien"), &alien, 1, false);
    s.refused_by_both("alien", &["'alien'", "shares only 0 of the base's"]);

    // A resized vocabulary: the merge names the way out, and takes it.
    let mut resized = fine_tune(&s.base, 7, 0.01, Ty::BF16);
    resized[0] = T::new(&resized[0].name, Ty::BF16, &[40, 16], noise(3, 640, 0.05));
    write_model(&s.path("resized"), &resized, 1, false);
    let o = s.merge("resized", &[]);
    assert_one_line_error(
        &o,
        &[
            "model.embed_tokens.weight",
            "'resized'",
            "[40, 16]",
            "--skip-mismatched",
        ],
    );
    assert!(!s.path("merged").exists());
    let o = s.merge("resized", &["--skip-mismatched"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("with another shape, left out: model.embed_tokens.weight"),
        "{}",
        stdout(&o)
    );
    // The embedding comes from the good model alone: b + 0.5 (good - b).
    let good = fine_tune(&s.base, 5, 0.01, Ty::BF16);
    let merged = read_model(&s.path("merged"));
    let got = Ty::BF16.decode(&merged["model.embed_tokens.weight"].bytes);
    for (j, g) in got.iter().enumerate() {
        let exact = s.base[0].values[j] + 0.5 * (good[0].values[j] - s.base[0].values[j]);
        let want = Ty::BF16.decode(&Ty::BF16.round(exact))[0];
        assert!(
            *g == want || (exact - (g + want) / 2.0).abs() <= 1e-12 * exact.abs(),
            "[{j}] {g} vs {want}"
        );
    }

    // Another float type than the base: converted, not refused.
    write_model(
        &s.path("f16"),
        &fine_tune(&s.base, 8, 0.01, Ty::F16),
        1,
        false,
    );
    let o = s.analyze("f16", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = s.merge("f16", &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn nonfinite_values_are_reported_and_refused_unless_allowed() {
    let s = Setup::new();
    let mut nan = fine_tune(&s.base, 9, 0.01, Ty::BF16);
    let q = nan.iter_mut().find(|t| t.name == Q).unwrap();
    q.values[3] = f64::NAN;
    q.values[7] = f64::INFINITY;
    write_model(&s.path("nan"), &nan, 1, false);

    let o = s.analyze("nan", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = std::fs::read_to_string(s.path("stats/nan/per_param_stats.csv")).unwrap();
    let header: Vec<&str> = rows.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "nonfinite").unwrap();
    let row = rows.lines().find(|l| l.starts_with(Q)).unwrap();
    // The shape field holds a quoted comma; count fields from the end.
    let fields: Vec<&str> = row.rsplit(',').collect();
    assert_eq!(fields[header.len() - 1 - col], "2", "{row}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("stats/nan/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["nonfinite_elements"], 2);

    let before = snapshot(s.dir.path());
    let o = s.merge("nan", &[]);
    assert_one_line_error(
        &o,
        &[Q, "model 'nan'", "NaN or infinite", "--allow-nonfinite"],
    );
    assert!(!s.path("merged").exists());
    let mut after = snapshot(s.dir.path());
    after.retain(|p, _| p.exists());
    assert_eq!(before, after);
    let o = s.merge("nan", &["--allow-nonfinite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = read_model(&s.path("merged"));
    assert!(Ty::BF16.decode(&merged[Q].bytes)[3].is_nan());
    // --verify catches what was let through.
    let o = run("ta-merge", &["--verify", &s.s("merged")]);
    assert_one_line_error(&o, &[Q, "2 NaN or infinite values"]);
}

#[test]
fn verify_accepts_a_good_merge_and_names_what_is_broken() {
    let s = Setup::new();
    let (base, good, out) = (s.s("base"), s.s("good"), s.s("merged"));
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &base,
            "--other-model-paths",
            &good,
            "--output-path",
            &out,
            "--lambdas",
            "0.5",
            "--max-shard-size",
            "4kB",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run("ta-merge", &["--verify", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));

    let index = s.path("merged/model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["metadata"]["total_size"] = serde_json::json!(12345);
    std::fs::write(&index, v.to_string()).unwrap();
    let o = run("ta-merge", &["--verify", &out]);
    assert_one_line_error(&o, &["model.safetensors.index.json", "total_size is 12345"]);
    std::fs::write(&index, &text).unwrap();

    let mut files: Vec<String> = v["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 2, "{files:?}");
    let shard = s.path("merged").join(&files[1]);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let o = run("ta-merge", &["--verify", &out]);
    assert_one_line_error(&o, &[&files[1], "file length does not match"]);
    std::fs::write(&shard, &bytes).unwrap();

    std::fs::write(s.path("merged/config.json"), "{\"model_type\": ").unwrap();
    let o = run("ta-merge", &["--verify", &out]);
    assert_one_line_error(&o, &["merged/config.json", "not valid JSON"]);
}

// Needs the failure injection of debug builds (`cargo test` without --release).
#[cfg(debug_assertions)]
#[test]
fn a_full_disk_fails_cleanly() {
    let s = Setup::new();
    // A nested output whose parents do not exist yet: they go too.
    let (base, good, out) = (s.s("base"), s.s("good"), s.s("new/deeper/merged"));
    let before = snapshot(s.dir.path());
    let o = run_env(
        "ta-merge",
        &[
            "--base-model-path",
            &base,
            "--other-model-paths",
            &good,
            "--output-path",
            &out,
            "--lambdas",
            "0.5",
            "--quiet",
        ],
        &[("TV_TEST_FAIL_WRITES_AFTER", Path::new("5000"))],
    );
    assert_one_line_error(&o, &["cannot write", "No space left on device"]);
    assert_eq!(entries(s.dir.path()), ["base", "good"]);
    assert_eq!(snapshot(s.dir.path()), before);
}

// Needs the segment delay of debug builds (`cargo test` without --release).
#[cfg(debug_assertions)]
#[test]
fn interrupts_remove_the_temporary_output() {
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let s = Setup::new();
        let (base, good, out) = (s.s("base"), s.s("good"), s.s("merged"));
        let child = std::process::Command::new(bin_path("ta-merge"))
            .args([
                "--base-model-path",
                &base,
                "--other-model-paths",
                &good,
                "--output-path",
                &out,
                "--lambdas",
                "0.5",
                "--quiet",
            ])
            .env("TV_TEST_SEGMENT_DELAY_MS", "200")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the temporary folder exists, then interrupt.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !entries(s.dir.path())
            .iter()
            .any(|e| e.contains(".merged.partial"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "merge never started writing"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let o = child.wait_with_output().unwrap();
        // 128 + the signal's number, as a shell reports it.
        assert_eq!(o.status.code(), Some(code), "{signal}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim(), "error: interrupted");
        assert_eq!(entries(s.dir.path()), ["base", "good"], "{signal}");
    }
}

#[test]
fn analysis_output_inside_an_input_or_over_a_foreign_folder_is_refused() {
    let s = Setup::new();
    let before = snapshot(s.dir.path());
    let (base, good) = (s.s("base"), s.s("good"));
    let inside = s.s("base/stats");
    let o = run(
        "ta-analyze",
        &["--base", &base, "--models", &good, "--outdir", &inside],
    );
    assert_one_line_error(&o, &["inside input"]);
    let o = run(
        "ta-analyze",
        &["--base", &base, "--models", &good, "--outdir", &s.s("good")],
    );
    assert_one_line_error(&o, &["inside input"]);
    let o = run(
        "ta-analyze",
        &["--base", &base, "--models", &good, "--device", "cuda:1"],
    );
    assert_one_line_error(&o, &["--device cuda:1", "CUDA"]);
    let stats = s.s("stats");
    let args = [
        "--base", &base, "--models", &good, "--outdir", &stats, "--names", "..",
    ];
    assert_one_line_error(&run("ta-analyze", &args), &["'..'", "--names"]);
    assert_eq!(snapshot(s.dir.path()), before);
    assert_eq!(entries(s.dir.path()), ["base", "good"]);
}

/// Runs `bin` with `args` as an unprivileged user when the tests run as
/// root (root reads any file), else directly.
fn run_unprivileged(bin: &str, args: &[&str]) -> Output {
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| stdout(&o).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        return run(bin, args);
    }
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            bin_path(bin),
        ])
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs the tools as an unprivileged user")
}

#[test]
fn unreadable_files_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let ft = fine_tune(&s.base, 12, 0.01, Ty::BF16);
    write_model(&s.path("locked"), &ft, 1, false);
    let locked = s.path("locked/model.safetensors");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    for dir in [
        s.dir.path().to_path_buf(),
        s.path("base"),
        s.path("good"),
        s.path("locked"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for file in std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
        {
            let mode = if file == locked { 0o000 } else { 0o644 };
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let (base, good, m) = (s.s("base"), s.s("good"), s.s("locked"));
    let (out, stats) = (s.s("merged"), s.s("stats"));
    let o = run_unprivileged(
        "ta-merge",
        &[
            "--base-model-path",
            &base,
            "--other-model-paths",
            &good,
            &m,
            "--output-path",
            &out,
            "--lambdas",
            "0.5",
            "0.5",
        ],
    );
    assert_one_line_error(&o, &["locked/model.safetensors", "ermission denied"]);
    let o = run_unprivileged(
        "ta-analyze",
        &["--base", &base, "--models", &good, &m, "--outdir", &stats],
    );
    assert_one_line_error(&o, &["locked/model.safetensors", "ermission denied"]);
    assert_eq!(entries(s.dir.path()), ["base", "good", "locked"]);
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o644)).unwrap();
}
