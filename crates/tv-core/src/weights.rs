//! Merge weights (λ) from the task vectors' global L2 norms.
//!
//! Three modes, each normalised so the weights sum to 1, computed in f64:
//!
//! - linear: w = 1 / L
//! - power:  w = 1 / L^alpha
//! - exp:    w = exp(-beta * L / mean(L))
//!
//! Inputs that would make the original tool divide by zero or produce NaN
//! are refused with an error that names the model and the mode that works.

use crate::error::{Error, Result};
use serde::Serialize;

/// How norms become weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Linear,
    Power,
    Exp,
}

impl Mode {
    /// Every mode, in the order reports list them.
    pub const ALL: [Mode; 3] = [Mode::Linear, Mode::Power, Mode::Exp];

    /// Parses `linear`, `power` or `exp`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "linear" => Some(Self::Linear),
            "power" => Some(Self::Power),
            "exp" => Some(Self::Exp),
            _ => None,
        }
    }

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Power => "power",
            Self::Exp => "exp",
        }
    }
}

/// Over what the norms that weights come from are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One weight per model, from its global L2 norm.
    Model,
    /// One weight per model and layer group (`embed`, `layer_N`, `lm_head`,
    /// `other`), from the group's L2 norm.
    Group,
    /// One weight per model and tensor, from the tensor's L2 norm.
    Tensor,
}

impl Granularity {
    /// Parses `model`, `group` or `tensor`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "model" => Some(Self::Model),
            "group" => Some(Self::Group),
            "tensor" => Some(Self::Tensor),
            _ => None,
        }
    }
}

/// Parameters of the weighting modes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WeightParams {
    pub mode: Mode,
    /// Exponent of power mode.
    pub alpha: f64,
    /// Temperature of exp mode.
    pub beta: f64,
}

impl Default for WeightParams {
    fn default() -> Self {
        Self {
            mode: Mode::Exp,
            alpha: 1.5,
            beta: 1.0,
        }
    }
}

/// Computes normalised weights from L2 norms. `names` label the models in
/// error messages and must be as long as `norms`; the messages do not say
/// where the norms came from (a flag, an analysis): the caller does.
pub fn lambdas_from_norms(
    names: &[String],
    norms: &[f64],
    params: WeightParams,
) -> Result<Vec<f64>> {
    if names.len() != norms.len() {
        return Err(Error::InvalidArgument(format!(
            "got {} norms for {} models; give one norm per model, in the same order",
            norms.len(),
            names.len()
        )));
    }
    if names.is_empty() {
        return Err(Error::InvalidArgument("no models to weight".into()));
    }
    for (name, &l) in names.iter().zip(norms) {
        if !l.is_finite() || l < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "norm {l} for model '{name}' is not a finite non-negative number"
            )));
        }
    }
    if !params.alpha.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "--alpha {} is not finite",
            params.alpha
        )));
    }
    if !params.beta.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "--beta {} is not finite",
            params.beta
        )));
    }

    let raw: Vec<f64> = match params.mode {
        Mode::Linear | Mode::Power => {
            if let Some((name, _)) = names.iter().zip(norms).find(|(_, &l)| l == 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "model '{name}' has norm 0 (it equals the base), and {} mode \
                     divides by the norm; use --mode exp, or leave the model out",
                    params.mode.name()
                )));
            }
            let exponent = if params.mode == Mode::Linear {
                1.0
            } else {
                params.alpha
            };
            norms.iter().map(|&l| l.powf(-exponent)).collect()
        }
        Mode::Exp => {
            let mean = norms.iter().sum::<f64>() / norms.len() as f64;
            if mean == 0.0 {
                return Err(Error::InvalidArgument(
                    "every norm is 0, so every model equals the base and exp mode \
                     has no scale; there is nothing to merge"
                        .into(),
                ));
            }
            norms
                .iter()
                .map(|&l| (-params.beta * l / mean).exp())
                .collect()
        }
    };
    let total: f64 = raw.iter().sum();
    if !total.is_finite() || total <= 0.0 || raw.iter().any(|w| !w.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "{} mode with these norms gives weights that are not finite numbers \
             (alpha {}, beta {}); use smaller parameters or --mode exp",
            params.mode.name(),
            params.alpha,
            params.beta
        )));
    }
    Ok(raw.iter().map(|w| w / total).collect())
}

/// Checks weights given directly (`--lambdas`): one finite number per model.
pub fn check_explicit(names: &[String], lambdas: &[f64]) -> Result<()> {
    if names.len() != lambdas.len() {
        return Err(Error::InvalidArgument(format!(
            "--lambdas: got {} weights for {} models; give one weight per model, in the same order",
            lambdas.len(),
            names.len()
        )));
    }
    if let Some((name, l)) = names.iter().zip(lambdas).find(|(_, l)| !l.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "--lambdas: weight {l} for model '{name}' is not a finite number"
        )));
    }
    Ok(())
}

/// The table the original tool printed: name, L2 and λ per model.
/// (`None` weights vary by tensor.)
pub fn format_table(names: &[String], norms: Option<&[f64]>, lambdas: &[Option<f64>]) -> String {
    let width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max(31);
    let mut out = String::new();
    for (i, (name, lambda)) in names.iter().zip(lambdas).enumerate() {
        let l2 = match norms {
            Some(n) => format!("L2={:<8.4}", n[i]),
            None => format!("L2={:<8}", "n/a"),
        };
        match lambda {
            Some(lambda) => out.push_str(&format!("{name:<width$} {l2}  λ={lambda:.6}\n")),
            None => out.push_str(&format!("{name:<width$} {l2}  λ varies by tensor\n")),
        }
    }
    out
}

/// Weights per tensor from per-tensor norms: `norms[t][i]` is model `i`'s
/// norm for tensor `t`, `None` where the model does not store it (its
/// weight is then 0 and the others are normalised among themselves).
/// `what[t]` names the tensor or group in errors.
pub fn lambdas_per_tensor(
    names: &[String],
    norms: &[Vec<Option<f64>>],
    what: &[String],
    params: WeightParams,
) -> Result<Vec<Vec<f64>>> {
    norms
        .iter()
        .zip(what)
        .map(|(row, what)| {
            let present: Vec<usize> = (0..row.len()).filter(|&i| row[i].is_some()).collect();
            let mut weights = vec![0.0; row.len()];
            if present.is_empty() {
                return Ok(weights);
            }
            let sub_names: Vec<String> = present.iter().map(|&i| names[i].clone()).collect();
            let sub_norms: Vec<f64> = present.iter().map(|&i| row[i].expect("present")).collect();
            let sub = lambdas_from_norms(&sub_names, &sub_norms, params)
                .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
            for (&i, w) in present.iter().zip(sub) {
                weights[i] = w;
            }
            Ok(weights)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn linear_and_power_follow_their_formulas() {
        let norms = [1.0, 2.0, 4.0];
        let lin = lambdas_from_norms(
            &names(3),
            &norms,
            WeightParams {
                mode: Mode::Linear,
                ..Default::default()
            },
        )
        .unwrap();
        let expect = [1.0 / 1.75, 0.5 / 1.75, 0.25 / 1.75];
        for (a, b) in lin.iter().zip(expect) {
            assert!((a - b).abs() < 1e-15);
        }
        let pow = lambdas_from_norms(
            &names(3),
            &norms,
            WeightParams {
                mode: Mode::Power,
                alpha: 2.0,
                beta: 1.0,
            },
        )
        .unwrap();
        let total = 1.0 + 0.25 + 0.0625;
        for (a, b) in pow.iter().zip([1.0 / total, 0.25 / total, 0.0625 / total]) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn zero_norm_is_refused_where_it_would_divide_by_zero() {
        let p = WeightParams {
            mode: Mode::Linear,
            ..Default::default()
        };
        let err = lambdas_from_norms(&names(2), &[0.0, 1.0], p).unwrap_err();
        assert!(err.to_string().contains("'m0'") && err.to_string().contains("--mode exp"));
        let p = WeightParams {
            mode: Mode::Exp,
            ..Default::default()
        };
        assert!(lambdas_from_norms(&names(2), &[0.0, 0.0], p).is_err());
        assert!(lambdas_from_norms(&names(2), &[0.0, 1.0], p).is_ok());
    }
}
