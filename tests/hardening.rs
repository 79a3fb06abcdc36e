//! Hardening: outputs kept apart from every real input location, only
//! the tool's own files replaced, only regular side files read, cache
//! revisions kept in the cache, leftovers of killed runs cleaned, names
//! printed on one line, empty inputs refused, huge models plotted.
//! Every refusal is one line naming the culprit, leaves nothing behind and
//! leaves the inputs byte for byte as they were.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

impl Setup {
    fn new() -> Self {
        Setup::with_side_files(true)
    }

    /// `ta-merge` of `base` and `models` into `out`, λ = 0.5 each.
    fn merge(&self, base: &str, models: &[&str], out: &str, extra: &[&str]) -> Output {
        self.merge_env(base, models, out, extra, &[])
    }

    fn merge_env(
        &self,
        base: &str,
        models: &[&str],
        out: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Output {
        let lambdas = vec!["0.5"; models.len()];
        let mut args = vec!["--base-model-path", base, "--other-model-paths"];
        args.extend_from_slice(models);
        args.extend_from_slice(&["--output-path", out, "--lambdas"]);
        args.extend_from_slice(&lambdas);
        args.push("--quiet");
        args.extend_from_slice(extra);
        run_bounded("ta-merge", &args, env, 60)
    }

    fn analyze(&self, base: &str, models: &[&str], out: &str, extra: &[&str]) -> Output {
        self.analyze_env(base, models, out, extra, &[])
    }

    fn analyze_env(
        &self,
        base: &str,
        models: &[&str],
        out: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Output {
        let mut args = vec!["--base", base, "--models"];
        args.extend_from_slice(models);
        args.extend_from_slice(&["--outdir", out, "--quiet"]);
        args.extend_from_slice(extra);
        run_bounded("ta-analyze", &args, env, 60)
    }
}

/// Asserts `o` failed with one line holding `needles`, and that the setup
/// folder is byte for byte `before` (nothing written, nothing changed).
fn refused(
    o: &Output,
    needles: &[&str],
    dir: &Path,
    before: &std::collections::BTreeMap<PathBuf, Vec<u8>>,
) {
    assert_one_line_error(o, needles);
    assert_no_controls(&stderr(o));
    assert_eq!(&snapshot_nofollow(dir), before, "inputs or outputs changed");
}

/// A fake commit hash.
fn hash(seed: u8) -> String {
    format!("{:02x}", seed).repeat(20)
}

/// Moves the model folder `model` into a Hugging Face cache at `cache` as
/// `org/name`, the way huggingface_hub lays one out: each file becomes
/// `blobs/<sha>`, linked from `snapshots/<commit>/<file>` by a relative
/// symlink, and `refs/main` holds the commit. Returns the snapshot folder.
fn into_hf_cache(model: &Path, cache: &Path, id: &str, commit: &str) -> PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for (i, f) in files.iter().enumerate() {
        let blob = format!("{:064x}", i + 1);
        std::fs::rename(f, repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/{blob}"),
            snap.join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    std::fs::remove_dir(model).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    snap
}

#[test]
fn outputs_are_kept_apart_from_cache_blobs_snapshots_and_every_input() {
    let s = Setup::new();
    let cache = s.path("hub");
    let snap = into_hf_cache(&s.path("base"), &cache, "acme/base", &hash(0xab));
    let repo = cache.join("models--acme--base");
    let blobs = repo.join("blobs");
    std::os::unix::fs::symlink(&blobs, s.path("alias")).unwrap();
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let good = s.s("good");
    let before = snapshot_nofollow(s.dir.path());

    let snap_s = snap.to_string_lossy().into_owned();
    for base in ["acme/base", snap_s.as_str()] {
        for (out, needle) in [
            (blobs.clone(), "contains input base model"),
            (snap.clone(), "inside input base model"),
            (repo.clone(), "contains input base model"),
            (cache.clone(), "contains input base model"),
            (s.path("alias"), "contains input base model"),
            (snap.join("sub"), "inside input base model"),
        ] {
            let out_s = out.to_string_lossy().into_owned();
            let o = s.merge_env(base, &[&good], &out_s, &["--force"], &env);
            refused(&o, &[&out_s, needle], s.dir.path(), &before);
            let o = s.analyze_env(base, &[&good], &out_s, &["--force"], &env);
            refused(&o, &[&out_s, needle], s.dir.path(), &before);
        }
    }
    // The blob the weights link to is named, with the link.
    let out = blobs.to_string_lossy().into_owned();
    let o = s.merge_env("acme/base", &[&good], &out, &["--force"], &env);
    assert!(stderr(&o).contains("links to"), "{}", stderr(&o));
    // A folder beside the blobs is fine: nothing read lies in it.
    let o = s.merge_env("acme/base", &[&good], &s.s("merged"), &[], &env);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_file_given_directly_protects_its_folder_and_the_analysis_folder_is_an_input() {
    let s = Setup::new();
    let (good, stats) = (s.s("good"), s.s("stats"));
    let o = s.analyze(&s.s("base"), &[&good], &stats, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot_nofollow(s.dir.path());

    let file = s.s("base/model.safetensors");
    let sub = s.s("base/sub");
    let o = s.merge(&file, &[&good], &sub, &["--force"]);
    refused(
        &o,
        &["base/sub", "inside input base model"],
        s.dir.path(),
        &before,
    );
    let o = s.merge(
        &s.s("base"),
        &[&s.s("good/model.safetensors")],
        &s.s("good/x"),
        &[],
    );
    refused(
        &o,
        &["good/x", "inside input model 'model.safetensors'"],
        s.dir.path(),
        &before,
    );

    for out in [stats.clone(), s.s("stats/good"), s.s("stats/new")] {
        let args = [
            "--base-model-path",
            &s.s("base"),
            "--other-model-paths",
            &good,
            "--from-analysis",
            &stats,
            "--output-path",
            &out,
            "--force",
            "--quiet",
        ];
        let o = run_bounded("ta-merge", &args, &[], 60);
        refused(&o, &[&out, "input --from-analysis"], s.dir.path(), &before);
    }
}

#[test]
fn an_analysis_replaces_only_the_files_an_analysis_writes() {
    let s = Setup::new();
    write_model(
        &s.path("other"),
        &fine_tune(&s.base, 6, 0.02, Ty::BF16),
        1,
        false,
    );
    let (base, good, other, stats) = (s.s("base"), s.s("good"), s.s("other"), s.path("stats"));
    let stats_s = s.s("stats");
    let o = s.analyze(&base, &[&good, &other], &stats_s, &["--names", "p", "q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A rerun over a plain earlier analysis replaces it without --force.
    let o = s.analyze(&base, &[&good, &other], &stats_s, &["--names", "p", "q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));

    // Files the analysis did not write: refused without --force.
    std::fs::write(stats.join("notes.txt"), "mine").unwrap();
    std::fs::write(stats.join("p/mine.txt"), "mine too").unwrap();
    std::fs::create_dir(stats.join("plots")).unwrap();
    std::fs::write(stats.join("plots/x.png"), "x").unwrap();
    let before = snapshot_nofollow(s.dir.path());
    let o = s.analyze(&base, &[&good, &other], &stats_s, &["--names", "p", "r"]);
    refused(
        &o,
        &[
            "--outdir",
            "3 entries that ta-analyze did not write",
            "notes.txt",
            "p/mine.txt",
            "--force",
        ],
        s.dir.path(),
        &before,
    );

    // With --force: the new analysis goes beside them; q (the earlier
    // analysis' model, now gone) is removed, the foreign files stay.
    let o = s.analyze(
        &base,
        &[&good, &other],
        &stats_s,
        &["--names", "p", "r", "--force"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("note: left 3 entries that ta-analyze did not write")
            && lines[0].contains("notes.txt"),
        "{err}"
    );
    let mut want = vec![
        "analysis.json",
        "cosine_by_layer.png",
        "notes.txt",
        "p",
        "pairwise_cosines.csv",
        "pairwise_cosines.png",
        "plots",
        "plots/x.png",
        "r",
        "report.html",
        "sign_conflict.png",
        "trim_energy.png",
    ];
    for m in ["p", "r"] {
        for f in [
            "group_l2_bar.png",
            "per_param_stats.csv",
            "summary.json",
            "top50_by_l2.csv",
            "top50_by_maxabs.csv",
        ] {
            want.push(Box::leak(format!("{m}/{f}").into_boxed_str()));
        }
    }
    want.push("p/mine.txt");
    want.sort();
    assert_eq!(tree(&stats), want);
    assert_eq!(
        std::fs::read_to_string(stats.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(stats.join("p/mine.txt")).unwrap(),
        "mine too"
    );
    let analysis: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stats.join("analysis.json")).unwrap())
            .unwrap();
    assert_eq!(analysis["models"][1]["name"], "r");
    // Nothing beside the folder either.
    assert_eq!(entries(s.dir.path()), ["base", "good", "other", "stats"]);

    // A foreign entry where a new file goes is refused even with --force.
    std::fs::create_dir(stats.join("z")).unwrap();
    std::fs::create_dir(stats.join("z/summary.json")).unwrap();
    let before = snapshot_nofollow(s.dir.path());
    let o = s.analyze(&base, &[&good], &stats_s, &["--names", "z", "--force"]);
    refused(&o, &["z/summary.json", "in the way"], s.dir.path(), &before);
}

#[test]
fn fifos_devices_folders_and_huge_side_files_are_refused_without_hanging() {
    let s = Setup::new();
    let (base, good, out) = (s.s("base"), s.s("good"), s.s("merged"));
    // Both tools check the base's side files before any work.
    let check = |needles: &[&str]| {
        let before = snapshot_nofollow(s.dir.path());
        let o = s.merge(&base, &[&good], &out, &[]);
        refused(&o, needles, s.dir.path(), &before);
        assert!(
            stdout(&o).is_empty(),
            "refused before any work: {}",
            stdout(&o)
        );
        let o = s.analyze(&base, &[&good], &s.s("stats"), &[]);
        refused(&o, needles, s.dir.path(), &before);
    };
    let restore = |name: &str| {
        let p = s.path("base").join(name);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    };
    let config = s.path("base/config.json");
    let saved = std::fs::read(&config).unwrap();

    std::fs::remove_file(&config).unwrap();
    mkfifo(&config);
    check(&["base/config.json", "a FIFO, not a regular file"]);
    restore("config.json");

    std::os::unix::fs::symlink("/dev/zero", &config).unwrap();
    check(&["base/config.json", "a character device"]);
    restore("config.json");

    std::fs::create_dir(&config).unwrap();
    check(&["base/config.json", "a folder"]);
    restore("config.json");
    std::fs::write(&config, &saved).unwrap();

    let tok = s.path("base/tokenizer.json");
    let saved_tok = std::fs::read(&tok).unwrap();
    std::fs::remove_file(&tok).unwrap();
    mkfifo(&tok);
    check(&["base/tokenizer.json", "a FIFO"]);
    restore("tokenizer.json");
    std::fs::write(&tok, &saved_tok).unwrap();

    let generation = s.path("base/generation_config.json");
    let saved_gen = std::fs::read(&generation).unwrap();
    let f = std::fs::File::create(&generation).unwrap();
    f.set_len((64 << 20) + 1).unwrap();
    drop(f);
    check(&["base/generation_config.json", "64 MB limit"]);
    std::fs::write(&generation, &saved_gen).unwrap();

    // Weight files and indexes.
    let before_all = snapshot_nofollow(s.dir.path());
    std::fs::create_dir(s.path("fifo")).unwrap();
    mkfifo(&s.path("fifo/model.safetensors"));
    let before = snapshot_nofollow(s.dir.path());
    let o = s.merge(&base, &[&s.s("fifo")], &out, &[]);
    refused(
        &o,
        &["fifo/model.safetensors", "a FIFO"],
        s.dir.path(),
        &before,
    );
    let o = s.merge(&base, &[&s.s("fifo/model.safetensors")], &out, &[]);
    refused(
        &o,
        &["fifo/model.safetensors", "a FIFO"],
        s.dir.path(),
        &before,
    );
    std::fs::remove_dir_all(s.path("fifo")).unwrap();

    let ft = fine_tune(&s.base, 7, 0.01, Ty::BF16);
    write_model(&s.path("sharded"), &ft, 2, false);
    let index = s.path("sharded/model.safetensors.index.json");
    std::fs::remove_file(&index).unwrap();
    mkfifo(&index);
    let before = snapshot_nofollow(s.dir.path());
    let o = s.merge(&base, &[&s.s("sharded")], &out, &[]);
    refused(
        &o,
        &["sharded/model.safetensors.index.json", "a FIFO"],
        s.dir.path(),
        &before,
    );
    let o = s.analyze(&base, &[&s.s("sharded")], &s.s("stats"), &[]);
    refused(
        &o,
        &["sharded/model.safetensors.index.json", "a FIFO"],
        s.dir.path(),
        &before,
    );
    std::fs::remove_dir_all(s.path("sharded")).unwrap();

    // A summary.json read by --from-analysis.
    let o = s.analyze(&base, &[&good], &s.s("stats"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = s.path("stats/good/summary.json");
    std::fs::remove_file(&summary).unwrap();
    mkfifo(&summary);
    let before = snapshot_nofollow(s.dir.path());
    let args = [
        "--base-model-path",
        &base,
        "--other-model-paths",
        &good,
        "--from-analysis",
        &s.s("stats"),
        "--output-path",
        &out,
        "--quiet",
    ];
    let o = run_bounded("ta-merge", &args, &[], 60);
    refused(
        &o,
        &["stats/good/summary.json", "a FIFO"],
        s.dir.path(),
        &before,
    );
    std::fs::remove_dir_all(s.path("stats")).unwrap();
    assert_eq!(snapshot_nofollow(s.dir.path()), before_all);
}

#[test]
fn cache_revisions_must_be_commit_hashes_of_snapshots_in_the_cache() {
    let s = Setup::new();
    let cache = s.path("hub");
    let commit = hash(0x5e);
    into_hf_cache(&s.path("base"), &cache, "acme/base", &commit);
    let refs = cache.join("models--acme--base/refs/main");
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let (good, out) = (s.s("good"), s.s("merged"));
    for bad in [
        "../../../good".to_string(),
        "/etc".to_string(),
        format!("{commit}\n../x"),
        format!("{commit}\n\n"),
        String::new(),
        "main".to_string(),
    ] {
        std::fs::write(&refs, &bad).unwrap();
        let before = snapshot_nofollow(s.dir.path());
        let o = s.merge_env("acme/base", &[&good], &out, &[], &env);
        refused(
            &o,
            &["refs/main", "not a commit hash"],
            s.dir.path(),
            &before,
        );
        let o = s.analyze_env("acme/base", &[&good], &s.s("stats"), &[], &env);
        refused(
            &o,
            &["refs/main", "not a commit hash"],
            s.dir.path(),
            &before,
        );
    }
    // A hash with no snapshot (offline: online, it is downloaded again), or
    // whose snapshot is a symlink out of the cache.
    let other = hash(0x77);
    std::fs::write(&refs, &other).unwrap();
    let before = snapshot_nofollow(s.dir.path());
    let offline = [env[0], ("HF_HUB_OFFLINE", Path::new("1"))];
    let o = s.merge_env("acme/base", &[&good], &out, &[], &offline);
    refused(
        &o,
        &["refs/main", &other, "no snapshot folder"],
        s.dir.path(),
        &before,
    );
    std::os::unix::fs::symlink(
        s.path("good"),
        cache.join("models--acme--base/snapshots").join(&other),
    )
    .unwrap();
    let before = snapshot_nofollow(s.dir.path());
    let o = s.merge_env("acme/base", &[&good], &out, &[], &env);
    refused(
        &o,
        &["refs/main", "no snapshot folder"],
        s.dir.path(),
        &before,
    );
    // The real one works.
    std::fs::write(&refs, format!("{commit}\n")).unwrap();
    let o = s.merge_env("acme/base", &[&good], &out, &[], &env);
    assert!(o.status.success(), "{}", stderr(&o));
}

// Needs the segment delay of debug builds (`cargo test` without --release).
#[cfg(debug_assertions)]
#[test]
fn the_next_run_removes_what_a_killed_run_left() {
    let s = Setup::new();
    let (base, good, out) = (s.s("base"), s.s("good"), s.s("merged"));
    let before = snapshot_nofollow(&s.path("base"));
    let (mut child, partial) = start_slow_merge(&s);
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert_eq!(entries(s.dir.path()), [partial.as_str(), "base", "good"]);

    let o = s.merge(&base, &[&good], &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("note: removed ")
            && lines[0].contains(&partial)
            && lines[0].contains("no longer runs"),
        "{err}"
    );
    assert_eq!(entries(s.dir.path()), ["base", "good", "merged"]);
    assert_eq!(snapshot_nofollow(&s.path("base")), before);
    let o = run("ta-merge", &["--verify", &out]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A live process's partial folder is never touched.
    let parent = std::os::unix::process::parent_id();
    let live = s.path(&format!(".merged.partial-{parent}"));
    std::fs::create_dir(&live).unwrap();
    let o = s.merge(&base, &[&good], &out, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert!(live.is_dir());
}

const EVIL: &str = "model.layers.0.evil\n\x1b[31mred\x1b[0m";
const EVIL_SHOWN: &str = "model.layers.0.evil\\n\\u{1b}[31mred\\u{1b}[0m";

#[test]
fn names_with_control_characters_are_printed_escaped_on_one_line() {
    let s = Setup::new();
    let mut base = s.base.clone();
    base.push(T::new(EVIL, Ty::BF16, &[4], vec![0.5, 0.25, -1.0, 2.0]));
    write_model(&s.path("base"), &base, 1, false);
    let mut nan = fine_tune(&base, 8, 0.01, Ty::BF16);
    nan.last_mut().unwrap().values[1] = f64::NAN;
    write_model(&s.path("nan"), &nan, 1, false);
    let (b, out) = (s.s("base"), s.s("merged"));

    // An error naming the tensor.
    let before = snapshot_nofollow(s.dir.path());
    let o = s.merge(&b, &[&s.s("nan")], &out, &[]);
    refused(&o, &[EVIL_SHOWN, "NaN or infinite"], s.dir.path(), &before);

    // The plan on stdout lists it on one line (the good model lacks it).
    let o = s.merge(&b, &[&s.s("good")], &out, &["--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_no_controls(&text);
    let line = text
        .lines()
        .find(|l| l.contains("lacks"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(EVIL_SHOWN), "{text}");

    // A model folder whose name holds an escape sequence.
    let odd = "ft\x1b[2J\rx";
    std::fs::rename(s.path("nan"), s.path(odd)).unwrap();
    write_model(&s.path(odd), &fine_tune(&base, 9, 0.01, Ty::BF16), 1, false);
    let o = s.analyze(&b, &[&s.s(odd)], &s.s("stats"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_no_controls(&stdout(&o));
    assert!(stdout(&o).contains("ft\\u{1b}[2J\\rx"), "{}", stdout(&o));
    let o = s.merge(&b, &[&s.s(odd)], &out, &["--names", "a\nb"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_no_controls(&stdout(&o));
    assert!(stdout(&o).contains("a\\nb"), "{}", stdout(&o));
    // The written files keep the names as they are.
    let merged = read_model(Path::new(&out));
    assert!(merged.contains_key(EVIL));
}

#[test]
fn a_base_without_tensors_or_an_index_without_entries_is_refused() {
    let s = Setup::new();
    let empty = s.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let none: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    safetensors::serialize_to_file(none, Some(meta), &empty.join("model.safetensors")).unwrap();
    let good = s.s("good");
    let before = snapshot_nofollow(s.dir.path());
    let o = s.merge(&s.s("empty"), &[&good], &s.s("merged"), &[]);
    refused(
        &o,
        &["empty/model.safetensors", "holds no tensors"],
        s.dir.path(),
        &before,
    );
    let o = s.analyze(&s.s("empty"), &[&good], &s.s("stats"), &[]);
    refused(
        &o,
        &["empty/model.safetensors", "holds no tensors"],
        s.dir.path(),
        &before,
    );

    write_model(&s.path("noentries"), &s.base, 2, false);
    let index = s.path("noentries/model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata": {"total_size": 0}, "weight_map": {}}"#,
    )
    .unwrap();
    let before = snapshot_nofollow(s.dir.path());
    for (base, model) in [
        (s.s("noentries"), good.clone()),
        (s.s("base"), s.s("noentries")),
    ] {
        let o = s.merge(&base, &[&model], &s.s("merged"), &[]);
        refused(
            &o,
            &["noentries/model.safetensors.index.json", "empty weight_map"],
            s.dir.path(),
            &before,
        );
        let o = s.analyze(&base, &[&model], &s.s("stats"), &[]);
        refused(
            &o,
            &["noentries/model.safetensors.index.json", "empty weight_map"],
            s.dir.path(),
            &before,
        );
    }
}

#[test]
fn verify_accepts_a_merge_of_a_base_without_config() {
    let s = Setup::new();
    std::fs::remove_file(s.path("base/config.json")).unwrap();
    let out = s.s("merged");
    let o = s.merge(
        &s.s("base"),
        &[&s.s("good")],
        &out,
        &["--max-shard-size", "4kB"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!s.path("merged/config.json").exists());
    assert!(s.path("merged/model.safetensors.index.json").exists());
    let o = run("ta-merge", &["--verify", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
}

#[test]
fn a_model_of_5000_layers_gets_a_bounded_group_chart() {
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<T> = (0..5000)
        .map(|i| {
            T::new(
                &format!("model.layers.{i}.mlp.up_proj.weight"),
                Ty::F32,
                &[2],
                vec![0.5, -0.25],
            )
        })
        .collect();
    write_model(&dir.path().join("base"), &base, 1, false);
    write_model(
        &dir.path().join("ft"),
        &fine_tune(&base, 3, 0.01, Ty::F32),
        1,
        false,
    );
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let o = run_bounded(
        "ta-analyze",
        &[
            "--base",
            &p("base"),
            "--models",
            &p("ft"),
            "--outdir",
            &p("stats"),
            "--quiet",
        ],
        &[],
        300,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("stats/ft/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["groups"].as_object().unwrap().len(), 5000);
    let png = std::fs::read(dir.path().join("stats/ft/group_l2_bar.png")).unwrap();
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(be(16), 900);
    assert!(be(20) <= 90 + 22 * 40, "height {}", be(20));
}

#[test]
fn force_replaces_a_merge_whole_and_leaves_nothing_beside_it() {
    let s = Setup::new();
    let (base, good, out) = (s.s("base"), s.s("good"), s.s("merged"));
    let o = s.merge(&base, &[&good], &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(s.path("merged/stale.txt"), "from before").unwrap();
    let inputs = snapshot_nofollow(&s.path("base"));
    let args = [
        "--base-model-path",
        &base,
        "--other-model-paths",
        &good,
        "--output-path",
        &out,
        "--lambdas",
        "1.0",
        "--force",
        "--quiet",
    ];
    let o = run_bounded("ta-merge", &args, &[], 60);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("merged/merge_record.json")).unwrap())
            .unwrap();
    assert_eq!(record["models"][0]["lambda"], 1.0);
    assert!(!s.path("merged/stale.txt").exists());
    assert_eq!(entries(s.dir.path()), ["base", "good", "merged"]);
    assert_eq!(snapshot_nofollow(&s.path("base")), inputs);
}

/// Starts a merge of `good` onto `base` into `merged`, slowed to 200 ms a
/// segment, and waits until it is writing; returns the process and the
/// name of its partial folder.
fn start_slow_merge(s: &Setup) -> (std::process::Child, String) {
    let (base, good, out) = (s.s("base"), s.s("good"), s.s("merged"));
    let child = std::process::Command::new(bin_path("ta-merge"))
        .args(["--base-model-path", &base, "--other-model-paths", &good])
        .args(["--output-path", &out, "--lambdas", "0.5", "--quiet"])
        .env("TV_TEST_SEGMENT_DELAY_MS", "200")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = format!(".merged.partial-{}", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !entries(s.dir.path()).contains(&partial) {
        assert!(
            std::time::Instant::now() < deadline,
            "merge never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (child, partial)
}

/// Applies `change` to the model's shard while a slowed merge runs;
/// returns the finished process's output.
fn merge_while(s: &Setup, change: impl FnOnce(&Path)) -> Output {
    let (child, _) = start_slow_merge(s);
    change(&s.path("good").join("model.safetensors"));
    child.wait_with_output().unwrap()
}

#[test]
fn a_shard_truncated_during_a_merge_is_an_error_not_a_crash() {
    let s = Setup::new();
    // Emptied: every later read of the mapping faults
    // (SIGBUS), which must become this error rather than kill the process.
    let o = merge_while(&s, |shard| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(shard)
            .unwrap()
            .set_len(0)
            .unwrap();
    });
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_one_line_error(&o, &["model.safetensors", "truncated while being read"]);
    assert_eq!(entries(s.dir.path()), ["base", "good"]);
}

#[test]
fn a_shard_replaced_during_a_merge_is_an_error() {
    let s = Setup::new();
    let o = merge_while(&s, |shard| {
        let copy = shard.with_extension("new");
        std::fs::copy(shard, &copy).unwrap();
        std::fs::rename(&copy, shard).unwrap();
    });
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_one_line_error(&o, &["model.safetensors", "changed while being read"]);
    assert_eq!(entries(s.dir.path()), ["base", "good"]);
}

/// A family whose base `model.norm.weight` holds `value` at element 3 and
/// whose fine-tune (`ft`) stores that tensor only when `model_stores` (as
/// the base's values): otherwise the tensor is copied from the base.
fn base_holding(value: f64, model_stores: bool) -> (Setup, Vec<f64>) {
    let s = Setup::new();
    let mut base = s.base.clone();
    let norm = base
        .iter_mut()
        .find(|t| t.name == "model.norm.weight")
        .unwrap();
    norm.values[3] = value;
    let norm_values = norm.values.clone();
    write_model(&s.path("base"), &base, 1, false);
    let mut ft = fine_tune(&base, 11, 0.01, Ty::BF16);
    if model_stores {
        let t = ft
            .iter_mut()
            .find(|t| t.name == "model.norm.weight")
            .unwrap();
        t.values = norm_values.clone();
    } else {
        ft.retain(|t| t.name != "model.norm.weight");
    }
    write_model(&s.path("ft"), &ft, 1, false);
    (s, norm_values)
}

#[test]
fn base_values_that_overflow_the_output_type_are_refused_unless_allowed() {
    // 1e6 is a finite bf16 value (999424) but overflows float16 (max 65504).
    for model_stores in [false, true] {
        let (s, values) = base_holding(1e6, model_stores);
        assert!(values[3].is_finite() && values[3] > 65504.0);
        let (base, ft, out) = (s.s("base"), s.s("ft"), s.s("merged"));
        let before = snapshot_nofollow(s.dir.path());
        let o = s.merge(&base, &[&ft], &out, &["--dtype", "f16"]);
        refused(
            &o,
            &[
                "tensor 'model.norm.weight'",
                "the base's values overflow float16",
                "--dtype",
                "--allow-nonfinite",
            ],
            s.dir.path(),
            &before,
        );
        assert_eq!(o.status.code(), Some(1));

        let o = s.merge(
            &base,
            &[&ft],
            &out,
            &["--dtype", "f16", "--allow-nonfinite"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let merged = read_model(&s.path("merged"));
        let t = &merged["model.norm.weight"];
        assert_eq!(t.ty, Ty::F16);
        let got = Ty::F16.decode(&t.bytes);
        assert_eq!(got[3], f64::INFINITY);
        // The rest is the base's values rounded to float16 (the model's
        // copy equals the base, so its delta is 0).
        for (j, &b) in values.iter().enumerate().filter(|&(j, _)| j != 3) {
            assert_eq!(
                &t.bytes[2 * j..2 * j + 2],
                &Ty::F16.round(b)[..],
                "[{j}] {b}"
            );
        }
    }
}

#[test]
fn nonfinite_values_of_a_copied_base_tensor_are_refused_unless_allowed() {
    for bad in [f64::NAN, f64::INFINITY] {
        let (s, values) = base_holding(bad, false);
        let (base, ft, out) = (s.s("base"), s.s("ft"), s.s("merged"));
        let before = snapshot_nofollow(s.dir.path());
        let o = s.merge(&base, &[&ft], &out, &[]);
        refused(
            &o,
            &[
                "tensor 'model.norm.weight'",
                "the base model holds NaN or infinite values",
                "--allow-nonfinite",
            ],
            s.dir.path(),
            &before,
        );
        assert_eq!(o.status.code(), Some(1));
        let o = s.merge(&base, &[&ft], &out, &["--allow-nonfinite"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let merged = read_model(&s.path("merged"));
        let got = Ty::BF16.decode(&merged["model.norm.weight"].bytes);
        for (j, (&g, &b)) in got.iter().zip(&values).enumerate() {
            assert!(g == b || (g.is_nan() && b.is_nan()), "[{j}] {g} {b}");
        }
    }
}

#[test]
fn fp8_tensors_to_be_merged_or_analysed_are_refused() {
    use safetensors::Dtype;
    const UP: &str = "model.layers.0.mlp.up_proj.weight";
    let s = Setup::new();
    let shape = vec![24, 16];
    // FP8 weights with their f32 inverse scale beside them, as
    // DeepSeek-V3-style checkpoints store them.
    let fp8 = |seed: u8| -> Vec<u8> {
        (0..24 * 16)
            .map(|j| (j as u8).wrapping_mul(seed) & 0x77)
            .collect()
    };
    let scale = T::new(
        "model.layers.0.mlp.up_proj.weight_scale_inv",
        Ty::F32,
        &[1],
        vec![0.01],
    );
    let mut base = s.base.clone();
    base.push(scale.clone());
    write_with_raw(
        &s.path("fp8base"),
        &base,
        &[(UP, Dtype::F8_E4M3, shape.clone(), fp8(3))],
    );
    let mut ft = fine_tune(&base, 21, 0.01, Ty::BF16);
    ft.last_mut().unwrap().values[0] = 0.02;
    write_with_raw(
        &s.path("fp8ft"),
        &ft,
        &[(UP, Dtype::F8_E4M3, shape.clone(), fp8(5))],
    );
    // A bf16 base with a fine-tune that stores one tensor as F8_E5M2.
    write_with_raw(
        &s.path("fp8model"),
        &fine_tune(&s.base, 22, 0.01, Ty::BF16),
        &[(UP, Dtype::F8_E5M2, shape.clone(), fp8(7))],
    );

    let out = s.s("merged");
    let cases = [
        ("fp8base", "fp8ft", "in the base"),
        ("base", "fp8model", "in model 'fp8model'"),
    ];
    for (base, model, whose) in cases {
        let dtype = if model == "fp8model" {
            "F8_E5M2"
        } else {
            "F8_E4M3"
        };
        let needles = [
            &format!("tensor '{UP}' is stored as {dtype} {whose}") as &str,
            "FP8 checkpoints are not merged",
            "dequantise them to bf16 first",
        ];
        let before = snapshot_nofollow(s.dir.path());
        let o = s.merge(&s.s(base), &[&s.s(model)], &out, &[]);
        refused(&o, &needles, s.dir.path(), &before);
        assert_eq!(o.status.code(), Some(1));
        let o = s.merge(&s.s(base), &[&s.s(model)], &out, &["--dry-run"]);
        refused(&o, &needles, s.dir.path(), &before);

        let needles = [needles[0], "FP8 checkpoints are not analysed", needles[2]];
        let o = s.analyze(&s.s(base), &[&s.s(model)], &s.s("stats"), &[]);
        refused(&o, &needles, s.dir.path(), &before);
        assert_eq!(o.status.code(), Some(1));
    }
}

/// The value nearest `exact` among bf16 values is `got` (either neighbour
/// at an exact tie, within f64 rounding of the reference).
fn assert_bf16_rounds(what: &str, got: &[u8], exact: f64) {
    let want = Ty::BF16.round(exact);
    if got == &want[..] {
        return;
    }
    let (g, w) = (Ty::BF16.decode(got)[0], Ty::BF16.decode(&want)[0]);
    let (dg, dw) = ((g - exact).abs(), (w - exact).abs());
    assert!(
        (dg - dw).abs() <= 1e-12 * exact.abs().max(1e-30),
        "{what}: got {g}, want {w} (exact {exact:e})"
    );
}

#[test]
fn a_fine_tuned_lm_head_over_a_tied_base_is_refused_or_merged_untied() {
    const EMBED: &str = "model.embed_tokens.weight";
    const LM_HEAD: &str = "lm_head.weight";
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_string_lossy().into_owned();
    // A tied base (no lm_head.weight, tie_word_embeddings: true).
    let base = base_tensors(Ty::BF16, true);
    write_model(&p("base"), &base, 1, true);
    // 'head' untied its embeddings in training and stores its own output
    // layer; 'tied' kept them tied.
    let mut head = fine_tune(&base, 31, 0.01, Ty::BF16);
    let embed = base.iter().find(|t| t.name == EMBED).unwrap();
    let own: Vec<f64> = embed
        .values
        .iter()
        .zip(noise(77, embed.values.len(), 0.02))
        .map(|(b, d)| b + d)
        .collect();
    head.push(T::new(LM_HEAD, Ty::BF16, &embed.shape, own));
    write_model(&p("head"), &head, 1, false);
    let tied = fine_tune(&base, 32, 0.01, Ty::BF16);
    write_model(&p("tied"), &tied, 1, true);

    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--base-model-path",
            &s("base"),
            "--other-model-paths",
            &s("head"),
            &s("tied"),
            "--output-path",
            out,
            "--lambdas",
            "0.7",
            "0.4",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let go = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_bounded("ta-merge", &a, &[], 60)
    };

    // Without the flag: refused, naming the model and the flag.
    let before = snapshot_nofollow(dir.path());
    for extra in [&[][..], &["--dry-run"][..]] {
        let o = go(args(&s("merged"), extra));
        refused(
            &o,
            &[
                "model 'head'",
                "stores its own lm_head.weight",
                EMBED,
                "--untie-embeddings",
            ],
            dir.path(),
            &before,
        );
        assert_eq!(o.status.code(), Some(1));
    }

    // With it: lm_head.weight = E + 0.7 (L_head - E) + 0.4 (E_tied - E).
    let o = go(args(&s("merged"), &["--untie-embeddings"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = read_model(&p("merged"));
    let value = |ts: &[T], n: &str| ts.iter().find(|t| t.name == n).unwrap().values.clone();
    let (e, l_head, e_head, e_tied) = (
        value(&base, EMBED),
        value(&head, LM_HEAD),
        value(&head, EMBED),
        value(&tied, EMBED),
    );
    for (name, from_head) in [(LM_HEAD, &l_head), (EMBED, &e_head)] {
        let t = &merged[name];
        assert_eq!((t.ty, &t.shape), (Ty::BF16, &embed.shape), "{name}");
        for j in 0..e.len() {
            let exact = e[j] + 0.7 * (from_head[j] - e[j]) + 0.4 * (e_tied[j] - e[j]);
            assert_bf16_rounds(&format!("{name}[{j}]"), &t.bytes[2 * j..2 * j + 2], exact);
        }
    }
    // The output layer differs from the merged embedding (the model's own
    // training survived), sits right after the embedding, and the config
    // says the output is untied.
    assert_ne!(merged[LM_HEAD].bytes, merged[EMBED].bytes);
    let file = std::fs::read(p("merged/model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    let offsets = |n: &str| meta.info(n).unwrap().data_offsets;
    assert_eq!(offsets(EMBED).1, offsets(LM_HEAD).0);
    let order: Vec<String> = meta.offset_keys();
    assert_eq!(order[0], EMBED);
    assert_eq!(order[1], LM_HEAD);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("merged/config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("merged/merge_record.json")).unwrap())
            .unwrap();
    assert_eq!(record["tied_embeddings"], false);
    assert_eq!(record["untied_embeddings"], true);
    assert_eq!(record["models"][0]["extra_tensors"], serde_json::json!([]));
    let o = run("ta-merge", &["--verify", &s("merged")]);
    assert!(o.status.success(), "{}", stderr(&o));
}
