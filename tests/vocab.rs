//! End-to-end tests of merging fine-tunes that add tokens: embedding and
//! lm_head rows are matched by token string (`--vocab base`, `--vocab
//! union`), and every merged row is checked against the rule computed here
//! in f64 from the test's own token tables and correctly rounded.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";
const HIDDEN: usize = 16;
const BASE_ROWS: usize = 37;

/// The base's tokens by row: 34 words, two special tokens, and one padding
/// row (36) that no token names.
fn base_tokens() -> Vec<Option<String>> {
    let mut t: Vec<Option<String>> = (0..34).map(|i| Some(format!("t{i}"))).collect();
    t.push(Some("<s>".into()));
    t.push(Some("</s>".into()));
    t.push(None);
    t
}

/// The fine-tunes' tokens by row, and which of them are `added_tokens`.
/// `chat` adds two chat markers; `lang` replaces t7 by a new word and adds
/// a language marker and one chat marker; `perm` swaps t0 and t1 and
/// assigns the added ids in another order, with a tool token; `short`
/// keeps only the first 30 of the base's tokens (fewer rows than the base).
fn model_tokens(kind: &str) -> Vec<Option<String>> {
    let mut t = base_tokens();
    let extra: &[&str] = match kind {
        "short" => {
            t.truncate(30);
            &[]
        }
        "chat" => &["<|im_start|>", "<|im_end|>"],
        "lang" => {
            t[7] = Some("ñ".into());
            &["<lang>", "<|im_end|>"]
        }
        "perm" => {
            t.swap(0, 1);
            &["<|im_end|>", "<tool>", "<|im_start|>"]
        }
        other => panic!("{other}"),
    };
    t.extend(extra.iter().map(|s| Some(s.to_string())));
    t
}

/// A WordLevel tokenizer.json naming `tokens` (rows without a token are
/// left out); tokens in `<...>` are added special tokens.
fn tokenizer_json(tokens: &[Option<String>]) -> Value {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let Some(t) = t else { continue };
        if t.starts_with('<') {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
            );
        }
        vocab.insert(t.clone(), json!(id));
    }
    vocab.insert("[UNK]".into(), json!(tokens.len() + 100));
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

fn write_tokenizer(dir: &Path, tokens: &[Option<String>]) {
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tokenizer_json(tokens)).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64,
            "added_tokens_decoder": {}})
        .to_string(),
    )
    .unwrap();
}

/// One model of the family: tensors and the token of each embedding row.
struct Model {
    tensors: Vec<T>,
    tokens: Vec<Option<String>>,
}

impl Model {
    fn get(&self, name: &str) -> &T {
        self.tensors.iter().find(|t| t.name == name).unwrap()
    }

    /// The row holding `token`, as the tokenizer says.
    fn row_of(&self, token: &str) -> Option<usize> {
        self.tokens.iter().position(|t| t.as_deref() == Some(token))
    }
}

struct Fam {
    dir: tempfile::TempDir,
    base: Model,
    models: Vec<Model>,
    tied: bool,
}

impl Fam {
    /// A base (tied or not) and the fine-tunes `kinds`: the rows of tokens
    /// the base has are the base's row plus noise, new tokens' rows are
    /// noise of their own.
    fn new(tied: bool, kinds: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base_t = base_tensors(Ty::BF16, tied);
        let base = Model {
            tensors: base_t.clone(),
            tokens: base_tokens(),
        };
        write_model(&dir.path().join("base"), &base.tensors, 1, tied);
        write_tokenizer(&dir.path().join("base"), &base.tokens);
        let mut models = Vec::new();
        for (k, kind) in kinds.iter().enumerate() {
            let tokens = model_tokens(kind);
            let mut tensors = fine_tune(&base_t, 20 + k as u64, 0.01, Ty::BF16);
            for t in tensors.iter_mut() {
                if t.name != EMBED && t.name != HEAD {
                    continue;
                }
                let b = base.get(&t.name);
                let fresh = noise(90 + k as u64, tokens.len() * HIDDEN, 0.05);
                let delta = noise(70 + k as u64, tokens.len() * HIDDEN, 0.01);
                let mut v = Vec::new();
                for (j, tok) in tokens.iter().enumerate() {
                    let src = match tok {
                        Some(tok) => base.row_of(tok),
                        None => Some(j),
                    };
                    for c in 0..HIDDEN {
                        let x = match src {
                            Some(r) => b.values[r * HIDDEN + c] + delta[j * HIDDEN + c],
                            None => fresh[j * HIDDEN + c],
                        };
                        v.push(x);
                    }
                }
                *t = T::new(&t.name, Ty::BF16, &[tokens.len(), HIDDEN], v);
            }
            let path = dir.path().join(format!("m{k}"));
            write_model(&path, &tensors, 1, tied);
            write_tokenizer(&path, &tokens);
            models.push(Model { tensors, tokens });
        }
        Fam {
            dir,
            base,
            models,
            tied,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn merge(&self, out: &str, extra: &[&str]) -> std::process::Output {
        self.merge_with(out, &[], extra)
    }

    /// Merges the fine-tunes and, after them, the folders `more` (adapters).
    fn merge_with(&self, out: &str, more: &[&str], extra: &[&str]) -> std::process::Output {
        let mut args = vec!["--base_model_path".to_string(), self.path("base")];
        args.push("--other_model_paths".into());
        args.extend((0..self.models.len()).map(|k| self.path(&format!("m{k}"))));
        args.extend(more.iter().map(|m| self.path(m)));
        args.extend(["--output_path".into(), self.path(out), "--quiet".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("ta-merge", &args)
    }

    /// The union's appended tokens, by the rule: every model's tokens the
    /// base lacks, in model order and row order, each once.
    fn union_added(&self) -> Vec<String> {
        let mut added: Vec<String> = Vec::new();
        for m in &self.models {
            for t in m.tokens.iter().flatten() {
                if self.base.row_of(t).is_none() && !added.contains(t) {
                    added.push(t.clone());
                }
            }
        }
        added
    }

    /// For output row `r`: the base's values (or, for an appended token,
    /// the mean of the base's rows), and each model's row of that token.
    fn sources(&self, name: &str, r: usize, added: &[String]) -> (Vec<f64>, Vec<Option<usize>>) {
        let b = self.base.get(name);
        let base_row: Vec<f64> = if r < BASE_ROWS {
            b.values[r * HIDDEN..(r + 1) * HIDDEN].to_vec()
        } else {
            (0..HIDDEN)
                .map(|c| {
                    let mut s = 0.0;
                    for q in 0..BASE_ROWS {
                        s += b.values[q * HIDDEN + c];
                    }
                    s / BASE_ROWS as f64
                })
                .collect()
        };
        let token = if r < BASE_ROWS {
            self.base.tokens[r].clone()
        } else {
            Some(added[r - BASE_ROWS].clone())
        };
        let rows = self
            .models
            .iter()
            .map(|m| match &token {
                Some(t) => m.row_of(t),
                // The padding row matches the same untokenised row.
                None => (m.tokens.get(r) == Some(&None)).then_some(r),
            })
            .collect();
        (base_row, rows)
    }

    /// Checks every row of `name` in `out` against Task Arithmetic with
    /// weights `lambdas` and scale `scale` by token: models lacking a token
    /// contribute nothing; an appended token's weights are renormalised
    /// over the models holding it, against the mean of the base's rows.
    fn check_task_arithmetic(
        &self,
        out: &str,
        name: &str,
        lambdas: &[f64],
        scale: f64,
        union: bool,
    ) {
        let added = if union { self.union_added() } else { vec![] };
        let merged = read_model(Path::new(&self.path(out)));
        let got = &merged[name];
        let rows = BASE_ROWS + added.len();
        assert_eq!(got.shape, [rows, HIDDEN], "{name}");
        let got = Ty::BF16.decode(&got.bytes);
        for r in 0..rows {
            let (b, src) = self.sources(name, r, &added);
            let total: f64 = src
                .iter()
                .zip(lambdas)
                .filter(|(s, _)| s.is_some())
                .map(|(_, l)| l)
                .sum();
            for c in 0..HIDDEN {
                let mut acc = 0.0;
                for ((m, s), &l) in self.models.iter().zip(&src).zip(lambdas) {
                    let Some(j) = s else { continue };
                    let l = scale * if r >= BASE_ROWS { l / total } else { l };
                    acc += l * (m.get(name).values[j * HIDDEN + c] - b[c]);
                }
                let exact = acc + b[c];
                assert_rounded(got[r * HIDDEN + c], exact, &format!("{name}[{r}][{c}]"));
            }
        }
    }
}

/// `got` is `exact` correctly rounded to bf16 (either neighbour at a tie).
fn assert_rounded(got: f64, exact: f64, what: &str) {
    let want = Ty::BF16.decode(&Ty::BF16.round(exact))[0];
    assert!(
        got == want || (exact - (got + want) / 2.0).abs() <= 1e-12 * exact.abs(),
        "{what}: got {got}, want {want} (exact {exact})"
    );
}

fn read_json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const LAMBDAS: [&str; 4] = ["--lambdas", "0.7", "0.5", "0.9"];
const L: [f64; 3] = [0.7, 0.5, 0.9];

#[test]
fn base_vocabulary_merges_rows_by_token_untied_and_tied() {
    for tied in [false, true] {
        let f = Fam::new(tied, &["chat", "lang", "perm"]);
        // No --vocab: the resized embeddings choose the base's vocabulary.
        let o = f.merge("out", &LAMBDAS);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        assert!(text.contains("vocabulary base"), "{text}");
        assert!(
            text.contains("model 'm1': 35 tokens matched, 3 added, 1 missing"),
            "{text}"
        );
        f.check_task_arithmetic("out", EMBED, &L, 1.0, false);
        let merged = read_model(Path::new(&f.path("out")));
        if tied {
            assert!(!merged.contains_key(HEAD));
        } else {
            f.check_task_arithmetic("out", HEAD, &L, 1.0, false);
        }
        // The base's tokenizer and config, unchanged.
        let out = f.path("out");
        assert_eq!(
            std::fs::read(format!("{out}/tokenizer.json")).unwrap(),
            std::fs::read(format!("{}/tokenizer.json", f.path("base"))).unwrap()
        );
        let config = read_json(&format!("{out}/config.json"));
        assert_eq!(config["vocab_size"], 37);
        assert_eq!(config["tie_word_embeddings"], f.tied);
        let record = read_json(&format!("{out}/merge_record.json"));
        assert_eq!(record["vocab"], "base");
        let counts: Vec<(u64, u64, u64)> = record["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let v = &m["vocab"];
                let n = |k: &str| v[k].as_u64().unwrap();
                (n("matched"), n("added"), n("missing"))
            })
            .collect();
        assert_eq!(counts, [(36, 2, 0), (35, 3, 1), (36, 3, 0)]);
    }
}

#[test]
fn union_vocabulary_appends_added_tokens_with_consistent_files() {
    for tied in [false, true] {
        let f = Fam::new(tied, &["chat", "lang", "perm"]);
        // A scale other than 1 makes the appended rows' base value count.
        let mut args = vec!["--vocab", "union", "--scale", "0.8"];
        args.extend(LAMBDAS);
        let o = f.merge("out", &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let added = f.union_added();
        assert_eq!(
            added,
            ["<|im_start|>", "<|im_end|>", "ñ", "<lang>", "<tool>"]
        );
        f.check_task_arithmetic("out", EMBED, &L, 0.8, true);
        let merged = read_model(Path::new(&f.path("out")));
        assert_eq!(merged.contains_key(HEAD), !tied);
        if !tied {
            f.check_task_arithmetic("out", HEAD, &L, 0.8, true);
        }
        let out = f.path("out");
        let rows = BASE_ROWS + added.len();
        let config = read_json(&format!("{out}/config.json"));
        assert_eq!(config["vocab_size"], rows);
        assert_eq!(config["tie_word_embeddings"], tied);
        // tokenizer.json: the base's added tokens, then the new ones at
        // their output rows.
        let tok = read_json(&format!("{out}/tokenizer.json"));
        let ids: Vec<(String, u64)> = tok["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["content"].as_str().unwrap().to_string(),
                    e["id"].as_u64().unwrap(),
                )
            })
            .collect();
        let mut want = vec![("<s>".to_string(), 34), ("</s>".to_string(), 35)];
        for (k, a) in added.iter().enumerate() {
            want.push((a.clone(), (BASE_ROWS + k) as u64));
        }
        assert_eq!(ids, want);
        assert_eq!(tok["model"], tokenizer_json(&base_tokens())["model"]);
        let special = |t: &str| {
            tok["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["content"] == t)
                .unwrap()["special"]
                .as_bool()
                .unwrap()
        };
        // Special as the model declared it; a plain vocabulary word is not.
        assert!(special("<tool>"));
        assert!(!special("ñ"));
        let config = read_json(&format!("{out}/tokenizer_config.json"));
        let decoder = config["added_tokens_decoder"].as_object().unwrap();
        for (k, a) in added.iter().enumerate() {
            assert_eq!(decoder[&(BASE_ROWS + k).to_string()]["content"], a.as_str());
        }
        let record = read_json(&format!("{out}/merge_record.json"));
        assert_eq!(record["vocab"], "union");
        assert_eq!(record["vocab_size"], rows);
        // The output verifies as a well-formed folder.
        let o = run("ta-merge", &["--verify", &out]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

#[test]
fn untied_output_from_a_tied_base_is_merged_by_token() {
    let f = Fam::new(true, &["chat", "perm"]);
    let o = f.merge(
        "out",
        &[
            "--vocab",
            "union",
            "--untie-embeddings",
            "--lambdas",
            "0.7",
            "0.5",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // lm_head starts from the base's embedding and each model's embedding.
    let merged = read_model(Path::new(&f.path("out")));
    assert_eq!(merged[EMBED].bytes, merged[HEAD].bytes);
    f.check_task_arithmetic("out", EMBED, &L[..2], 1.0, true);
}

#[test]
fn linear_averages_the_models_holding_each_token() {
    let f = Fam::new(false, &["chat", "lang"]);
    let added = f.union_added();
    let w = [0.6, 0.2];
    for normalize in [true, false] {
        let mut args = vec![
            "--vocab",
            "union",
            "--method",
            "linear",
            "--lambdas",
            "0.6",
            "0.2",
        ];
        if !normalize {
            args.push("--no-normalize");
        }
        let out = if normalize { "out" } else { "sum" };
        let o = f.merge(out, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let merged = read_model(Path::new(&f.path(out)));
        let got = Ty::BF16.decode(&merged[EMBED].bytes);
        for r in 0..BASE_ROWS + added.len() {
            let (b, src) = f.sources(EMBED, r, &added);
            let total: f64 = src
                .iter()
                .zip(w)
                .filter(|(s, _)| s.is_some())
                .map(|(_, w)| w)
                .sum();
            // The base's tokens are divided by the weights' sum only when
            // normalising; appended tokens always (their row is an average).
            let divisor = if normalize || r >= BASE_ROWS {
                total
            } else {
                1.0
            };
            for c in 0..HIDDEN {
                let mut acc = 0.0;
                for ((m, s), w) in f.models.iter().zip(&src).zip(w) {
                    if let Some(j) = s {
                        acc += w * m.get(EMBED).values[j * HIDDEN + c];
                    }
                }
                let exact = if total == 0.0 { b[c] } else { acc / divisor };
                assert_rounded(got[r * HIDDEN + c], exact, &format!("{out}[{r}][{c}]"));
            }
        }
    }
    // Weights summing to 0 over a row's holders leave no average: refused
    // when planned, nothing written.
    let o = f.merge(
        "zero",
        &[
            "--vocab",
            "union",
            "--method",
            "linear",
            "--lambdas",
            "0.5",
            "-0.5",
        ],
    );
    assert_one_line_error(&o, &["tensor", "row 0", "sum to 0", "change the weights"]);
    assert!(!Path::new(&f.path("zero")).exists());
}

/// A model that adds tokens but stores no lm_head: the lm_head rows of its
/// tokens come from the other models holding them, else the mean row.
#[test]
fn rows_of_a_tensor_the_adding_model_lacks() {
    let f = Fam::new(false, &["chat", "lang"]);
    let m0: Vec<T> = f.models[0]
        .tensors
        .iter()
        .filter(|t| t.name != HEAD)
        .cloned()
        .collect();
    write_model(Path::new(&f.path("m0")), &m0, 1, false);
    let added = f.union_added();
    let w = [0.6, 0.2];
    for method in ["linear", "task_arithmetic"] {
        let args = [
            "--vocab",
            "union",
            "--method",
            method,
            "--lambdas",
            "0.6",
            "0.2",
        ];
        let o = f.merge(method, &args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let merged = read_model(Path::new(&f.path(method)));
        let got = Ty::BF16.decode(&merged[HEAD].bytes);
        for r in 0..BASE_ROWS + added.len() {
            let (b, src) = f.sources(HEAD, r, &added);
            for c in 0..HIDDEN {
                let exact = match src[1] {
                    None => b[c],
                    Some(j) => {
                        let x = f.models[1].get(HEAD).values[j * HIDDEN + c];
                        match (method, r >= BASE_ROWS) {
                            ("linear", _) => w[1] * x / w[1],
                            (_, true) => b[c] + (x - b[c]),
                            (_, false) => b[c] + w[1] * (x - b[c]),
                        }
                    }
                };
                assert_rounded(got[r * HIDDEN + c], exact, &format!("{method}[{r}][{c}]"));
            }
        }
    }
}

#[test]
fn missing_or_unreadable_tokenizers_and_other_methods_are_refused() {
    let f = Fam::new(false, &["chat", "lang"]);
    let base_before = snapshot(Path::new(&f.path("base")));
    let tok = f.path("m1") + "/tokenizer.json";
    std::fs::rename(&tok, f.path("m1.tok")).unwrap();
    let o = f.merge("out", &["--lambdas", "0.5", "0.5"]);
    assert_one_line_error(
        &o,
        &[
            "model 'm1'",
            EMBED,
            "[39, 16]",
            "tokenizer.json",
            "--skip-mismatched",
        ],
    );
    // --skip-mismatched keeps its old meaning: resized models are left out.
    let o = f.merge("skip", &["--lambdas", "0.5", "0.5", "--skip-mismatched"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("with another shape, left out"),
        "{}",
        stdout(&o)
    );
    let merged = read_model(Path::new(&f.path("skip")));
    assert_eq!(
        merged[EMBED].bytes,
        Ty::BF16.encode(&f.base.get(EMBED).values)
    );
    std::fs::rename(f.path("m1.tok"), &tok).unwrap();

    std::fs::write(&tok, r#"{"model": {"type": "Mystery"}}"#).unwrap();
    let o = f.merge("out", &["--vocab", "union", "--lambdas", "0.5", "0.5"]);
    assert_one_line_error(&o, &["m1/tokenizer.json", "Mystery", "--skip-mismatched"]);
    write_tokenizer(Path::new(&f.path("m1")), &model_tokens("lang"));

    let base_tok = f.path("base") + "/tokenizer.json";
    let saved = std::fs::read(&base_tok).unwrap();
    std::fs::remove_file(&base_tok).unwrap();
    let o = f.merge("out", &["--lambdas", "0.5", "0.5"]);
    assert_one_line_error(&o, &["the base has no tokenizer.json", "--skip-mismatched"]);
    std::fs::write(&base_tok, saved).unwrap();

    let o = f.merge(
        "out",
        &[
            "--method",
            "ties",
            "--lambdas",
            "0.5",
            "0.5",
            "--density",
            "0.5",
        ],
    );
    assert_one_line_error(
        &o,
        &[
            "task_arithmetic and linear",
            "not ties",
            "--skip-mismatched",
        ],
    );
    assert!(!Path::new(&f.path("out")).exists());
    assert_eq!(snapshot(Path::new(&f.path("base"))), base_before);
}

#[test]
fn analysis_compares_embedding_rows_by_token() {
    let f = Fam::new(false, &["chat", "lang", "perm"]);
    let stats = f.path("stats");
    let mut args = vec!["--base".to_string(), f.path("base"), "--models".into()];
    args.extend((0..3).map(|k| f.path(&format!("m{k}"))));
    args.extend(["--outdir".into(), stats.clone(), "--quiet".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("ta-analyze", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    for (k, model) in f.models.iter().enumerate() {
        let dir = format!("{stats}/m{k}");
        let mut r = csv::Reader::from_path(format!("{dir}/per_param_stats.csv")).unwrap();
        let headers = r.headers().unwrap().clone();
        let col = |h: &str| headers.iter().position(|x| x == h).unwrap();
        let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
        for name in [EMBED, HEAD] {
            let row = rows
                .iter()
                .find(|x| &x[col("param")] == name)
                .unwrap_or_else(|| panic!("m{k}: {name} not analysed"));
            // Over the base's rows: the model's row of the same token, a
            // zero delta where it lacks the token.
            let (mut sum_sq, mut l1) = (0.0, 0.0);
            for r in 0..BASE_ROWS {
                let (b, src) = f.sources(name, r, &[]);
                let Some(j) = src[k] else { continue };
                let m_row = &model.get(name).values[j * HIDDEN..(j + 1) * HIDDEN];
                for (m, b) in m_row.iter().zip(&b) {
                    let d = m - b;
                    sum_sq += d * d;
                    l1 += d.abs();
                }
            }
            let got: f64 = row[col("l2")].parse().unwrap();
            assert!(
                (got - sum_sq.sqrt()).abs() <= 1e-9 * got,
                "m{k} {name}: l2 {got} vs {}",
                sum_sq.sqrt()
            );
            let got: f64 = row[col("l1")].parse().unwrap();
            assert!(
                (got - l1).abs() <= 1e-9 * got,
                "m{k} {name}: l1 {got} vs {l1}"
            );
        }
        let summary = read_json(&format!("{dir}/summary.json"));
        let added = model
            .tokens
            .iter()
            .flatten()
            .filter(|t| f.base.row_of(t).is_none())
            .count();
        assert_eq!(summary["vocab"]["added"], added, "m{k}");
    }
    let summary = read_json(&format!("{stats}/m1/summary.json"));
    assert_eq!(summary["vocab"]["missing"], 1);
    assert_eq!(summary["vocab"]["matched"], 35);
}

/// The diagnostics (sign conflicts, cosines by layer, trimming, the TIES
/// election's sample) of fine-tunes whose embedding rows are matched by
/// token equal those of the same fine-tunes with every row moved by hand
/// to its base token's row (the base's row where a model lacks the token).
#[test]
fn diagnostics_over_rows_matched_by_token_equal_those_of_rows_aligned_by_hand() {
    let f = Fam::new(false, &["perm", "short"]);
    let aligned = f.dir.path().join("aligned");
    for (k, m) in f.models.iter().enumerate() {
        let tensors: Vec<T> = m
            .tensors
            .iter()
            .map(|t| {
                if t.name != EMBED && t.name != HEAD {
                    return t.clone();
                }
                let b = &f.base.get(&t.name).values;
                let mut v = Vec::new();
                for r in 0..BASE_ROWS {
                    let row = match f.sources(&t.name, r, &[]).1[k] {
                        Some(j) => &t.values[j * HIDDEN..(j + 1) * HIDDEN],
                        None => &b[r * HIDDEN..(r + 1) * HIDDEN],
                    };
                    v.extend_from_slice(row);
                }
                T::new(&t.name, Ty::BF16, &[BASE_ROWS, HIDDEN], v)
            })
            .collect();
        write_model(&aligned.join(format!("m{k}")), &tensors, 1, false);
    }
    let analyse = |models: [String; 2], out: &str| -> Value {
        let out = f.path(out);
        let args = [
            "--base",
            &f.path("base"),
            "--models",
            &models[0],
            &models[1],
            "--outdir",
            &out,
            "--quiet",
        ];
        let o = run("ta-analyze", &args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_json(&format!("{out}/analysis.json"))
    };
    let by_token = analyse([f.path("m0"), f.path("m1")], "by-token");
    let by_hand = analyse(
        [0, 1].map(|k| aligned.join(format!("m{k}")).to_string_lossy().into_owned()),
        "by-hand",
    );
    for key in [
        "sign_conflict",
        "sign_conflict_weighted",
        "cosine_by_layer",
        "trim_energy",
        "ties_agreement",
        "model_stock_t",
    ] {
        assert!(
            by_token[key].is_object() || by_token[key].is_array(),
            "{key}"
        );
        assert_eq!(by_token[key], by_hand[key], "{key}");
    }

    // A resized model whose tokenizer.json is unreadable: its resized
    // tensors are skipped, and a note names the file.
    let broken = f.dir.path().join("m1-badtok");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(f.path("m1")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    std::fs::write(broken.join("tokenizer.json"), "{\"model\": ").unwrap();
    let out = f.path("badtok");
    let broken_s = broken.to_string_lossy().into_owned();
    let o = run(
        "ta-analyze",
        &[
            "--base",
            &f.path("base"),
            "--models",
            &broken_s,
            "--outdir",
            &out,
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(
        said.contains("note: resized embedding rows are not matched by token")
            && said.contains("m1-badtok/tokenizer.json"),
        "{said}"
    );
}

/// Writes a LoRA adapter of rank 2 on the base's `[rows, cols]` matrix
/// `module` (PEFT's names and config).
fn write_lora(dir: &Path, module: &str, rows: usize, cols: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let target = module.rsplit('.').next().unwrap();
    let config = json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4.0,
        "target_modules": [target], "base_model_name_or_path": "base"});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let a = T::new("a", Ty::F32, &[2, cols], noise(seed, 2 * cols, 0.3));
    let b = T::new("b", Ty::F32, &[rows, 2], noise(seed + 1, rows * 2, 0.05));
    let factors = [
        (format!("base_model.model.{module}.lora_A.weight"), &a),
        (format!("base_model.model.{module}.lora_B.weight"), &b),
    ];
    write_safetensors(&dir.join("adapter_model.safetensors"), &factors, false);
}

#[test]
fn adapters_beside_a_resized_fine_tune() {
    let f = Fam::new(false, &["chat"]);
    write_lora(
        &f.dir.path().join("qa"),
        "model.layers.0.self_attn.q_proj",
        HIDDEN,
        HIDDEN,
        5,
    );
    write_lora(&f.dir.path().join("ha"), "lm_head", BASE_ROWS, HIDDEN, 7);

    // An adapter that leaves the embedding and lm_head alone adds a zero
    // task vector to their rows: they are those of the fine-tune alone.
    let o = f.merge_with("with_q", &["qa"], &["--lambdas", "0.7", "0.4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = f.merge("alone", &["--lambdas", "0.7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    f.check_task_arithmetic("alone", EMBED, &[0.7], 1.0, false);
    let with_q = read_model(Path::new(&f.path("with_q")));
    let alone = read_model(Path::new(&f.path("alone")));
    for name in [EMBED, HEAD] {
        assert_eq!(with_q[name].shape, alone[name].shape, "{name}");
        assert_eq!(with_q[name].bytes, alone[name].bytes, "{name}");
    }
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(
        with_q[q].bytes, alone[q].bytes,
        "the adapter's q_proj merged"
    );
    let record = read_json(&format!("{}/merge_record.json", f.path("with_q")));
    assert_eq!(record["models"][1]["vocab"]["missing"], 0);
    assert_eq!(record["models"][1]["adapter"]["rank"], 2, "{record}");

    // Linear counts the untouched adapter's weight over the base's row.
    let o = f.merge_with(
        "linear",
        &["qa"],
        &["--method", "linear", "--lambdas", "0.7", "0.4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let linear = read_model(Path::new(&f.path("linear")));
    let got = Ty::BF16.decode(&linear[EMBED].bytes);
    for r in 0..BASE_ROWS {
        let (b, src) = f.sources(EMBED, r, &[]);
        for c in 0..HIDDEN {
            let exact = match src[0] {
                Some(j) => (0.7 * f.models[0].get(EMBED).values[j * HIDDEN + c] + 0.4 * b[c]) / 1.1,
                None => b[c],
            };
            assert_rounded(got[r * HIDDEN + c], exact, &format!("linear [{r}][{c}]"));
        }
    }

    // An adapter that changes a tensor matched by token is refused, naming
    // it and the way out; --skip-mismatched leaves the resized model out.
    let o = f.merge_with("with_head", &["ha"], &["--lambdas", "0.7", "0.4"]);
    assert_one_line_error(&o, &["'ha'", HEAD, "--skip-mismatched"]);
    assert!(!Path::new(&f.path("with_head")).join("config.json").exists());
    let o = f.merge_with(
        "skipped",
        &["ha"],
        &["--lambdas", "0.7", "0.4", "--skip-mismatched"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let skipped = read_model(Path::new(&f.path("skipped")));
    assert_eq!(skipped[HEAD].shape, [BASE_ROWS, HIDDEN]);

    // The analysis: the fine-tune's rows by token, the adapters' as theirs.
    let stats = f.path("stats");
    let args = [
        "--base",
        &f.path("base"),
        "--models",
        &f.path("m0"),
        &f.path("qa"),
        &f.path("ha"),
        "--outdir",
        &stats,
        "--quiet",
    ];
    let o = run("ta-analyze", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = read_json(&format!("{stats}/m0/summary.json"));
    assert_eq!(summary["vocab"]["added"], 2, "{summary}");
    assert_eq!(summary["skipped_params"], 0, "{summary}");
    let summary = read_json(&format!("{stats}/ha/summary.json"));
    assert_eq!(summary["skipped_params"], 0, "{summary}");
    let mut r = csv::Reader::from_path(format!("{stats}/ha/per_param_stats.csv")).unwrap();
    let headers = r.headers().unwrap().clone();
    let col = |h: &str| headers.iter().position(|x| x == h).unwrap();
    let head = r
        .records()
        .map(|x| x.unwrap())
        .find(|x| &x[col("param")] == HEAD)
        .expect("lm_head analysed");
    assert!(head[col("l2")].parse::<f64>().unwrap() > 0.0);
}

#[test]
fn a_checkpoint_of_embeddings_only_is_matched_by_token_not_refused() {
    // Every tensor the two share is resized: the other-size check leaves
    // the token-indexed tensors to the alignment.
    let dir = tempfile::tempdir().unwrap();
    let hidden = 4;
    for (name, tokens) in [("base", base_tokens()), ("ft", model_tokens("chat"))] {
        let rows = tokens.len();
        let embed = T::new(
            "model.embed_tokens.weight",
            Ty::F32,
            &[rows, hidden],
            noise(rows as u64, rows * hidden, 0.02),
        );
        write_model(&dir.path().join(name), &[embed], 1, false);
        write_tokenizer(&dir.path().join(name), &tokens);
    }
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let o = run(
        "ta-merge",
        &[
            "--base-model-path",
            &p("base"),
            "--other-model-paths",
            &p("ft"),
            "--lambdas",
            "1",
            "--vocab",
            "union",
            "--output-path",
            &p("out"),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
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
    );
    assert!(o.status.success(), "{}", stderr(&o));
}
