//! Models named by Hugging Face id and downloaded when missing, against a
//! stand-in hub on the loopback interface (`hub_server`): the first run
//! downloads and merges exactly as from local folders, later runs work
//! offline from the cache, an interrupted download resumes, a corrupted
//! file never reaches `blobs/`, and each failure is one line that says
//! what to do. Every test points `HF_HUB_CACHE`, `HF_HOME` and `HOME` at
//! its own temporary folder.

mod common;
mod hub_server;

use common::*;
use hub_server::{git_sha1, sha256, Hub};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A family published on a hub: `acme/base` (two shards, side files),
/// `acme/m1` and `acme/m2` (one file each), also kept as local folders.
struct World {
    dir: tempfile::TempDir,
    hub: Option<Hub>,
    commits: BTreeMap<&'static str, String>,
}

const SHARD1: &str = "model-00001-of-00002.safetensors";

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let base = base_tensors(Ty::BF16, false);
        write_model(&dir.path().join("local/base"), &base, 2, false);
        write_side_files(&dir.path().join("local/base"));
        for (i, name) in ["m1", "m2"].iter().enumerate() {
            let m = fine_tune(&base, i as u64 + 7, 0.02, Ty::BF16);
            write_model(&dir.path().join("local").join(name), &m, 1, false);
        }
        let hub = Hub::start();
        let mut commits = BTreeMap::new();
        // Files a merge does not read: other formats, folders, docs.
        let extra: &[(&str, &[u8])] = &[
            ("README.md", b"# base\n"),
            ("pytorch_model.bin", b"not read: safetensors exist"),
            ("onnx/model.onnx", b"not read: a subfolder"),
            (".gitattributes", b"*.safetensors filter=lfs\n"),
        ];
        for name in ["base", "m1", "m2"] {
            let dir = dir.path().join("local").join(name);
            let extra = if name == "base" { extra } else { &[] };
            let repo: &'static str = match name {
                "base" => "acme/base",
                "m1" => "acme/m1",
                _ => "acme/m2",
            };
            commits.insert(repo, hub.publish(repo, "main", &dir, extra));
        }
        World {
            dir,
            hub: Some(hub),
            commits,
        }
    }

    fn hub(&self) -> &Hub {
        self.hub.as_ref().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cache(&self) -> PathBuf {
        self.path("home/hub")
    }

    fn repo(&self, id: &str) -> PathBuf {
        self.cache()
            .join(format!("models--{}", id.replace('/', "--")))
    }

    /// Runs `bin` with a clean hub environment: the cache and home under
    /// the test folder, the endpoint of this hub, and `env` on top.
    fn run(&self, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin_path(bin));
        cmd.args(args);
        for k in [
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HUGGINGFACE_HUB_CACHE",
            "XDG_CACHE_HOME",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("HOME", self.path("home"))
            .env("HF_HOME", self.path("home"))
            .env("HF_HUB_CACHE", self.cache());
        if let Some(hub) = &self.hub {
            cmd.env("HF_ENDPOINT", hub.endpoint());
        } else {
            // The hub is gone: a port nobody listens on.
            cmd.env("HF_ENDPOINT", "http://127.0.0.1:9");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn merge(&self, base: &str, models: &[&str], out: &str, env: &[(&str, &str)]) -> Output {
        let mut args = vec!["--base-model-path", base, "--other-model-paths"];
        args.extend_from_slice(models);
        args.extend_from_slice(&["--output-path", out, "--lambdas", "0.6", "0.3", "--quiet"]);
        self.run("ta-merge", &args, env)
    }

    fn merge_hub(&self, out: &str, env: &[(&str, &str)]) -> Output {
        self.merge("acme/base", &["acme/m1", "acme/m2"], out, env)
    }

    /// Merges the local folders: what a hub run must reproduce.
    fn merge_local(&self, out: &str) -> Output {
        let p = |n: &str| self.path("local").join(n).to_string_lossy().into_owned();
        self.merge(&p("base"), &[&p("m1"), &p("m2")], out, &[])
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

fn ok(o: &Output) {
    assert!(o.status.success(), "stderr: {}", stderr(o));
}

/// The files of a merged folder that must match byte for byte (the merge
/// record, its config and the model card name the inputs, so they differ).
fn merged_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !["merge_record.json", "mergekit_config.yml", "README.md"].contains(&n.as_str())
        })
        .map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap()))
        .collect()
}

/// Asserts two merged folders hold the same files with the same bytes.
fn assert_same_merge(a: &Path, b: &Path) {
    let (fa, fb) = (merged_files(a), merged_files(b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    assert!(fa.contains_key("model.safetensors") && fa.contains_key("tokenizer.json"));
    for (name, bytes) in &fa {
        assert!(
            *bytes == fb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Files under `dir` whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<String> {
    tree(dir)
        .into_iter()
        .filter(|n| n.ends_with(suffix))
        .collect()
}

#[test]
fn first_run_downloads_and_merges_like_local_folders_then_works_offline() {
    let mut w = World::new();
    let o = w.merge_hub(&w.s("out-hub"), &[]);
    ok(&o);
    ok(&w.merge_local(&w.s("out-local")));
    assert_same_merge(&w.path("out-hub"), &w.path("out-local"));
    assert!(
        stderr(&o).contains("acme/base is in the cache"),
        "{}",
        stderr(&o)
    );

    // The cache is laid out as huggingface_hub lays it out.
    for (id, commit) in &w.commits {
        let repo = w.repo(id);
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            *commit
        );
        let snap = repo.join("snapshots").join(commit);
        let local = w.path("local").join(id.trim_start_matches("acme/"));
        for name in entries(&snap) {
            let link = std::fs::read_link(snap.join(&name)).unwrap();
            let bytes = std::fs::read(local.join(&name)).unwrap();
            let etag = if name.ends_with(".safetensors") {
                sha256(&bytes)
            } else {
                git_sha1(&bytes)
            };
            assert_eq!(link, Path::new("../../blobs").join(&etag), "{id} {name}");
            assert_eq!(
                std::fs::read(repo.join("blobs").join(&etag)).unwrap(),
                bytes
            );
        }
        // Every file a run reads, nothing else.
        let mut want = entries(&local);
        want.retain(|n| n != "trainer_state.json");
        assert_eq!(entries(&snap), want, "{id}");
        assert!(files_ending(&repo, ".incomplete").is_empty());
    }
    // Downloaded models are inputs like any other: outputs stay apart.
    let snap = w
        .repo("acme/base")
        .join("snapshots")
        .join(&w.commits["acme/base"]);
    for (out, needle) in [
        (
            w.repo("acme/base").join("blobs"),
            "contains input base model",
        ),
        (snap.join("merged"), "inside input base model"),
    ] {
        let out = out.to_string_lossy().into_owned();
        assert_one_line_error(&w.merge_hub(&out, &[]), &[&out, needle]);
    }
    let asked: Vec<String> = w.hub().requests().iter().map(|r| r.path.clone()).collect();
    for unread in [
        "README.md",
        "pytorch_model.bin",
        "onnx",
        "gitattributes",
        "trainer_state",
    ] {
        assert!(
            !asked.iter().any(|p| p.contains(unread)),
            "{unread} was fetched: {asked:?}"
        );
    }

    // Offline, with the hub gone: the cache serves both tools.
    w.hub = None;
    ok(&w.merge_hub(&w.s("out-offline"), &[("HF_HUB_OFFLINE", "1")]));
    assert_same_merge(&w.path("out-offline"), &w.path("out-local"));
    let o = w.run(
        "ta-analyze",
        &[
            "--base",
            "acme/base",
            "--models",
            "acme/m1",
            "acme/m2",
            "--outdir",
            &w.s("stats"),
            "--quiet",
        ],
        &[("HF_HUB_OFFLINE", "1")],
    );
    ok(&o);
    // A cached model needs no network even when downloads are allowed.
    ok(&w.merge_hub(&w.s("out-again"), &[]));
    let mut args = vec!["--no-download"];
    args.extend_from_slice(&[
        "--base-model-path",
        "acme/base",
        "--other-model-paths",
        "acme/m1",
        "acme/m2",
        "--output-path",
    ]);
    let out = w.s("out-no-download");
    args.extend_from_slice(&[&out, "--lambdas", "0.6", "0.3", "--quiet"]);
    ok(&w.run("ta-merge", &args, &[]));
    assert_same_merge(&w.path("out-no-download"), &w.path("out-local"));
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let mut w = World::new();
    let shard = std::fs::read(w.path("local/base").join(SHARD1)).unwrap();
    let at = shard.len() as u64 / 2;
    w.hub().cut(SHARD1, at);
    let o = w.merge_hub(&w.s("out"), &[]);
    assert_one_line_error(
        &o,
        &[
            "acme/base",
            SHARD1,
            &format!("stopped at {at} of"),
            "run the command again",
        ],
    );
    assert!(!w.path("out").exists());
    let blobs = w.repo("acme/base").join("blobs");
    let sha = sha256(&shard);
    let partial = blobs.join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::read(&partial).unwrap(), &shard[..at as usize]);
    assert!(!blobs.join(&sha).exists(), "no complete-looking blob");
    let snap = w
        .repo("acme/base")
        .join("snapshots")
        .join(&w.commits["acme/base"]);
    assert!(!snap.join(SHARD1).exists());

    // Offline, the cache says what is missing.
    let o = w.merge_hub(&w.s("out"), &[("HF_HUB_OFFLINE", "1")]);
    assert_one_line_error(
        &o,
        &[
            "acme/base",
            "lacks",
            "interrupted download",
            "HF_HUB_OFFLINE",
        ],
    );
    // With downloads allowed but the hub gone, the same: not "not in the cache".
    let hub = w.hub.take();
    let o = w.merge_hub(&w.s("out"), &[]);
    assert_one_line_error(
        &o,
        &[
            "acme/base",
            "lacks",
            "interrupted download",
            "cannot be reached",
        ],
    );
    w.hub = hub;

    w.hub().heal();
    let before = w.hub().requests().len();
    ok(&w.merge_hub(&w.s("out"), &[]));
    let resumed: Vec<_> = w.hub().requests()[before..]
        .iter()
        .filter(|r| r.path.contains(&sha))
        .map(|r| r.headers.get("range").cloned())
        .collect();
    assert_eq!(
        resumed,
        [Some(format!("bytes={at}-"))],
        "one request, from the cut"
    );
    assert_eq!(std::fs::read(blobs.join(&sha)).unwrap(), shard);
    assert!(!partial.exists());
    ok(&w.merge_local(&w.s("out-local")));
    assert_same_merge(&w.path("out"), &w.path("out-local"));
    w.hub = None;
}

#[test]
fn a_busy_hub_is_asked_again() {
    let w = World::new();
    w.hub().busy(SHARD1, 2);
    ok(&w.merge_hub(&w.s("out"), &[]));
    let asked = w
        .hub()
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(SHARD1))
        .count();
    assert_eq!(asked, 3, "two 503 answers, then the file");
    w.hub().busy(SHARD1, 5);
    let _ = std::fs::remove_dir_all(w.cache());
    let o = w.merge_hub(&w.s("out2"), &[]);
    assert_one_line_error(&o, &["acme/base", SHARD1, "503", "run the command again"]);
}

#[test]
fn a_corrupted_file_is_detected_and_never_enters_the_cache() {
    let w = World::new();
    for (file, what) in [(SHARD1, "sha256"), ("tokenizer.json", "git blob sha1")] {
        // A fresh cache each time: the file must be fetched, not found.
        let _ = std::fs::remove_dir_all(w.cache());
        w.hub().heal();
        w.hub().corrupt(file);
        let o = w.merge_hub(&w.s("out"), &[]);
        assert_one_line_error(
            &o,
            &[
                "acme/base",
                file,
                &format!("does not match the hub's {what}"),
                "discarded",
            ],
        );
        let bytes = std::fs::read(w.path("local/base").join(file)).unwrap();
        let etag = if what == "sha256" {
            sha256(&bytes)
        } else {
            git_sha1(&bytes)
        };
        let blobs = w.repo("acme/base").join("blobs");
        assert!(
            !blobs.join(&etag).exists(),
            "{file}: a corrupt blob was kept"
        );
        assert!(files_ending(&blobs, ".incomplete").is_empty(), "{file}");
        assert!(!w.path("out").exists());
    }
    w.hub().heal();
    ok(&w.merge_hub(&w.s("out"), &[]));
    ok(&w.merge_local(&w.s("out-local")));
    assert_same_merge(&w.path("out"), &w.path("out-local"));
}

#[test]
fn a_gated_model_needs_a_token_which_goes_to_the_hub_only() {
    let w = World::new();
    w.hub().gate("acme/base", "hf_right");
    let o = w.merge_hub(&w.s("out"), &[]);
    assert_one_line_error(&o, &["acme/base", "gated", "HF_TOKEN", "hf auth login"]);
    let o = w.merge_hub(&w.s("out"), &[("HF_TOKEN", "hf_wrong")]);
    assert_one_line_error(&o, &["acme/base", "gated", "HF_TOKEN", "no access"]);
    assert!(!stderr(&o).contains("hf_wrong"), "the token is never shown");

    let before = w.hub().requests().len();
    ok(&w.merge_hub(&w.s("out"), &[("HF_TOKEN", "hf_right")]));
    let log = w.hub().requests();
    let seen = &log[before..];
    assert!(
        seen.iter().any(|r| r.origin == "cdn"),
        "weights come through the redirect"
    );
    for r in seen {
        assert_eq!(r.method, "GET", "{}", r.path);
        let auth = r.headers.get("authorization").map(String::as_str);
        match r.origin {
            "hub" => assert_eq!(auth, Some("Bearer hf_right"), "{}", r.path),
            _ => assert_eq!(auth, None, "the token leaked to {}", r.path),
        }
    }

    // The token file `hf auth login` writes works as well.
    let w2 = World::new();
    w2.hub().gate("acme/base", "hf_file");
    std::fs::create_dir_all(w2.path("home")).unwrap();
    std::fs::write(w2.path("home/token"), "hf_file\n").unwrap();
    ok(&w2.merge_hub(&w2.s("out"), &[]));
}

#[test]
fn unknown_models_revisions_and_an_unreachable_hub_are_one_line_errors() {
    let mut w = World::new();
    let o = w.merge("acme/nothing", &["acme/m1", "acme/m2"], &w.s("out"), &[]);
    assert_one_line_error(&o, &["acme/nothing", "no model", "HF_TOKEN"]);
    let o = w.merge("acme/base@v9", &["acme/m1", "acme/m2"], &w.s("out"), &[]);
    assert_one_line_error(&o, &["acme/base@v9", "no revision 'v9'"]);
    let o = w.merge(
        "acme/base",
        &["acme/m1", "acme/m2"],
        &w.s("out"),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_one_line_error(
        &o,
        &[
            "acme/base",
            "not in the Hugging Face cache",
            "HF_HUB_OFFLINE=1",
        ],
    );
    let o = w.run(
        "ta-analyze",
        &[
            "--base",
            "acme/base",
            "--models",
            "acme/m1",
            "--outdir",
            &w.s("stats"),
            "--no-download",
        ],
        &[],
    );
    assert_one_line_error(
        &o,
        &[
            "acme/base",
            "not in the Hugging Face cache",
            "--no-download",
        ],
    );
    assert!(
        !w.cache().exists() || entries(&w.cache()).is_empty(),
        "nothing was fetched"
    );

    w.hub = None;
    let o = w.merge_hub(&w.s("out"), &[]);
    assert_one_line_error(
        &o,
        &[
            "acme/base",
            "cannot be reached",
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE=1",
        ],
    );
    assert!(!w.path("out").exists());
}

#[test]
fn revisions_by_tag_and_commit_are_cached_under_their_names() {
    let w = World::new();
    // A second commit of the base under the tag v1 (its config changed).
    let old = w.path("old-base");
    std::fs::create_dir_all(&old).unwrap();
    for e in entries(&w.path("local/base")) {
        std::fs::copy(w.path("local/base").join(&e), old.join(&e)).unwrap();
    }
    std::fs::write(
        old.join("generation_config.json"),
        "{\"eos_token_id\": 3}\n",
    )
    .unwrap();
    let v1 = w.hub().publish("acme/base", "v1", &old, &[]);
    let o = w.merge("acme/base@v1", &["acme/m1", "acme/m2"], &w.s("out"), &[]);
    ok(&o);
    let repo = w.repo("acme/base");
    assert_eq!(std::fs::read_to_string(repo.join("refs/v1")).unwrap(), v1);
    assert!(!repo.join("refs/main").exists());
    assert_eq!(
        std::fs::read_to_string(w.path("out/generation_config.json")).unwrap(),
        "{\"eos_token_id\": 3}\n"
    );
    let offline = [("HF_HUB_OFFLINE", "1")];
    ok(&w.merge(
        "acme/base@v1",
        &["acme/m1", "acme/m2"],
        &w.s("out2"),
        &offline,
    ));
    ok(&w.merge(
        &format!("acme/base@{v1}"),
        &["acme/m1", "acme/m2"],
        &w.s("out3"),
        &offline,
    ));
    // main is another commit, not in the cache.
    let o = w.merge(
        "acme/base@main",
        &["acme/m1", "acme/m2"],
        &w.s("out4"),
        &offline,
    );
    assert_one_line_error(&o, &["acme/base@main", "not in the Hugging Face cache"]);
    let o = w.merge("acme/base@../x", &["acme/m1", "acme/m2"], &w.s("out4"), &[]);
    assert_one_line_error(&o, &["acme/base@../x", "not a branch, tag or commit name"]);
    // The plain id is main, not the one snapshot v1 left: it is downloaded.
    ok(&w.merge("acme/base", &["acme/m1", "acme/m2"], &w.s("out5"), &[]));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        w.commits["acme/base"]
    );
    assert_ne!(
        std::fs::read_to_string(w.path("out5/generation_config.json")).unwrap(),
        "{\"eos_token_id\": 3}\n"
    );
}

/// Weight files without an index, one cut short: the snapshot holds none
/// of them, so no run (offline or not) merges half a model.
#[test]
fn loose_weight_files_are_linked_only_when_all_are_there() {
    let w = World::new();
    // A base of its own (the hub serves a blob under the first name that
    // holds its bytes), as two loose files.
    let loose = w.path("loose");
    let base = fine_tune(&base_tensors(Ty::BF16, false), 99, 0.02, Ty::BF16);
    write_model(&loose, &base, 2, false);
    std::fs::remove_file(loose.join("model.safetensors.index.json")).unwrap();
    for (k, name) in ["a.safetensors", "b.safetensors"].iter().enumerate() {
        let shard = format!("model-{:05}-of-00002.safetensors", k + 1);
        std::fs::rename(loose.join(shard), loose.join(name)).unwrap();
    }
    w.hub().publish("acme/loose", "main", &loose, &[]);
    let size = std::fs::metadata(loose.join("b.safetensors"))
        .unwrap()
        .len();
    w.hub().cut("b.safetensors", size / 2);
    let o = w.merge("acme/loose", &["acme/m1"], &w.s("out"), &[]);
    assert_one_line_error(
        &o,
        &["acme/loose", "b.safetensors", "run the command again"],
    );
    let snapshots = w.repo("acme/loose").join("snapshots");
    assert!(files_ending(&snapshots, ".safetensors").is_empty());
    let o = w.merge(
        "acme/loose",
        &["acme/m1"],
        &w.s("out"),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_one_line_error(&o, &["acme/loose", "lacks", "HF_HUB_OFFLINE"]);
    assert!(!w.path("out").exists());
}

#[test]
fn a_mistyped_local_path_is_not_read_as_a_hub_problem_only() {
    // `fam/math-tun` typed for `fam/math-tune`: it has the shape of a hub
    // id, so it is looked up as one, but the message also says that the
    // local folder `fam/` has no `math-tun`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("fam")).unwrap();
    for offline in [true, false] {
        let mut cmd = Command::new(bin_path("ta-merge"));
        cmd.current_dir(dir.path())
            .env("HF_HOME", dir.path().join("home"))
            .env("HF_HUB_CACHE", dir.path().join("cache"))
            .env("HOME", dir.path().join("home"))
            // A closed port on the loopback interface: nothing leaves the machine.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .args([
                "--base-model-path",
                "fam/math-tun",
                "--other-model-paths",
                "fam/x",
            ])
            .args(["--lambdas", "1", "--output-path", "out", "--quiet"]);
        if offline {
            cmd.arg("--no-download");
        }
        let o = cmd.output().unwrap();
        assert_one_line_error(
            &o,
            &["fam/math-tun: not a local path (the local folder fam/ has no math-tun)"],
        );
    }
}
