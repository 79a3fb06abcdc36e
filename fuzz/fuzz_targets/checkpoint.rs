//! The checkpoint reader over a model folder. The first byte picks the
//! layout: 0, a single `model.safetensors` (the rest of the input); 1, a
//! `model.safetensors.index.json` (the input up to its first NUL byte) and
//! one shard (the rest); 2, a `pytorch_model.bin.index.json` and one pickle
//! shard, likewise. Opening must succeed or fail cleanly, and every tensor
//! of an opened checkpoint must be readable.

#![no_main]

use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        tempfile::tempdir_in(base).unwrap()
    });
    let root = dir.path();
    for e in std::fs::read_dir(root).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let (index, shard) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let write = |name: &str, bytes: &[u8]| std::fs::write(root.join(name), bytes).unwrap();
    match mode % 3 {
        0 => write("model.safetensors", rest),
        1 => {
            write("model.safetensors.index.json", index);
            write("model-00001-of-00001.safetensors", shard);
        }
        _ => {
            write("pytorch_model.bin.index.json", index);
            write("pytorch_model-00001-of-00001.bin", shard);
        }
    }
    let spec = root.to_string_lossy();
    if let Ok(ckpt) = tv_core::checkpoint::Checkpoint::open(&spec) {
        let mut sum = 0u64;
        for name in ckpt.names() {
            let t = ckpt.get(name).unwrap();
            sum += ckpt.bytes(t).iter().map(|&b| b as u64).sum::<u64>();
        }
        std::hint::black_box(sum);
    }
});
