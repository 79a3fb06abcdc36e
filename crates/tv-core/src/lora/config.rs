//! `adapter_config.json` of a PEFT adapter: what kind it is, and the rank
//! and scale of each adapted module.
//!
//! Only LoRA is accepted (`peft_type: LORA`, without DoRA, `lora_bias` or
//! trainable tokens); any other type is refused naming it. Per-module
//! ranks and alphas follow PEFT: the first key of `rank_pattern` /
//! `alpha_pattern` (in file order) that matches the module name as the
//! regex `(.*\.)?(KEY)$` wins, else `r` / `lora_alpha`; the scale is
//! alpha / r, or alpha / √r with `use_rslora`. `layers_to_transform`
//! keeps only the layers it lists, the layer index read from the module
//! name as PEFT reads it (after `layers_pattern` when given, else after
//! any name component).

use crate::error::{Error, Result};
use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// The parts of `adapter_config.json` this toolkit uses.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: u64,
    pub alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub target_modules: Value,
    pub modules_to_save: Vec<String>,
    rank_pattern: Vec<(Regex, String, u64)>,
    alpha_pattern: Vec<(Regex, String, f64)>,
    layers_to_transform: Option<Vec<u64>>,
    layer_index: Vec<Regex>,
}

#[derive(Deserialize)]
struct Raw {
    peft_type: Option<String>,
    #[serde(default = "default_rank")]
    r: u64,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    target_modules: Value,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: Option<Map<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<Map<String, Value>>,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    layers_pattern: Option<Value>,
    #[serde(default)]
    trainable_token_indices: Option<Value>,
}

fn default_rank() -> u64 {
    8
}

fn default_alpha() -> f64 {
    8.0
}

impl LoraConfig {
    /// Reads and checks `path` (an `adapter_config.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::sidecar::read_side_text(path)?;
        let bad = |detail: String| Error::bad_file(path, detail);
        let raw: Raw = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a valid adapter config: {e}")))?;
        match raw.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => {
                return Err(bad(format!(
                    "peft_type {other} is not supported (only LORA adapters are task vectors here)"
                )))
            }
            None => return Err(bad("has no peft_type (is it a PEFT adapter?)".into())),
        }
        if raw.use_dora {
            return Err(bad(
                "use_dora: DoRA adapters are not supported (their update is not s·B·A)".into(),
            ));
        }
        if raw.lora_bias {
            return Err(bad(
                "lora_bias: adapters with LoRA biases are not supported".into(),
            ));
        }
        if raw
            .trainable_token_indices
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(bad(
                "trainable_token_indices: adapters with trainable tokens are not supported".into(),
            ));
        }
        if raw.r == 0 {
            return Err(bad("r is 0".into()));
        }
        if !raw.lora_alpha.is_finite() {
            return Err(bad("lora_alpha is not a finite number".into()));
        }
        let rank_pattern = patterns(path, "rank_pattern", raw.rank_pattern, |v| {
            v.as_u64().filter(|&r| r > 0)
        })?;
        let alpha_pattern = patterns(path, "alpha_pattern", raw.alpha_pattern, |v| {
            v.as_f64().filter(|a| a.is_finite())
        })?;
        let layers_to_transform = match raw.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("layers_to_transform is not a layer index".into()))?]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_u64())
                    .collect::<Option<Vec<u64>>>()
                    .ok_or_else(|| bad("layers_to_transform holds a non-index".into()))?,
            ),
            Some(_) => return Err(bad("layers_to_transform is not a list of layers".into())),
        };
        let names: Vec<String> = match raw.layers_pattern {
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let layer_index = if names.is_empty() {
            vec![Regex::new(r"^.*\.[^.]*\.(?P<layer>\d+)\.").expect("valid")]
        } else {
            names
                .iter()
                .map(|p| {
                    // The pattern is grouped, so an alternation in it or
                    // a group of its own cannot take the layer's place.
                    Regex::new(&format!(r"^.*\.(?:{p})\.(?P<layer>\d+)\."))
                        .map_err(|e| bad(format!("layers_pattern '{p}' is not a regex: {e}")))
                })
                .collect::<Result<_>>()?
        };
        Ok(Self {
            rank: raw.r,
            alpha: raw.lora_alpha,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            target_modules: raw.target_modules,
            modules_to_save: raw.modules_to_save.unwrap_or_default(),
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layer_index,
        })
    }

    /// The rank PEFT gives `module` (a module name of the base model).
    pub fn rank_of(&self, module: &str) -> u64 {
        first_match(&self.rank_pattern, module).unwrap_or(self.rank)
    }

    /// The alpha PEFT gives `module`.
    pub fn alpha_of(&self, module: &str) -> f64 {
        first_match(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }

    /// The scale s of ΔW = s·B·A for `module`.
    pub fn scale_of(&self, module: &str) -> f64 {
        let r = self.rank_of(module) as f64;
        let alpha = self.alpha_of(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Whether `module` lies in a layer `layers_to_transform` keeps (always,
    /// without that setting).
    pub fn transforms(&self, module: &str) -> bool {
        let Some(layers) = &self.layers_to_transform else {
            return true;
        };
        // PEFT matches the layer index against the module name with a
        // trailing dot, so the last component can be a layer number too.
        let key = format!("{module}.");
        self.layer_index
            .iter()
            .find_map(|re| re.captures(&key))
            .and_then(|c| c.name("layer")?.as_str().parse::<u64>().ok())
            .is_some_and(|i| layers.contains(&i))
    }
}

fn first_match<T: Copy>(patterns: &[(Regex, String, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(re, _, _)| re.is_match(module))
        .map(|&(_, _, v)| v)
}

/// Compiles a `rank_pattern` / `alpha_pattern` map in file order.
fn patterns<T>(
    path: &Path,
    what: &str,
    map: Option<Map<String, Value>>,
    value: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(Regex, String, T)>> {
    map.unwrap_or_default()
        .into_iter()
        .map(|(key, v)| {
            let v = value(&v).ok_or_else(|| {
                Error::bad_file(path, format!("{what} '{key}' has an unusable value {v}"))
            })?;
            let re = Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| {
                Error::bad_file(path, format!("{what} key '{key}' is not a regex: {e}"))
            })?;
            Ok((re, key, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<LoraConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, json).unwrap();
        LoraConfig::read(&path)
    }

    #[test]
    fn patterns_match_as_peft_does() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,
                "rank_pattern":{"layers.1.self_attn.q_proj":4,"v_proj":2},
                "alpha_pattern":{"q_proj":3}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_of("model.layers.1.self_attn.q_proj"), 4);
        assert_eq!(c.rank_of("model.layers.11.self_attn.q_proj"), 8);
        assert_eq!(c.rank_of("model.layers.0.self_attn.v_proj"), 2);
        assert_eq!(c.rank_of("model.layers.0.self_attn.xv_proj"), 8);
        assert_eq!(c.alpha_of("model.layers.1.self_attn.q_proj"), 3.0);
        assert_eq!(c.scale_of("model.layers.1.self_attn.q_proj"), 3.0 / 4.0);
        assert_eq!(c.scale_of("model.layers.0.mlp.up_proj"), 2.0);
    }

    #[test]
    fn rslora_and_layers() {
        let c = config(
            r#"{"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true,
                "layers_to_transform":[0,2]}"#,
        )
        .unwrap();
        assert_eq!(c.scale_of("x"), 2.0);
        assert!(c.transforms("model.layers.2.mlp.up_proj"));
        assert!(!c.transforms("model.layers.1.mlp.up_proj"));
        assert!(!c.transforms("model.embed_tokens"));
    }

    /// A `layers_pattern` with an alternation or a group of its own still
    /// finds the layer index (it used to panic, or read the wrong group).
    #[test]
    fn layer_patterns_with_alternations_and_groups() {
        for pattern in [
            r#""layers|h""#,
            r#""(x)?layers""#,
            r#"["blocks", "layers"]"#,
        ] {
            let c = config(&format!(
                r#"{{"peft_type":"LORA","r":4,"lora_alpha":8,
                    "layers_to_transform":[2],"layers_pattern":{pattern}}}"#
            ))
            .unwrap();
            assert!(c.transforms("model.layers.2.mlp.up_proj"), "{pattern}");
            assert!(!c.transforms("model.layers.1.mlp.up_proj"), "{pattern}");
        }
    }

    #[test]
    fn other_types_are_refused_by_name() {
        let e = config(r#"{"peft_type":"LOHA"}"#).unwrap_err().to_string();
        assert!(e.contains("LOHA"), "{e}");
        let e = config(r#"{"peft_type":"LORA","use_dora":true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("DoRA"), "{e}");
    }
}
