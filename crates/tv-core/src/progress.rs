//! Progress reporting without a terminal dependency.
//!
//! The library calls a [`Progress`] as it works; the binaries implement it
//! with progress bars. [`Silent`] ignores every call.

/// Receives progress of a long pass over tensor bytes.
pub trait Progress: Sync {
    /// A pass over `total` bytes begins.
    fn begin(&self, _total: u64) {}
    /// `bytes` more bytes were processed.
    fn advance(&self, _bytes: u64) {}
    /// The pass ended.
    fn finish(&self) {}
}

/// A [`Progress`] that reports nothing.
pub struct Silent;

impl Progress for Silent {}
