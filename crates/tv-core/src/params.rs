//! Per-tensor merge parameter values, with mergekit's semantics.
//!
//! This module owns [`ParamValue`]: one merge parameter (a weight, density,
//! `t`, `normalize`...) as a mergekit config writes it, and what it gives one
//! tensor. A scalar applies everywhere; a list of numbers is a gradient of
//! anchors interpolated across the layers; a list of `{filter, value}`
//! entries gives the value of the first entry whose filter is a substring of
//! the tensor name. It also reads a tensor's layer index from its name, and
//! checks values while they are parsed so that a bad one is reported at its
//! line. Which parameter names exist and what each accepts belongs to
//! [`crate::config`].
//!
//! # Agreement with mergekit
//!
//! Checked against mergekit's `evaluate_setting` (`mergekit/config.py`) and
//! the planner that feeds it `t` (`MergePlanner.plan_slice` and
//! `plan_module` in `mergekit/plan.py`):
//! - Layer `k` of `L` takes `t = k / (L − 1)`; anchors `a_0..a_{m−1}` give
//!   `s = t·(m − 1)`, `i0 = floor(s)`, `i1 = min(m − 1, i0 + 1)`,
//!   `frac = s − i0` and `(1 − frac)·a_i0 + frac·a_i1`. [`interpolate`] does
//!   the same f64 operations in the same order, so results are bit-identical.
//! - A model of ONE layer takes `t = 1` (the last anchor), as mergekit's
//!   `plan_slice` does, not `t = 0`.
//! - Tensors outside the layers (embeddings, final norm, `lm_head`) take
//!   `t = 0`, the first anchor: mergekit plans them with `t = 0`.
//! - A filter entry matches when it has no filter, when its filter is `"*"`,
//!   or when the filter is a substring of a non-empty tensor name; the first
//!   match wins; no match leaves the parameter unset, and the caller falls
//!   back (mergekit: model's value, then the global one, then the default).
//!
//! Differences, all deliberate:
//! - mergekit knows which tensors belong to a layer from its architecture
//!   definitions; here [`layer_index`] reads the name (`layers.N`, `h.N`,
//!   `blocks.N`, `layer.N`) and the layer count is the highest index + 1
//!   ([`layer_count`]). They agree for decoder-only models whose layers are
//!   all present; models with several stacks (vision towers, encoder-decoder)
//!   may differ.
//! - mergekit's schema coerces values to float (`true` becomes 1.0, `"0.5"`
//!   becomes 0.5); here a number must be a number and a boolean a boolean.
//! - mergekit picks from a list of booleans or texts by `floor(t·(m − 1))`
//!   (and interpolates a list of booleans as 0/1); such lists are refused
//!   here. So is a lone `{filter, value}` mapping outside a list, which
//!   mergekit's schema accepts but `evaluate_setting` then rejects.
//! - A filter entry's value is a scalar or an anchor list, never another
//!   filter list (mergekit's schema says the same).

use crate::error::{Error, Result};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// One merge parameter as written in a config.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// The same number for every tensor.
    Number(f64),
    /// The same flag for every tensor (`normalize: true`).
    Bool(bool),
    /// A word (`rescale: inverse`).
    Text(String),
    /// Anchor values interpolated across the layers (never empty).
    Anchors(Vec<f64>),
    /// Entries matched against the tensor name, first match wins.
    Filtered(Vec<FilterEntry>),
}

/// One `{filter, value}` entry of a filtered parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilterEntry {
    /// Substring of the tensor name; `None` or `"*"` matches every tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// A scalar or an anchor list.
    pub value: ParamValue,
}

/// Where a tensor sits among a model's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPos {
    /// The tensor's layer index.
    pub layer: usize,
    /// How many layers the model has.
    pub layers: usize,
}

impl LayerPos {
    /// The position of tensor `name` in a model of `layers` layers, or
    /// `None` for a tensor outside the layers.
    pub fn of(name: &str, layers: usize) -> Option<LayerPos> {
        layer_index(name).map(|layer| LayerPos { layer, layers })
    }

    /// mergekit's `t` in `[0, 1]`: `layer / (layers − 1)`, and 1 for a
    /// one-layer model. A layer past the end counts as the last.
    pub fn t(self) -> f64 {
        if self.layers <= 1 {
            return 1.0;
        }
        let last = self.layers - 1;
        self.layer.min(last) as f64 / last as f64
    }
}

/// The value at `t` in `[0, 1]` of the gradient through `anchors`, computed
/// exactly as mergekit does. Panics if `anchors` is empty.
pub fn interpolate(anchors: &[f64], t: f64) -> f64 {
    let last = anchors.len() - 1;
    let scaled = t * last as f64;
    let i0 = (scaled as usize).min(last);
    let i1 = (i0 + 1).min(last);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * anchors[i0] + frac * anchors[i1]
}

/// Path segments whose next segment is a layer index.
const LAYER_CONTAINERS: [&str; 4] = ["layers", "h", "blocks", "layer"];

/// The layer index of a tensor name (`model.layers.12.mlp...` → 12; also
/// `h.12.`, `blocks.12.`, `layer.12.`), or `None` outside the layers.
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|w| LAYER_CONTAINERS.contains(&w[0]) && is_index(w[1]))
        .and_then(|w| w[1].parse().ok())
}

fn is_index(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())
}

/// The number of layers among `names`: the highest layer index + 1, or 0.
pub fn layer_count<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .filter_map(layer_index)
        .max()
        .map_or(0, |max| max + 1)
}

impl FilterEntry {
    /// Whether this entry applies to tensor `name`.
    pub fn matches(&self, name: &str) -> bool {
        match self.filter.as_deref() {
            None | Some("*") => true,
            Some(filter) => !name.is_empty() && name.contains(filter),
        }
    }
}

impl ParamValue {
    /// The value that applies to tensor `name`: this value itself, or for a
    /// filtered one the value of the first matching entry (`None` if none
    /// matches).
    pub fn select(&self, name: &str) -> Option<&ParamValue> {
        match self {
            ParamValue::Filtered(entries) => entries
                .iter()
                .find(|entry| entry.matches(name))
                .and_then(|entry| entry.value.select(name)),
            other => Some(other),
        }
    }

    /// The number this parameter gives tensor `name` at `pos` (`None` for a
    /// tensor outside the layers), or `None` when no filter entry matches.
    pub fn number_for(&self, name: &str, pos: Option<LayerPos>) -> Result<Option<f64>> {
        let t = pos.map_or(0.0, LayerPos::t);
        match self.select(name) {
            None => Ok(None),
            Some(ParamValue::Number(x)) => Ok(Some(*x)),
            Some(ParamValue::Anchors(a)) if !a.is_empty() => Ok(Some(interpolate(a, t))),
            Some(other) => Err(mismatch(name, "a number", other)),
        }
    }

    /// The flag this parameter gives tensor `name`, or `None` when no filter
    /// entry matches.
    pub fn bool_for(&self, name: &str) -> Result<Option<bool>> {
        match self.select(name) {
            None => Ok(None),
            Some(ParamValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(mismatch(name, "true or false", other)),
        }
    }

    /// Checks that this value is one that parameter `name` of `kind` accepts
    /// (finite numbers, non-empty lists, no nested filters...), with the
    /// message parsing would give.
    pub fn check(&self, name: &str, kind: ValueKind) -> Result<()> {
        let fail = |e: serde_norway::Error| Error::InvalidArgument(one_line(&e.to_string()));
        let value = serde_norway::to_value(self).map_err(fail)?;
        ParamSeed { name, kind }.deserialize(value).map_err(fail)?;
        Ok(())
    }

    /// A short description of this value for messages.
    pub fn describe(&self) -> String {
        match self {
            ParamValue::Number(x) => format!("the number {x}"),
            ParamValue::Bool(b) => format!("`{b}`"),
            ParamValue::Text(s) => format!("the text `{s}`"),
            ParamValue::Anchors(_) => "a list of numbers".to_string(),
            ParamValue::Filtered(_) => "a list of filter entries".to_string(),
        }
    }
}

fn mismatch(name: &str, wanted: &str, found: &ParamValue) -> Error {
    Error::InvalidArgument(format!(
        "tensor `{name}`: expected {wanted}, found {}",
        found.describe()
    ))
}

/// A message on one line (YAML errors may wrap).
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What a parameter accepts; checked while parsing, so that an error points
/// at the offending line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Any well-formed value.
    Any,
    /// A number, an anchor list, or filter entries giving either.
    Number,
    /// As [`ValueKind::Number`], every number in `[0, 1]` (densities,
    /// gamma, epsilon).
    Fraction,
    /// A boolean, or filter entries giving one.
    Bool,
    /// One integer in `0..=2^53 − 1` (so that f64 holds it exactly).
    Integer,
    /// One of these words.
    Word(&'static [&'static str]),
    /// A boolean or one of these words.
    BoolOrWord(&'static [&'static str]),
}

/// The largest integer [`ValueKind::Integer`] accepts.
pub const MAX_INTEGER: f64 = 9_007_199_254_740_991.0; // 2^53 − 1

impl ValueKind {
    fn takes_bool(self) -> bool {
        matches!(self, Self::Any | Self::Bool | Self::BoolOrWord(_))
    }

    fn takes_number(self) -> bool {
        matches!(
            self,
            Self::Any | Self::Number | Self::Fraction | Self::Integer
        )
    }

    fn takes_list(self) -> bool {
        matches!(self, Self::Any | Self::Number | Self::Fraction | Self::Bool)
    }

    fn takes_word(self, word: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Word(words) | Self::BoolOrWord(words) => words.contains(&word),
            _ => false,
        }
    }

    /// What this kind accepts, in words.
    pub fn describe(self) -> String {
        let words = |ws: &[&str]| {
            let quoted: Vec<String> = ws.iter().map(|w| format!("`{w}`")).collect();
            quoted.join(", ")
        };
        match self {
            Self::Any => "a number, boolean, word, list of numbers (layer anchors) or list of {filter, value} entries".into(),
            Self::Number => "a number, a list of numbers (layer anchors) or a list of {filter, value} entries".into(),
            Self::Fraction => "a number in [0, 1], a list of them (layer anchors) or a list of {filter, value} entries".into(),
            Self::Bool => "true, false or a list of {filter, value} entries".into(),
            Self::Integer => "a non-negative integer below 2^53".into(),
            Self::Word(ws) => format!("one of {}", words(ws)),
            Self::BoolOrWord(ws) => format!("true, false or one of {}", words(ws)),
        }
    }
}

/// Deserializes the [`ParamValue`] of parameter `name`, accepting only
/// `kind`; every error names the parameter.
#[derive(Debug, Clone, Copy)]
pub struct ParamSeed<'a> {
    pub name: &'a str,
    pub kind: ValueKind,
}

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let seed = ParamSeed {
            name: "value",
            kind: ValueKind::Any,
        };
        seed.deserialize(deserializer)
    }
}

impl<'de> DeserializeSeed<'de> for ParamSeed<'_> {
    type Value = ParamValue;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<ParamValue, D::Error> {
        let visitor = ValueVisitor {
            seed: self,
            in_entry: false,
        };
        visitor.deserialize(deserializer)
    }
}

/// Visits one parameter value (and is its own seed); `in_entry` is set
/// inside a filter entry, where another filter list is not allowed.
#[derive(Clone, Copy)]
struct ValueVisitor<'a> {
    seed: ParamSeed<'a>,
    in_entry: bool,
}

impl<'de> DeserializeSeed<'de> for ValueVisitor<'_> {
    type Value = ParamValue;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<ParamValue, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueVisitor<'_> {
    fn wrong<E: de::Error>(&self, found: impl fmt::Display) -> E {
        E::custom(format!(
            "`{}` takes {}, not {found}",
            self.seed.name,
            self.seed.kind.describe()
        ))
    }

    fn number<E: de::Error>(&self, x: f64) -> Result<ParamValue, E> {
        check_number(self.seed, x)?;
        if !self.seed.kind.takes_number() {
            return Err(self.wrong(x));
        }
        let integral = x >= 0.0 && x.fract() == 0.0 && x <= MAX_INTEGER;
        if self.seed.kind == ValueKind::Integer && !integral {
            return Err(self.wrong(x));
        }
        Ok(ParamValue::Number(x))
    }
}

/// A number of parameter `seed`: finite, and in `[0, 1]` for a fraction.
fn check_number<E: de::Error>(seed: ParamSeed<'_>, x: f64) -> Result<(), E> {
    let name = seed.name;
    if !x.is_finite() {
        return Err(E::custom(format!(
            "`{name}` must be a finite number, not {x}"
        )));
    }
    if seed.kind == ValueKind::Fraction && !(0.0..=1.0).contains(&x) {
        return Err(E::custom(format!("`{name}` must lie in [0, 1], not {x}")));
    }
    Ok(())
}

impl<'de> Visitor<'de> for ValueVisitor<'_> {
    type Value = ParamValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} for `{}`", self.seed.kind.describe(), self.seed.name)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<ParamValue, E> {
        if self.seed.kind.takes_bool() {
            Ok(ParamValue::Bool(b))
        } else {
            Err(self.wrong(b))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamValue, E> {
        self.number(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamValue, E> {
        self.number(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamValue, E> {
        self.number(v)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<ParamValue, E> {
        if self.seed.kind.takes_word(s) {
            Ok(ParamValue::Text(s.to_string()))
        } else {
            Err(self.wrong(format_args!("`{s}`")))
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<ParamValue, A::Error> {
        Err(de::Error::custom(format!(
            "`{}`: a {{filter, value}} entry must be an item of a list (`- filter: ...`)",
            self.seed.name
        )))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParamValue, A::Error> {
        if !self.seed.kind.takes_list() {
            return Err(self.wrong("a list"));
        }
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(ItemSeed(self))? {
            items.push(item);
        }
        self.list_of(items).map_err(de::Error::custom)
    }
}

/// One item of a parameter list, read by the same visitor: a number (an
/// anchor) or a filter entry.
enum Item {
    Anchor(f64),
    Entry(FilterEntry),
}

/// Reads one list item of the value `0` visits.
struct ItemSeed<'a>(ValueVisitor<'a>);

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = Item;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Item, D::Error> {
        deserializer.deserialize_any(ItemVisitor(self.0))
    }
}

impl ValueVisitor<'_> {
    /// The list value of `items`: all anchors or all entries, not empty.
    fn list_of(&self, items: Vec<Item>) -> Result<ParamValue, String> {
        let name = self.seed.name;
        if items.is_empty() {
            return Err(format!("`{name}` is an empty list"));
        }
        let (mut anchors, mut entries) = (Vec::new(), Vec::new());
        for item in items {
            match item {
                Item::Anchor(x) => anchors.push(x),
                Item::Entry(e) => entries.push(e),
            }
        }
        match (anchors.is_empty(), entries.is_empty()) {
            (false, true) => Ok(ParamValue::Anchors(anchors)),
            (true, false) => Ok(ParamValue::Filtered(entries)),
            _ => Err(format!(
                "`{name}` mixes numbers and {{filter, value}} entries in one list"
            )),
        }
    }
}

struct ItemVisitor<'a>(ValueVisitor<'a>);

impl ItemVisitor<'_> {
    fn anchor<E: de::Error>(&self, x: f64) -> Result<Item, E> {
        let seed = self.0.seed;
        check_number(seed, x)?;
        if seed.kind == ValueKind::Bool {
            return Err(E::custom(format!(
                "`{}` takes true or false; a list of numbers is not allowed",
                seed.name
            )));
        }
        Ok(Item::Anchor(x))
    }
}

impl<'de> Visitor<'de> for ItemVisitor<'_> {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a number (layer anchor) or a {{filter, value}} entry in the list of `{}`",
            self.0.seed.name
        )
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
        self.anchor(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
        self.anchor(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Item, E> {
        self.anchor(v)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Item, A::Error> {
        if self.0.in_entry {
            return Err(de::Error::custom(format!(
                "`{}`: a filter entry's value cannot be another filter list",
                self.0.seed.name
            )));
        }
        read_entry(self.0.seed, map).map(Item::Entry)
    }
}

/// The keys of a filter entry.
#[derive(Deserialize, PartialEq)]
#[serde(field_identifier, rename_all = "lowercase")]
enum EntryKey {
    Filter,
    Value,
}

fn read_entry<'de, A: MapAccess<'de>>(
    seed: ParamSeed,
    mut map: A,
) -> Result<FilterEntry, A::Error> {
    let name = seed.name;
    let (mut filter, mut value) = (None, None);
    while let Some(key) = map.next_key::<EntryKey>()? {
        let duplicate = match key {
            EntryKey::Filter => filter
                .replace(map.next_value::<Option<String>>()?)
                .is_some(),
            EntryKey::Value => {
                let inner = ValueVisitor {
                    seed,
                    in_entry: true,
                };
                value.replace(map.next_value_seed(inner)?).is_some()
            }
        };
        if duplicate {
            return Err(de::Error::custom(format!(
                "a filter entry of `{name}` repeats a key"
            )));
        }
    }
    let value = value
        .ok_or_else(|| de::Error::custom(format!("a filter entry of `{name}` has no `value`")))?;
    Ok(FilterEntry {
        filter: filter.flatten(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, name: &str, kind: ValueKind) -> Result<ParamValue, String> {
        let value: serde_norway::Value = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        ParamSeed { name, kind }
            .deserialize(value)
            .map_err(|e| e.to_string())
    }

    fn number(yaml: &str) -> ParamValue {
        parse(yaml, "x", ValueKind::Number).unwrap()
    }

    fn at(layer: usize, layers: usize) -> Option<LayerPos> {
        Some(LayerPos { layer, layers })
    }

    #[test]
    fn t_follows_mergekit() {
        assert_eq!(
            LayerPos {
                layer: 0,
                layers: 5
            }
            .t(),
            0.0
        );
        assert_eq!(
            LayerPos {
                layer: 2,
                layers: 5
            }
            .t(),
            0.5
        );
        assert_eq!(
            LayerPos {
                layer: 4,
                layers: 5
            }
            .t(),
            1.0
        );
        // One layer: mergekit's plan_slice uses t = 1.
        assert_eq!(
            LayerPos {
                layer: 0,
                layers: 1
            }
            .t(),
            1.0
        );
        // Past the end counts as the last layer.
        assert_eq!(
            LayerPos {
                layer: 9,
                layers: 5
            }
            .t(),
            1.0
        );
    }

    #[test]
    fn anchors_interpolate_exactly_where_the_arithmetic_is_exact() {
        let v = number("[1.0, 2.0, 4.0, 8.0]");
        // 7 layers: t = k/6, s = 3t = k/2.
        assert_eq!(
            v.number_for("model.layers.0.mlp.w", at(0, 7)).unwrap(),
            Some(1.0)
        );
        assert_eq!(
            v.number_for("model.layers.2.mlp.w", at(2, 7)).unwrap(),
            Some(2.0)
        );
        // s = 1.5 → halfway between 2 and 4.
        assert_eq!(
            v.number_for("model.layers.3.mlp.w", at(3, 7)).unwrap(),
            Some(3.0)
        );
        // s = 2.5 → halfway between 4 and 8.
        assert_eq!(
            v.number_for("model.layers.5.mlp.w", at(5, 7)).unwrap(),
            Some(6.0)
        );
        assert_eq!(
            v.number_for("model.layers.6.mlp.w", at(6, 7)).unwrap(),
            Some(8.0)
        );
    }

    #[test]
    fn anchors_match_mergekit_bit_for_bit() {
        // Expected values: mergekit's formula evaluated by CPython
        // (t = k/(L-1); scaled = t*(m-1); i0 = int(scaled); ...).
        let cases: [(&str, usize, usize, f64); 5] = [
            ("[0.2, 0.8]", 1, 5, 0.35000000000000003),
            ("[0.1, 0.7, 0.3]", 1, 7, 0.3),
            ("[0.1, 0.7, 0.3]", 4, 7, 0.5666666666666667),
            ("[0, 0.5, 0.3, 0.7, 1]", 13, 32, 0.36451612903225805),
            ("[0.2, 0.8]", 1, 3, 0.5),
        ];
        for (yaml, layer, layers, want) in cases {
            let got = number(yaml)
                .number_for("layers.x", at(layer, layers))
                .unwrap();
            assert_eq!(got, Some(want), "{yaml} at {layer}/{layers}");
        }
        // And by hand: t = 1/4, frac = 1/4 → 0.75·0.2 + 0.25·0.8.
        let by_hand = (1.0 - 0.25) * 0.2 + 0.25 * 0.8;
        assert_eq!(interpolate(&[0.2, 0.8], 0.25), by_hand);
    }

    #[test]
    fn outside_layers_takes_the_first_anchor_and_one_layer_the_last() {
        let v = number("[0.2, 0.5, 0.8]");
        assert_eq!(v.number_for("lm_head.weight", None).unwrap(), Some(0.2));
        assert_eq!(
            v.number_for("model.layers.0.x", at(0, 1)).unwrap(),
            Some(0.8)
        );
        assert_eq!(
            number("0.3").number_for("lm_head.weight", None).unwrap(),
            Some(0.3)
        );
    }

    #[test]
    fn first_matching_filter_wins() {
        let v = number(
            "[{filter: mlp, value: 1}, {filter: mlp.down, value: 2}, {filter: '*', value: 3}, {value: 4}]",
        );
        assert_eq!(
            v.number_for("model.layers.1.mlp.down_proj", None).unwrap(),
            Some(1.0)
        );
        assert_eq!(
            v.number_for("model.layers.1.self_attn.q", None).unwrap(),
            Some(3.0)
        );
        let no_catch_all = number("[{filter: self_attn, value: 0.5}]");
        assert_eq!(
            no_catch_all
                .number_for("model.layers.1.mlp.up", None)
                .unwrap(),
            None
        );
        // An empty name never matches a substring filter (mergekit: `tensor_name and ...`).
        assert_eq!(
            number("[{filter: '', value: 1}]")
                .number_for("", None)
                .unwrap(),
            None
        );
    }

    #[test]
    fn filter_values_may_be_anchor_lists() {
        let v = number("[{filter: self_attn, value: [0.0, 1.0]}, {value: 0.5}]");
        let pos = at(1, 5); // t = 0.25
        assert_eq!(
            v.number_for("model.layers.1.self_attn.o", pos).unwrap(),
            Some(0.25)
        );
        assert_eq!(
            v.number_for("model.layers.1.mlp.o", pos).unwrap(),
            Some(0.5)
        );
    }

    #[test]
    fn layer_index_reads_common_layouts() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("transformer.h.3.attn.c_attn.weight"), Some(3));
        assert_eq!(layer_index("h.0.ln_1.weight"), Some(0));
        assert_eq!(layer_index("backbone.blocks.7.mixer.weight"), Some(7));
        assert_eq!(layer_index("encoder.layer.2.output.dense.weight"), Some(2));
        assert_eq!(layer_index("model.layers.1.mlp.experts.5.w1"), Some(1));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
        assert_eq!(layer_index("model.norm.weight"), None);
        assert_eq!(layer_index("lm_head.weight"), None);
        assert_eq!(layer_index("model.layers.+3.x"), None);
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.a",
            "model.layers.31.b",
        ];
        assert_eq!(layer_count(names), 32);
        assert_eq!(layer_count(["lm_head.weight"]), 0);
    }

    #[test]
    fn yaml_round_trip_keeps_the_shape() {
        for yaml in [
            "0.5",
            "true",
            "inverse",
            "[0.2, 0.8]",
            "[{filter: mlp, value: [0.1, 0.9]}, {filter: '*', value: 0.5}, {value: 1e-7}]",
        ] {
            let v: ParamValue = serde_norway::from_str(yaml).unwrap();
            let written = serde_norway::to_string(&v).unwrap();
            let back: ParamValue = serde_norway::from_str(&written).unwrap();
            assert_eq!(back, v, "{yaml} -> {written}");
        }
        assert_eq!(number("1"), ParamValue::Number(1.0));
        assert!(matches!(number("[1]"), ParamValue::Anchors(a) if a == [1.0]));
    }

    #[test]
    fn non_finite_numbers_name_the_parameter() {
        for yaml in [".inf", "-.inf", ".nan", "[0.1, .inf]", "[{value: .nan}]"] {
            let err = parse(yaml, "density", ValueKind::Number).unwrap_err();
            assert!(
                err.contains("`density` must be a finite number"),
                "{yaml}: {err}"
            );
        }
        let v = ParamValue::Anchors(vec![0.1, f64::NAN]);
        let err = v.check("gamma", ValueKind::Number).unwrap_err().to_string();
        assert!(err.contains("`gamma`"), "{err}");
    }

    #[test]
    fn kinds_refuse_other_shapes() {
        let words: &[&str] = &["tensor", "model"];
        let bad = [
            ("true", ValueKind::Number),
            ("abc", ValueKind::Number),
            ("0.5", ValueKind::Bool),
            ("yes", ValueKind::Bool),
            ("[1, 0]", ValueKind::Bool),
            ("1.5", ValueKind::Integer),
            ("-1", ValueKind::Integer),
            ("[1]", ValueKind::Integer),
            ("layer", ValueKind::Word(words)),
            ("1", ValueKind::Word(words)),
            ("[]", ValueKind::Number),
            ("[1, {value: 2}]", ValueKind::Number),
            ("{filter: mlp, value: 1}", ValueKind::Number),
            ("[{value: [{value: 1}]}]", ValueKind::Number),
            ("[{filter: mlp}]", ValueKind::Number),
            ("[{filter: mlp, value: 1, extra: 2}]", ValueKind::Number),
            ("~", ValueKind::Number),
        ];
        for (yaml, kind) in bad {
            let err = parse(yaml, "p", kind).unwrap_err();
            assert!(
                err.contains("`p`") || err.contains("unknown field"),
                "{yaml}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
        assert_eq!(
            parse("model", "s", ValueKind::Word(words)).unwrap(),
            ParamValue::Text("model".into())
        );
        assert_eq!(
            parse("42", "seed", ValueKind::Integer).unwrap(),
            ParamValue::Number(42.0)
        );
        let flags = parse(
            "[{filter: mlp, value: false}, {value: true}]",
            "n",
            ValueKind::Bool,
        )
        .unwrap();
        assert_eq!(flags.bool_for("layers.0.mlp.up").unwrap(), Some(false));
        assert_eq!(flags.bool_for("layers.0.attn.q").unwrap(), Some(true));
    }

    #[test]
    fn type_mismatch_at_lookup_is_an_error() {
        let err = ParamValue::Bool(true)
            .number_for("lm_head.weight", None)
            .unwrap_err();
        assert!(err.to_string().contains("lm_head.weight"), "{err}");
        assert!(ParamValue::Number(1.0).bool_for("x").is_err());
        assert!(ParamValue::Anchors(vec![]).number_for("x", None).is_err());
    }
}
