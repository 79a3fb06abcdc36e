//! Models named by Hugging Face Hub id (`org/name`, `org/name@revision`),
//! found in the local cache and downloaded into it when missing.
//!
//! The binaries call [`ensure`] with their model arguments before opening
//! any checkpoint. Each argument that is not a local path but has the
//! shape of a hub id is looked up in the cache ([`cache`]); a revision the
//! cache holds completely is used as it is, without the network. One it
//! lacks (or holds only in part, after an interrupted download) is listed
//! by the hub ([`client`]), the files a run reads are chosen ([`select`])
//! and fetched ([`download`]) under one progress bar: verified against the
//! hub's checksums, resumed after an interruption, renamed into `blobs/`
//! only once verified, linked from `snapshots/<commit>/` and recorded under
//! `refs/<revision>` as `huggingface_hub` does, so transformers and the `hf`
//! command see them too. [`crate::locate`] then finds the snapshot like any
//! cached model. With [`Access::CacheOnly`] (`--no-download`) or
//! `HF_HUB_OFFLINE=1` nothing is fetched and a missing model is an error.

pub mod cache;
pub mod client;
mod download;
pub mod select;
pub mod settings;

use crate::error::{Error, Result};
use crate::progress::Progress;
use cache::{Cached, HubId};
use client::{Client, HubError};
use settings::HubSettings;
use std::path::Path;

/// Whether a run may download what the cache lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Download missing models (unless `HF_HUB_OFFLINE=1`).
    Download,
    /// Use the cache only (`--no-download`).
    CacheOnly,
}

/// Makes every hub id among `specs` that is not a local path available in
/// the cache, downloading what is missing with `progress` over all bytes;
/// returns one note per model downloaded. Settings come from the
/// environment ([`settings`]).
pub fn ensure(specs: &[String], access: Access, progress: &dyn Progress) -> Result<Vec<String>> {
    ensure_with(specs, access, &HubSettings::from_env(), progress)
}

/// [`ensure`] with explicit settings.
pub fn ensure_with(
    specs: &[String],
    access: Access,
    settings: &HubSettings,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let mut wanted: Vec<HubId> = Vec::new();
    let mut notes = Vec::new();
    for spec in specs {
        if Path::new(spec).exists() {
            continue;
        }
        let Some(id) = HubId::parse(spec)? else {
            continue;
        };
        if wanted.contains(&id) {
            continue;
        }
        let cache_only = access == Access::CacheOnly || settings.offline;
        match cache::lookup(&settings.cache, &id)? {
            Cached::Complete(_) => {}
            Cached::Guessed(dir) if cache_only => notes.push(format!(
                "{}: the cache names no revision {}; using its only snapshot {}",
                id.display(),
                id.revision,
                dir.display()
            )),
            cached if cache_only => {
                return Err(not_cached(&id, settings, access, &cached));
            }
            _ => wanted.push(id),
        }
    }
    if wanted.is_empty() {
        return Ok(notes);
    }
    let client = Client::new(settings);
    let jobs = wanted
        .iter()
        .map(|id| download::plan(&client, settings, id))
        .collect::<Result<Vec<_>>>()?;
    let left: u64 = jobs.iter().map(|j| j.bytes_left()).sum();
    if let Some(free) = download::free_space(&settings.cache) {
        if free < left {
            return Err(Error::Download(format!(
                "not enough free space in {} for the download: it needs {}, {} are free \
                 (HF_HUB_CACHE chooses another place)",
                settings.cache.display(),
                crate::merge::human_bytes(left),
                crate::merge::human_bytes(free)
            )));
        }
    }
    progress.begin(jobs.iter().map(|j| j.bytes_total()).sum());
    let fetched = download::fetch(&client, settings, &jobs, progress);
    progress.finish();
    fetched?;
    Ok(notes
        .into_iter()
        .chain(jobs.iter().map(|j| {
            format!(
                "{} is in the cache: {} (commit {})",
                j.id.display(),
                j.repo_dir.join("snapshots").join(&j.commit).display(),
                j.commit
            )
        }))
        .collect())
}

/// The error for a model the cache lacks when downloads are off.
fn not_cached(id: &HubId, settings: &HubSettings, access: Access, cached: &Cached) -> Error {
    let why = if access == Access::CacheOnly {
        "--no-download is given"
    } else {
        "HF_HUB_OFFLINE=1 forbids downloads"
    };
    match cached {
        Cached::Incomplete { snapshot, missing } => Error::NotFound(format!(
            "{}: the cached snapshot {} lacks {missing} (an interrupted download?) and {why}; \
             run without it to complete the download",
            id.display(),
            snapshot.display()
        )),
        Cached::Dangling { reference, commit } => Error::NotFound(format!(
            "{}: {} names commit {commit}, which has no snapshot folder in the cache, and {why}; \
             run without it to download the model again",
            id.display(),
            reference.display()
        )),
        _ => Error::NotFound(format!(
            "{}: not a local path{}, and not in the Hugging Face cache at {}; {why}",
            id.display(),
            local_hint(id),
            settings.cache.display()
        )),
    }
}

/// What a failure message needs to name: the model and where it was asked.
pub(crate) struct Failure<'a> {
    id: &'a HubId,
    settings: &'a HubSettings,
}

impl<'a> Failure<'a> {
    pub(crate) fn new(id: &'a HubId, settings: &'a HubSettings) -> Self {
        Self { id, settings }
    }
}

/// One line that says what went wrong and what to do about it.
pub(crate) fn describe(f: &Failure, e: HubError) -> Error {
    let (who, repo, ep) = (f.id.display(), &f.id.repo, &f.settings.endpoint);
    let local = local_hint(f.id);
    let how = "set HF_TOKEN or run `hf auth login`";
    let token = f.settings.token_source.as_deref();
    match e {
        HubError::RepoNotFound => Error::NotFound(match token {
            Some(src) => format!(
                "{who}: not a local path{local}, and no model {repo} on the Hugging Face Hub at \
                 {ep} that the token from {src} can see"
            ),
            None => format!(
                "{who}: not a local path{local}, and no model {repo} on the Hugging Face Hub at \
                 {ep} (if it is private, give a token: {how})"
            ),
        }),
        HubError::Gated => Error::Download(match token {
            Some(src) => format!(
                "{who}: {repo} is a gated model and the token from {src} has no access to it; \
                 request access at {ep}/{repo}"
            ),
            None => format!(
                "{who}: {repo} is a gated model: accept its conditions at {ep}/{repo}, \
                 then give a token with access ({how})"
            ),
        }),
        HubError::RevisionNotFound => Error::NotFound(format!(
            "{who}: {repo} has no revision '{}' on the Hugging Face Hub at {ep} \
             (give a branch, tag or commit hash)",
            f.id.revision
        )),
        HubError::EntryNotFound(m) => Error::Download(format!(
            "{who}: a file the hub at {ep} listed is not there ({m})"
        )),
        HubError::BadToken => Error::Download(format!(
            "{who}: the hub at {ep} refused the token from {} as invalid; \
             renew it with `hf auth login` or unset it",
            token.unwrap_or("the environment")
        )),
        HubError::Unreachable(cause) => {
            let cached = match cache::lookup(&f.settings.cache, f.id) {
                Ok(Cached::Incomplete { snapshot, missing }) => format!(
                    "its cached snapshot {} lacks {missing} (an interrupted download?)",
                    snapshot.display()
                ),
                _ => format!("it is not in the cache at {}", f.settings.cache.display()),
            };
            Error::Download(format!(
                "{who}: not a local path{local}; as a Hugging Face id {cached}, and the Hub at \
                 {ep} cannot be reached ({cause}): {}",
                offline_hint(f)
            ))
        }
        HubError::Http(status, message) => Error::Download(format!(
            "{who}: the Hugging Face Hub at {ep} answered {status} {message}"
        )),
        HubError::Protocol(m) => Error::Download(format!(
            "{who}: unexpected answer from the Hugging Face Hub at {ep}: {m}"
        )),
    }
}

/// For an id whose organisation part is a local folder (`fam/nope` typed
/// for `fam/math-tune`), what the folder lacks, so that a mistyped local
/// path is not read as a hub problem only.
pub(crate) fn local_hint(id: &HubId) -> String {
    match id.repo.split_once('/') {
        Some((org, name)) if Path::new(org).is_dir() => {
            format!(" (the local folder {org}/ has no {name})")
        }
        _ => String::new(),
    }
}

/// What to try when the hub cannot be reached: another cached snapshot of
/// the model, if there is one, else the network settings.
fn offline_hint(f: &Failure) -> String {
    let snapshots = cache::repo_dir(&f.settings.cache, &f.id.repo).join("snapshots");
    let complete = cache::snapshot_folders(&snapshots)
        .into_iter()
        .find_map(|dir| {
            let commit = dir.file_name()?.to_string_lossy().into_owned();
            let id = HubId {
                repo: f.id.repo.clone(),
                revision: commit.clone(),
                explicit_revision: true,
            };
            matches!(
                cache::lookup(&f.settings.cache, &id),
                Ok(Cached::Complete(_))
            )
            .then_some(commit)
        });
    match complete {
        Some(commit) => format!(
            "the cache holds commit {commit} of it, which {}@{commit} uses without the network \
             (HF_HUB_OFFLINE=1 keeps every run off the network)",
            f.id.repo
        ),
        None => "check the connection, HTTPS_PROXY or HF_ENDPOINT \
                 (HF_HUB_OFFLINE=1 runs with cached models only)"
            .to_string(),
    }
}
