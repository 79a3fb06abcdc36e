//! The local Hugging Face cache, laid out exactly as `huggingface_hub`
//! writes it, so either side reads what the other wrote:
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     blobs/<etag>                  file contents, named by sha256 (LFS) or git sha1
//!     blobs/<etag>.incomplete       a download under way or interrupted (resumed later)
//!     snapshots/<commit>/<file>     relative symlinks ../../blobs/<etag>
//!     refs/<revision>               the commit hash a branch or tag last resolved to
//! <cache>/.locks/models--<org>--<name>/<etag>.lock
//! ```
//!
//! Reading: [`lookup`] resolves a [`HubId`] to a snapshot folder and says
//! whether it holds every weight file (an interrupted download leaves a
//! snapshot without some). Writing: [`link_pointer`] and [`write_ref`]
//! replace their targets atomically; blobs are renamed into place by
//! [`super::download`] only once verified.

use crate::error::{Error, Result};
use crate::locate::WeightFiles;
use std::path::{Path, PathBuf};

/// A model named on the hub: `org/name`, optionally `@revision` (a branch,
/// tag or commit hash; `main` when not given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// The branch, tag or commit to use.
    pub revision: String,
    /// Whether the user named the revision.
    pub explicit_revision: bool,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`. `Ok(None)` when `spec`
    /// does not have the shape of a hub id; an error when it does but the
    /// revision is not a usable branch, tag or commit name.
    pub fn parse(spec: &str) -> Result<Option<Self>> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (spec, None),
        };
        if !looks_like_repo_id(repo) {
            return Ok(None);
        }
        let Some(rev) = revision else {
            return Ok(Some(Self {
                repo: repo.to_string(),
                revision: "main".to_string(),
                explicit_revision: false,
            }));
        };
        if !is_revision_name(rev) {
            return Err(Error::InvalidArgument(format!(
                "{spec}: '{rev}' is not a branch, tag or commit name \
                 (letters, digits, '-', '_', '.' and '/' between names)"
            )));
        }
        Ok(Some(Self {
            repo: repo.to_string(),
            revision: rev.to_string(),
            explicit_revision: true,
        }))
    }

    /// `org/name`, with `@revision` when the user gave one.
    pub fn display(&self) -> String {
        if self.explicit_revision {
            format!("{}@{}", self.repo, self.revision)
        } else {
            self.repo.clone()
        }
    }
}

/// Whether `spec` has the shape of a hub repository id: `org/name`.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

/// Whether `rev` can name a revision and, under `refs/`, a cache file: no
/// empty, `.` or `..` component, nothing but letters, digits and `-_./`.
fn is_revision_name(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 200
        && rev
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with('.'))
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Whether `rev` is a commit hash: 40 hex digits.
pub fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `etag` can be a blob's name: a git sha1 (40 hex digits) or a
/// sha256 (64).
pub fn is_blob_name(etag: &str) -> bool {
    matches!(etag.len(), 40 | 64) && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `models--org--name`, the repository's folder name in the cache.
pub fn repo_folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The repository's folder in `cache`.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(repo_folder_name(repo))
}

/// What the cache holds of one revision.
#[derive(Debug)]
pub enum Cached {
    /// A snapshot with every weight file.
    Complete(PathBuf),
    /// No ref names the revision, and the cache holds one complete
    /// snapshot and no ref to any other revision: likely the revision's,
    /// but a download asks the hub rather than guess.
    Guessed(PathBuf),
    /// A snapshot (or a ref) that lacks `missing`, as an interrupted
    /// download leaves it.
    Incomplete { snapshot: PathBuf, missing: String },
    /// A ref naming a commit that has no snapshot folder (deleted, or a
    /// download that stopped before its first file).
    Dangling { reference: PathBuf, commit: String },
    /// Nothing of this revision.
    Absent,
}

/// Looks `id` up in `cache`. A damaged ref (anything but a commit hash) is
/// an error, so a revision can never lead out of the cache.
pub fn lookup(cache: &Path, id: &HubId) -> Result<Cached> {
    let repo = repo_dir(cache, &id.repo);
    if !repo.is_dir() {
        return Ok(Cached::Absent);
    }
    let snapshots = repo.join("snapshots");
    let (commit, reference) = if is_commit_hash(&id.revision) {
        (id.revision.to_ascii_lowercase(), None)
    } else {
        let ref_path = repo.join("refs").join(&id.revision);
        if std::fs::symlink_metadata(&ref_path).is_ok() {
            (read_ref(&ref_path)?, Some(ref_path))
        } else if !id.explicit_revision {
            // No refs/main: a guess only when the cache holds one snapshot
            // and no ref says it is another revision's.
            let other_refs = std::fs::read_dir(repo.join("refs"))
                .map(|mut rd| rd.next().is_some())
                .unwrap_or(false);
            let mut revs = snapshot_folders(&snapshots);
            return match revs.len() {
                0 => Ok(Cached::Absent),
                _ if other_refs => Ok(Cached::Absent),
                1 => Ok(match completeness(revs.remove(0)) {
                    Cached::Complete(dir) => Cached::Guessed(dir),
                    other => other,
                }),
                n => Err(Error::NotFound(format!(
                    "{}: the cache at {} holds {n} snapshots and no refs/main; \
                     pass the snapshot folder path or name a commit as {}@<commit>",
                    id.repo,
                    repo.display(),
                    id.repo
                ))),
            };
        } else {
            return Ok(Cached::Absent);
        }
    };
    let dir = snapshots.join(&commit);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(completeness(dir)),
        // A symlink could lead out of the cache: never read or write there.
        Ok(_) => Err(Error::bad_file(
            &dir,
            format!(
                "is not a snapshot folder (a symbolic link or a file), so {} has no snapshot \
                 folder; the cache is damaged: remove it and run again",
                reference.as_deref().unwrap_or(&dir).display()
            ),
        )),
        Err(_) => Ok(match reference {
            Some(reference) => Cached::Dangling { reference, commit },
            None => Cached::Absent,
        }),
    }
}

/// The snapshot folders (real folders named by a commit hash) of a repo.
pub fn snapshot_folders(snapshots: &Path) -> Vec<PathBuf> {
    let mut revs: Vec<PathBuf> = std::fs::read_dir(snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| snapshot_dir(snapshots, &e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    revs.sort();
    revs
}

/// Whether `dir` holds every weight file its index (or its folder) names.
fn completeness(dir: PathBuf) -> Cached {
    match missing_weight_file(&dir) {
        Some(missing) => Cached::Incomplete {
            snapshot: dir,
            missing,
        },
        None => Cached::Complete(dir),
    }
}

/// The first weight file `dir` lacks, if any: a shard its index names, or
/// any weights at all (a folder of adapter files counts as complete).
fn missing_weight_file(dir: &Path) -> Option<String> {
    match crate::locate::find_in_folder(dir) {
        Ok(WeightFiles::Indexed(index)) => {
            let map = crate::checkpoint::parse_index(&index).ok()?;
            map.values().find(|f| !dir.join(f).exists()).cloned()
        }
        Ok(_) => None,
        Err(_) if has_adapter(dir) => None,
        Err(_) => Some("its weight files".to_string()),
    }
}

/// Whether `dir` holds a PEFT adapter (its config and its weights).
fn has_adapter(dir: &Path) -> bool {
    dir.join("adapter_config.json").exists()
        && (dir.join("adapter_model.safetensors").exists()
            || dir.join("adapter_model.bin").exists())
}

/// The commit hash a cache `refs/<revision>` file holds. Anything else
/// (a path, several lines, an empty file) is refused.
pub fn read_ref(path: &Path) -> Result<String> {
    let bytes = crate::sidecar::read_limited(path, 4096)?;
    let text = String::from_utf8_lossy(&bytes);
    // huggingface_hub writes the hash alone; tolerate one trailing newline.
    let rev = text.strip_suffix('\n').unwrap_or(&text);
    if !is_commit_hash(rev) {
        return Err(Error::bad_file(
            path,
            format!(
                "holds '{}', not a commit hash (40 hex digits); the cache is damaged, \
                 delete the file and download the model again",
                rev.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(rev.to_string())
}

/// `snapshots/<rev>` when `rev` is a commit hash and that is a real folder
/// (not a symlink that could lead elsewhere).
pub fn snapshot_dir(snapshots: &Path, rev: &str) -> Option<PathBuf> {
    if !is_commit_hash(rev) {
        return None;
    }
    let dir = snapshots.join(rev);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    meta.is_dir().then_some(dir)
}

/// `blobs/<etag>` of a repository folder.
pub fn blob_path(repo: &Path, etag: &str) -> PathBuf {
    repo.join("blobs").join(etag)
}

/// `blobs/<etag>.incomplete`: where a download of that blob accumulates.
pub fn incomplete_path(repo: &Path, etag: &str) -> PathBuf {
    repo.join("blobs").join(format!("{etag}.incomplete"))
}

/// The lock file huggingface_hub takes (with `flock`) while it writes a
/// blob; taking the same one keeps two downloaders from writing one file.
pub fn lock_path(cache: &Path, repo: &str, etag: &str) -> PathBuf {
    cache
        .join(".locks")
        .join(repo_folder_name(repo))
        .join(format!("{etag}.lock"))
}

/// Links `snapshots/<commit>/<name>` to `blobs/<etag>` with a relative
/// symlink, replacing whatever was there atomically (a temporary link
/// renamed over it).
pub fn link_pointer(repo: &Path, commit: &str, name: &str, etag: &str) -> Result<PathBuf> {
    let dir = repo.join("snapshots").join(commit);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        // Writing through a symlink could write outside the cache.
        return Err(Error::bad_file(
            &dir,
            "is not a snapshot folder (a symbolic link or a file); the cache is damaged: remove it and run again",
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
    let pointer = dir.join(name);
    let target = Path::new("../../blobs").join(etag);
    if std::fs::read_link(&pointer).is_ok_and(|t| t == target) {
        return Ok(pointer);
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    symlink(&target, &tmp).map_err(|e| Error::io("cannot create the link", &tmp, e))?;
    std::fs::rename(&tmp, &pointer).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("cannot create the link", &pointer, e)
    })?;
    Ok(pointer)
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "symbolic links are needed for the Hugging Face cache layout",
    ))
}

/// Records that `revision` resolved to `commit` (`refs/<revision>`),
/// replacing the file atomically; nothing to do when `revision` is the
/// commit itself.
pub fn write_ref(repo: &Path, revision: &str, commit: &str) -> Result<()> {
    if revision == commit {
        return Ok(());
    }
    let path = repo.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == commit) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(repo);
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".ref.")
        .tempfile_in(dir)
        .map_err(|e| Error::io("cannot create a file in", dir, e))?;
    use std::io::Write;
    tmp.write_all(commit.as_bytes())
        .map_err(|e| Error::io("cannot write", tmp.path(), e))?;
    tmp.persist(&path)
        .map_err(|e| Error::io("cannot write", &path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_revisions_are_recognised() {
        assert!(looks_like_repo_id("meta-llama/Llama-3.2-3B"));
        assert!(!looks_like_repo_id("./x/y"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("plain"));
        let id = HubId::parse("org/m@v1.0").unwrap().unwrap();
        assert_eq!((id.repo.as_str(), id.revision.as_str()), ("org/m", "v1.0"));
        assert!(id.explicit_revision);
        let id = HubId::parse("org/m").unwrap().unwrap();
        assert_eq!(id.revision, "main");
        assert!(!id.explicit_revision);
        assert_eq!(
            HubId::parse("org/m@refs/pr/3").unwrap().unwrap().revision,
            "refs/pr/3"
        );
        assert!(HubId::parse("./local/dir").unwrap().is_none());
        for bad in [
            "org/m@",
            "org/m@../x",
            "org/m@a//b",
            "org/m@a b",
            "org/m@/x",
            "org/m@.x",
        ] {
            let err = HubId::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("not a branch, tag or commit name"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn refs_must_hold_a_commit_hash_of_a_snapshot_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("snapshots");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(snapshots.join(hash)).unwrap();
        let refs = dir.path().join("main");
        std::fs::write(&refs, hash).unwrap();
        assert_eq!(read_ref(&refs).unwrap(), hash);
        std::fs::write(&refs, format!("{hash}\n")).unwrap();
        assert_eq!(read_ref(&refs).unwrap(), hash);
        assert_eq!(snapshot_dir(&snapshots, hash), Some(snapshots.join(hash)));
        for bad in [
            "../../etc".to_string(),
            "/etc".to_string(),
            String::new(),
            format!("{hash}\n../x"),
            format!("{hash}\n\n"),
            format!(" {hash}"),
            "g".repeat(40),
        ] {
            std::fs::write(&refs, &bad).unwrap();
            let err = read_ref(&refs).unwrap_err().to_string();
            assert!(err.contains("not a commit hash"), "{bad:?}: {err}");
            assert_eq!(snapshot_dir(&snapshots, &bad), None);
        }
        // A snapshot that is a symlink (possibly out of the cache) is not one.
        let other = "1123456789abcdef0123456789abcdef01234567";
        std::os::unix::fs::symlink("/", snapshots.join(other)).unwrap();
        assert_eq!(snapshot_dir(&snapshots, other), None);
    }

    #[test]
    fn pointers_are_relative_links_and_refs_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--o--m");
        let commit = "a".repeat(40);
        let etag = "b".repeat(64);
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(blob_path(&repo, &etag), b"x").unwrap();
        let p = link_pointer(&repo, &commit, "config.json", &etag).unwrap();
        assert_eq!(
            std::fs::read_link(&p).unwrap(),
            PathBuf::from(format!("../../blobs/{etag}"))
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        // Linking again (another blob) replaces the link.
        let etag2 = "c".repeat(40);
        std::fs::write(blob_path(&repo, &etag2), b"y").unwrap();
        link_pointer(&repo, &commit, "config.json", &etag2).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"y");
        write_ref(&repo, "refs/pr/1", &commit).unwrap();
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/refs/pr/1")).unwrap(),
            commit
        );
        write_ref(&repo, &commit, &commit).unwrap();
        assert!(!repo.join("refs").join(&commit).exists());
        let snaps = repo.join("snapshots").join(&commit);
        let left: Vec<_> = std::fs::read_dir(&snaps).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "temporary links are gone");
    }
}
