//! Statistics of task vectors: streaming moments, per-tensor rows, and the
//! grouping of tensors into layers and module kinds.
//!
//! Moments are accumulated per cache-sized block around the block's own mean
//! and combined with the pairwise formulas of Chan and Pébay, which stay
//! exact-ish in f64 even when the mean is large against the spread.

use crate::lanes;
use serde::Serialize;

/// Count, mean and central moment sums (Σ(x−mean)^k, k = 2..4).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
    pub m3: f64,
    pub m4: f64,
}

impl Moments {
    /// Moments of one block.
    #[inline(always)]
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let n = values.len() as f64;
        let mean = lanes::sum(values) / n;
        let (m2, m3, m4) = lanes::central_moments(values, mean);
        Self {
            n,
            mean,
            m2,
            m3,
            m4,
        }
    }

    /// Moments of `n` values from their power sums Σ(x − shift)^k, k = 1..4.
    /// Accurate when `shift` is near the mean (within a few deviations).
    #[inline(always)]
    pub fn from_power_sums(n: usize, shift: f64, p: [f64; 4]) -> Self {
        if n == 0 {
            return Self::default();
        }
        let nf = n as f64;
        let m = p[0] / nf;
        let m2 = non_negative(p[1] - p[0] * m);
        let m3 = p[2] - 3.0 * m * p[1] + 2.0 * nf * m * m * m;
        let m4 = p[3] - 4.0 * m * p[2] + 6.0 * m * m * p[1] - 3.0 * nf * m * m * m * m;
        Self {
            n: nf,
            mean: shift + m,
            m2,
            m3,
            m4: non_negative(m4),
        }
    }

    /// Combines two disjoint sets' moments.
    #[inline(always)]
    pub fn combine(self, b: Self) -> Self {
        let a = self;
        if a.n == 0.0 {
            return b;
        }
        if b.n == 0.0 {
            return a;
        }
        let n = a.n + b.n;
        let delta = b.mean - a.mean;
        let d2 = delta * delta;
        let (na, nb) = (a.n, b.n);
        let mean = a.mean + delta * nb / n;
        let m2 = a.m2 + b.m2 + d2 * na * nb / n;
        let m3 = a.m3
            + b.m3
            + d2 * delta * na * nb * (na - nb) / (n * n)
            + 3.0 * delta * (na * b.m2 - nb * a.m2) / n;
        let m4 = a.m4
            + b.m4
            + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / (n * n * n)
            + 6.0 * d2 * (na * na * b.m2 + nb * nb * a.m2) / (n * n)
            + 4.0 * delta * (na * b.m3 - nb * a.m3) / n;
        Self {
            n,
            mean,
            m2,
            m3,
            m4,
        }
    }

    /// Sample standard deviation (n − 1); 0 for fewer than two values.
    pub fn std(&self) -> f64 {
        if self.n < 2.0 {
            0.0
        } else {
            non_negative(self.m2 / (self.n - 1.0)).sqrt()
        }
    }

    /// mean(((x − mean)/(std + 1e-12))^3), 0 when std is 0.
    pub fn skew(&self) -> f64 {
        let s = self.std();
        if s == 0.0 {
            0.0
        } else {
            self.m3 / self.n / (s + 1e-12).powi(3)
        }
    }

    /// mean(((x − mean)/(std + 1e-12))^4) − 3, 0 when std is 0.
    pub fn kurtosis_excess(&self) -> f64 {
        let s = self.std();
        if s == 0.0 {
            0.0
        } else {
            self.m4 / self.n / (s + 1e-12).powi(4) - 3.0
        }
    }
}

/// `x`, or 0 when rounding made it negative; NaN stays NaN (so a tensor
/// holding NaN reports a NaN deviation, as its mean is NaN), where
/// `f64::max` would turn it into 0.
fn non_negative(x: f64) -> f64 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// One row of `per_param_stats.csv`.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    pub param: String,
    pub shape: Vec<usize>,
    pub l2: f64,
    pub l1: f64,
    pub maxabs: f64,
    pub mean: f64,
    pub std: f64,
    pub skew: f64,
    pub kurtosis_excess: f64,
    pub quantiles: [f64; 11],
    pub numel: u64,
    /// Elements whose delta is NaN or infinite.
    pub nonfinite: u64,
    /// Elements the fine-tune left unchanged (delta exactly 0).
    pub unchanged: u64,
    /// Σ d², kept exact for global sums.
    #[serde(skip)]
    pub sum_sq: f64,
}

/// The layer group of a tensor, as the original tool meant it: `embed`,
/// `lm_head`, `layer_N`, or `other`.
pub fn group_of(name: &str) -> String {
    if name.contains("lm_head") {
        return "lm_head".into();
    }
    if name.contains("embed") || name.contains("wte") || name.contains("wpe") {
        return "embed".into();
    }
    let parts: Vec<&str> = name.split('.').collect();
    for w in parts.windows(2) {
        if matches!(w[0], "layers" | "layer" | "h" | "blocks" | "block") {
            if let Ok(n) = w[1].parse::<usize>() {
                return format!("layer_{n}");
            }
        }
    }
    "other".into()
}

/// The kind of module a tensor belongs to across layers: `attention`,
/// `mlp`, `norm`, `embed`, `lm_head` or `other`.
pub fn module_of(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| lower.contains(k));
    if has(&["lm_head"]) {
        "lm_head"
    } else if has(&["embed", "wte", "wpe"]) {
        "embed"
    } else if has(&["norm", "ln_", ".ln"]) {
        "norm"
    } else if has(&[
        "attn",
        "attention",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "query",
        "key",
        "value",
    ]) {
        "attention"
    } else if has(&[
        "mlp",
        "feed_forward",
        "ffn",
        "gate_proj",
        "up_proj",
        "down_proj",
        "fc1",
        "fc2",
        "experts",
    ]) {
        "mlp"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_moments_equal_direct_ones() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| 1e3 + ((i * 37) % 101) as f64 * 0.01)
            .collect();
        let direct = Moments::of(&xs);
        let combined = xs
            .chunks(77)
            .map(Moments::of)
            .fold(Moments::default(), Moments::combine);
        for (a, b) in [
            (direct.mean, combined.mean),
            (direct.m2, combined.m2),
            (direct.m4, combined.m4),
        ] {
            assert!((a - b).abs() <= 1e-9 * a.abs().max(1e-12), "{a} vs {b}");
        }
        assert!((direct.m3 - combined.m3).abs() <= 1e-6 * direct.m2.powf(1.5));
    }

    #[test]
    fn a_nan_value_makes_every_moment_nan_not_zero() {
        let xs = [0.5, f64::NAN, 2.0, -1.0];
        let power_sums = [
            xs.iter().sum::<f64>(),
            xs.iter().map(|x| x * x).sum(),
            xs.iter().map(|x| x * x * x).sum(),
            xs.iter().map(|x| x * x * x * x).sum(),
        ];
        for m in [
            Moments::of(&xs),
            Moments::from_power_sums(4, 0.0, power_sums),
            Moments::of(&xs[..2]).combine(Moments::of(&xs[2..])),
        ] {
            assert!(m.mean.is_nan(), "{m:?}");
            assert!(m.std().is_nan(), "{m:?}");
            assert!(m.skew().is_nan() && m.kurtosis_excess().is_nan(), "{m:?}");
        }
        // Rounding below zero still gives 0.
        let below_two = f64::from_bits(2f64.to_bits() - 1);
        assert_eq!(
            Moments::from_power_sums(2, 0.0, [2.0, below_two, 0.0, 0.0]).std(),
            0.0
        );
    }

    #[test]
    fn moments_from_shifted_power_sums_equal_direct_ones() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| 3.0 + ((i * 37) % 101) as f64 * 0.01)
            .collect();
        let direct = Moments::of(&xs);
        let shift = 3.4;
        let mut p = [0.0; 4];
        for x in &xs {
            for (k, pk) in p.iter_mut().enumerate() {
                *pk += (x - shift).powi(k as i32 + 1);
            }
        }
        let from = Moments::from_power_sums(xs.len(), shift, p);
        for (a, b) in [
            (direct.mean, from.mean),
            (direct.m2, from.m2),
            (direct.m3, from.m3),
            (direct.m4, from.m4),
        ] {
            assert!(
                (a - b).abs() <= 1e-9 * direct.m2.sqrt().powi(4).max(a.abs()),
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn groups_and_modules() {
        assert_eq!(group_of("model.layers.12.mlp.up_proj.weight"), "layer_12");
        assert_eq!(group_of("model.embed_tokens.weight"), "embed");
        assert_eq!(group_of("lm_head.weight"), "lm_head");
        assert_eq!(group_of("model.norm.weight"), "other");
        assert_eq!(
            module_of("model.layers.0.self_attn.q_proj.weight"),
            "attention"
        );
        assert_eq!(module_of("model.layers.0.mlp.down_proj.weight"), "mlp");
        assert_eq!(module_of("model.layers.0.input_layernorm.weight"), "norm");
        assert_eq!(module_of("model.norm.weight"), "norm");
    }
}
