//! Inputs that change under a run become an error, not a crash.
//!
//! Shards are memory-mapped. If another process truncates a mapped file (a
//! download being restarted, a network file system), reading past its new
//! end raises SIGBUS, which would kill the process and leave its temporary
//! output behind. [`watch`] registers each mapping; a SIGBUS handler that
//! finds the faulting address inside one maps a page of zeros over it (so
//! the read completes), records which file shrank and returns. The loops
//! call [`check`] at every segment and before an output is committed: a
//! recorded truncation turns into a one-line error naming the file, the
//! usual error path removes the partial output, and nothing read as zeros is
//! ever committed. [`check`] also compares each file's identity (device,
//! inode, size) with what was opened, so a file replaced or resized in place
//! is reported the same way. A SIGBUS outside any registered mapping is a
//! genuine fault and crashes as usual.

use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Mappings the handler can look through (fixed, so the handler needs no
/// lock or allocation).
const SLOTS: usize = 4096;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static USED: AtomicUsize = AtomicUsize::new(0);
/// 1 + the slot of the first mapping that faulted, 0 while none has.
static FAULTED: AtomicUsize = AtomicUsize::new(0);
/// The page size, read once when the handler is installed (sysconf is not
/// async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// What each slot maps: the file and its identity when opened.
static FILES: Mutex<Vec<Watched>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

#[derive(Debug, Clone)]
struct Watched {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    live: bool,
}

/// A registered mapping; unregisters on drop.
#[derive(Debug)]
pub(crate) struct Watch {
    slot: Option<usize>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // End first: the handler never sees a range from 0 to an old end.
            ENDS[slot].store(0, Ordering::SeqCst);
            STARTS[slot].store(0, Ordering::SeqCst);
            if let Ok(mut files) = FILES.lock() {
                if let Some(w) = files.get_mut(slot) {
                    w.live = false;
                }
            }
        }
    }
}

/// Registers the mapping `bytes` of the file `path` (opened with metadata
/// `meta`).
pub(crate) fn watch(path: &Path, meta: &std::fs::Metadata, bytes: &[u8]) -> Watch {
    INSTALL.call_once(install_handler);
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    let slot = files.len();
    if slot >= SLOTS {
        // Past the table the file is still read, without the guard.
        return Watch { slot: None };
    }
    files.push(Watched {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        live: true,
    });
    let start = bytes.as_ptr() as usize;
    STARTS[slot].store(start, Ordering::SeqCst);
    ENDS[slot].store(start + bytes.len(), Ordering::SeqCst);
    USED.store(slot + 1, Ordering::SeqCst);
    Watch { slot: Some(slot) }
}

/// Fails if a watched input shrank under a mapping, or no longer is the
/// file (device, inode, size) that was opened.
pub fn check() -> Result<()> {
    let files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    let faulted = FAULTED.load(Ordering::SeqCst);
    if faulted > 0 {
        let path = files
            .get(faulted - 1)
            .map_or_else(|| PathBuf::from("an input"), |w| w.path.clone());
        return Err(truncated(&path));
    }
    for w in files.iter().filter(|w| w.live) {
        let now = std::fs::metadata(&w.path).ok();
        let same_file = now
            .as_ref()
            .is_some_and(|m| m.dev() == w.dev && m.ino() == w.ino);
        let len = now.as_ref().map_or(0, |m| m.len());
        if same_file && len < w.len {
            return Err(truncated(&w.path));
        }
        if !same_file || len != w.len {
            return Err(Error::Incompatible(format!(
                "{} changed while being read (replaced, resized or removed); nothing was written",
                w.path.display()
            )));
        }
    }
    Ok(())
}

fn truncated(path: &Path) -> Error {
    Error::Incompatible(format!(
        "{} was truncated while being read; nothing was written (run again once it is complete)",
        path.display()
    ))
}

fn install_handler() {
    // SAFETY: sysconf is called outside any signal handler.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::SeqCst);
    }
    // SAFETY: sigaction with a handler that only does async-signal-safe
    // work (atomics, mmap, sigaction, raise).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: `info` is the kernel's siginfo for this SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    let used = USED.load(Ordering::SeqCst).min(SLOTS);
    for slot in 0..used {
        let (start, end) = (
            STARTS[slot].load(Ordering::SeqCst),
            ENDS[slot].load(Ordering::SeqCst),
        );
        if addr >= start && addr < end {
            // SAFETY: the page lies inside a read-only mapping of ours and
            // is replaced by zeros; mmap is a plain system call here.
            let mapped = unsafe {
                let page = PAGE.load(Ordering::SeqCst);
                let at = addr & !(page - 1);
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                // Retrying would fault forever: crash as the default would.
                break;
            }
            let _ = FAULTED.compare_exchange(0, slot + 1, Ordering::SeqCst, Ordering::SeqCst);
            return;
        }
    }
    // Not ours: crash as the default action would.
    // SAFETY: restoring the default action and re-raising are async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}
