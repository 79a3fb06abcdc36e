//! What the environment says about the Hugging Face Hub, read as the Python
//! `huggingface_hub` library reads it, so both agree on one cache and one
//! login: the cache folder (`HF_HUB_CACHE`, the older `HUGGINGFACE_HUB_CACHE`,
//! else `HF_HOME/hub`, with `HF_HOME` defaulting to
//! `$XDG_CACHE_HOME/huggingface` and then `~/.cache/huggingface`), the
//! endpoint (`HF_ENDPOINT`), the token (`HF_TOKEN`, the older
//! `HUGGING_FACE_HUB_TOKEN`, else the file `hf auth login` writes:
//! `HF_TOKEN_PATH`, default `HF_HOME/token`) and offline mode
//! (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to 1, ON, YES or TRUE).

use std::path::{Path, PathBuf};

/// The hub's address when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Hub settings taken from the environment. The token is kept out of
/// `Debug` output so it can never reach a message.
#[derive(Clone)]
pub struct HubSettings {
    /// The cache folder (`.../hub`).
    pub cache: PathBuf,
    /// The endpoint, without a trailing slash.
    pub endpoint: String,
    /// The access token, if one is configured.
    pub token: Option<String>,
    /// Where the token came from, for messages (`HF_TOKEN`, or a file).
    pub token_source: Option<String>,
    /// Whether the network is off limits (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("cache", &self.cache)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("token_source", &self.token_source)
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubSettings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Self {
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let (token, token_source) = match token_from_env() {
            Some((t, s)) => (Some(t), Some(s)),
            None => (None, None),
        };
        Self {
            cache: hub_cache_dir(),
            endpoint,
            token,
            token_source,
            offline: is_true(var("HF_HUB_OFFLINE").or_else(|| var("TRANSFORMERS_OFFLINE"))),
        }
    }
}

/// A non-empty environment variable.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `huggingface_hub`'s reading of a boolean variable.
fn is_true(value: Option<String>) -> bool {
    value.is_some_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_uppercase().as_str()))
}

/// `~` and `~/...` expanded to the home folder, as Python's `expanduser`.
fn expand_home(path: &str) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match path.strip_prefix('~') {
        Some("") => home().unwrap_or_else(|| PathBuf::from(path)),
        Some(rest) if rest.starts_with('/') => match home() {
            Some(h) => h.join(&rest[1..]),
            None => PathBuf::from(path),
        },
        _ => PathBuf::from(path),
    }
}

/// `HF_HOME`, as huggingface_hub chooses it.
pub fn hf_home() -> PathBuf {
    if let Some(home) = var("HF_HOME") {
        return expand_home(&home);
    }
    let cache = var("XDG_CACHE_HOME")
        .map(|x| expand_home(&x))
        .unwrap_or_else(|| expand_home("~/.cache"));
    cache.join("huggingface")
}

/// The hub cache folder, as huggingface_hub chooses it.
pub fn hub_cache_dir() -> PathBuf {
    match var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        Some(dir) => expand_home(&dir),
        None => hf_home().join("hub"),
    }
}

/// The token and where it came from: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`,
/// else the token file (`HF_TOKEN_PATH`, default `HF_HOME/token`).
fn token_from_env() -> Option<(String, String)> {
    for name in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(t) = var(name).and_then(|t| clean_token(&t)) {
            return Some((t, name.to_string()));
        }
    }
    let path = var("HF_TOKEN_PATH")
        .map(|p| expand_home(&p))
        .unwrap_or_else(|| hf_home().join("token"));
    let text = read_token_file(&path)?;
    clean_token(&text).map(|t| (t, path.display().to_string()))
}

/// A token file's text; anything but a small regular file is ignored.
fn read_token_file(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 64 << 10 {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// huggingface_hub's cleaning of a token: line breaks removed, spaces
/// trimmed; nothing left means no token.
fn clean_token(raw: &str) -> Option<String> {
    let t: String = raw.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_and_tokens_are_read_as_huggingface_hub_reads_them() {
        for yes in ["1", "on", "YES", "True"] {
            assert!(is_true(Some(yes.into())), "{yes}");
        }
        for no in ["0", "", "no", "false", "2"] {
            assert!(!is_true(Some(no.into())), "{no}");
        }
        assert!(!is_true(None));
        assert_eq!(clean_token(" hf_abc\r\n").as_deref(), Some("hf_abc"));
        assert_eq!(clean_token("\n \n"), None);
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let s = HubSettings {
            cache: PathBuf::from("/c"),
            endpoint: DEFAULT_ENDPOINT.into(),
            token: Some("hf_secret".into()),
            token_source: Some("HF_TOKEN".into()),
            offline: false,
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hf_secret") && shown.contains("<set>"),
            "{shown}"
        );
    }
}
