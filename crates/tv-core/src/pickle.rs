//! PyTorch pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`).
//!
//! These files are untrusted input, so they are read by our own code, not
//! by Python's pickle or a general-purpose reader: [`zip`] lists the zip
//! archive that `torch.save` writes (stored entries only, bounds-checked),
//! and [`unpickle`] runs a bounded stack machine over `data.pkl` that never
//! calls anything: it knows the handful of globals a weights file names
//! (tensor rebuilders, storage types, `OrderedDict`, dtypes) and refuses
//! every other by name. No code from the file runs, nothing recurses, and
//! every size (nesting, stack, memo, objects, dimensions) has a cap.
//!
//! Each tensor of the state dict is then either converted or refused with
//! its name. Its view (offset, sizes, strides) is checked against its
//! storage, whose declared size must fit in the zip entry holding it; the
//! view is materialised element by element in row-major order, so a
//! transposed or sliced weight gets its own values. Element types are
//! copied verbatim: floats (F16, BF16, F32, F64), and integers and booleans
//! as the matching safetensors types. Names that share one storage with an
//! identical view (tied embeddings) are stored once, under the first name
//! that is not `lm_head`, as transformers does when it writes safetensors.
//!
//! The result of each file is one safetensors file, written to an unnamed
//! temporary file in the temporary folder (`TMPDIR`) that the system removes
//! whenever the process ends, even on a second Ctrl-C or a kill; on Linux
//! the rest of the toolkit maps it through `/proc/self/fd`. Elsewhere (or
//! without `/proc`) a named temporary file is used and removed on drop. A
//! conversion checks [`crate::interrupt::requested`] between tensors and
//! every megabyte of a copy.

pub mod unpickle;
pub mod zip;

use crate::error::{Error, Result};
use crate::writer::{Layout, OutTensor};
use safetensors::Dtype;
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use unpickle::{Item, StorageKind, View};

/// `data.pkl` larger than this is refused (a state dict of a million
/// tensors pickles to about 100 MB).
pub const MAX_PICKLE_BYTES: usize = 256 << 20;

/// Materialised views may add up to at most this many times the file's
/// size (plus a megabyte): a view never holds more elements than its
/// storage, but many views of one storage could otherwise multiply it.
pub const MAX_EXPANSION: u64 = 2;

/// The converted copies of pickle files; they vanish when this is dropped
/// (and, on Linux, when the process ends in any way).
#[derive(Debug)]
pub struct Converted {
    _files: Vec<File>,
    _named: Vec<tempfile::NamedTempFile>,
}

/// Converts pickle checkpoint `files` into safetensors files; returns the
/// guard that keeps them and their paths, in order.
pub fn convert(files: &[PathBuf]) -> Result<(Converted, Vec<PathBuf>)> {
    let mut guard = Converted {
        _files: Vec::new(),
        _named: Vec::new(),
    };
    let mut paths = Vec::with_capacity(files.len());
    for file in files {
        if crate::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        // The reader is ours and fuzzed; should it still panic, the file is
        // refused rather than the process brought down.
        let converted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            convert_file(file, &mut guard)
        }))
        .unwrap_or_else(|_| {
            Err(Error::bad_file(
                file,
                "the PyTorch reader failed on this file (a bug; please report it)",
            ))
        });
        paths.push(converted?);
    }
    Ok((guard, paths))
}

/// Why a conversion stopped.
#[derive(Debug)]
pub enum Fail {
    /// The file is malformed or holds something we refuse (one line).
    Bad(String),
    /// An interrupt was requested.
    Interrupted,
    /// Writing the converted copy failed.
    Io(std::io::Error),
}

impl From<String> for Fail {
    fn from(s: String) -> Self {
        Fail::Bad(s)
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Io(e)
    }
}

fn convert_file(file: &Path, guard: &mut Converted) -> Result<PathBuf> {
    let f = File::open(file).map_err(|e| Error::io("cannot open", file, e))?;
    // SAFETY: mapped read-only; the tools never write their inputs (see
    // checkpoint.rs for the same mapping of safetensors files).
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io("cannot map", file, e))?;
    // A file truncated while it is converted faults (SIGBUS) like a
    // truncated safetensors shard: the guard turns that into an error.
    let meta = f
        .metadata()
        .map_err(|e| Error::io("cannot read", file, e))?;
    let _watch = crate::guard::watch(file, &meta, &map);
    let tmp = std::env::temp_dir();
    let cannot_write = |e| Error::io("cannot write a converted copy of a pickle file in", &tmp, e);
    let fail = |f: Fail| match f {
        // Zeros read from a file truncated under the mapping look like a
        // damaged archive: say what happened instead.
        Fail::Bad(msg) => crate::guard::check().err().unwrap_or_else(|| {
            Error::bad_file(file, format!("not a readable PyTorch checkpoint: {msg}"))
        }),
        Fail::Interrupted => Error::Interrupted,
        Fail::Io(e) => cannot_write(e),
    };
    // Everything is checked before anything is written.
    let archive = zip::Archive::read(&map).map_err(|e| fail(describe_container(&map, e)))?;
    let storages = ArchiveStorages::new(&archive).map_err(fail)?;
    let plan = plan(&storages, map.len() as u64).map_err(fail)?;

    let (out, path) = temporary(&tmp, guard).map_err(cannot_write)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    write(&plan, &storages, &mut w, &|| {
        test_delay();
        crate::interrupt::requested()
    })
    .map_err(fail)?;
    w.flush().map_err(cannot_write)?;
    crate::guard::check()?;
    Ok(path)
}

/// A new temporary file for a converted copy and the path to open it by.
fn temporary(dir: &Path, guard: &mut Converted) -> std::io::Result<(File, PathBuf)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if Path::new("/proc/self/fd").is_dir() {
            // Unnamed (O_TMPFILE, or created and unlinked at once): gone
            // when the last descriptor or mapping of it goes.
            let file = tempfile::tempfile_in(dir)?;
            let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            let out = file.try_clone()?;
            guard._files.push(file);
            return Ok((out, path));
        }
    }
    let named = tempfile::Builder::new()
        .prefix("tv-pickle-")
        .suffix(".safetensors")
        .tempfile_in(dir)?;
    let out = named.as_file().try_clone()?;
    let path = named.path().to_path_buf();
    guard._named.push(named);
    Ok((out, path))
}

/// Sleeps before each tensor when `TV_TEST_PICKLE_DELAY_MS` is set (debug
/// builds only), so tests can interrupt a conversion in flight.
fn test_delay() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("TV_TEST_PICKLE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Explains why a file is not a zip archive.
fn describe_container(bytes: &[u8], zip_error: String) -> Fail {
    if bytes.first() == Some(&0x80) {
        Fail::Bad(
            "a legacy (pre-1.6, not zip) PyTorch file, which is not supported; load and \
             re-save it with a current torch.save"
                .into(),
        )
    } else {
        Fail::Bad(zip_error)
    }
}

/// Where tensor data comes from: the storages of an archive, by key.
pub trait Storages {
    /// The state dict's tensors, as `data.pkl` describes them.
    fn items(&self) -> Result<Vec<(String, Item)>, Fail>;
    /// The bytes of storage `key`.
    fn storage(&self, key: &str) -> Result<&[u8], Fail>;
}

struct ArchiveStorages<'a> {
    archive: &'a zip::Archive<'a>,
    prefix: String,
    pickle: &'a [u8],
}

impl<'a> ArchiveStorages<'a> {
    fn new(archive: &'a zip::Archive<'a>) -> Result<Self, Fail> {
        // torch.save writes `<name>/data.pkl`, `<name>/data/<key>`, ...
        let pkl = archive
            .names()
            .iter()
            .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| {
                Fail::Bad("a zip archive without data.pkl (not saved by torch.save?)".into())
            })?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let pickle = archive.data(pkl)?.unwrap_or_default();
        if pickle.len() > MAX_PICKLE_BYTES {
            return Err(Fail::Bad(format!(
                "data.pkl is {} bytes, more than the {MAX_PICKLE_BYTES} a state dict needs",
                pickle.len()
            )));
        }
        if let Some(order) = archive.data(&format!("{prefix}byteorder"))? {
            if order != b"little" {
                return Err(Fail::Bad(format!(
                    "stored with byte order {:?}; only little-endian files are read",
                    String::from_utf8_lossy(&order[..order.len().min(16)])
                )));
            }
        }
        Ok(Self {
            archive,
            prefix,
            pickle,
        })
    }
}

impl Storages for ArchiveStorages<'_> {
    fn items(&self) -> Result<Vec<(String, Item)>, Fail> {
        Ok(unpickle::state_dict(self.pickle)?)
    }

    fn storage(&self, key: &str) -> Result<&[u8], Fail> {
        let name = format!("{}data/{key}", self.prefix);
        self.archive.data(&name)?.ok_or_else(|| {
            Fail::Bad(format!(
                "storage {} is missing from the archive",
                key.escape_debug()
            ))
        })
    }
}

/// One tensor to write: its output name, type and shape, and the view of
/// a storage that holds its values.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub dtype: Dtype,
    pub size: usize,
    pub view: std::rc::Rc<View>,
}

impl Planned {
    fn numel(&self) -> u64 {
        self.view.shape.iter().product()
    }
}

fn quote(name: &str) -> String {
    format!("'{}'", name.escape_debug())
}

/// Checks every tensor of the state dict and lists those to write, sorted
/// by name; `file_len` bounds the total output.
pub fn plan(storages: &dyn Storages, file_len: u64) -> Result<Vec<Planned>, Fail> {
    let items = storages.items()?;
    if items.is_empty() {
        return Err(Fail::Bad("holds no tensors".into()));
    }
    let mut items: Vec<(String, Item)> = items;
    // One name per identical view; prefer names other than lm_head.
    items.sort_by(|a, b| {
        (a.0.starts_with("lm_head"), &a.0).cmp(&(b.0.starts_with("lm_head"), &b.0))
    });
    type ViewKey = (std::rc::Rc<str>, String, u64, Vec<u64>, Vec<u64>);
    let mut seen: HashSet<ViewKey> = HashSet::new();
    let mut out = Vec::new();
    let mut total = 0u64;
    let budget = file_len
        .saturating_mul(MAX_EXPANSION)
        .saturating_add(1 << 20);
    for (name, item) in items {
        let q = quote(&name);
        let view = match item {
            Item::Tensor(v) => v,
            Item::Unsupported(builder) => {
                return Err(Fail::Bad(format!(
                    "tensor {q} is rebuilt by {builder} (a quantized, sparse or other special \
                     tensor), which cannot be converted"
                )))
            }
        };
        if name == "__metadata__" {
            return Err(Fail::Bad(format!(
                "tensor {q} has a name that safetensors reserves"
            )));
        }
        let (dtype, size) = match &view.kind {
            StorageKind::Known(d, s) => (*d, *s),
            StorageKind::Unsupported(t) => {
                return Err(Fail::Bad(format!(
                    "tensor {q} has type {t}, which cannot be converted"
                )))
            }
        };
        let StorageKind::Known(_, storage_size) = view.storage.kind else {
            return Err(Fail::Bad(format!(
                "tensor {q} lives in a storage of an unsupported type"
            )));
        };
        let key = view.storage.key.clone();
        let storage_bytes = view
            .storage
            .numel
            .checked_mul(storage_size as u64)
            .ok_or_else(|| Fail::Bad(format!("tensor {q} declares an impossibly large storage")))?;
        let data = storages.storage(&key)?;
        if storage_bytes > data.len() as u64 {
            return Err(Fail::Bad(format!(
                "tensor {q} declares storage {} of {storage_bytes} bytes, but its archive entry \
                 holds {} bytes",
                key.escape_debug(),
                data.len()
            )));
        }
        let too_big = || Fail::Bad(format!("tensor {q} has a size that overflows"));
        let numel = view
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(too_big)?;
        let nbytes = numel.checked_mul(size as u64).ok_or_else(too_big)?;
        if numel > 0 {
            // The last element the view touches must lie in the storage.
            let last = view
                .shape
                .iter()
                .zip(&view.stride)
                .try_fold(view.offset, |a, (&d, &s)| {
                    a.checked_add((d - 1).checked_mul(s)?)
                });
            let end = last
                .and_then(|l| l.checked_add(1))
                .and_then(|l| l.checked_mul(size as u64));
            if end.is_none_or(|e| e > storage_bytes) {
                return Err(Fail::Bad(format!(
                    "tensor {q} has a view (offset {}, size {:?}, stride {:?}) that reaches past \
                     the end of its storage ({storage_bytes} bytes)",
                    view.offset, view.shape, view.stride
                )));
            }
            if nbytes > storage_bytes {
                return Err(Fail::Bad(format!(
                    "tensor {q} repeats elements (a broadcast view of {nbytes} bytes over a \
                     storage of {storage_bytes}); refusing to expand it"
                )));
            }
        }
        let id = (
            key,
            crate::writer::dtype_name(dtype),
            view.offset,
            view.shape.clone(),
            view.stride.clone(),
        );
        if !seen.insert(id) {
            continue; // a second name for the same values
        }
        total = total.saturating_add(nbytes);
        if total > budget {
            return Err(Fail::Bad(format!(
                "its tensors' views add up to more than {MAX_EXPANSION} times the file's size; \
                 refusing to expand them"
            )));
        }
        out.push(Planned {
            name,
            dtype,
            size,
            view,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Bytes gathered before each write (and interrupt check).
const CHUNK: usize = 1 << 20;

/// Writes the safetensors file of `plan` to `out`. `interrupted` is polled
/// between tensors and every [`CHUNK`] bytes.
pub fn write(
    plan: &[Planned],
    storages: &dyn Storages,
    out: &mut dyn Write,
    interrupted: &dyn Fn() -> bool,
) -> Result<(), Fail> {
    let layout = Layout::plan(
        plan.iter()
            .map(|p| OutTensor {
                name: p.name.clone(),
                dtype: p.dtype,
                shape: p.view.shape.iter().map(|&d| d as usize).collect(),
            })
            .collect(),
        u64::MAX,
    );
    out.write_all(&layout.header(0))?;
    for p in plan {
        if interrupted() {
            return Err(Fail::Interrupted);
        }
        let data = storages.storage(&p.view.storage.key)?;
        copy_view(data, p, out, interrupted)?;
    }
    Ok(())
}

/// Writes the elements of `p`'s view of `data` in row-major order.
fn copy_view(
    data: &[u8],
    p: &Planned,
    out: &mut dyn Write,
    interrupted: &dyn Fn() -> bool,
) -> Result<(), Fail> {
    if p.numel() == 0 {
        return Ok(());
    }
    let e = p.size;
    // Drop size-1 dimensions and merge dimensions that are contiguous with
    // the next one: a plain tensor becomes one run.
    let mut dims: Vec<(u64, u64)> = Vec::new();
    for (&d, &s) in p.view.shape.iter().zip(&p.view.stride) {
        if d == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == d * s => *last = (last.0 * d, s),
            _ => dims.push((d, s)),
        }
    }
    let (inner, inner_stride) = dims.pop().unwrap_or((1, 1));
    let mut index = vec![0u64; dims.len()];
    let mut pos = p.view.offset;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let bad = || Fail::Bad(format!("tensor {} reads past its storage", quote(&p.name)));
    let elem = |i: u64| -> Option<&[u8]> {
        let at = usize::try_from(i).ok()?.checked_mul(e)?;
        data.get(at..at.checked_add(e)?)
    };
    loop {
        // One run along the innermost dimension.
        if inner_stride == 1 {
            let start = usize::try_from(pos).map_err(|_| bad())?;
            let len = usize::try_from(inner).map_err(|_| bad())?;
            let bytes = start
                .checked_mul(e)
                .and_then(|a| data.get(a..a.checked_add(len.checked_mul(e)?)?))
                .ok_or_else(bad)?;
            for piece in bytes.chunks(CHUNK) {
                if buf.len() + piece.len() > CHUNK {
                    flush(&mut buf, out, interrupted)?;
                }
                buf.extend_from_slice(piece);
            }
        } else {
            for k in 0..inner {
                buf.extend_from_slice(elem(pos + k * inner_stride).ok_or_else(bad)?);
                if buf.len() >= CHUNK {
                    flush(&mut buf, out, interrupted)?;
                }
            }
        }
        // Next index of the outer dimensions, last fastest.
        let mut d = dims.len();
        loop {
            if d == 0 {
                return flush(&mut buf, out, interrupted);
            }
            d -= 1;
            index[d] += 1;
            pos += dims[d].1;
            if index[d] < dims[d].0 {
                break;
            }
            pos -= dims[d].0 * dims[d].1;
            index[d] = 0;
        }
    }
}

fn flush(
    buf: &mut Vec<u8>,
    out: &mut dyn Write,
    interrupted: &dyn Fn() -> bool,
) -> Result<(), Fail> {
    out.write_all(buf)?;
    buf.clear();
    if interrupted() {
        return Err(Fail::Interrupted);
    }
    Ok(())
}

/// Entry points for the fuzz targets and the reader tests: the whole
/// reader over bytes in memory, output discarded. They return the reason
/// for a refusal; they must never panic, loop or allocate without bound.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// What the `pickle` fuzz target reads: a whole archive when `bytes`
    /// start like a zip file, else a bare data.pkl.
    pub fn input(bytes: &[u8]) -> std::result::Result<usize, String> {
        if bytes.starts_with(b"PK") {
            archive(bytes)
        } else {
            pickle(bytes)
        }
    }

    /// A `torch.save` zip archive: read, checked, converted.
    pub fn archive(bytes: &[u8]) -> std::result::Result<usize, String> {
        let run = || -> Result<usize, Fail> {
            let archive = zip::Archive::read(bytes).map_err(|e| describe_container(bytes, e))?;
            let storages = ArchiveStorages::new(&archive)?;
            let plan = plan(&storages, bytes.len() as u64)?;
            write(&plan, &storages, &mut std::io::sink(), &|| false)?;
            Ok(plan.len())
        };
        run().map_err(message)
    }

    /// A bare `data.pkl`, its storages all 4096 bytes of a fixed pattern.
    pub fn pickle(bytes: &[u8]) -> std::result::Result<usize, String> {
        struct Fixed<'a>(&'a [u8], Vec<u8>);
        impl Storages for Fixed<'_> {
            fn items(&self) -> Result<Vec<(String, Item)>, Fail> {
                Ok(unpickle::state_dict(self.0)?)
            }
            fn storage(&self, key: &str) -> Result<&[u8], Fail> {
                if key.len() > 8 {
                    return Err(Fail::Bad("missing".into()));
                }
                Ok(&self.1)
            }
        }
        let pattern = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let storages = Fixed(bytes, pattern);
        let run = || -> Result<usize, Fail> {
            let plan = plan(&storages, 1 << 16)?;
            write(&plan, &storages, &mut std::io::sink(), &|| false)?;
            Ok(plan.len())
        };
        run().map_err(message)
    }

    fn message(f: Fail) -> String {
        match f {
            Fail::Bad(m) => m,
            Fail::Interrupted => "interrupted".into(),
            Fail::Io(e) => e.to_string(),
        }
    }
}
