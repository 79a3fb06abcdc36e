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
    /// A model could not be downloaded from the Hugging Face Hub (network,
    /// access, or a file that failed verification).
    #[error("{0}")]
    Download(String),
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

/// `text` with every character that could break a line or drive a terminal
/// escaped: control characters (`\n`, `\r`, `\t`, ESC as `\u{1b}`, ...),
/// Unicode line and paragraph separators, and bidirectional overrides.
/// Names read from files (tensors, shards, models) go through this before
/// they reach a terminal, so a message stays one line and cannot move the
/// cursor or change colours.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    fn needs(c: char) -> bool {
        c.is_control()
            || matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{200e}' | '\u{200f}'
                    | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            )
    }
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("model.w"), "model.w");
        assert_eq!(escape_controls("ä ☃ 'q'"), "ä ☃ 'q'");
        assert_eq!(
            escape_controls("a\nb\x1b[31mc\r\t\u{7f}\u{9b}\u{202e}d"),
            "a\\nb\\u{1b}[31mc\\r\\t\\u{7f}\\u{9b}\\u{202e}d"
        );
        let escaped = escape_controls("x\u{2028}y\0");
        assert!(!escaped.chars().any(|c| c.is_control() || c == '\u{2028}'));
    }
}
