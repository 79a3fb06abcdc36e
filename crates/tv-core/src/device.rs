//! Where the arithmetic runs: the CPU, or a CUDA GPU through candle.
//!
//! `auto` picks CUDA device 0 when this build has CUDA (feature `cuda`) and
//! the device can be opened (driver and CUDA runtime present), else the
//! CPU, and in a CUDA build says which. An explicit `cuda` request that
//! cannot be met is an error, never a silent fallback.

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
    /// Resolves a request into a usable device, with a line for stderr
    /// saying what `auto` chose in a build that could have used a GPU.
    pub fn resolve(request: DeviceRequest) -> Result<(Self, Option<String>)> {
        match request {
            DeviceRequest::Cpu => Ok((Self::Cpu, None)),
            DeviceRequest::Auto if !cfg!(feature = "cuda") => Ok((Self::Cpu, None)),
            DeviceRequest::Auto => Ok(match Self::cuda(0) {
                Ok(device) => (device, Some("--device auto: using CUDA device 0".into())),
                Err(e) => (
                    Self::Cpu,
                    Some(format!("--device auto: using the CPU ({e})")),
                ),
            }),
            DeviceRequest::Cuda(n) => Ok((Self::cuda(n)?, None)),
        }
    }

    fn cuda(ordinal: usize) -> Result<Self> {
        if !cfg!(feature = "cuda") {
            return Err(Error::Device(format!(
                "--device cuda:{ordinal}: this build has no CUDA support; rebuild with \
                 `--features cuda`, or use --device cpu"
            )));
        }
        let failed = |why: String| {
            Error::Device(format!(
                "--device cuda:{ordinal}: no CUDA device could be opened ({why}); the driver and \
                 the CUDA runtime libraries must be installed"
            ))
        };
        // Without a driver, the CUDA bindings panic when they load it:
        // that becomes this error, without the panic's message.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal));
        std::panic::set_hook(hook);
        match opened {
            Ok(Ok(device)) => Ok(Self::Cuda(device)),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(panic) => Err(failed(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the CUDA library could not be loaded".into()),
            )),
        }
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
