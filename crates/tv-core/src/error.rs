//! The library's error type. Every variant names the file, tensor, model or
//! flag at fault, so the binaries can print it as one line that tells the
//! user what to fix. Messages are lowercase and quote the bad input.

use std::path::{Path, PathBuf};

/// Errors returned by `tv-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named file failed (the cause follows in the
    /// error chain).
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint path or id could not be turned into weight files.
    #[error("{0}")]
    NotFound(String),
    /// A safetensors file is malformed.
    #[error("{}: {detail}", path.display())]
    BadFile { path: PathBuf, detail: String },
    /// Inputs that cannot be merged or analysed together.
    #[error("{0}")]
    Incompatible(String),
    /// A command-line value or option combination is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The requested device is not available in this build or on this machine.
    #[error("{0}")]
    Device(String),
    /// The run was interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
}

/// Result alias used throughout `tv-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done and to which file.
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A malformed-file error for `path`.
    pub fn bad_file(path: &Path, detail: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}
