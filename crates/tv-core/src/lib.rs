//! `tv-core`: streaming task-vector arithmetic over safetensors checkpoints.
//!
//! The library behind `ta-merge` and `ta-analyze`. It finds and mmaps
//! checkpoints ([`locate`], [`checkpoint`], [`family`]), downloads models
//! named by Hugging Face id into the local cache ([`hub`]), converts element
//! types ([`dtype`]), runs fused kernels ([`kernels`], or candle on a GPU via
//! [`gpu`]), derives merge weights ([`weights`]), merges ([`merge`]) and
//! writes results atomically ([`writer`], [`staging`], [`sidecar`]). It
//! parses no arguments and prints nothing; progress goes through
//! [`progress::Progress`].

pub mod analyze;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod diagnostics;
pub mod dtype;
pub mod error;
pub mod family;
pub mod gpu;
pub mod guard;
pub mod html;
pub mod hub;
pub mod interrupt;
pub mod kernels;
pub mod lanes;
pub mod locate;
pub mod lora;
pub mod magnitude;
pub mod merge;
pub mod methods;
pub mod params;
pub mod pickle;
pub mod plot;
pub mod progress;
pub mod quantile;
pub mod recipe;
pub mod report;
pub mod sidecar;
mod simd;
pub mod spectral;
pub mod staging;
pub mod stats;
#[cfg(test)]
mod testdata;
pub mod testhooks;
pub mod verify;
pub mod vocab;
pub mod weights;
pub mod writer;

pub use candle_core;
pub use error::{Error, Result};

/// This library's version, recorded in outputs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
