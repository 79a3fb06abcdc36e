//! Fuzzing the checkpoint reader: the committed corpus (tests/fuzz-corpus)
//! and random mutations of its files and of an index must never panic.
//! Whatever opens is also analysed and merged, to exercise odd shapes.
//!
//! The PyTorch pickle reader gets the same treatment: the corpus its
//! coverage-guided fuzz target found (fuzz/corpus/pickle, merged and
//! minimised) plus the torch.save fixtures, replayed as they are and
//! mutated, in memory and through a model folder.

use proptest::prelude::*;
use std::path::Path;
use tv_core::analyze::{analyze, AnalyzeOptions};
use tv_core::device::Device;
use tv_core::family::Family;
use tv_core::merge::{MergeOptions, MergePlan};
use tv_core::progress::Silent;

/// The committed checkpoint corpus.
fn corpus() -> Vec<(String, Vec<u8>)> {
    files_in("tests/fuzz-corpus")
}

/// Files of `dir` under the package root, sorted by name.
fn files_in(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// The pickle fuzz corpus and the torch.save fixtures (read once).
fn pickle_corpus() -> &'static [(String, Vec<u8>)] {
    static CORPUS: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut files = files_in("fuzz/corpus/pickle");
        files.extend(files_in("tests/pickle-fixtures"));
        files
    })
}

/// Opens `bytes` as the `pytorch_model.bin` of a model folder and reads
/// every tensor; returns whether it opened. Must not panic.
fn exercise_pickle(bytes: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("pytorch_model.bin"), bytes).unwrap();
    let spec = model.to_string_lossy().into_owned();
    let opened = tv_core::checkpoint::Checkpoint::open(&spec).map(|c| {
        for name in c.names() {
            let t = c.get(name).unwrap();
            assert_eq!(c.bytes(t).len(), t.nbytes());
        }
    });
    opened.is_ok()
}

/// Opens `bytes` as a model folder; if it opens, analyses and merges it
/// with itself. Returns whether it opened. Must not panic.
fn exercise(bytes: &[u8], index: Option<&str>) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    match index {
        Some(text) => {
            std::fs::write(model.join("model-00001-of-00001.safetensors"), bytes).unwrap();
            std::fs::write(model.join("model.safetensors.index.json"), text).unwrap();
        }
        None => std::fs::write(model.join("model.safetensors"), bytes).unwrap(),
    }
    let spec = model.to_string_lossy().into_owned();
    let Ok(family) = Family::open(&spec, std::slice::from_ref(&spec), None) else {
        return false;
    };
    let _ = analyze(&family, AnalyzeOptions::default(), &Silent);
    if let Ok(plan) = MergePlan::new(&family, vec![0.5], MergeOptions::default()) {
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let _ = plan.execute(&family, &Device::Cpu, &out, &Silent);
    }
    true
}

#[test]
fn the_corpus_opens_or_fails_cleanly() {
    let opened: Vec<String> = corpus()
        .into_iter()
        .filter(|(_, b)| exercise(b, None))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(opened, ["valid.safetensors", "zero-dims.safetensors"]);
}

#[test]
fn the_pickle_corpus_is_converted_or_refused() {
    let corpus = pickle_corpus();
    assert!(corpus.len() > 20, "{} files", corpus.len());
    for (_, bytes) in corpus {
        let _ = tv_core::pickle::fuzzing::input(bytes);
    }
    // The torch.save fixtures: all but the complex one convert.
    for (name, bytes) in files_in("tests/pickle-fixtures") {
        let got = tv_core::pickle::fuzzing::input(&bytes);
        assert_eq!(got.is_ok(), name != "complex.pt", "{name}: {got:?}");
        assert_eq!(exercise_pickle(&bytes), name != "complex.pt", "{name}");
    }
}

/// Replays an input of the `checkpoint` fuzz target in a folder of its own.
fn open_layout(data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    tv_core::checkpoint::fuzzing::open_layout(dir.path(), data);
}

#[test]
fn the_checkpoint_fuzz_corpus_opens_or_fails_cleanly() {
    let corpus = files_in("fuzz/corpus/checkpoint");
    assert!(corpus.len() > 10, "{} files", corpus.len());
    for (_, bytes) in &corpus {
        open_layout(bytes);
    }
}

/// A mutation of a corpus file.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, byte: u8 },
    Truncate { to: usize },
    HeaderLength { len: u64 },
    Insert { at: usize, text: String },
    Bytes { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        prop_oneof![Just(0u64), Just(u64::MAX), 0u64..4096]
            .prop_map(|len| Mutation::HeaderLength { len }),
        (any::<usize>(), "[\\[\\]{}\",:0-9a-zA-Z_ -]{1,12}")
            .prop_map(|(at, text)| Mutation::Insert { at, text }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(at, bytes)| Mutation::Bytes { at, bytes }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip { at, byte } if !bytes.is_empty() => {
            let i = at % bytes.len();
            bytes[i] = *byte;
        }
        Mutation::Truncate { to } => bytes.truncate(to % (bytes.len() + 1)),
        Mutation::HeaderLength { len } if bytes.len() >= 8 => {
            bytes[..8].copy_from_slice(&len.to_le_bytes())
        }
        Mutation::Insert { at, text } => {
            let i = at % (bytes.len() + 1);
            bytes.splice(i..i, text.bytes());
        }
        Mutation::Bytes { at, bytes: new } => {
            let i = at % (bytes.len() + 1);
            bytes.splice(i..i, new.iter().copied());
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(pick in 0usize..64, mutations in proptest::collection::vec(mutation(), 1..4)) {
        let files = corpus();
        let mut bytes = files[pick % files.len()].1.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        exercise(&bytes, None);
    }

    #[test]
    fn mutated_pickles_never_panic(pick in 0usize..1024, mutations in proptest::collection::vec(mutation(), 1..4)) {
        let files = pickle_corpus();
        let mut bytes = files[pick % files.len()].1.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let _ = tv_core::pickle::fuzzing::input(&bytes);
    }

    #[test]
    fn mutated_indexes_never_panic(mutations in proptest::collection::vec(mutation(), 1..4)) {
        let files = corpus();
        let valid = &files.iter().find(|(n, _)| n == "valid.safetensors").unwrap().1;
        let mut index = br#"{"metadata": {"total_size": 20}, "weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}"#.to_vec();
        for m in &mutations {
            apply(&mut index, m);
        }
        exercise(valid, Some(&String::from_utf8_lossy(&index)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_pickle_files_open_or_fail_cleanly(pick in 0usize..1024, mutations in proptest::collection::vec(mutation(), 1..3)) {
        let files = files_in("tests/pickle-fixtures");
        let mut bytes = files[pick % files.len()].1.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        exercise_pickle(&bytes);
    }
}
