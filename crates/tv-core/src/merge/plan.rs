//! Planning a merge: what every output tensor is and where it comes from.
//!
//! [`MergePlan::with_recipe`] checks a [`Family`] against a [`Recipe`] and
//! decides, for every tensor of the base in storage order, what to write:
//! float tensors are merged by the recipe's method from the models that
//! store them (with that tensor's parameters), everything else is copied
//! from the base. With `--untie-embeddings` over a base that ties its
//! embeddings, an `lm_head.weight` is planned right after the embedding,
//! with the base's embedding as its base tensor. When models' vocabularies
//! differ (see [`crate::vocab`]), the embedding and lm_head are planned as
//! [`Action::MergeRows`]: merged row by row, each output row from the rows
//! of the models that hold its token. Nothing is read beyond headers and
//! tokenizer files; [`super::run`] executes the plan.

use crate::checkpoint::TensorRef;
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::family::{stores_own_lm_head, Family, ModelTensor, LM_HEAD};
use crate::methods::{MethodKind, Recipe, TensorParams};
use crate::vocab::{is_vocab_tensor, Alignment, VocabMode};
use crate::writer::{Layout, OutTensor};
use std::sync::Arc;

/// What happens to one tensor of the base.
#[derive(Debug, Clone)]
pub enum Action {
    /// Merge with the listed models (index into the family, what they hold).
    Merge(Vec<(usize, ModelTensor)>),
    /// Copy (converting the float type if the output type differs).
    Copy,
    /// Merge row by row, matching rows by token (embedding and lm_head of
    /// models whose vocabularies differ).
    MergeRows(RowMerge),
}

/// A tensor whose rows are tokens, merged by token: output row `r` takes
/// the base's row `r` (or, past the base's rows, the mean of the base's
/// rows) and, from each source model `m`, row `alignment.maps[m][r]`.
#[derive(Debug, Clone)]
pub struct RowMerge {
    pub alignment: Arc<Alignment>,
    /// The models that take part in the tensor.
    pub sources: Vec<RowSource>,
    /// Elements per row.
    pub row_len: usize,
}

/// One model's tensor in a [`RowMerge`].
#[derive(Debug, Clone)]
pub struct RowSource {
    /// Index into the family.
    pub model: usize,
    pub tensor: TensorRef,
    /// The tensor is the base's: an adapter that leaves it alone (its rows
    /// are the base's, a zero task vector that still counts in a linear
    /// merge's weights).
    pub from_base: bool,
}

/// One output tensor and how to produce it.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub base: TensorRef,
    pub out_type: Option<FloatType>,
    pub action: Action,
    /// The method's numbers for this tensor (merged tensors only).
    pub params: Option<TensorParams>,
}

impl PlannedTensor {
    /// The output tensor's shape (the union's embedding has more rows).
    pub fn out_shape(&self) -> Vec<usize> {
        match &self.action {
            Action::MergeRows(r) => vec![r.alignment.rows(), r.row_len],
            _ => self.base.shape.clone(),
        }
    }
}

/// Choices that shape the output.
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    /// Float type of every float tensor; `None` keeps the base's.
    pub out_type: Option<FloatType>,
    /// Largest shard, in data bytes.
    pub max_shard_size: u64,
    /// Leave a model out of tensors it stores with another shape, instead
    /// of refusing.
    pub skip_mismatched: bool,
    /// Write NaN or infinite merged values instead of refusing.
    pub allow_nonfinite: bool,
    /// When the base ties its embeddings, write an untied output whose
    /// `lm_head.weight` merges the models' own output layers.
    pub untie_embeddings: bool,
    /// Match embedding rows by token: `None` does so with the base's
    /// vocabulary when a model's embedding has another number of rows
    /// (unless `skip_mismatched`).
    pub vocab: Option<VocabMode>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            out_type: None,
            max_shard_size: 5_000_000_000,
            skip_mismatched: false,
            allow_nonfinite: false,
            untie_embeddings: false,
            vocab: None,
        }
    }
}

/// Everything decided before writing a byte.
#[derive(Debug)]
pub struct MergePlan {
    pub tensors: Vec<PlannedTensor>,
    pub layout: Layout,
    pub recipe: Recipe,
    /// Per model: float tensors of the base that the model lacks.
    pub missing: Vec<Vec<String>>,
    /// Per model: tensors the model stores that the base lacks (not merged).
    pub extra: Vec<Vec<String>>,
    /// Per model: tensors stored with another shape, left out with
    /// `skip_mismatched`.
    pub mismatched: Vec<Vec<String>>,
    pub options: MergeOptions,
    /// The output's main float type (for `config.json`).
    pub main_type: Option<FloatType>,
    pub tied_embeddings: bool,
    /// The base's tied embeddings are written untied: an `lm_head.weight`
    /// merged from the base's embedding and the models' output layers.
    pub untied_embeddings: bool,
    /// How embedding rows were matched by token, when they were.
    pub alignment: Option<Arc<Alignment>>,
}

impl MergePlan {
    /// Plans a Task Arithmetic merge with weights `lambdas`.
    pub fn new(family: &Family, lambdas: Vec<f64>, options: MergeOptions) -> Result<Self> {
        Self::with_recipe(family, Recipe::task_arithmetic(lambdas), options)
    }

    /// The models' weights as a whole (what the weight table prints).
    pub fn lambdas(&self) -> &[Option<f64>] {
        &self.recipe.weights
    }

    /// Checks the family against `recipe` and plans the output.
    pub fn with_recipe(family: &Family, recipe: Recipe, options: MergeOptions) -> Result<Self> {
        assert_eq!(recipe.weights.len(), family.models.len());
        check_model_count(recipe.settings.kind, family.models.len())?;
        recipe.settings.check()?;
        family.check_overlap()?;
        family.refuse_low_precision("merged")?;
        let out_type = options.out_type;
        let untie = untied_lm_head(family, options.untie_embeddings)?;
        let alignment = Alignment::plan(family, options.vocab, options.skip_mismatched)?
            .filter(|a| options.vocab.is_some() || a.needed())
            .map(Arc::new);
        let row_merge = alignment.as_ref().filter(|a| a.needed());
        let mut tensors = Vec::with_capacity(family.base.len() + 1);
        let mut missing = vec![Vec::new(); family.models.len()];
        let mut mismatched = vec![Vec::new(); family.models.len()];
        for name in family.base.names() {
            let base = family.base.get(name).expect("listed tensor");
            tensors.push(plan_tensor(
                family,
                &recipe,
                &options,
                name,
                base,
                &|i| family.models[i].tensor(name),
                row_merge,
                &mut missing,
                &mut mismatched,
            )?);
            // The untied output layer follows the embedding it starts from:
            // the base's embedding, each model's own lm_head (or, for a
            // model that ties, its embedding).
            if untie == Some(name.as_str()) {
                tensors.push(plan_tensor(
                    family,
                    &recipe,
                    &options,
                    LM_HEAD,
                    base,
                    &|i| {
                        let m = &family.models[i];
                        if stores_own_lm_head(m) {
                            m.tensor(LM_HEAD)
                        } else {
                            m.tensor(name)
                        }
                    },
                    row_merge,
                    &mut missing,
                    &mut mismatched,
                )?);
            }
        }
        let extra = family
            .models
            .iter()
            .map(|m| {
                m.extra_names(&family.base)
                    .into_iter()
                    .filter(|n| untie.is_none() || n.as_str() != LM_HEAD)
                    .cloned()
                    .collect()
            })
            .collect();
        let layout = Layout::plan(
            tensors
                .iter()
                .map(|t| OutTensor {
                    name: t.name.clone(),
                    dtype: t.out_type.map_or(t.base.dtype, FloatType::dtype),
                    shape: t.out_shape(),
                })
                .collect(),
            options.max_shard_size,
        );
        let main_type = out_type.or_else(|| main_float_type(&tensors));
        Ok(Self {
            tensors,
            layout,
            recipe,
            missing,
            extra,
            mismatched,
            options,
            main_type,
            tied_embeddings: family.base_ties_embeddings() && untie.is_none(),
            untied_embeddings: untie.is_some(),
            alignment,
        })
    }

    /// Number of tensors merged (the rest are copied).
    pub fn merged_count(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| !matches!(t.action, Action::Copy))
            .count()
    }

    /// Bytes read from all inputs by the merge pass (pre-passes of some
    /// methods read merged tensors once or a few times more).
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| read_bytes(t) as u64).sum()
    }

    /// A human summary of the plan.
    pub fn describe(&self, names: &[String]) -> String {
        let mut s = String::new();
        let shards = self.layout.shards.len();
        s.push_str(&format!(
            "plan: {}, {} tensors ({} merged, {} copied from the base), {} in {} shard{}, dtype {}\n",
            self.recipe.settings.kind,
            self.tensors.len(),
            self.merged_count(),
            self.tensors.len() - self.merged_count(),
            human_bytes(self.layout.total_bytes()),
            shards,
            if shards == 1 { "" } else { "s" },
            self.main_type
                .map_or("as stored".to_string(), |t| t.to_string()),
        ));
        if self.tied_embeddings {
            s.push_str("      tied embeddings: the shared matrix is merged once, as stored\n");
        }
        if self.untied_embeddings {
            s.push_str(
                "      untied embeddings: lm_head.weight is written, merged from the base's \
                 embedding and each model's lm_head (or its embedding, where it ties them)\n",
            );
        }
        if let Some(a) = &self.alignment {
            s.push_str(&format!(
                "      vocabulary {}: embedding rows matched by token; {} rows out ({} of the base{})\n",
                a.mode.name(),
                a.rows(),
                a.base_rows,
                if a.added.is_empty() {
                    String::new()
                } else {
                    format!(", {} tokens added", a.added.len())
                }
            ));
            for (name, c) in names.iter().zip(&a.counts) {
                let missing = match c.missing {
                    0 => "0 missing".to_string(),
                    n => format!("{n} missing (it contributes nothing to their rows)"),
                };
                s.push_str(&format!(
                    "      model '{name}': {} tokens matched, {} added, {missing}\n",
                    c.matched, c.added
                ));
            }
        }
        for (i, name) in names.iter().enumerate() {
            if !self.missing[i].is_empty() {
                s.push_str(&format!(
                    "      model '{name}' lacks {} tensor(s) of the base (the others' deltas still apply): {}\n",
                    self.missing[i].len(),
                    preview(&self.missing[i])
                ));
            }
            if !self.mismatched[i].is_empty() {
                s.push_str(&format!(
                    "      model '{name}' stores {} tensor(s) with another shape, left out: {}\n",
                    self.mismatched[i].len(),
                    preview(&self.mismatched[i])
                ));
            }
            if !self.extra[i].is_empty() {
                s.push_str(&format!(
                    "      model '{name}' has {} tensor(s) the base lacks, not merged: {}\n",
                    self.extra[i].len(),
                    preview(&self.extra[i])
                ));
            }
        }
        s
    }
}

/// The base embedding to write an untied `lm_head.weight` from, when the
/// base ties its embeddings and `untie` asks for it. Without `untie`, a
/// model with an output layer of its own is refused: merging only the
/// shared matrix would silently drop that model's output-layer training.
fn untied_lm_head(family: &Family, untie: bool) -> Result<Option<&str>> {
    let Some(embedding) = family.tied_embedding() else {
        if untie && family.base_ties_embeddings() && !family.base.contains(LM_HEAD) {
            return Err(Error::Incompatible(
                "--untie-embeddings: the base ties its embeddings but stores no input embedding \
                 (*embed_tokens.weight, *wte.weight, *word_embeddings.weight) to untie"
                    .into(),
            ));
        }
        return Ok(None);
    };
    if untie {
        return Ok(Some(embedding));
    }
    match family.models.iter().position(stores_own_lm_head) {
        Some(i) => Err(Error::Incompatible(format!(
            "model '{}' stores its own {LM_HEAD}, but the base ties it to {embedding}; \
             pass --untie-embeddings to merge it into an untied output",
            family.names[i]
        ))),
        None => Ok(None),
    }
}

/// Plans one output tensor `name` from the base's tensor `base` and, for
/// each model `i`, `source(i)`: merged from the models that store a float
/// tensor of the base's shape, copied from the base otherwise.
#[allow(clippy::too_many_arguments)]
fn plan_tensor(
    family: &Family,
    recipe: &Recipe,
    options: &MergeOptions,
    name: &str,
    base: &TensorRef,
    source: &dyn Fn(usize) -> Option<ModelTensor>,
    alignment: Option<&Arc<Alignment>>,
    missing: &mut [Vec<String>],
    mismatched: &mut [Vec<String>],
) -> Result<PlannedTensor> {
    let Some(base_type) = base.float_type() else {
        return Ok(PlannedTensor {
            name: name.to_string(),
            base: base.clone(),
            out_type: None,
            action: Action::Copy,
            params: None,
        });
    };
    if let Some(alignment) = alignment.filter(|_| is_vocab_tensor(name)) {
        return plan_rows(
            family, recipe, options, name, base, source, alignment, missing,
        );
    }
    let mut sources = Vec::new();
    for (i, model_name) in family.names.iter().enumerate() {
        let t = match source(i) {
            None => {
                missing[i].push(name.to_string());
                continue;
            }
            // Checked against the base when the adapter was opened.
            Some(held @ (ModelTensor::Adapter(_) | ModelTensor::Untouched)) => {
                sources.push((i, held));
                continue;
            }
            Some(ModelTensor::Stored(t)) => t,
        };
        if t.shape != base.shape {
            if options.skip_mismatched {
                mismatched[i].push(name.to_string());
                continue;
            }
            return Err(Error::Incompatible(format!(
                "tensor '{name}': model '{model_name}' has shape {:?}, the base {:?}{}; \
                 pass --skip-mismatched to merge it from the other models only",
                t.shape,
                base.shape,
                if name.contains("embed") || name.contains("lm_head") {
                    " (a resized vocabulary?)"
                } else {
                    ""
                }
            )));
        }
        if t.float_type().is_none() {
            return Err(Error::Incompatible(format!(
                "tensor '{name}': model '{model_name}' stores it as {:?}, the base as {:?}",
                t.dtype, base.dtype
            )));
        }
        sources.push((i, ModelTensor::Stored(t)));
    }
    let out = options.out_type.unwrap_or(base_type);
    // Model Stock needs two task vectors to measure an angle; with
    // fewer the tensor keeps the base's values (as in mergekit).
    let too_few = recipe.settings.kind == MethodKind::ModelStock && sources.len() < 2;
    // Adapters that do not touch a tensor leave it as the base's for every
    // method, so a tensor only such adapters hold is copied.
    let untouched = sources
        .iter()
        .all(|(_, held)| matches!(held, ModelTensor::Untouched));
    let (action, params) = if sources.is_empty() || too_few || untouched {
        (Action::Copy, None)
    } else {
        let params = recipe.params.tensor_params(name)?;
        check_params(name, &params, recipe.settings.kind, family)?;
        (Action::Merge(sources), Some(params))
    };
    Ok(PlannedTensor {
        name: name.to_string(),
        base: base.clone(),
        out_type: Some(out),
        action,
        params,
    })
}

/// Plans a tensor whose rows are tokens as a row-by-row merge by token.
/// Every model's tensor must have as many rows as its embedding (the rows
/// its tokenizer was matched against) and the base's row length. Only
/// methods without a pass over the whole tensor merge by row.
#[allow(clippy::too_many_arguments)]
fn plan_rows(
    family: &Family,
    recipe: &Recipe,
    options: &MergeOptions,
    name: &str,
    base: &TensorRef,
    source: &dyn Fn(usize) -> Option<ModelTensor>,
    alignment: &Arc<Alignment>,
    missing: &mut [Vec<String>],
) -> Result<PlannedTensor> {
    let kind = recipe.settings.kind;
    let flag = format!("--vocab {}", alignment.mode.name());
    if !matches!(kind, MethodKind::TaskArithmetic | MethodKind::Linear) {
        return Err(Error::Incompatible(format!(
            "tensor '{name}': the models' vocabularies differ, and merging rows by token \
             ({flag}) supports task_arithmetic and linear, not {kind}; pass --skip-mismatched \
             to leave resized models out of this tensor"
        )));
    }
    let (Some(base_type), &[base_rows, row_len]) = (base.float_type(), &base.shape[..]) else {
        return Err(Error::Incompatible(format!(
            "tensor '{name}': {flag} needs a float matrix in the base, which stores {:?} {:?}",
            base.dtype, base.shape
        )));
    };
    if base_rows != alignment.base_rows {
        return Err(Error::Incompatible(format!(
            "tensor '{name}': the base stores {base_rows} rows but its embedding {}; \
             {flag} cannot match them",
            alignment.base_rows
        )));
    }
    let mut sources = Vec::new();
    for (i, model_name) in family.names.iter().enumerate() {
        let t = match source(i) {
            None => {
                missing[i].push(name.to_string());
                continue;
            }
            // An adapter's tensors have the base's shape (a resized
            // embedding is refused when the adapter is opened), so one
            // that leaves the tensor alone holds the base's rows.
            Some(ModelTensor::Untouched) => {
                sources.push(RowSource {
                    model: i,
                    tensor: base.clone(),
                    from_base: true,
                });
                continue;
            }
            Some(ModelTensor::Adapter(_)) => {
                return Err(Error::Incompatible(format!(
                    "tensor '{name}': adapter '{model_name}' changes it, and another model's \
                     vocabulary differs ({flag} merges rows by token, which adapters do not \
                     support); pass --skip-mismatched to leave resized models out of this tensor"
                )));
            }
            Some(ModelTensor::Stored(t)) => t,
        };
        let rows = alignment.model_rows[i];
        if t.float_type().is_none() || t.shape != [rows, row_len] {
            return Err(Error::Incompatible(format!(
                "tensor '{name}': model '{model_name}' stores {:?} {:?}; {flag} expects a float \
                 matrix of {rows} rows (its embedding's) of {row_len} values",
                t.dtype, t.shape
            )));
        }
        sources.push(RowSource {
            model: i,
            tensor: t,
            from_base: false,
        });
    }
    let params = recipe.params.tensor_params(name)?;
    check_params(name, &params, kind, family)?;
    let divides = kind == MethodKind::Linear && recipe.settings.normalize;
    check_row_weights(name, alignment, &sources, &params, divides)?;
    Ok(PlannedTensor {
        name: name.to_string(),
        base: base.clone(),
        out_type: Some(options.out_type.unwrap_or(base_type)),
        action: Action::MergeRows(RowMerge {
            alignment: alignment.clone(),
            sources,
            row_len,
        }),
        params: Some(params),
    })
}

/// Refuses weights that sum to 0 over the models holding a row's token
/// where the row is their weighted average: every appended row, and with
/// `divides` (normalised linear) every row.
fn check_row_weights(
    name: &str,
    alignment: &Alignment,
    sources: &[RowSource],
    params: &TensorParams,
    divides: bool,
) -> Result<()> {
    let first = if divides { 0 } else { alignment.base_rows };
    for r in first..alignment.rows() {
        let held = sources
            .iter()
            .filter(|s| alignment.maps[s.model][r].is_some());
        let mut held = held.map(|s| params.weight[s.model]).peekable();
        if held.peek().is_some() && held.sum::<f64>() == 0.0 {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': the weights of the models holding the token of row {r} sum \
                 to 0, and its row is their weighted average; change the weights"
            )));
        }
    }
    Ok(())
}

/// Refuses a family the method cannot merge.
fn check_model_count(kind: MethodKind, models: usize) -> Result<()> {
    match kind {
        MethodKind::Slerp if models != 1 => Err(Error::InvalidArgument(format!(
            "slerp interpolates between the base and exactly one model; got {models} models"
        ))),
        MethodKind::ModelStock if models < 2 => Err(Error::InvalidArgument(
            "model_stock needs two or more fine-tuned models (it measures the angle between them)"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Refuses parameters that are not finite numbers.
fn check_params(name: &str, p: &TensorParams, kind: MethodKind, family: &Family) -> Result<()> {
    let per_model = [
        ("weight", &p.weight),
        ("density", &p.density),
        ("gamma", &p.gamma),
        ("epsilon", &p.epsilon),
    ];
    for (what, values) in per_model {
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': {what} {v} of model '{}' is not a finite number",
                family.names[i]
            )));
        }
    }
    for (what, v) in [("lambda", p.scale), ("t", p.t)] {
        if !v.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': {what} {v} is not a finite number"
            )));
        }
    }
    if kind.sparsification() == Some(crate::methods::Sparsification::DellaMagprune) {
        for (&rho, &eps) in p.density.iter().zip(&p.epsilon) {
            crate::methods::sparsify::check_della(name, rho, eps)?;
        }
    }
    Ok(())
}

pub(super) fn read_bytes(t: &PlannedTensor) -> usize {
    let sources: usize = match &t.action {
        Action::Merge(s) => s
            .iter()
            .map(|(_, held)| match held {
                ModelTensor::Stored(r) => r.nbytes(),
                _ => 0,
            })
            .sum(),
        Action::MergeRows(r) => r.sources.iter().map(|s| s.tensor.nbytes()).sum(),
        Action::Copy => 0,
    };
    t.base.nbytes() + sources
}

/// The float type holding the most elements.
fn main_float_type(tensors: &[PlannedTensor]) -> Option<FloatType> {
    let mut counts: Vec<(FloatType, usize)> = Vec::new();
    for t in tensors {
        if let Some(ty) = t.out_type {
            match counts.iter_mut().find(|(c, _)| *c == ty) {
                Some((_, n)) => *n += t.out_shape().iter().product::<usize>(),
                None => counts.push((ty, t.out_shape().iter().product())),
            }
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t)
}

/// The first few of `names`, escaped so each stays on its line.
fn preview(names: &[String]) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(3)
        .map(|n| crate::error::escape_controls(n).into_owned())
        .collect();
    if names.len() > 3 {
        format!("{}, ...", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Formats a byte count with a decimal unit (as `--max-shard-size` reads it).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses a size like `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => f64::NAN,
    };
    let value: f64 = num.parse().unwrap_or(f64::NAN) * mult;
    if !value.is_finite() || value < 1.0 {
        return Err(Error::InvalidArgument(format!(
            "--max-shard-size '{s}' is not a size like 5GB, 500MB or 2GiB"
        )));
    }
    Ok(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5kB").unwrap(), 1500);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
