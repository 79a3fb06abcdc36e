//! Merge settings suggested from the diagnostics, each by one documented
//! rule with the numbers that decided it (README: "Suggestions").
//!
//! - density: the smallest of [`DENSITIES`] at which every non-zero task
//!   vector keeps at least [`ENERGY_TARGET`] of its energy with per-tensor
//!   trimming; 1 (no trimming) if none does or no task vector is non-zero.
//! - method: `task_arithmetic` for one model; else `ties` when the mean
//!   weighted sign conflict over pairs of non-zero task vectors is at least
//!   [`CONFLICT_TIES`] (their deltas cancel where signs differ, which
//!   election avoids), else `task_arithmetic`.
//! - mode: `exp` when some task vector is zero (linear and power divide by
//!   the norm) or when the largest norm is at least [`NORM_SPREAD`] times
//!   the smallest (inverse-norm weights would let the smallest dominate;
//!   exp's stay within a factor e^{-β L/mean}); else `linear`.

use super::{Diagnostics, DENSITIES};
use serde_json::{json, Value};

/// Fraction of energy the suggested density keeps in every model.
pub const ENERGY_TARGET: f64 = 0.9;
/// Mean weighted sign conflict from which `ties` is suggested.
pub const CONFLICT_TIES: f64 = 0.3;
/// Ratio of largest to smallest norm from which `exp` is suggested.
pub const NORM_SPREAD: f64 = 10.0;

/// One suggested setting: its value, the rule, the numbers behind it and
/// a sentence saying why.
#[derive(Debug, Clone, Default)]
pub struct Suggestion {
    pub value: Value,
    pub rule: String,
    pub numbers: Value,
    pub reason: String,
}

/// The suggested method, density and weighting mode, and the flags that
/// give them to `ta-merge` (empty, with the method's reason saying why,
/// where no merge makes sense).
#[derive(Debug, Clone, Default)]
pub struct Suggestions {
    pub method: Suggestion,
    pub density: Suggestion,
    pub mode: Suggestion,
    pub flags: String,
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// The suggestions from `d` and the global L2 `norms` of models `names`.
pub(crate) fn suggest(d: &Diagnostics, names: &[String], norms: &[f64]) -> Suggestions {
    let k = norms.len();
    let live: Vec<usize> = (0..k).filter(|&i| norms[i] > 0.0).collect();

    // Density.
    let chosen = DENSITIES.iter().enumerate().find(|&(r, _)| {
        live.iter()
            .all(|&i| d.trim_energy[i].tensor[r].is_some_and(|f| f >= ENERGY_TARGET))
    });
    let (rho, r) = match chosen {
        Some((r, &rho)) if !live.is_empty() => (rho, Some(r)),
        _ => (1.0, None),
    };
    let kept: Vec<Option<f64>> = live
        .iter()
        .map(|&i| r.and_then(|r| d.trim_energy[i].tensor[r]))
        .collect();
    let least = kept.iter().flatten().copied().fold(f64::INFINITY, f64::min);
    let density = Suggestion {
        value: json!(rho),
        rule: format!(
            "smallest density at which every non-zero task vector keeps at least {} of its energy (per-tensor trim); 1 if none",
            pct(ENERGY_TARGET)
        ),
        numbers: json!({"kept_energy": live.iter().zip(&kept).map(|(&i, f)| (names[i].clone(), json!(f))).collect::<serde_json::Map<_, _>>()}),
        reason: match r {
            Some(_) if least.is_finite() => format!(
                "density {rho}: keeps at least {} of each task vector's energy",
                pct(least)
            ),
            Some(_) => format!("density {rho}"),
            None if live.is_empty() => "no trimming: no task vector is non-zero".into(),
            None => format!(
                "no trimming: even density {} keeps under {} of some task vector's energy",
                DENSITIES[DENSITIES.len() - 1],
                pct(ENERGY_TARGET)
            ),
        },
    };

    // Method.
    let pairs: Vec<f64> = live
        .iter()
        .flat_map(|&i| live.iter().filter(move |&&j| j > i).map(move |&j| (i, j)))
        .map(|(i, j)| d.sign_conflict_weighted[i][j])
        .collect();
    let conflict = (!pairs.is_empty()).then(|| pairs.iter().sum::<f64>() / pairs.len() as f64);
    let ties = conflict.is_some_and(|c| c >= CONFLICT_TIES);
    let agreement = r.and_then(|r| d.ties_agreement[r]);
    let method = Suggestion {
        value: json!(if ties { "ties" } else { "task_arithmetic" }),
        rule: format!(
            "ties when the mean weighted sign conflict over pairs of non-zero task vectors is at least {CONFLICT_TIES}, else task_arithmetic"
        ),
        numbers: json!({"mean_weighted_sign_conflict": conflict, "ties_agreement_at_density": agreement}),
        reason: match conflict {
            None => "task_arithmetic: fewer than two non-zero task vectors, nothing interferes".into(),
            Some(c) if ties => format!(
                "ties, density {rho}: weighted sign conflict {c:.2}{}",
                agreement.map_or(String::new(), |a| format!(
                    "; election keeps {} of the trimmed mass weighted as --mode exp weighs it",
                    pct(a)
                ))
            ),
            Some(c) => format!(
                "task_arithmetic: weighted sign conflict {c:.2} is below {CONFLICT_TIES}, the deltas mostly agree"
            ),
        },
    };

    // Weighting mode.
    let (lo, hi) = norms.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &n| {
        (lo.min(n), hi.max(n))
    });
    let spread = if lo > 0.0 { hi / lo } else { f64::INFINITY };
    let exp = lo == 0.0 || spread >= NORM_SPREAD;
    let mode = Suggestion {
        value: json!(if exp { "exp" } else { "linear" }),
        rule: format!(
            "exp when a task vector is zero or the largest norm is at least {NORM_SPREAD} times the smallest, else linear"
        ),
        numbers: json!({"smallest_norm": lo, "largest_norm": hi, "ratio": spread.is_finite().then_some(spread)}),
        reason: if lo == 0.0 {
            "exp: a task vector is zero, and linear and power modes divide by the norm".into()
        } else if exp {
            format!("exp: norms span a factor {spread:.1}, inverse-norm weights would let the smallest dominate")
        } else {
            format!("linear: norms within a factor {spread:.1}, inverse norms balance the models")
        },
    };
    // No flags where ta-merge would refuse any weighting: nothing changed,
    // or a norm that is not finite.
    let mut method = method;
    let nonfinite = norms.iter().position(|n| !n.is_finite());
    let flags = if let Some(i) = nonfinite {
        method.reason = format!(
            "no merge: model '{}' has non-finite deltas (its norm is {})",
            names[i], norms[i]
        );
        String::new()
    } else if live.is_empty() {
        method.reason = "no merge: every task vector is zero, nothing to merge".into();
        String::new()
    } else {
        let mut flags = format!("--method {}", method.value.as_str().unwrap_or_default());
        if ties && rho < 1.0 {
            flags += &format!(" --density {rho}");
        }
        flags + &format!(" --mode {}", mode.value.as_str().unwrap_or_default())
    };
    Suggestions {
        method,
        density,
        mode,
        flags,
    }
}
