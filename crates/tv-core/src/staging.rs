//! Output folders that appear whole or not at all.
//!
//! Results are written into a hidden temporary folder beside the target
//! (`.NAME.partial-PID`); only [`Staging::commit`] renames it into place,
//! after fsyncing it. Dropping a `Staging` without committing (an error, a
//! panic, an interrupt turned into an error) removes the temporary folder,
//! so a failed run never leaves something that looks like a finished result.

use crate::error::{Error, Result};
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
    /// `force`, in which case it is replaced at commit time.
    pub fn new(target: &Path, force: bool) -> Result<Self> {
        let replace = Self::check_target(target, force)?;
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("output {} has no folder name", target.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = parent_of(target);
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
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("cannot create", &parent, e))?;
        if staging.temp.exists() {
            std::fs::remove_dir_all(&staging.temp)
                .map_err(|e| Error::io("cannot remove", &staging.temp, e))?;
        }
        std::fs::create_dir(&staging.temp)
            .map_err(|e| Error::io("cannot create", &staging.temp, e))?;
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

    /// Fsyncs the temporary folder and renames it into place, replacing an
    /// existing target only now that the new one is complete.
    pub fn commit(mut self) -> Result<()> {
        sync_tree(&self.temp)?;
        if self.replace {
            let name = self
                .target
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let old = parent_of(&self.target).join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&self.target, &old)
                .map_err(|e| Error::io("cannot move aside", &self.target, e))?;
            if let Err(e) = std::fs::rename(&self.temp, &self.target) {
                let _ = std::fs::rename(&old, &self.target);
                return Err(Error::io("cannot rename into place", &self.target, e));
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.temp, &self.target)
                .map_err(|e| Error::io("cannot rename into place", &self.target, e))?;
        }
        self.committed = true;
        sync_dir(&parent_of(&self.target))?;
        Ok(())
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

/// Refuses an output location that is, contains, or lies inside an input.
pub fn check_output_apart(output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out = normalise(output);
    for (label, input) in inputs {
        let inp = normalise(input);
        if out == inp || out.starts_with(&inp) {
            return Err(Error::InvalidArgument(format!(
                "output {} is inside input {label} ({}); choose a folder outside every input",
                output.display(),
                input.display()
            )));
        }
        if inp.starts_with(&out) {
            return Err(Error::InvalidArgument(format!(
                "output {} contains input {label} ({}); choose a folder outside every input",
                output.display(),
                input.display()
            )));
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

    #[test]
    fn output_inside_or_around_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("base");
        std::fs::create_dir(&input).unwrap();
        assert!(check_output_apart(&input.join("out"), &[("base", &input)]).is_err());
        assert!(check_output_apart(&input, &[("base", &input)]).is_err());
        assert!(check_output_apart(dir.path(), &[("base", &input)]).is_err());
        assert!(check_output_apart(&dir.path().join("x/../base"), &[("base", &input)]).is_err());
        assert!(check_output_apart(&dir.path().join("merged"), &[("base", &input)]).is_ok());
    }
}
