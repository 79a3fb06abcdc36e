//! Vocabulary alignment: matching embedding rows by token string.
//!
//! Fine-tunes that add tokens (chat markers, a new language) store more
//! embedding and output rows than their base. Rows are matched by the token
//! each row stands for, read from every model's `tokenizer.json` with
//! serde_json: the `model.vocab` of BPE, WordPiece and WordLevel tokenizers
//! (a token → id map) or of Unigram ones (a list whose index is the id),
//! plus `added_tokens` with their ids. [`Alignment`] gives, for every output
//! row, the row of each model holding the same token (or none), per model
//! counts of matched, added and missing tokens, and with
//! [`VocabMode::Union`] the tokens appended after the base's rows.
//! [`write_union_files`] writes the union's `tokenizer.json`,
//! `tokenizer_config.json`, `added_tokens.json` and `config.json`
//! `vocab_size`. The merge's row rule lives in [`crate::merge`].

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::family::{is_input_embedding, Family, Model, LM_HEAD};
use crate::sidecar::read_side_text_if_present;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// Which vocabulary the merged model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabMode {
    /// The base's tokens, each row merged from the models that have it.
    Base,
    /// The base's tokens followed by every token a model adds.
    Union,
}

impl VocabMode {
    /// Parses `base` or `union`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "base" => Some(Self::Base),
            "union" => Some(Self::Union),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Union => "union",
        }
    }
}

/// A tokenizer's vocabulary: the token string of each id, and back.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    ids: HashMap<String, u32>,
    /// By id: a map, not a list, so that an id of 4 billion in a hostile
    /// file costs an entry, not a table of every id below it.
    tokens: HashMap<u32, String>,
    /// The `added_tokens` entries, by content (kept for the union's files).
    added: HashMap<String, Value>,
}

impl Vocabulary {
    /// Reads `folder/tokenizer.json`; `None` when there is none.
    pub fn read(folder: &Path) -> Result<Option<Self>> {
        let path = folder.join("tokenizer.json");
        match read_side_text_if_present(&path)? {
            None => Ok(None),
            Some(text) => Self::parse(&text).map(Some).map_err(|detail| {
                Error::bad_file(
                    &path,
                    format!("{detail}; cannot match embedding rows by token"),
                )
            }),
        }
    }

    /// Parses the text of a `tokenizer.json`.
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let json: Value =
            serde_json::from_str(text).map_err(|e| format!("is not valid JSON: {e}"))?;
        let model = json.get("model").ok_or("has no \"model\"")?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("");
        let mut v = Vocabulary::default();
        match model.get("vocab") {
            Some(Value::Object(map)) => {
                for (token, id) in map {
                    let id = token_id(id).ok_or(format!(
                        "model.vocab gives token {token:?} the id {id}, not a token id"
                    ))?;
                    v.insert(token, id)?;
                }
            }
            Some(Value::Array(pieces)) if kind == "Unigram" => {
                for (id, piece) in pieces.iter().enumerate() {
                    let token = piece
                        .get(0)
                        .and_then(Value::as_str)
                        .ok_or(format!("model.vocab[{id}] is not a [piece, score] pair"))?;
                    v.insert(token, id as u32)?;
                }
            }
            _ => {
                return Err(format!(
                    "holds no model.vocab this tool can read (model type {kind:?}; \
                     BPE, WordPiece, WordLevel and Unigram are read)"
                ))
            }
        }
        let added = match json.get("added_tokens") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => return Err("has \"added_tokens\" that is not a list".into()),
        };
        for (k, entry) in added.iter().enumerate() {
            let content = entry.get("content").and_then(Value::as_str);
            let id = entry.get("id").and_then(token_id);
            let (Some(content), Some(id)) = (content, id) else {
                return Err(format!("added_tokens[{k}] has no string content and id"));
            };
            v.insert(content, id)?;
            v.added.insert(content.to_string(), entry.clone());
        }
        Ok(v)
    }

    /// Records that `token` has `id`; an id may hold only one string.
    fn insert(&mut self, token: &str, id: u32) -> std::result::Result<(), String> {
        match self.tokens.get(&id) {
            Some(other) if other != token => {
                return Err(format!(
                "gives id {id} to both {other:?} and {token:?}, so rows cannot be matched by token"
            ))
            }
            _ => self.tokens.insert(id, token.to_string()),
        };
        self.ids.entry(token.to_string()).or_insert(id);
        Ok(())
    }

    /// The token of row `id`, if the tokenizer names one.
    pub fn token(&self, id: usize) -> Option<&str> {
        let id = u32::try_from(id).ok()?;
        self.tokens.get(&id).map(String::as_str)
    }

    /// The id of `token` when it is below `rows`.
    fn id_below(&self, token: &str, rows: usize) -> Option<u32> {
        self.ids
            .get(token)
            .copied()
            .filter(|&i| (i as usize) < rows)
    }
}

/// A JSON number that is a valid token id.
fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|i| u32::try_from(i).ok())
}

/// How one model's tokens compare with the base's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VocabCounts {
    /// Base tokens the model has (their rows merge by token).
    pub matched: usize,
    /// The model's tokens the base lacks (appended by `--vocab union`).
    pub added: usize,
    /// Base tokens the model lacks (it contributes nothing to them).
    pub missing: usize,
}

/// A token the union appends after the base's rows.
#[derive(Debug, Clone)]
pub struct AddedToken {
    pub content: String,
    /// The `added_tokens` entry of the first model that adds it, if any.
    pub entry: Option<Value>,
}

/// Every output row's source row in each model.
#[derive(Debug, Clone)]
pub struct Alignment {
    pub mode: VocabMode,
    /// Rows of the base's embedding.
    pub base_rows: usize,
    /// Per model: for each output row, the model's row holding its token.
    pub maps: Vec<Vec<Option<u32>>>,
    /// Per model: its embedding's rows.
    pub model_rows: Vec<usize>,
    /// The union's appended tokens (output rows `base_rows..`).
    pub added: Vec<AddedToken>,
    pub counts: Vec<VocabCounts>,
}

impl Alignment {
    /// Rows of the output's embedding.
    pub fn rows(&self) -> usize {
        self.base_rows + self.added.len()
    }

    /// Whether row matching changes anything: some model's rows are not
    /// the output's rows in order, or the union adds tokens.
    pub fn needed(&self) -> bool {
        !self.added.is_empty()
            || self.maps.iter().zip(&self.model_rows).any(|(map, &rows)| {
                rows != self.base_rows || map.iter().enumerate().any(|(r, &m)| m != Some(r as u32))
            })
    }

    /// Plans the alignment of `family` when `mode` asks for it, or (with no
    /// mode and without `skip_mismatched`) when a model's embedding or
    /// output layer has another number of rows than the base's.
    pub fn plan(
        family: &Family,
        mode: Option<VocabMode>,
        skip_mismatched: bool,
    ) -> Result<Option<Self>> {
        let Some((base_name, base_rows)) = vocab_rows(&family.base) else {
            return match mode {
                Some(m) => Err(Error::Incompatible(format!(
                    "--vocab {}: the base stores no embedding or lm_head.weight to match by token",
                    m.name()
                ))),
                None => Ok(None),
            };
        };
        let rows: Vec<Option<(&str, usize)>> = family
            .models
            .iter()
            .map(|m| stored(m).and_then(vocab_rows))
            .collect();
        let differs = rows.iter().any(|r| r.is_some_and(|(_, r)| r != base_rows));
        let mode = match mode {
            Some(m) => m,
            None if differs && !skip_mismatched => VocabMode::Base,
            None => return Ok(None),
        };
        let flag = format!("--vocab {}", mode.name());
        let way_out = "or pass --skip-mismatched to leave resized models out of those tensors";
        let has_tokenizer = |c: &Checkpoint| c.folder().join("tokenizer.json").exists();
        // Missing tokenizers first: they say the most about what is wrong.
        for (i, m) in family.models.iter().enumerate() {
            let Some(m) = stored(m) else { continue };
            if let Some((name, model_rows)) = rows[i] {
                if model_rows != base_rows && !has_tokenizer(m) {
                    return Err(Error::Incompatible(format!(
                        "{flag}: model '{}' stores {name} as {:?}, the base {base_name} as \
                         {:?}, and has no tokenizer.json in {} to match rows by token; add it, \
                         {way_out}",
                        family.names[i],
                        m.get(name).map(|t| t.shape.clone()).unwrap_or_default(),
                        family
                            .base
                            .get(base_name)
                            .map(|t| t.shape.clone())
                            .unwrap_or_default(),
                        m.folder().display()
                    )));
                }
            }
        }
        if !has_tokenizer(&family.base) {
            return Err(Error::Incompatible(format!(
                "{flag}: the base has no tokenizer.json in {} to match embedding rows by token; \
                 add it, {way_out}",
                family.base.folder().display()
            )));
        }
        let read = |c: &Checkpoint| {
            Vocabulary::read(c.folder()).map_err(|e| match e {
                Error::BadFile { path, detail } => Error::BadFile {
                    path,
                    detail: format!("{detail} ({flag}); {way_out}"),
                },
                other => other,
            })
        };
        let base_vocab = read(&family.base)?.ok_or_else(|| {
            Error::Incompatible(format!(
                "{flag}: the base's tokenizer.json in {} disappeared while being read",
                family.base.folder().display()
            ))
        })?;
        let mut models = Vec::new();
        for (i, m) in family.models.iter().enumerate() {
            let model_rows = rows[i].map_or(base_rows, |(_, r)| r);
            let vocab = match stored(m) {
                Some(c) => read(c)?,
                None => None,
            };
            models.push((vocab, model_rows));
        }
        Ok(Some(Self::build(mode, &base_vocab, base_rows, &models)))
    }

    /// Matches rows by token. A model without a vocabulary (and with the
    /// base's row count) is taken to share the base's. A row of the base
    /// that no token names (padding) matches the same row of a model where
    /// that row names no token either.
    pub fn build(
        mode: VocabMode,
        base: &Vocabulary,
        base_rows: usize,
        models: &[(Option<Vocabulary>, usize)],
    ) -> Self {
        let mut maps = Vec::with_capacity(models.len());
        let mut counts = Vec::with_capacity(models.len());
        for (vocab, rows) in models {
            let Some(vocab) = vocab else {
                // Row for row, as far as the model has rows.
                let held = base_rows.min(*rows);
                maps.push(
                    (0..base_rows)
                        .map(|r| (r < held).then_some(r as u32))
                        .collect(),
                );
                counts.push(VocabCounts {
                    matched: (0..held).filter(|&r| base.token(r).is_some()).count(),
                    missing: (held..base_rows)
                        .filter(|&r| base.token(r).is_some())
                        .count(),
                    ..VocabCounts::default()
                });
                continue;
            };
            let mut c = VocabCounts::default();
            let map: Vec<Option<u32>> = (0..base_rows)
                .map(|r| match base.token(r) {
                    Some(token) => {
                        // The same row when it holds the same token (a token
                        // may stand at two ids), else the token's first id.
                        let same = r < *rows && vocab.token(r) == Some(token);
                        let found = if same {
                            Some(r as u32)
                        } else {
                            vocab.id_below(token, *rows)
                        };
                        if found.is_some() {
                            c.matched += 1;
                        } else {
                            c.missing += 1;
                        }
                        found
                    }
                    None => (r < *rows && vocab.token(r).is_none()).then_some(r as u32),
                })
                .collect();
            c.added = (0..*rows)
                .filter_map(|j| vocab.token(j))
                .filter(|t| base.id_below(t, base_rows).is_none())
                .collect::<std::collections::HashSet<_>>()
                .len();
            maps.push(map);
            counts.push(c);
        }
        let mut added: Vec<AddedToken> = Vec::new();
        if mode == VocabMode::Union {
            let mut seen = std::collections::HashSet::new();
            for (vocab, rows) in models {
                let Some(vocab) = vocab else { continue };
                for j in 0..*rows {
                    let Some(t) = vocab.token(j) else { continue };
                    if base.id_below(t, base_rows).is_none() && seen.insert(t.to_string()) {
                        added.push(AddedToken {
                            content: t.to_string(),
                            entry: vocab.added.get(t).cloned(),
                        });
                    }
                }
            }
            for ((vocab, rows), map) in models.iter().zip(&mut maps) {
                map.extend(
                    added
                        .iter()
                        .map(|a| vocab.as_ref().and_then(|v| v.id_below(&a.content, *rows))),
                );
            }
        }
        Self {
            mode,
            base_rows,
            maps,
            model_rows: models.iter().map(|(_, r)| *r).collect(),
            added,
            counts,
        }
    }
}

/// A model's stored checkpoint; `None` for an adapter, whose tensors have
/// the base's shape (checked when it is opened): it shares the base's rows
/// and tokens.
fn stored(m: &Model) -> Option<&Checkpoint> {
    match m {
        Model::Checkpoint(c) => Some(c),
        Model::Adapter(_) => None,
    }
}

/// Whether `name` is a matrix whose rows are tokens.
pub fn is_vocab_tensor(name: &str) -> bool {
    is_input_embedding(name) || name == LM_HEAD
}

/// A checkpoint's input embedding (else its `lm_head.weight`) and its rows.
fn vocab_rows(ckpt: &Checkpoint) -> Option<(&str, usize)> {
    let name = ckpt
        .names()
        .iter()
        .find(|n| is_input_embedding(n))
        .map(String::as_str)
        .or_else(|| ckpt.contains(LM_HEAD).then_some(LM_HEAD))?;
    let t = ckpt.get(name)?;
    (t.shape.len() == 2).then(|| (name, t.shape[0]))
}

/// Writes the union's side files into `dir` (where the base's were copied
/// and `config.json` written): `tokenizer.json` with the appended tokens
/// as added tokens at their new ids, `tokenizer_config.json`'s
/// `added_tokens_decoder`, `added_tokens.json` when the base has one, and
/// `config.json`'s `vocab_size`. Tokens a model holds in its `model.vocab`
/// (not as added tokens) are appended as plain added tokens.
pub fn write_union_files(base_folder: &Path, dir: &Path, alignment: &Alignment) -> Result<()> {
    let entries: Vec<(u32, Value)> = alignment
        .added
        .iter()
        .enumerate()
        .map(|(k, a)| {
            let id = (alignment.base_rows + k) as u32;
            let mut e = match &a.entry {
                Some(Value::Object(o)) => o.clone(),
                _ => Map::new(),
            };
            e.insert("id".into(), id.into());
            e.insert("content".into(), a.content.clone().into());
            for (key, default) in [
                ("single_word", false),
                ("lstrip", false),
                ("rstrip", false),
                ("normalized", false),
                ("special", false),
            ] {
                e.entry(key).or_insert(default.into());
            }
            (id, Value::Object(e))
        })
        .collect();
    // The base's tokenizer may name ids past its embedding's rows: those
    // rows are the union's now, so the base's entries for them go.
    let base_rows = alignment.base_rows as u64;
    let below_base = |id: Option<u64>| id.is_some_and(|id| id < base_rows);
    edit_json(base_folder, dir, "tokenizer.json", |t| {
        let obj = t.as_object_mut()?;
        let list = present_or(obj, "added_tokens", json!([])).as_array_mut()?;
        list.retain(|e| below_base(e.get("id").and_then(Value::as_u64)));
        list.extend(entries.iter().map(|(_, e)| e.clone()));
        Some(())
    })?;
    edit_json(base_folder, dir, "tokenizer_config.json", |t| {
        let obj = t.as_object_mut()?;
        let decoder = present_or(obj, "added_tokens_decoder", json!({})).as_object_mut()?;
        decoder.retain(|id, _| below_base(id.parse().ok()));
        for (id, e) in &entries {
            let mut e = e.as_object()?.clone();
            e.remove("id");
            decoder.insert(id.to_string(), Value::Object(e));
        }
        Some(())
    })?;
    edit_json(base_folder, dir, "added_tokens.json", |t| {
        let obj = t.as_object_mut()?;
        obj.retain(|_, id| below_base(id.as_u64()));
        for (id, e) in &entries {
            obj.insert(e["content"].as_str()?.to_string(), (*id).into());
        }
        Some(())
    })?;
    let rows = alignment.rows();
    edit_json(dir, dir, "config.json", |c| {
        let obj = c.as_object_mut()?;
        obj.insert("vocab_size".into(), rows.into());
        if let Some(Value::Object(text)) = obj.get_mut("text_config") {
            text.insert("vocab_size".into(), rows.into());
        }
        Some(())
    })
}

/// `obj[key]`, set to `empty` first when absent or null (tokenizer files
/// write `null` for "none").
fn present_or<'a>(obj: &'a mut Map<String, Value>, key: &str, empty: Value) -> &'a mut Value {
    let v = obj.entry(key).or_insert(Value::Null);
    if v.is_null() {
        *v = empty;
    }
    v
}

/// Reads `from/name` (when present), edits it with `edit` and writes the
/// result to `dir/name`, replacing any copy there (never writing through a
/// link). An `edit` that returns `None` met an unexpected layout.
fn edit_json(
    from: &Path,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Value) -> Option<()>,
) -> Result<()> {
    let src = from.join(name);
    let Some(text) = read_side_text_if_present(&src)? else {
        return Ok(());
    };
    let mut value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&src, format!("is not valid JSON: {e}")))?;
    edit(&mut value).ok_or_else(|| {
        Error::bad_file(
            &src,
            "has an unexpected layout; cannot add the union's tokens to it",
        )
    })?;
    let dst = dir.join(name);
    match std::fs::remove_file(&dst) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("cannot replace", &dst, e))
        }
        _ => {}
    }
    let out = serde_json::to_string_pretty(&value).expect("json") + "\n";
    std::fs::write(&dst, out).map_err(|e| Error::io("cannot write", &dst, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str], added: &[(&str, u32)]) -> Vocabulary {
        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), (i as u32).into()))
            .collect();
        let added: Vec<Value> = added
            .iter()
            .map(|(c, id)| json!({"id": id, "content": c, "special": true}))
            .collect();
        let text = json!({"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": added});
        Vocabulary::parse(&text.to_string()).unwrap()
    }

    #[test]
    fn rows_match_by_token_and_the_union_appends_in_model_order() {
        let base = vocab(&["a", "b", "c"], &[]);
        let m1 = vocab(&["a", "c", "b"], &[("<x>", 3), ("<y>", 4)]);
        let m2 = vocab(&["a", "b"], &[("<y>", 2), ("<z>", 3)]);
        let models = vec![(Some(m1), 5), (Some(m2), 4)];
        let a = Alignment::build(VocabMode::Union, &base, 3, &models);
        assert_eq!(
            a.added
                .iter()
                .map(|t| t.content.as_str())
                .collect::<Vec<_>>(),
            ["<x>", "<y>", "<z>"]
        );
        assert_eq!(
            a.maps[0],
            [Some(0), Some(2), Some(1), Some(3), Some(4), None]
        );
        assert_eq!(a.maps[1], [Some(0), Some(1), None, None, Some(2), Some(3)]);
        let c = (a.counts[1].matched, a.counts[1].added, a.counts[1].missing);
        assert_eq!(c, (2, 2, 1));
        let b = Alignment::build(VocabMode::Base, &base, 3, &models);
        assert_eq!(b.rows(), 3);
        assert!(b.needed());
    }

    #[test]
    fn unreadable_tokenizers_are_refused() {
        for (text, needle) in [
            ("{", "not valid JSON"),
            ("{\"model\": {\"type\": \"Weird\"}}", "model type \"Weird\""),
            (
                "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}}}",
                "id 0",
            ),
            (
                "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}}}",
                "not a token id",
            ),
        ] {
            let err = Vocabulary::parse(text).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn huge_ids_cost_an_entry_and_a_token_at_two_ids_matches_its_own_row() {
        // An id of 4 billion is read without a table of every id below it.
        let huge = vocab(&["a"], &[("<far>", u32::MAX)]);
        assert_eq!(huge.token(u32::MAX as usize), Some("<far>"));
        assert_eq!(huge.token(1), None);
        // "a" stands at ids 0 and 2 in both: each row keeps its own.
        let base = vocab(&["a", "b"], &[("a", 2)]);
        let twin = vocab(&["a", "b"], &[("a", 2), ("<x>", 3), ("<x>", 4)]);
        let a = Alignment::build(VocabMode::Union, &base, 3, &[(Some(twin), 5)]);
        assert_eq!(a.maps[0], [Some(0), Some(1), Some(2), Some(3)]);
        // "<x>" at two ids is one added token.
        assert_eq!(a.counts[0].added, 1);
        assert_eq!(a.rows(), 4);
    }

    /// Writes the union's files for `a` from a base folder holding
    /// `tokenizer` (tokenizer.json) and `config` (tokenizer_config.json);
    /// the returned reader parses a written file by name.
    fn written_union(tokenizer: &Value, config: &Value, a: &Alignment) -> impl Fn(&str) -> Value {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(from.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        std::fs::write(
            from.path().join("tokenizer_config.json"),
            config.to_string(),
        )
        .unwrap();
        std::fs::write(to.path().join("config.json"), "{}").unwrap();
        write_union_files(from.path(), to.path(), a).unwrap();
        move |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(to.path().join(name)).unwrap()).unwrap()
        }
    }

    #[test]
    fn the_union_drops_the_base_tokenizers_ids_past_its_rows() {
        // The base's tokenizer names <pad> at 2, past its 2 embedding rows.
        let tokenizer = json!({"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}},
            "added_tokens": [{"id": 2, "content": "<pad>"}]});
        let config = json!({"added_tokens_decoder": {"2": {"content": "<pad>"}}});
        let base = vocab(&["a", "b"], &[("<pad>", 2)]);
        let model = vocab(&["a", "b"], &[("<x>", 2), ("<pad>", 3)]);
        let a = Alignment::build(VocabMode::Union, &base, 2, &[(Some(model), 4)]);
        let read = written_union(&tokenizer, &config, &a);
        let ids: Vec<(u64, String)> = read("tokenizer.json")["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["id"].as_u64().unwrap(),
                    e["content"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(ids, [(2, "<x>".to_string()), (3, "<pad>".to_string())]);
        let decoder = read("tokenizer_config.json")["added_tokens_decoder"].clone();
        assert_eq!(decoder["2"]["content"], "<x>");
        assert_eq!(decoder["3"]["content"], "<pad>");
        assert_eq!(read("config.json")["vocab_size"], 4);
    }

    /// A model without a vocabulary is matched row for row as far as it has
    /// rows; the base's named rows past them are counted missing.
    #[test]
    fn a_model_without_a_vocabulary_maps_only_the_rows_it_has() {
        let base = vocab(&["a", "b", "c", "d"], &[]);
        let a = Alignment::build(VocabMode::Base, &base, 4, &[(None, 2), (None, 4)]);
        assert_eq!(a.maps[0], [Some(0), Some(1), None, None]);
        assert_eq!(a.maps[1], [Some(0), Some(1), Some(2), Some(3)]);
        let counts: Vec<(usize, usize, usize)> = a
            .counts
            .iter()
            .map(|c| (c.matched, c.added, c.missing))
            .collect();
        assert_eq!(counts, [(2, 0, 2), (4, 0, 0)]);
    }

    /// Tokenizer files that write `null` for "no added tokens" take the
    /// union's tokens as if the lists were empty.
    #[test]
    fn null_added_token_lists_take_the_union() {
        let tokenizer = json!({"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}},
            "added_tokens": null});
        let config = json!({"added_tokens_decoder": null});
        let base = vocab(&["a", "b"], &[]);
        let model = vocab(&["a", "b"], &[("<x>", 2)]);
        let a = Alignment::build(VocabMode::Union, &base, 2, &[(Some(model), 3)]);
        let read = written_union(&tokenizer, &config, &a);
        let added = read("tokenizer.json")["added_tokens"].clone();
        assert_eq!(added[0]["id"], 2);
        assert_eq!(added[0]["content"], "<x>");
        assert_eq!(added.as_array().unwrap().len(), 1);
        let decoder = read("tokenizer_config.json")["added_tokens_decoder"].clone();
        assert_eq!(decoder["2"]["content"], "<x>");
        assert_eq!(read("config.json")["vocab_size"], 3);
    }
}
