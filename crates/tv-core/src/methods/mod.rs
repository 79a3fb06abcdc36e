//! Merge methods: what is done with a tensor's task vectors.
//!
//! A method is a [`Method`]: an optional pre-pass over one tensor's inputs
//! ([`Method::prepare`]: selection thresholds, norms, dot products, L1
//! sums), then a per-block combine of the base and the models' values into
//! the merged values, in f64. The streaming loop in [`crate::merge`] owns
//! segmenting, threads, interrupts, page release, rounding and writing; a
//! method only sees decoded [`Block`]s. Methods that trim or drop entries
//! share the sparsifiers of [`sparsify`]; [`gta`] holds the generalised task
//! arithmetic family (task_arithmetic, ties, dare, breadcrumbs, della,
//! magnitude_prune), [`linear`], [`model_stock`], [`slerp`] and [`magmax`]
//! the others. Names follow mergekit's so a config means the same in both.

pub(crate) mod fused;
pub(crate) mod gta;
pub(crate) mod inputs;
pub(crate) mod linear;
pub(crate) mod magmax;
pub(crate) mod model_stock;
pub(crate) mod operands;
pub(crate) mod rng;
pub(crate) mod select;
pub(crate) mod slerp;
pub(crate) mod sparsify;
pub(crate) mod window;

use crate::error::{Error, Result};
pub(crate) use inputs::{Block, TensorInputs};

/// The merge methods, by mergekit's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    TaskArithmetic,
    Linear,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    ModelStock,
    Slerp,
    Magmax,
}

/// How kept entries of a sparsified task vector are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    /// Divide each kept entry by its keep probability (DARE, DELLA).
    Inverse,
    /// Scale the kept entries so the tensor's L1 norm is what it was
    /// before dropping (mergekit's `rescale: true`).
    L1,
    None,
}

impl Rescale {
    /// Parses `inverse`, `l1` or `none`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inverse" => Some(Self::Inverse),
            "l1" => Some(Self::L1),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inverse => "inverse",
            Self::L1 => "l1",
            Self::None => "none",
        }
    }
}

/// Over what a density threshold is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DensityScope {
    /// Each tensor keeps its own fraction (mergekit's behaviour).
    Tensor,
    /// One threshold over each model's whole task vector.
    Model,
}

impl DensityScope {
    /// Parses `tensor` or `model`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tensor" => Some(Self::Tensor),
            "model" => Some(Self::Model),
            _ => None,
        }
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tensor => "tensor",
            Self::Model => "model",
        }
    }
}

/// How a method thins each task vector before combining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsification {
    /// Keep the k = max(1, ⌊ρn⌋) largest entries by magnitude.
    Magnitude,
    /// Keep each entry with probability ρ.
    Random,
    /// Drop the ⌊γn⌋ largest, then keep the next ⌊ρn⌋.
    MagnitudeOutliers,
    /// Keep with a probability that grows with the entry's rank in its row.
    DellaMagprune,
}

impl MethodKind {
    /// Every method, in the order the help lists them.
    pub const ALL: [MethodKind; 13] = [
        Self::TaskArithmetic,
        Self::Linear,
        Self::Ties,
        Self::DareLinear,
        Self::DareTies,
        Self::MagnitudePrune,
        Self::Breadcrumbs,
        Self::BreadcrumbsTies,
        Self::Della,
        Self::DellaLinear,
        Self::ModelStock,
        Self::Slerp,
        Self::Magmax,
    ];

    /// mergekit's name of the method.
    pub fn name(self) -> &'static str {
        match self {
            Self::TaskArithmetic => "task_arithmetic",
            Self::Linear => "linear",
            Self::Ties => "ties",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::MagnitudePrune => "magnitude_prune",
            Self::Breadcrumbs => "breadcrumbs",
            Self::BreadcrumbsTies => "breadcrumbs_ties",
            Self::Della => "della",
            Self::DellaLinear => "della_linear",
            Self::ModelStock => "model_stock",
            Self::Slerp => "slerp",
            Self::Magmax => "magmax",
        }
    }

    /// The method's formula in one line (for records and model cards).
    pub fn formula(self) -> &'static str {
        match self {
            Self::TaskArithmetic => "merged = base + lambda * sum_i w_i * (model_i - base)",
            Self::Linear => "merged = sum_i w_i * model_i / sum_i w_i",
            Self::Ties | Self::DareTies | Self::BreadcrumbsTies | Self::Della => {
                "merged = base + lambda * elect_sign(sum_i w_i * sparsify(model_i - base))"
            }
            Self::DareLinear | Self::MagnitudePrune | Self::Breadcrumbs | Self::DellaLinear => {
                "merged = base + lambda * sum_i w_i * sparsify(model_i - base)"
            }
            Self::ModelStock => {
                "merged = t * mean_i(model_i) + (1 - t) * base, t from the task vectors' angle"
            }
            Self::Slerp => "merged = slerp(base, model, t)",
            Self::Magmax => {
                "merged = base + lambda * (the model_i - base of largest magnitude, per element)"
            }
        }
    }

    /// Parses a method name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether the merged tensor is divided by the sum of the weights
    /// unless told otherwise (mergekit's defaults).
    pub fn normalizes_by_default(self) -> bool {
        matches!(self, Self::Linear | Self::Ties | Self::Della)
    }

    /// The rescaling used unless told otherwise.
    pub fn default_rescale(self) -> Rescale {
        match self.sparsification() {
            Some(Sparsification::Random | Sparsification::DellaMagprune) => Rescale::Inverse,
            _ => Rescale::None,
        }
    }

    /// Whether the method weighs the models (the others ignore weights).
    pub fn uses_weights(self) -> bool {
        !matches!(self, Self::ModelStock | Self::Slerp | Self::Magmax)
    }

    /// Whether the method needs the base model's tensors.
    pub fn needs_base(self) -> bool {
        !matches!(self, Self::Linear)
    }

    /// How the method thins task vectors, if it does.
    pub fn sparsification(self) -> Option<Sparsification> {
        match self {
            Self::Ties | Self::MagnitudePrune => Some(Sparsification::Magnitude),
            Self::DareLinear | Self::DareTies => Some(Sparsification::Random),
            Self::Breadcrumbs | Self::BreadcrumbsTies => Some(Sparsification::MagnitudeOutliers),
            Self::Della | Self::DellaLinear => Some(Sparsification::DellaMagprune),
            _ => None,
        }
    }

    /// Whether signs are elected per element (TIES' consensus).
    pub(crate) fn elects_sign(self) -> bool {
        matches!(
            self,
            Self::Ties | Self::DareTies | Self::BreadcrumbsTies | Self::Della
        )
    }

    /// Whether `--density-scope model` means something for this method.
    pub fn selects_by_magnitude(self) -> bool {
        matches!(
            self.sparsification(),
            Some(Sparsification::Magnitude | Sparsification::MagnitudeOutliers)
        )
    }
}

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The settings that hold for the whole merge.
#[derive(Debug, Clone, Copy)]
pub struct MethodSettings {
    pub kind: MethodKind,
    pub normalize: bool,
    pub rescale: Rescale,
    /// Seed of DARE's and DELLA's draws.
    pub seed: u64,
    pub density_scope: DensityScope,
    /// Model Stock: one interpolation factor per row instead of per tensor.
    pub filter_wise: bool,
}

impl MethodSettings {
    /// A method with its default settings.
    pub fn new(kind: MethodKind) -> Self {
        Self {
            kind,
            normalize: kind.normalizes_by_default(),
            rescale: kind.default_rescale(),
            seed: DEFAULT_SEED,
            density_scope: DensityScope::Tensor,
            filter_wise: false,
        }
    }

    /// Refuses combinations that mean nothing.
    pub fn check(&self) -> Result<()> {
        let kind = self.kind;
        if self.density_scope == DensityScope::Model && !kind.selects_by_magnitude() {
            return Err(Error::InvalidArgument(format!(
                "density scope `model` (--density-scope, or `density_scope` in a config) applies \
                 to ties, magnitude_prune and breadcrumbs, not {kind}"
            )));
        }
        if self.rescale == Rescale::Inverse
            && !matches!(
                kind.sparsification(),
                Some(Sparsification::Random | Sparsification::DellaMagprune)
            )
        {
            return Err(Error::InvalidArgument(format!(
                "rescale `inverse` (--rescale, or `rescale` in a config) applies to dare and della \
                 (entries kept with a probability), not {kind}; use l1 or none"
            )));
        }
        if self.rescale == Rescale::L1 && kind.sparsification().is_none() {
            return Err(Error::InvalidArgument(format!(
                "rescaling (--rescale, or `rescale` in a config) applies to methods that drop \
                 entries, not {kind}"
            )));
        }
        Ok(())
    }
}

/// The seed used when none is given (recorded with every merge).
pub const DEFAULT_SEED: u64 = 42;

/// The numbers a method uses for one tensor, per model of the family
/// (resolved from scalars, per-layer anchors or name filters).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorParams {
    pub weight: Vec<f64>,
    pub density: Vec<f64>,
    /// Breadcrumbs: fraction of the largest entries dropped.
    pub gamma: Vec<f64>,
    /// DELLA: half-width of the keep probabilities around the density.
    pub epsilon: Vec<f64>,
    /// λ, the scale of the merged task vector.
    pub scale: f64,
    /// SLERP's interpolation factor.
    pub t: f64,
}

/// Per-thread scratch of a combine step.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub a: Vec<f64>,
    pub c: Vec<f64>,
    pub total: Vec<f64>,
    pub divisor: Vec<f64>,
    pub draws: Vec<f64>,
    pub lanes: Vec<fused::ModelLane>,
    pub della: DellaScratch,
}

/// Per-row buffers of DELLA's ranking.
#[derive(Debug, Default)]
pub(crate) struct DellaScratch {
    pub order: Vec<(u64, u32)>,
    pub packed: Vec<u64>,
    pub probability: Vec<f64>,
}

/// A merge method: a pre-pass per tensor, then a per-block combine.
pub(crate) trait Method: Sync {
    /// What the pre-pass finds out about a tensor.
    type State: Sync;

    /// Whether every block handed to [`combine`](Self::combine) must hold
    /// whole rows.
    fn rows(&self) -> bool {
        false
    }

    /// Runs the pre-pass over `t` (reading it at most once more, or a few
    /// times for exact selections).
    fn prepare(&self, t: &TensorInputs<'_>, p: &TensorParams) -> Result<Self::State>;

    /// Writes the merged values of `block` into `out`.
    fn combine(
        &self,
        state: &Self::State,
        t: &TensorInputs<'_>,
        p: &TensorParams,
        block: &Block<'_>,
        scratch: &mut Scratch,
        out: &mut [f64],
    );

    /// [`combine`](Self::combine) reading the stored bf16 words, when the
    /// method has such a form for this block and the CPU runs it; false
    /// (nothing written) otherwise, and the block is decoded instead.
    #[inline(always)]
    fn combine_bf16(
        &self,
        _state: &Self::State,
        _t: &TensorInputs<'_>,
        _p: &TensorParams,
        _block: &operands::Bf16Block<'_>,
        _scratch: &mut Scratch,
        _out: &mut [f64],
    ) -> bool {
        false
    }
}

/// Where each tensor's [`TensorParams`] come from: one value per model for
/// every tensor, per-layer anchors, name filters, or per-group weights.
pub trait ParamSource: std::fmt::Debug + Send + Sync {
    /// The parameters of tensor `name`.
    fn tensor_params(&self, name: &str) -> Result<TensorParams>;
}

/// The same parameters for every tensor.
#[derive(Debug, Clone)]
pub struct Uniform(pub TensorParams);

impl ParamSource for Uniform {
    fn tensor_params(&self, _name: &str) -> Result<TensorParams> {
        Ok(self.0.clone())
    }
}

impl TensorParams {
    /// Weights `weights`, everything else at mergekit's defaults (density
    /// 1, gamma 0.01, epsilon 0.15, λ 1, t 0.5).
    pub fn with_weights(weights: Vec<f64>) -> Self {
        let k = weights.len();
        Self {
            weight: weights,
            density: vec![1.0; k],
            gamma: vec![0.01; k],
            epsilon: vec![0.15; k],
            scale: 1.0,
            t: 0.5,
        }
    }
}

/// What to merge and how: the method, its settings, and each tensor's
/// parameters.
#[derive(Debug)]
pub struct Recipe {
    pub settings: MethodSettings,
    /// Each model's weight as a whole, what the weight table prints; `None`
    /// where it varies by tensor (per-layer anchors, filters).
    pub weights: Vec<Option<f64>>,
    pub params: Box<dyn ParamSource>,
    /// Per model, its whole task vector's magnitudes counted by an analysis
    /// (`--from-analysis`), for a whole-model selection; empty without.
    pub magnitude_counts: Vec<Option<crate::magnitude::CoarseCounts>>,
}

impl Recipe {
    /// Task Arithmetic with these weights for every tensor.
    pub fn task_arithmetic(weights: Vec<f64>) -> Self {
        Self {
            settings: MethodSettings::new(MethodKind::TaskArithmetic),
            params: Box::new(Uniform(TensorParams::with_weights(weights.clone()))),
            weights: weights.into_iter().map(Some).collect(),
            magnitude_counts: Vec::new(),
        }
    }
}
