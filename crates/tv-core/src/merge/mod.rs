//! The streaming merge: [`plan`] decides what every output tensor is,
//! [`run`] produces them in one pass over the inputs.

mod plan;
mod rows;
mod run;

pub use plan::{human_bytes, parse_size, Action, MergeOptions, MergePlan, PlannedTensor, RowMerge};
