//! From a mergekit config to the [`Recipe`] a merge runs.
//!
//! The command line and a config file fill the same [`MergeConfig`]; this
//! module turns it into the method's settings (normalisation, rescaling,
//! seed, density scope, defaults as mergekit has them) and a
//! [`ParamSource`] that resolves each tensor's weights, densities, gamma,
//! epsilon, λ and t from scalars, per-layer anchors or name filters, as
//! mergekit evaluates them (layer k of L at position k/(L−1); tensors
//! outside the layers at position 0).

use crate::config::{MergeConfig, ParamKey};
use crate::error::{Error, Result};
use crate::methods::{DensityScope, Rescale};
use crate::methods::{MethodSettings, ParamSource, Recipe, TensorParams};
use crate::params::ParamValue;
use crate::params::{layer_count, LayerPos};

/// mergekit's defaults for parameters a config leaves out.
const DEFAULT_DENSITY: f64 = 1.0;
const DEFAULT_GAMMA: f64 = 0.01;
const DEFAULT_EPSILON: f64 = 0.15;
pub(crate) const DEFAULT_LAMBDA: f64 = 1.0;
pub(crate) const DEFAULT_T: f64 = 0.5;

/// Each tensor's parameters, read from a config.
#[derive(Debug)]
struct ConfigParams {
    config: MergeConfig,
    layers: usize,
    needs_weights: bool,
}

impl ParamSource for ConfigParams {
    fn tensor_params(&self, name: &str) -> Result<TensorParams> {
        let pos = LayerPos::of(name, self.layers);
        let k = self.config.models().len();
        let per_model = |key: ParamKey, default: Option<f64>| -> Result<Vec<f64>> {
            (0..k)
                .map(|i| match self.config.model_number(i, key, name, pos)? {
                    Some(v) => Ok(v),
                    None => default.ok_or_else(|| {
                        let key = key.name();
                        Error::InvalidArgument(format!(
                            "model '{}' has no {key} for tensor '{name}': set \
                             models[{i}].parameters.{key} or parameters.{key} in the config{}",
                            self.config.models()[i].model,
                            if key == "weight" {
                                ", or give --lambdas"
                            } else {
                                ""
                            }
                        ))
                    }),
                })
                .collect()
        };
        let global = |key: ParamKey, default: f64| -> Result<f64> {
            Ok(self
                .config
                .global_number(key, name, pos)?
                .unwrap_or(default))
        };
        Ok(TensorParams {
            weight: per_model(ParamKey::Weight, (!self.needs_weights).then_some(1.0))?,
            density: per_model(ParamKey::Density, Some(DEFAULT_DENSITY))?,
            gamma: per_model(ParamKey::Gamma, Some(DEFAULT_GAMMA))?,
            epsilon: per_model(ParamKey::Epsilon, Some(DEFAULT_EPSILON))?,
            scale: global(ParamKey::Lambda, DEFAULT_LAMBDA)?,
            t: global(ParamKey::T, DEFAULT_T)?,
        })
    }
}

/// The recipe `config` describes, for a base whose tensors are `names`.
pub fn from_config<'a>(
    config: &MergeConfig,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Recipe> {
    let kind = config.method();
    let mut settings = MethodSettings::new(kind);
    if let Some(normalize) = config.global_bool(ParamKey::Normalize, "")? {
        settings.normalize = normalize;
    }
    if let Some(rescale) = config.rescale() {
        settings.rescale = rescale;
    }
    if let Some(seed) = config.seed() {
        settings.seed = seed;
    }
    if let Some(scope) = config.density_scope() {
        settings.density_scope = scope;
    }
    if let Some(filter_wise) = config.global_bool(ParamKey::FilterWise, "")? {
        settings.filter_wise = filter_wise;
    }
    settings.check()?;
    let needs_weights = kind.uses_weights();
    // What the weight table shows: a model's weight when it is one number.
    let weights = (0..config.models().len())
        .map(|i| {
            let scalar = match config.model_param(i, ParamKey::Weight) {
                Some(ParamValue::Number(w)) => Some(*w),
                Some(_) => None,
                None => config.global_number(ParamKey::Weight, "", None)?,
            };
            Ok(scalar.or((!needs_weights).then_some(1.0)))
        })
        .collect::<Result<Vec<Option<f64>>>>()?;
    Ok(Recipe {
        settings,
        weights,
        params: Box::new(ConfigParams {
            config: config.clone(),
            layers: layer_count(names),
            needs_weights,
        }),
        magnitude_counts: Vec::new(),
    })
}

/// Writes the settings a merge ran with into `config` (normalisation,
/// rescaling, the seed of random methods, a whole-model density scope, Model
/// Stock's filter-wise choice, SLERP's `t`), so that the config reproduces
/// the merge without relying on defaults. Rescaling is written as mergekit's boolean
/// (`true` is L1) unless it is `inverse`.
pub fn pin_settings(config: &mut MergeConfig, s: &MethodSettings) -> Result<()> {
    let uses = |key: ParamKey| key.applies_to(s.kind);
    if uses(ParamKey::Normalize) {
        config.set_param(ParamKey::Normalize, ParamValue::Bool(s.normalize))?;
    }
    if uses(ParamKey::Rescale) {
        let rescale = match s.rescale {
            Rescale::L1 => ParamValue::Bool(true),
            Rescale::None => ParamValue::Bool(false),
            Rescale::Inverse => ParamValue::Text("inverse".into()),
        };
        config.set_param(ParamKey::Rescale, rescale)?;
    }
    if uses(ParamKey::Seed) {
        config.set_param(ParamKey::Seed, ParamValue::Number(s.seed as f64))?;
    }
    if s.density_scope == DensityScope::Model {
        config.set_param(ParamKey::DensityScope, ParamValue::Text("model".into()))?;
    }
    if uses(ParamKey::FilterWise) {
        config.set_param(ParamKey::FilterWise, ParamValue::Bool(s.filter_wise))?;
    }
    if uses(ParamKey::T) && config.global_param(ParamKey::T).is_none() {
        // mergekit requires `t`: the default is written out.
        config.set_param(ParamKey::T, ParamValue::Number(DEFAULT_T))?;
    }
    Ok(())
}
