//! mergekit YAML merge configs: reading, checking and writing them.
//!
//! This module owns [`MergeConfig`], the typed form of a mergekit config
//! (`merge_method`, `base_model`, `models` with per-model `parameters`,
//! global `parameters`, `dtype`, `out_dtype`, `tokenizer_source`) plus
//! ta-merge's own keys, which a written config carries so that it reproduces
//! a run exactly: `seed`, `density_scope`, and `rescale` as a word
//! (`inverse`, `l1`, `none`) besides mergekit's boolean. It reads a config
//! file safely (a regular UTF-8 file of at most 1 MiB), refuses anything it
//! cannot honour with a one-line message naming the file, the key and, where
//! the YAML parser knows it, the line; and it writes a config back that
//! mergekit reads with the same meaning (same keys, same structure), as long
//! as it uses no ta-merge extension: mergekit ignores `seed`, refuses a word
//! for `rescale` or `density_scope`, and has no `magnitude_prune` or `magmax`
//! method. What a parameter gives each tensor is [`crate::params`].
//!
//! YAML crate: `serde_norway`. `serde_yaml` is archived; `serde_norway` is its
//! maintained fork with the same API and error positions (path and line), it
//! builds on `unsafe-libyaml-norway`, a maintained fork of the libyaml port
//! (`serde_yaml_ng` still uses the archived `unsafe-libyaml`), and it is
//! licensed MIT OR Apache-2.0 like serde_yaml. Reading goes through it;
//! writing is done here by hand, because mergekit reads configs with PyYAML
//! (YAML 1.1), which takes `1e-7` for a string and `yes` or `on` for a
//! boolean: numbers are written with a `.` and a signed exponent, and any
//! text that is not plainly a word or path is double-quoted.

use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::methods::{DensityScope, MethodKind, Rescale};
use crate::params::{one_line, LayerPos, ParamSeed, ParamValue, ValueKind};
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::Read;
use std::path::Path;

/// The largest config file read, in bytes (1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The words `rescale` takes besides true and false (ta-merge extension).
const RESCALE_WORDS: &[&str] = &["inverse", "l1", "none"];
/// The words `density_scope` takes (ta-merge extension).
const DENSITY_SCOPE_WORDS: &[&str] = &["tensor", "model"];

/// A parameter name a config may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParamKey {
    Weight,
    Density,
    Gamma,
    Epsilon,
    T,
    Lambda,
    Normalize,
    Rescale,
    FilterWise,
    Int8Mask,
    Seed,
    DensityScope,
}

impl ParamKey {
    /// Every key, in the order a config is written.
    pub const ALL: [ParamKey; 12] = [
        Self::Weight,
        Self::Density,
        Self::Gamma,
        Self::Epsilon,
        Self::T,
        Self::Lambda,
        Self::Normalize,
        Self::Rescale,
        Self::FilterWise,
        Self::Int8Mask,
        Self::Seed,
        Self::DensityScope,
    ];

    /// The name in a config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Weight => "weight",
            Self::Density => "density",
            Self::Gamma => "gamma",
            Self::Epsilon => "epsilon",
            Self::T => "t",
            Self::Lambda => "lambda",
            Self::Normalize => "normalize",
            Self::Rescale => "rescale",
            Self::FilterWise => "filter_wise",
            Self::Int8Mask => "int8_mask",
            Self::Seed => "seed",
            Self::DensityScope => "density_scope",
        }
    }

    /// The key named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether a model's own `parameters` may set it (mergekit's tensor
    /// parameters). Every key may be set globally; a per-model key set
    /// globally is the fallback for models that do not set it.
    pub fn per_model(self) -> bool {
        matches!(
            self,
            Self::Weight | Self::Density | Self::Gamma | Self::Epsilon
        )
    }

    /// Whether method `kind` uses this parameter (`int8_mask`, accepted
    /// and ignored, counts as used everywhere).
    pub fn applies_to(self, kind: MethodKind) -> bool {
        use crate::methods::Sparsification as S;
        let thinning = kind.sparsification();
        match self {
            Self::Weight | Self::Normalize => kind.uses_weights(),
            Self::Density | Self::Rescale => thinning.is_some(),
            Self::Gamma => thinning == Some(S::MagnitudeOutliers),
            Self::Epsilon => thinning == Some(S::DellaMagprune),
            Self::Seed => matches!(thinning, Some(S::Random | S::DellaMagprune)),
            Self::DensityScope => kind.selects_by_magnitude(),
            Self::T => kind == MethodKind::Slerp,
            Self::Lambda => !matches!(
                kind,
                MethodKind::Linear | MethodKind::ModelStock | MethodKind::Slerp
            ),
            Self::FilterWise => kind == MethodKind::ModelStock,
            Self::Int8Mask => true,
        }
    }

    /// The methods that use this parameter, for messages.
    pub fn methods(self) -> String {
        let names: Vec<&str> = MethodKind::ALL
            .into_iter()
            .filter(|&m| self.applies_to(m))
            .map(MethodKind::name)
            .collect();
        names.join(", ")
    }

    /// What values it takes.
    pub fn kind(self) -> ValueKind {
        match self {
            Self::Density | Self::Gamma | Self::Epsilon => ValueKind::Fraction,
            Self::Weight | Self::T | Self::Lambda => ValueKind::Number,
            Self::Normalize | Self::FilterWise | Self::Int8Mask => ValueKind::Bool,
            Self::Rescale => ValueKind::BoolOrWord(RESCALE_WORDS),
            Self::Seed => ValueKind::Integer,
            Self::DensityScope => ValueKind::Word(DENSITY_SCOPE_WORDS),
        }
    }
}

/// A `parameters` mapping: checked values, kept in [`ParamKey`] order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params(BTreeMap<ParamKey, ParamValue>);

impl Params {
    /// The value of `key`, if set.
    pub fn get(&self, key: ParamKey) -> Option<&ParamValue> {
        self.0.get(&key)
    }

    /// Sets `key` after checking that it takes `value`; returns the value it
    /// replaces.
    pub fn insert(&mut self, key: ParamKey, value: ParamValue) -> Result<Option<ParamValue>> {
        value.check(key.name(), key.kind())?;
        Ok(self.0.insert(key, value))
    }

    /// The keys set and their values, in [`ParamKey`] order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamKey, &ParamValue)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One entry of `models`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A local path or hub id, as written.
    pub model: String,
    /// This model's own parameters (only [`ParamKey::per_model`] keys).
    #[serde(default, deserialize_with = "model_params")]
    pub parameters: Params,
}

/// `tokenizer_source`: only `base` is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerSource {
    Base,
}

/// A parsed and checked merge config.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    merge_method: MethodKind,
    base_model: Option<String>,
    models: Vec<ModelSpec>,
    parameters: Params,
    /// mergekit's working type: the output type when `out_dtype` is absent.
    dtype: Option<FloatType>,
    out_dtype: Option<FloatType>,
    tokenizer_source: Option<TokenizerSource>,
}

impl MergeConfig {
    /// A config of `method` over `models`, checked as a parsed one is.
    pub fn new(
        method: MethodKind,
        base_model: Option<String>,
        models: Vec<ModelSpec>,
        parameters: Params,
    ) -> Result<Self> {
        let config = MergeConfig {
            merge_method: method,
            base_model,
            models,
            parameters,
            dtype: None,
            out_dtype: None,
            tokenizer_source: None,
        };
        config.check().map_err(Error::InvalidArgument)?;
        Ok(config)
    }

    /// This config with method `method` (a command-line override).
    pub fn with_method(mut self, method: MethodKind) -> Result<Self> {
        self.merge_method = method;
        self.check().map_err(Error::InvalidArgument)?;
        Ok(self)
    }

    /// Sets global parameter `key` (a command-line override).
    pub fn set_param(&mut self, key: ParamKey, value: ParamValue) -> Result<()> {
        self.parameters.insert(key, value).map(|_| ())
    }

    /// Sets model `i`'s parameter `key` (a command-line override).
    pub fn set_model_param(&mut self, i: usize, key: ParamKey, value: ParamValue) -> Result<()> {
        let model = self.models.get_mut(i).ok_or_else(|| {
            Error::InvalidArgument(format!("no model {i} in the config's `models`"))
        })?;
        model.parameters.insert(key, value).map(|_| ())
    }

    /// Replaces the base model and the models' paths (command-line
    /// overrides); the models' parameters stay, by position.
    pub fn set_paths(&mut self, base: Option<String>, models: Option<Vec<String>>) -> Result<()> {
        if let Some(base) = base {
            self.base_model = Some(base);
        }
        if let Some(models) = models {
            if models.len() != self.models.len()
                && self.models.iter().any(|m| !m.parameters.is_empty())
            {
                return Err(Error::InvalidArgument(format!(
                    "--other-model-paths gives {} models but the config's `models` lists {} with \
                     parameters",
                    models.len(),
                    self.models.len()
                )));
            }
            let old = std::mem::take(&mut self.models);
            self.models = models
                .into_iter()
                .enumerate()
                .map(|(i, model)| ModelSpec {
                    model,
                    parameters: old.get(i).map(|m| m.parameters.clone()).unwrap_or_default(),
                })
                .collect();
        }
        self.check().map_err(Error::InvalidArgument)
    }

    /// Drops the entries of `models` that name the base model (SLERP
    /// configs list the base among the models).
    pub fn without_base_in_models(mut self) -> Self {
        if let Some(base) = &self.base_model {
            if self.models.len() > 1 {
                self.models.retain(|m| &m.model != base);
            }
        }
        self
    }

    /// This config with output type `out_dtype`.
    pub fn with_out_dtype(mut self, out_dtype: Option<FloatType>) -> Self {
        self.out_dtype = out_dtype;
        self
    }

    /// Removes the parameters the method does not use (mergekit ignores
    /// them), so that a written config holds only what the merge used;
    /// returns where each was (`parameters.t`, `models[0].parameters.gamma`).
    pub fn drop_unused(&mut self) -> Vec<String> {
        let kind = self.merge_method;
        let mut dropped = Vec::new();
        let mut retain = |params: &mut Params, place: &str| {
            params.0.retain(|key, _| {
                let used = key.applies_to(kind);
                if !used {
                    dropped.push(format!("{place}.{}", key.name()));
                }
                used
            });
        };
        retain(&mut self.parameters, "parameters");
        for (i, model) in self.models.iter_mut().enumerate() {
            retain(&mut model.parameters, &format!("models[{i}].parameters"));
        }
        dropped
    }

    /// Reads the config file at `path`: a regular UTF-8 file of at most
    /// [`MAX_CONFIG_BYTES`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_config_text(path)?;
        Self::from_yaml_str(&text, &path.display().to_string())
    }

    /// Parses config text; `source` names it in errors (a path, `<stdin>`).
    pub fn from_yaml_str(text: &str, source: &str) -> Result<Self> {
        let fail = |detail: String| Error::bad_file(Path::new(source), detail);
        if text.trim().is_empty() {
            return Err(fail(
                "is empty; expected `merge_method` and `models`".into(),
            ));
        }
        serde_norway::from_str(text).map_err(|e| fail(one_line(&e.to_string())))
    }

    /// The method.
    pub fn method(&self) -> MethodKind {
        self.merge_method
    }

    /// The base model, as written.
    pub fn base_model(&self) -> Option<&str> {
        self.base_model.as_deref()
    }

    /// The models, in the config's order.
    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    /// The global `parameters`.
    pub fn parameters(&self) -> &Params {
        &self.parameters
    }

    /// Model `i`'s own value of `key` (not the global fallback).
    pub fn model_param(&self, i: usize, key: ParamKey) -> Option<&ParamValue> {
        self.models.get(i)?.parameters.get(key)
    }

    /// The global value of `key`.
    pub fn global_param(&self, key: ParamKey) -> Option<&ParamValue> {
        self.parameters.get(key)
    }

    /// The number `key` gives model `i`'s tensor `tensor` at `pos`, looked
    /// up as mergekit does: the model's own value, then (when unset or when
    /// none of its filters matches) the global one; `None` when neither
    /// applies and the caller's default holds.
    pub fn model_number(
        &self,
        i: usize,
        key: ParamKey,
        tensor: &str,
        pos: Option<LayerPos>,
    ) -> Result<Option<f64>> {
        if let Some(value) = self.model_param(i, key) {
            if let Some(x) = value.number_for(tensor, pos)? {
                return Ok(Some(x));
            }
        }
        self.global_number(key, tensor, pos)
    }

    /// The number global `key` gives tensor `tensor` at `pos`.
    pub fn global_number(
        &self,
        key: ParamKey,
        tensor: &str,
        pos: Option<LayerPos>,
    ) -> Result<Option<f64>> {
        match self.global_param(key) {
            Some(value) => value.number_for(tensor, pos),
            None => Ok(None),
        }
    }

    /// The flag global `key` gives tensor `tensor`.
    pub fn global_bool(&self, key: ParamKey, tensor: &str) -> Result<Option<bool>> {
        match self.global_param(key) {
            Some(value) => value.bool_for(tensor),
            None => Ok(None),
        }
    }

    /// `seed`, if set.
    pub fn seed(&self) -> Option<u64> {
        match self.global_param(ParamKey::Seed)? {
            ParamValue::Number(x) => Some(*x as u64),
            _ => None,
        }
    }

    /// `rescale`, if set.
    pub fn rescale(&self) -> Option<Rescale> {
        match self.global_param(ParamKey::Rescale)? {
            ParamValue::Bool(true) => Some(Rescale::L1),
            ParamValue::Bool(false) => Some(Rescale::None),
            ParamValue::Text(word) => match word.as_str() {
                "inverse" => Some(Rescale::Inverse),
                "l1" => Some(Rescale::L1),
                "none" => Some(Rescale::None),
                _ => None,
            },
            _ => None,
        }
    }

    /// `density_scope`, if set.
    pub fn density_scope(&self) -> Option<DensityScope> {
        match self.global_param(ParamKey::DensityScope)? {
            ParamValue::Text(word) if word == "model" => Some(DensityScope::Model),
            ParamValue::Text(word) if word == "tensor" => Some(DensityScope::Tensor),
            _ => None,
        }
    }

    /// The output type, if set: `out_dtype`, else `dtype` (mergekit writes
    /// its working type when no `out_dtype` is given).
    pub fn out_dtype(&self) -> Option<FloatType> {
        self.out_dtype.or(self.dtype)
    }

    /// `tokenizer_source`, if set.
    pub fn tokenizer_source(&self) -> Option<TokenizerSource> {
        self.tokenizer_source
    }

    /// What the caller should say once about keys that do less here than
    /// in mergekit: `dtype` (arithmetic is always f64; it only names the
    /// output type when `out_dtype` is absent) and `parameters.int8_mask`
    /// (ignored).
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        match (self.dtype, self.out_dtype) {
            (Some(_), Some(_)) => notes.push(
                "config key `dtype` has no effect here (arithmetic is always f64; `out_dtype` \
                 or --dtype names the output type)"
                    .to_string(),
            ),
            (Some(dtype), None) => notes.push(format!(
                "config key `dtype`: arithmetic is always f64 here; the output is written as \
                 {} (mergekit's rule when `out_dtype` is absent)",
                dtype.torch_name()
            )),
            _ => {}
        }
        if self.parameters.get(ParamKey::Int8Mask).is_some() {
            notes.push("config key `parameters.int8_mask` has no effect here".to_string());
        }
        notes
    }

    /// The checks that span keys, as one message.
    fn check(&self) -> Result<(), String> {
        if self.models.is_empty() {
            return Err("`models` is empty; list the models to merge".into());
        }
        if let Some(i) = self.models.iter().position(|m| m.model.trim().is_empty()) {
            return Err(format!("models[{i}].model is empty"));
        }
        match self.base_model.as_deref() {
            Some(base) if base.trim().is_empty() => Err("`base_model` is empty".into()),
            None if self.merge_method.needs_base() => Err(format!(
                "merge_method `{}` needs a `base_model`",
                self.merge_method
            )),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------- reading

fn read_config_text(path: &Path) -> Result<String> {
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
    check_regular(path, &meta)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io("cannot read", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot read", path, e))?;
    check_regular(path, &meta)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("cannot read", path, e))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::bad_file(
            path,
            "is larger than 1 MiB; a merge config is a small YAML file",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Error::bad_file(path, format!("is not UTF-8 text (bad byte at offset {at})"))
    })
}

fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    let what = file_kind(&meta.file_type());
    Err(Error::bad_file(
        path,
        format!("is {what}, not a regular file; give the path of a YAML merge config"),
    ))
}

fn file_kind(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return "a device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a folder"
    } else {
        "not a file"
    }
}

/// The top-level keys.
#[derive(Clone, Copy)]
enum TopKey {
    MergeMethod,
    BaseModel,
    Models,
    Parameters,
    Dtype,
    OutDtype,
    TokenizerSource,
}

const TOP_KEYS: &str =
    "merge_method, base_model, models, parameters, dtype, out_dtype, tokenizer_source";

impl TopKey {
    fn parse(key: &str) -> Result<Self, String> {
        Ok(match key {
            "merge_method" => Self::MergeMethod,
            "base_model" => Self::BaseModel,
            "models" => Self::Models,
            "parameters" => Self::Parameters,
            "dtype" => Self::Dtype,
            "out_dtype" => Self::OutDtype,
            "tokenizer_source" => Self::TokenizerSource,
            "slices" | "modules" => {
                return Err(format!(
                "`{key}` is not supported: ta-merge merges whole models; list them under `models`"
            ))
            }
            "tokenizer" | "chat_template" => {
                return Err(format!(
                    "`{key}` is not supported; only `tokenizer_source: base`"
                ))
            }
            _ => return Err(format!("unknown key `{key}`; expected one of {TOP_KEYS}")),
        })
    }
}

/// Implements `Deserialize` for a type read from one YAML string through
/// `parse`, so that a bad value is reported at its line.
macro_rules! from_word {
    ($ty:ty, $expecting:expr, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct WordVisitor;
                impl<'de> Visitor<'de> for WordVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, word: &str) -> Result<$ty, E> {
                        let parse: fn(&str) -> Result<$ty, String> = $parse;
                        parse(word).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(WordVisitor)
            }
        }
    };
}

from_word!(MethodKind, "a merge method name", |word| {
    MethodKind::parse(word).ok_or_else(|| {
        let names: Vec<&str> = MethodKind::ALL.iter().map(|m| m.name()).collect();
        format!(
            "unknown merge_method `{word}`; expected one of {}",
            names.join(", ")
        )
    })
});

from_word!(TokenizerSource, "`base`", |word| match word {
    "base" => Ok(TokenizerSource::Base),
    _ => Err(format!(
        "tokenizer_source `{word}` is not supported; only `base` (or leaving it out)"
    )),
});

/// A float type as mergekit names it (`torch.` prefix allowed); `key` names
/// the config key in the error.
fn float_type(key: &str, word: &str) -> Result<FloatType, String> {
    let name = word.strip_prefix("torch.").unwrap_or(word);
    FloatType::parse(name).ok_or_else(|| {
        format!("unknown {key} `{word}`; expected bfloat16, float16, float32 or float64")
    })
}

/// `out_dtype`.
struct OutDtype(FloatType);

from_word!(OutDtype, "a float type name", |word| float_type(
    "out_dtype",
    word
)
.map(OutDtype));

/// `dtype`.
struct Dtype(FloatType);

from_word!(Dtype, "a float type name", |word| float_type("dtype", word)
    .map(Dtype));

/// Which `parameters` mapping is being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Global,
    Model,
}

impl Scope {
    fn key(self, name: &str) -> Result<ParamKey, String> {
        let allowed = |k: &ParamKey| self == Scope::Global || k.per_model();
        match ParamKey::parse(name) {
            Some(key) if allowed(&key) => Ok(key),
            Some(_) => Err(format!(
                "`{name}` is a global parameter: put it under the top-level `parameters`, not a model's"
            )),
            None => {
                let names: Vec<&str> =
                    ParamKey::ALL.iter().filter(|k| allowed(k)).map(|k| k.name()).collect();
                Err(format!(
                    "unknown parameter `{name}`; expected one of {}",
                    names.join(", ")
                ))
            }
        }
    }
}

/// Reads a mapping key with `parse`, refusing one for which `seen` holds,
/// so that both errors point at the key's line.
struct KeySeed<'a, K> {
    parse: &'a dyn Fn(&str) -> Result<K, String>,
    seen: &'a dyn Fn(K) -> bool,
}

impl<'de, K: Copy> DeserializeSeed<'de> for KeySeed<'_, K> {
    type Value = K;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<K, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, K: Copy> Visitor<'de> for KeySeed<'_, K> {
    type Value = K;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<K, E> {
        let key = (self.parse)(name).map_err(E::custom)?;
        if (self.seen)(key) {
            return Err(E::custom(format!("`{name}` is set twice")));
        }
        Ok(key)
    }
}

/// Reads a `parameters` mapping in `0`'s scope (null reads as empty).
struct ParamsSeed(Scope);

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Params;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Params, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed {
    type Value = Params;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping of parameter names to values")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Params, E> {
        Ok(Params::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
        let mut params = Params::default();
        loop {
            let Some(key) = map.next_key_seed(KeySeed {
                parse: &|name| self.0.key(name),
                seen: &|key| params.0.contains_key(&key),
            })?
            else {
                break;
            };
            let seed = ParamSeed {
                name: key.name(),
                kind: key.kind(),
            };
            params.0.insert(key, map.next_value_seed(seed)?);
        }
        Ok(params)
    }
}

fn model_params<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Params, D::Error> {
    ParamsSeed(Scope::Model).deserialize(deserializer)
}

/// The top-level keys as read, before the checks that span keys.
#[derive(Default)]
struct RawConfig {
    merge_method: Option<MethodKind>,
    base_model: Option<Option<String>>,
    models: Option<Vec<ModelSpec>>,
    parameters: Option<Params>,
    dtype: Option<Option<Dtype>>,
    out_dtype: Option<Option<OutDtype>>,
    tokenizer_source: Option<Option<TokenizerSource>>,
}

impl RawConfig {
    /// Whether `key` was read already.
    fn has(&self, key: TopKey) -> bool {
        match key {
            TopKey::MergeMethod => self.merge_method.is_some(),
            TopKey::BaseModel => self.base_model.is_some(),
            TopKey::Models => self.models.is_some(),
            TopKey::Parameters => self.parameters.is_some(),
            TopKey::Dtype => self.dtype.is_some(),
            TopKey::OutDtype => self.out_dtype.is_some(),
            TopKey::TokenizerSource => self.tokenizer_source.is_some(),
        }
    }

    /// Reads the value of `key`.
    fn read<'de, A: MapAccess<'de>>(&mut self, key: TopKey, map: &mut A) -> Result<(), A::Error> {
        match key {
            TopKey::MergeMethod => self.merge_method = Some(map.next_value()?),
            TopKey::BaseModel => self.base_model = Some(map.next_value()?),
            TopKey::Models => self.models = Some(map.next_value()?),
            TopKey::Parameters => {
                self.parameters = Some(map.next_value_seed(ParamsSeed(Scope::Global))?)
            }
            TopKey::Dtype => self.dtype = Some(map.next_value()?),
            TopKey::OutDtype => self.out_dtype = Some(map.next_value()?),
            TopKey::TokenizerSource => self.tokenizer_source = Some(map.next_value()?),
        }
        Ok(())
    }

    fn finish(self) -> Result<MergeConfig, String> {
        let config = MergeConfig {
            merge_method: self.merge_method.ok_or("missing key `merge_method`")?,
            base_model: self.base_model.flatten(),
            models: self.models.ok_or("missing key `models`")?,
            parameters: self.parameters.unwrap_or_default(),
            dtype: self.dtype.flatten().map(|d| d.0),
            out_dtype: self.out_dtype.flatten().map(|d| d.0),
            tokenizer_source: self.tokenizer_source.flatten(),
        };
        config.check()?;
        Ok(config)
    }
}

impl<'de> Deserialize<'de> for MergeConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ConfigVisitor)
    }
}

struct ConfigVisitor;

impl<'de> Visitor<'de> for ConfigVisitor {
    type Value = MergeConfig;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping with `merge_method` and `models`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MergeConfig, A::Error> {
        let mut raw = RawConfig::default();
        loop {
            let Some(key) = map.next_key_seed(KeySeed {
                parse: &TopKey::parse,
                seen: &|key| raw.has(key),
            })?
            else {
                break;
            };
            raw.read(key, &mut map)?;
        }
        raw.finish().map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------- writing

impl MergeConfig {
    /// The config as YAML that mergekit (PyYAML) and this module read back
    /// to the same values: fixed key order, shortest round-trip numbers.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        line(&mut out, "", "merge_method", self.merge_method.name());
        if let Some(base) = &self.base_model {
            line(&mut out, "", "base_model", &yaml_text(base));
        }
        write_models(&mut out, &self.models);
        if !self.parameters.is_empty() {
            out.push_str("parameters:\n");
            write_params(&mut out, "  ", &self.parameters);
        }
        if let Some(dtype) = self.dtype {
            line(&mut out, "", "dtype", dtype.torch_name());
        }
        if let Some(dtype) = self.out_dtype {
            line(&mut out, "", "out_dtype", dtype.torch_name());
        }
        if let Some(TokenizerSource::Base) = self.tokenizer_source {
            line(&mut out, "", "tokenizer_source", "base");
        }
        out
    }
}

fn line(out: &mut String, indent: &str, key: &str, value: &str) {
    let _ = writeln!(out, "{indent}{key}: {value}");
}

fn write_models(out: &mut String, models: &[ModelSpec]) {
    if models.is_empty() {
        out.push_str("models: []\n");
        return;
    }
    out.push_str("models:\n");
    for spec in models {
        line(out, "  - ", "model", &yaml_text(&spec.model));
        if !spec.parameters.is_empty() {
            out.push_str("    parameters:\n");
            write_params(out, "      ", &spec.parameters);
        }
    }
}

fn write_params(out: &mut String, indent: &str, params: &Params) {
    for (key, value) in params.iter() {
        match value {
            ParamValue::Filtered(entries) => {
                let _ = writeln!(out, "{indent}{}:", key.name());
                for entry in entries {
                    let value = flow_value(key, &entry.value);
                    match &entry.filter {
                        Some(filter) => {
                            line(out, &format!("{indent}  - "), "filter", &yaml_text(filter));
                            line(out, &format!("{indent}    "), "value", &value);
                        }
                        None => line(out, &format!("{indent}  - "), "value", &value),
                    }
                }
            }
            value => line(out, indent, key.name(), &flow_value(key, value)),
        }
    }
}

/// A value on one line (anchor lists in flow style, as mergekit writes them).
fn flow_value(key: ParamKey, value: &ParamValue) -> String {
    match value {
        ParamValue::Number(x) if key.kind() == ValueKind::Integer => format!("{}", *x as u64),
        ParamValue::Number(x) => yaml_float(*x),
        ParamValue::Bool(b) => b.to_string(),
        ParamValue::Text(s) => yaml_text(s),
        ParamValue::Anchors(xs) => {
            let items: Vec<String> = xs.iter().map(|x| yaml_float(*x)).collect();
            format!("[{}]", items.join(", "))
        }
        ParamValue::Filtered(entries) => {
            let items: Vec<String> = entries.iter().map(|e| flow_entry(key, e)).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

fn flow_entry(key: ParamKey, entry: &crate::params::FilterEntry) -> String {
    let value = flow_value(key, &entry.value);
    match &entry.filter {
        Some(filter) => format!("{{filter: {}, value: {value}}}", yaml_text(filter)),
        None => format!("{{value: {value}}}"),
    }
}

/// `x` in the shortest form that reads back to the same f64, with a `.` in
/// the mantissa and a signed exponent so that YAML 1.1 (PyYAML) reads it as a
/// float too: `0.1`, `1.0`, `1.0e-7`, `1.0e+300`.
fn yaml_float(x: f64) -> String {
    let shortest = format!("{x:?}");
    match shortest.split_once('e') {
        None => shortest,
        Some((mantissa, exponent)) => {
            let dot = if mantissa.contains('.') { "" } else { ".0" };
            let sign = if exponent.starts_with('-') { "" } else { "+" };
            format!("{mantissa}{dot}e{sign}{exponent}")
        }
    }
}

/// Words that YAML 1.1 reads as booleans or null.
const YAML11_WORDS: [&str; 9] = ["y", "yes", "n", "no", "true", "false", "on", "off", "null"];

/// `s` as a YAML scalar that every YAML version reads as this text: plain
/// when it is a simple word or path, double-quoted otherwise.
fn yaml_text(s: &str) -> String {
    let simple_start = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '/');
    let simple_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c));
    let keyword = YAML11_WORDS.iter().any(|w| w.eq_ignore_ascii_case(s));
    if simple_start && simple_chars && !keyword {
        s.to_string()
    } else {
        double_quoted(s)
    }
}

/// A double-quoted YAML scalar; everything outside printable ASCII escaped.
fn double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08X}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIES: &str = "\
merge_method: ties
base_model: meta-llama/Llama-3.1-8B
models:
  - model: meta-llama/Llama-3.1-8B
  - model: org/math
    parameters: {weight: 0.5, density: [0.2, 0.8], gamma: 0.01, epsilon: 0.1}
  - model: ./local/code
    parameters:
      weight:
        - filter: mlp
          value: [0.1, 0.9]
        - value: 0.3
parameters: {normalize: true, rescale: true, lambda: 1.0, t: 0.5, filter_wise: false, int8_mask: true}
dtype: float16
out_dtype: bfloat16
tokenizer_source: base
";

    const SLERP: &str = "\
merge_method: slerp
base_model: a/base
models:
  - model: a/base
  - model: b/other
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
";

    const EXTENSIONS: &str = "\
merge_method: dare_ties
base_model: \"./models/base: v2\"
models:
  - model: \"yes\"
    parameters:
      weight: 1e-7
      density: [0.30000000000000004, 5e-324, -0.0, 1.0]
  - model: \"caf\u{e9}/\u{1F600}\"
    parameters: {weight: 1e300, density: 0.5}
parameters:
  seed: 9007199254740991
  density_scope: model
  rescale: inverse
  lambda: [{filter: '*', value: 1.5}]
  normalize: [{filter: lm_head, value: false}, {value: true}]
";

    const LINEAR: &str = "merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 2}\n  - model: y\n    parameters: {weight: 1}\n";

    fn parse(text: &str) -> MergeConfig {
        MergeConfig::from_yaml_str(text, "test.yaml").unwrap()
    }

    fn error(text: &str) -> String {
        let message = MergeConfig::from_yaml_str(text, "test.yaml")
            .unwrap_err()
            .to_string();
        assert!(!message.contains('\n'), "not one line: {message}");
        assert!(
            message.starts_with("test.yaml: "),
            "no file name: {message}"
        );
        message
    }

    fn assert_mentions(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    #[test]
    fn reads_the_mergekit_schema() {
        let c = parse(TIES);
        assert_eq!(c.method(), MethodKind::Ties);
        assert_eq!(c.base_model(), Some("meta-llama/Llama-3.1-8B"));
        let names: Vec<&str> = c.models().iter().map(|m| m.model.as_str()).collect();
        assert_eq!(
            names,
            ["meta-llama/Llama-3.1-8B", "org/math", "./local/code"]
        );
        assert_eq!(c.model_param(0, ParamKey::Weight), None);
        assert_eq!(
            c.model_param(1, ParamKey::Weight),
            Some(&ParamValue::Number(0.5))
        );
        assert_eq!(
            c.model_param(1, ParamKey::Density),
            Some(&ParamValue::Anchors(vec![0.2, 0.8]))
        );
        assert_eq!(c.model_param(9, ParamKey::Weight), None);
        assert_eq!(
            c.global_param(ParamKey::Lambda),
            Some(&ParamValue::Number(1.0))
        );
        assert_eq!(c.global_bool(ParamKey::Normalize, "x").unwrap(), Some(true));
        assert_eq!(c.rescale(), Some(Rescale::L1));
        assert_eq!(c.out_dtype(), Some(FloatType::BF16));
        assert_eq!(c.tokenizer_source(), Some(TokenizerSource::Base));
        let notes = c.notes();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("`dtype` has no effect"), "{notes:?}");
        assert!(notes[1].contains("`parameters.int8_mask`"), "{notes:?}");
        assert_eq!(c.seed(), None);
    }

    #[test]
    fn dtype_names_the_output_type_without_out_dtype_as_in_mergekit() {
        let c = parse("merge_method: linear\nmodels: [{model: m}]\ndtype: float32\n");
        assert_eq!(c.out_dtype(), Some(FloatType::F32));
        assert!(
            c.notes()[0].contains("written as float32"),
            "{:?}",
            c.notes()
        );
        let c = c.with_out_dtype(Some(FloatType::F16));
        assert_eq!(c.out_dtype(), Some(FloatType::F16));
        assert_mentions(
            &error("merge_method: linear\nmodels: [{model: m}]\ndtype: int8\n"),
            &["dtype", "`int8`"],
        );
    }

    #[test]
    fn parameters_a_method_does_not_use_are_dropped_and_named() {
        let mut c = parse(TIES);
        let dropped = c.drop_unused();
        // ties uses weight, density, lambda, normalize, rescale (and int8_mask
        // is accepted everywhere); not gamma, epsilon, t or filter_wise.
        assert_eq!(
            dropped,
            [
                "parameters.t",
                "parameters.filter_wise",
                "models[1].parameters.gamma",
                "models[1].parameters.epsilon"
            ]
        );
        assert!(c.model_param(1, ParamKey::Gamma).is_none());
        assert!(c.model_param(1, ParamKey::Density).is_some());
        assert!(c.global_param(ParamKey::Lambda).is_some());
        let mut c = parse(SLERP).with_method(MethodKind::ModelStock).unwrap();
        assert_eq!(c.drop_unused(), ["parameters.t"]);
    }

    #[test]
    fn each_parameter_applies_to_the_methods_that_read_it() {
        use MethodKind as M;
        let uses = |key: ParamKey| -> Vec<MethodKind> {
            M::ALL.into_iter().filter(|&m| key.applies_to(m)).collect()
        };
        assert_eq!(uses(ParamKey::T), [M::Slerp]);
        assert_eq!(uses(ParamKey::FilterWise), [M::ModelStock]);
        assert_eq!(uses(ParamKey::Gamma), [M::Breadcrumbs, M::BreadcrumbsTies]);
        assert_eq!(uses(ParamKey::Epsilon), [M::Della, M::DellaLinear]);
        assert_eq!(
            uses(ParamKey::Seed),
            [M::DareLinear, M::DareTies, M::Della, M::DellaLinear]
        );
        assert_eq!(
            uses(ParamKey::DensityScope),
            [
                M::Ties,
                M::MagnitudePrune,
                M::Breadcrumbs,
                M::BreadcrumbsTies
            ]
        );
        for m in [M::ModelStock, M::Slerp, M::Magmax] {
            assert!(!ParamKey::Weight.applies_to(m), "{m}");
        }
        for m in [M::Linear, M::ModelStock, M::Slerp] {
            assert!(!ParamKey::Lambda.applies_to(m), "{m}");
        }
        assert!(ParamKey::Lambda.applies_to(M::Magmax));
        assert!(ParamKey::Density.applies_to(M::Della));
        assert!(!ParamKey::Density.applies_to(M::TaskArithmetic));
    }

    #[test]
    fn fractions_outside_zero_to_one_are_refused_where_written() {
        for (value, shown) in [("1.5", "1.5"), ("-0.1", "-0.1"), ("[0.2, 1.01]", "1.01")] {
            for key in ["density", "gamma", "epsilon"] {
                let text = format!(
                    "merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      {key}: {value}\n"
                );
                assert_mentions(
                    &error(&text),
                    &[
                        &format!("`{key}` must lie in [0, 1], not {shown}"),
                        "line 6",
                    ],
                );
            }
        }
        let mut c = parse(LINEAR);
        let err = c
            .set_model_param(0, ParamKey::Density, ParamValue::Number(2.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must lie in [0, 1]"), "{err}");
        c.set_model_param(0, ParamKey::Weight, ParamValue::Number(2.0))
            .unwrap();
    }

    #[test]
    fn reads_the_extensions() {
        let c = parse(EXTENSIONS);
        assert_eq!(c.seed(), Some(9_007_199_254_740_991));
        assert_eq!(c.density_scope(), Some(DensityScope::Model));
        assert_eq!(c.rescale(), Some(Rescale::Inverse));
        assert_eq!(c.base_model(), Some("./models/base: v2"));
        assert_eq!(c.models()[1].model, "caf\u{e9}/\u{1F600}");
        assert_eq!(
            c.global_bool(ParamKey::Normalize, "lm_head.weight")
                .unwrap(),
            Some(false)
        );
        assert!(c.notes().is_empty());
        assert!(parse(LINEAR).base_model().is_none());
    }

    #[test]
    fn model_lookup_falls_back_to_global_like_mergekit() {
        let c = parse(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      density: [{filter: mlp, value: 0.9}]\nparameters: {density: [0.2, 0.6]}\n",
        );
        let pos = LayerPos::of("model.layers.2.self_attn.q_proj.weight", 5);
        assert_eq!(
            pos,
            Some(LayerPos {
                layer: 2,
                layers: 5
            })
        );
        let mlp = c.model_number(
            0,
            ParamKey::Density,
            "model.layers.2.mlp.up_proj.weight",
            pos,
        );
        assert_eq!(mlp.unwrap(), Some(0.9));
        // No filter of the model matches: the global gradient at t = 0.5.
        let attn = c.model_number(
            0,
            ParamKey::Density,
            "model.layers.2.self_attn.q_proj.weight",
            pos,
        );
        assert_eq!(attn.unwrap(), Some(0.5 * 0.2 + 0.5 * 0.6));
        assert_eq!(c.model_number(0, ParamKey::Gamma, "x", None).unwrap(), None);
    }

    #[test]
    fn round_trips_through_its_own_yaml() {
        for text in [TIES, SLERP, EXTENSIONS, LINEAR] {
            let first = parse(text);
            let written = first.to_yaml();
            let second = MergeConfig::from_yaml_str(&written, "written.yaml")
                .unwrap_or_else(|e| panic!("{e}\n{written}"));
            assert_eq!(second, first, "{written}");
            assert_eq!(second.to_yaml(), written);
        }
    }

    #[test]
    fn writes_yaml_that_yaml_1_1_reads_alike() {
        let written = parse(EXTENSIONS).to_yaml();
        assert_mentions(
            &written,
            &[
                "weight: 1.0e-7\n",
                "density: [0.30000000000000004, 5.0e-324, -0.0, 1.0]\n",
                "weight: 1.0e+300\n",
                "model: \"yes\"\n",
                "base_model: \"./models/base: v2\"\n",
                "model: \"caf\\u00E9/\\U0001F600\"\n",
                "seed: 9007199254740991\n",
                "    - filter: \"*\"\n      value: 1.5\n",
                "density_scope: model\n",
            ],
        );
        assert_eq!(yaml_float(0.1), "0.1");
        assert_eq!(yaml_float(1.0), "1.0");
        assert_eq!(yaml_float(1e16), "1.0e+16");
        assert_eq!(yaml_float(1.5e-10), "1.5e-10");
        for s in [
            "on", "No", "NULL", "1e3", "0x10", "1_000", "12:30", "~", "", " x", "a#b", "-x",
        ] {
            assert!(yaml_text(s).starts_with('"'), "{s} left plain");
        }
        assert_eq!(yaml_text("org/Model-7B_v0.1"), "org/Model-7B_v0.1");
    }

    #[test]
    fn writes_what_it_was_given() {
        let mut params = Params::default();
        params
            .insert(ParamKey::Weight, ParamValue::Number(0.25))
            .unwrap();
        let models = vec![ModelSpec {
            model: "m".into(),
            parameters: params,
        }];
        let c = MergeConfig::new(MethodKind::Linear, None, models, Params::default())
            .unwrap()
            .with_out_dtype(Some(FloatType::F16));
        assert_eq!(
            c.to_yaml(),
            "merge_method: linear\nmodels:\n  - model: m\n    parameters:\n      weight: 0.25\nout_dtype: float16\n"
        );
        let mut bad = Params::default();
        assert!(bad
            .insert(ParamKey::Density, ParamValue::Number(f64::INFINITY))
            .is_err());
        assert!(bad
            .insert(ParamKey::Normalize, ParamValue::Number(1.0))
            .is_err());
        assert!(MergeConfig::new(MethodKind::Ties, None, vec![], Params::default()).is_err());
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let cases: [(&str, &[&str]); 14] = [
            ("merge_method: ties\nbase_model: b\nmodels: [{model: m}]\nbogus: 1\n", &["`bogus`", "line 4"]),
            ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      weight: 1\n      wieght: 2\n", &["`wieght`", "line 7", "weight, density"]),
            ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters: {normalize: true}\n", &["`normalize`", "global", "line 5"]),
            ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    paramters: {}\n", &["paramters", "line 5"]),
            ("merge_method: ties\nparameters:\n  bogus: 1\nmodels: [{model: m}]\n", &["`bogus`", "line 3"]),
            ("merge_method: passthrough\nmodels: [{model: m}]\n", &["`passthrough`", "merge_method", "line 1", "task_arithmetic"]),
            ("merge_method: slerp\nslices:\n  - sources: []\n", &["`slices`", "line 2"]),
            ("merge_method: linear\nmodels: [{model: m}]\ntokenizer:\n  source: union\n", &["`tokenizer`"]),
            ("merge_method: linear\nmodels: [{model: m}]\nchat_template: chatml\n", &["`chat_template`", "line 3"]),
            ("merge_method: linear\nmodels: [{model: m}]\ntokenizer_source: union\n", &["tokenizer_source", "`union`", "line 3"]),
            ("merge_method: ties\nmodels: [{model: m}]\n", &["`ties`", "`base_model`"]),
            ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      density: .inf\n", &["`density`", "finite", "line 6"]),
            ("merge_method: ties\nbase_model: b\nmodels: []\n", &["`models`", "empty"]),
            ("merge_method: ties\nbase_model: b\nmodels: [{model: m}]\nout_dtype: int8\n", &["out_dtype", "`int8`"]),
        ];
        for (text, parts) in cases {
            assert_mentions(&error(text), parts);
        }
    }

    #[test]
    fn errors_for_extension_values_and_shapes() {
        let with = |params: &str| {
            error(&format!(
                "merge_method: ties\nbase_model: b\nmodels: [{{model: m}}]\nparameters:\n  {params}\n"
            ))
        };
        assert_mentions(&with("seed: 1.5"), &["`seed`", "integer", "line 5"]);
        assert_mentions(
            &with("rescale: maybe"),
            &["`rescale`", "`maybe`", "inverse"],
        );
        assert_mentions(
            &with("density_scope: layer"),
            &["`density_scope`", "`layer`"],
        );
        assert_mentions(&with("normalize: yes"), &["`normalize`", "`yes`"]);
        assert_mentions(&with("t: []"), &["`t`", "empty"]);
        assert_mentions(&with("t: {filter: mlp, value: 1}"), &["`t`", "list"]);
        assert_mentions(&with("t: [{filter: mlp, valeu: 1}]"), &["valeu", "line 5"]);
        assert_mentions(
            &with("lambda: 1\n  lambda: 2"),
            &["`lambda`", "twice", "line 6"],
        );
        assert_mentions(
            &error("merge_method: ties\nmerge_method: linear\n"),
            &["`merge_method`", "twice", "line 2"],
        );
        assert_mentions(&error("  \n"), &["empty"]);
        assert_mentions(&error("merge_method: [\n"), &["line"]);
        assert_mentions(&error("- a\n"), &["merge_method"]);
    }

    #[test]
    fn accepts_mergekit_spellings() {
        for method in MethodKind::ALL {
            let text = format!("merge_method: {method}\nbase_model: b\nmodels: [{{model: m}}]\n");
            assert_eq!(parse(&text).method(), method);
        }
        let c = parse(
            "merge_method: linear\nmodels: [{model: m}]\nout_dtype: torch.float16\nparameters:\n",
        );
        assert_eq!(c.out_dtype(), Some(FloatType::F16));
        assert!(c.parameters().is_empty());
    }

    #[test]
    fn reads_only_small_regular_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("merge.yaml");
        std::fs::write(&good, LINEAR).unwrap();
        assert_eq!(MergeConfig::from_file(&good).unwrap(), parse(LINEAR));

        let folder = MergeConfig::from_file(dir.path()).unwrap_err().to_string();
        assert_mentions(&folder, &["a folder", "not a regular file"]);

        let big = dir.path().join("big.yaml");
        let mut text = String::from(LINEAR);
        text.push_str(&"#".repeat(MAX_CONFIG_BYTES as usize));
        std::fs::write(&big, text).unwrap();
        assert_mentions(
            &MergeConfig::from_file(&big).unwrap_err().to_string(),
            &["1 MiB"],
        );

        let latin1 = dir.path().join("latin1.yaml");
        std::fs::write(&latin1, b"merge_method: linear # caf\xe9\n").unwrap();
        let err = MergeConfig::from_file(&latin1).unwrap_err().to_string();
        assert_mentions(&err, &["latin1.yaml", "UTF-8", "offset 26"]);

        let missing = MergeConfig::from_file(&dir.path().join("none.yaml"));
        assert!(matches!(missing, Err(Error::Io { .. })));

        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "merge_method: linear\nmodels: [{model: m}]\nslices: []\n",
        )
        .unwrap();
        let err = MergeConfig::from_file(&bad).unwrap_err().to_string();
        assert_mentions(&err, &["bad.yaml", "`slices`"]);
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.yaml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mkfifo unavailable; skipping");
            return;
        }
        let err = MergeConfig::from_file(&fifo).unwrap_err().to_string();
        assert_mentions(&err, &["a FIFO", "not a regular file"]);
        let dev = MergeConfig::from_file(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert_mentions(&dev, &["a device"]);
    }
}
