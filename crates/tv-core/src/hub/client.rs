//! The two hub endpoints a download needs, over a small blocking HTTP
//! client (`ureq`), as `huggingface_hub` calls them:
//!
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true`: the
//!   commit a revision resolves to and every file with its size and
//!   checksum (`blobId`, the git sha1, and for LFS files `lfs.sha256`);
//! - `GET {endpoint}/{repo}/resolve/{commit}/{file}`: the file, often
//!   through a redirect to a CDN, with `Range: bytes=N-` to resume.
//!
//! Redirects are followed here (at most ten) so the token is sent only to
//! the endpoint's own origin, never to the storage a redirect leads to.
//! Failures become a [`HubError`] from the status and the hub's
//! `X-Error-Code` header; [`super::describe`] turns them into messages.

use super::settings::HubSettings;
use std::io::Read;
use std::time::Duration;

/// One file of a revision as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path relative to the repository root.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The blob's name in the cache: the sha256 of an LFS file, else the
    /// git blob sha1 (what the hub's `ETag` headers carry).
    pub etag: String,
    /// Whether `etag` is an LFS sha256 (else a git blob sha1).
    pub lfs: bool,
}

/// A revision as the hub lists it.
#[derive(Debug, Clone)]
pub struct RepoInfo {
    /// The commit hash the revision resolves to.
    pub commit: String,
    /// Its files; `None` size or checksum entries are left out (and
    /// reported when selected).
    pub files: Vec<ListedFile>,
    /// Whether the hub says the model is gated.
    pub gated: bool,
}

/// A listed file: its name, and its metadata when the listing had it.
#[derive(Debug, Clone)]
pub struct ListedFile {
    pub name: String,
    pub meta: Option<RemoteFile>,
}

/// Why a request failed.
#[derive(Debug)]
pub enum HubError {
    /// 401/404 with `RepoNotFound` (the hub answers 401 for private and
    /// missing repositories alike when no token is sent).
    RepoNotFound,
    /// `GatedRepo`: the model needs accepted conditions and a token.
    Gated,
    /// `RevisionNotFound`.
    RevisionNotFound,
    /// `EntryNotFound`: a listed file is not there.
    EntryNotFound(String),
    /// 401 with "Invalid credentials": the token was refused.
    BadToken,
    /// No connection, a timeout, a broken transfer: the cause.
    Unreachable(String),
    /// Any other answer: status and the hub's message.
    Http(u16, String),
    /// An answer that is not what the protocol says.
    Protocol(String),
}

/// A file transfer under way: the body, from `offset`.
pub struct Transfer {
    pub reader: Box<dyn Read + Send>,
    /// Where the body starts in the file: the requested offset when the
    /// server honoured the range (206), else 0.
    pub offset: u64,
    /// The commit the hub says it served (`X-Repo-Commit`), if it said.
    pub commit: Option<String>,
}

/// A hub client for one endpoint and token.
pub struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

impl Client {
    /// A client for `settings`' endpoint and token. Proxies come from the
    /// usual `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` variables.
    pub fn new(settings: &HubSettings) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(format!("tv-toolkit/{}", crate::VERSION))
            .build()
            .into();
        Self {
            agent,
            endpoint: settings.endpoint.clone(),
            token: settings.token.clone(),
        }
    }

    /// The revision's commit and file listing.
    pub fn repo_info(&self, repo: &str, revision: &str) -> Result<RepoInfo, HubError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.endpoint,
            encode(revision, false)
        );
        let response = self.get(&url, None)?;
        let (_, body) = response.into_parts();
        let text = body
            .into_with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| HubError::Unreachable(cause(&e)))?;
        parse_info(&text)
    }

    /// Opens `file` of `repo` at `commit` from byte `offset` on.
    pub fn open_file(
        &self,
        repo: &str,
        commit: &str,
        file: &str,
        offset: u64,
    ) -> Result<Transfer, HubError> {
        let url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            encode(file, true)
        );
        let response = self.get(&url, (offset > 0).then_some(offset))?;
        let status = response.status().as_u16();
        let commit = header(&response, "x-repo-commit");
        let start = if status == 206 {
            // "bytes N-M/T": the body must start where it was asked to.
            let range = header(&response, "content-range").unwrap_or_default();
            let first = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.trim().parse::<u64>().ok());
            if first != Some(offset) {
                return Err(HubError::Protocol(format!(
                    "asked for bytes from {offset} of {file}, got range '{range}'"
                )));
            }
            offset
        } else {
            0
        };
        let (_, body) = response.into_parts();
        let reader = body.into_with_config().limit(u64::MAX).reader();
        Ok(Transfer {
            reader: Box::new(reader),
            offset: start,
            commit,
        })
    }

    /// GETs `url` with the token (on the endpoint's origin only) and an
    /// optional range, following redirects; any status but 200 and 206 is
    /// an error.
    fn get(
        &self,
        url: &str,
        from: Option<u64>,
    ) -> Result<ureq::http::Response<ureq::Body>, HubError> {
        let home = origin(&self.endpoint);
        let mut url = url.to_string();
        for _ in 0..=10 {
            let mut request = self.agent.get(&url).header("Accept-Encoding", "identity");
            if let (Some(token), true) = (&self.token, origin(&url) == home) {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            if let Some(n) = from {
                request = request.header("Range", format!("bytes={n}-"));
            }
            let response = request
                .call()
                .map_err(|e| HubError::Unreachable(cause(&e)))?;
            let status = response.status().as_u16();
            match status {
                200 | 206 => return Ok(response),
                301 | 302 | 303 | 307 | 308 => {
                    let location = header(&response, "location").ok_or_else(|| {
                        HubError::Protocol(format!("a {status} redirect without a Location"))
                    })?;
                    url = join(&url, &location);
                }
                416 if from.is_some() => {
                    // The partial file is not a prefix of this one: start over.
                    return self.get(&url, None);
                }
                _ => return Err(classify(&response)),
            }
        }
        Err(HubError::Protocol("more than 10 redirects".into()))
    }
}

/// A header's value as text.
fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The error an unsuccessful answer stands for.
fn classify(response: &ureq::http::Response<ureq::Body>) -> HubError {
    let status = response.status().as_u16();
    let code = header(response, "x-error-code").unwrap_or_default();
    let message = header(response, "x-error-message").unwrap_or_default();
    match code.as_str() {
        "RepoNotFound" => HubError::RepoNotFound,
        "GatedRepo" => HubError::Gated,
        "RevisionNotFound" => HubError::RevisionNotFound,
        "EntryNotFound" => HubError::EntryNotFound(message),
        _ if status == 401 && message == "Invalid credentials in Authorization header" => {
            HubError::BadToken
        }
        _ if status == 401 => HubError::RepoNotFound,
        _ => {
            let reason = response.status().canonical_reason().unwrap_or("");
            let text = if message.is_empty() {
                reason.to_string()
            } else {
                message
            };
            HubError::Http(status, crate::error::escape_controls(&text).into_owned())
        }
    }
}

/// The cause of a failed request, as one line.
fn cause(e: &ureq::Error) -> String {
    crate::error::escape_controls(&e.to_string()).into_owned()
}

/// `scheme://host[:port]` of a URL, lowercased.
fn origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    format!(
        "{}://{}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    )
}

/// `location` resolved against `base` (absolute, host-relative or
/// path-relative).
fn join(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    if location.starts_with("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return format!("{scheme}:{location}");
    }
    if location.starts_with('/') {
        return format!("{}{location}", origin(base));
    }
    let path = base.split(['?', '#']).next().unwrap_or(base);
    match path.rfind('/') {
        Some(i) => format!("{}{location}", &path[..=i]),
        None => location.to_string(),
    }
}

/// Percent-encodes `text` for a URL path: unreserved characters stay, and
/// `/` too when `keep_slash` (a file path), else it is encoded (a revision
/// such as `refs/pr/1` is one path segment).
fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses the revision listing.
fn parse_info(text: &str) -> Result<RepoInfo, HubError> {
    #[derive(serde::Deserialize)]
    struct Info {
        sha: Option<String>,
        #[serde(default)]
        siblings: Vec<Sibling>,
        #[serde(default)]
        gated: serde_json::Value,
    }
    #[derive(serde::Deserialize)]
    struct Sibling {
        rfilename: String,
        size: Option<u64>,
        #[serde(rename = "blobId")]
        blob_id: Option<String>,
        lfs: Option<Lfs>,
    }
    #[derive(serde::Deserialize)]
    struct Lfs {
        sha256: Option<String>,
        oid: Option<String>,
        size: Option<u64>,
    }
    let info: Info = serde_json::from_str(text)
        .map_err(|e| HubError::Protocol(format!("the model listing is not valid json: {e}")))?;
    let commit = info
        .sha
        .filter(|c| super::cache::is_commit_hash(c))
        .ok_or_else(|| HubError::Protocol("the model listing names no commit hash".into()))?
        .to_ascii_lowercase();
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let meta = match &s.lfs {
                Some(lfs) => {
                    let sha = lfs.sha256.clone().or_else(|| {
                        lfs.oid
                            .as_ref()
                            .map(|o| o.trim_start_matches("sha256:").to_string())
                    });
                    match (sha, lfs.size.or(s.size)) {
                        (Some(sha), Some(size)) if sha.len() == 64 => Some((sha, size, true)),
                        _ => None,
                    }
                }
                None => match (&s.blob_id, s.size) {
                    (Some(id), Some(size)) if id.len() == 40 => Some((id.clone(), size, false)),
                    _ => None,
                },
            };
            let meta = meta
                .filter(|(etag, _, _)| super::cache::is_blob_name(etag))
                .map(|(etag, size, lfs)| RemoteFile {
                    name: s.rfilename.clone(),
                    size,
                    etag: etag.to_ascii_lowercase(),
                    lfs,
                });
            ListedFile {
                name: s.rfilename,
                meta,
            }
        })
        .collect();
    let gated = !matches!(
        info.gated,
        serde_json::Value::Null | serde_json::Value::Bool(false)
    );
    Ok(RepoInfo {
        commit,
        files,
        gated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_joined_and_encoded_and_origins_compared() {
        assert_eq!(origin("https://HF.co/api/x?y"), "https://hf.co");
        assert_eq!(origin("http://127.0.0.1:8080/a"), "http://127.0.0.1:8080");
        assert_eq!(join("http://a:1/x/y?q", "/cdn/z"), "http://a:1/cdn/z");
        assert_eq!(
            join("http://a:1/x/y", "https://cdn.example/z"),
            "https://cdn.example/z"
        );
        assert_eq!(join("http://a:1/x/y", "z"), "http://a:1/x/z");
        assert_eq!(join("https://a/x", "//b/c"), "https://b/c");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
    }

    #[test]
    fn listings_give_commit_sizes_and_checksums() {
        let sha = "ab".repeat(32);
        let text = format!(
            r#"{{"id":"o/m","sha":"{}","gated":"manual","siblings":[
            {{"rfilename":"config.json","size":12,"blobId":"{}"}},
            {{"rfilename":"model.safetensors","size":99,"blobId":"{}","lfs":{{"sha256":"{sha}","size":99,"pointerSize":130}}}},
            {{"rfilename":"README.md"}}]}}"#,
            "C".repeat(40),
            "d".repeat(40),
            "e".repeat(40)
        );
        let info = parse_info(&text).unwrap();
        assert_eq!(info.commit, "c".repeat(40));
        assert!(info.gated);
        let metas: Vec<_> = info.files.iter().map(|f| f.meta.clone()).collect();
        assert_eq!(
            metas[0],
            Some(RemoteFile {
                name: "config.json".into(),
                size: 12,
                etag: "d".repeat(40),
                lfs: false
            })
        );
        assert_eq!(
            metas[1].as_ref().map(|m| (m.etag.clone(), m.lfs)),
            Some((sha, true))
        );
        assert_eq!(metas[2], None);
        assert!(parse_info(r#"{"sha":"../../x","siblings":[]}"#).is_err());
        assert!(
            !parse_info(&format!(r#"{{"sha":"{}","gated":false}}"#, "a".repeat(40)))
                .unwrap()
                .gated
        );
    }
}
