//! Output folders that appear whole or not at all.
//!
//! Results are written into a hidden temporary folder beside the target
//! (`.NAME.partial-PID`); only [`Staging::commit`] moves it into place,
//! after fsyncing it. Dropping a `Staging` without committing (an error, a
//! panic, an interrupt turned into an error) removes the temporary folder,
//! so a failed run never leaves something that looks like a finished result.
//!
//! Replacing an existing target (`--force`) exchanges the two folders in one
//! step where the system can (Linux `renameat2(RENAME_EXCHANGE)`), so there
//! is never a moment without either; elsewhere the old folder is renamed to
//! `.NAME.old-PID` just before the new one takes its name, and removed after.
//!
//! A run killed outright (SIGKILL, power loss) cannot clean up; the next run
//! into the same target removes the `.NAME.partial-PID` folders of processes
//! that no longer run, restores a `.NAME.old-PID` whose target is missing,
//! and reports what it did through [`Staging::notes`].

use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// A temporary output folder awaiting commit.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    temp: PathBuf,
    replace: bool,
    committed: bool,
    /// Parent folders this run created, deepest first, removed again if
    /// the run fails.
    created_parents: Vec<PathBuf>,
    /// What was done besides staging (dead runs' leftovers removed).
    notes: Vec<String>,
}

impl Staging {
    /// Checks that `target` may be written: it must not exist unless
    /// `force`, and then must be a folder. Returns whether it exists.
    pub fn check_target(target: &Path, force: bool) -> Result<bool> {
        let exists = target.exists() || target.is_symlink();
        if exists && !force {
            return Err(Error::InvalidArgument(format!(
                "output {} already exists; pass --force to replace it",
                target.display()
            )));
        }
        if exists && !target.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "output {} exists and is not a folder; refusing to replace it",
                target.display()
            )));
        }
        Ok(exists)
    }

    /// Prepares to write `target`. An existing target is an error unless
    /// `force`, in which case it is replaced at commit time. Leftovers of
    /// earlier runs into the same target whose processes no longer run are
    /// removed first (see [`Staging::notes`]).
    pub fn new(target: &Path, force: bool) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("output {} has no folder name", target.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = parent_of(target);
        let notes = if parent.is_dir() {
            clean_stale(&parent, &name, target)
        } else {
            Vec::new()
        };
        let replace = Self::check_target(target, force).map_err(|e| {
            match notes.iter().find(|n| n.starts_with("restored")) {
                // Say why an output that was missing now exists.
                Some(note) => Error::InvalidArgument(format!("{e} ({note})")),
                None => e,
            }
        })?;
        let created_parents: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .map(Path::to_path_buf)
            .collect();
        let staging = Self {
            target: target.to_path_buf(),
            temp: parent.join(format!(".{name}.partial-{}", std::process::id())),
            replace,
            committed: false,
            created_parents,
            notes,
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("cannot create", &parent, e))?;
        if std::fs::symlink_metadata(&staging.temp).is_ok() {
            // Left by an earlier process that had our process id.
            std::fs::remove_dir_all(&staging.temp)
                .map_err(|e| Error::io("cannot remove", &staging.temp, e))?;
        }
        // Named by the output the user gave, not the hidden folder.
        std::fs::create_dir(&staging.temp)
            .map_err(|e| Error::io("cannot create the output folder", &staging.target, e))?;
        Ok(staging)
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// One line per thing done besides staging: leftovers of killed runs
    /// removed or restored. The binaries print them on stderr.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Fsyncs the temporary folder and moves it into place. An existing
    /// target is replaced only now that the new one is complete, by an
    /// atomic exchange where the system has one.
    pub fn commit(self) -> Result<()> {
        self.commit_with(true)
    }

    fn commit_with(mut self, allow_exchange: bool) -> Result<()> {
        sync_tree(&self.temp)?;
        if self.replace && self.target.is_dir() {
            let exchanged = allow_exchange
                && match rename_exchange(&self.temp, &self.target) {
                    Ok(()) => true,
                    Err(e) if unsupported(&e) => false,
                    Err(e) => return Err(Error::io("cannot swap into place", &self.target, e)),
                };
            if exchanged {
                // The temporary name now holds the old folder.
                self.committed = true;
                sync_dir(&parent_of(&self.target))?;
                let _ = std::fs::remove_dir_all(&self.temp);
                return Ok(());
            }
            let old = self.sibling("old");
            std::fs::rename(&self.target, &old)
                .map_err(|e| Error::io("cannot move aside", &self.target, e))?;
            if let Err(e) = std::fs::rename(&self.temp, &self.target) {
                let _ = std::fs::rename(&old, &self.target);
                return Err(Error::io("cannot rename into place", &self.target, e));
            }
            self.committed = true;
            sync_dir(&parent_of(&self.target))?;
            let _ = std::fs::remove_dir_all(&old);
            return Ok(());
        }
        rename_noreplace(&self.temp, &self.target)
            .map_err(|e| Error::io("cannot rename into place", &self.target, e))?;
        self.committed = true;
        sync_dir(&parent_of(&self.target))
    }

    /// Commits into an existing target without touching what an earlier run
    /// did not write: the files listed in `owned` (relative to the target,
    /// written by an earlier run of the same tool) are moved aside, the new
    /// files moved in, and the old ones removed; every other entry of the
    /// target stays where it is. A new file whose place is taken by
    /// something not in `owned` is an error, before anything moves.
    ///
    /// Unlike [`commit`](Self::commit) this is not one atomic step: for a
    /// moment the target holds neither the old nor the new files.
    pub fn commit_beside(mut self, owned: &[PathBuf]) -> Result<()> {
        sync_tree(&self.temp)?;
        let target = self.target.clone();
        if !target.is_dir() {
            return self.commit();
        }
        let owned: BTreeSet<&Path> = owned.iter().map(PathBuf::as_path).collect();
        let mut new_files = Vec::new();
        list_files(&self.temp, Path::new(""), &mut new_files)?;
        for rel in &new_files {
            in_the_way(&target, rel, &owned)?;
        }
        let aside = self.sibling("replaced");
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::create_dir(&aside).map_err(|e| Error::io("cannot create", &aside, e))?;
        // Old files out, then new files in; undo both on a failure.
        let mut moved_out: Vec<&Path> = Vec::new();
        let mut moved_in: Vec<&PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            for rel in &owned {
                let from = target.join(rel);
                if !std::fs::symlink_metadata(&from).is_ok_and(|m| m.is_file()) {
                    continue;
                }
                move_file(&from, &aside.join(rel))?;
                moved_out.push(rel);
            }
            for rel in &new_files {
                move_file(&self.temp.join(rel), &target.join(rel))?;
                moved_in.push(rel);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for rel in moved_in.iter().rev() {
                let _ = std::fs::rename(target.join(rel), self.temp.join(rel));
            }
            for rel in moved_out.iter().rev() {
                let _ = std::fs::rename(aside.join(rel), target.join(rel));
            }
            let _ = std::fs::remove_dir_all(&aside);
            return Err(e);
        }
        self.committed = true;
        // Folders that held only old files and receive no new ones go too.
        let mut dirs: Vec<&Path> = owned.iter().filter_map(|rel| rel.parent()).collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs.into_iter().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::remove_dir(target.join(dir));
        }
        let mut synced = BTreeSet::new();
        for rel in &new_files {
            let dir = target.join(rel.parent().unwrap_or(Path::new("")));
            if synced.insert(dir.clone()) {
                sync_dir(&dir)?;
            }
        }
        let _ = std::fs::remove_dir_all(&aside);
        let _ = std::fs::remove_dir_all(&self.temp);
        sync_dir(&parent_of(&target))
    }

    /// `.NAME.KIND-PID` beside the target.
    fn sibling(&self, kind: &str) -> PathBuf {
        let name = self
            .target
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        parent_of(&self.target).join(format!(".{name}.{kind}-{}", std::process::id()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
            // Only folders this run created, and only while empty.
            for dir in &self.created_parents {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Every non-folder entry under `dir`/`rel`, relative to `dir`.
fn list_files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let here = dir.join(rel);
    let entries = std::fs::read_dir(&here).map_err(|e| Error::io("cannot list", &here, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", &here, e))?;
        let rel = rel.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(|e| Error::io("cannot list", &here, e))?;
        if kind.is_dir() {
            list_files(dir, &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// Refuses to place the new file `rel` in `target` when something not in
/// `owned` is in its way: at its place, or at one of its folders (which
/// must be real folders, not symlinks that could lead elsewhere).
fn in_the_way(target: &Path, rel: &Path, owned: &BTreeSet<&Path>) -> Result<()> {
    let refuse = |what: &Path| {
        Error::InvalidArgument(format!(
            "output {}: {} is in the way of a new file and was not written by this tool; move it away",
            target.display(),
            what.display()
        ))
    };
    let mut prefix = PathBuf::new();
    let parts: Vec<Component> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        prefix.push(part);
        let Ok(meta) = std::fs::symlink_metadata(target.join(&prefix)) else {
            return Ok(());
        };
        let last = i + 1 == parts.len();
        let fine = if last {
            meta.is_file() && owned.contains(prefix.as_path())
        } else {
            meta.is_dir()
        };
        if !fine {
            return Err(refuse(&prefix));
        }
    }
    Ok(())
}

/// Checks, before any work, that each of the files `rels` (relative to
/// `target`) could be placed by [`Staging::commit_beside`] with `owned`
/// moved aside.
pub fn check_placeable(target: &Path, rels: &[PathBuf], owned: &[PathBuf]) -> Result<()> {
    let owned: BTreeSet<&Path> = owned.iter().map(PathBuf::as_path).collect();
    rels.iter()
        .try_for_each(|rel| in_the_way(target, rel, &owned))
}

/// Renames a file, creating the folders it goes into.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    std::fs::rename(from, to).map_err(|e| Error::io("cannot move into place", to, e))
}

/// Whether a rename flag is unsupported here (old kernel, filesystem
/// without it), so the portable way must do.
fn unsupported(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return [libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP, libc::ENOTSUP].contains(&code);
    }
    e.kind() == std::io::ErrorKind::Unsupported
}

#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both paths are NUL-terminated C strings that outlive the
    // call; renameat2 reads them and touches no other memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Swaps two existing paths in one step.
fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    return renameat2(a, b, libc::RENAME_EXCHANGE);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Renames `from` to `to`, failing if `to` exists (an empty folder created
/// there meanwhile is not silently replaced) where the system can tell.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    std::fs::rename(from, to)
}

/// Whether process `pid` may still run (an unknown answer counts as yes).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if pid <= 0 {
            return true;
        }
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes what killed runs into `target` left beside it: each
/// `.NAME.partial-PID` or `.NAME.replaced-PID` folder of a process that no
/// longer runs, and each such `.NAME.old-PID` (the previous output, moved
/// aside for a replacement) unless the target is missing, in which case it
/// is put back. Returns one note per action.
fn clean_stale(parent: &Path, name: &str, target: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return notes;
    };
    let prefix = format!(".{name}.");
    let mut found: Vec<(PathBuf, String, u32)> = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let Some((kind, pid)) = rest.rsplit_once('-') else {
            continue;
        };
        if !["partial", "replaced", "old"].contains(&kind)
            || pid.is_empty()
            || !pid.bytes().all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        // Only real folders: never follow a symlink out of here.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        found.push((entry.path(), kind.to_string(), pid));
    }
    found.sort();
    for (path, kind, pid) in found {
        let why = format!("left by process {pid}, which no longer runs (a killed run)");
        if kind == "old" && std::fs::symlink_metadata(target).is_err() {
            notes.push(match std::fs::rename(&path, target) {
                Ok(()) => format!(
                    "restored {} from {}, {why}",
                    target.display(),
                    path.display()
                ),
                Err(e) => format!(
                    "could not restore {} from {}: {e}",
                    target.display(),
                    path.display()
                ),
            });
            continue;
        }
        notes.push(match std::fs::remove_dir_all(&path) {
            Ok(()) => format!("removed {}, {why}", path.display()),
            Err(e) => format!("could not remove {}, {why}: {e}", path.display()),
        });
    }
    notes
}

/// Fsyncs every file and folder under `dir`, so a crash after the rename
/// cannot leave a complete-looking folder with empty files.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io("cannot list", dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            let f = std::fs::File::open(&path).map_err(|e| Error::io("cannot open", &path, e))?;
            f.sync_all()
                .map_err(|e| Error::io("cannot sync", &path, e))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io("cannot open", dir, e))?;
    f.sync_all().map_err(|e| Error::io("cannot sync", dir, e))
}

/// An absolute, lexically normalised form of `path`, with symlinks of its
/// existing ancestors resolved, for comparing locations that may not exist.
pub fn normalise(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    // Resolve the longest existing prefix, then append the rest lexically.
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    let mut clean = PathBuf::new();
    for c in out.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

/// Where `path` really is, hop by hop: its own location (its folder's
/// symlinks resolved, not its own), then, while it is a symlink, each
/// location it links to, ending at the fully resolved path. Each entry
/// carries the link it was reached through.
fn locations(path: &Path) -> Vec<(PathBuf, Option<PathBuf>)> {
    let own = |p: &Path| match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => normalise(parent).join(name),
        _ => normalise(p),
    };
    let mut out = vec![(own(path), None)];
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        let Ok(link) = std::fs::read_link(&current) else {
            break;
        };
        let next = parent_of(&current).join(link);
        out.push((own(&next), Some(current.clone())));
        current = next;
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        if out.iter().all(|(p, _)| *p != real) {
            out.push((real, Some(path.to_path_buf())));
        }
    }
    out
}

/// The (device, inode) of `path` and of each of its existing ancestors,
/// following symlinks: two paths naming one folder through a bind mount or
/// another spelling share these.
#[cfg(unix)]
fn ids_up(path: &Path) -> Vec<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    normalise(path)
        .ancestors()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

#[cfg(unix)]
fn id_of(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Refuses an output location that is, contains, or lies inside an input.
///
/// Each input path (a folder, a weight file, an index, a side file) is
/// followed through every symlink, so a Hugging Face cache snapshot
/// protects the `blobs/` its files link to; locations are compared by path
/// and, on Unix, by device and inode, which also sees through bind mounts.
/// Refused with or without `--force`.
pub fn check_output_apart(output: &Path, inputs: &[(String, PathBuf)]) -> Result<()> {
    let outs: Vec<PathBuf> = locations(output).into_iter().map(|(p, _)| p).collect();
    let describe = |input: &Path, loc: &Path, via: &Option<PathBuf>| match via {
        Some(link) if loc != input => {
            format!("{}, which {} links to", loc.display(), link.display())
        }
        _ => input.display().to_string(),
    };
    let inside = |label: &str, what: String| {
        Error::InvalidArgument(format!(
            "output {} is inside input {label} ({what}); choose a folder outside every input",
            output.display()
        ))
    };
    let contains = |label: &str, what: String| {
        Error::InvalidArgument(format!(
            "output {} contains input {label} ({what}); choose a folder outside every input",
            output.display()
        ))
    };
    for (label, input) in inputs {
        for (loc, via) in locations(input) {
            for out in &outs {
                if *out == loc || out.starts_with(&loc) {
                    return Err(inside(label, describe(input, &loc, &via)));
                }
                if loc.starts_with(out) {
                    return Err(contains(label, describe(input, &loc, &via)));
                }
            }
        }
    }
    #[cfg(unix)]
    {
        let out_up = ids_up(output);
        let out_id = id_of(output);
        for (label, input) in inputs {
            let Some(id) = id_of(input) else { continue };
            if out_up.contains(&id) {
                return Err(inside(label, input.display().to_string()));
            }
            if let Some(out_id) = out_id {
                if ids_up(input).contains(&out_id) {
                    return Err(contains(label, input.display().to_string()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let temp = {
            let s = Staging::new(&target, false).unwrap();
            std::fs::write(s.path().join("x"), b"1").unwrap();
            s.path().to_path_buf()
        };
        assert!(!temp.exists() && !target.exists());
        let s = Staging::new(&target, false).unwrap();
        std::fs::write(s.path().join("x"), b"1").unwrap();
        s.commit().unwrap();
        assert!(target.join("x").is_file());
        assert!(Staging::new(&target, false).is_err());
        let s = Staging::new(&target, true).unwrap();
        s.commit().unwrap();
        assert!(!target.join("x").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Parents created for a run that fails are removed again.
        let nested = dir.path().join("a/b/out");
        drop(Staging::new(&nested, false).unwrap());
        assert!(!dir.path().join("a").exists());
        let s = Staging::new(&nested, false).unwrap();
        s.commit().unwrap();
        assert!(nested.is_dir());
    }

    fn apart(out: &Path, input: &Path) -> Result<()> {
        check_output_apart(out, &[("base".to_string(), input.to_path_buf())])
    }

    #[test]
    fn output_inside_or_around_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("base");
        std::fs::create_dir(&input).unwrap();
        assert!(apart(&input.join("out"), &input).is_err());
        assert!(apart(&input, &input).is_err());
        assert!(apart(dir.path(), &input).is_err());
        assert!(apart(&dir.path().join("x/../base"), &input).is_err());
        assert!(apart(&dir.path().join("merged"), &input).is_ok());
    }

    #[test]
    fn symlinks_and_bind_like_aliases_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("repo/blobs");
        let snap = dir.path().join("repo/snapshots/h");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(blobs.join("sha"), b"x").unwrap();
        let link = snap.join("model.safetensors");
        std::os::unix::fs::symlink("../../blobs/sha", &link).unwrap();
        let err = apart(&blobs, &link).unwrap_err().to_string();
        assert!(
            err.contains("contains input base") && err.contains("links to"),
            "{err}"
        );
        assert!(apart(&blobs.join("sub"), &link).is_ok());
        assert!(apart(&blobs.join("sha"), &link).is_err());
        assert!(apart(&snap, &link).is_err());
        assert!(apart(&dir.path().join("repo"), &link).is_err());
        assert!(apart(&dir.path().join("elsewhere"), &link).is_ok());
        // An output reached through a symlink to an input folder.
        let alias = dir.path().join("alias");
        std::os::unix::fs::symlink(&blobs, &alias).unwrap();
        assert!(apart(&alias, &link).is_err());
        assert!(apart(&alias.join("new"), &blobs).is_err());
        assert!(apart(&alias.join("sha"), &link).is_err());
        assert!(apart(&alias.join("new"), &link).is_ok());
    }

    #[test]
    fn replacing_never_leaves_the_target_missing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let s = Staging::new(&target, false).unwrap();
        std::fs::write(s.path().join("v"), b"0").unwrap();
        s.commit().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (stop, target) = (stop.clone(), target.clone());
            std::thread::spawn(move || {
                let mut missing = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if std::fs::symlink_metadata(&target).is_err() {
                        missing += 1;
                    }
                }
                missing
            })
        };
        for i in 1..=200 {
            let s = Staging::new(&target, true).unwrap();
            std::fs::write(s.path().join("v"), i.to_string()).unwrap();
            s.commit().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            watcher.join().unwrap(),
            0,
            "the target was missing at times"
        );
        assert_eq!(std::fs::read_to_string(target.join("v")).unwrap(), "200");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Without the exchange, the old folder is kept until the new one is in.
        let s = Staging::new(&target, true).unwrap();
        std::fs::write(s.path().join("v"), b"fallback").unwrap();
        s.commit_with(false).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("v")).unwrap(),
            "fallback"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn commit_beside_replaces_only_owned_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("stats");
        std::fs::create_dir_all(target.join("m1")).unwrap();
        std::fs::create_dir_all(target.join("gone")).unwrap();
        for f in ["a.json", "m1/s.json", "gone/s.json"] {
            std::fs::write(target.join(f), b"old").unwrap();
        }
        std::fs::write(target.join("notes.txt"), b"mine").unwrap();
        std::fs::write(target.join("m1/extra"), b"mine").unwrap();
        let owned: Vec<PathBuf> = ["a.json", "m1/s.json", "gone/s.json"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let s = Staging::new(&target, true).unwrap();
        std::fs::create_dir(s.path().join("m1")).unwrap();
        std::fs::create_dir(s.path().join("m2")).unwrap();
        for f in ["a.json", "m1/s.json", "m2/s.json"] {
            std::fs::write(s.path().join(f), b"new").unwrap();
        }
        s.commit_beside(&owned).unwrap();
        let read = |f: &str| std::fs::read_to_string(target.join(f)).unwrap();
        assert_eq!(read("a.json"), "new");
        assert_eq!(read("m1/s.json"), "new");
        assert_eq!(read("m2/s.json"), "new");
        assert_eq!(read("notes.txt"), "mine");
        assert_eq!(read("m1/extra"), "mine");
        assert!(!target.join("gone").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // A foreign file where a new one goes: refused, nothing moved.
        std::fs::write(target.join("m2/s.json"), b"mine now").unwrap();
        let s = Staging::new(&target, true).unwrap();
        std::fs::create_dir(s.path().join("m2")).unwrap();
        std::fs::write(s.path().join("m2/s.json"), b"newer").unwrap();
        let err = s.commit_beside(&owned).unwrap_err().to_string();
        assert!(
            err.contains("m2/s.json") && err.contains("in the way"),
            "{err}"
        );
        assert_eq!(read("m2/s.json"), "mine now");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        // A process that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        // Our parent (the test harness's caller) is alive too.
        let parent = std::os::unix::process::parent_id();
        for name in [
            format!(".out.partial-{dead}"),
            format!(".out.partial-{parent}"),
            format!(".out.partialx-{dead}"),
            format!(".other.partial-{dead}"),
            format!(".out.old-{dead}"),
        ] {
            std::fs::create_dir(dir.path().join(&name)).unwrap();
            std::fs::write(dir.path().join(&name).join("f"), b"x").unwrap();
        }
        // The old output of a run killed mid-replacement is put back, so
        // the target exists again and needs --force.
        let err = Staging::new(&target, false).unwrap_err().to_string();
        assert!(
            err.contains("already exists") && err.contains("restored"),
            "{err}"
        );
        assert!(target.join("f").exists());
        assert!(!dir.path().join(format!(".out.partial-{dead}")).exists());
        assert!(dir.path().join(format!(".out.partial-{parent}")).exists());
        assert!(dir.path().join(format!(".out.partialx-{dead}")).exists());
        assert!(dir.path().join(format!(".other.partial-{dead}")).exists());
        std::fs::create_dir(dir.path().join(format!(".out.partial-{dead}"))).unwrap();
        let s = Staging::new(&target, true).unwrap();
        let notes = s.notes().join(" | ");
        assert!(
            notes.contains(&format!(
                "removed {}",
                dir.path().join(format!(".out.partial-{dead}")).display()
            )),
            "{notes}"
        );
        assert!(notes.contains("no longer runs"), "{notes}");
        assert!(!dir.path().join(format!(".out.partial-{dead}")).exists());
        assert!(dir.path().join(format!(".out.partial-{parent}")).exists());
        drop(s);
    }
}
