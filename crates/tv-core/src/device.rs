//! Where the arithmetic runs: the CPU, or a CUDA GPU through candle.
//!
//! `auto` picks CUDA when this build has it (feature `cuda`) and a GPU is
//! present, else the CPU. An explicit `cuda` request on a build without CUDA
//! is an error, never a silent fallback.

use crate::error::{Error, Result};

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceRequest {
    /// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "--device '{s}' is not one of auto, cpu, cuda, cuda:N"
            ))
        };
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }
}

/// The device that will run the arithmetic.
#[derive(Debug, Clone)]
pub enum Device {
    /// Fused CPU kernels on rayon's thread pool.
    Cpu,
    /// A CUDA GPU, through candle.
    Cuda(candle_core::Device),
}

impl Device {
    /// Resolves a request into a usable device.
    pub fn resolve(request: DeviceRequest) -> Result<Self> {
        match request {
            DeviceRequest::Cpu => Ok(Self::Cpu),
            DeviceRequest::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    Self::cuda(0)
                } else {
                    Ok(Self::Cpu)
                }
            }
            DeviceRequest::Cuda(n) => Self::cuda(n),
        }
    }

    fn cuda(ordinal: usize) -> Result<Self> {
        if !cfg!(feature = "cuda") {
            return Err(Error::Device(format!(
                "--device cuda:{ordinal}: this build has no CUDA support; rebuild with \
                 `--features cuda`, or use --device cpu"
            )));
        }
        candle_core::Device::new_cuda(ordinal)
            .map(Self::Cuda)
            .map_err(|e| Error::Device(format!("--device cuda:{ordinal}: {e}")))
    }

    /// The candle device of this choice (adapters' products run there).
    pub fn candle(&self) -> candle_core::Device {
        match self {
            Self::Cpu => candle_core::Device::Cpu,
            Self::Cuda(d) => d.clone(),
        }
    }

    /// A short name for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Self::Cuda(d) => format!("{d:?}"),
        }
    }
}
