//! Streaming safetensors output, laid out as transformers' `save_pretrained`.
//!
//! The layout is planned from names, dtypes and shapes alone: tensors are
//! packed in order into shards of at most `max_shard_size` bytes (a tensor
//! larger than the limit gets a shard of its own), named `model.safetensors`
//! when one suffices, else `model-0000k-of-0000n.safetensors` with a
//! `model.safetensors.index.json`. Each shard's header is written first,
//! then tensor bytes are streamed in, then the file is fsynced.

use crate::error::{Error, Result};
use safetensors::Dtype;
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// A tensor to be written.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    /// Byte length of the tensor's data.
    pub fn nbytes(&self) -> u64 {
        let numel: u64 = self.shape.iter().map(|&d| d as u64).product();
        numel * self.dtype.bitsize() as u64 / 8
    }
}

/// One output shard: its file name and the tensors (indices into the plan's
/// tensor list) it holds, in order.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub file_name: String,
    pub tensors: std::ops::Range<usize>,
    pub data_bytes: u64,
}

/// The whole output layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub tensors: Vec<OutTensor>,
    pub shards: Vec<ShardPlan>,
}

impl Layout {
    /// Packs `tensors`, in order, into shards of at most `max_shard_size`
    /// data bytes.
    pub fn plan(tensors: Vec<OutTensor>, max_shard_size: u64) -> Self {
        let mut ranges: Vec<(std::ops::Range<usize>, u64)> = Vec::new();
        let mut start = 0;
        let mut size = 0u64;
        for (i, t) in tensors.iter().enumerate() {
            let n = t.nbytes();
            if i > start && size + n > max_shard_size {
                ranges.push((start..i, size));
                start = i;
                size = 0;
            }
            size += n;
        }
        ranges.push((start..tensors.len(), size));
        let count = ranges.len();
        let shards = ranges
            .into_iter()
            .enumerate()
            .map(|(k, (tensors, data_bytes))| ShardPlan {
                file_name: if count == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
                },
                tensors,
                data_bytes,
            })
            .collect();
        Self { tensors, shards }
    }

    /// Total data bytes over all shards.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_bytes).sum()
    }

    /// The `model.safetensors.index.json` text, or `None` for one shard.
    pub fn index_json(&self) -> Option<String> {
        if self.shards.len() < 2 {
            return None;
        }
        let mut entries: Vec<(&str, &str)> = self
            .shards
            .iter()
            .flat_map(|s| {
                self.tensors[s.tensors.clone()]
                    .iter()
                    .map(move |t| (t.name.as_str(), s.file_name.as_str()))
            })
            .collect();
        entries.sort();
        let weight_map: Map<String, Value> = entries
            .into_iter()
            .map(|(n, f)| (n.to_string(), Value::String(f.to_string())))
            .collect();
        let index = json!({
            "metadata": {"total_size": self.total_bytes()},
            "weight_map": weight_map,
        });
        Some(serde_json::to_string_pretty(&index).expect("json") + "\n")
    }

    /// The header bytes (length prefix included) of shard `k`.
    pub fn header(&self, k: usize) -> Vec<u8> {
        let mut map = Map::new();
        map.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for t in &self.tensors[self.shards[k].tensors.clone()] {
            let end = offset + t.nbytes();
            map.insert(
                t.name.clone(),
                json!({"dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut text = serde_json::to_string(&Value::Object(map)).expect("json");
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let mut bytes = Vec::with_capacity(8 + text.len());
        bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
        bytes.extend_from_slice(text.as_bytes());
        bytes
    }
}

/// The header spelling of a dtype.
pub fn dtype_name(dtype: Dtype) -> String {
    // safetensors' serde names are the variant names (BF16, F32, ...).
    serde_json::to_value(dtype)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{dtype:?}"))
}

/// Streams one shard's data into its file, in the planned order. The file
/// is written by a thread of its own, one segment behind the caller, so
/// writing overlaps the computation of the next segment; buffers go back
/// and forth so none is allocated per segment.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    expected: u64,
    written: u64,
    to_file: Option<SyncSender<Msg>>,
    recycled: Receiver<Vec<u8>>,
    /// A buffer to fill next, for [`ShardWriter::write`].
    spare: Vec<u8>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

/// What the writing thread receives.
enum Msg {
    Data(Vec<u8>),
    /// Every byte is sent: flush and fsync. Without it (the writer dropped
    /// after an error or an interrupt) the thread stops without syncing a
    /// shard that is about to be deleted.
    Finish,
}

/// Bytes [`ShardWriter::write`] copies into one buffer at most, so that
/// copying a large tensor verbatim holds a bounded amount of memory.
pub(crate) const COPY_CHUNK: usize = 16 << 20;

/// Bytes written between two requests that the kernel start writing back.
const WRITEBACK_STEP: u64 = 64 << 20;

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to
/// disk without waiting, so the closing fsync has little left to do. Only
/// a hint: failures are ignored (the fsync reports real errors).
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only schedules I/O.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// The writing thread: appends every buffer it receives, starts writeback
/// every [`WRITEBACK_STEP`], hands the buffer back; on [`Msg::Finish`]
/// flushes and fsyncs. Stops at the first error, or without syncing when
/// the sender goes away unfinished.
fn write_file(
    file: File,
    header_len: u64,
    messages: Receiver<Msg>,
    recycle: SyncSender<Vec<u8>>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let (mut end, mut queued) = (header_len, 0u64);
    for message in messages {
        let buffer = match message {
            Msg::Data(buffer) => buffer,
            Msg::Finish => {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                return file.sync_all();
            }
        };
        crate::testhooks::before_write(buffer.len())?;
        out.write_all(&buffer)?;
        end += buffer.len() as u64;
        if end - queued >= WRITEBACK_STEP {
            out.flush()?;
            start_writeback(out.get_ref(), queued, end - queued);
            queued = end;
        }
        // The caller may have stopped taking buffers back; that is fine.
        let _ = recycle.try_send(buffer);
    }
    Ok(())
}

impl ShardWriter {
    /// Creates `dir/<file_name>` and writes the header of shard `k`.
    pub fn create(dir: &Path, layout: &Layout, k: usize) -> Result<Self> {
        let plan = &layout.shards[k];
        let path = dir.join(&plan.file_name);
        let mut file = File::create(&path).map_err(|e| Error::io("cannot create", &path, e))?;
        let header = layout.header(k);
        file.write_all(&header)
            .map_err(|e| Error::io("cannot write", &path, e))?;
        let (to_file, messages) = sync_channel::<Msg>(1);
        let (recycle, recycled) = sync_channel::<Vec<u8>>(2);
        let header_len = header.len() as u64;
        let thread = std::thread::Builder::new()
            .name("shard-writer".into())
            .spawn(move || write_file(file, header_len, messages, recycle))
            .map_err(|e| Error::io("cannot start a writer for", &path, e))?;
        Ok(Self {
            path,
            expected: plan.data_bytes,
            written: 0,
            to_file: Some(to_file),
            recycled,
            spare: Vec::new(),
            thread: Some(thread),
        })
    }

    /// Appends tensor data, copied into buffers of the writer's of at most
    /// [`COPY_CHUNK`] bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        for chunk in bytes.chunks(COPY_CHUNK) {
            let mut buffer = std::mem::take(&mut self.spare);
            buffer.clear();
            buffer.extend_from_slice(chunk);
            self.spare = self.write_owned(buffer)?;
        }
        Ok(())
    }

    /// Appends `buffer` and returns an emptied buffer to fill next (one the
    /// writing thread is done with, when there is one).
    pub fn write_owned(&mut self, buffer: Vec<u8>) -> Result<Vec<u8>> {
        self.written += buffer.len() as u64;
        self.send(Msg::Data(buffer))?;
        Ok(self.recycled.try_recv().unwrap_or_default())
    }

    /// Hands `message` to the writing thread; its error if it stopped.
    fn send(&mut self, message: Msg) -> Result<()> {
        let sent = self.to_file.as_ref().map(|tx| tx.send(message));
        if matches!(sent, Some(Ok(()))) {
            Ok(())
        } else {
            // The thread stopped: its error says why.
            self.join().and(Err(self.thread_stopped()))
        }
    }

    /// Ends the writing thread (closing its channel) and returns its outcome.
    fn join(&mut self) -> Result<()> {
        self.to_file = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Error::io("cannot write", &self.path, e)),
            _ => Err(self.thread_stopped()),
        }
    }

    fn thread_stopped(&self) -> Error {
        Error::io(
            "cannot write",
            &self.path,
            std::io::Error::other("the writing thread stopped"),
        )
    }

    /// Flushes and fsyncs the shard; checks that exactly the planned number
    /// of bytes was written.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "internal error: wrote {} data bytes, planned {}",
                    self.written, self.expected
                ),
            ));
        }
        self.send(Msg::Finish)?;
        self.join()
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // Unfinished (an error elsewhere): the thread ends without syncing;
        // its result is not needed.
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: Dtype::BF16,
            shape: vec![n],
        }
    }

    #[test]
    fn packs_in_order_and_isolates_oversized_tensors() {
        let layout = Layout::plan(vec![t("a", 10), t("b", 10), t("c", 100), t("d", 5)], 40);
        let names: Vec<_> = layout.shards.iter().map(|s| s.file_name.clone()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        assert_eq!(layout.shards[0].tensors, 0..2);
        assert_eq!(layout.shards[1].tensors, 2..3);
        assert_eq!(layout.shards[2].tensors, 3..4);
        assert_eq!(layout.total_bytes(), 250);
    }

    #[test]
    fn header_is_valid_safetensors_and_padded() {
        let layout = Layout::plan(vec![t("a", 3), t("b", 2)], u64::MAX);
        let header = layout.header(0);
        assert_eq!(header.len() % 8, 0);
        let mut file = header.clone();
        file.extend(std::iter::repeat_n(0u8, 10));
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[2]);
        assert_eq!(layout.shards[0].file_name, "model.safetensors");
        assert!(layout.index_json().is_none());
    }
}
