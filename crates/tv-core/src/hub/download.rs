//! Fetching one revision's files into the cache.
//!
//! [`plan`] asks the hub for the revision's listing, selects the files a
//! run reads (reading the weight index first, to learn its shards) and
//! keeps each one's size and checksum. [`fetch`] then brings every file
//! the snapshot lacks: under the blob's lock (the one `huggingface_hub`
//! takes), bytes go to `blobs/<etag>.incomplete`, continuing from what an
//! interrupted run left there with a `Range` request; the whole file is
//! hashed (sha256 for LFS files, the git blob sha1 for the others) and
//! renamed to `blobs/<etag>` only when size and hash match, so a killed
//! run never leaves a blob that looks complete, and a corrupted one is
//! discarded. The snapshot link and the revision's ref come last.

use super::cache::{self, HubId};
use super::client::{Client, HubError, RemoteFile};
use super::settings::HubSettings;
use super::Failure;
use crate::error::{Error, Result};
use crate::progress::Progress;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Attempts in a row that bring no new byte before a transfer is given up
/// (each after a short pause), as `huggingface_hub` retries.
const STALLED_ATTEMPTS: u32 = 3;

/// What one revision needs from the hub.
pub struct Job {
    pub id: HubId,
    pub repo_dir: PathBuf,
    pub commit: String,
    /// The files to have in the snapshot, side files first, shards last.
    pub files: Vec<RemoteFile>,
    /// How many of `files` come before the weights.
    pub side_count: usize,
}

impl Job {
    /// The files the snapshot does not hold yet.
    pub fn missing(&self) -> Vec<&RemoteFile> {
        let snap = self.repo_dir.join("snapshots").join(&self.commit);
        self.files
            .iter()
            .filter(|f| !snap.join(&f.name).exists())
            .collect()
    }

    /// Bytes still to transfer: the missing files less what earlier runs
    /// left in `.incomplete` files and blobs already present.
    pub fn bytes_left(&self) -> u64 {
        self.missing()
            .iter()
            .filter(|f| !cache::blob_path(&self.repo_dir, &f.etag).exists())
            .map(|f| f.size.saturating_sub(partial_len(&self.repo_dir, f)))
            .sum()
    }

    /// Bytes of the missing files, counting what is already on disk.
    pub fn bytes_total(&self) -> u64 {
        self.missing()
            .iter()
            .filter(|f| !cache::blob_path(&self.repo_dir, &f.etag).exists())
            .map(|f| f.size)
            .sum()
    }
}

fn partial_len(repo_dir: &Path, f: &RemoteFile) -> u64 {
    std::fs::metadata(cache::incomplete_path(repo_dir, &f.etag))
        .map(|m| m.len())
        .ok()
        .filter(|&n| n <= f.size)
        .unwrap_or(0)
}

/// Lists the revision and selects its files; the weight index, when there
/// is one, is fetched now to learn the shards.
pub fn plan(client: &Client, settings: &HubSettings, id: &HubId) -> Result<Job> {
    let fail = |e: HubError| super::describe(&Failure::new(id, settings), e);
    let info = client.repo_info(&id.repo, &id.revision).map_err(fail)?;
    if info.gated && settings.token.is_none() {
        return Err(fail(HubError::Gated));
    }
    let names: Vec<String> = info.files.iter().map(|f| f.name.clone()).collect();
    let selection = super::select::select(&id.display(), &names)?;
    let meta = |name: &str| -> Result<RemoteFile> {
        info.files
            .iter()
            .find(|f| f.name == name)
            .and_then(|f| f.meta.clone())
            .ok_or_else(|| {
                Error::Download(format!(
                    "{}: the hub at {} lists {name} without a size and checksum; \
                     it cannot be verified, so it is not downloaded",
                    id.display(),
                    settings.endpoint
                ))
            })
    };
    let mut job = Job {
        id: id.clone(),
        repo_dir: cache::repo_dir(&settings.cache, &id.repo),
        commit: info.commit.clone(),
        files: Vec::new(),
        side_count: 0,
    };
    for name in &selection.side {
        job.files.push(meta(name)?);
    }
    job.side_count = job.files.len();
    for name in &selection.weights {
        job.files.push(meta(name)?);
    }
    if let Some(index) = &selection.index {
        let index_file = meta(index)?;
        ensure_blob(
            client,
            settings,
            &job,
            &index_file,
            &crate::progress::Silent,
        )?;
        let blob = cache::blob_path(&job.repo_dir, &index_file.etag);
        let map = crate::checkpoint::parse_index(&blob)?;
        let mut shards: Vec<&String> = map.values().collect();
        shards.sort();
        shards.dedup();
        job.files.insert(job.side_count, index_file);
        job.side_count += 1;
        for shard in shards {
            if !names.contains(shard) {
                return Err(Error::Download(format!(
                    "{}: {index} names shard {shard}, which the repository does not hold",
                    id.display()
                )));
            }
            job.files.push(meta(shard)?);
        }
    }
    Ok(job)
}

/// Weight files fetched at once (each over its own connection), as
/// `huggingface_hub` fetches several files at a time.
const WORKERS: usize = 4;

/// Brings every file of `jobs` their snapshots lack, then records the refs.
/// Side files (and a shard index) come first, one at a time, each linked
/// into its snapshot; then the weight files, several at once, into
/// `blobs/`, linked only when every one is there: a snapshot never holds
/// part of its weights ([`cache::lookup`] could not tell a folder of
/// loose weight files that lacks one from a complete one), and one without
/// them says what it lacks.
pub fn fetch(
    client: &Client,
    settings: &HubSettings,
    jobs: &[Job],
    progress: &dyn Progress,
) -> Result<()> {
    let mut weights: Vec<(&Job, &RemoteFile)> = Vec::new();
    for job in jobs {
        let side = &job.files[..job.side_count];
        for file in job.missing() {
            if side.contains(file) {
                ensure_blob(client, settings, job, file, progress)?;
                cache::link_pointer(&job.repo_dir, &job.commit, &file.name, &file.etag)?;
            } else {
                weights.push((job, file));
            }
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failure: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let failed = || failure.lock().map_or(true, |f| f.is_some());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(weights.len()) {
            scope.spawn(|| {
                while !failed() {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((job, file)) = weights.get(i) else {
                        break;
                    };
                    if let Err(e) = ensure_blob(client, settings, job, file, progress) {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    for &(job, file) in &weights {
        cache::link_pointer(&job.repo_dir, &job.commit, &file.name, &file.etag)?;
    }
    for job in jobs {
        cache::write_ref(&job.repo_dir, &job.id.revision, &job.commit)?;
    }
    Ok(())
}

/// Makes sure `blobs/` holds one file: downloads, verifies and renames it
/// there unless it is already (under the same lock `huggingface_hub` uses).
fn ensure_blob(
    client: &Client,
    settings: &HubSettings,
    job: &Job,
    file: &RemoteFile,
    progress: &dyn Progress,
) -> Result<()> {
    let blobs = job.repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io("cannot create", &blobs, e))?;
    let lock_path = cache::lock_path(&settings.cache, &job.id.repo, &file.etag);
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("cannot create", &lock_path, e))?;
    lock.lock()
        .map_err(|e| Error::io("cannot lock", &lock_path, e))?;
    if !cache::blob_path(&job.repo_dir, &file.etag).exists() {
        download_blob(client, settings, job, file, progress)?;
    }
    drop(lock);
    Ok(())
}

/// The file's checksum as the hub states it.
enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
}

impl Hasher {
    fn new(file: &RemoteFile) -> Self {
        use sha1::Digest;
        if file.lfs {
            Hasher::Sha256(sha2::Sha256::new())
        } else {
            // git hashes "blob <size>\0" followed by the content.
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", file.size).as_bytes());
            Hasher::GitSha1(h)
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        use sha1::Digest;
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::GitSha1(h) => h.update(bytes),
        }
    }

    fn hex(self) -> String {
        use sha1::Digest;
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::GitSha1(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Downloads `file` into `blobs/<etag>.incomplete` (resuming), verifies it
/// and renames it to `blobs/<etag>`.
fn download_blob(
    client: &Client,
    settings: &HubSettings,
    job: &Job,
    file: &RemoteFile,
    progress: &dyn Progress,
) -> Result<()> {
    let who = job.id.display();
    let part_path = cache::incomplete_path(&job.repo_dir, &file.etag);
    let io = |action, e| Error::io(action, &part_path, e);
    let mut part = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&part_path)
        .map_err(|e| io("cannot create", e))?;
    let mut have = part.metadata().map_err(|e| io("cannot read", e))?.len();
    if have > file.size {
        part.set_len(0).map_err(|e| io("cannot write", e))?;
        have = 0;
    }
    let mut hasher = Hasher::new(file);
    hash_prefix(&mut part, have, &mut hasher).map_err(|e| io("cannot read", e))?;
    progress.advance(have);

    let mut stalled = 0;
    let mut buf = vec![0u8; 1 << 20];
    while have < file.size {
        let before = have;
        let mut transfer = Transfer {
            client,
            settings,
            job,
            file,
            part: &mut part,
            part_path: &part_path,
            hasher: &mut hasher,
            have: &mut have,
            progress,
        };
        let cause = match transfer.attempt(&mut buf) {
            Attempt::Done if have == file.size => break,
            Attempt::Done => "the connection closed early".to_string(),
            Attempt::Retry(cause) => cause,
            Attempt::Fail(e) => return Err(e),
        };
        stalled = if have > before { 0 } else { stalled + 1 };
        if stalled >= STALLED_ATTEMPTS {
            return Err(Error::Download(format!(
                "{who}: the download of {} stopped at {have} of {} bytes ({cause}); \
                 run the command again to resume it",
                file.name, file.size
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(250 << stalled));
    }
    part.sync_all().map_err(|e| io("cannot write", e))?;
    drop(part);
    let got = hasher.hex();
    if got != file.etag {
        let _ = std::fs::remove_file(&part_path);
        return Err(Error::Download(format!(
            "{who}: {} as downloaded from {} does not match the hub's {} (expected {}, got {got}); \
             it was discarded and nothing was added to the cache",
            file.name,
            settings.endpoint,
            if file.lfs { "sha256" } else { "git blob sha1" },
            file.etag
        )));
    }
    let blob = cache::blob_path(&job.repo_dir, &file.etag);
    std::fs::rename(&part_path, &blob).map_err(|e| Error::io("cannot rename into", &blob, e))?;
    Ok(())
}

/// How one request for the rest of a file ended.
enum Attempt {
    /// The body ended (complete when every byte is there).
    Done,
    /// The transfer broke; worth another request from where it stopped.
    Retry(String),
    /// An error no retry can mend.
    Fail(Error),
}

/// One request's worth of a download: the state it advances.
struct Transfer<'a> {
    client: &'a Client,
    settings: &'a HubSettings,
    job: &'a Job,
    file: &'a RemoteFile,
    part: &'a mut File,
    part_path: &'a Path,
    hasher: &'a mut Hasher,
    have: &'a mut u64,
    progress: &'a dyn Progress,
}

impl Transfer<'_> {
    /// Requests the file from `have` on and appends what arrives.
    fn attempt(&mut self, buf: &mut [u8]) -> Attempt {
        let (file, who, part_path) = (self.file, self.job.id.display(), self.part_path);
        let io = |action, e| Attempt::Fail(Error::io(action, part_path, e));
        let mut body =
            match self
                .client
                .open_file(&self.job.id.repo, &self.job.commit, &file.name, *self.have)
            {
                Ok(t) => t,
                Err(HubError::Unreachable(cause)) => return Attempt::Retry(cause),
                // Busy or failing for a moment, as the hub and CDNs sometimes are.
                Err(HubError::Http(status, message)) if status == 429 || status >= 500 => {
                    return Attempt::Retry(format!("{status} {message}"))
                }
                Err(e) => {
                    return Attempt::Fail(super::describe(
                        &Failure::new(&self.job.id, self.settings),
                        e,
                    ))
                }
            };
        if let Some(c) = &body.commit {
            if !c.eq_ignore_ascii_case(&self.job.commit) {
                return Attempt::Fail(Error::Download(format!(
                    "{who}: the hub served {} from commit {c}, not {}",
                    file.name, self.job.commit
                )));
            }
        }
        if body.offset != *self.have {
            // The server ignored the range: start the file over.
            if let Err(e) = self
                .part
                .set_len(0)
                .and_then(|_| self.part.seek(SeekFrom::Start(0)))
            {
                return io("cannot write", e);
            }
            *self.hasher = Hasher::new(file);
            *self.have = 0;
        }
        loop {
            if crate::interrupt::requested() {
                return Attempt::Fail(Error::Interrupted);
            }
            let n = match body.reader.read(buf) {
                Ok(0) => return Attempt::Done,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Attempt::Retry(
                        crate::error::escape_controls(&e.to_string()).into_owned(),
                    )
                }
            };
            if *self.have + n as u64 > file.size {
                // More bytes than listed: not the listed file.
                let _ = std::fs::remove_file(self.part_path);
                return Attempt::Fail(Error::Download(format!(
                    "{who}: {} as served by {} is longer than the {} bytes the hub lists; \
                     it was discarded and nothing was added to the cache",
                    file.name, self.settings.endpoint, file.size
                )));
            }
            if let Err(e) = self.part.write_all(&buf[..n]) {
                return io("cannot write", e);
            }
            self.hasher.update(&buf[..n]);
            *self.have += n as u64;
            self.progress.advance(n as u64);
        }
    }
}

/// Feeds the first `len` bytes of `file` (what an earlier run left) to
/// `hasher` and leaves the file positioned after them.
fn hash_prefix(file: &mut File, len: u64, hasher: &mut Hasher) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = buf.len().min(left as usize);
        file.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    file.seek(SeekFrom::Start(len))?;
    Ok(())
}

/// Free bytes on the file system that holds (or will hold) `dir`: that of
/// its nearest existing ancestor, if it can be asked.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|p| p.exists())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid
    // out-pointer for the duration of the call.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}
