//! Which files of a hub repository a run reads, chosen by the rules
//! [`crate::locate`] uses to find weights in a folder, so what is
//! downloaded is what is opened and nothing more: the configuration and
//! tokenizer files (`config.json` and every side file the merge copies),
//! then the safetensors weights (`model.safetensors.index.json` and the
//! shards it names, else `model.safetensors`, else every top-level
//! `*.safetensors`), PyTorch `.bin` weights only when the repository has no
//! safetensors, and a PEFT adapter's `adapter_config.json` and
//! `adapter_model.safetensors` (or `.bin`). Files in subfolders (`onnx/`,
//! `original/`, ...) are never taken.

use crate::error::{Error, Result};

/// The files to fetch, before the index (if any) is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Configuration, tokenizer and adapter files: fetched first.
    pub side: Vec<String>,
    /// A weight index whose shards are fetched once it is read.
    pub index: Option<String>,
    /// Weight files known without an index.
    pub weights: Vec<String>,
}

const ADAPTER_CONFIG: &str = "adapter_config.json";
const ADAPTER_ST: &str = "adapter_model.safetensors";
const ADAPTER_BIN: &str = "adapter_model.bin";

/// Picks the files of a repository holding `names` (paths relative to its
/// root, as the hub lists them); `repo` names it in the error raised when
/// it holds no weights this tool reads.
pub fn select(repo: &str, names: &[String]) -> Result<Selection> {
    let top: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| is_plain_name(n))
        .collect();
    let has = |n: &str| top.contains(&n);
    let mut side: Vec<String> = top
        .iter()
        .filter(|n| **n == "config.json" || crate::sidecar::is_side_file(n))
        .map(|n| n.to_string())
        .collect();
    let is_adapter_file = |n: &str| n == ADAPTER_ST || n == ADAPTER_BIN;
    let (index, weights) = safetensors_weights(&top, &is_adapter_file)?
        .or_else(|| pickle_weights(&top))
        .unwrap_or((None, Vec::new()));
    if has(ADAPTER_CONFIG) && (has(ADAPTER_ST) || has(ADAPTER_BIN)) {
        side.push(ADAPTER_CONFIG.to_string());
        side.push(
            if has(ADAPTER_ST) {
                ADAPTER_ST
            } else {
                ADAPTER_BIN
            }
            .to_string(),
        );
    }
    if index.is_none() && weights.is_empty() && !side.iter().any(|n| is_adapter_file(n)) {
        let shown: Vec<&str> = names.iter().map(String::as_str).take(8).collect();
        return Err(Error::NotFound(format!(
            "{repo}: the repository holds no safetensors or PyTorch weights at its top level \
             (it lists {}{}); give the weights' folder or file instead",
            if shown.is_empty() {
                "no files".to_string()
            } else {
                shown.join(", ")
            },
            if names.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )));
    }
    side.sort();
    side.dedup();
    Ok(Selection {
        side,
        index,
        weights,
    })
}

type Weights = (Option<String>, Vec<String>);

fn safetensors_weights(top: &[&str], is_adapter: &dyn Fn(&str) -> bool) -> Result<Option<Weights>> {
    if top.contains(&"model.safetensors.index.json") {
        return Ok(Some((Some("model.safetensors.index.json".into()), vec![])));
    }
    if top.contains(&"model.safetensors") {
        return Ok(Some((None, vec!["model.safetensors".into()])));
    }
    let indexes: Vec<&str> = top
        .iter()
        .copied()
        .filter(|n| n.ends_with(".safetensors.index.json"))
        .collect();
    match indexes.len() {
        0 => {}
        1 => return Ok(Some((Some(indexes[0].to_string()), vec![]))),
        _ => {
            return Err(Error::NotFound(format!(
                "the repository holds several safetensors index files ({}); \
                 download the model yourself and pass the index to use",
                indexes.join(", ")
            )))
        }
    }
    let files: Vec<String> = top
        .iter()
        .filter(|n| n.ends_with(".safetensors") && !is_adapter(n))
        .map(|n| n.to_string())
        .collect();
    Ok((!files.is_empty()).then_some((None, files)))
}

fn pickle_weights(top: &[&str]) -> Option<Weights> {
    if top.contains(&"pytorch_model.bin.index.json") {
        return Some((Some("pytorch_model.bin.index.json".into()), vec![]));
    }
    let files: Vec<String> = top
        .iter()
        .filter(|n| n.starts_with("pytorch_model") && n.ends_with(".bin"))
        .map(|n| n.to_string())
        .collect();
    (!files.is_empty()).then_some((None, files))
}

/// Whether `name` is a file at the repository's top level that can be a
/// cache file name: no folder, not `.`/`..`, no control character.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_index_wins_and_other_formats_and_folders_are_left() {
        let repo = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
            "pytorch_model.bin",
            "original/consolidated.00.pth",
            "onnx/model.onnx",
        ]);
        let s = select("o/m", &repo).unwrap();
        assert_eq!(s.index.as_deref(), Some("model.safetensors.index.json"));
        assert!(s.weights.is_empty());
        assert_eq!(
            s.side,
            names(&[
                "config.json",
                "generation_config.json",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ])
        );
    }

    #[test]
    fn single_loose_pickle_and_adapter_repositories() {
        let s = select("o/m", &names(&["model.safetensors", "pytorch_model.bin"])).unwrap();
        assert_eq!((s.index, s.weights), (None, names(&["model.safetensors"])));
        let s = select("o/m", &names(&["a.safetensors", "b.safetensors"])).unwrap();
        assert_eq!(s.weights, names(&["a.safetensors", "b.safetensors"]));
        let s = select(
            "o/m",
            &names(&[
                "pytorch_model.bin.index.json",
                "pytorch_model-00001-of-00002.bin",
            ]),
        )
        .unwrap();
        assert_eq!(s.index.as_deref(), Some("pytorch_model.bin.index.json"));
        let s = select("o/m", &names(&["pytorch_model.bin", "training_args.bin"])).unwrap();
        assert_eq!(s.weights, names(&["pytorch_model.bin"]));
        let s = select(
            "o/m",
            &names(&[
                "adapter_config.json",
                "adapter_model.safetensors",
                "adapter_model.bin",
            ]),
        )
        .unwrap();
        assert_eq!(
            (s.index, s.weights, s.side),
            (
                None,
                vec![],
                names(&["adapter_config.json", "adapter_model.safetensors"])
            )
        );
    }

    #[test]
    fn repositories_without_weights_and_odd_names_are_refused() {
        let err = select("o/m", &names(&["model.gguf", "README.md"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("o/m") && err.contains("model.gguf"), "{err}");
        let err = select("o/m", &names(&["sub/model.safetensors"])).unwrap_err();
        assert!(err.to_string().contains("no safetensors"), "{err}");
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "a\nb"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }
}
