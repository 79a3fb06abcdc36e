//! The checkpoint reader over a model folder laid out from the input by
//! `tv_core::checkpoint::fuzzing::open_layout` (a mode byte, then a file,
//! or an index, a NUL byte and a shard). Opening must succeed or fail
//! cleanly, and every tensor of an opened checkpoint must be readable.

#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        tempfile::tempdir_in(base).unwrap()
    });
    let root = dir.path();
    for e in std::fs::read_dir(root).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    tv_core::checkpoint::fuzzing::open_layout(root, data);
});
